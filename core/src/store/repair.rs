//! Damaged bytes: checking an artifact's blobs against their digests (a run does it for the
//! inputs of every step it executes), and dropping what damaged bytes make untrue (the run,
//! and `needle verify --repair`).
//!
//! Dropping a damaged blob drops every manifest that lists it and every step record whose
//! output is such a manifest, so that the next run executes those steps again instead of
//! feeding the damaged bytes downstream. Steps that *read* such an artifact keep their records:
//! their outputs are whole, and when the producer runs again and yields the same bytes, the
//! artifact is recorded again under the same digest. A `dropped` record remembers each
//! dropped artifact, so that runs and pins that name it remain valid history.
//!
//! Order (see the store's doc): the artifacts' views (hard links to the damaged inodes) go
//! first, then the damaged blob files, made durable, then one metadata transaction. A crash
//! before the transaction leaves records pointing at a missing blob, which `verify` reports and
//! dropping again repairs; a damaged file never stays under its digest's name once no record
//! points at it, where the next absorb of those bytes would trust it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::journal::{Op, TreeId};
use super::meta::{contains_bytes, index_key, to_json};
use super::{
    DroppedRecord, EntryKind, Manifest, StepRecord, Store, StoreError, fsutil, now_millis,
};
use crate::digest::{ArtifactDigest, BlobDigest, HEX_LEN, StepKey};
use serde::Serialize;

/// Most threads hashing blobs at once (as when absorbing).
const THREADS: usize = 16;

/// What is damaged. Records are named by their raw tree keys: a broken one may not parse.
#[derive(Debug, Default, Clone)]
pub struct Damage {
    /// Blob → what is wrong with it, said of the blob (`is missing`…).
    pub blobs: BTreeMap<BlobDigest, String>,
    /// Artifact key → why its manifest is untrue (unreadable, hashes otherwise, missing
    /// though a step names it as its output). Manifests that list a damaged blob need not be
    /// named: [`Store::drop_damaged`] finds them.
    pub artifacts: BTreeMap<Vec<u8>, String>,
    /// Step key → why its record is untrue (unreadable, its spec hashes otherwise, its
    /// output is not recorded). Steps whose output is a dropped artifact need not be named.
    pub steps: BTreeMap<Vec<u8>, String>,
    /// Run id key → why the run is forgotten (an unreadable record, a summary without one).
    pub runs: BTreeMap<Vec<u8>, String>,
    /// Pin keys whose record is unreadable: written again (the pin stays).
    pub pins: BTreeSet<Vec<u8>>,
    /// Producer index entries missing for a step record's output: added.
    pub missing_producers: Vec<(ArtifactDigest, StepKey)>,
    /// Artifacts a run or pin names that are gone with no `dropped` record: given one.
    pub lost: BTreeMap<ArtifactDigest, String>,
    /// Why the journal does not replay to the metadata: it is written anew from sled, the old
    /// one kept aside.
    pub journal: Option<String>,
}

impl Damage {
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
            && self.artifacts.is_empty()
            && self.steps.is_empty()
            && self.runs.is_empty()
            && self.pins.is_empty()
            && self.missing_producers.is_empty()
            && self.lost.is_empty()
            && self.journal.is_none()
    }
}

/// One thing [`Store::drop_damaged`] removed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DroppedItem {
    /// A digest or key, in full.
    pub id: String,
    /// A step's name, where the record was readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub reason: String,
}

/// What [`Store::drop_damaged`] removed and fixed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Dropped {
    pub blobs: Vec<DroppedItem>,
    pub artifacts: Vec<DroppedItem>,
    pub steps: Vec<DroppedItem>,
    pub runs: Vec<DroppedItem>,
    pub producer_entries_added: usize,
    pub pins_rewritten: usize,
    /// Where the journal that did not replay to the metadata was kept, when it was replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_kept_as: Option<std::path::PathBuf>,
    /// The dropped artifacts whose digest parses (all but broken keys).
    #[serde(skip)]
    pub artifact_digests: BTreeSet<ArtifactDigest>,
}

impl Dropped {
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
            && self.artifacts.is_empty()
            && self.steps.is_empty()
            && self.runs.is_empty()
            && self.producer_entries_added == 0
            && self.pins_rewritten == 0
            && self.journal_kept_as.is_none()
    }
}

