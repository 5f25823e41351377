//! The store: content-addressed blobs on disk, metadata in sled.
//!
//! ```text
//! <root>/                   (.needle/ by default)
//!   FORMAT                  "needle-store 2": refused if unknown; a format-1 store is upgraded
//!   lock                    flock held by the one process that has the store open
//!   runner.sock             while a run goes: the runner answers read requests here
//!   meta/                   sled: steps, artifacts, producers, consumers, runs, run_index,
//!                           pins, dropped
//!   journal/log             every change to meta/, checksummed, written before sled applies
//!                           it: what `needle verify --rebuild` restores meta/ from (journal.rs)
//!   meta.broken-<time>/     a meta/ that a rebuild replaced, kept for its owner to remove
//!   blobs/ab/cdef…          one file per content digest (plain BLAKE3 of the bytes), 0444
//!   staging/<pid>-<n>/      a step's private dirs; emptied after each attempt and reused
//!   views/<artifact>/       read-only trees of hardlinks to blobs, made on demand, rebuildable
//!   views/gather-<hash>/    a gather input's members (links to their views) and index.json
//!   logs/ab/<step-key>.<run>-<attempt>.log
//!   resume/<step-key>/      what a step keeps across its failed attempts (checkpoints); removed
//!                           once it succeeds
//! ```
//!
//! **Invariant: no record ever points at a blob that is not whole.** Commit order is: blob
//! bytes written and fsynced, renamed into `blobs/`, directory fsynced; only then the metadata
//! change (manifest + step record + indices): appended to the journal and fsynced, then one
//! sled transaction, then a sled flush. A crash at any point leaves either no record (the step
//! re-runs; stray blobs are harmless) or a whole one, in the journal and (once the store opens
//! again, see `journal.rs`) in sled.
//!
//! Only one process opens a store at a time (sled itself is single-process): [`Store::open`]
//! takes an exclusive lock and names the holder when it cannot. While a run holds it, the
//! read-only commands read through the runner ([`remote`]).
//!
//! How the invariant is kept, step by step:
//! - [`Store::absorb_dir`] hashes a file, and only if its blob is absent sets it 0444, fsyncs
//!   it and renames it into `blobs/` (a name there always holds whole bytes, which is what
//!   lets a later absorb trust that an existing blob needs nothing); then each fan-out dir
//!   it touched is fsynced once. A fan-out dir is made, and `blobs/` fsynced, before its first
//!   blob goes in.
//! - [`Store::commit`] checks that every blob of each new manifest is in `blobs/` (a manifest
//!   already recorded was checked when it was), then writes manifests, step records and
//!   both indices in one sled transaction, then flushes.
//! - Views and staging hold nothing a record points at: both may be deleted at any time.
//! - Every blob, view copy and view directory carries one fixed mtime ([`store_time`]), so a
//!   write by a step into its inputs shows in an `lstat` ([`Store::check_views`]); a damaged
//!   blob is dropped with what needs it ([`Store::repair`]); an absorb trusts a file under a
//!   blob's name only when it is as the store left it or still hashes to that name.
//! - A commit is refused before sled writes anything when the disk lacks room for it
//!   (`space.rs`): sled does not recover from `ENOSPC` within a process.
//!
//! Metadata trees (keys are ASCII hex unless said otherwise, values JSON):
//!
//! ```text
//! steps        step key                    → StepRecord
//! artifacts    artifact digest             → Manifest
//! producers    artifact "/" step key       → ()   steps that have output the artifact
//! consumers    artifact "/" step key       → ()   steps that read the artifact
//! runs         run id (u64 big-endian)     → RunRecord
//! run_index    run id (u64 big-endian)     → RunSummary
//! pins         artifact digest             → PinRecord    kept by gc whatever --keep-last says
//! dropped      artifact digest             → DroppedRecord  damaged, dropped; runs still name it
//! gpu_usage    run id (u64 big-endian)     → GpuUsage     its GPUs' utilisation and memory
//! run_progress run id ‖ node (u32 BE)      → StepProgress how far a run that has not ended got
//! (default)    "next_run_id"               → u64 big-endian, the last id handed out
//!              "journal"                   → the journal position sled mirrors (journal.rs);
//!                                            the one key the journal does not hold
//! ```
//!
//! `pins`, `dropped` and `gpu_usage` came after the format's first stores: sled creates them,
//! empty, when such a store opens. The journal did not fit so: a needle that knew nothing of
//! it would write to sled alone, and a rebuild would later lose what it wrote. So a store with
//! a journal is `needle-store 2`, which older needles refuse; this needle upgrades a format-1
//! store when it opens it (writing the journal from sled, then `FORMAT`).
//!
//! Removing things (`gc.rs`, `repair.rs`) keeps the invariant from the other side: what no
//! record needs goes only after the metadata transaction that stops recording it, and bytes
//! found damaged go *before* the records that use them (a crash in between leaves records
//! pointing at a missing blob, which `verify` reports and `--repair` drops; the other order
//! could leave damaged bytes under a digest's name, which a later absorb would trust).

