//! The fast spawn (`NEEDLE_SPAWN=clone`, Linux on x86_64 and aarch64): neither
//! `std::process::Command` nor `posix_spawn`, both suspend the calling thread until the
//! child has called `exec` (they are built on `vfork`), and on a machine whose every CPU runs a
//! step, the new child often queues behind a step on another CPU while the runner's CPU sits
//! idle: at N = 10,000 trivial steps, over 40 % of the idle time of a run (BENCHMARKS.md). `Command`
//! also copies the runner's whole environment for each spawn, and `posix_spawn` maps and unmaps
//! a fresh stack each time (a TLB shootdown on every CPU running a runner thread).
//!
//! Here the child is a `clone(CLONE_VM)` that shares the runner's memory without suspending it:
//! it runs on a stack of its own above a guard page (an overflow faults in the child instead
//! of writing over the runner's heap), makes raw system calls only (a libc wrapper would write
//! `errno`, which is the runner thread's; rustix, which writes no `errno`, has no `execve` or
//! `exit_group` in its 1.x API, so the `raw` module's `asm!` stays), never allocates, panics
//! or unwinds (`fail` exits with `exit_group`), and reads what the runner prepared for it, which
//! stays alive and untouched until the child is reaped. (Descriptors, signal handlers, the
//! working directory are the child's own copies, as after `fork`: it changes them freely, and
//! the runner may close the log once `spawn` returns.) The inherited environment is encoded
//! once per runner and `/dev/null` opened once. The exit is awaited on a pidfd; a child that
//! could not `exec` leaves the reason in shared memory and exits with 127, and [`Child::wait`]
//! reports it as the error it is.
//!
//! What the child gets is what `Command` gave it: its own process group, an empty signal mask,
//! default signal handlers (ignored signals stay ignored, except SIGPIPE, which Rust ignores),
//! stdin from `/dev/null`, stdout and stderr into the log, the working directory, argv with
//! its own `argv[0]`, and a program name without a `/` searched on the runner's `PATH` as
//! `execvp` searches (the engine has looked it up there already; a script without a `#!` line
//! is not run by `/bin/sh` instead, as `posix_spawn` did not either).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};

use tokio::io::unix::AsyncFd;

use super::{NotStarted, Spawn, Stage};

/// A started process, leader of its own process group. Dropped before it was waited for, its
/// group is killed (a run torn down mid-attempt leaves nothing running).
pub struct Child {
    pid: libc::pid_t,
    exit: ExitWatch,
    reaped: bool,
    /// What the child runs on until it execs; released once it has exec'd or exited.
    pad: Option<Box<Launchpad>>,
}

/// How the end of a child is noticed: its pidfd becomes readable; where the kernel has no
/// pidfds (before Linux 5.3), a poll every few milliseconds.
enum ExitWatch {
    Pidfd(AsyncFd<OwnedFd>),
    Poll,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Wait for the process to end and reap it. A process that never ran its program (it
    /// could not `exec`: not found, not executable, no such working directory…) is an error
    /// of the [`io::ErrorKind`] of that reason, holding a [`NotStarted`] that says where.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            // A pidfd registered after its process ended is reported ready at once.
            match &self.exit {
                ExitWatch::Pidfd(fd) => fd.readable().await?.clear_ready(),
                ExitWatch::Poll => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
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
                // Gone, so no longer running on the launchpad.
                let pad = self
                    .pad
                    .take()
                    .expect("a child keeps its launchpad until reaped");
                match pad.args.error.load(Ordering::Acquire) {
                    0 => Ok(Some(ExitStatus::from_raw(status))),
                    errno => Err(not_started(
                        errno,
                        pad.args.stage.load(Ordering::Relaxed),
                        &pad.cwd,
                    )),
                }
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
            crate::process::kill_group(self.pid as u32, libc::SIGKILL);
            // Reaped now if it is already gone; otherwise it stays a zombie until the runner
            // exits, which is what dropping an unfinished attempt means.
            let _ = self.try_wait();
        }
        if let Some(pad) = self.pad.take() {
            // The kernel clears `running` once the child has exec'd or exited; until then it
            // may still be on this memory, which then must never be reused.
            if pad.args.running.load(Ordering::Acquire) != 0 {
                Box::leak(pad);
            }
        }
    }
}

fn not_started(errno: i32, stage: i32, dir: &CString) -> io::Error {
    let error = io::Error::from_raw_os_error(errno);
    let dir = std::path::PathBuf::from(OsStr::from_bytes(dir.as_bytes()));
    let stage = match stage {
        1 => Stage::Group,
        2 => Stage::Descriptors,
        3 => Stage::Directory,
        _ => Stage::Program,
    };
    io::Error::new(error.kind(), NotStarted { error, stage, dir })
}

