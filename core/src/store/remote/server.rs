//! The runner's side: answers read requests on `<root>/runner.sock` from threads of its own.
//!
//! Nothing here touches the run loop: the threads share only the [`Store`] (whose reads are
//! safe beside the commits of the run) and the [`LiveRun`] (which the loop fills only when
//! asked). They run at a lower CPU priority than the loop, at most [`MAX_CLIENTS`] connections at once,
//! each bounded by the timeouts of the protocol; a client that misbehaves loses its
//! connection and nothing else.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use super::{
    Answer, Hello, IDLE_TIMEOUT, LiveRun, LiveSnapshot, MAX_REQUEST, PROTOCOL, Request,
    WRITE_TIMEOUT, read_frame, send_frame, socket_path,
};
use crate::store::{RunSummary, Store, StoreError};

/// Connections served at once; more are closed at once (their readers retry).
pub const MAX_CLIENTS: usize = 8;

/// The nice value of the server's threads: the run loop and the commits come first.
const NICE: i32 = 10;

/// Serves until dropped. Dropping it stops accepting, ends the open connections, waits for
/// their threads (so the store is no longer shared once it returns) and removes the socket.
pub struct Server {
    root: PathBuf,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listen on `<root>/runner.sock`. Holding `store` means holding its lock, so a socket
    /// already there belongs to a runner that is gone: it is replaced.
    pub fn start(store: Arc<Store>, live: Arc<LiveRun>) -> Result<Server, StoreError> {
        let root = store.root().to_path_buf();
        let path = socket_path(&root);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove the stale socket", &path)(e)),
        }
        let listener = super::bind_socket(&root).map_err(StoreError::io("listen on", &path))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = std::thread::Builder::new()
            .name("needle-reads".into())
            .spawn({
                let stop = stop.clone();
                move || accept_loop(listener, store, live, stop)
            })
            .map_err(StoreError::io("start the read server of", &path))?;
        Ok(Server {
            root,
            path,
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // The accept loop sleeps in accept(2): a connection of our own wakes it.
        if super::connect_socket(&self.root).is_ok()
            && let Some(handle) = self.accept.take()
        {
            let _ = handle.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: UnixListener,
    store: Arc<Store>,
    live: Arc<LiveRun>,
    stop: Arc<AtomicBool>,
) {
    // Threads inherit their creator's nice value: the connection threads get it too.
    lower_priority();
    // Each open connection, to end it when the server stops.
    let open: Arc<Mutex<HashMap<u64, UnixStream>>> = Arc::default();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors, say: not worth a busy loop.
                tracing::debug!("accepting a reader: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        if threads.len() >= MAX_CLIENTS {
            continue; // dropped, so closed: the reader tries again
        }
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        next_id += 1;
        let id = next_id;
        lock(&open).insert(id, handle);
        let spawned = std::thread::Builder::new()
            .name("needle-read".into())
            .spawn({
                let (store, live, open) = (store.clone(), live.clone(), open.clone());
                move || {
                    serve(&stream, &store, &live);
                    lock(&open).remove(&id);
                }
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                tracing::debug!("starting a reader's thread: {e}");
                lock(&open).remove(&id);
            }
        }
    }
    // Stopping: end the connections still open (their readers go on with the store itself
    // once it is free), and wait for their threads, which hold the store.
    for stream in lock(&open).values() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    for thread in threads {
        let _ = thread.join();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn lower_priority() {
    // On Linux a thread id names that one thread to setpriority(2). Best effort.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE);
}

/// Answer one connection's requests until it ends, idles, or breaks the protocol.
fn serve(stream: &UnixStream, store: &Store, live: &LiveRun) {
    if stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_frame(&mut reader, MAX_REQUEST) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let message = format!("a request is one line of at most {MAX_REQUEST} bytes");
                    let _ = send_frame(stream, &Answer::<()>::Error(message));
                }
                return;
            }
        };
        let request: Request = match serde_json::from_slice(&line) {
            Ok(request) => request,
            Err(e) => {
                let _ = send_frame(stream, &Answer::<()>::Error(format!("not a request: {e}")));
                return;
            }
        };
        if answer(stream, store, live, request).is_err() {
            return;
        }
    }
}

fn answer(stream: &UnixStream, store: &Store, live: &LiveRun, request: Request) -> io::Result<()> {
    match request {
        Request::Hello => send_frame(
            stream,
            &Answer::Ok(Hello {
                protocol: PROTOCOL,
                pid: std::process::id(),
                live_run: live.is_going().then(|| live.id()),
                joined: live.joined(),
            }),
        ),
        Request::Step { key } => reply(stream, store.step(&key)),
        Request::StepsNamed { name } => reply(stream, store.steps_named(&name)),
        Request::Manifest { artifact } => reply(stream, store.manifest(&artifact)),
        Request::Producers { artifact } => reply(stream, store.producers(&artifact)),
        Request::Consumers { artifact } => reply(stream, store.consumers(&artifact)),
        Request::View { artifact } => reply(stream, store.view(&artifact)),
        Request::Run { id } => match live_copy(live, id) {
            Some(copy) => send_frame(stream, &Answer::Ok(Some(&copy.record))),
            None => reply(stream, store.run(id)),
        },
        Request::Runs => reply(stream, runs(store, live)),
        Request::FindPrefix { prefix } => reply(stream, store.find_prefix(&prefix)),
        Request::Counts => reply(stream, store.counts()),
        Request::GpuUsage { run } => reply(stream, store.gpu_usage(run)),
        Request::LiveLog { run, step } => {
            let log = live_copy(live, run).and_then(|copy| copy.logs.get(&step).cloned());
            send_frame(stream, &Answer::Ok(log))
        }
    }
}

/// The stored summaries, with the live run's counted from its current copy.
fn runs(store: &Store, live: &LiveRun) -> Result<Vec<RunSummary>, StoreError> {
    let mut runs = store.runs()?;
    if let Some(summary) = runs.iter_mut().find(|r| r.id == live.id())
        && let Some(copy) = live.current()
    {
        *summary = RunSummary::of(&copy.record);
    }
    // A run that joined the runner: its record with the progress recorded so far.
    for id in live.joined() {
        if let Some(summary) = runs.iter_mut().find(|r| r.id == id)
            && let Some(record) = store.run(id)?
        {
            *summary = RunSummary::of(&record);
        }
    }
    Ok(runs)
}

fn live_copy(live: &LiveRun, run: u64) -> Option<Arc<LiveSnapshot>> {
    (run == live.id()).then(|| live.current()).flatten()
}

fn reply<T: Serialize>(stream: &UnixStream, result: Result<T, StoreError>) -> io::Result<()> {
    match result {
        Ok(value) => send_frame(stream, &Answer::Ok(value)),
        Err(e) => send_frame(
            stream,
            &Answer::<T>::Error(crate::error_chain::joined(&e, ": ")),
        ),
    }
}