/// A run's memory of the input checks it made: an artifact or a blob found whole is not
/// hashed again in that run (a dataset read by many steps is hashed once; a filtered subset
/// whose blobs its haystack shares costs nothing more).
#[derive(Debug, Default)]
pub struct InputCheck {
    whole: HashSet<ArtifactDigest>,
    blobs: HashSet<BlobDigest>,
    /// Artifacts checked (each once), blobs hashed, their bytes, time spent.
    pub artifacts: usize,
    pub blobs_hashed: usize,
    pub bytes: u64,
    pub time: Duration,
}

/// What [`Store::check_artifact`] found.
#[derive(Debug, Clone)]
pub enum Health {
    Whole,
    /// What to drop ([`Store::drop_damaged`]).
    Damaged(Damage),
}

impl Store {
    /// Hash the blobs of `artifact` (those `memo` has not seen whole in this run) and compare
    /// them with their digests and sizes. A missing manifest is damage too: the steps that name
    /// the artifact as their output are to be dropped.
    pub fn check_artifact(
        &self,
        artifact: &ArtifactDigest,
        memo: &mut InputCheck,
    ) -> Result<Health, StoreError> {
        if memo.whole.contains(artifact) {
            return Ok(Health::Whole);
        }
        let t0 = Instant::now();
        let mut damage = Damage::default();
        let Some(manifest) = self.manifest(artifact)? else {
            damage.artifacts.insert(
                artifact.hex().into_bytes(),
                "its manifest is missing".into(),
            );
            return Ok(Health::Damaged(damage));
        };
        let mut todo: Vec<(BlobDigest, Option<u64>, &str)> = Vec::new();
        let mut seen = HashSet::new();
        for e in &manifest.entries {
            if let EntryKind::File { blob, size, .. } = &e.kind
                && !memo.blobs.contains(blob)
                && seen.insert(*blob)
            {
                todo.push((*blob, Some(*size), e.path.as_str()));
            }
        }
        let results = self.check_blobs_parallel(
            &todo.iter().map(|(b, s, _)| (*b, *s)).collect::<Vec<_>>(),
            true,
        );
        for ((blob, _, path), result) in todo.iter().zip(results) {
            match result {
                Ok(bytes) => {
                    memo.blobs.insert(*blob);
                    memo.blobs_hashed += 1;
                    memo.bytes += bytes;
                }
                Err(problem) => {
                    damage.blobs.insert(
                        *blob,
                        format!("{problem} (`{path}` of artifact {})", artifact.short()),
                    );
                }
            }
        }
        memo.artifacts += 1;
        memo.time += t0.elapsed();
        if damage.is_empty() {
            memo.whole.insert(*artifact);
            Ok(Health::Whole)
        } else {
            Ok(Health::Damaged(damage))
        }
    }

