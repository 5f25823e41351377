//! Local steps die with their runner, however it dies (SIGKILL included): nothing could commit
//! their output, and left running they would hold a GPU and write into their resume directory
//! beside the next run's attempt.
//!
//! A small process of its own (this binary, started as `needle __reap` with the first local
//! step) reads the process groups of the running steps from a socket whose other end only the
//! runner holds (close-on-exec: no step inherits it). When the runner dies, however it dies,
//! the kernel closes that end; the reaper reads end-of-file, kills every group still listed
//! (the step and whatever it started) and exits. A runner that ends normally has stopped its
//! steps already and listed none.
//!
//! Why not `PR_SET_PDEATHSIG` in a `pre_exec` hook: a hook makes std fork the runner instead
//! of spawning with `posix_spawn` (a vfork), and a fork copies the runner's page tables — at
//! 10,000 steps that cost more than the steps themselves (BENCHMARKS.md).
//!
//! What it cannot cover: a runner killed between starting a step and writing its group to the
//! socket (a few microseconds) leaves that step running.

use std::io::BufRead;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The first argument that makes `needle` a reaper.
pub const ARG: &str = "__reap";

/// The runner's end of the socket; `None` when the reaper could not be started (steps then
/// outlive a killed runner: said once, as a warning).
static REAPER: OnceLock<Option<UnixStream>> = OnceLock::new();

fn start() -> Option<UnixStream> {
    let spawned = UnixStream::pair().and_then(|(ours, theirs)| {
        let exe = std::env::current_exe()?;
        Command::new(exe)
            .arg(ARG)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: a Ctrl-C at the terminal is the runner's to handle, not its.
            .process_group(0)
            .spawn()?;
        // Not waited for: it exits with the runner (until then a zombie costs nothing; once
        // the runner is gone, init reaps it). Its end of the socket closed here with the
        // `Command`, so that the runner's death is the only end-of-file it can read.
        Ok(ours)
    });
    spawned
        .inspect_err(|e| {
            tracing::warn!(
                "could not start the process that stops steps when the runner is killed: {e}"
            )
        })
        .ok()
}

fn tell(line: String) {
    let Some(socket) = REAPER.get_or_init(start) else {
        return;
    };
    // One `send` of a short line is atomic. Never SIGPIPE (the runner keeps the default
    // disposition for its stdout) and never block (a stopped reaper must not stop the run): a
    // reaper that has gone away only takes its protection with it.
    // SAFETY: send(2) reads `line`'s bytes, which outlive the call.
    unsafe {
        libc::send(
            socket.as_raw_fd(),
            line.as_ptr().cast(),
            line.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        );
    }
}

/// While this lives, group `pgid` is killed if the runner dies. Drop it once the step has
/// ended and its group has been killed.
pub struct Watch(u32);

impl Watch {
    pub fn new(pgid: u32) -> Watch {
        tell(format!("+{pgid}\n"));
        Watch(pgid)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        tell(format!("-{}\n", self.0));
    }
}

/// The reaper's life: follow the list until end-of-file, then kill what is on it.
pub fn serve(input: impl BufRead) -> i32 {
    let mut groups = std::collections::BTreeSet::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        let pgid = |rest: &str| rest.parse::<u32>().ok().filter(|&g| g > 1);
        if let Some(g) = line.strip_prefix('+').and_then(pgid) {
            groups.insert(g);
        } else if let Some(g) = line.strip_prefix('-').and_then(pgid) {
            groups.remove(&g);
        }
    }
    for pgid in groups {
        crate::executor::kill_group(pgid, libc::SIGKILL);
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_still_listed_at_the_end_are_killed() {
        let mut sleeper = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let mut done = Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let (a, b) = (sleeper.id(), done.id());
        let input = format!("+{a}\n+{b}\n-{b}\nnonsense\né\n+1\n");
        assert_eq!(serve(input.as_bytes()), 0);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(sleeper.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(
            done.try_wait().unwrap().is_none(),
            "a forgotten group is left alone"
        );
        done.kill().unwrap();
        done.wait().unwrap();
    }
}
