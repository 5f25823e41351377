//! Moving steps between a store and the remote.
//!
//! Pull, for each step: its record (whose spec must hash to its key, and whose output must be
//! the name it is listed under), its manifest (which must hash to that output), then the
//! blobs the store lacks, each downloaded into a staging directory of the store and absorbed
//! there, which hashes it: a blob that is not what its name says fails the step and nothing of
//! it is committed. Only whole steps are committed, in batches. A transfer cut short leaves a
//! staging directory (removed when the store next opens) and nothing recorded: pulling again
//! starts that step over.
//!
//! Push, for each step: every blob the remote lacks (hashed on the way, so a blob damaged on
//! this disk is not spread), then the manifest, then the record, each created only if absent.
//! A push cut short leaves blobs and perhaps a manifest that no record names yet; pushing
//! again finds them there and writes what is missing.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use needle_core::digest::{ArtifactDigest, BlobDigest, StepKey};
use needle_core::store::{
    EntryKind, Manifest, StepCommit, StepRecord, Store, StoreError, StoreRead, human_bytes,
};

use super::{Remote, RemoteError, RemoteIndex};

/// Steps, and blobs within a step, transferred at once.
const STEPS_AT_ONCE: usize = 8;
const BLOBS_AT_ONCE: usize = 8;
/// Pulled steps committed in one transaction.
const COMMIT_BATCH: usize = 256;
/// Blobs larger than this go up in parts, never whole in memory.
const MULTIPART_ABOVE: u64 = 64 << 20;
const PART_SIZE: usize = 16 << 20;
/// A long transfer says how far it got this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Objects and bytes moved so far, and a progress line on stderr every few seconds while a
/// transfer lasts.
pub struct Transfer {
    verb: &'static str,
    objects: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    last_line: Mutex<Instant>,
    quiet: AtomicBool,
}

impl Transfer {
    /// `verb`: `pulled` or `pushed`. `quiet`: no progress lines (a background upload, whose
    /// lines would cut through the run's display).
    pub fn new(verb: &'static str, quiet: bool) -> Transfer {
        let now = Instant::now();
        Transfer {
            verb,
            objects: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: now,
            last_line: Mutex::new(now),
            quiet: AtomicBool::new(quiet),
        }
    }

    /// Print progress lines from now on (a run that waits for its uploads).
    fn speak(&self) {
        self.quiet.store(false, Ordering::Relaxed);
    }

