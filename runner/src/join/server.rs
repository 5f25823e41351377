//! The runner's side: accepts runs on `<root>/join.sock` from threads of its own, and hands
//! each to the engine as an [`Event::Join`]. The threads share nothing with the run loop but
//! its event channel; what they say to a client comes from the engine through a channel.

use std::io::{self, BufReader};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use needle_core::plan;
use needle_core::recipe::{RecipeSource, SetArg};
use needle_core::store::remote::{bind_socket_named, read_frame, send_frame};
use needle_ops::Registry;
use tokio::sync::mpsc::UnboundedSender;

use super::{JoinRequest, MAX_REQUEST, PROTOCOL, PoolSpec, Relay, SOCKET, ToClient, ToRunner};
use crate::attempt::Event;
use crate::commands::{PlannedCode, load_recipe};
use crate::engine::{Joining, RunOptions};
use crate::error::CliError;

/// How long a client may take to send its request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an ending runner waits for its clients to be written their runs' ends (a client
/// that reads nothing, stopped with Ctrl-Z, must not keep it from exiting).
const LAST_WORDS: Duration = Duration::from_secs(10);

/// Accepts runs until dropped; then every client that comes is told to retry (the store will
/// be free), and the socket is removed.
pub struct JoinServer {
    root: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    forwarders: Arc<Forwarders>,
}

/// The threads writing the engine's messages to clients, counted: the process must not exit
/// while one still has a run's end to write, or that client hears its runner went away
/// although its run ended (a runner whose own run ended first exits as the last joined run
/// ends).
#[derive(Default)]
struct Forwarders {
    going: Mutex<usize>,
    ended: Condvar,
}

impl Forwarders {
    /// Run `forward` on a thread of its own, counted until it returns.
    fn spawn(self: &Arc<Self>, forward: impl FnOnce() + Send + 'static) -> io::Result<()> {
        *self.lock() += 1;
        let counted = self.clone();
        let spawned = std::thread::Builder::new()
            .name("needle-forward".into())
            .spawn(move || {
                forward();
                *counted.lock() -= 1;
                counted.ended.notify_all();
            });
        if spawned.is_err() {
            *self.lock() -= 1;
        }
        spawned.map(drop)
    }

