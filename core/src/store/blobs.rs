//! Writing blobs: hashing output files and moving (or copying) them into `blobs/`.
//!
//! A name under `blobs/` always holds whole bytes: a file is renamed in only once its bytes
//! and its mode (0444) are durable, and the renames are durable before the caller can commit
//! a record that points at them. Durability is bought per *batch*, not per file: the files of
//! every directory absorbed together are made durable by one `syncfs`, renamed, and the renames
//! by a second one. On the disks we run on, a sync costs about as much as a whole small step,
//! so a runner finishing many short steps absorbs whatever finished meanwhile in one batch.
//! A fan-out directory is made (and `blobs/` fsynced) before its first blob.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::guard::{BlobState, set_store_time, store_time};
use super::{EntryKind, Manifest, ManifestEntry, Store, StoreError, fsutil};
use crate::digest::BlobDigest;

/// Read buffer for hashing and copying; large enough for BLAKE3 to hash many chunks at once.
const BUF_LEN: usize = 1 << 20;

/// Most threads an absorb of several files hashes on: for a few large files the hashing
/// spreads over the cores; reads of many small ones overlap.
const THREADS: usize = 16;

/// What the walk found, before anything moves.
struct Walked {
    rel: String,
    path: PathBuf,
    kind: WalkKind,
}

enum WalkKind {
    File,
    /// A symlink to a regular file: stored as a copy of that file.
    Link,
    EmptyDir,
}

/// One file on its way into `blobs/`.
struct Absorbed {
    blob: BlobDigest,
    size: u64,
    executable: bool,
    /// A read-only file, not yet durable, to rename to the blob's place once it is.
    pending: Option<PathBuf>,
}

/// A directory absorbed up to its pending renames.
struct Prepared {
    walked: Vec<Walked>,
    files: Vec<Absorbed>,
    /// The directory can become the artifact's view as it is (see [`Store::adopt_as_view`]).
    adoptable: bool,
}

impl Store {
    /// Absorb `dirs` together; one result per dir, in order. A dir whose tree is refused is left
    /// as it was; the others are left empty.
    ///
    /// A dir that fails part way (a full disk while copying one of its files in) takes out of
    /// `blobs/` again what it had put there, unless another dir of the batch uses it: whole
    /// blobs, harmless, but on a full disk the space matters. Nothing is absorbed at all while
    /// the filesystem has less free than a commit's reserve (see `space.rs`): the commit would
    /// be refused, and the outputs' blobs would stay behind with no record.
    pub(super) fn absorb_dirs_inner(&self, dirs: &[&Path]) -> Vec<Result<Manifest, StoreError>> {
        if let Err(e) = self.ensure_room(0) {
            return dirs.iter().map(|_| Err(e.duplicate())).collect();
        }
        let placed: Vec<Placed> = dirs.iter().map(|_| Placed::default()).collect();
        let mut prepared: Vec<Result<Prepared, StoreError>> = dirs
            .iter()
            .zip(&placed)
            .map(|(dir, placed)| self.prepare_dir(dir, placed))
            .collect();

        let any_pending = prepared
            .iter()
            .flatten()
            .any(|p| p.files.iter().any(|a| a.pending.is_some()));
        if any_pending && let Err(e) = self.sync_blobs("absorb.sync-read-only") {
            self.take_back(&placed, &[]);
            return dirs.iter().map(|_| Err(e.duplicate())).collect();
        }
        for (p, placed) in prepared.iter_mut().zip(&placed) {
            let Ok(dir) = p else { continue };
            if let Err(e) = self.place_pending(dir, placed) {
                *p = Err(e);
            }
        }
        // The renames (and blobs copied in) must be durable before any record points at them.
        if let Err(e) = self.sync_blobs("absorb.sync-placed") {
            self.take_back(&placed, &[]);
            return dirs.iter().map(|_| Err(e.duplicate())).collect();
        }

        let results: Vec<Result<Manifest, StoreError>> = dirs
            .iter()
            .zip(prepared)
            .map(|(dir, p)| {
                let p = p?;
                let adoptable = p.adoptable;
                let manifest = manifest_of(p);
                if !(adoptable && self.adopt_as_view(dir, &manifest)?) {
                    fsutil::empty_dir(dir)?;
                }
                Ok(manifest)
            })
            .collect();
        if results.iter().any(Result::is_err) {
            let failed: Vec<Placed> = placed
                .into_iter()
                .zip(&results)
                .filter(|(_, r)| r.is_err())
                .map(|(p, _)| p)
                .collect();
            let kept: Vec<&Manifest> = results.iter().flatten().collect();
            self.take_back(&failed, &kept);
        }
        results
    }