    fn add(&self, bytes: u64) {
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.quiet.load(Ordering::Relaxed) {
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= PROGRESS_EVERY {
            *last = Instant::now();
            eprintln!("  remote: {} so far", self.summary());
        }
    }

    pub fn objects(&self) -> u64 {
        self.objects.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// `pulled 40 objects · 12.0 MiB in 1.2 s (10.0 MiB/s)`.
    pub fn summary(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            format!(" ({}/s)", human_bytes((self.bytes() as f64 / secs) as u64))
        } else {
            String::new()
        };
        format!(
            "{} {} objects · {} in {secs:.1} s{rate}",
            self.verb,
            self.objects(),
            human_bytes(self.bytes())
        )
    }
}

/// What a pull did.
#[derive(Debug, Default)]
pub struct Pulled {
    pub steps: Vec<StepKey>,
    /// Steps not pulled, and why (damaged or missing objects, or the remote down).
    pub failed: Vec<(StepKey, RemoteError)>,
}

/// Fetch `steps` (key, output as the remote index lists it) into `store`, verified, and
/// commit them. A step that fails is reported and left out; the others are committed.
pub async fn pull_steps(
    remote: &Remote,
    store: &Store,
    steps: &[(StepKey, ArtifactDigest)],
    transfer: &Transfer,
) -> Pulled {
    let mut pulled = Pulled::default();
    let mut batch: Vec<StepCommit> = Vec::new();
    let mut fetches = futures::stream::iter(steps.iter().copied())
        .map(|(key, output)| async move {
            (key, fetch_step(remote, store, key, output, transfer).await)
        })
        .buffer_unordered(STEPS_AT_ONCE);
    while let Some((key, result)) = fetches.next().await {
        match result {
            Ok(commit) => batch.push(commit),
            Err(e) => pulled.failed.push((key, e)),
        }
        if batch.len() >= COMMIT_BATCH {
            commit_batch(store, &mut batch, &mut pulled);
        }
    }
    commit_batch(store, &mut batch, &mut pulled);
    pulled
}

fn commit_batch(store: &Store, batch: &mut Vec<StepCommit>, pulled: &mut Pulled) {
    if batch.is_empty() {
        return;
    }
    let commits = std::mem::take(batch);
    match store.commit(&commits) {
        Ok(()) => pulled.steps.extend(commits.iter().map(|c| c.record.key)),
        Err(e) => {
            for c in &commits {
                pulled.failed.push((
                    c.record.key,
                    local_error(format!("could not commit it: {e}")),
                ));
            }
        }
    }
}

/// One step's record, manifest and missing blobs, checked against their names.
async fn fetch_step(
    remote: &Remote,
    store: &Store,
    key: StepKey,
    output: ArtifactDigest,
    transfer: &Transfer,
) -> Result<StepCommit, RemoteError> {
    let record_path = remote.step_path(&key, &output);
    let bytes = get_bytes(remote, &record_path, transfer).await?;
    let mut record: StepRecord = parse(remote, &record_path, &bytes)?;
    let spec_key = record.spec.key();
    if record.key != key || spec_key != key || record.output != output {
        return Err(damaged(
            remote,
            &record_path,
            format!(
                "it records step {} (spec hashing to {}) with output {}",
                record.key.short(),
                spec_key.short(),
                record.output.short()
            ),
        ));
    }
    let manifest = fetch_manifest(remote, &output, transfer).await?;
    // The step's code files too: `verify` expects every recorded step's code in the store.
    let code = record.spec.code.values().map(|b| (*b, None));
    let mut seen = HashSet::new();
    let missing: Vec<(BlobDigest, Option<u64>)> = (blobs_of(&manifest).into_iter())
        .map(|(b, size)| (b, Some(size)))
        .chain(code)
        .filter(|(b, _)| seen.insert(*b) && !store.blob_path(b).exists())
        .collect();
    if !missing.is_empty() {
        let dir = store.new_staging()?;
        let fetched = fetch_blobs(remote, store, &dir, &missing, transfer).await;
        // Emptied by a successful absorb; whatever a failure left goes with it.
        let _ = std::fs::remove_dir_all(&dir);
        fetched?;
    }
    // Logs stay on the machine that ran the step.
    for e in &mut record.executions {
        e.log.clear();
    }
    record.fetched_from = Some(remote.url.clone());
    Ok(StepCommit { record, manifest })
}

async fn fetch_manifest(
    remote: &Remote,
    artifact: &ArtifactDigest,
    transfer: &Transfer,
) -> Result<Manifest, RemoteError> {
    let path = remote.artifact_path(artifact);
    let bytes = get_bytes(remote, &path, transfer).await?;
    let manifest: Manifest = parse(remote, &path, &bytes)?;
    let digest = manifest.digest();
    if digest != *artifact {
        return Err(damaged(
            remote,
            &path,
            format!("it hashes to {}", digest.short()),
        ));
    }
    Ok(manifest)
}

/// Download `blobs` into `dir`, each under its hex name, then absorb them: the absorb hashes
/// each one, and a blob whose bytes hash to another name is damage (its bytes then lie in the
/// store under their own digest, which no record names: harmless, and gc removes them).
async fn fetch_blobs(
    remote: &Remote,
    store: &Store,
    dir: &Path,
    blobs: &[(BlobDigest, Option<u64>)],
    transfer: &Transfer,
) -> Result<(), RemoteError> {
    futures::stream::iter(blobs.iter())
        .map(|(blob, size)| {
            download(
                remote,
                remote.blob_path(blob),
                dir.join(blob.hex()),
                *size,
                transfer,
            )
        })
        .buffer_unordered(BLOBS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
    let absorbed = store.absorb_dir(dir)?;
    for entry in &absorbed.entries {
        if let EntryKind::File { blob, .. } = &entry.kind
            && blob.hex() != entry.path
        {
            let path = remote.under(super::Kind::Blob, &entry.path);
            return Err(damaged(
                remote,
                &path,
                format!("its bytes hash to {}", blob.short()),
            ));
        }
    }
    Ok(())
}

/// Stream one object into the file `to`, checking its size where it is known.
async fn download(
    remote: &Remote,
    from: ObjectPath,
    to: std::path::PathBuf,
    size: Option<u64>,
    transfer: &Transfer,
) -> Result<(), RemoteError> {
    let (from, to) = (&from, to.as_path());
    let got = remote
        .store
        .get(from)
        .await
        .map_err(|e| not_found_or(remote, from, e))?;
    let mut stream = got.into_stream();
    let io_err = |source| RemoteError::Io {
        context: format!("could not write `{}`", to.display()),
        source,
    };
    let mut file = std::fs::File::create(to).map_err(io_err)?;
    let mut written = 0u64;
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(remote.request_error(format!("download `{}`", remote.show(from))))?
    {
        written += chunk.len() as u64;
        file.write_all(&chunk).map_err(io_err)?;
    }
    if let Some(size) = size
        && written != size
    {
        return Err(damaged(
            remote,
            from,
            format!("it holds {written} bytes, its manifest says {size}"),
        ));
    }
    transfer.add(written);
    Ok(())
}

async fn get_bytes(
    remote: &Remote,
    path: &ObjectPath,
    transfer: &Transfer,
) -> Result<Bytes, RemoteError> {
    let got = remote
        .store
        .get(path)
        .await
        .map_err(|e| not_found_or(remote, path, e))?;
    let bytes = got
        .bytes()
        .await
        .map_err(remote.request_error(format!("download `{}`", remote.show(path))))?;
    transfer.add(bytes.len() as u64);
    Ok(bytes)
}

fn parse<T: serde::de::DeserializeOwned>(
    remote: &Remote,
    path: &ObjectPath,
    bytes: &[u8],
) -> Result<T, RemoteError> {
    serde_json::from_slice(bytes).map_err(|e| damaged(remote, path, format!("unreadable: {e}")))
}

fn damaged(remote: &Remote, path: &ObjectPath, problem: String) -> RemoteError {
    RemoteError::Damaged {
        object: remote.show(path),
        problem,
    }
}

fn not_found_or(remote: &Remote, path: &ObjectPath, e: object_store::Error) -> RemoteError {
    match e {
        object_store::Error::NotFound { .. } => RemoteError::Missing {
            object: remote.show(path),
        },
        e => remote.request_error(format!("download `{}`", remote.show(path)))(e),
    }
}

/// A manifest's distinct blobs, with their sizes.
pub(super) fn blobs_of(manifest: &Manifest) -> Vec<(BlobDigest, u64)> {
    let mut seen = HashSet::new();
    manifest
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File { blob, size, .. } => seen.insert(*blob).then_some((*blob, *size)),
            EntryKind::Dir => None,
        })
        .collect()
}

