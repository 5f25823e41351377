//! `Store::verify`: the store's promises, checked from its records down to its bytes. Reads
//! only; a problem is reported, never repaired here.
//!
//! - every artifact's manifest hashes to its digest, and every file it lists is a blob in
//!   `blobs/` of the recorded size (and, with `hash`, of the recorded content);
//! - every step's key is the digest of its spec, its output artifact is recorded, and the
//!   producer index lists it;
//! - every run's finished steps point at recorded artifacts (or at artifacts recorded as
//!   dropped).

use std::collections::BTreeMap;

use crate::digest::{ArtifactDigest, BlobDigest};
use crate::store::{EntryKind, Manifest, StepRecord, StepStatus, Store, StoreError};

/// What [`Store::verify`] looked at and what it found wrong.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub steps: usize,
    pub artifacts: usize,
    pub runs: usize,
    /// Distinct blobs checked (size, and content when hashing).
    pub blobs: usize,
    pub bytes_hashed: u64,
    /// One line per problem, naming the record and what is wrong.
    pub problems: Vec<String>,
}

impl Store {
    /// Check every record against the bytes on disk; `hash` also re-hashes every blob.
    pub fn verify(&self, hash: bool) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // Every blob with the artifacts (and paths in them) that use it, so that a damaged
        // blob is reported with all of them.
        let mut users: BTreeMap<BlobDigest, (u64, Vec<String>)> = BTreeMap::new();
        for item in self.trees.artifacts.iter() {
            let (key, value) = item?;
            report.artifacts += 1;
            let name = String::from_utf8_lossy(&key).into_owned();
            let manifest: Manifest = match serde_json::from_slice(&value) {
                Ok(m) => m,
                Err(e) => {
                    report
                        .problems
                        .push(format!("artifact {name}: unreadable manifest ({e})"));
                    continue;
                }
            };
            if manifest.digest().hex() != name {
                report.problems.push(format!(
                    "artifact {name}: its manifest hashes to {}",
                    manifest.digest().hex()
                ));
            }
            for e in &manifest.entries {
                if let EntryKind::File { blob, size, .. } = &e.kind {
                    users
                        .entry(*blob)
                        .or_insert((*size, Vec::new()))
                        .1
                        .push(format!(
                            "`{}` of artifact {}",
                            e.path,
                            &name[..12.min(name.len())]
                        ));
                }
            }
        }
        for (blob, (size, used_by)) in &users {
            report.blobs += 1;
            let path = self.blob_path(blob);
            let used = used_by.join(", ");
            match std::fs::metadata(&path) {
                Err(_) => report
                    .problems
                    .push(format!("blob {} is missing; used by {used}", blob.hex())),
                Ok(m) if m.len() != *size => report.problems.push(format!(
                    "blob {} should hold {size} bytes, but {} are on disk; used by {used}",
                    blob.hex(),
                    m.len()
                )),
                Ok(_) if hash => {
                    let mut h = blake3::Hasher::new();
                    let read =
                        std::fs::File::open(&path).and_then(|mut f| std::io::copy(&mut f, &mut h));
                    match read {
                        Ok(n) => {
                            report.bytes_hashed += n;
                            if BlobDigest::from_hasher(&h) != *blob {
                                report.problems.push(format!(
                                    "blob {}: its bytes on disk hash otherwise; used by {used}",
                                    blob.hex()
                                ));
                            }
                        }
                        Err(err) => report.problems.push(format!(
                            "blob {}: unreadable ({err}); used by {used}",
                            blob.hex()
                        )),
                    }
                }
                Ok(_) => {}
            }
        }
        for item in self.trees.steps.iter() {
            let (key, value) = item?;
            report.steps += 1;
            let name = String::from_utf8_lossy(&key).into_owned();
            let rec: StepRecord = match serde_json::from_slice(&value) {
                Ok(r) => r,
                Err(e) => {
                    report
                        .problems
                        .push(format!("step {name}: unreadable record ({e})"));
                    continue;
                }
            };
            if rec.spec.key().hex() != name {
                report.problems.push(format!(
                    "step {name} ({}): its spec hashes to {}",
                    rec.name,
                    rec.spec.key().hex()
                ));
            }
            if !self.has_artifact(&rec.output)? {
                report.problems.push(format!(
                    "step {name} ({}): its output {} has no manifest",
                    rec.name,
                    rec.output.hex()
                ));
            }
            if !self.producers(&rec.output)?.contains(&rec.key) {
                report.problems.push(format!(
                    "step {name} ({}): the producer index does not list it for {}",
                    rec.name,
                    rec.output.hex()
                ));
            }
        }
        for summary in self.runs()? {
            report.runs += 1;
            let Some(run) = self.run(summary.id)? else {
                report
                    .problems
                    .push(format!("run {}: listed but not recorded", summary.id));
                continue;
            };
            for s in &run.steps {
                // A run's history may name an artifact dropped since (a damaged blob of it was
                // removed, see `repair.rs`): that is recorded, and not a problem.
                if let StepStatus::Cached { output } | StepStatus::Succeeded { output } = &s.status
                    && !self.has_artifact(output)?
                    && self.dropped(output)?.is_none()
                {
                    report.problems.push(format!(
                        "run {}: step {} finished with {}, which has no manifest",
                        run.id,
                        s.name,
                        output.hex()
                    ));
                }
            }
        }
        Ok(report)
    }

    fn has_artifact(&self, a: &ArtifactDigest) -> Result<bool, StoreError> {
        Ok(self.trees.artifacts.contains_key(a.hex().as_bytes())?)
    }
}