    /// Wait until every forwarder has returned, for `limit` at most.
    fn wait(&self, limit: Duration) {
        let going = self.lock();
        let _ = self
            .ended
            .wait_timeout_while(going, limit, |going| *going > 0);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.going.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl JoinServer {
    /// Listen on `<root>/join.sock` (a socket already there is a killed runner's: the caller
    /// holds the store's lock). The runner's pool is `pool`; runs go to `events`.
    pub fn start(
        root: &Path,
        pool: PoolSpec,
        events: UnboundedSender<Event>,
    ) -> io::Result<JoinServer> {
        match std::fs::remove_file(root.join(SOCKET)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = bind_socket_named(root, SOCKET)?;
        let stop = Arc::new(AtomicBool::new(false));
        let forwarders = Arc::new(Forwarders::default());
        let accept = std::thread::Builder::new()
            .name("needle-join".into())
            .spawn({
                let (stop, forwarders) = (stop.clone(), forwarders.clone());
                move || accept_loop(listener, Arc::new(pool), events, stop, forwarders)
            })?;
        Ok(JoinServer {
            root: root.to_path_buf(),
            stop,
            accept: Some(accept),
            forwarders,
        })
    }

    /// From now on, clients are told the runner is ending (before the store's lock is
    /// released, so that none finds the lock held and no one to join).
    pub fn ending(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Drop for JoinServer {
    /// Dropped once the engine has ended: every joined run has ended, and its client is
    /// written its end before the process exits.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = std::fs::remove_file(self.root.join(SOCKET));
        self.forwarders.wait(LAST_WORDS);
        // The accept loop sleeps in accept(2): a connection of our own wakes it. Removed, the
        // path no longer reaches it; the loop then ends with the process.
        if let Some(handle) = self.accept.take()
            && handle.is_finished()
        {
            let _ = handle.join();
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    pool: Arc<PoolSpec>,
    events: UnboundedSender<Event>,
    stop: Arc<AtomicBool>,
    forwarders: Arc<Forwarders>,
) {
    let mut next_client = 0u64;
    for conn in listener.incoming() {
        let Ok(stream) = conn else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if stop.load(Ordering::Acquire) {
            let _ = send_frame(&stream, &ending());
            continue;
        }
        next_client += 1;
        let client = next_client;
        let (pool, events, forwarders) = (pool.clone(), events.clone(), forwarders.clone());
        let spawned = std::thread::Builder::new()
            .name("needle-joined".into())
            .spawn(move || serve(stream, &pool, &events, &forwarders, client));
        if let Err(e) = spawned {
            tracing::warn!("could not serve a joining run: {e}");
        }
    }
}

fn ending() -> ToClient {
    ToClient::Refused {
        message: "the runner of this store is ending".into(),
        retry: true,
    }
}

/// One client: its request, then its run's messages one way and its cancels the other.
fn serve(
    stream: UnixStream,
    pool: &PoolSpec,
    events: &UnboundedSender<Event>,
    forwarders: &Arc<Forwarders>,
    client: u64,
) {
    if stream.set_read_timeout(Some(REQUEST_TIMEOUT)).is_err() {
        return;
    }
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let request = match read_frame(&mut reader, MAX_REQUEST) {
        Ok(Some(line)) => serde_json::from_slice::<ToRunner>(&line),
        _ => return,
    };
    let request = match request {
        Ok(ToRunner::Join(request)) => request,
        Ok(ToRunner::Cancel) => return,
        Err(e) => {
            let _ = send_frame(&stream, &refused(format!("not a join request: {e}")));
            return;
        }
    };
    let (to_client, from_engine) = channel();
    let (accepted_tx, accepted_rx) = channel();
    let joining = match prepare(&request, pool) {
        Ok((plan, code, sets)) => Joining {
            plan,
            keep_code: Box::new(move |store| code.keep_in(store).map_err(Into::into)),
            sets,
            rerun_of: request.rerun_of,
            opts: RunOptions {
                force: request.force.iter().cloned().collect(),
                priority: request.priority,
                max_gpus: request.max_gpus,
            },
            client,
            progress: Box::new(Relay(to_client.clone())),
            accepted: accepted_tx,
            on_end: Box::new(move |outcome, record| {
                let _ = to_client.send(ToClient::Ended {
                    outcome: outcome.clone(),
                    record: Box::new(record.clone()),
                });
            }),
        },
        Err(e) => {
            let _ = send_frame(
                &stream,
                &refused(needle_core::error_chain::joined(&e, ": ")),
            );
            return;
        }
    };
    if events.send(Event::Join(Box::new(joining))).is_err() {
        let _ = send_frame(&stream, &ending());
        return;
    }
    let answer = match accepted_rx.recv() {
        Ok(Ok(run)) => ToClient::Accepted { run },
        Ok(Err(refusal)) => refused(needle_core::error_chain::joined(&refusal, ": ")),
        // The engine ended before it took the run.
        Err(_) => ending(),
    };
    let joined = matches!(answer, ToClient::Accepted { .. });
    if send_frame(&stream, &answer).is_err() || !joined {
        if joined {
            let _ = events.send(Event::Cancel { client });
        }
        return;
    }
    let Ok(write_half) = stream.try_clone() else {
        let _ = events.send(Event::Cancel { client });
        return;
    };
    if forwarders
        .spawn(move || forward(write_half, from_engine))
        .is_err()
    {
        let _ = events.send(Event::Cancel { client });
        return;
    }
    // Cancels, until the client goes away: going away cancels too (an ended run ignores it).
    let _ = stream.set_read_timeout(None);
    loop {
        match read_frame(&mut reader, MAX_REQUEST) {
            Ok(Some(line)) => {
                if let Ok(ToRunner::Cancel) = serde_json::from_slice(&line) {
                    let _ = events.send(Event::Cancel { client });
                }
            }
            Ok(None) | Err(_) => {
                let _ = events.send(Event::Cancel { client });
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Write the engine's messages for one client until its run has ended. A client that went
/// away is written no more, and the messages are drained (the engine never blocks on it).
fn forward(stream: UnixStream, from_engine: Receiver<ToClient>) {
    let mut gone = false;
    for message in from_engine {
        let last = matches!(message, ToClient::Ended { .. });
        if !gone && send_frame(&stream, &message).is_err() {
            gone = true;
        }
        if last {
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
    }
}

fn refused(message: String) -> ToClient {
    ToClient::Refused {
        message,
        retry: false,
    }
}

/// Why the runner refuses a run before the engine sees it.
#[derive(Debug, thiserror::Error)]
enum NotJoinable {
    #[error(
        "this runner speaks join protocol {PROTOCOL}, the client {client} (a needle of another \
         version): wait for this run to end (--wait)"
    )]
    Protocol { client: u32 },
    #[error("cannot join the runner of this store (pid {pid}): {why}; or --wait to run after it")]
    Pool { pid: u32, why: String },
    #[error("the runner could not plan the recipe")]
    Plan(#[source] CliError),
}

/// Check the request against the runner's pool, and plan it as the client did.
fn prepare(
    request: &JoinRequest,
    pool: &PoolSpec,
) -> Result<(plan::Plan, PlannedCode, Vec<SetArg>), NotJoinable> {
    if request.protocol != PROTOCOL {
        return Err(NotJoinable::Protocol {
            client: request.protocol,
        });
    }
    if let Some(why) = pool.refuses(&request.pool) {
        return Err(NotJoinable::Pool {
            pid: std::process::id(),
            why,
        });
    }
    let source = RecipeSource {
        path: request.recipe_path.clone(),
        dir: request.recipe_dir.clone(),
        text: request.recipe_text.clone(),
    };
    let sets: Vec<SetArg> = (request.sets.iter())
        .map(|(var, value)| SetArg {
            var: var.clone(),
            value: value.clone(),
        })
        .collect();
    let registry = Registry::new();
    let planned = load_recipe(source, &sets, &registry).and_then(|(recipe, expansion)| {
        let mut code = PlannedCode::default();
        let plan = plan::build(recipe, expansion, &mut code)?;
        Ok((plan, code))
    });
    let (plan, code) = planned.map_err(NotJoinable::Plan)?;
    Ok((plan, code, sets))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner exits once its engine has ended and its join server is dropped: by then each
    /// client must have been written what its forwarder held (else it hears that its runner
    /// went away although its run ended).
    #[test]
    fn an_ending_server_waits_until_every_client_is_written() {
        let (runner_side, client_side) = UnixStream::pair().unwrap();
        let (to_client, from_engine) = channel();
        let (release, released) = channel::<()>();
        let forwarders = Arc::new(Forwarders::default());
        forwarders
            .spawn(move || {
                released.recv().unwrap();
                forward(runner_side, from_engine);
            })
            .unwrap();
        to_client.send(refused("the last words".into())).unwrap();
        drop(to_client);
        release.send(()).unwrap();
        forwarders.wait(Duration::from_secs(60));

        client_side.set_nonblocking(true).unwrap();
        let line = read_frame(&mut BufReader::new(&client_side), 1 << 20)
            .expect("written before the wait returned")
            .expect("a frame");
        assert!(String::from_utf8_lossy(&line).contains("the last words"));
        assert_eq!(*forwarders.lock(), 0);
    }
}