/// What a push did.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Records written by this push.
    pub written: usize,
    /// Steps the remote already had.
    pub present: usize,
    pub failed: Vec<(StepKey, RemoteError)>,
}

impl Pushed {
    fn add(&mut self, key: StepKey, result: Result<bool, RemoteError>) {
        match result {
            Ok(true) => self.written += 1,
            Ok(false) => self.present += 1,
            Err(e) => self.failed.push((key, e)),
        }
    }
}

/// Upload `keys` (steps of `store`); `known`: what the remote held when listed, skipped.
pub async fn push_steps(
    remote: &Remote,
    store: &dyn StoreRead,
    keys: &[StepKey],
    known: &RemoteIndex,
    transfer: &Transfer,
) -> Pushed {
    let mut pushed = Pushed::default();
    let mut uploads = futures::stream::iter(keys.iter().copied())
        .map(|key| async move { (key, push_step(remote, store, key, known, transfer).await) })
        .buffer_unordered(STEPS_AT_ONCE);
    while let Some((key, result)) = uploads.next().await {
        pushed.add(key, result);
    }
    pushed
}

/// Upload one step: its blobs, then its manifest, then its record. False: the remote had it.
async fn push_step(
    remote: &Remote,
    store: &dyn StoreRead,
    key: StepKey,
    known: &RemoteIndex,
    transfer: &Transfer,
) -> Result<bool, RemoteError> {
    let record = store
        .step(&key)?
        .ok_or_else(|| local_error(format!("step {} is not in the store", key.short())))?;
    if known.output(&key) == Some(record.output) {
        return Ok(false);
    }
    let manifest = store.manifest(&record.output)?.ok_or_else(|| {
        local_error(format!(
            "the manifest of {} (output of step {}) is missing",
            record.output.short(),
            key.short()
        ))
    })?;
    // The step's code files go too (a pull keeps them, as `verify` expects); one missing
    // here is `verify`'s to report, not a reason to hold the step back.
    let code = (record.spec.code.values())
        .filter_map(|b| Some((*b, std::fs::metadata(store.blob_path(b)).ok()?.len())));
    let mut seen = HashSet::new();
    let blobs: Vec<(BlobDigest, u64)> = (blobs_of(&manifest).into_iter())
        .chain(code)
        .filter(|(b, _)| seen.insert(*b))
        .collect();
    futures::stream::iter(blobs)
        .map(|(blob, size)| upload_blob(remote, store, blob, size, transfer))
        .buffer_unordered(BLOBS_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await?;
    let manifest_json = serde_json::to_vec(&manifest).expect("a manifest serialises");
    create(
        remote,
        &remote.artifact_path(&record.output),
        manifest_json,
        transfer,
    )
    .await?;
    let record_json = serde_json::to_vec(&record).expect("a record serialises");
    create(
        remote,
        &remote.step_path(&key, &record.output),
        record_json,
        transfer,
    )
    .await
}

/// Create `path` holding `bytes` unless it exists; whether this call created it.
async fn create(
    remote: &Remote,
    path: &ObjectPath,
    bytes: Vec<u8>,
    transfer: &Transfer,
) -> Result<bool, RemoteError> {
    let len = bytes.len() as u64;
    let opts = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    match remote
        .store
        .put_opts(path, PutPayload::from(bytes), opts)
        .await
    {
        Ok(_) => {
            transfer.add(len);
            Ok(true)
        }
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(remote
            .request_error(format!("upload `{}`", remote.show(path)))(
            e
        )),
    }
}

/// Upload one blob unless the remote holds it at its size. A remote copy of another size is
/// damaged: it is replaced (by the bytes its name promises, so no writer can lose by that).
async fn upload_blob(
    remote: &Remote,
    store: &dyn StoreRead,
    blob: BlobDigest,
    size: u64,
    transfer: &Transfer,
) -> Result<(), RemoteError> {
    let path = remote.blob_path(&blob);
    let mode = match remote.store.head(&path).await {
        Ok(meta) if meta.size == size => return Ok(()),
        Ok(_) => PutMode::Overwrite,
        Err(object_store::Error::NotFound { .. }) => PutMode::Create,
        Err(e) => {
            return Err(remote
                .request_error(format!("look up `{}`", remote.show(&path)))(
                e
            ));
        }
    };
    let local = store.blob_path(&blob);
    let result = if size > MULTIPART_ABOVE {
        upload_parts(remote, &path, &local, blob).await
    } else {
        let bytes = read_checked(&local, blob)?;
        let opts = PutOptions {
            mode: mode.clone(),
            ..PutOptions::default()
        };
        remote
            .store
            .put_opts(&path, PutPayload::from(bytes), opts)
            .await
            .map(|_| ())
    };
    match result {
        Ok(()) | Err(object_store::Error::AlreadyExists { .. }) => {
            transfer.add(size);
            Ok(())
        }
        Err(e) => Err(remote
            .request_error(format!("upload `{}`", remote.show(&path)))(
            e
        )),
    }
}

/// A local blob's bytes, refused if they no longer hash to its name.
fn read_checked(local: &Path, blob: BlobDigest) -> Result<Vec<u8>, RemoteError> {
    let bytes = std::fs::read(local).map_err(|source| RemoteError::Io {
        context: format!("could not read `{}`", local.display()),
        source,
    })?;
    if blake3::hash(&bytes).as_bytes() != blob.as_bytes() {
        return Err(damaged_local(local, blob));
    }
    Ok(bytes)
}

fn damaged_local(local: &Path, blob: BlobDigest) -> RemoteError {
    local_error(format!(
        "blob {} (`{}`) no longer hashes to its name: not uploaded (`needle verify --repair`)",
        blob.short(),
        local.display()
    ))
}

/// Something wrong in the local store.
fn local_error(what: String) -> RemoteError {
    RemoteError::Local(StoreError::Corrupt { what, source: None })
}

/// A large blob in parts: read and hashed part by part; aborted, so never visible, when its
/// bytes turn out not to hash to its name.
async fn upload_parts(
    remote: &Remote,
    path: &ObjectPath,
    local: &Path,
    blob: BlobDigest,
) -> Result<(), object_store::Error> {
    let mut file = std::fs::File::open(local).map_err(|e| object_store::Error::Generic {
        store: "local",
        source: Box::new(e),
    })?;
    let upload = remote.store.put_multipart(path).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; PART_SIZE];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(object_store::Error::Generic {
                    store: "local",
                    source: Box::new(e),
                });
            }
        };
        hasher.update(&buf[..n]);
        writer.wait_for_capacity(4).await?;
        writer.write(&buf[..n]);
    }
    if hasher.finalize().as_bytes() != blob.as_bytes() {
        let _ = writer.abort().await;
        return Err(object_store::Error::Generic {
            store: "local",
            source: Box::new(damaged_local(local, blob)),
        });
    }
    writer.finish().await.map(|_| ())
}

