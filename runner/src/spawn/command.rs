//! The safe spawn, the default: `std::process::Command` (which uses `posix_spawn` where it
//! can), awaited through tokio. It gives the child what the fast spawn gives it: its own process
//! group, stdin from `/dev/null`, stdout and stderr into the log, the working directory, the
//! runner's environment less its `NEEDLE_*` variables plus the step's, an empty signal mask,
//! default handlers (SIGPIPE included). It costs more per step than `clone.rs`: the calling
//! thread waits while the child execs, and the environment is copied for each spawn
//! (BENCHMARKS.md has both, side by side).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{ExitStatus, Stdio};

use super::{NotStarted, Spawn, Stage};

/// A started process, leader of its own process group; its group is killed if it is dropped
/// before it was waited for.
pub struct Child {
    inner: tokio::process::Child,
    pid: u32,
    reaped: bool,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.inner.wait().await?;
        self.reaped = true;
        Ok(status)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            crate::process::kill_group(self.pid, libc::SIGKILL);
        }
    }
}

pub fn spawn(spec: &Spawn) -> io::Result<Child> {
    let mut cmd = std::process::Command::new(spec.program);
    cmd.arg0(spec.argv0)
        .args(spec.args)
        .current_dir(spec.cwd)
        .stdin(Stdio::null())
        .process_group(0);
    for k in crate::process::inherited_needle_vars() {
        cmd.env_remove(k);
    }
    for (k, v) in spec.env {
        cmd.env(k, v);
    }
    let log = spec.log.try_clone_to_owned()?;
    cmd.stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    match tokio::process::Command::from(cmd).spawn() {
        Ok(inner) => {
            let pid = inner
                .id()
                .ok_or_else(|| io::Error::other("the child ended before it was known"))?;
            Ok(Child {
                inner,
                pid,
                reaped: false,
            })
        }
        // The child reports why it could not exec, as an errno, without saying at which step:
        // a working directory that is not there is the likeliest cause to tell apart.
        Err(error) => {
            let stage = if spec.cwd.is_dir() {
                Stage::Program
            } else {
                Stage::Directory
            };
            let kind = error.kind();
            Err(io::Error::new(
                kind,
                NotStarted {
                    error,
                    stage,
                    dir: spec.cwd.to_path_buf(),
                },
            ))
        }
    }
}
