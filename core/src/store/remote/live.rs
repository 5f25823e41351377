//! The run in progress, as the run loop hands it to the read server.
//!
//! The run record is stored when the run starts and when it ends; in between, only the run
//! loop knows how far it has got. Copying its record costs time proportional to the run, so
//! the loop copies it only when a reader has asked since the last copy: [`LiveRun::offer`],
//! called on each tick of the loop, is one atomic load otherwise.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::store::RunRecord;

/// A copy younger than this answers a reader without asking the loop for a new one.
const FRESH: Duration = Duration::from_millis(150);

/// How long a reader waits for the loop's next copy (it copies on its next tick, every
/// 200 ms) before it takes the last one, or the stored record.
const WAIT: Duration = Duration::from_secs(1);

/// The run record as far as the run loop has got, and where its running attempts write.
#[derive(Debug, Clone)]
pub struct LiveSnapshot {
    pub record: RunRecord,
    /// Step index (in `record.steps`) → the log its running attempt is writing.
    pub logs: BTreeMap<usize, PathBuf>,
}

/// Shared by the run loop (which offers copies) and the read server (which asks for them).
pub struct LiveRun {
    id: u64,
    wanted: AtomicBool,
    state: Mutex<State>,
    copied: Condvar,
}

#[derive(Default)]
struct State {
    latest: Option<(Instant, Arc<LiveSnapshot>)>,
    /// Bumped by every copy.
    version: u64,
    /// The run's final record is stored: readers read it there.
    ended: bool,
    /// Runs that joined the runner (see `needle run`) and are going: their records are
    /// stored as they go.
    joined: Vec<u64>,
}

impl LiveRun {
    pub fn new(id: u64) -> LiveRun {
        LiveRun {
            id,
            wanted: AtomicBool::new(false),
            state: Mutex::default(),
            copied: Condvar::new(),
        }
    }

    /// The run's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Called by the run loop as it goes: `snapshot` runs only if a reader is waiting.
    pub fn offer(&self, snapshot: impl FnOnce() -> LiveSnapshot) {
        if !self.wanted.swap(false, Ordering::AcqRel) {
            return;
        }
        let copy = Arc::new(snapshot());
        let mut state = self.lock();
        state.latest = Some((Instant::now(), copy));
        state.version += 1;
        self.copied.notify_all();
    }

    /// The run's final record is in the store now: stop answering from copies.
    pub fn end(&self) {
        let mut state = self.lock();
        state.ended = true;
        state.latest = None;
        self.copied.notify_all();
    }

    /// The runs that joined the runner and are going now.
    pub fn set_joined(&self, runs: Vec<u64>) {
        self.lock().joined = runs;
    }

    pub fn joined(&self) -> Vec<u64> {
        self.lock().joined.clone()
    }

    pub fn is_going(&self) -> bool {
        !self.lock().ended
    }

    /// A recent copy of the run, asking the loop for one if the last is not fresh. `None`
    /// once the run has ended, or when the loop has made no copy yet and did not make one
    /// within [`WAIT`] (busy): the stored record answers then.
    pub fn current(&self) -> Option<Arc<LiveSnapshot>> {
        let mut state = self.lock();
        if state.ended {
            return None;
        }
        if let Some((at, copy)) = &state.latest
            && at.elapsed() < FRESH
        {
            return Some(copy.clone());
        }
        self.wanted.store(true, Ordering::Release);
        let seen = state.version;
        let deadline = Instant::now() + WAIT;
        while state.version == seen && !state.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .copied
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if state.ended {
            return None;
        }
        state.latest.as_ref().map(|(_, copy)| copy.clone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