    /// Check each `(blob, size)`: present, of that size (when known), and, with `hash`, of that
    /// content. One result per blob, in order: the bytes hashed, or what is wrong.
    pub(super) fn check_blobs_parallel(
        &self,
        blobs: &[(BlobDigest, Option<u64>)],
        hash: bool,
    ) -> Vec<Result<u64, BlobProblem>> {
        let one = |(blob, size): &(BlobDigest, Option<u64>)| {
            check_blob(&self.blob_path(blob), blob, *size, hash)
        };
        if blobs.len() < 8 {
            return blobs.iter().map(one).collect();
        }
        let next = AtomicUsize::new(0);
        let mut results: Vec<(usize, Result<u64, BlobProblem>)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS.min(blobs.len() / 4))
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(item) = blobs.get(i) else { break };
                            out.push((i, one(item)));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("a blob-checking thread panicked"))
                .collect()
        });
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// Drop what `damage` makes untrue: damaged blobs, the manifests that list them (or are
    /// untrue themselves), the step records whose output is such a manifest (or are untrue
    /// themselves), their index entries and views; forget broken runs; add missing producer
    /// entries; remember every dropped artifact in `dropped`. See the module's doc for the
    /// order, which keeps a crash at any moment repairable.
    pub fn drop_damaged(&self, damage: &Damage) -> Result<Dropped, StoreError> {
        let _guard = self.commit_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Dropped::default();

        let artifacts = self.artifacts_to_drop(damage)?;
        let steps = self.steps_to_drop(damage, &artifacts)?;
        let dropped_digests: BTreeSet<ArtifactDigest> = artifacts
            .keys()
            .filter_map(|k| std::str::from_utf8(k).ok()?.parse().ok())
            .collect();

        // Index entries: none for a dropped artifact's producers or a dropped step.
        let mut producers_out = Vec::new();
        for item in self.trees.producers.iter() {
            let (key, _) = item?;
            let (a, k) = split_index_key(&key);
            if artifacts.contains_key(a) || steps.contains_key(k) {
                producers_out.push(key.to_vec());
            }
        }
        let mut consumers_out = Vec::new();
        for item in self.trees.consumers.iter() {
            let (key, _) = item?;
            if steps.contains_key(split_index_key(&key).1) {
                consumers_out.push(key.to_vec());
            }
        }
        let producers_in: Vec<Vec<u8>> = damage
            .missing_producers
            .iter()
            .filter(|(a, k)| {
                !artifacts.contains_key(a.hex().as_bytes())
                    && !steps.contains_key(k.hex().as_bytes())
            })
            .map(|(a, k)| index_key(a, k))
            .collect();
        let now = now_millis();
        // Every dropped artifact is remembered; `gc` forgets those no run or pin names.
        let mut tombstones: Vec<(Vec<u8>, Vec<u8>)> = artifacts
            .iter()
            .filter(|(k, _)| k.len() == HEX_LEN)
            .map(|(k, reason)| {
                let rec = DroppedRecord {
                    dropped: now,
                    reason: reason.clone(),
                };
                (k.clone(), to_json(&rec))
            })
            .collect();
        for (a, reason) in &damage.lost {
            let rec = DroppedRecord {
                dropped: now,
                reason: reason.clone(),
            };
            tombstones.push((a.hex().into_bytes(), to_json(&rec)));
        }
        let pins_rewritten: Vec<(Vec<u8>, Vec<u8>)> = damage
            .pins
            .iter()
            .map(|k| {
                let rec = super::PinRecord {
                    pinned: now,
                    reference: format!(
                        "{} (its record was unreadable; rewritten by verify --repair)",
                        String::from_utf8_lossy(k)
                    ),
                    step: None,
                };
                (k.clone(), to_json(&rec))
            })
            .collect();

        // 1. Views: they hold hard links to the damaged inodes, and would be reused as they
        //    are if the artifact came back.
        for a in &dropped_digests {
            fsutil::remove_tree(&self.root.join("views").join(a.hex()))?;
            self.forget_view(a);
        }
        // 2. The damaged blob files, durably gone before any record stops naming them.
        for blob in damage.blobs.keys() {
            fsutil::remove_tree(&self.blob_path(blob))?;
        }
        if !damage.blobs.is_empty() {
            fsutil::syncfs(&self.root.join("blobs"))?;
        }
        // 3. One transaction for every record.
        self.write(|| {
            let mut ops = Vec::new();
            ops.extend(
                artifacts
                    .keys()
                    .map(|k| Op::remove(TreeId::Artifacts, k.clone())),
            );
            ops.extend(steps.keys().map(|k| Op::remove(TreeId::Steps, k.clone())));
            ops.extend(
                producers_out
                    .iter()
                    .map(|k| Op::remove(TreeId::Producers, k.clone())),
            );
            ops.extend(
                producers_in
                    .iter()
                    .map(|k| Op::insert(TreeId::Producers, k.clone(), Vec::new())),
            );
            ops.extend(
                consumers_out
                    .iter()
                    .map(|k| Op::remove(TreeId::Consumers, k.clone())),
            );
            ops.extend(
                tombstones
                    .iter()
                    .map(|(k, v)| Op::insert(TreeId::Dropped, k.clone(), v.clone())),
            );
            for k in damage.runs.keys() {
                ops.push(Op::remove(TreeId::Runs, k.clone()));
                ops.push(Op::remove(TreeId::RunIndex, k.clone()));
            }
            ops.extend(
                pins_rewritten
                    .iter()
                    .map(|(k, v)| Op::insert(TreeId::Pins, k.clone(), v.clone())),
            );
            Ok((ops, ()))
        })?;

        out.blobs = damage
            .blobs
            .iter()
            .map(|(b, reason)| DroppedItem {
                id: b.hex(),
                name: None,
                reason: reason.clone(),
            })
            .collect();
        out.artifacts = artifacts
            .into_iter()
            .map(|(k, reason)| DroppedItem {
                id: String::from_utf8_lossy(&k).into_owned(),
                name: None,
                reason,
            })
            .collect();
        out.steps = steps
            .into_iter()
            .map(|(k, (name, reason))| DroppedItem {
                id: String::from_utf8_lossy(&k).into_owned(),
                name,
                reason,
            })
            .collect();
        out.runs = damage
            .runs
            .iter()
            .map(|(k, reason)| DroppedItem {
                id: super::meta::display_key(k),
                name: None,
                reason: reason.clone(),
            })
            .collect();
        // Last, with sled repaired: a journal that does not replay to it is written anew.
        if let Some(why) = &damage.journal {
            out.journal_kept_as = Some(self.rewrite_journal(why)?);
        }
        out.producer_entries_added = producers_in.len();
        out.pins_rewritten = pins_rewritten.len();
        out.artifact_digests = dropped_digests;
        Ok(out)
    }

    /// The manifests `damage` names, and every manifest listing one of its blobs.
    fn artifacts_to_drop(&self, damage: &Damage) -> Result<BTreeMap<Vec<u8>, String>, StoreError> {
        let mut out = damage.artifacts.clone();
        if damage.blobs.is_empty() {
            return Ok(out);
        }
        let hexes: Vec<(BlobDigest, String)> = damage.blobs.keys().map(|b| (*b, b.hex())).collect();
        for item in self.trees.artifacts.iter() {
            let (key, value) = item?;
            if out.contains_key(&*key) {
                continue;
            }
            // A byte search first: most manifests list none of the few damaged blobs.
            let Some((blob, _)) = hexes
                .iter()
                .find(|(_, hex)| contains_bytes(&value, hex.as_bytes()))
            else {
                continue;
            };
            let reason = match serde_json::from_slice::<Manifest>(&value) {
                Ok(m) => m.entries.iter().find_map(|e| match &e.kind {
                    EntryKind::File { blob: b, .. } if b == blob => Some(format!(
                        "`{}` is blob {}, which {}",
                        e.path,
                        blob.short(),
                        damage.blobs[blob]
                    )),
                    _ => None,
                }),
                Err(e) => Some(format!("its manifest is unreadable ({e})")),
            };
            if let Some(reason) = reason {
                out.insert(key.to_vec(), reason);
            }
        }
        Ok(out)
    }

    /// The step records `damage` names, those whose output is a dropped artifact, and those
    /// whose code file is a damaged blob: key → (name, reason).
    fn steps_to_drop(
        &self,
        damage: &Damage,
        artifacts: &BTreeMap<Vec<u8>, String>,
    ) -> Result<BTreeMap<Vec<u8>, NamedReason>, StoreError> {
        let name_of = |key: &[u8]| -> Result<Option<String>, StoreError> {
            Ok(self
                .trees
                .steps
                .get(key)?
                .and_then(|v| serde_json::from_slice::<StepRecord>(&v).ok())
                .map(|r| r.name))
        };
        let mut out = BTreeMap::new();
        for (k, reason) in &damage.steps {
            out.insert(k.clone(), (name_of(k)?, reason.clone()));
        }
        for a in artifacts.keys() {
            let mut prefix = a.clone();
            prefix.push(b'/');
            for item in self.trees.producers.scan_prefix(&prefix) {
                let (key, _) = item?;
                let k = &key[prefix.len()..];
                if out.contains_key(k) {
                    continue;
                }
                let Some(value) = self.trees.steps.get(k)? else {
                    continue;
                };
                match serde_json::from_slice::<StepRecord>(&value) {
                    Ok(rec) if rec.output.hex().as_bytes() == &a[..] => {
                        let short = String::from_utf8_lossy(&a[..a.len().min(12)]).into_owned();
                        out.insert(
                            k.to_vec(),
                            (Some(rec.name), format!("its output {short} was dropped")),
                        );
                    }
                    // A forced re-execution moved its output on: the record stands.
                    Ok(_) => {}
                    Err(e) => {
                        out.insert(k.to_vec(), (None, format!("unreadable record ({e})")));
                    }
                }
            }
        }
        if !damage.blobs.is_empty() {
            let hexes: Vec<String> = damage.blobs.keys().map(|b| b.hex()).collect();
            for item in self.trees.steps.iter() {
                let (key, value) = item?;
                if out.contains_key(&*key)
                    || !hexes.iter().any(|h| contains_bytes(&value, h.as_bytes()))
                {
                    continue;
                }
                let Ok(rec) = serde_json::from_slice::<StepRecord>(&value) else {
                    continue;
                };
                if let Some((path, blob)) = rec
                    .spec
                    .code
                    .iter()
                    .find(|(_, b)| damage.blobs.contains_key(b))
                {
                    out.insert(
                        key.to_vec(),
                        (
                            Some(rec.name.clone()),
                            format!(
                                "its code file `{path}` is blob {}, which {}",
                                blob.short(),
                                damage.blobs[blob]
                            ),
                        ),
                    );
                }
            }
        }
        Ok(out)
    }
}