/// Start `spec` as a child in its own process group. Returns once the child exists; whether
/// its program started, [`Child::wait`] tells.
pub fn spawn(spec: &Spawn) -> io::Result<Child> {
    let mut pad = Launchpad::new(spec)?;
    let pid = pad.launch()?;
    // Owned by a Child from here on: should anything below unwind, its Drop keeps the pad
    // (leaked) while the child may still run on it.
    let mut child = Child {
        pid,
        exit: ExitWatch::Poll,
        reaped: false,
        pad: Some(pad),
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd >= 0 {
        // SAFETY: the descriptor was just returned to us and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        if let Ok(fd) =
            // SAFETY: an OwnedFd's descriptor stays open, and the same, until it is dropped.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        {
            child.exit = ExitWatch::Pidfd(fd);
        }
    }
    Ok(child)
}

/// Bytes of stack the child runs on until it execs: a few raw system calls deep.
const CHILD_STACK: usize = 16 * 1024;

/// The child's stack: [`CHILD_STACK`] bytes above a guard page, so that an overflow faults
/// instead of writing over the runner's heap. Mapped once and kept for later spawns when
/// dropped: mapping and unmapping one per spawn costs a TLB shoot-down on every CPU the runner
/// runs on (what `posix_spawn` pays).
struct Stack {
    /// The start of the mapping: the guard page.
    base: usize,
}

/// Stacks no child runs on, for the next spawns.
static FREE_STACKS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf reads a constant of the system.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize)
}

impl Stack {
    fn take() -> io::Result<Stack> {
        if let Some(base) = FREE_STACKS.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(Stack { base });
        }
        let page = page_size();
        // SAFETY: a new private anonymous mapping, at an address the kernel chooses; nothing
        // else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page + CHILD_STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the first page of the mapping just made, which nothing uses.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: the mapping just made, unused.
            unsafe { libc::munmap(base, page + CHILD_STACK) };
            return Err(e);
        }
        Ok(Stack {
            base: base as usize,
        })
    }

    /// Where the child's stack starts: stacks grow down, towards the guard page.
    fn top(&self) -> *mut libc::c_void {
        (self.base + page_size() + CHILD_STACK) as *mut libc::c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        FREE_STACKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.base);
    }
}

/// Everything the child reads or writes before it execs, in one allocation that outlives it.
struct Launchpad {
    args: ChildArgs,
    stack: Stack,
    // Owners of what `args` points into.
    _programs: Vec<CString>,
    _program_ptrs: Vec<*const libc::c_char>,
    _argv: Vec<CString>,
    _argv_ptrs: Vec<*mut libc::c_char>,
    _env: Vec<CString>,
    _envp: Vec<*mut libc::c_char>,
    cwd: CString,
}

// SAFETY: the raw pointers point into the Launchpad's own buffers (or the runner's encoded
// environment, alive for the whole process); nothing else holds them.
unsafe impl Send for Launchpad {}

/// What the child reads between `clone` and `exec`.
#[repr(C)]
struct ChildArgs {
    /// Null-terminated list of paths to exec, tried in order as `execvp` does.
    programs: *const *const libc::c_char,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
    cwd: *const libc::c_char,
    stdin: libc::c_int,
    log: libc::c_int,
    /// The errno of the call that failed, set by a child that could not exec.
    error: AtomicI32,
    /// Which of the child's steps failed (a [`Stage`]), with `error`.
    stage: AtomicI32,
    /// Non-zero until the child has exec'd or exited (`CLONE_CHILD_CLEARTID`).
    running: AtomicI32,
}

