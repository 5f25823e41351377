//! The reader's side: [`Reader`] opens a store for the read-only commands, itself when it can
//! and through the runner holding it when a run is going.

use std::cell::RefCell;
use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::{Answer, Hello, PROTOCOL, Request, read_frame, send_frame};
use crate::digest::{ArtifactDigest, StepKey};
use crate::store::{
    Found, GpuUsage, LockMode, Manifest, RunRecord, RunSummary, StepRecord, Store, StoreCounts,
    StoreError, StoreRead,
};

/// How long a reader without `--wait` waits for a store that is locked but not served: a
/// runner that has just taken the lock listens a moment later, and another read-only command
/// holds it only for a moment.
pub const GRACE: Duration = Duration::from_secs(2);

/// How long a reader whose runner went away (its run ended) waits for the store.
const RECONNECT: Duration = Duration::from_secs(10);

/// Between two tries for the lock or the socket.
const POLL: Duration = Duration::from_millis(50);

/// How long the greeting may take: a runner that does not answer it at once is stopped
/// (Ctrl-Z) or going away, and the store is better waited for as any locked store.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an answer may take (a big view is built before its path comes back).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// A store opened for reading: the store itself, or the runner that holds it.
pub struct Reader {
    root: PathBuf,
    backend: RefCell<Backend>,
}

enum Backend {
    Local(Box<Store>),
    Remote(Client),
}

impl Reader {
    /// Open the store at `root` for reading: itself when no process holds it, else through
    /// the runner that does. Neither possible (another command holds it, or a runner has not
    /// started listening yet): with [`LockMode::Fail`] wait up to [`GRACE`] (a reader holding
    /// it is waited for longer, see [`Store::open_to_read`]), then fail naming the holder; with
    /// [`LockMode::Wait`] wait as long as it takes.
    pub fn open(root: &Path, mode: LockMode) -> Result<Reader, StoreError> {
        let deadline = match mode {
            LockMode::Fail => Some(Instant::now() + GRACE),
            LockMode::Wait => None,
        };
        Ok(Reader {
            root: root.to_path_buf(),
            backend: RefCell::new(connect_or_open(root, deadline)?),
        })
    }

    /// Whether this reader reads through a runner.
    pub fn is_remote(&self) -> bool {
        matches!(*self.backend.borrow(), Backend::Remote(_))
    }

    /// `local` on the store, or `request` to the runner. A runner that stops answering (its
    /// run ended, or the connection idled out) is replaced by whoever holds the store now, and
    /// the read is tried once more there.
    fn read<T: DeserializeOwned>(
        &self,
        local: impl Fn(&Store) -> Result<T, StoreError>,
        request: Request,
    ) -> Result<T, StoreError> {
        let mut backend = self.backend.borrow_mut();
        let lost = match &mut *backend {
            Backend::Local(store) => return local(store),
            Backend::Remote(client) => match client.call(&request) {
                Ok(value) => return Ok(value),
                Err(e) => self.call_error(e)?,
            },
        };
        *backend = match connect_or_open(&self.root, Some(Instant::now() + RECONNECT)) {
            Ok(b) => b,
            Err(StoreError::Locked { .. }) => {
                return Err(StoreError::Runner {
                    root: self.root.clone(),
                    source: lost,
                });
            }
            Err(e) => return Err(e),
        };
        match &mut *backend {
            Backend::Local(store) => local(store),
            Backend::Remote(client) => client.call(&request).or_else(|e| {
                let source = self.call_error(e)?;
                Err(StoreError::Runner {
                    root: self.root.clone(),
                    source,
                })
            }),
        }
    }

    /// An answered error becomes the command's; a broken connection is returned to retry.
    fn call_error(&self, e: CallError) -> Result<io::Error, StoreError> {
        match e {
            CallError::Answer(message) => Err(StoreError::RunnerAnswer { message }),
            CallError::Io(e) => Ok(e),
        }
    }
}

impl StoreRead for Reader {
    fn root(&self) -> &Path {
        &self.root
    }

    fn step(&self, key: &StepKey) -> Result<Option<StepRecord>, StoreError> {
        self.read(|s| s.step(key), Request::Step { key: *key })
    }

    fn steps_named(&self, name: &str) -> Result<Vec<StepRecord>, StoreError> {
        let request = Request::StepsNamed { name: name.into() };
        self.read(|s| s.steps_named(name), request)
    }

    fn manifest(&self, artifact: &ArtifactDigest) -> Result<Option<Manifest>, StoreError> {
        let request = Request::Manifest {
            artifact: *artifact,
        };
        self.read(|s| s.manifest(artifact), request)
    }

