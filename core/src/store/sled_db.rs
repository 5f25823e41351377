//! The store's handle on its metadata database: a flush that cannot wait forever, and a close
//! that cannot panic, when sled's own writes fail (`EIO`, `ENOSPC`; `tests/e2e/sled_faults.rs`
//! fails each of them in turn).
//!
//! - **Flush.** When a log write that sled 0.34 hands to its thread pool fails there
//!   (`pagecache/logger.rs`), sled records the error but wakes no thread already waiting in
//!   `flush` for that write to become stable: the wait never ends (1 run in 5 at that write hung
//!   until killed). A later flush that finds the error wakes them all. So a watcher thread
//!   flushes too when a flush has waited [`NUDGE_AFTER`]: where sled has failed, that ends the
//!   wait with sled's error; where the disk is only slow, it waits with it.
//! - **Close.** sled syncs its file as its last handle is dropped and unwraps the result
//!   (`Log::drop`): on a disk that fails that one `fsync`, a process that had committed
//!   everything would panic on its way out (exit 101). Dropping [`Sled`] closes sled with that
//!   panic caught and kept quiet, and keeps what it said for [`close_failure`], so that the
//!   command ends saying the store failed (exit 3). What was committed is not at stake: every
//!   change is in the journal, fsynced before sled saw it; the next open applies whatever sled
//!   lacks (see `journal.rs`).

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use super::StoreError;

/// How long a flush waits before the watcher flushes beside it.
const NUDGE_AFTER: Duration = Duration::from_millis(100);

/// The store's metadata database (see the module's doc). Derefs to `sled::Db`; its own
/// [`Sled::flush`] is the one to call.
pub(crate) struct Sled {
    db: Option<sled::Db>,
    flushes: Arc<Flushes>,
    watcher: Option<std::thread::JoinHandle<()>>,
    /// Its directory (`meta/`, or a rebuild's `meta.rebuild-<pid>/`), for the error.
    path: PathBuf,
}

/// The flushes begun and ended, and whether the store is closing; shared with the watcher.
#[derive(Default)]
struct Flushes {
    started: AtomicU64,
    finished: AtomicU64,
    closing: Mutex<bool>,
    closed: Condvar,
}

impl Sled {
    pub(crate) fn new(db: sled::Db, path: PathBuf) -> Sled {
        let flushes = Arc::new(Flushes::default());
        let watcher = {
            let (db, flushes) = (db.clone(), flushes.clone());
            std::thread::Builder::new()
                .name("needle-sled-watch".into())
                .spawn(move || watch(&db, &flushes))
                .ok()
        };
        Sled {
            db: Some(db),
            flushes,
            watcher,
            path,
        }
    }

    /// sled's flush, ended with sled's error where sled has failed (see the module's doc).
    pub(crate) fn flush(&self) -> sled::Result<usize> {
        self.flushes.started.fetch_add(1, Ordering::SeqCst);
        let flushed = self.db().flush();
        self.flushes.finished.fetch_add(1, Ordering::SeqCst);
        flushed
    }

    fn db(&self) -> &sled::Db {
        self.db.as_ref().expect("taken only as it is dropped")
    }
}

/// The watcher: every [`NUDGE_AFTER`], when a flush was in progress at its last look and none
/// has ended since, it flushes too. A flush costs two counter increments; the watcher wakes
/// ten times a second while the store is open.
fn watch(db: &sled::Db, flushes: &Flushes) {
    let mut closing = flushes.closing.lock().unwrap_or_else(|e| e.into_inner());
    let (mut started, mut finished) = (0, 0);
    loop {
        closing = flushes
            .closed
            .wait_timeout(closing, NUDGE_AFTER)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if *closing {
            return;
        }
        let now_finished = flushes.finished.load(Ordering::SeqCst);
        if started > finished && now_finished == finished {
            drop(closing);
            // Its result is the waiting flush's to report.
            let _ = db.flush();
            closing = flushes.closing.lock().unwrap_or_else(|e| e.into_inner());
        }
        started = flushes.started.load(Ordering::SeqCst);
        finished = flushes.finished.load(Ordering::SeqCst);
    }
}

impl std::ops::Deref for Sled {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        self.db()
    }
}

impl Drop for Sled {
    fn drop(&mut self) {
        *self
            .flushes
            .closing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        self.flushes.closed.notify_all();
        // The watcher's handle goes first: ours must be the last, the one that closes sled.
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
        let Some(db) = self.db.take() else {
            return;
        };
        quiet_panics();
        CLOSING.set(true);
        let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(db)));
        CLOSING.set(false);
        if let Err(panic) = closed {
            let what = panic_message(panic.as_ref()).to_string();
            let mut failed = CLOSE_FAILED.lock().unwrap_or_else(|e| e.into_inner());
            failed.get_or_insert(StoreError::CloseFailed {
                path: self.path.clone(),
                what,
            });
        }
    }
}

/// What a panic of sled's said (its payload is a `String` or a `&str` when it said anything).
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

/// The first failure of sled as a store of this process was closed, taken: a command that
/// ends after its store is closed reports it (the store is unavailable: exit 3).
pub fn close_failure() -> Option<StoreError> {
    CLOSE_FAILED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

static CLOSE_FAILED: Mutex<Option<StoreError>> = Mutex::new(None);

thread_local! {
    /// This thread is closing sled: a panic is sled's, caught and reported as an error.
    static CLOSING: Cell<bool> = const { Cell::new(false) };
}

/// Make the panic hook say nothing of a panic caught while closing sled; every other panic is
/// reported by the hook that was there before.
fn quiet_panics() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CLOSING.get() {
                before(info);
            }
        }));
    });
}
