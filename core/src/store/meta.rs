//! The metadata side: sled trees, the commit transaction, reads and runs.

use std::collections::BTreeSet;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::TransactionError;

use super::journal::{Op, TreeId, apply_tx};
use super::{
    EntryKind, FIND_PREFIX_LIMIT, Found, Manifest, ManifestProblem, RunRecord, RunSummary,
    StepCommit, StepProgress, StepRecord, Store, StoreError, fsutil,
};
use crate::digest::{ArtifactDigest, Digest, DigestKind, HEX_LEN, StepKey, is_hex_prefix};

/// Key in the default tree of the last run id handed out.
const RUN_COUNTER: &[u8] = b"next_run_id";

pub(crate) struct Trees {
    /// sled's default tree (the run counter, the journal position).
    pub default: sled::Tree,
    pub steps: sled::Tree,
    pub artifacts: sled::Tree,
    pub producers: sled::Tree,
    pub consumers: sled::Tree,
    pub runs: sled::Tree,
    pub run_index: sled::Tree,
    pub pins: sled::Tree,
    pub dropped: sled::Tree,
    pub gpu_usage: sled::Tree,
    pub run_progress: sled::Tree,
}

impl Trees {
    pub(crate) fn open(db: &sled::Db) -> Result<Trees, StoreError> {
        Ok(Trees {
            default: std::ops::Deref::deref(db).clone(),
            steps: db.open_tree("steps")?,
            artifacts: db.open_tree("artifacts")?,
            producers: db.open_tree("producers")?,
            consumers: db.open_tree("consumers")?,
            runs: db.open_tree("runs")?,
            run_index: db.open_tree("run_index")?,
            // Added after format 1 was first written: sled creates them, empty, in a store
            // that lacks them, and a needle that does not know them ignores them.
            pins: db.open_tree("pins")?,
            dropped: db.open_tree("dropped")?,
            gpu_usage: db.open_tree(super::usage::TREE)?,
            run_progress: db.open_tree(super::progress::TREE)?,
        })
    }