mod blobs;
mod errors;
mod faults;
mod fsutil;
mod gather;
mod gc;
mod guard;
mod journal;
mod lock;
mod meta;
mod pins;
mod progress;
mod read;
mod rebuild;
pub mod records;
pub mod remote;
mod repair;
mod sled_db;
mod space;
mod usage;
mod verify;
mod view;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use errors::{ManifestProblem, StoreError, human_bytes};
pub use faults::{FaultAction, FaultPlan, FaultTrigger};
pub use gather::{GATHER_INDEX, GATHER_PREFIX, gather_entry};
pub use gc::{GcOptions, GcPlan, GcSummary, Kept, Tally};
pub use guard::{
    STORE_TIME_SECS, ViewCheck, ViewDamage, ViewDamageKind, ViewRepair, has_store_time,
    set_store_time, store_time,
};
pub use journal::Stop as JournalStop;
pub use lock::LockMode;
use lock::Purpose;
pub use progress::StepProgress;
pub use read::StoreRead;
pub use rebuild::{RawRecords, Rebuilt, Restored};
pub use records::*;
pub use repair::{Damage, Dropped, DroppedBlob, DroppedItem, Health, InputCheck};
pub use sled_db::close_failure;
pub use space::Space;
pub use usage::{GpuIdentity, GpuSample, GpuSeries, GpuUsage};
pub use verify::{Repaired, VerifyReport};

use crate::digest::{ArtifactDigest, BlobDigest, StepKey};

/// On-disk format of the store; bumped on incompatible change.
pub const FORMAT: &str = "needle-store 2";

/// The format before the journal: opened by upgrading it (see the module's doc).
const FORMAT_1: &str = "needle-store 1";

/// Most results [`Store::find_prefix`] returns.
pub const FIND_PREFIX_LIMIT: usize = 50;

/// sled's page cache. The metadata is small next to the blobs; a modest cache keeps the
/// runner's footprint modest too.
const CACHE_BYTES: u64 = 64 << 20;

/// Top-level directories of a store.
const SUBDIRS: [&str; 6] = ["meta", "blobs", "staging", "views", "logs", "journal"];

/// An open store: the only handle on it in this process and on this machine, while it lives
/// (see [`Store::open`]). `Send + Sync`: steps may be absorbed and committed from several
/// threads; each commit is one transaction.
pub struct Store {
    root: PathBuf,
    // Before `db`, so that dropping `db` closes sled (`sled_db.rs`).
    trees: meta::Trees,
    db: sled_db::Sled,
    /// Numbers the store's private temporary names (staging dirs, copies, view builds).
    seq: AtomicU64,
    /// The fan-out dirs of `blobs/` known to be durable, and the lock under which one is made.
    fanout: blobs::Fanout,
    fanout_lock: Mutex<()>,
    /// Views this process built or adopted: no need to look for them on disk.
    known_views: Mutex<std::collections::HashSet<ArtifactDigest>>,
    /// Staging dirs a process that has gone left clean, for [`Store::reuse_staging`].
    spare_staging: Mutex<Vec<PathBuf>>,
    /// Held by a commit and by the dropping of damaged records, which must not interleave.
    commit_lock: Mutex<()>,
    /// Blobs this process placed or hashed: an absorb may trust them without reading them.
    verified_blobs: Mutex<std::collections::HashSet<BlobDigest>>,
    /// The copy of the metadata a store on a read-only filesystem is read through.
    snapshot: Option<tempfile::TempDir>,
    /// Where every change to the metadata goes first (`journal.rs`); held across the change's
    /// sled transaction, so the journal's order is sled's. `None` for a read-only store.
    journal: Mutex<Option<journal::Journal>>,
    /// Faults a test injects into the writes (`faults.rs`); `None` but in tests.
    faults: Option<Box<faults::FaultPlan>>,
    // Declared last, so it is dropped last: the lock is released only once sled is closed.
    #[allow(dead_code)] // held for its `flock`
    lock: lock::StoreLock,
}

