//! The joining side: a `needle run` that found the store held hands its run to the runner, then
//! shows the run's progress and ends with its exit code.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use needle_core::store::remote::{connect_socket_named, read_frame, send_frame};
use needle_core::store::{LockMode, Store, StoreError};

use super::{JoinRequest, SOCKET, ToClient, ToRunner};
use crate::attempt::RunOutcome;
use crate::error::CliError;
use crate::progress;

/// How long a run without `--wait` looks for the store, or a runner to join, before it
/// fails naming the holder: a runner that has just taken the lock listens a moment later.
const GRACE: Duration = Duration::from_secs(2);

/// Between two tries for the lock or the socket.
const POLL: Duration = Duration::from_millis(50);

/// How long the runner may take to accept or refuse (it plans the recipe first).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Who executes the run: this process, holding the store, or the runner that holds it.
pub enum Executes {
    Here(Box<Store>),
    Joined(Joined),
}

/// A run the runner accepted.
pub struct Joined {
    pub run: u64,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

/// Open the store at `root`, or join the runner that holds it. `wait`: a store held by a
/// command that is not a runner (or a runner that refuses this run) is waited for.
pub fn open_or_join(root: &Path, wait: bool, request: &JoinRequest) -> Result<Executes, CliError> {
    let deadline = Instant::now() + GRACE;
    loop {
        let locked = match Store::open(root, LockMode::Fail) {
            Ok(store) => return Ok(Executes::Here(Box::new(store))),
            Err(e @ StoreError::Locked { .. }) => e,
            Err(e) => return Err(CliError::StoreOpen(e)),
        };
        match try_join(root, request)? {
            Attempted::Joined(joined) => return Ok(Executes::Joined(joined)),
            Attempted::Refused(message) if wait => {
                eprintln!("note: {message}\nwaiting for the store (--wait)");
                let store = Store::open(root, LockMode::Wait).map_err(CliError::StoreOpen)?;
                return Ok(Executes::Here(Box::new(store)));
            }
            Attempted::Refused(message) => return Err(CliError::usage(message)),
            Attempted::NoRunner if !wait && Instant::now() >= deadline => {
                return Err(CliError::StoreOpen(locked));
            }
            Attempted::NoRunner => {}
        }
        std::thread::sleep(POLL);
    }
}

enum Attempted {
    Joined(Joined),
    Refused(String),
    /// No runner takes runs now: none listens, or it is ending (the store will be free).
    NoRunner,
}

fn try_join(root: &Path, request: &JoinRequest) -> Result<Attempted, CliError> {
    let Ok(stream) = connect_socket_named(root, SOCKET) else {
        return Ok(Attempted::NoRunner);
    };
    let io = |source| CliError::Io {
        context: "could not talk to the runner of this store".into(),
        source,
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    if send_frame(&stream, &ToRunner::Join(Box::new(request.clone()))).is_err() {
        return Ok(Attempted::NoRunner);
    }
    let answer = match read_frame(&mut reader, usize::MAX / 2) {
        Ok(Some(line)) => serde_json::from_slice::<ToClient>(&line)
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?,
        // Gone before it answered: going away.
        Ok(None) | Err(_) => return Ok(Attempted::NoRunner),
    };
    stream.set_read_timeout(None).map_err(io)?;
    Ok(match answer {
        ToClient::Accepted { run } => Attempted::Joined(Joined {
            run,
            stream,
            reader,
        }),
        ToClient::Refused { retry: true, .. } => Attempted::NoRunner,
        ToClient::Refused { message, .. } => Attempted::Refused(message),
        other => Attempted::Refused(format!("the runner answered {other:?}")),
    })
}

impl Joined {
    /// Show the run's progress as the runner reports it until it ends; Ctrl-C cancels it
    /// (a second: its steps are killed). `total`: the run's steps.
    pub fn follow(
        mut self,
        total: usize,
    ) -> Result<(RunOutcome, needle_core::store::RunRecord), CliError> {
        let cancels = self.stream.try_clone().map_err(|source| CliError::Io {
            context: "could not talk to the runner of this store".into(),
            source,
        })?;
        forward_ctrl_c(cancels);
        eprintln!(
            "joined the runner of this store: run {} executes there, beside its other runs",
            self.run
        );
        let mut display = progress::for_stderr(total);
        loop {
            let line = match read_frame(&mut self.reader, usize::MAX / 2) {
                Ok(Some(line)) => line,
                Ok(None) | Err(_) => {
                    return Err(CliError::RunnerLost(format!(
                        "the runner went away while it executed run {}: its steps were \
                         stopped with it (hint: `needle rerun {}` finishes it)",
                        self.run, self.run
                    )));
                }
            };
            match serde_json::from_slice::<ToClient>(&line) {
                Ok(ToClient::Progress(call)) => call.replay(display.as_mut()),
                Ok(ToClient::Ended { outcome, record }) => return Ok((outcome, *record)),
                Ok(_) | Err(_) => {}
            }
        }
    }
}

/// Each Ctrl-C from now on asks the runner to cancel the run, on a thread of its own. The
/// handler is installed before this returns: a Ctrl-C that came while a thread started would
/// otherwise kill the client instead of cancelling its run.
fn forward_ctrl_c(stream: UnixStream) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let sigint = {
        let _in_runtime = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    };
    let Ok(mut sigint) = sigint else {
        return;
    };
    std::thread::spawn(move || {
        runtime.block_on(async move {
            while sigint.recv().await.is_some() {
                if send_frame(&stream, &ToRunner::Cancel).is_err() {
                    return;
                }
            }
        });
    });
}
