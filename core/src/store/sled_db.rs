//! The store's handle on its metadata database: a flush that cannot wait forever, and a close
//! that cannot panic, when sled's own writes fail (`EIO`, `ENOSPC`; `tests/e2e/sled_faults.rs`
//! fails each of them in turn).
//!
//! - **Flush.** When a log write that sled 0.34 hands to its thread pool fails there
//!   (`pagecache/logger.rs`), sled records the error but wakes no thread already waiting in
//!   `flush` for that write to become stable: the wait never ends (1 run in 5 at that write hung
//!   until killed). A later flush that finds the error wakes them all. So while a flush is in
//!   progress, a watcher thread flushes too every [`NUDGE_AFTER`]: where sled has failed, that
//!   ends the wait with sled's error; where the disk is only slow, it waits with it.
//! - **Close.** sled syncs its file as its last handle is dropped and unwraps the result
//!   (`Log::drop`): on a disk that fails that one `fsync`, a process that had committed
//!   everything would panic on its way out (exit 101). Dropping [`Sled`] closes sled with that
//!   panic caught and kept quiet, and keeps what it said for [`close_failure`], so that the
//!   command ends saying the store failed (exit 3). What was committed is not at stake: every
//!   change is in the journal, fsynced before sled saw it; the next open applies whatever sled
//!   lacks (see `journal.rs`).

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
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
    /// The store it belongs to, for the error.
    root: PathBuf,
}

/// The flushes in progress, shared with the watcher.
#[derive(Default)]
struct Flushes {
    count: Mutex<Count>,
    changed: Condvar,
}

#[derive(Default)]
struct Count {
    started: u64,
    finished: u64,
    closing: bool,
}

impl Flushes {
    fn lock(&self) -> MutexGuard<'_, Count> {
        self.count.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Sled {
    pub(crate) fn new(db: sled::Db, root: PathBuf) -> Sled {
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
            root,
        }
    }

    /// sled's flush, ended with sled's error where sled has failed (see the module's doc).
    pub(crate) fn flush(&self) -> sled::Result<usize> {
        self.flushes.lock().started += 1;
        self.flushes.changed.notify_all();
        let flushed = self.db().flush();
        self.flushes.lock().finished += 1;
        flushed
    }

    fn db(&self) -> &sled::Db {
        self.db.as_ref().expect("taken only as it is dropped")
    }
}

/// The watcher: while a flush is in progress and none has finished for [`NUDGE_AFTER`],
/// flush beside it.
fn watch(db: &sled::Db, flushes: &Flushes) {
    let mut count = flushes.lock();
    while !count.closing {
        if count.started == count.finished {
            count = flushes
                .changed
                .wait(count)
                .unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let seen = count.finished;
        let (again, waited) = flushes
            .changed
            .wait_timeout(count, NUDGE_AFTER)
            .unwrap_or_else(|e| e.into_inner());
        count = again;
        if waited.timed_out() && count.finished == seen && !count.closing {
            drop(count);
            // Its result is the waiting flush's to report.
            let _ = db.flush();
            count = flushes.lock();
        }
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
        self.flushes.lock().closing = true;
        self.flushes.changed.notify_all();
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
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "no message".into());
            let mut failed = CLOSE_FAILED.lock().unwrap_or_else(|e| e.into_inner());
            failed.get_or_insert(StoreError::CloseFailed {
                root: self.root.clone(),
                what,
            });
        }
    }
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