/// How much the store records (see [`Store::counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreCounts {
    pub steps: usize,
    pub artifacts: usize,
    pub runs: usize,
}

/// What a ref prefix matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Found {
    Step(StepKey),
    Artifact(ArtifactDigest),
}

/// A step to record, with its output's manifest.
#[derive(Debug, Clone)]
pub struct StepCommit {
    pub record: StepRecord,
    /// Must be the manifest of `record.output`.
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

impl RunSummary {
    /// The summary of `run`: its header and the count of its steps by status (`executed`
    /// counts [`StepStatus::Succeeded`]).
    pub fn of(run: &RunRecord) -> RunSummary {
        let count = |f: fn(&StepStatus) -> bool| run.steps.iter().filter(|s| f(&s.status)).count();
        RunSummary {
            id: run.id,
            recipe_name: run.recipe_name.clone(),
            recipe_path: run.recipe_path.clone(),
            started: run.started,
            ended: run.ended,
            state: run.state,
            arms: run.arms.len(),
            steps: run.steps.len(),
            executed: count(|s| matches!(s, StepStatus::Succeeded { .. })),
            cached: count(|s| matches!(s, StepStatus::Cached { .. })),
            failed: count(|s| matches!(s, StepStatus::Failed { .. })),
            skipped: count(|s| matches!(s, StepStatus::Skipped { .. })),
        }
    }
}

impl Store {
    /// Open the store at `root`, creating it if missing, and take its exclusive lock.
    /// Removes what a process that died left in staging dirs (it held the lock, so none is
    /// live), keeping the clean ones for [`Store::reuse_staging`].
    ///
    /// A directory that exists, is not empty and has no `FORMAT` file is refused
    /// ([`StoreError::NotAStore`]): `--store ~` must not scribble over a home directory.
    pub fn open(root: &Path, mode: LockMode) -> Result<Store, StoreError> {
        Store::open_inner(root, mode, true, Purpose::Write)
    }

    /// Like [`Store::open`], but fails with [`StoreError::Missing`] instead of creating.
    pub fn open_existing(root: &Path, mode: LockMode) -> Result<Store, StoreError> {
        Store::open_inner(root, mode, false, Purpose::Write)
    }

    /// Like [`Store::open_existing`], for a command that only reads and closes the store
    /// again at once: a process that wants the store meanwhile waits for it (up to 30 s)
    /// instead of failing.
    pub fn open_to_read(root: &Path, mode: LockMode) -> Result<Store, StoreError> {
        Store::open_inner(root, mode, false, Purpose::Read)
    }

    fn open_inner(
        root: &Path,
        mode: LockMode,
        create: bool,
        purpose: Purpose,
    ) -> Result<Store, StoreError> {
        let version = check_format(root, create)?;
        // Nobody can write a store on a read-only filesystem: no lock to take, nothing to
        // tidy, and sled (which must write) reads a copy of the metadata.
        if root.is_dir() && space::read_only_fs(root) {
            return match purpose {
                Purpose::Read => Store::open_read_only(root, version),
                Purpose::Write => Err(StoreError::ReadOnly {
                    root: root.to_path_buf(),
                }),
            };
        }
        let lock = lock::StoreLock::acquire(root, mode, purpose)?;
        let store = Store::open_locked(root, lock, &root.join("meta"), version)?;
        if purpose == Purpose::Write {
            store.compact_journal_if_outgrown();
        }
        Ok(store)
    }

