//! Reading a store that a run holds, through the runner.
//!
//! sled is single-process, so while `needle run` holds a store no other process can open its
//! metadata. The runner therefore answers read requests on a unix socket in the store,
//! `<root>/runner.sock` ([`Server`]), and a read-only command that finds the store locked
//! reads through it ([`Reader`]). Blobs, views and logs are plain files: the reader gets their
//! paths from the runner and reads them itself.
//!
//! ```text
//! reader                                  runner (a thread per connection, at most 8)
//!   connect <root>/runner.sock  ───────▶  accept
//!   {"op":"hello"}\n            ───────▶
//!                               ◀───────  {"ok":{"protocol":1,"pid":…,"live_run":7}}\n
//!   {"op":"step","key":"ab…"}\n ───────▶
//!                               ◀───────  {"ok":{…StepRecord…}}\n   or   {"error":"…"}\n
//!   …
//! ```
//! One JSON value per line each way (compact JSON has no raw newline). A request is at most
//! [`MAX_REQUEST`] bytes; a connection idle for [`IDLE_TIMEOUT`], a line that is not a
//! request, or a client that does not take its answer within [`WRITE_TIMEOUT`] is dropped.
//!
//! The socket exists only while its runner does: made after the runner took the store's lock
//! (a socket found then is a killed runner's, and is replaced), removed when the run ends. A
//! stale one left by a killed runner refuses connections, so a reader then opens the store
//! itself (the lock is free) or names the lock's holder as before.

mod client;
mod live;
mod server;

use std::io::{self, BufRead, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::{ArtifactDigest, StepKey};

pub use client::Reader;
pub use live::{LiveRun, LiveSnapshot};
pub use server::Server;

/// Bumped whenever a request or an answer changes shape.
pub const PROTOCOL: u32 = 1;

/// The socket's name in the store.
pub const SOCKET: &str = "runner.sock";

/// The longest request line the runner reads (requests are a few hundred bytes).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A connection with no request for this long is closed (the reader reconnects if it was
/// only slow).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A client that does not read its answer for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// `<root>/runner.sock`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join(SOCKET)
}

/// A unix socket's address holds at most this many bytes of path (`sun_path`, less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Run `f` on a path that names the store's socket and fits in a socket address, however long
/// the store's own path is: a longer one is reached through an open descriptor of the store's
/// directory, `/proc/self/fd/N/runner.sock`, which the kernel resolves like any path.
fn at_socket<T>(root: &Path, name: &str, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let path = root.join(name);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return f(&path);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()));
    f(&short)
}

/// Listen on the store's socket.
pub(crate) fn bind_socket(root: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    bind_socket_named(root, SOCKET)
}

/// Connect to the store's socket.
pub(crate) fn connect_socket(root: &Path) -> io::Result<UnixStream> {
    connect_socket_named(root, SOCKET)
}

/// Listen on `<root>/<name>`, a socket of the runner's own (`join.sock`).
pub fn bind_socket_named(root: &Path, name: &str) -> io::Result<std::os::unix::net::UnixListener> {
    at_socket(root, name, |p| std::os::unix::net::UnixListener::bind(p))
}

/// Connect to `<root>/<name>`.
pub fn connect_socket_named(root: &Path, name: &str) -> io::Result<UnixStream> {
    at_socket(root, name, |p| UnixStream::connect(p))
}

/// What a reader may ask; each maps to the [`crate::store::StoreRead`] method of its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello,
    Step { key: StepKey },
    StepsNamed { name: String },
    Manifest { artifact: ArtifactDigest },
    Producers { artifact: ArtifactDigest },
    Consumers { artifact: ArtifactDigest },
    View { artifact: ArtifactDigest },
    Run { id: u64 },
    Runs,
    FindPrefix { prefix: String },
    Counts,
    LiveLog { run: u64, step: usize },
    GpuUsage { run: u64 },
}

/// The answer to [`Request::Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The runner's process id.
    pub pid: u32,
    /// The run it is executing, until that run's final record is stored.
    pub live_run: Option<u64>,
    /// The runs that joined it and are going (a runner of an older needle has none).
    #[serde(default)]
    pub joined: Vec<u64>,
}

/// Every answer: the value the store method returned, or its error's message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer<T> {
    Ok(T),
    Error(String),
}

/// Read one line (without its `\n`); `None` at a clean end of stream. A line longer than
/// `max` is an error: the peer is not speaking the protocol.
pub fn read_frame(reader: &mut impl BufRead, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = reader.take(max as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if line.len() > max {
            io::Error::new(io::ErrorKind::InvalidData, "line too long")
        } else {
            io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a line")
        });
    }
    line.pop();
    Ok(Some(line))
}

/// Write `value` as one line. `send(MSG_NOSIGNAL)`, not `write`: needle restores the default
/// SIGPIPE (it dies quietly under `| head`), and a peer that went away must cost this
/// connection only, never the process.
pub fn send_frame(stream: &UnixStream, value: &impl Serialize) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let n = match rustix::net::send(stream, rest, rustix::net::SendFlags::NOSIGNAL) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        rest = &rest[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests;
