//! Starting a local step's process, and waiting for it.
//!
//! Two ways, chosen per runner by `NEEDLE_SPAWN`:
//! - `command` (the default, on every Unix): `std::process::Command` with its own process
//!   group, awaited through tokio ([`command`]). Safe code only.
//! - `clone` (Linux on x86_64 and aarch64): a `clone(CLONE_VM)` child that does not suspend the
//!   runner while it execs, with raw system calls on a launchpad the runner keeps ([`clone`]).
//!   Faster per step for runs of many short steps (BENCHMARKS.md), and the reason for most of
//!   the runner's `unsafe`.
//!
//! Both give the child the same things (its own group, `/dev/null` in, the log out, the working
//! directory, the environment, an empty signal mask and default handlers) and report a program
//! that could not start as a [`NotStarted`] error, from [`spawn`] or from [`Child::wait`].

use std::ffi::OsString;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::process::ExitStatus;

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod clone;
mod command;

/// What to start.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub argv0: &'a str,
    pub args: &'a [String],
    pub cwd: &'a Path,
    /// Set on top of the runner's environment less its `NEEDLE_*` variables; a variable set
    /// here replaces an inherited one of the same name.
    pub env: &'a [(String, OsString)],
    /// Where stdout and stderr go.
    pub log: BorrowedFd<'a>,
}

/// How steps are started (`NEEDLE_SPAWN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Command,
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    Clone,
}

impl Mode {
    /// `NEEDLE_SPAWN` of the runner's environment, read once: `command` (the default) or
    /// `clone` where it exists. Anything else is said once and the default used.
    pub fn configured() -> Mode {
        static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| match std::env::var("NEEDLE_SPAWN").as_deref() {
            Err(_) | Ok("" | "command") => Mode::Command,
            #[cfg(all(
                target_os = "linux",
                any(target_arch = "x86_64", target_arch = "aarch64")
            ))]
            Ok("clone") => Mode::Clone,
            Ok(other) => {
                tracing::warn!(
                    "NEEDLE_SPAWN={other} is not a way this needle starts steps here \
                     (`command`, or `clone` on Linux x86_64 and aarch64): using `command`"
                );
                Mode::Command
            }
        })
    }
}

/// A started process, leader of its own process group. Dropped before it was waited for, its
/// group is killed (a run torn down mid-attempt leaves nothing running).
pub enum Child {
    Command(command::Child),
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    Clone(clone::Child),
}

impl Child {
    pub fn id(&self) -> u32 {
        match self {
            Child::Command(c) => c.id(),
            #[cfg(all(
                target_os = "linux",
                any(target_arch = "x86_64", target_arch = "aarch64")
            ))]
            Child::Clone(c) => c.id(),
        }
    }

    /// Wait for the process to end and reap it. A process that never ran its program is an
    /// error of the [`io::ErrorKind`] of that reason, holding a [`NotStarted`].
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Child::Command(c) => c.wait().await,
            #[cfg(all(
                target_os = "linux",
                any(target_arch = "x86_64", target_arch = "aarch64")
            ))]
            Child::Clone(c) => c.wait().await,
        }
    }
}

/// Start `spec` as a child in its own process group, the configured way ([`Mode`]).
pub fn spawn(spec: &Spawn) -> io::Result<Child> {
    spawn_with(Mode::configured(), spec)
}

fn spawn_with(mode: Mode, spec: &Spawn) -> io::Result<Child> {
    match mode {
        Mode::Command => command::spawn(spec).map(Child::Command),
        #[cfg(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        ))]
        Mode::Clone => clone::spawn(spec).map(Child::Clone),
    }
}

/// What a child does before its program runs, in order; which one failed says why it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Stage {
    Group = 1,
    Descriptors = 2,
    Directory = 3,
    Program = 4,
}

/// Why a process could not start its program: the system's error, and where it met it.
#[derive(Debug)]
pub struct NotStarted {
    pub error: io::Error,
    pub stage: Stage,
    /// The working directory it was to run in.
    pub dir: std::path::PathBuf,
}