    /// Open the store at `root` whose lock is held, with its metadata (sled) in `meta`: tidy
    /// what a dead process left, and bring sled and the journal into step.
    fn open_locked(
        root: &Path,
        lock: lock::StoreLock,
        meta: &Path,
        version: u32,
    ) -> Result<Store, StoreError> {
        // A lost `meta/` must not be taken for a new store's: sled would make an empty one.
        let meta_empty = !fsutil::exists(meta)? || holds_nothing(meta);
        if version >= 2 && meta_empty && journal::holds_records(root)? {
            return Err(StoreError::MetaLost {
                root: root.to_path_buf(),
            });
        }
        let mut created = fsutil::ensure_dir(meta)?;
        for sub in SUBDIRS.into_iter().filter(|s| *s != "meta") {
            created |= fsutil::ensure_dir(&root.join(sub))?;
        }
        if created {
            fsutil::fsync_dir(root)?;
        }
        // sled's own lock, taken before anything is tidied: the store lock alone is a file
        // anyone can remove, after which a second process would take a new one and delete
        // the first one's live staging slots.
        let db = open_sled(meta, root).map_err(|e| unreadable_meta(root, e))?;
        // Fan-out dirs are made with their first blob. Those here now may be the work of a
        // process that died before it fsynced `blobs/`: fsync it once, then trust them.
        let blobs = root.join("blobs");
        let fanout = blobs::Fanout::default();
        for entry in fs::read_dir(&blobs).map_err(StoreError::io("list", &blobs))? {
            let entry = entry.map_err(StoreError::io("list", &blobs))?;
            let name = entry.file_name();
            if let Some(b) = name
                .to_str()
                .filter(|n| {
                    n.len() == 2 && n.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
                })
                .and_then(|n| u8::from_str_radix(n, 16).ok())
                && entry.file_type().is_ok_and(|t| t.is_dir())
            {
                fanout.set_known(b);
            }
        }
        fsutil::fsync_dir(&blobs)?;

        // We hold the lock: whatever is in staging, or half-built in views, belongs to a
        // process that is gone. Its clean staging dirs are kept for reuse: removing a runner's
        // hundred-odd slots took 50 ms of every later command, and making them again costs
        // as much (on ext4 every directory is a block, and this machine discards freed ones).
        let staging = root.join("staging");
        let mut spare = Vec::new();
        for entry in fs::read_dir(&staging).map_err(StoreError::io("list", &staging))? {
            let entry = entry.map_err(StoreError::io("list", &staging))?;
            let path = entry.path();
            if holds_nothing(&path) {
                spare.push(path);
            } else {
                fsutil::remove_tree(&path)?;
            }
        }
        let views = root.join("views");
        for entry in fs::read_dir(&views).map_err(StoreError::io("list", &views))? {
            let entry = entry.map_err(StoreError::io("list", &views))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                fsutil::remove_tree(&entry.path())?;
            }
        }

        let trees = meta::Trees::open(&db)?;
        let journal = journal::reconcile(root, &trees, &db, version, journal::Access::Write)?;
        Ok(Store {
            root: root.to_path_buf(),
            db,
            trees,
            seq: AtomicU64::new(0),
            fanout,
            fanout_lock: Mutex::new(()),
            known_views: Mutex::new(Default::default()),
            spare_staging: Mutex::new(spare),
            commit_lock: Mutex::new(()),
            verified_blobs: Mutex::new(Default::default()),
            snapshot: None,
            journal: Mutex::new(journal),
            faults: faults::FaultPlan::from_env()?.map(Box::new),
            lock,
        })
    }

    /// Close the store, keeping its lock (for a rebuild, which opens it again).
    fn into_lock(self) -> Result<lock::StoreLock, StoreError> {
        let Store {
            db, trees, lock, ..
        } = self;
        // Sled's files must be whole before its directory moves.
        drop(trees);
        db.flush()?;
        drop(db);
        if let Some(failed) = sled_db::close_failure() {
            return Err(failed);
        }
        Ok(lock)
    }

    /// Replace the journal by a snapshot of the live records (see `journal.rs`): after a gc,
    /// or when it has outgrown them.
    pub(crate) fn compact_journal(&self) -> Result<(), StoreError> {
        let mut guard = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let Some(journal) = guard.as_mut() else {
            return Ok(());
        };
        journal.usable()?;
        *journal = journal::snapshot_and_record(&self.root, &self.trees, &self.db, journal.seq)?;
        Ok(())
    }

