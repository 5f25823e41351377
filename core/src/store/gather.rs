//! Gathers: the members of a gather input (`step[*]`) as one read-only directory,
//! `views/gather-<hash>/`: one entry per member, named by its bindings (a relative symlink to
//! the member's view), and `index.json` listing them in order. `<hash>` is the BLAKE3 of that
//! index, so a gather with the same members in the same order is made once and then reused.
//!
//! Why in the store and kept, not made in each attempt's staging directory: a view's name is
//! 64 hex digits, too long for a symlink held in its inode, so every entry costs a data block,
//! and on a filesystem mounted with `discard`, freeing a block waits for the device. Removing a
//! 2,500-member gather after its step took 0.19 s, all of it at the end of the run, where
//! nothing else can go on (BENCHMARKS.md).
//!
//! Like views, gathers hold no data and can be removed at any time: `gc` removes those with a
//! member it removes, and a damaged one (a step wrote into it) is removed and made again.

use std::fs::{self, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::GatherMember;
use super::guard::{has_store_time, set_store_time};
use super::{Store, StoreError, fsutil};
use crate::digest::ArtifactDigest;

/// The name of a gather directory under `views/` starts with this (never a digest's hex).
pub const GATHER_PREFIX: &str = "gather-";

/// The index file of a gather directory.
pub const GATHER_INDEX: &str = "index.json";

impl Store {
    /// The gather directory of `members` in their order, made if needed, and each member's
    /// view. The views are made too: every entry resolves.
    pub fn gather(&self, members: &[GatherMember]) -> Result<(PathBuf, Vec<PathBuf>), StoreError> {
        let views = members
            .iter()
            .map(|m| self.view(&m.artifact))
            .collect::<Result<Vec<_>, _>>()?;
        let index = gather_index(members);
        let dest = self.gather_path_of(&index);
        if self.gather_intact(&dest) {
            return Ok((dest, views));
        }
        if fsutil::exists(&dest)? {
            // Changed since the store made it: make it again.
            fsutil::remove_tree(&dest)?;
        }
        let tmp = self.root.join("views").join(self.tmp_name());
        if let Err(e) = build(&tmp, members, &index) {
            let _ = fsutil::remove_tree(&tmp);
            return Err(e);
        }
        // Durable before it can be used: after a crash, a gather that exists is whole (it is
        // reused without being read).
        fsutil::syncfs(&tmp)?;
        fsutil::place_built(&tmp, &dest)?;
        Ok((dest, views))
    }

    /// Where the gather directory of `members` is (whether or not it exists).
    pub fn gather_path(&self, members: &[GatherMember]) -> PathBuf {
        self.gather_path_of(&gather_index(members))
    }

    fn gather_path_of(&self, index: &str) -> PathBuf {
        let hash = blake3::hash(index.as_bytes());
        self.root
            .join("views")
            .join(format!("{GATHER_PREFIX}{}", hash.to_hex()))
    }

    /// Remove the gather directory `dir` (it is made again when next needed).
    pub fn remove_gather(&self, dir: &Path) -> Result<(), StoreError> {
        fsutil::remove_tree(dir)
    }

    /// Whether the gather directory `dir` is as the store made it. Adding, removing or
    /// renaming an entry sets the directory's modification time, rewriting the index sets its
    /// own; both carry the store's time until then (see `guard.rs`). An entry cannot be
    /// changed in place, only replaced.
    pub fn gather_intact(&self, dir: &Path) -> bool {
        let carries = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| has_store_time(&m));
        carries(dir) && carries(&dir.join(GATHER_INDEX))
    }
}

/// The name of a member's entry: its label, with `/` (which a value may hold) made `_`.
pub fn gather_entry(label: &str) -> String {
    label.replace('/', "_")
}

/// The artifacts an index lists, `None` if it is not one.
pub(super) fn gather_members(index: &str) -> Option<Vec<ArtifactDigest>> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(index).ok()?;
    entries
        .iter()
        .map(|e| e.get("artifact")?.as_str()?.parse().ok())
        .collect()
}

fn gather_index(members: &[GatherMember]) -> String {
    let index: Vec<serde_json::Value> = members
        .iter()
        .map(|m| {
            serde_json::json!({
                "label": m.label,
                "dir": gather_entry(&m.label),
                "artifact": m.artifact.hex(),
            })
        })
        .collect();
    serde_json::to_string_pretty(&index).expect("json")
}

fn build(tmp: &Path, members: &[GatherMember], index: &str) -> Result<(), StoreError> {
    fs::create_dir(tmp).map_err(StoreError::io("create directory", tmp))?;
    for GatherMember { label, artifact } in members {
        let entry = tmp.join(gather_entry(label));
        // Relative: the store can be moved.
        std::os::unix::fs::symlink(Path::new("..").join(artifact.hex()), &entry)
            .map_err(StoreError::io("link gather member", &entry))?;
    }
    let index_path = tmp.join(GATHER_INDEX);
    fs::write(&index_path, index).map_err(StoreError::io("write", &index_path))?;
    fs::set_permissions(&index_path, Permissions::from_mode(0o444))
        .and_then(|()| set_store_time(&index_path))
        .map_err(StoreError::io("make read-only", &index_path))?;
    fs::set_permissions(tmp, Permissions::from_mode(0o555))
        .and_then(|()| set_store_time(tmp))
        .map_err(StoreError::io("make read-only", tmp))
}