    fn producers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        let request = Request::Producers {
            artifact: *artifact,
        };
        self.read(|s| s.producers(artifact), request)
    }

    fn consumers(&self, artifact: &ArtifactDigest) -> Result<Vec<StepKey>, StoreError> {
        let request = Request::Consumers {
            artifact: *artifact,
        };
        self.read(|s| s.consumers(artifact), request)
    }

    fn view(&self, artifact: &ArtifactDigest) -> Result<PathBuf, StoreError> {
        let request = Request::View {
            artifact: *artifact,
        };
        self.read(|s| s.view(artifact), request)
    }

    fn run(&self, id: u64) -> Result<Option<RunRecord>, StoreError> {
        self.read(|s| s.run(id), Request::Run { id })
    }

    fn runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        self.read(|s| s.runs(), Request::Runs)
    }

    fn find_prefix(&self, prefix: &str) -> Result<Vec<Found>, StoreError> {
        let request = Request::FindPrefix {
            prefix: prefix.into(),
        };
        self.read(|s| s.find_prefix(prefix), request)
    }

    fn gpu_usage(&self, id: u64) -> Result<Option<GpuUsage>, StoreError> {
        self.read(|s| s.gpu_usage(id), Request::GpuUsage { run: id })
    }

    fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.read(|s| s.counts(), Request::Counts)
    }

    fn live_run(&self) -> Option<u64> {
        match &*self.backend.borrow() {
            Backend::Local(_) => None,
            Backend::Remote(client) => client.hello.live_run,
        }
    }

    fn is_live(&self, run: u64) -> bool {
        match &*self.backend.borrow() {
            Backend::Local(_) => false,
            Backend::Remote(client) => {
                client.hello.live_run == Some(run) || client.hello.joined.contains(&run)
            }
        }
    }

    fn live_log(&self, run: u64, step: usize) -> Result<Option<PathBuf>, StoreError> {
        self.read(|_| Ok(None), Request::LiveLog { run, step })
    }
}

/// Open the store, or connect to the runner holding it, trying both until `deadline`.
fn connect_or_open(root: &Path, deadline: Option<Instant>) -> Result<Backend, StoreError> {
    let mut said = false;
    loop {
        let locked = match Store::open_to_read(root, LockMode::Fail) {
            Ok(store) => return Ok(Backend::Local(Box::new(store))),
            Err(e @ StoreError::Locked { .. }) => e,
            Err(e) => return Err(e),
        };
        if let Some(client) = Client::connect(root)? {
            return Ok(Backend::Remote(client));
        }
        match deadline {
            Some(d) if Instant::now() >= d => return Err(locked),
            Some(_) => {}
            None if !said => {
                tracing::info!(store = %root.display(), "waiting for the store: {locked}");
                said = true;
            }
            None => {}
        }
        std::thread::sleep(POLL);
    }
}

/// One connection to a runner.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    hello: Hello,
}

enum CallError {
    /// The runner answered with an error.
    Answer(String),
    /// The connection broke, timed out, or carried something that is not an answer.
    Io(io::Error),
}

impl Client {
    /// Connect and greet. `None` when no runner answers there: no socket, a stale one (its
    /// runner was killed), or a runner that closed at once (going away, or busy).
    fn connect(root: &Path) -> Result<Option<Client>, StoreError> {
        let Ok(stream) = super::connect_socket(root) else {
            return Ok(None);
        };
        let Ok(reader) = stream.try_clone().map(BufReader::new) else {
            return Ok(None);
        };
        if stream.set_read_timeout(Some(HELLO_TIMEOUT)).is_err()
            || stream.set_write_timeout(Some(HELLO_TIMEOUT)).is_err()
        {
            return Ok(None);
        }
        let mut client = Client {
            stream,
            reader,
            hello: Hello {
                protocol: PROTOCOL,
                pid: 0,
                live_run: None,
                joined: Vec::new(),
            },
        };
        // Read as a plain value first: another protocol's greeting may have another shape.
        let hello: serde_json::Value = match client.call(&Request::Hello) {
            Ok(v) => v,
            Err(CallError::Io(_)) => return Ok(None),
            Err(CallError::Answer(message)) => return Err(StoreError::RunnerAnswer { message }),
        };
        let found = hello["protocol"].as_u64().unwrap_or(0) as u32;
        match serde_json::from_value::<Hello>(hello) {
            Ok(hello) if found == PROTOCOL => {
                client.hello = hello;
                let stream = &client.stream;
                if stream.set_read_timeout(Some(ANSWER_TIMEOUT)).is_err()
                    || stream.set_write_timeout(Some(ANSWER_TIMEOUT)).is_err()
                {
                    return Ok(None);
                }
                Ok(Some(client))
            }
            _ => Err(StoreError::RunnerProtocol {
                root: root.to_path_buf(),
                found,
                expected: PROTOCOL,
            }),
        }
    }

    fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, CallError> {
        send_frame(&self.stream, request).map_err(CallError::Io)?;
        let line = read_frame(&mut self.reader, usize::MAX / 2)
            .map_err(CallError::Io)?
            .ok_or_else(|| {
                CallError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the runner closed the connection",
                ))
            })?;
        match serde_json::from_slice::<Answer<T>>(&line) {
            Ok(Answer::Ok(value)) => Ok(value),
            Ok(Answer::Error(message)) => Err(CallError::Answer(message)),
            Err(e) => Err(CallError::Io(io::Error::new(io::ErrorKind::InvalidData, e))),
        }
    }
}
