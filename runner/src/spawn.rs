//! Starting a local step's process, and waiting for it.
//!
//! `posix_spawn` called directly rather than through `std::process::Command`: for every spawn
//! that has variables of its own, `Command` copies the runner's whole environment into a map and
//! each entry into a new string (a good part of the runner's time per trivial step, measured in
//! BENCHMARKS.md), and opens `/dev/null` and duplicates the step's log each time. Here the
//! inherited environment is encoded once per runner, `/dev/null` is opened once, the caller's
//! log descriptor goes to both stdout and stderr, and the exit is awaited on a pidfd.
//!
//! What the child gets is what `Command` gave it: its own process group, an empty signal mask,
//! default signal handlers, stdin from `/dev/null`, stdout and stderr into the log, the working
//! directory, argv with its own `argv[0]`, and a program name without a `/` searched on `PATH`.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::OnceLock;

use tokio::io::unix::AsyncFd;

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

/// A started process, leader of its own process group. Dropped before it was waited for, its
/// group is killed (a run torn down mid-attempt leaves nothing running).
pub struct Child {
    pid: libc::pid_t,
    exit: Exit,
    reaped: bool,
}

/// How the end of a child is noticed: its pidfd becomes readable; where the kernel has no
/// pidfds (before Linux 5.3), a poll every few milliseconds.
enum Exit {
    Pidfd(AsyncFd<OwnedFd>),
    Poll,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Wait for the process to end and reap it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            // A pidfd registered after its process ended is reported ready at once.
            match &self.exit {
                Exit::Pidfd(fd) => fd.readable().await?.clear_ready(),
                Exit::Poll => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
        }
    }

    fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.reaped {
            return Err(io::Error::other("the process was already waited for"));
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local; `pid` is our own unreaped child.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        match r {
            0 => Ok(None),
            r if r == self.pid => {
                self.reaped = true;
                Ok(Some(ExitStatus::from_raw(status)))
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            crate::executor::kill_group(self.pid as u32, libc::SIGKILL);
            // Reaped now if it is already gone; otherwise it stays a zombie until the runner
            // exits, which is what dropping an unfinished attempt means.
            let _ = self.try_wait();
        }
    }
}

/// Start `spec` as a child in its own process group.
pub fn spawn(spec: &Spawn) -> io::Result<Child> {
    let program = cstring(spec.program.as_os_str())?;
    let mut argv_owned = Vec::with_capacity(spec.args.len() + 1);
    argv_owned.push(cstring(OsStr::new(spec.argv0))?);
    for a in spec.args {
        argv_owned.push(cstring(OsStr::new(a))?);
    }
    let argv = null_terminated(&argv_owned);

    let own: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| env_entry(OsStr::new(k), v))
        .collect::<io::Result<_>>()?;
    let base = inherited_env();
    let mut envp: Vec<*mut libc::c_char> = Vec::with_capacity(base.len() + own.len() + 1);
    for entry in base {
        let name = entry_name(entry.as_bytes());
        if !spec.env.iter().any(|(k, _)| k.as_bytes() == name) {
            envp.push(entry.as_ptr() as *mut _);
        }
    }
    envp.extend(own.iter().map(|c| c.as_ptr() as *mut libc::c_char));
    envp.push(std::ptr::null_mut());
    let cwd = cstring(spec.cwd.as_os_str())?;

    let null = dev_null()?;
    let log = spec.log.as_raw_fd();
    let mut actions = FileActions::new()?;
    actions.dup2(null, 0)?;
    actions.dup2(log, 1)?;
    actions.dup2(log, 2)?;
    actions.chdir(&cwd)?;
    let attr = Attr::new()?;

    let mut pid: libc::pid_t = 0;
    // A name without a slash is looked up on PATH, as `Command` does (the engine already looked
    // it up once; a name it did not find fails here as "not found").
    let start = if program.as_bytes().contains(&b'/') {
        libc::posix_spawn
    } else {
        libc::posix_spawnp
    };
    // SAFETY: every pointer passed lives until the call returns: program, the null-terminated
    // argv and envp arrays (and the strings they point into), the initialised file actions and
    // attributes. posix_spawn reports a failure to exec through its return value.
    let r = unsafe {
        start(
            &mut pid,
            program.as_ptr(),
            &actions.0,
            &attr.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let exit = if pidfd >= 0 {
        // SAFETY: the descriptor was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: an OwnedFd's descriptor stays open, and the same, until it is dropped.
        match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
            Ok(fd) => Exit::Pidfd(fd),
            Err(_) => Exit::Poll,
        }
    } else {
        Exit::Poll
    };
    Ok(Child {
        pid,
        exit,
        reaped: false,
    })
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} holds a NUL byte", s),
        )
    })
}

fn env_entry(k: &OsStr, v: &OsStr) -> io::Result<CString> {
    let mut bytes = Vec::with_capacity(k.len() + v.len() + 1);
    bytes.extend_from_slice(k.as_bytes());
    bytes.push(b'=');
    bytes.extend_from_slice(v.as_bytes());
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the variable {:?} holds a NUL byte", k),
        )
    })
}