impl Launchpad {
    fn new(spec: &Spawn) -> io::Result<Box<Launchpad>> {
        let program = cstring(spec.program.as_os_str())?;
        // Where exec looks, in order: the program itself, or each `PATH` entry for a bare name.
        let programs = if program.as_bytes().contains(&b'/') {
            vec![program]
        } else {
            on_path(program.as_bytes())
        };
        let program_ptrs: Vec<*const libc::c_char> = programs
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let mut argv = Vec::with_capacity(spec.args.len() + 1);
        argv.push(cstring(OsStr::new(spec.argv0))?);
        for a in spec.args {
            argv.push(cstring(OsStr::new(a))?);
        }
        let argv_ptrs = null_terminated(&argv);
        let env: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| env_entry(OsStr::new(k), v))
            .collect::<io::Result<_>>()?;
        let base = inherited_env();
        let mut envp: Vec<*mut libc::c_char> = Vec::with_capacity(base.len() + env.len() + 1);
        for entry in base {
            let name = entry_name(entry.as_bytes());
            if !spec.env.iter().any(|(k, _)| k.as_bytes() == name) {
                envp.push(entry.as_ptr() as *mut _);
            }
        }
        envp.extend(env.iter().map(|c| c.as_ptr() as *mut libc::c_char));
        envp.push(std::ptr::null_mut());
        let cwd = cstring(spec.cwd.as_os_str())?;
        Ok(Box::new(Launchpad {
            args: ChildArgs {
                programs: program_ptrs.as_ptr(),
                argv: argv_ptrs.as_ptr(),
                envp: envp.as_ptr(),
                cwd: cwd.as_ptr(),
                stdin: dev_null()?,
                log: spec.log.as_raw_fd(),
                error: AtomicI32::new(0),
                stage: AtomicI32::new(0),
                running: AtomicI32::new(1),
            },
            stack: Stack::take()?,
            _programs: programs,
            _program_ptrs: program_ptrs,
            _argv: argv,
            _argv_ptrs: argv_ptrs,
            _env: env,
            _envp: envp,
            cwd,
        }))
    }

    /// `clone(CLONE_VM)` running [`child_main`] on this pad. Signals are blocked around it, so
    /// the child starts with all of them blocked and no handler of ours runs in it before it
    /// has reset them.
    fn launch(&mut self) -> io::Result<libc::pid_t> {
        let top = self.stack.top();
        let args = &mut self.args as *mut ChildArgs;
        // SAFETY: sigset_t values are filled in by sigfillset/pthread_sigmask before use, and
        // the masks are this thread's. The child gets `args` and a stack that live in this
        // Launchpad, which the Child keeps until the child is reaped (or leaks, see its Drop);
        // child_main makes raw system calls only and never returns.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD,
                args as *mut libc::c_void,
                std::ptr::null_mut::<libc::pid_t>(),
                std::ptr::null_mut::<libc::c_void>(),
                (*args).running.as_ptr(),
            );
            let error = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(error);
            }
            // The child makes its group itself, but maybe not yet: made here too, a signal to
            // the group from now on reaches it (as shells do). Once the child has exec'd this
            // fails, the group being made.
            libc::setpgid(pid, pid);
            Ok(pid)
        }
    }
}

/// The child, from `clone` to `exec`, on memory the runner shares with it: raw system calls
/// only, and no write but to its own stack, `args.error` and `args.stage`. A failure leaves
/// its errno and stage there and exits with 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs of a Launchpad that outlives this child, which the runner
    // does not touch meanwhile; every pointer in it is valid, lists are null-terminated.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |stage: Stage, r: isize| -> ! {
            a.stage.store(stage as i32, Ordering::Relaxed);
            a.error.store((-r).max(1) as i32, Ordering::Release);
            // exit_group does not return.
            loop {
                raw::syscall1(libc::SYS_exit_group, 127);
            }
        };
        // The runner's handlers must not run here: every caught signal goes back to its
        // default, ignored ones stay ignored, and SIGPIPE (which Rust ignores) goes to its
        // default, as a shell starts a program. The kernel's struct sigaction starts with the
        // handler on every architecture; all zeros is SIG_DFL with no flags.
        let dfl = [0u64; 4];
        for sig in 1..=64usize {
            if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
                continue;
            }
            if sig != libc::SIGPIPE as usize {
                let mut old = [0u64; 4];
                let r = raw::syscall4(libc::SYS_rt_sigaction, sig, 0, old.as_mut_ptr() as usize, 8);
                if r != 0 || old[0] as usize == libc::SIG_DFL || old[0] as usize == libc::SIG_IGN {
                    continue;
                }
            }
            raw::syscall4(libc::SYS_rt_sigaction, sig, dfl.as_ptr() as usize, 0, 8);
        }
        let r = raw::syscall2(libc::SYS_setpgid, 0, 0);
        if r != 0 {
            fail(Stage::Group, r);
        }
        for (from, to) in [(a.stdin, 0), (a.log, 1), (a.log, 2)] {
            // dup3 refuses to copy a descriptor onto itself; that one only loses CLOEXEC.
            let r = if from == to {
                raw::syscall3(libc::SYS_fcntl, to as usize, libc::F_SETFD as usize, 0)
            } else {
                raw::syscall3(libc::SYS_dup3, from as usize, to as usize, 0)
            };
            if r < 0 {
                fail(Stage::Descriptors, r);
            }
        }
        let r = raw::syscall1(libc::SYS_chdir, a.cwd as usize);
        if r != 0 {
            fail(Stage::Directory, r);
        }
        let empty = 0u64;
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &empty as *const u64 as usize,
            0,
            8,
        );
        // As execvp: the first that is not missing wins; permission denied only if none ran.
        let mut denied = false;
        let mut p = a.programs;
        while !(*p).is_null() {
            let r = raw::syscall3(
                libc::SYS_execve,
                *p as usize,
                a.argv as usize,
                a.envp as usize,
            );
            match -r as i32 {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => fail(Stage::Program, r),
            }
            p = p.add(1);
        }
        let e = if denied { libc::EACCES } else { libc::ENOENT };
        fail(Stage::Program, -e as isize)
    }
}