    /// Write the journal anew from sled, keeping the old one aside (it does not replay to the
    /// metadata: `why`); where it was kept.
    pub(crate) fn rewrite_journal(&self, why: &str) -> Result<PathBuf, StoreError> {
        let mut guard = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let Some(journal) = guard.as_mut() else {
            return Err(StoreError::ReadOnly {
                root: self.root.clone(),
            });
        };
        let pos = journal::read_pos(&self.trees)?;
        let (fresh, kept) = journal::heal(&self.root, &self.trees, &self.db, pos, why)?;
        *journal = fresh;
        Ok(kept)
    }

    /// [`Store::compact_journal`] when the journal has outgrown its snapshot; a failure only
    /// costs the space (the journal stays as it was).
    fn compact_journal_if_outgrown(&self) {
        let outgrown = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(journal::Journal::outgrown);
        if outgrown && let Err(e) = self.compact_journal() {
            tracing::warn!("could not compact the store's journal: {e}");
        }
    }

    /// A store on a read-only filesystem, for reading: its metadata copied to a temporary
    /// directory (sled writes even to open), its blobs and logs read where they are.
    fn open_read_only(root: &Path, version: u32) -> Result<Store, StoreError> {
        let meta = root.join("meta");
        if !meta.is_dir() {
            return Err(StoreError::Missing {
                root: root.to_path_buf(),
            });
        }
        let snapshot = tempfile::Builder::new()
            .prefix("needle-ro-meta-")
            .tempdir()
            .map_err(StoreError::io("create a copy of the metadata of", root))?;
        let copy = snapshot.path().join("meta");
        fsutil::copy_tree(&meta, &copy)?;
        let db = open_sled(&copy, root).map_err(|e| unreadable_meta(root, e))?;
        let trees = meta::Trees::open(&db)?;
        // Changes the journal has and sled lacks are applied to the copy.
        journal::reconcile(root, &trees, &db, version, journal::Access::ReadOnly)?;
        Ok(Store {
            root: root.to_path_buf(),
            db,
            trees,
            seq: AtomicU64::new(0),
            fanout: blobs::Fanout::default(),
            fanout_lock: Mutex::new(()),
            known_views: Mutex::new(Default::default()),
            spare_staging: Mutex::new(Vec::new()),
            commit_lock: Mutex::new(()),
            verified_blobs: Mutex::new(Default::default()),
            snapshot: Some(snapshot),
            journal: Mutex::new(None),
            faults: None,
            lock: lock::StoreLock::none(),
        })
    }

    /// Whether this store was opened from a read-only filesystem (see [`StoreError::ReadOnly`]).
    pub fn is_read_only(&self) -> bool {
        self.snapshot.is_some()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where step `key` may keep what should survive a failed or interrupted attempt (a
    /// training checkpoint to resume from): `resume/<key>/`, created by the step if it wants
    /// it, removed by [`Store::drop_resume`] once the step's output is committed.
    pub fn resume_path(&self, key: &StepKey) -> PathBuf {
        self.root.join("resume").join(key.hex())
    }

    /// Forget what step `key` kept to resume from (it succeeded).
    pub fn drop_resume(&self, key: &StepKey) -> Result<(), StoreError> {
        fsutil::remove_tree(&self.resume_path(key))
    }

    /// A new empty private directory under `staging/`, named `<pid>-<n>`: never the name of a
    /// slot an earlier process made, so a step process that outlived its killed runner cannot
    /// write into a later run's slot.
    pub fn new_staging(&self) -> Result<PathBuf, StoreError> {
        let staging = self.root.join("staging");
        loop {
            let dir = staging.join(format!("{}-{}", std::process::id(), self.next_seq()));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StoreError::io("create directory", &dir)(e)),
            }
        }
    }

    /// A staging dir left by a process that has gone, holding nothing but empty directories
    /// and empty files (a runner's slot, as it leaves one), for the caller to reuse as it is;
    /// `None` when there is none left. Unlike [`Store::new_staging`], not empty.
    pub fn reuse_staging(&self) -> Option<PathBuf> {
        self.spare_staging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
    }

