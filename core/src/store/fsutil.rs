//! Small filesystem helpers: durable directory entries, removal of read-only trees.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::StoreError;

/// Make the entries of `dir` (creations, renames) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync directory", dir))
}

/// Make everything written to the filesystem holding `dir` durable: file bytes, modes and
/// directory entries alike, in one call rather than one fsync per file.
pub(crate) fn syncfs(dir: &Path) -> Result<(), StoreError> {
    let d = File::open(dir).map_err(StoreError::io("open", dir))?;
    rustix::fs::syncfs(&d)
        .map_err(|e| StoreError::io("sync the filesystem of", dir)(io::Error::from(e)))
}

/// Create `path` as a directory unless it is one already; true if it was created.
pub(crate) fn ensure_dir(path: &Path) -> Result<bool, StoreError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(false),
        Err(e) => Err(StoreError::io("create directory", path)(e)),
    }
}

/// Remove a file or a whole tree, also one whose directories were made read-only (views, or
/// a worker that chmodded its output). Missing is fine.
pub(crate) fn remove_tree(path: &Path) -> Result<(), StoreError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("inspect", path)(e)),
    };
    if !meta.is_dir() {
        return fs::remove_file(path).map_err(StoreError::io("remove", path));
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_dirs_writable(path);
            fs::remove_dir_all(path).map_err(StoreError::io("remove", path))
        }
    }
}

/// Rename the tree built in `tmp` (a private temporary name) to `dest`, whole. False when
/// another builder's tree was there first: it is as good as ours, and `tmp` is removed.
pub(crate) fn place_built(tmp: &Path, dest: &Path) -> Result<bool, StoreError> {
    match fs::rename(tmp, dest) {
        Ok(()) => Ok(true),
        Err(_) if dest.is_dir() => {
            remove_tree(tmp)?;
            Ok(false)
        }
        Err(e) => {
            let _ = remove_tree(tmp);
            Err(StoreError::io("move into place", tmp)(e))
        }
    }
}

/// Remove everything inside `dir`, leaving `dir` itself. Reusing a directory instead of
/// removing and recreating it matters: on ext4, every inode freed makes the next allocations
/// in its group slower for a while (`recently_deleted` scans), and a runner churning through
/// thousands of short steps would spend most of its time there.
pub(crate) fn empty_dir(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(StoreError::io("list", dir))?;
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        remove_tree(&entry.path())?;
    }
    Ok(())
}

/// Best effort: give the owner rwx on every directory under (and including) `dir`.
fn make_dirs_writable(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_dirs_writable(&entry.path());
            }
        }
    }
}

/// True when `path` names something (without following a final symlink).
pub(crate) fn exists(path: &Path) -> Result<bool, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("inspect", path)(e)),
    }
}

/// Copy the directory tree `from` (files and directories only) to a new `to`.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(to).map_err(StoreError::io("create", to))?;
    for entry in fs::read_dir(from).map_err(StoreError::io("list", from))? {
        let entry = entry.map_err(StoreError::io("list", from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(StoreError::io("inspect", &src))?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            fs::copy(&src, &dst).map_err(StoreError::io("copy", &src))?;
        }
    }
    Ok(())
}
