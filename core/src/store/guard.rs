//! Finding what a step wrote into its inputs, and undoing the harm.
//!
//! A step reads its inputs through views: trees of hardlinks to the blobs themselves (copies for
//! executable files), 0444 in 0555 directories. Permission bits stop an ordinary user's step
//! from writing there, but not root's (CI and containers run as root), so a step that opens an
//! input for writing changes the blob in place, under a digest that no longer names its bytes.
//!
//! Every file and directory the store makes — blobs, view copies, view directories — gets one
//! fixed modification time, [`store_time`]. Writing a file's bytes, or adding, removing or
//! renaming an entry of a directory, sets its mtime to the present, so after an attempt a walk
//! that `lstat`s every entry of its input views finds any such write without reading a byte.
//! Only what does not carry the store's time is looked at closely: compared with the manifest
//! and re-hashed. A file that still hashes to its blob (a store written before the fixed times,
//! or a write that put the same bytes back) is given the store's time and passes. A write that
//! restores the mtime itself (`touch -d`, `cp -p`) goes unseen; `needle verify --hash` finds it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{EntryKind, Manifest, Store, StoreError};
use crate::digest::{ArtifactDigest, BlobDigest};

/// The modification time of everything the store makes, in seconds since the epoch:
/// 2000-01-01T00:00:00Z. Not the epoch itself, which tools reading a view may refuse (a zip
/// archive cannot hold a time before 1980).
pub const STORE_TIME_SECS: u64 = 946_684_800;

/// [`STORE_TIME_SECS`] as a time.
pub fn store_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(STORE_TIME_SECS)
}

/// Whether a file or directory carries the store's time (nothing wrote it since the store did).
pub fn has_store_time(meta: &fs::Metadata) -> bool {
    meta.mtime() == STORE_TIME_SECS as i64 && meta.mtime_nsec() == 0
}

/// Give `path` the store's modification time. Needs only ownership, not write permission. One `utimensat` by path: opening the file to set its time costs two calls more,
/// once for every output a run stores.
pub fn set_store_time(path: &Path) -> io::Result<()> {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, UTIME_OMIT};
    let times = Timestamps {
        // The access time is left as it is.
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: STORE_TIME_SECS as i64,
            tv_nsec: 0,
        },
    };
    Ok(rustix::fs::utimensat(CWD, path, &times, AtFlags::empty())?)
}

/// Something a step did to one of its input views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewDamage {
    pub artifact: ArtifactDigest,
    /// The entry's path inside the artifact.
    pub path: String,
    pub kind: ViewDamageKind,
    /// When the damaged entry was last written, where that is known: a caller can tell
    /// damage done while a step ran from damage done before.
    pub at: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewDamageKind {
    /// Its bytes changed. `blob`: the file written was the blob itself (a hardlink), so the
    /// store's only copy of those bytes is gone; otherwise only the view's entry is.
    Changed { blob: bool },
    /// Removed from the view.
    Removed,
    /// Not part of the artifact: the step created it.
    Added,
    /// A directory where a file was, a file where a directory was, a symlink…
    Replaced,
}

impl std::fmt::Display for ViewDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            ViewDamageKind::Changed { .. } => "changed",
            ViewDamageKind::Removed => "removed",
            ViewDamageKind::Added => "added",
            ViewDamageKind::Replaced => "replaced",
        };
        write!(f, "{what} `{}`", self.path)
    }
}

/// What [`Store::check_views`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewCheck {
    Intact,
    Damaged(Vec<ViewDamage>),
    /// The views hold more entries than the budget allowed to look at; nothing was changed.
    OverBudget,
}

/// What [`Store::repair`] took away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewRepair {
    /// Views removed (rebuilt from the blobs when next needed).
    pub views: Vec<ArtifactDigest>,
    /// Blobs dropped: their bytes were damaged.
    pub blobs: Vec<BlobDigest>,
    /// Artifacts dropped because they hold a dropped blob, and the steps that made them, by
    /// name: the next run makes them again.
    pub artifacts: Vec<ArtifactDigest>,
    pub steps: Vec<String>,
}