    /// Hash every file under `dir` and move it into `blobs/` (durably, read-only); return the
    /// tree's manifest. `dir` is left empty, ready for reuse. Symlinks to regular files are
    /// stored as the file; other symlinks and special files are an error naming the path.
    ///
    /// The whole tree is checked before anything moves, so on such an error `dir` is left as
    /// it was. `dir` should be on the store's filesystem (a [`Store::new_staging`] dir is);
    /// elsewhere its files are copied. A file with other hard links is copied too, so that
    /// writing through another link can never change a blob.
    pub fn absorb_dir(&self, dir: &Path) -> Result<Manifest, StoreError> {
        self.absorb_dirs_inner(&[dir])
            .pop()
            .expect("one result per dir")
    }

    /// [`Store::absorb_dir`] for several directories at once, paying for durability once for
    /// all of them: one result per dir, in order.
    pub fn absorb_dirs(&self, dirs: &[&Path]) -> Vec<Result<Manifest, StoreError>> {
        self.absorb_dirs_inner(dirs)
    }

    /// Copy one file's bytes into `blobs/` (the source stays); return its digest.
    pub fn absorb_file_copy(&self, path: &Path) -> Result<BlobDigest, StoreError> {
        self.absorb_file_copy_inner(path)
    }

    /// `blobs/ab/cdef…`: the blob's place, named by the plain BLAKE3 of its bytes (what
    /// `b3sum` prints).
    pub fn blob_path(&self, blob: &BlobDigest) -> PathBuf {
        read::blob_path_in(&self.root, blob)
    }

    /// Record finished steps atomically (all or none), with their manifests and the producer
    /// and consumer indices, then flush. Their blobs must already be in `blobs/`.
    ///
    /// A record replaces any record of the same key (a forced re-execution). Refused, with
    /// nothing written: a manifest that references a blob missing from `blobs/`
    /// ([`StoreError::Corrupt`]), a malformed manifest, a record whose `output` is not its
    /// manifest's digest.
    pub fn commit(&self, commits: &[StepCommit]) -> Result<(), StoreError> {
        self.commit_inner(commits, 0, &[])
    }

    /// [`Store::commit`], recording in the same transaction how far these steps of run `run`
    /// have got (see `progress.rs`): a run whose runner is killed later still shows them.
    pub fn commit_for_run(
        &self,
        commits: &[StepCommit],
        run: u64,
        progress: &[StepProgress],
    ) -> Result<(), StoreError> {
        self.commit_inner(commits, run, progress)
    }

    pub fn step(&self, key: &StepKey) -> Result<Option<StepRecord>, StoreError> {
        self.step_inner(key)
    }

    /// Every stored step with this recipe step name, in key order.
    pub fn steps_named(&self, name: &str) -> Result<Vec<StepRecord>, StoreError> {
        self.steps_named_inner(name)
    }

    pub fn manifest(&self, artifact: &ArtifactDigest) -> Result<Option<Manifest>, StoreError> {
        self.manifest_inner(artifact)
    }