/// A step's name (when its record reads) and why it is dropped.
type NamedReason = (Option<String>, String);

/// `artifact/step` → (artifact, step), as raw bytes; a key without `/` is all artifact.
pub(super) fn split_index_key(key: &[u8]) -> (&[u8], &[u8]) {
    match key.iter().position(|&c| c == b'/') {
        Some(i) => (&key[..i], &key[i + 1..]),
        None => (key, &[]),
    }
}

/// What is wrong with a blob on disk, said of the blob: `blob <hex> is missing; used by …`.
/// The io error is said in parentheses, not as a source: the words sit mid-sentence in
/// verify's problem lines and in the reason a dropped blob is recorded with.
#[derive(Debug, thiserror::Error)]
pub(super) enum BlobProblem {
    #[error("is missing")]
    Missing,
    #[error("is unreadable ({0})")]
    Unreadable(std::io::Error),
    #[error("should hold {size} bytes, but {len} are on disk")]
    Size { size: u64, len: u64 },
    #[error("has bytes on disk that hash otherwise")]
    HashesOtherwise,
}

/// Present, of `size` bytes when known, and with `hash` hashing to `blob`: the bytes read, or
/// what is wrong.
fn check_blob(
    path: &Path,
    blob: &BlobDigest,
    size: Option<u64>,
    hash: bool,
) -> Result<u64, BlobProblem> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobProblem::Missing),
        Err(e) => return Err(BlobProblem::Unreadable(e)),
    };
    let len = file.metadata().map_err(BlobProblem::Unreadable)?.len();
    if let Some(size) = size
        && len != size
    {
        return Err(BlobProblem::Size { size, len });
    }
    if !hash {
        return Ok(0);
    }
    let mut h = blake3::Hasher::new();
    let n = (h.update_reader(&file).map(|_| len)).map_err(BlobProblem::Unreadable)?;
    if BlobDigest::from_hasher(&h) != *blob {
        return Err(BlobProblem::HashesOtherwise);
    }
    Ok(n)
}

#[cfg(test)]
mod tests;

/// What [`Store::drop_blob`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DroppedBlob {
    pub artifacts: Vec<ArtifactDigest>,
    /// Names of the step records removed.
    pub steps: Vec<String>,
}

impl Store {
    /// Drop one damaged blob with what needs it ([`Store::drop_damaged`]).
    pub fn drop_blob(&self, blob: &BlobDigest, reason: &str) -> Result<DroppedBlob, StoreError> {
        let mut damage = Damage::default();
        damage.blobs.insert(*blob, reason.to_string());
        let dropped = self.drop_damaged(&damage)?;
        Ok(DroppedBlob {
            artifacts: dropped.artifact_digests.into_iter().collect(),
            steps: dropped
                .steps
                .into_iter()
                .map(|s| s.name.unwrap_or(s.id))
                .collect(),
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
            if !value.windows(hex.len()).any(|w| w == hex.as_bytes()) {
                continue;
            }
            let manifest: Manifest = super::meta::decode("artifacts", &key, &value)?;
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
}