impl std::fmt::Display for NotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stage {
            Stage::Program => self.error.fmt(f),
            Stage::Directory => write!(
                f,
                "entering its working directory `{}`: {}",
                self.dir.display(),
                self.error
            ),
            Stage::Descriptors => write!(f, "redirecting its output: {}", self.error),
            Stage::Group => write!(f, "making its process group: {}", self.error),
        }
    }
}

impl std::error::Error for NotStarted {}

/// Whether `e` (from [`spawn`] or [`Child::wait`]) says the program never started, and why.
pub fn never_started(e: &io::Error) -> Option<&NotStarted> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NotStarted>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::process::ExitStatusExt;

    /// Every way this needle can start steps: each test runs against all of them.
    fn modes() -> Vec<Mode> {
        vec![
            Mode::Command,
            #[cfg(all(
                target_os = "linux",
                any(target_arch = "x86_64", target_arch = "aarch64")
            ))]
            Mode::Clone,
        ]
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn run(mode: Mode, program: &str, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("log");
        let log = std::fs::File::create(&log_path).unwrap();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, OsString)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let rt = runtime();
        let status = rt.block_on(async {
            let mut child = spawn_with(
                mode,
                &Spawn {
                    program: Path::new(program),
                    argv0: program,
                    args: &args,
                    cwd: dir.path(),
                    env: &env,
                    log: log.as_fd(),
                },
            )
            .unwrap();
            child.wait().await.unwrap()
        });
        (status, std::fs::read_to_string(&log_path).unwrap())
    }

    #[test]
    fn output_cwd_environment_and_status() {
        for mode in modes() {
            let (status, out) = run(
                mode,
                "sh",
                &[
                    "-c",
                    "echo out; echo err >&2; ls; echo \"$A $PATH_SET\"; exit 3",
                ],
                &[("A", "1"), ("PATH_SET", "yes")],
            );
            assert_eq!(status.code(), Some(3), "{mode:?}");
            let lines: Vec<&str> = out.lines().collect();
            // The working directory is the one holding the log, and nothing else.
            assert_eq!(lines, ["out", "err", "log", "1 yes"], "{mode:?}");
        }
    }

    #[test]
    fn the_child_starts_with_no_blocked_signals_and_sigpipe_at_its_default() {
        // A blocked signal in the spawning thread, and SIGPIPE ignored (as Rust's runtime
        // leaves it in this test binary): neither reaches the child. (The safe spawn passes
        // on the spawning thread's mask, which the runner empties when it starts: its
        // thread's mask is cleared here first; `tests/e2e/exec_env.rs` starts a real runner
        // with a signal blocked.)
        // SAFETY: sigset_t filled in by sigemptyset/sigaddset; the mask is this thread's own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        // The fast spawn first: it must clear a mask the spawning thread holds.
        for mode in modes().into_iter().rev() {
            if mode == Mode::Command {
                // SAFETY: as above; the mask is this thread's own.
                unsafe {
                    let mut none: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut none);
                    libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                }
            }
            // Read by the shell itself, with builtins: a shell blocks every signal while it
            // forks, so a `grep` it forked could see that mask instead of the one it got.
            let (_, out) = run(
                mode,
                "sh",
                &[
                    "-c",
                    "while read -r l; do case $l in Sig*) echo \"$l\";; esac; done < /proc/self/status",
                ],
                &[],
            );
            let mask = |name: &str| {
                let line = out.lines().find(|l| l.starts_with(name)).unwrap();
                u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
            };
            assert_eq!(mask("SigBlk:"), 0, "{mode:?}: {out}");
            assert_eq!(
                mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)),
                0,
                "{mode:?}: {out}"
            );
        }
    }

    #[test]
    fn a_variable_set_for_the_step_replaces_the_inherited_one() {
        for mode in modes() {
            // PATH is inherited; set anew it must appear once, with the new value.
            let (_, out) = run(mode, "/usr/bin/env", &[], &[("PATH", "/nowhere")]);
            let paths: Vec<&str> = out.lines().filter(|l| l.starts_with("PATH=")).collect();
            assert_eq!(paths, ["PATH=/nowhere"], "{mode:?}");
        }
    }

    #[test]
    fn own_group_and_signals() {
        for mode in modes() {
            let (status, out) = run(
                mode,
                "sh",
                &["-c", "cut -d' ' -f5 /proc/$$/stat; echo $$; kill -9 $$"],
                &[],
            );
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{mode:?}");
            let lines: Vec<&str> = out.split_whitespace().collect();
            assert_eq!(
                lines[0], lines[1],
                "{mode:?}: the step leads its own process group"
            );
        }
    }

    #[test]
    fn a_program_that_cannot_start_is_an_error_of_its_kind() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let script = dir.path().join("not-executable");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let rt = runtime();
        let missing_dir = dir.path().join("gone");
        for mode in modes() {
            for (program, cwd, kind) in [
                ("/no/such/program", dir.path(), io::ErrorKind::NotFound),
                (
                    "no-such-program-anywhere",
                    dir.path(),
                    io::ErrorKind::NotFound,
                ),
                (
                    script.to_str().unwrap(),
                    dir.path(),
                    io::ErrorKind::PermissionDenied,
                ),
                ("sh", missing_dir.as_path(), io::ErrorKind::NotFound),
            ] {
                // Told by `spawn` or by `wait`, depending on the way.
                let e = rt.block_on(async {
                    let spawned = spawn_with(
                        mode,
                        &Spawn {
                            program: Path::new(program),
                            argv0: program,
                            args: &[],
                            cwd,
                            env: &[],
                            log: log.as_fd(),
                        },
                    );
                    match spawned {
                        Err(e) => e,
                        Ok(mut child) => child.wait().await.expect_err("it never starts"),
                    }
                });
                let why = never_started(&e).unwrap_or_else(|| panic!("{program}: {e:?}"));
                assert_eq!(
                    why.error.kind(),
                    kind,
                    "{mode:?}: {program} in {}: {why}",
                    cwd.display()
                );
                let in_missing_dir = cwd == missing_dir.as_path();
                assert_eq!(why.stage == Stage::Directory, in_missing_dir, "{why:?}");
                let said = format!(
                    "entering its working directory `{}`: ",
                    missing_dir.display()
                );
                assert_eq!(why.to_string().starts_with(&said), in_missing_dir, "{why}");
            }
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("log")).unwrap(), "");
    }

    #[test]
    fn the_child_has_its_group_as_soon_as_spawn_returns() {
        // The group is signalled right away: the child must already be in it, or the step
        // would run on untouched.
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let rt = runtime();
        for mode in modes() {
            for _ in 0..50 {
                let status = rt.block_on(async {
                    let mut child = spawn_with(
                        mode,
                        &Spawn {
                            program: Path::new("sleep"),
                            argv0: "sleep",
                            args: &["30".to_string()],
                            cwd: dir.path(),
                            env: &[],
                            log: log.as_fd(),
                        },
                    )
                    .unwrap();
                    crate::process::kill_group(child.id(), libc::SIGKILL);
                    child.wait().await.unwrap()
                });
                assert_eq!(status.signal(), Some(libc::SIGKILL), "{mode:?}");
            }
        }
    }

    #[test]
    fn many_children_at_once_each_get_their_own_arguments() {
        for mode in modes() {
            let dir = tempfile::tempdir().unwrap();
            let rt = runtime();
            rt.block_on(async {
                let mut children = Vec::new();
                for i in 0..64 {
                    let log = std::fs::File::create(dir.path().join(format!("log{i}"))).unwrap();
                    let child = spawn_with(
                        mode,
                        &Spawn {
                            program: Path::new("sh"),
                            argv0: "sh",
                            args: &["-c".to_string(), format!("echo {i} $N")],
                            cwd: dir.path(),
                            env: &[("N".to_string(), OsString::from(format!("n{i}")))],
                            log: log.as_fd(),
                        },
                    )
                    .unwrap();
                    children.push(child);
                }
                for mut c in children {
                    assert!(c.wait().await.unwrap().success());
                }
            });
            for i in 0..64 {
                let out = std::fs::read_to_string(dir.path().join(format!("log{i}"))).unwrap();
                assert_eq!(out, format!("{i} n{i}\n"), "{mode:?}");
            }
        }
    }
}