    /// Steps whose output is, or was before a forced re-execution replaced it, `artifact`
    /// (sorted by key). Kept after a replacement so the lineage of an artifact that
    /// downstream steps read stays whole; the step's `executions` list both outputs.
    pub fn producers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        self.index_scan(&self.trees.producers, "producers", artifact)
    }

    /// Steps that read `artifact` as an input, alone or as a gather member (sorted by key).
    pub fn consumers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        self.index_scan(&self.trees.consumers, "consumers", artifact)
    }

    /// A read-only directory holding the artifact's tree (hardlinks to its blobs), built once
    /// under `views/` and reused. Executable files are copies (mode 0555), since a blob is
    /// shared by every path that holds its bytes, with or without the x bit.
    pub fn view(&self, artifact: &ArtifactDigest) -> Result<PathBuf, StoreError> {
        self.view_inner(artifact)
    }

    /// A fresh run id: 1, 2, 3…, never reused, also across reopens.
    pub fn next_run_id(&self) -> Result<u64, StoreError> {
        self.next_run_id_inner()
    }

    /// Insert or replace a run record and its summary, then flush.
    pub fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.put_run_inner(run)
    }

    pub fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        self.run_inner(id)
    }

    /// All run summaries, oldest (lowest id) first.
    pub fn runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        self.runs_inner()
    }

    /// How many steps, artifacts and runs are recorded: a scan of the keys of three trees,
    /// no record decoded.
    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        Ok(StoreCounts {
            steps: self.trees.steps.len(),
            artifacts: self.trees.artifacts.len(),
            runs: self.trees.run_index.len(),
        })
    }

    /// Step keys and artifact digests starting with `prefix` (lowercase hex), steps first,
    /// at most [`FIND_PREFIX_LIMIT`]. A prefix that is not lowercase hex matches nothing.
    pub fn find_prefix(&self, prefix: &str) -> Result<Vec<Found>, StoreError> {
        self.find_prefix_inner(prefix)
    }

    /// Where an attempt's combined stdout/stderr goes, relative to the root.
    /// Fanned out by the key's first byte, like blobs: one directory per step would cost an
    /// inode allocation per step.
    pub fn log_rel_path(key: &StepKey, run: u64, attempt: u32) -> String {
        let hex = key.hex();
        format!("logs/{}/{hex}.{run}-{attempt}.log", &hex[..2])
    }

    /// `rel` resolved against the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A name for a private temporary entry: `.tmp-<pid>-<n>`.
    fn tmp_name(&self) -> String {
        format!(".tmp-{}-{}", std::process::id(), self.next_seq())
    }
}

/// Whether `dir` is a directory whose entries are all empty directories or empty regular
/// files.
fn holds_nothing(dir: &Path) -> bool {
    let Ok(mut entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.all(|entry| {
        let Ok(entry) = entry else { return false };
        match entry.file_type() {
            Ok(t) if t.is_dir() => {
                fs::read_dir(entry.path()).is_ok_and(|mut inside| inside.next().is_none())
            }
            Ok(t) if t.is_file() => entry.metadata().is_ok_and(|m| m.len() == 0),
            _ => false,
        }
    })
}

/// Check (or, when `create`, write) `FORMAT`, creating `root` if needed; the store's format
/// version (1 or 2).
fn check_format(root: &Path, create: bool) -> Result<u32, StoreError> {
    let format_path = root.join("FORMAT");
    match fs::read_to_string(&format_path) {
        Ok(text) => match text.trim() {
            FORMAT => Ok(2),
            FORMAT_1 => Ok(1),
            found => Err(StoreError::Format {
                root: root.to_path_buf(),
                found: found.to_string(),
                expected: FORMAT,
            }),
        },
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory =>
        {
            let layout = store_layout(root)?;
            if layout == Layout::WithData {
                return Err(StoreError::FormatMissing {
                    root: root.to_path_buf(),
                    expected: FORMAT,
                });
            }
            if !create {
                // A file, or a directory holding something else, is no store at all.
                let foreign =
                    fs::metadata(root).is_ok_and(|m| !m.is_dir()) || layout == Layout::Foreign;
                return Err(if foreign {
                    StoreError::NotAStore {
                        root: root.to_path_buf(),
                    }
                } else {
                    StoreError::Missing {
                        root: root.to_path_buf(),
                    }
                });
            }
            match fs::metadata(root) {
                Ok(m) if !m.is_dir() => {
                    return Err(StoreError::NotAStore {
                        root: root.to_path_buf(),
                    });
                }
                // An empty directory, or the beginnings of a store (being created by another
                // process at this very moment, or whose creation was interrupted): finish it.
                Ok(_) if layout == Layout::Empty => {}
                Ok(_) => {
                    return Err(StoreError::NotAStore {
                        root: root.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(root).map_err(StoreError::io("create directory", root))?;
                }
                Err(e) => return Err(StoreError::io("inspect", root)(e)),
            }
            write_format(root)?;
            Ok(2)
        }
        Err(e) => Err(StoreError::io("read", &format_path)(e)),
    }
}

/// Write `FORMAT` (this needle's format), atomically and durably.
fn write_format(root: &Path) -> Result<(), StoreError> {
    let format_path = root.join("FORMAT");
    let tmp = root.join(format!("FORMAT.tmp-{}", std::process::id()));
    fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{FORMAT}\n").as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, &format_path))
        .map_err(StoreError::io("write", &format_path))?;
    fsutil::fsync_dir(root)
}

/// The error of a sled that would not open: unreadable metadata, with what can restore it.
/// An I/O error (a full disk, a permission) stays what it is: rebuilding would not help.
fn unreadable_meta(root: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Db(source) if !matches!(source, sled::Error::Io(_)) => {
            StoreError::MetaUnreadable {
                root: root.to_path_buf(),
                journal: journal::holds_records(root).unwrap_or(false),
                source: Box::new(source),
            }
        }
        other => other,
    }
}

/// What a directory without a `FORMAT` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Missing, empty, or a store's entries with nothing in them yet: safe to make a store of.
    Empty,
    /// A store's entries, with blobs or metadata in them.
    WithData,
    /// Something else.
    Foreign,
}

/// Classify `root` (which has no `FORMAT`). A store writes `FORMAT` before anything else, so
/// a store's layout without it means the file was lost afterwards.
fn store_layout(root: &Path) -> Result<Layout, StoreError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory =>
        {
            return Ok(Layout::Empty);
        }
        Err(e) => return Err(StoreError::io("list", root)(e)),
    };
    let mut data = false;
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", root))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if name == "lock" || name.starts_with("FORMAT.tmp") {
            continue;
        }
        let aside = name.starts_with("meta.broken-") || name.starts_with("meta.rebuild-");
        if !(is_dir && (SUBDIRS.contains(&name.as_ref()) || name == "resume" || aside)) {
            return Ok(Layout::Foreign);
        }
        if name == "blobs" || name == "meta" || name == "journal" || aside {
            let mut inside = fs::read_dir(entry.path()).map_err(StoreError::io("list", root))?;
            data |= inside.next().is_some();
        }
    }
    Ok(if data {
        Layout::WithData
    } else {
        Layout::Empty
    })
}