impl Store {
    /// Check that the views of `artifacts` are as the store made them (call it once the steps
    /// reading them have ended). Looks at no more than `budget` entries; past that it answers
    /// [`ViewCheck::OverBudget`] having changed nothing, so a caller on a latency-sensitive
    /// thread can check small inputs in place and hand large ones to another thread.
    ///
    /// Reports every damaged entry; repairs nothing (see [`Store::repair`]) except that a file
    /// found intact by hashing is given the store's time, so it is not hashed again.
    pub fn check_views(
        &self,
        artifacts: &[ArtifactDigest],
        budget: usize,
    ) -> Result<ViewCheck, StoreError> {
        let mut seen = 0usize;
        let mut suspect = Vec::new();
        for artifact in artifacts.iter().collect::<BTreeSet<_>>() {
            let view = self.root.join("views").join(artifact.hex());
            match quick_walk(&view, &mut seen, budget) {
                Walk::Clean => {}
                Walk::Suspect => suspect.push(*artifact),
                Walk::OverBudget => return Ok(ViewCheck::OverBudget),
            }
        }
        let mut damage = Vec::new();
        for artifact in suspect {
            damage.extend(self.compare_view(&artifact)?);
        }
        Ok(if damage.is_empty() {
            ViewCheck::Intact
        } else {
            ViewCheck::Damaged(damage)
        })
    }

    /// Undo `damage`: remove the damaged views, and drop each damaged blob with every artifact
    /// holding it and every step record whose output such an artifact is (the next run makes
    /// them again, the same bytes under the same digests when the steps are deterministic).
    /// No record is left pointing at a blob that is not whole.
    pub fn repair_views(&self, damage: &[ViewDamage]) -> Result<ViewRepair, StoreError> {
        let mut repaired = ViewRepair::default();
        let mut blobs = BTreeSet::new();
        let mut views = BTreeSet::new();
        for d in damage {
            views.insert(d.artifact);
            if let ViewDamageKind::Changed { blob: true } = d.kind {
                let manifest =
                    self.manifest(&d.artifact)?
                        .ok_or_else(|| StoreError::UnknownArtifact {
                            artifact: d.artifact.hex(),
                        })?;
                if let Some(blob) = blob_at(&manifest, &d.path) {
                    blobs.insert(blob);
                }
            }
        }
        for artifact in &views {
            self.remove_view(artifact)?;
        }
        repaired.views = views.into_iter().collect();
        for blob in blobs {
            let reason = format!(
                "blob {} was damaged by a step that wrote into its input",
                blob.short()
            );
            let dropped = self.drop_blob(&blob, &reason)?;
            repaired.artifacts.extend(dropped.artifacts);
            repaired.steps.extend(dropped.steps);
            repaired.blobs.push(blob);
        }
        Ok(repaired)
    }

    /// Compare the view of `artifact` with its manifest, entry by entry.
    fn compare_view(&self, artifact: &ArtifactDigest) -> Result<Vec<ViewDamage>, StoreError> {
        let manifest = self
            .manifest(artifact)?
            .ok_or_else(|| StoreError::UnknownArtifact {
                artifact: artifact.hex(),
            })?;
        let view = self.root.join("views").join(artifact.hex());
        let damage = |path: &str, kind| ViewDamage {
            artifact: *artifact,
            path: path.to_string(),
            kind,
            at: None,
        };
        let written = |path: &str, kind, meta: &fs::Metadata| ViewDamage {
            at: meta.modified().ok(),
            ..damage(path, kind)
        };
        // What should be there: every file, and every directory (listed or implied).
        let mut expected: BTreeMap<String, Option<(BlobDigest, u64)>> = BTreeMap::new();
        for e in &manifest.entries {
            for (i, _) in e.path.match_indices('/') {
                expected.insert(e.path[..i].to_string(), None);
            }
            let entry = match e.kind {
                EntryKind::File { blob, size, .. } => Some((blob, size)),
                EntryKind::Dir => None,
            };
            expected.insert(e.path.clone(), entry);
        }
        let mut found = BTreeMap::new();
        let root_meta = match fs::symlink_metadata(&view) {
            Ok(m) if m.is_dir() => Some(m),
            Ok(_) => return Ok(vec![damage(".", ViewDamageKind::Replaced)]),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(StoreError::io("inspect", &view)(e)),
        };
        if root_meta.is_some() {
            full_walk(&view, "", &mut found)?;
        }

        let mut out = Vec::new();
        for (path, meta) in &found {
            if !expected.contains_key(path) {
                out.push(written(path, ViewDamageKind::Added, meta));
            }
        }
        let mut fix_times = Vec::new();
        for (path, entry) in &expected {
            let here = view.join(path);
            let Some(meta) = found.get(path) else {
                out.push(damage(path, ViewDamageKind::Removed));
                // The view's link is gone, but the blob may have been written before.
                if let Some((blob, size)) = entry
                    && !self.blob_intact(blob, *size)?
                {
                    out.push(damage(path, ViewDamageKind::Changed { blob: true }));
                }
                continue;
            };
            match entry {
                None if meta.is_dir() => {
                    if !has_store_time(meta) {
                        fix_times.push(here);
                    }
                }
                Some((blob, size)) if meta.is_file() => {
                    let blob_path = self.blob_path(blob);
                    let blob_meta = fs::symlink_metadata(&blob_path).ok();
                    let is_blob = blob_meta
                        .as_ref()
                        .is_some_and(|b| b.dev() == meta.dev() && b.ino() == meta.ino());
                    if has_store_time(meta) && meta.len() == *size {
                        continue;
                    }
                    if meta.len() == *size && hash_file(&here)? == *blob {
                        fix_times.push(here);
                        continue;
                    }
                    out.push(written(
                        path,
                        ViewDamageKind::Changed { blob: is_blob },
                        meta,
                    ));
                    // A copy (or a new file put in the link's place) was changed: the blob
                    // itself may still be whole.
                    if !is_blob && !self.blob_intact(blob, *size)? {
                        let at = blob_meta.as_ref().and_then(|m| m.modified().ok());
                        out.push(ViewDamage {
                            at,
                            ..damage(path, ViewDamageKind::Changed { blob: true })
                        });
                    }
                }
                _ => out.push(written(path, ViewDamageKind::Replaced, meta)),
            }
        }
        if out.is_empty() {
            if root_meta.is_some_and(|m| !has_store_time(&m)) {
                fix_times.push(view);
            }
            // Intact after all (a view of a store from before the fixed times): remember so.
            for p in fix_times {
                let _ = set_store_time(&p);
            }
        }
        Ok(out)
    }