    /// The tree the journal names `id`.
    pub(crate) fn get(&self, id: TreeId) -> &sled::Tree {
        match id {
            TreeId::Default => &self.default,
            TreeId::Steps => &self.steps,
            TreeId::Artifacts => &self.artifacts,
            TreeId::Producers => &self.producers,
            TreeId::Consumers => &self.consumers,
            TreeId::Runs => &self.runs,
            TreeId::RunIndex => &self.run_index,
            TreeId::Pins => &self.pins,
            TreeId::Dropped => &self.dropped,
            TreeId::GpuUsage => &self.gpu_usage,
            TreeId::RunProgress => &self.run_progress,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Makes this thread's next writes stop once the journal holds them, as a kill would.
    pub(crate) static STOP_AFTER_JOURNAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Store {
    /// The one way the metadata is written: `build` decides the change (reading the
    /// metadata as it needs: no other write can come between), which is appended to the
    /// journal and made durable, then applied to sled in one transaction with the journal
    /// position, then flushed. See `journal.rs` for why this order.
    ///
    /// A change `build` leaves empty writes nothing. When sled fails after the journal took
    /// the change, the journal refuses this process's later writes: the next open applies the
    /// change to sled.
    pub(super) fn write<T>(
        &self,
        build: impl FnOnce() -> Result<(Vec<Op>, T), StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let journal = guard.as_mut().ok_or_else(|| StoreError::ReadOnly {
            root: self.root.clone(),
        })?;
        journal.usable()?;
        let (ops, out) = build()?;
        if ops.is_empty() {
            return Ok(out);
        }
        self.fault_point("journal.append")
            .map_err(StoreError::io("append to", journal.path()))?;
        let pos = journal.append(&ops)?;
        #[cfg(test)]
        if STOP_AFTER_JOURNAL.with(std::cell::Cell::get) {
            // What a kill between the journal and sled leaves (see `journal.rs`).
            journal.poison();
            return Err(StoreError::corrupt("stopped after the journal (a test)"));
        }
        let sled_fault = |point| {
            self.fault_point(point).map_err(StoreError::io(
                "write the metadata in",
                self.root.join("meta"),
            ))
        };
        let applied = sled_fault("sled.transaction")
            .and_then(|()| apply_tx(&self.trees, &ops, Some(pos)))
            .and_then(|()| sled_fault("sled.flush"))
            .and_then(|()| {
                self.db.flush()?;
                Ok(())
            });
        if let Err(e) = applied {
            journal.poison();
            return Err(e);
        }
        Ok(out)
    }
}

/// One commit's writes, encoded before the transaction (which sled may retry).
struct Encoded {
    step_key: Vec<u8>,
    record: Vec<u8>,
    /// `None` when the artifact is recorded already.
    manifest: Option<(Vec<u8>, Vec<u8>)>,
    producer: Vec<u8>,
    consumers: Vec<Vec<u8>>,
}

impl Store {
    pub(super) fn commit_inner(
        &self,
        commits: &[StepCommit],
        run: u64,
        progress: &[StepProgress],
    ) -> Result<(), StoreError> {
        if commits.is_empty() {
            return Ok(());
        }
        // Not while damaged records are dropped (`Store::drop_damaged`): a manifest checked
        // against `blobs/` here must not lose a blob before its transaction records it.
        let _guard = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut encoded = Vec::with_capacity(commits.len());
        // Artifacts checked in this call: a batch often repeats one (a shared input).
        let mut checked = BTreeSet::new();
        for c in commits {
            let artifact = c.manifest.digest();
            if artifact != c.record.output {
                return Err(StoreError::OutputMismatch {
                    step: c.record.key.hex(),
                    recorded: c.record.output.hex(),
                    manifest: artifact.hex(),
                });
            }
            let artifact_key = artifact.hex().into_bytes();
            let manifest =
                if checked.insert(artifact) && !self.trees.artifacts.contains_key(&artifact_key)? {
                    check_manifest(&c.manifest).map_err(|problem| StoreError::BadManifest {
                        artifact: artifact.hex(),
                        problem,
                    })?;
                    self.check_blobs(&artifact, &c.manifest)?;
                    Some((artifact_key, to_json(&c.manifest)))
                } else {
                    None
                };
            let step = c.record.key;
            let consumers = c
                .record
                .spec
                .inputs
                .values()
                .flat_map(|input| input.artifacts())
                .map(|a| index_key(&a, &step))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            encoded.push(Encoded {
                step_key: step.hex().into_bytes(),
                record: to_json(&c.record),
                manifest,
                producer: index_key(&artifact, &step),
                consumers,
            });
        }

        let progress = super::progress::encode(run, progress);
        let bytes: usize = progress
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
            + encoded
                .iter()
                .map(|e| {
                    e.record.len()
                        + e.manifest.as_ref().map_or(0, |(k, v)| k.len() + v.len())
                        + e.producer.len()
                        + e.consumers.iter().map(Vec::len).sum::<usize>()
                })
                .sum::<usize>();
        // sled must not meet a full disk (see `space.rs`).
        self.ensure_room(bytes as u64)?;

        self.write(|| {
            let mut ops = Vec::new();
            for e in encoded {
                // Another commit may have recorded it meanwhile (it has the same bytes).
                if let Some((key, value)) = e.manifest
                    && !self.trees.artifacts.contains_key(&key)?
                {
                    ops.push(Op::insert(TreeId::Artifacts, key, value));
                }
                ops.push(Op::insert(TreeId::Steps, e.step_key, e.record));
                ops.push(Op::insert(TreeId::Producers, e.producer, Vec::new()));
                for c in e.consumers {
                    ops.push(Op::insert(TreeId::Consumers, c, Vec::new()));
                }
            }
            for (k, v) in progress {
                ops.push(Op::insert(TreeId::RunProgress, k.to_vec(), v));
            }
            Ok((ops, ()))
        })
    }

    /// Every blob `manifest` references is in `blobs/`: the invariant's check.
    fn check_blobs(
        &self,
        artifact: &ArtifactDigest,
        manifest: &Manifest,
    ) -> Result<(), StoreError> {
        for e in &manifest.entries {
            if let EntryKind::File { blob, .. } = &e.kind
                && !fsutil::exists(&self.blob_path(blob))?
            {
                return Err(StoreError::corrupt(format!(
                    "artifact `{}` references blob `{}` (for `{}`), which is not in the store",
                    artifact.hex(),
                    blob.hex(),
                    e.path
                )));
            }
        }
        Ok(())
    }

    pub(super) fn step_inner(&self, key: &StepKey) -> Result<Option<StepRecord>, StoreError> {
        get_json(&self.trees.steps, "steps", key.hex().as_bytes())
    }

    pub(super) fn steps_named_inner(&self, name: &str) -> Result<Vec<StepRecord>, StoreError> {
        // A full scan, decoding only records whose name matches: the name sits near the start
        // of every record, so a cheap byte search skips most of them undecoded.
        let needle = format!(
            "\"name\":{}",
            serde_json::to_string(name).expect("a string")
        );
        let mut out = Vec::new();
        for item in self.trees.steps.iter() {
            let (key, value) = item?;
            if contains_bytes(&value, needle.as_bytes()) {
                let rec: StepRecord = decode("steps", &key, &value)?;
                if rec.name == name {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    pub(super) fn manifest_inner(
        &self,
        artifact: &ArtifactDigest,
    ) -> Result<Option<Manifest>, StoreError> {
        get_json(
            &self.trees.artifacts,
            "artifacts",
            artifact.hex().as_bytes(),
        )
    }

    pub(super) fn index_scan(
        &self,
        tree: &sled::Tree,
        name: &str,
        artifact: &ArtifactDigest,
    ) -> Result<Vec<StepKey>, StoreError> {
        let mut prefix = artifact.hex().into_bytes();
        prefix.push(b'/');
        let mut out = Vec::new();
        for item in tree.scan_prefix(&prefix) {
            let (key, _) = item?;
            let step = std::str::from_utf8(&key[prefix.len()..])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    StoreError::corrupt(format!(
                        "key `{}` of tree `{name}` does not end in a step key",
                        String::from_utf8_lossy(&key)
                    ))
                })?;
            out.push(step);
        }
        Ok(out)
    }

    pub(super) fn next_run_id_inner(&self) -> Result<u64, StoreError> {
        // A run id handed out must never be handed out again, even after a crash: the counter
        // is written (durably) before the id is.
        self.write(|| {
            let counter = match self.trees.default.get(RUN_COUNTER)? {
                None => 0,
                Some(v) => decode_u64(Some(&v))
                    .ok_or_else(|| StoreError::corrupt("the run counter (key `next_run_id`)"))?,
            };
            // Past every recorded run too, so that ids stay unique whatever befell the counter.
            let last_run = match self.trees.runs.last()? {
                Some((key, _)) => decode_u64(Some(&key)).ok_or_else(|| {
                    StoreError::corrupt(format!("key `{}` of tree `runs`", display_key(&key)))
                })?,
                None => 0,
            };
            let id = counter.max(last_run) + 1;
            let op = Op::insert(TreeId::Default, RUN_COUNTER, id.to_be_bytes());
            Ok((vec![op], id))
        })
    }

    pub(super) fn put_run_inner(&self, run: &RunRecord) -> Result<(), StoreError> {
        let key = run.id.to_be_bytes();
        let record = to_json(run);
        let summary = to_json(&RunSummary::of(run));
        self.write(|| {
            let mut ops = Vec::new();
            // An ended run's record is whole: its progress goes (see `progress.rs`).
            if run.ended.is_some() {
                for k in self.progress_keys(run.id)? {
                    ops.push(Op::remove(TreeId::RunProgress, k.to_vec()));
                }
            }
            ops.push(Op::insert(TreeId::Runs, key, record));
            ops.push(Op::insert(TreeId::RunIndex, key, summary));
            // Keep the counter past every recorded id, also one not from `next_run_id`.
            let counter = decode_u64(self.trees.default.get(RUN_COUNTER)?.as_deref()).unwrap_or(0);
            if counter < run.id {
                ops.push(Op::insert(TreeId::Default, RUN_COUNTER, key));
            }
            Ok((ops, ()))
        })
    }

    pub(super) fn run_inner(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        match get_json(&self.trees.runs, "runs", &id.to_be_bytes())? {
            Some(record) => Ok(Some(self.with_progress(record)?)),
            None => Ok(None),
        }
    }

    pub(super) fn runs_inner(&self) -> Result<Vec<RunSummary>, StoreError> {
        self.trees
            .run_index
            .iter()
            .map(|item| {
                let (key, value) = item?;
                decode("run_index", &key, &value)
            })
            .collect()
    }

    pub(super) fn find_prefix_inner(&self, prefix: &str) -> Result<Vec<Found>, StoreError> {
        if !is_hex_prefix(prefix) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for item in self.trees.steps.scan_prefix(prefix.as_bytes()) {
            if out.len() >= FIND_PREFIX_LIMIT {
                return Ok(out);
            }
            let (key, _) = item?;
            out.push(Found::Step(parse_key(&key, "steps")?));
        }
        for item in self.trees.artifacts.scan_prefix(prefix.as_bytes()) {
            if out.len() >= FIND_PREFIX_LIMIT {
                return Ok(out);
            }
            let (key, _) = item?;
            out.push(Found::Artifact(parse_key(&key, "artifacts")?));
        }
        Ok(out)
    }
}

/// `artifact hex` "/" `step key hex`: the producers and consumers index key.
pub(super) fn index_key(artifact: &ArtifactDigest, step: &StepKey) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 * HEX_LEN + 1);
    key.extend_from_slice(artifact.hex().as_bytes());
    key.push(b'/');
    key.extend_from_slice(step.hex().as_bytes());
    key
}

pub(super) fn parse_key<K: DigestKind>(key: &[u8], tree: &str) -> Result<Digest<K>, StoreError> {
    std::str::from_utf8(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            StoreError::corrupt(format!(
                "key `{}` of tree `{tree}` is not a {}",
                String::from_utf8_lossy(key),
                K::NAME
            ))
        })
}

pub(super) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // The record types are plain data: maps with string keys, no fallible Serialize impls.
    serde_json::to_vec(value).expect("store records serialise to JSON")
}

pub(super) fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub(super) fn get_json<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &str,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        Some(value) => decode(name, key, &value).map(Some),
        None => Ok(None),
    }
}