    /// Remove the blobs that `placed` put into `blobs/`, except those `kept` manifests use.
    fn take_back(&self, placed: &[Placed], kept: &[&Manifest]) {
        let used: std::collections::HashSet<BlobDigest> = kept
            .iter()
            .flat_map(|m| m.entries.iter())
            .filter_map(|e| match e.kind {
                EntryKind::File { blob, .. } => Some(blob),
                EntryKind::Dir => None,
            })
            .collect();
        for p in placed {
            for blob in p.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                if !used.contains(blob) {
                    let _ = fs::remove_file(self.blob_path(blob));
                    (self.verified_blobs.lock())
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(blob);
                }
            }
        }
    }

    /// Turn an absorbed directory whose files are all hardlinks to their blobs into the
    /// artifact's view, and leave an empty directory in its place. This saves building the
    /// view again (a directory, a link per file, a rename) when a later step reads the output,
    /// which for short steps is a good part of their cost. False when a view exists already.
    fn adopt_as_view(&self, dir: &Path, manifest: &Manifest) -> Result<bool, StoreError> {
        let artifact = manifest.digest();
        let dest = self.root.join("views").join(artifact.hex());
        if self.knows_view(&artifact) {
            return Ok(false);
        }
        // No look first: renaming onto an existing view (a non-empty directory) fails, and
        // onto an empty one (the empty artifact) replaces it with its equal.
        self.fault_point("absorb.adopt-view")
            .and_then(|()| fs::set_permissions(dir, Permissions::from_mode(0o555)))
            .and_then(|()| set_store_time(dir))
            .map_err(StoreError::io("make read-only", dir))?;
        if let Err(e) = fs::rename(dir, &dest) {
            let _ = fs::set_permissions(dir, Permissions::from_mode(0o755));
            if fsutil::exists(&dest)? {
                return Ok(false);
            }
            return Err(StoreError::io("move into place", dir)(e));
        }
        fs::create_dir(dir).map_err(StoreError::io("create directory", dir))?;
        self.note_view(artifact);
        Ok(true)
    }

    /// Walk, hash and make read-only everything under `dir`; move nothing yet (symlinked files
    /// are copied in, durably).
    fn prepare_dir(&self, dir: &Path, placed: &Placed) -> Result<Prepared, StoreError> {
        let mut walked = Vec::new();
        walk(dir, "", &mut walked)?;
        // Symlinks first: one may point at a file of this very tree, which is about to move.
        let links: Vec<&Walked> = walked
            .iter()
            .filter(|w| matches!(w.kind, WalkKind::Link))
            .collect();
        let files: Vec<&Walked> = walked
            .iter()
            .filter(|w| matches!(w.kind, WalkKind::File))
            .collect();
        let mut links = self.absorb_all(&links, placed)?.into_iter();
        let mut files = self.absorb_all(&files, placed)?.into_iter();
        let absorbed: Vec<Absorbed> = walked
            .iter()
            .filter_map(|w| match w.kind {
                WalkKind::Link => links.next(),
                WalkKind::File => files.next(),
                WalkKind::EmptyDir => None,
            })
            .collect();
        // Flat trees of new, non-executable regular files can become their view as they are.
        let adoptable = walked
            .iter()
            .all(|w| matches!(w.kind, WalkKind::File) && !w.rel.contains('/'))
            && absorbed
                .iter()
                .all(|a| a.pending.is_some() && !a.executable);
        Ok(Prepared {
            walked,
            files: absorbed,
            adoptable,
        })
    }

    /// Put the (now durable) pending files of `dir` into `blobs/`: renamed, or hardlinked when
    /// the directory is to become the artifact's view.
    fn place_pending(&self, dir: &mut Prepared, placed: &Placed) -> Result<(), StoreError> {
        for a in &mut dir.files {
            let Some(src) = a.pending.take() else {
                continue;
            };
            self.ensure_fanout(&a.blob)?;
            let dest = self.blob_path(&a.blob);
            if dir.adoptable {
                match self
                    .fault_point("absorb.link")
                    .and_then(|()| fs::hard_link(&src, &dest))
                {
                    Ok(()) => {
                        placed.push(a.blob);
                        self.mark_verified(a.blob);
                        continue;
                    }
                    // Something is there: placed meanwhile by another absorb (the same bytes),
                    // or a file found not to hold them (see `holds_blob`). Either way ours
                    // goes in by the rename below, and this tree cannot be the view.
                    Err(_) => dir.adoptable = false,
                }
            }
            self.fault_point("absorb.rename")
                .and_then(|()| fs::rename(&src, &dest))
                .map_err(StoreError::io("move into the store", &src))?;
            placed.push(a.blob);
            self.mark_verified(a.blob);
        }
        Ok(())
    }

    pub(super) fn absorb_file_copy_inner(&self, path: &Path) -> Result<BlobDigest, StoreError> {
        let a = self.copy_in(path, &mut Vec::new(), &Placed::default())?;
        // The rename, and the fan-out dir it may have needed, durable before any record.
        self.sync_blobs("absorb.sync-placed")?;
        Ok(a.blob)
    }

    /// `syncfs` of the store's filesystem, through the fault point `point`.
    fn sync_blobs(&self, point: &'static str) -> Result<(), StoreError> {
        let blobs = self.root.join("blobs");
        self.fault_point(point)
            .map_err(StoreError::io("sync the filesystem of", &blobs))?;
        fsutil::syncfs(&blobs)
    }

    /// Make sure the fan-out dir of `blob` exists before a blob is renamed into it. Not
    /// fsynced here: every absorb ends with a `syncfs`, which makes the directory durable
    /// along with the blobs in it before any record can point at them.
    fn ensure_fanout(&self, blob: &BlobDigest) -> Result<(), StoreError> {
        let b = blob.as_bytes()[0];
        if self.fanout.is_known(b) {
            return Ok(());
        }
        let _guard = self.fanout_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.fanout.is_known(b) {
            let dir = self.root.join("blobs").join(format!("{b:02x}"));
            self.fault_point("absorb.fan-out-dir")
                .map_err(StoreError::io("create directory", &dir))?;
            fsutil::ensure_dir(&dir)?;
            self.fanout.set_known(b);
        }
        Ok(())
    }

    /// Prepare `files`, on several threads when there are several; results in the order of
    /// `files`.
    fn absorb_all(&self, files: &[&Walked], placed: &Placed) -> Result<Vec<Absorbed>, StoreError> {
        if files.len() < 2 {
            let mut buf = Vec::new();
            return files
                .iter()
                .map(|w| self.prepare_one(w, &mut buf, placed))
                .collect();
        }
        let threads = THREADS.min(files.len());
        let next = AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let mut results: Vec<(usize, Result<Absorbed, StoreError>)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut buf = Vec::new();
                        let mut out = Vec::new();
                        while !failed.load(Ordering::Relaxed) {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(w) = files.get(i) else { break };
                            let r = self.prepare_one(w, &mut buf, placed);
                            if r.is_err() {
                                failed.store(true, Ordering::Relaxed);
                            }
                            out.push((i, r));
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("absorb worker panicked"))
                .collect()
        });
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// Hash one file and make it read-only; a file whose blob exists is left for removal with
    /// its directory.
    fn prepare_one(
        &self,
        w: &Walked,
        buf: &mut Vec<u8>,
        placed: &Placed,
    ) -> Result<Absorbed, StoreError> {
        if let WalkKind::Link = w.kind {
            return self.copy_in(&w.path, buf, placed);
        }
        let path = &w.path;
        let (file, meta, hashed) = self.open_hashed(path, buf)?;
        if hashed.pending.is_none() {
            return Ok(hashed);
        }
        if meta.nlink() > 1 {
            // Its inode is shared with a file elsewhere: renaming it in would let writes
            // through that other name change the blob.
            let a = self.copy_in(path, buf, placed)?;
            return Ok(Absorbed {
                executable: hashed.executable,
                ..a
            });
        }
        // Read-only, and the store's time: a later write to the blob shows (see `guard.rs`).
        self.fault_point("absorb.make-read-only")
            .and_then(|()| file.set_permissions(Permissions::from_mode(0o444)))
            .and_then(|()| file.set_modified(store_time()))
            .map_err(StoreError::io("make read-only", path))?;
        Ok(hashed)
    }

    /// Open and hash a regular file. The result's `pending` is `None` when its blob is in the
    /// store already, else the path itself (nothing is moved yet).
    fn open_hashed(
        &self,
        path: &Path,
        buf: &mut Vec<u8>,
    ) -> Result<(File, fs::Metadata, Absorbed), StoreError> {
        let file = File::open(path).map_err(StoreError::io("open", path))?;
        let meta = file.metadata().map_err(StoreError::io("inspect", path))?;
        if !meta.is_file() {
            return Err(StoreError::Unsupported {
                path: path.to_path_buf(),
                kind: kind_of(&meta),
            });
        }
        let executable = meta.mode() & 0o111 != 0;
        let (blob, size) = hash(&file, path, meta.len(), buf)?;
        let known = self.holds_blob(&blob, size)?;
        let absorbed = Absorbed {
            blob,
            size,
            executable,
            pending: (!known).then(|| path.to_path_buf()),
        };
        Ok((file, meta, absorbed))
    }

    /// Whether `blobs/` holds `blob` whole, so that an absorb may use it instead of placing the
    /// bytes again. A file there is trusted once this process has placed it or hashed it:
    /// one that looks as the store leaves a blob (its size, the store's time) may still have
    /// been put there by hand, with other bytes, and would stand in for the fresh output for
    /// good. One that does not hash to its name is reported and left for the caller to
    /// replace with the bytes it is absorbing — a repair, since views linking the bad file
    /// are removed too.
    fn holds_blob(&self, blob: &BlobDigest, size: u64) -> Result<bool, StoreError> {
        let state = self.blob_state(blob, size)?;
        if state == BlobState::Missing {
            return Ok(false);
        }
        if state == BlobState::Intact
            && (self.is_verified(blob) || super::guard::hash_file(&self.blob_path(blob))? == *blob)
        {
            self.mark_verified(*blob);
            return Ok(true);
        }
        tracing::warn!(
            "`{}` does not hold the bytes it is named after; replacing it",
            self.blob_path(blob).display()
        );
        for artifact in self.artifacts_holding(blob)? {
            self.remove_view(&artifact)?;
        }
        Ok(false)
    }

    fn is_verified(&self, blob: &BlobDigest) -> bool {
        (self.verified_blobs.lock())
            .unwrap_or_else(|e| e.into_inner())
            .contains(blob)
    }

    fn mark_verified(&self, blob: BlobDigest) {
        (self.verified_blobs.lock())
            .unwrap_or_else(|e| e.into_inner())
            .insert(blob);
    }

    /// Copy `src` (following symlinks) into `blobs/` unless its bytes are there already.
    /// Hashes first, so a file the store holds costs one read and no write.
    fn copy_in(
        &self,
        src: &Path,
        buf: &mut Vec<u8>,
        placed: &Placed,
    ) -> Result<Absorbed, StoreError> {
        let (file, _, hashed) = self.open_hashed(src, buf)?;
        if hashed.pending.is_none() {
            return Ok(hashed);
        }
        let executable = hashed.executable;

        let tmp = self.root.join("staging").join(self.tmp_name());
        let mut guard = RemoveOnDrop(Some(tmp.clone()));
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(StoreError::io("create", &tmp))?;
        // Hash what is written: if `src` changed since the first pass, the blob is still
        // named by the bytes it holds.
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut reader: &File = &file;
        io::Seek::rewind(&mut reader).map_err(StoreError::io("read", src))?;
        loop {
            let n = match reader.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StoreError::io("read", src)(e)),
            };
            hasher.update(&buf[..n]);
            self.fault_point("absorb.copy")
                .and_then(|()| out.write_all(&buf[..n]))
                .map_err(StoreError::io("write", &tmp))?;
            size += n as u64;
        }
        out.set_permissions(Permissions::from_mode(0o444))
            .and_then(|()| out.set_modified(store_time()))
            .and_then(|()| out.sync_all())
            .map_err(StoreError::io("make durable", &tmp))?;
        drop(out);
        let blob = BlobDigest::from_hasher(&hasher);
        let dest = self.blob_path(&blob);
        if self.holds_blob(&blob, size)? {
            return Ok(Absorbed {
                blob,
                size,
                executable,
                pending: None,
            });
        }
        self.ensure_fanout(&blob)?;
        self.fault_point("absorb.rename")
            .and_then(|()| fs::rename(&tmp, &dest))
            .map_err(StoreError::io("move into the store", &tmp))?;
        guard.0 = None;
        placed.push(blob);
        self.mark_verified(blob);
        Ok(Absorbed {
            blob,
            size,
            executable,
            pending: None,
        })
    }
}

