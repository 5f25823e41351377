//! `Store::rebuild`: restore `meta/` from the journal (`needle verify --rebuild`), when sled's
//! files are lost, emptied or unreadable, or whenever asked.
//!
//! 1. Under the store's lock, read the journal from its start: its head, the snapshot, every
//!    change in order. A torn tail (a kill mid-append) ends the reading and is reported, never
//!    applied; so is a damaged frame, with how many whole frames follow it (those are lost:
//!    applying changes after a missing one could leave records that contradict each other).
//! 2. Apply what was read to a new sled in `meta.rebuild-<pid>/`, and record its position in
//!    the journal.
//! 3. Open the store on it and verify it against the blobs (sizes; with `hash`, contents).
//! 4. Swap it in: `meta/` (when it holds anything) is renamed `meta.broken-<time>/`, kept for
//!    its owner to look at or remove, and the new one renamed `meta/`; the root is fsynced.
//!    A kill between the two renames leaves no `meta/` and the journal whole: a rebuild
//!    again finishes the work (a left `meta.rebuild-*` is removed first).
//!
//! The verification's problems do not stop the swap: the old `meta/` stays beside it, and
//! `needle verify --repair` drops what the blobs no longer support.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::journal::{self, Body, Frames, Pos, TreeId};
use super::lock::{Purpose, StoreLock};
use super::{LockMode, Store, StoreError, VerifyReport, fsutil};

/// What [`Store::rebuild`] restored, and what it found.
#[derive(Debug, Clone, Serialize)]
pub struct Rebuilt {
    /// The journal read, its bytes, and how many of its frames were applied (the snapshot's
    /// and the changes').
    pub journal: PathBuf,
    pub journal_bytes: u64,
    pub frames: u64,
    pub restored: Restored,
    /// Where reading the journal stopped before its end, and why.
    pub stopped: Option<journal::Stop>,
    /// Whole frames after that point, which could not be applied: 0 for a torn tail.
    pub frames_lost: usize,
    /// Where the replaced `meta/` was kept; `None` when there was none, or it held nothing.
    pub old_meta: Option<PathBuf>,
    /// The rebuilt metadata checked against the blobs, before it was swapped in.
    pub verify: VerifyReport,
}

/// Tree name → its (key, value) pairs in key order.
pub type RawRecords = std::collections::BTreeMap<&'static str, Vec<(Vec<u8>, Vec<u8>)>>;

/// Records in the rebuilt metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Restored {
    pub steps: usize,
    pub artifacts: usize,
    pub runs: usize,
    pub pins: usize,
    /// Notes of artifacts dropped as damaged.
    pub dropped: usize,
    /// Runs with sampled GPU usage.
    pub gpu_usage: usize,
    /// Step states of runs that had not ended.
    pub run_progress: usize,
    /// Producer and consumer index entries.
    pub index_entries: usize,
}