/// `NAME` of a `NAME=value` entry.
fn entry_name(entry: &[u8]) -> &[u8] {
    // A name may not be empty, so an entry starting with `=` (which some shells leave) keeps
    // that first `=` in its name.
    let from = usize::from(entry.first() == Some(&b'='));
    match entry[from..].iter().position(|&b| b == b'=') {
        Some(i) => &entry[..from + i],
        None => entry,
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr() as *mut libc::c_char)
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// The runner's environment less its own `NEEDLE_*` variables (a step gets its own), encoded
/// once.
fn inherited_env() -> &'static [CString] {
    static ENV: OnceLock<Vec<CString>> = OnceLock::new();
    ENV.get_or_init(|| {
        let own = crate::executor::inherited_needle_vars();
        std::env::vars_os()
            .filter(|(k, _)| !own.contains(k))
            .filter_map(|(k, v)| env_entry(&k, &v).ok())
            .collect()
    })
}

/// `/dev/null`, opened once for every child's stdin.
fn dev_null() -> io::Result<libc::c_int> {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let fd: OwnedFd = std::fs::File::open("/dev/null")?.into();
    Ok(NULL.get_or_init(|| fd).as_raw_fd())
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        // SAFETY: a zeroed struct is what posix_spawn_file_actions_init expects to fill in.
        let mut a = FileActions(unsafe { std::mem::zeroed() });
        check(unsafe { libc::posix_spawn_file_actions_init(&mut a.0) })?;
        Ok(a)
    }

    fn dup2(&mut self, from: libc::c_int, to: libc::c_int) -> io::Result<()> {
        // SAFETY: initialised in `new`; the descriptors are plain integers here.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, from, to) })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: initialised in `new`; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

struct Attr(libc::posix_spawnattr_t);

impl Attr {
    /// A new process group, an empty signal mask, and SIGPIPE at its default (handlers are
    /// reset to the default by posix_spawn itself; ignored signals stay ignored).
    fn new() -> io::Result<Attr> {
        // SAFETY: zeroed structs, filled in by their init functions before any other use.
        let mut a = Attr(unsafe { std::mem::zeroed() });
        unsafe {
            check(libc::posix_spawnattr_init(&mut a.0))?;
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            check(libc::posix_spawnattr_setsigmask(&mut a.0, &empty))?;
            let mut pipe: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut pipe);
            libc::sigaddset(&mut pipe, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigdefault(&mut a.0, &pipe))?;
            check(libc::posix_spawnattr_setpgroup(&mut a.0, 0))?;
            let flags = libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF;
            check(libc::posix_spawnattr_setflags(
                &mut a.0,
                flags as libc::c_short,
            ))?;
        }
        Ok(a)
    }
}

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, destroyed once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("log");
        let log = std::fs::File::create(&log_path).unwrap();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, OsString)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let status = rt.block_on(async {
            let mut child = spawn(&Spawn {
                program: Path::new(program),
                argv0: program,
                args: &args,
                cwd: dir.path(),
                env: &env,
                log: log.as_fd(),
            })
            .unwrap();
            child.wait().await.unwrap()
        });
        (status, std::fs::read_to_string(&log_path).unwrap())
    }

    #[test]
    fn output_cwd_environment_and_status() {
        let (status, out) = run(
            "sh",
            &[
                "-c",
                "echo out; echo err >&2; ls; echo \"$A $PATH_SET\"; exit 3",
            ],
            &[("A", "1"), ("PATH_SET", "yes")],
        );
        assert_eq!(status.code(), Some(3));
        let lines: Vec<&str> = out.lines().collect();
        // The working directory is the one holding the log, and nothing else.
        assert_eq!(lines, ["out", "err", "log", "1 yes"]);
    }

    #[test]
    fn the_child_starts_with_no_blocked_signals_and_sigpipe_at_its_default() {
        // A blocked signal in the spawning thread, and SIGPIPE ignored (as Rust's runtime
        // leaves it in this test binary): neither reaches the child.
        // SAFETY: sigset_t filled in by sigemptyset/sigaddset; the mask is this thread's own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let (_, out) = run(
            "sh",
            &["-c", "grep -E '^Sig(Blk|Ign)' /proc/$$/status"],
            &[],
        );
        let mask = |name: &str| {
            let line = out.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(mask("SigBlk:"), 0, "{out}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    }

    #[test]
    fn a_variable_set_for_the_step_replaces_the_inherited_one() {
        // PATH is inherited; set anew it must appear once, with the new value.
        let (_, out) = run("/usr/bin/env", &[], &[("PATH", "/nowhere")]);
        let paths: Vec<&str> = out.lines().filter(|l| l.starts_with("PATH=")).collect();
        assert_eq!(paths, ["PATH=/nowhere"]);
    }

    #[test]
    fn own_group_and_signals() {
        let (status, out) = run(
            "sh",
            &["-c", "cut -d' ' -f5 /proc/$$/stat; echo $$; kill -9 $$"],
            &[],
        );
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        let lines: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(lines[0], lines[1], "the step leads its own process group");
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        for program in ["/no/such/program", "no-such-program-anywhere"] {
            let e = spawn(&Spawn {
                program: Path::new(program),
                argv0: program,
                args: &[],
                cwd: dir.path(),
                env: &[],
                log: log.as_fd(),
            })
            .err()
            .expect("spawning fails");
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{program}: {e}");
        }
    }

    #[test]
    fn entry_names() {
        assert_eq!(entry_name(b"A=1"), b"A");
        assert_eq!(entry_name(b"A=1=2"), b"A");
        assert_eq!(entry_name(b"=C:=x"), b"=C:");
        assert_eq!(entry_name(b"NOVALUE"), b"NOVALUE");
    }
}