/// Uploads what a run commits, on a thread of its own, while the run goes on.
pub struct Uploader {
    tx: Option<tokio::sync::mpsc::UnboundedSender<StepKey>>,
    thread: std::thread::JoinHandle<Pushed>,
    transfer: Arc<Transfer>,
    /// Steps queued, and steps whose upload ended (either way).
    queued: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
}

impl Uploader {
    pub fn start(remote: Remote, store: Arc<Store>, known: RemoteIndex) -> Uploader {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<StepKey>();
        let transfer = Arc::new(Transfer::new("pushed", true));
        let t = transfer.clone();
        let ended = Arc::new(AtomicUsize::new(0));
        let ended_here = ended.clone();
        let thread = std::thread::Builder::new()
            .name("needle-upload".into())
            .spawn(move || {
                super::block_on(async move {
                    let keys = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
                    let mut pushed = Pushed::default();
                    let store: &dyn StoreRead = &*store;
                    let (remote, known, t) = (&remote, &known, &t);
                    let mut uploads =
                        keys.map(|key| async move {
                            (key, push_step(remote, store, key, known, t).await)
                        })
                        .buffer_unordered(STEPS_AT_ONCE);
                    while let Some((key, result)) = uploads.next().await {
                        pushed.add(key, result);
                        ended_here.fetch_add(1, Ordering::Relaxed);
                    }
                    pushed
                })
            })
            .expect("spawning the upload thread");
        Uploader {
            tx: Some(tx),
            thread,
            transfer,
            queued: Arc::new(AtomicUsize::new(0)),
            ended,
        }
    }

    /// A function handing a committed step to the uploader.
    pub fn sender(&self) -> impl Fn(StepKey) + Send + 'static {
        let tx = self.tx.clone().expect("the uploader is running");
        let queued = self.queued.clone();
        move |key| {
            if tx.send(key).is_ok() {
                queued.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queue `key`.
    pub fn send(&self, key: StepKey) {
        if let Some(tx) = &self.tx
            && tx.send(key).is_ok()
        {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wait for every queued upload, saying so when some are left; what they did.
    pub fn finish(mut self) -> (Pushed, Arc<Transfer>) {
        let left = (self.queued.load(Ordering::Relaxed))
            .saturating_sub(self.ended.load(Ordering::Relaxed));
        if left > 0 {
            eprintln!("  remote: finishing the upload of {left} step(s)…");
            self.transfer.speak();
        }
        self.tx = None;
        let pushed = self.thread.join().unwrap_or_default();
        (pushed, self.transfer)
    }
}