/// The manifest of a prepared (and placed) directory: entries sorted by path.
fn manifest_of(p: Prepared) -> Manifest {
    let mut absorbed = p.files.into_iter();
    let mut entries: Vec<ManifestEntry> = p
        .walked
        .into_iter()
        .map(|w| {
            let kind = match w.kind {
                WalkKind::EmptyDir => EntryKind::Dir,
                WalkKind::File | WalkKind::Link => {
                    let a = absorbed.next().expect("one result per file");
                    EntryKind::File {
                        blob: a.blob,
                        size: a.size,
                        executable: a.executable,
                    }
                }
            };
            ManifestEntry { path: w.rel, kind }
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Manifest { entries }
}

/// Make `buf` large enough to read a `len`-byte file in one call, up to [`BUF_LEN`].
fn grow(buf: &mut Vec<u8>, len: u64) {
    let want = usize::try_from(len.saturating_add(1))
        .unwrap_or(BUF_LEN)
        .clamp(8 << 10, BUF_LEN);
    if buf.len() < want {
        buf.resize(want, 0);
    }
}

/// Which fan-out dirs (`blobs/00` … `blobs/ff`) are known to exist: one bit each.
#[derive(Default)]
pub(crate) struct Fanout([AtomicU64; 4]);

impl Fanout {
    fn is_known(&self, b: u8) -> bool {
        self.0[usize::from(b >> 6)].load(Ordering::Acquire) & (1 << (b & 63)) != 0
    }

    pub(crate) fn set_known(&self, b: u8) {
        self.0[usize::from(b >> 6)].fetch_or(1 << (b & 63), Ordering::Release);
    }
}

/// The blobs one directory's absorb has put into `blobs/` (its files are hashed on several
/// threads).
#[derive(Default)]
struct Placed(std::sync::Mutex<Vec<BlobDigest>>);

impl Placed {
    fn push(&self, blob: BlobDigest) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(blob);
    }
}

/// Removes a temporary file unless disarmed (its path taken).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Plain BLAKE3 of what `file` holds from its current position, and its length. `len_hint`
/// (the size from `fstat`) sizes the buffer: a tiny file reads in one call, into little.
fn hash(
    mut file: &File,
    path: &Path,
    len_hint: u64,
    buf: &mut Vec<u8>,
) -> Result<(BlobDigest, u64), StoreError> {
    grow(buf, len_hint);
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("read", path)(e)),
        }
    }
    Ok((BlobDigest::from_hasher(&hasher), size))
}