pub(super) fn decode<T: DeserializeOwned>(
    tree: &str,
    key: &[u8],
    value: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        what: format!("record `{}` of tree `{tree}`", display_key(key)),
        source: Some(Box::new(e)),
    })
}

/// Hex keys as they are; run ids (8 bytes big-endian) as numbers.
pub(super) fn display_key(key: &[u8]) -> String {
    match <[u8; 8]>::try_from(key) {
        Ok(id) => u64::from_be_bytes(id).to_string(),
        Err(_) => String::from_utf8_lossy(key).into_owned(),
    }
}

pub(super) fn decode_u64(bytes: Option<&[u8]>) -> Option<u64> {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

pub(super) fn tx_error(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Db(e),
        // Nothing aborts these transactions.
        TransactionError::Abort(()) => StoreError::corrupt("a transaction aborted"),
    }
}

/// A manifest the store can lay out as a tree: relative `/`-separated paths without empty,
/// `.` or `..` components, strictly sorted, no entry under a file or under an empty-dir entry.
pub(crate) fn check_manifest(manifest: &Manifest) -> Result<(), ManifestProblem> {
    let mut prev: Option<&str> = None;
    let mut paths = BTreeSet::new();
    for e in &manifest.entries {
        let p = e.path.as_str();
        if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") || p.contains('\0') {
            return Err(ManifestProblem::NotClean(p.to_string()));
        }
        if prev.is_some_and(|prev| prev >= p) {
            return Err(ManifestProblem::OutOfOrder(p.to_string()));
        }
        prev = Some(p);
        paths.insert(p);
    }
    for e in &manifest.entries {
        let p = e.path.as_str();
        for (i, _) in p.match_indices('/') {
            if paths.contains(&p[..i]) {
                return Err(ManifestProblem::UnderAFile {
                    parent: p[..i].to_string(),
                    path: p.to_string(),
                });
            }
        }
    }
    Ok(())
}