/// Open sled with explicit flushes only: [`Store::commit`] flushes after each transaction,
/// which is the durability point of the invariant.
/// Remove the snapshots sled began and could not finish (`snap.*.generating`). sled writes a
/// snapshot under that name and renames it once whole; a write that fails (a full disk)
/// leaves the file, and sled 0.34 then reads it as the newest snapshot and refuses to open
/// ever after ("Read corrupted data"). A finished snapshot has no such suffix. Called only by
/// the process holding the store.
fn drop_unfinished_snapshots(meta: &Path) -> Result<(), StoreError> {
    let entries = match fs::read_dir(meta) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("list", meta)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", meta))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!("removing sled's unfinished snapshot `{name}` (a write that failed)");
            let path = entry.path();
            fs::remove_file(&path).map_err(StoreError::io("remove", &path))?;
        }
    }
    Ok(())
}

fn open_sled(path: &Path, root: &Path) -> Result<sled_db::Sled, StoreError> {
    drop_unfinished_snapshots(path)?;
    let config = sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .cache_capacity(CACHE_BYTES);
    // sled's own file lock can outlive a `Db` of this process for a moment (its IO threads
    // let go last); we hold the store lock, so anyone else holding sled's is on the way out,
    // unless the store's lock file was removed under a live holder.
    let mut tries = 0;
    loop {
        // sled 0.34 panics on some damaged files (a truncated `db`) where it reports others as
        // "Read corrupted data": both are metadata that cannot be read.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|panic| {
                let what = sled_db::panic_message(panic.as_ref());
                StoreError::MetaUnreadable {
                    root: root.to_path_buf(),
                    journal: journal::holds_records(root).unwrap_or(false),
                    source: format!("sled failed reading its files: {what}").into(),
                }
            })?;
        match opened {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                if tries == 100 {
                    return Err(StoreError::Locked {
                        root: root.to_path_buf(),
                        holder: "another process, which holds its metadata database (the \
                                 store's lock file was removed or replaced while it ran)"
                            .into(),
                    });
                }
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return Ok(sled_db::Sled::new(other?, path.to_path_buf())),
        }
    }
}

#[cfg(test)]
mod fault_injection_tests;
#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;
