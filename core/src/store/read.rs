//! What the read-only commands ask of a store, whoever answers: the store itself when this
//! process holds it ([`Store`]), or the runner holding it, over its socket
//! ([`super::remote::Reader`]).
//!
//! Only metadata goes through this interface. Blobs, views and logs are plain files: once a
//! reader knows their paths it reads them directly, without the runner.

use std::path::{Path, PathBuf};

use super::{
    Found, GpuUsage, Manifest, RunRecord, RunSummary, StepRecord, Store, StoreCounts, StoreError,
};
use crate::digest::{ArtifactDigest, BlobDigest, StepKey};

/// The store's read operations (see the methods of the same names on [`Store`]).
pub trait StoreRead {
    /// The store's directory, as this process names it.
    fn root(&self) -> &Path;

    fn step(&self, key: &StepKey) -> Result<Option<StepRecord>, StoreError>;

    /// Every stored step with this recipe step name, in key order.
    fn steps_named(&self, name: &str) -> Result<Vec<StepRecord>, StoreError>;

    fn manifest(&self, artifact: &ArtifactDigest) -> Result<Option<Manifest>, StoreError>;

    fn producers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError>;

    fn consumers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError>;

    /// The artifact's read-only view, built if it is not there yet (by the runner when it
    /// holds the store: building one writes into `views/`).
    fn view(&self, artifact: &ArtifactDigest) -> Result<PathBuf, StoreError>;

    /// A run's record. The run a runner is executing right now comes as far as the runner
    /// has got (see [`StoreRead::live_run`]), not as it was recorded when it started.
    fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError>;

    /// All run summaries, oldest first; the live run's counts as far as it has got.
    fn runs(&self) -> Result<Vec<RunSummary>, StoreError>;

    fn find_prefix(&self, prefix: &str) -> Result<Vec<Found>, StoreError>;

    /// The GPU usage sampled during run `id`. For the run a runner is executing right now, as
    /// the runner last saved it (it saves every few seconds while it samples).
    fn gpu_usage(&self, id: u64) -> Result<Option<GpuUsage>, StoreError>;

    fn counts(&self) -> Result<StoreCounts, StoreError>;

    /// The run being executed right now by the process holding the store, if one is. `None`
    /// when this process holds the store itself: then no run is going, and a run recorded as
    /// running lost its runner.
    fn live_run(&self) -> Option<u64>;

    /// Whether run `id` is being executed right now by the process holding the store: its
    /// own run ([`StoreRead::live_run`]), or one that joined it.
    fn is_live(&self, id: u64) -> bool {
        self.live_run() == Some(id)
    }

    /// Where the running attempt of step `step` (its index in the run record) of the live run
    /// `run` writes its output now; it moves under `logs/` when the attempt ends.
    fn live_log(&self, run: u64, step: usize) -> Result<Option<PathBuf>, StoreError>;

    /// `blobs/ab/cdef…`: a blob's file, read-only.
    fn blob_path(&self, blob: &BlobDigest) -> PathBuf {
        blob_path_in(self.root(), blob)
    }

    /// `rel` (a log's path in a record) resolved against the root.
    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }
}

/// Where blob `blob` lives in the store at `root`.
pub(crate) fn blob_path_in(root: &Path, blob: &BlobDigest) -> PathBuf {
    let hex = blob.hex();
    let mut p = root.join("blobs");
    p.push(&hex[..2]);
    p.push(&hex[2..]);
    p
}

impl StoreRead for Store {
    fn root(&self) -> &Path {
        Store::root(self)
    }

    fn step(&self, key: &StepKey) -> Result<Option<StepRecord>, StoreError> {
        Store::step(self, key)
    }

    fn steps_named(&self, name: &str) -> Result<Vec<StepRecord>, StoreError> {
        Store::steps_named(self, name)
    }

    fn manifest(&self, artifact: &ArtifactDigest) -> Result<Option<Manifest>, StoreError> {
        Store::manifest(self, artifact)
    }

    fn producers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        Store::producers(self, artifact)
    }

    fn consumers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        Store::consumers(self, artifact)
    }

    fn view(&self, artifact: &ArtifactDigest) -> Result<PathBuf, StoreError> {
        Store::view(self, artifact)
    }

    fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        Store::run(self, id)
    }

    fn runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        Store::runs(self)
    }

    fn find_prefix(&self, prefix: &str) -> Result<Vec<Found>, StoreError> {
        Store::find_prefix(self, prefix)
    }

    fn gpu_usage(&self, id: u64) -> Result<Option<GpuUsage>, StoreError> {
        Store::gpu_usage(self, id)
    }

    fn counts(&self) -> Result<StoreCounts, StoreError> {
        Store::counts(self)
    }

    fn live_run(&self) -> Option<u64> {
        None
    }

    fn live_log(&self, _run: u64, _step: usize) -> Result<Option<PathBuf>, StoreError> {
        Ok(None)
    }

    fn blob_path(&self, blob: &BlobDigest) -> PathBuf {
        Store::blob_path(self, blob)
    }

    fn path(&self, rel: &str) -> PathBuf {
        Store::path(self, rel)
    }
}