impl Store {
    /// Rebuild the metadata of the store at `root` from its journal (see the module's doc),
    /// and return the store opened on it. Refused, changing nothing, when the store has no
    /// journal ([`StoreError::NoJournal`]) or it cannot be read from its start.
    pub fn rebuild(
        root: &Path,
        mode: LockMode,
        hash: bool,
    ) -> Result<(Store, Rebuilt), StoreError> {
        let version = super::check_format(root, false)?;
        if super::space::read_only_fs(root) {
            return Err(StoreError::ReadOnly {
                root: root.to_path_buf(),
            });
        }
        let lock = StoreLock::acquire(root, mode, Purpose::Write)?;
        let path = root.join(journal::DIR).join(journal::FILE);
        if version == 1 {
            return Err(StoreError::NoJournal {
                root: root.to_path_buf(),
                why: format!(
                    "it was last written by a needle that kept none (`{}`); one is written, from \
                     the metadata, by the first command of this needle that opens the store, \
                     which needs a readable `meta/`",
                    super::FORMAT_1
                ),
            });
        }
        if !fsutil::exists(&path)? {
            return Err(StoreError::NoJournal {
                root: root.to_path_buf(),
                why: format!(
                    "`{}` is missing; while `meta/` is readable, any needle command that opens \
                     the store writes a new one from it",
                    path.display()
                ),
            });
        }
        for entry in fs::read_dir(root).map_err(StoreError::io("list", root))? {
            let entry = entry.map_err(StoreError::io("list", root))?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("meta.rebuild-")
            {
                fsutil::remove_tree(&entry.path())?;
            }
        }

        let tmp = root.join(format!("meta.rebuild-{}", std::process::id()));
        let built = build(&path, &tmp, root);
        let (frames, stopped, frames_lost) = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = fsutil::remove_tree(&tmp);
                return Err(e);
            }
        };
        let journal_bytes = fs::metadata(&path)
            .map_err(StoreError::io("inspect", &path))?
            .len();

        // Verify it before it goes in.
        let store = Store::open_locked(root, lock, &tmp, 2)?;
        let verify = store.verify(hash)?;
        let restored = store.restored()?;
        let lock = store.into_lock()?;

        let meta = root.join("meta");
        let old_meta = if !fsutil::exists(&meta)? {
            None
        } else if super::holds_nothing(&meta) {
            fsutil::remove_tree(&meta)?;
            None
        } else {
            let aside = aside_name(root)?;
            fs::rename(&meta, &aside).map_err(StoreError::io("move aside", &meta))?;
            Some(aside)
        };
        fs::rename(&tmp, &meta).map_err(StoreError::io("move into place", &tmp))?;
        fsutil::fsync_dir(root)?;
        let store = Store::open_locked(root, lock, &meta, 2)?;
        Ok((
            store,
            Rebuilt {
                journal: path,
                journal_bytes,
                frames,
                restored,
                stopped,
                frames_lost,
                old_meta,
                verify,
            },
        ))
    }

    /// Every record of every tree as raw bytes, by tree name (the journal position aside):
    /// what a rebuild must give back exactly. For tests.
    #[doc(hidden)]
    pub fn raw_records(&self) -> Result<RawRecords, StoreError> {
        let mut out = RawRecords::new();
        for tree in TreeId::ALL {
            let mut records = Vec::new();
            for item in self.trees.get(tree).iter() {
                let (k, v) = item?;
                if !(tree == TreeId::Default && &*k == journal::POS_KEY) {
                    records.push((k.to_vec(), v.to_vec()));
                }
            }
            out.insert(tree.name(), records);
        }
        Ok(out)
    }

    /// Count what the metadata holds, for [`Rebuilt`].
    fn restored(&self) -> Result<Restored, StoreError> {
        let t = &self.trees;
        Ok(Restored {
            steps: t.steps.len(),
            artifacts: t.artifacts.len(),
            runs: t.runs.len(),
            pins: t.pins.len(),
            dropped: t.dropped.len(),
            gpu_usage: t.gpu_usage.len(),
            run_progress: t.run_progress.len(),
            index_entries: t.producers.len() + t.consumers.len(),
        })
    }
}

/// Apply the journal at `path` to a new sled in `tmp`: the frames applied, where and why the
/// reading stopped early, and how many whole frames were left after that.
fn build(
    path: &Path,
    tmp: &Path,
    root: &Path,
) -> Result<(u64, Option<journal::Stop>, usize), StoreError> {
    let mut frames = Frames::from_start(path)?;
    let db = super::open_sled(tmp, root)?;
    let trees = super::meta::Trees::open(&db)?;
    let mut applied = 0u64;
    while let Some(frame) = frames.next_frame()? {
        match frame.body {
            Body::Head(_) => {}
            Body::Snap(ops) | Body::Change(ops) => {
                // One writer, a new database: no transaction needed; a kill leaves only `tmp`.
                for op in ops {
                    let tree = trees.get(op.tree);
                    match op.value {
                        Some(v) => tree.insert(op.key, v)?,
                        None => tree.remove(op.key)?,
                    };
                }
            }
        }
        applied += 1;
    }
    let Some(head) = frames.head() else {
        return Err(StoreError::JournalDamaged {
            path: path.to_path_buf(),
            reason: frames
                .stop()
                .map_or("it is empty".into(), |s| s.reason.clone()),
        });
    };
    let pos = Pos {
        generation: head.generation,
        seq: frames.last_seq(),
        end: frames.end(),
    };
    trees
        .get(TreeId::Default)
        .insert(journal::POS_KEY, &pos.encode()[..])?;
    db.flush()?;
    let stopped = frames.stop().cloned();
    let lost = frames.frames_after_stop()?;
    Ok((applied, stopped, lost))
}

/// `meta.broken-<UTC time>` (with `-2`, `-3`… if taken).
fn aside_name(root: &Path) -> Result<PathBuf, StoreError> {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let mut name = root.join(format!("meta.broken-{stamp}"));
    let mut n = 1;
    while fsutil::exists(&name)? {
        n += 1;
        name = root.join(format!("meta.broken-{stamp}-{n}"));
    }
    Ok(name)
}

#[cfg(test)]
mod tests;
