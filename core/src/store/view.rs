//! Views: an artifact laid out as a read-only directory tree under `views/<artifact>/`.
//!
//! Built in a private `views/.tmp-…` directory and renamed into place whole, so a view that
//! exists is complete. Views hold no data of their own (hardlinks to blobs), and can be
//! deleted and rebuilt at any time.

use std::collections::BTreeSet;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::guard::set_store_time;
use super::meta::check_manifest;
use super::{EntryKind, Manifest, Store, StoreError, fsutil};
use crate::digest::ArtifactDigest;

impl Store {
    pub(super) fn view_inner(&self, artifact: &ArtifactDigest) -> Result<PathBuf, StoreError> {
        let views = self.root.join("views");
        let dest = views.join(artifact.hex());
        if self.knows_view(artifact) || dest.is_dir() {
            return Ok(dest);
        }
        let Some(manifest) = self.manifest(artifact)? else {
            return Err(match self.dropped(artifact)? {
                Some(d) => StoreError::Dropped {
                    artifact: artifact.hex(),
                    reason: d.reason,
                },
                None => StoreError::UnknownArtifact {
                    artifact: artifact.hex(),
                },
            });
        };
        check_manifest(&manifest).map_err(|problem| StoreError::BadManifest {
            artifact: artifact.hex(),
            problem,
        })?;

        let tmp = views.join(self.tmp_name());
        let built = self.build_view(&tmp, &manifest);
        if let Err(e) = built {
            let _ = fsutil::remove_tree(&tmp);
            return Err(e);
        }
        if fsutil::place_built(&tmp, &dest)? {
            self.note_view(*artifact);
        }
        Ok(dest)
    }

    /// Remember that the view of `artifact` exists (built or adopted by this process).
    pub(super) fn note_view(&self, artifact: ArtifactDigest) {
        self.known_views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(artifact);
    }

    /// Forget that the view of `artifact` exists (it is being removed).
    pub(super) fn forget_view(&self, artifact: &ArtifactDigest) {
        self.known_views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(artifact);
    }

    pub(super) fn knows_view(&self, artifact: &ArtifactDigest) -> bool {
        self.known_views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(artifact)
    }

    fn build_view(&self, tmp: &Path, manifest: &Manifest) -> Result<(), StoreError> {
        // Every directory: the parents of each entry and the empty-dir entries. Sorted, a
        // directory comes before anything inside it.
        let mut dirs = BTreeSet::new();
        for e in &manifest.entries {
            for (i, _) in e.path.match_indices('/') {
                dirs.insert(&e.path[..i]);
            }
            if let EntryKind::Dir = e.kind {
                dirs.insert(e.path.as_str());
            }
        }
        fs::create_dir(tmp).map_err(StoreError::io("create directory", tmp))?;
        for d in &dirs {
            let p = tmp.join(d);
            fs::create_dir(&p).map_err(StoreError::io("create directory", &p))?;
        }
        for e in &manifest.entries {
            if let EntryKind::File {
                blob, executable, ..
            } = &e.kind
            {
                let src = self.blob_path(blob);
                let dst = tmp.join(&e.path);
                place(&src, &dst, *executable).map_err(|err| {
                    if err.kind() == io::ErrorKind::NotFound && !src.exists() {
                        StoreError::corrupt(format!(
                            "blob `{}` of `{}` is not in the store",
                            blob.hex(),
                            e.path
                        ))
                    } else {
                        StoreError::io("place", &dst)(err)
                    }
                })?;
            }
        }
        // Read-only, and the store's time on every directory (after its last entry went in),
        // so that a step adding or removing an entry shows (see `guard.rs`).
        let read_only = || Permissions::from_mode(0o555);
        for d in dirs.iter().rev() {
            let p = tmp.join(d);
            fs::set_permissions(&p, read_only())
                .and_then(|()| set_store_time(&p))
                .map_err(StoreError::io("make read-only", &p))?;
        }
        // Renaming a directory within one parent does not need write access to it, and keeps
        // its time.
        fs::set_permissions(tmp, read_only())
            .and_then(|()| set_store_time(tmp))
            .map_err(StoreError::io("make read-only", tmp))
    }
}

/// A hardlink to the blob; a copy when the file is executable (the blob is 0444) or the blob
/// cannot take another link (`EMLINK` on a very common small file).
fn place(blob: &Path, dst: &Path, executable: bool) -> io::Result<()> {
    if !executable {
        match fs::hard_link(blob, dst) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            Err(_) => {}
        }
    }
    fs::copy(blob, dst)?;
    let mode = if executable { 0o555 } else { 0o444 };
    fs::set_permissions(dst, Permissions::from_mode(mode))?;
    set_store_time(dst)
}