    /// Whether the blob file holds `size` bytes that hash to `blob` (looked at closely only
    /// when it does not carry the store's time).
    pub(crate) fn blob_intact(&self, blob: &BlobDigest, size: u64) -> Result<bool, StoreError> {
        Ok(self.blob_state(blob, size)? == BlobState::Intact)
    }

    /// What `blobs/` holds under `blob`'s name; a file found whole by hashing is given the
    /// store's time, so it is not hashed again.
    pub(crate) fn blob_state(&self, blob: &BlobDigest, size: u64) -> Result<BlobState, StoreError> {
        let path = self.blob_path(blob);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BlobState::Missing),
            Err(e) => return Err(StoreError::io("inspect", &path)(e)),
        };
        if !meta.is_file() || meta.len() != size {
            return Ok(BlobState::Damaged);
        }
        if has_store_time(&meta) {
            return Ok(BlobState::Intact);
        }
        if hash_file(&path)? == *blob {
            let _ = set_store_time(&path);
            return Ok(BlobState::Intact);
        }
        Ok(BlobState::Damaged)
    }

    /// Remove the view of `artifact` (it is rebuilt from the blobs when next needed).
    pub(crate) fn remove_view(&self, artifact: &ArtifactDigest) -> Result<(), StoreError> {
        self.forget_view(artifact);
        super::fsutil::remove_tree(&self.root.join("views").join(artifact.hex()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlobState {
    Missing,
    Intact,
    /// Something else is there: other bytes, or not a file.
    Damaged,
}

fn blob_at(manifest: &Manifest, path: &str) -> Option<BlobDigest> {
    manifest.entries.iter().find_map(|e| match e.kind {
        EntryKind::File { blob, .. } if e.path == path => Some(blob),
        _ => None,
    })
}

enum Walk {
    Clean,
    Suspect,
    OverBudget,
}

/// `lstat` everything under `dir`: clean when every directory and file carries the store's
/// time and nothing else (a symlink, a fifo) is there.
fn quick_walk(dir: &Path, seen: &mut usize, budget: usize) -> Walk {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && has_store_time(&m) => {}
            _ => return Walk::Suspect,
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            return Walk::Suspect;
        };
        for entry in entries {
            *seen += 1;
            if *seen > budget {
                return Walk::OverBudget;
            }
            let Ok(entry) = entry else {
                return Walk::Suspect;
            };
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => match entry.metadata() {
                    Ok(m) if has_store_time(&m) => {}
                    _ => return Walk::Suspect,
                },
                _ => return Walk::Suspect,
            }
        }
    }
    Walk::Clean
}

/// Every entry under `dir` by relative path, with its `lstat`.
fn full_walk(
    dir: &Path,
    rel: &str,
    out: &mut BTreeMap<String, fs::Metadata>,
) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(StoreError::io("list", dir))? {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let child_rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path: PathBuf = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(StoreError::io("inspect", &path))?;
        if meta.is_dir() {
            full_walk(&path, &child_rel, out)?;
        }
        out.insert(child_rel, meta);
    }
    Ok(())
}

/// BLAKE3 of a file's bytes.
pub(crate) fn hash_file(path: &Path) -> Result<BlobDigest, StoreError> {
    let mut hasher = blake3::Hasher::new();
    File::open(path)
        .and_then(|mut f| io::copy(&mut f, &mut hasher))
        .map_err(StoreError::io("read", path))?;
    Ok(BlobDigest::from_hasher(&hasher))
}
