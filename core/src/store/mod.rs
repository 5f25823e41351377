//! The store: content-addressed blobs on disk, metadata in sled.
//!
//! ```text
//! <root>/                   (.needle/ by default)
//!   FORMAT                  "needle-store 1": refused if unknown
//!   lock                    flock held by the one process that has the store open
//!   meta/                   sled: steps, artifacts, producers, consumers, runs, run_index
//!   blobs/ab/cdef…          one file per content digest (plain BLAKE3 of the bytes), 0444
//!   staging/<n>/            a step's private dirs; absorbed into blobs/, then removed
//!   views/<artifact>/       read-only trees of hardlinks to blobs, made on demand, rebuildable
//!   logs/<step-key>/<run>-<attempt>.log
//! ```
//!
//! **Invariant: no record ever points at a blob that is not whole.** Commit order is: blob
//! bytes written and fsynced, renamed into `blobs/`, directory fsynced; only then the metadata
//! transaction (manifest + step record + indices), then a sled flush. A crash at any point
//! leaves either no record (the step re-runs; stray blobs are harmless) or a whole one.
//!
//! Only one process opens a store at a time (sled itself is single-process): [`Store::open`]
//! takes an exclusive lock and names the holder when it cannot.

mod errors;
mod lock;
pub mod records;

use std::path::{Path, PathBuf};

pub use errors::StoreError;
pub use lock::LockMode;
pub use records::*;

use crate::digest::{ArtifactDigest, BlobDigest, StepKey};

/// On-disk format of the store; bumped on incompatible change.
pub const FORMAT: &str = "needle-store 1";

pub struct Store {
    root: PathBuf,
    #[allow(dead_code)]
    db: sled::Db,
    #[allow(dead_code)]
    lock: lock::StoreLock,
}

/// What a ref prefix matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Step(StepKey),
    Artifact(ArtifactDigest),
}

/// A step to record, with its output's manifest.
#[derive(Debug, Clone)]
pub struct StepCommit {
    pub record: StepRecord,
    pub manifest: Manifest,
}

/// A short line per run, kept apart from the (large) run record so `needle runs` stays fast.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSummary {
    pub id: u64,
    pub recipe_name: String,
    pub recipe_path: String,
    pub started: Millis,
    pub ended: Option<Millis>,
    pub state: RunState,
    pub arms: usize,
    pub steps: usize,
    pub executed: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Store {
    /// Open the store at `root`, creating it if missing, and take its exclusive lock.
    /// Removes staging dirs left by a process that died (it held the lock, so none is live).
    pub fn open(_root: &Path, _mode: LockMode) -> Result<Store, StoreError> {
        todo!()
    }

    /// Like [`Store::open`], but fails with [`StoreError::Missing`] instead of creating.
    pub fn open_existing(_root: &Path, _mode: LockMode) -> Result<Store, StoreError> {
        todo!()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A new empty private directory under `staging/`.
    pub fn new_staging(&self) -> Result<PathBuf, StoreError> {
        todo!()
    }

    /// Hash every file under `dir` and move it into `blobs/` (durably, read-only); return the
    /// tree's manifest. `dir` is consumed. Symlinks to regular files are stored as the file;
    /// other symlinks and special files are an error naming the path.
    pub fn absorb_dir(&self, _dir: &Path) -> Result<Manifest, StoreError> {
        todo!()
    }

    /// Copy one file's bytes into `blobs/` (the source stays); return its digest.
    pub fn absorb_file_copy(&self, _path: &Path) -> Result<BlobDigest, StoreError> {
        todo!()
    }

    pub fn blob_path(&self, _blob: &BlobDigest) -> PathBuf {
        todo!()
    }

    /// Record finished steps atomically (all or none), with their manifests and the producer
    /// and consumer indices, then flush. Their blobs must already be in `blobs/`.
    pub fn commit(&self, _commits: &[StepCommit]) -> Result<(), StoreError> {
        todo!()
    }

    pub fn step(&self, _key: &StepKey) -> Result<Option<StepRecord>, StoreError> {
        todo!()
    }

    pub fn manifest(&self, _artifact: &ArtifactDigest) -> Result<Option<Manifest>, StoreError> {
        todo!()
    }

    /// Steps whose output is `artifact`.
    pub fn producers(&self, _artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        todo!()
    }

    /// Steps that read `artifact` as an input.
    pub fn consumers(&self, _artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        todo!()
    }

    /// A read-only directory holding the artifact's tree (hardlinks to its blobs), built once
    /// under `views/` and reused.
    pub fn view(&self, _artifact: &ArtifactDigest) -> Result<PathBuf, StoreError> {
        todo!()
    }

    pub fn next_run_id(&self) -> Result<u64, StoreError> {
        todo!()
    }

    /// Insert or replace a run record and its summary, then flush.
    pub fn put_run(&self, _run: &RunRecord) -> Result<(), StoreError> {
        todo!()
    }

    pub fn run(&self, _id: u64) -> Result<Option<RunRecord>, StoreError> {
        todo!()
    }

    /// All run summaries, oldest first.
    pub fn runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        todo!()
    }

    /// Step keys and artifact digests starting with `prefix` (lowercase hex).
    pub fn find_prefix(&self, _prefix: &str) -> Result<Vec<Found>, StoreError> {
        todo!()
    }

    /// Where an attempt's combined stdout/stderr goes, relative to the root.
    pub fn log_rel_path(key: &StepKey, run: u64, attempt: u32) -> String {
        format!("logs/{}/{run}-{attempt}.log", key.hex())
    }

    /// `rel` resolved against the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}
