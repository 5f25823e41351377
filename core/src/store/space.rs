//! Free space on the store's filesystem, and the guard that keeps sled from meeting a full disk.
//!
//! sled does not survive `ENOSPC` gracefully within a process: a flush that fails leaves the
//! failed transaction visible to later reads (though it never reaches the disk), and every
//! later write fails with the same error until the database is reopened. So a commit first
//! checks that the filesystem has room for what it is about to write, with a margin, and
//! refuses cleanly when it has not: nothing is written, and the store is as it was. (Another
//! process may still fill the disk between the check and the flush; then the commit fails as
//! sled fails, and reopening the store — the next run — finds the last flushed state.)

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Store, StoreError};

/// The filesystem holding the store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    /// Where it is mounted: the highest directory above the store root on the same device.
    pub mount: PathBuf,
    /// Bytes an unprivileged user may still write.
    pub free: u64,
    pub total: u64,
}

/// What a commit keeps free beyond twice what it writes: 1/64 of the filesystem, at least
/// 1 MiB (sled grows its log a 512 KiB segment at a time, and writes large values to files of
/// their own), at most 8 MiB.
const MIN_RESERVE: u64 = 1 << 20;
const MAX_RESERVE: u64 = 8 << 20;

fn reserve(total: u64) -> u64 {
    (total / 64).clamp(MIN_RESERVE, MAX_RESERVE)
}

impl Store {
    /// Free and total space on the store's filesystem.
    pub fn space(&self) -> Result<Space, StoreError> {
        let (free, total) = statvfs(&self.root)?;
        Ok(Space {
            mount: mount_point(&self.root),
            free,
            total,
        })
    }

    /// [`StoreError::NoSpace`] for the store's filesystem, with `source` as its cause.
    pub fn no_space(&self, source: Option<std::io::Error>) -> StoreError {
        let (mount, free) = match self.space() {
            Ok(s) => (s.mount, s.free),
            Err(_) => (self.root.clone(), 0),
        };
        StoreError::NoSpace {
            mount,
            free,
            source,
        }
    }

    /// Refuse, before the journal or sled writes anything, a commit of about `bytes` that the
    /// filesystem may not have room for: three times `bytes` (the journal, sled's log, then its
    /// segments) plus a reserve (see [`MIN_RESERVE`]).
    pub(super) fn ensure_room(&self, bytes: u64) -> Result<(), StoreError> {
        let (free, total) = statvfs(&self.root)?;
        if free < bytes.saturating_mul(3) + reserve(total) {
            return Err(self.no_space(None));
        }
        Ok(())
    }

    /// The store's filesystem, when it has less free than a commit's reserve: a step that
    /// failed meanwhile may have failed for want of space (its log with it).
    pub fn full(&self) -> Option<Space> {
        let space = self.space().ok()?;
        (space.free < reserve(space.total)).then_some(space)
    }
}

/// (free for unprivileged users, total) bytes of the filesystem holding `path`.
fn statvfs(path: &Path) -> Result<(u64, u64), StoreError> {
    let st = statvfs_raw(path)?;
    // The field types differ between targets (c_ulong, fsblkcnt_t): widen them all.
    let [frsize, bavail, blocks] = [st.f_frsize, st.f_bavail, st.f_blocks];
    Ok((bavail.saturating_mul(frsize), blocks.saturating_mul(frsize)))
}

/// Whether the filesystem holding `path` is mounted read-only (false when it cannot be told).
pub(super) fn read_only_fs(path: &Path) -> bool {
    statvfs_raw(path).is_ok_and(|st| st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

fn statvfs_raw(path: &Path) -> Result<rustix::fs::StatVfs, StoreError> {
    rustix::fs::statvfs(path)
        .map_err(|e| StoreError::io("inspect the filesystem of", path)(std::io::Error::from(e)))
}

/// The highest directory above `path` on the same device as `path`: its mount point.
fn mount_point(path: &Path) -> PathBuf {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(dev) = std::fs::metadata(&path).map(|m| m.dev()) else {
        return path;
    };
    let mut mount = path.clone();
    for dir in path.ancestors().skip(1) {
        match std::fs::metadata(dir) {
            Ok(m) if m.dev() == dev => mount = dir.to_path_buf(),
            _ => break,
        }
    }
    mount
}