/// System calls without libc: a libc wrapper that fails sets `errno`, which in a child sharing
/// the runner's memory (and thread pointer) is the runner thread's own. Each returns the
/// kernel's result: the value, or minus the errno.
mod raw {
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn syscall4(n: libc::c_long, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes a system call and arguments valid for it.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a1, in("rsi") a2, in("rdx") a3, in("r10") a4,
                lateout("rcx") _, lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    #[cfg(target_arch = "aarch64")]
    pub unsafe fn syscall4(n: libc::c_long, a1: usize, a2: usize, a3: usize, a4: usize) -> isize {
        let ret: isize;
        // SAFETY: the caller passes a system call and arguments valid for it.
        unsafe {
            std::arch::asm!(
                "svc 0",
                in("x8") n,
                inlateout("x0") a1 as isize => ret,
                in("x1") a2, in("x2") a3, in("x3") a4,
                options(nostack),
            );
        }
        ret
    }

    pub unsafe fn syscall3(n: libc::c_long, a1: usize, a2: usize, a3: usize) -> isize {
        // SAFETY: as syscall4; the kernel ignores the unused argument.
        unsafe { syscall4(n, a1, a2, a3, 0) }
    }

    pub unsafe fn syscall2(n: libc::c_long, a1: usize, a2: usize) -> isize {
        // SAFETY: as syscall4.
        unsafe { syscall4(n, a1, a2, 0, 0) }
    }

    pub unsafe fn syscall1(n: libc::c_long, a1: usize) -> isize {
        // SAFETY: as syscall4.
        unsafe { syscall4(n, a1, 0, 0, 0) }
    }
}

/// `dir/name` for each directory on the runner's `PATH` (`/bin:/usr/bin` where it has none),
/// as `execvp` searches.
fn on_path(name: &[u8]) -> Vec<CString> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/bin:/usr/bin"));
    path.as_bytes()
        .split(|&b| b == b':')
        .filter_map(|dir| {
            let mut full = Vec::with_capacity(dir.len() + name.len() + 1);
            // An empty entry is the working directory.
            full.extend_from_slice(dir);
            if !dir.is_empty() {
                full.push(b'/');
            }
            full.extend_from_slice(name);
            CString::new(full).ok()
        })
        .collect()
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
        let own = crate::process::inherited_needle_vars();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_stack_sits_above_a_page_nothing_may_touch() {
        let stack = Stack::take().unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        // The permissions of the mapping holding `addr`.
        let perms = |addr: usize| -> &str {
            maps.lines()
                .find_map(|l| {
                    let (range, rest) = l.split_once(' ')?;
                    let (from, to) = range.split_once('-')?;
                    let (from, to) = (
                        usize::from_str_radix(from, 16).ok()?,
                        usize::from_str_radix(to, 16).ok()?,
                    );
                    (from <= addr && addr < to).then(|| &rest[..4])
                })
                .unwrap_or_else(|| panic!("nothing mapped at {addr:x}:\n{maps}"))
        };
        let top = stack.top() as usize;
        assert_eq!(top, stack.base + page_size() + CHILD_STACK);
        assert_eq!(perms(top - 1), "rw-p", "the stack's top");
        assert_eq!(
            perms(stack.base + page_size()),
            "rw-p",
            "the stack's bottom"
        );
        assert_eq!(
            perms(stack.base + page_size() - 1),
            "---p",
            "the guard page"
        );
        assert_eq!(perms(stack.base), "---p", "the guard page");
    }

    #[test]
    fn entry_names() {
        assert_eq!(entry_name(b"A=1"), b"A");
        assert_eq!(entry_name(b"A=1=2"), b"A");
        assert_eq!(entry_name(b"=C:=x"), b"=C:");
        assert_eq!(entry_name(b"NOVALUE"), b"NOVALUE");
    }
}