/// Walk `dir` depth first in name order; check everything, move nothing.
fn walk(dir: &Path, rel: &str, out: &mut Vec<Walked>) -> Result<(), StoreError> {
    let mut entries = fs::read_dir(dir)
        .map_err(StoreError::io("list", dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::io("list", dir))?;
    if entries.is_empty() && !rel.is_empty() {
        out.push(Walked {
            rel: rel.to_string(),
            path: dir.to_path_buf(),
            kind: WalkKind::EmptyDir,
        });
        return Ok(());
    }
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(StoreError::NonUtf8Path { path });
        };
        let child_rel = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let ty = entry
            .file_type()
            .map_err(StoreError::io("inspect", &path))?;
        let kind = if ty.is_file() {
            WalkKind::File
        } else if ty.is_dir() {
            walk(&path, &child_rel, out)?;
            continue;
        } else if ty.is_symlink() {
            match fs::metadata(&path) {
                Ok(m) if m.is_file() => WalkKind::Link,
                Ok(m) if m.is_dir() => return unsupported(path, "symlink to a directory"),
                Ok(_) => return unsupported(path, "symlink to a special file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return unsupported(path, "dangling symlink");
                }
                Err(e) => return Err(StoreError::io("follow symlink", &path)(e)),
            }
        } else if ty.is_fifo() {
            return unsupported(path, "fifo");
        } else if ty.is_socket() {
            return unsupported(path, "socket");
        } else {
            return unsupported(path, "device");
        };
        out.push(Walked {
            rel: child_rel,
            path,
            kind,
        });
    }
    Ok(())
}

/// What a non-regular file is, for [`StoreError::Unsupported`].
fn kind_of(meta: &fs::Metadata) -> &'static str {
    let ty = meta.file_type();
    if ty.is_dir() {
        "directory where a file was expected"
    } else if ty.is_fifo() {
        "fifo"
    } else if ty.is_socket() {
        "socket"
    } else if ty.is_symlink() {
        "symlink"
    } else {
        "device"
    }
}

fn unsupported<T>(path: PathBuf, kind: &'static str) -> Result<T, StoreError> {
    Err(StoreError::Unsupported { path, kind })
}
