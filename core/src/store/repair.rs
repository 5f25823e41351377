//! Dropping a damaged blob, with everything that needs it.
//!
//! A blob whose bytes no longer hash to its name cannot stay: an absorb would trust it as the
//! blob, a view would hand it to the next step. Its bytes are nowhere else, so it goes, with
//! every artifact that holds it and every step record whose output such an artifact is; those
//! steps run again in the next run and, deterministic, bring back the same bytes under the same
//! digests, so what was computed downstream of them stays cached. Runs keep their history; the
//! `dropped` tree says why the artifacts they name are gone.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, Transactional};

use super::meta::{contains_bytes, decode, to_json, tx_error};
use super::{EntryKind, Manifest, Millis, StepRecord, Store, StoreError, fsutil, now_millis};
use crate::digest::{ArtifactDigest, BlobDigest, StepKey};

/// Why an artifact is no longer in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub reason: String,
    pub at: Millis,
}

/// What [`Store::drop_blob`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DroppedBlob {
    pub artifacts: Vec<ArtifactDigest>,
    /// Names of the step records removed.
    pub steps: Vec<String>,
}

impl Store {
    /// Remove `blob` and what needs it (see the module doc). Scans every manifest and step
    /// record: a repair, not a hot path.
    pub fn drop_blob(&self, blob: &BlobDigest, reason: &str) -> Result<DroppedBlob, StoreError> {
        let hex = blob.hex();
        let artifacts = self.artifacts_holding(blob)?;
        let hexes: Vec<String> = artifacts.iter().map(|a| a.hex()).collect();
        let mut steps: Vec<(StepKey, String)> = Vec::new();
        for item in self.trees.steps.iter() {
            let (key, value) = item?;
            if !hexes.iter().any(|h| contains_bytes(&value, h.as_bytes())) {
                continue;
            }
            let rec: StepRecord = decode("steps", &key, &value)?;
            if artifacts.contains(&rec.output) {
                steps.push((rec.key, rec.name));
            }
        }
        let mut producers = BTreeSet::new();
        for h in &hexes {
            let mut prefix = h.clone().into_bytes();
            prefix.push(b'/');
            for item in self.trees.producers.scan_prefix(&prefix) {
                producers.insert(item?.0.to_vec());
            }
        }
        let note = to_json(&Dropped {
            reason: reason.to_string(),
            at: now_millis(),
        });

        let t = &self.trees;
        (&t.steps, &t.artifacts, &t.producers, &t.dropped)
            .transaction(|(steps_tree, artifacts_tree, producers_tree, dropped)| {
                for (key, _) in &steps {
                    steps_tree.remove(key.hex().as_bytes())?;
                }
                for h in &hexes {
                    artifacts_tree.remove(h.as_bytes())?;
                    dropped.insert(h.as_bytes(), note.as_slice())?;
                }
                for p in &producers {
                    producers_tree.remove(p.as_slice())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(tx_error)?;
        self.db.flush()?;

        // No record needs them now.
        for a in &artifacts {
            self.remove_view(a)?;
        }
        fsutil::remove_tree(&self.blob_path(blob))?;
        tracing::info!(
            "dropped blob {hex} ({reason}) with {} artifact(s) and {} step record(s)",
            artifacts.len(),
            steps.len()
        );
        Ok(DroppedBlob {
            artifacts,
            steps: steps.into_iter().map(|(_, name)| name).collect(),
        })
    }

    /// Every recorded artifact with a file whose blob is `blob`: a scan of all manifests.
    pub(crate) fn artifacts_holding(
        &self,
        blob: &BlobDigest,
    ) -> Result<Vec<ArtifactDigest>, StoreError> {
        let hex = blob.hex();
        let mut out = Vec::new();
        for item in self.trees.artifacts.iter() {
            let (key, value) = item?;
            // Most manifests do not mention it: skip those undecoded.
            if !contains_bytes(&value, hex.as_bytes()) {
                continue;
            }
            let manifest: Manifest = decode("artifacts", &key, &value)?;
            let holds = manifest
                .entries
                .iter()
                .any(|e| matches!(&e.kind, EntryKind::File { blob: b, .. } if b == blob));
            if holds {
                out.push(manifest.digest());
            }
        }
        Ok(out)
    }

    /// Why `artifact` was dropped, if it was (and has not been made again since).
    pub fn dropped(&self, artifact: &ArtifactDigest) -> Result<Option<Dropped>, StoreError> {
        let key = artifact.hex();
        if self.trees.artifacts.contains_key(key.as_bytes())? {
            return Ok(None);
        }
        match self.trees.dropped.get(key.as_bytes())? {
            Some(v) => decode("dropped", key.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }
}
