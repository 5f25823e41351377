//! A fault-injecting filesystem layer for tests, loaded with `LD_PRELOAD`: it stands in for the
//! C library's `write`, `writev`, `pwrite`, `pwrite64`, `fsync`, `fdatasync` and
//! `sync_file_range` (what Rust's `File::write`, `write_at`, `sync_all`, `sync_data` and sled
//! 0.34's log writer call), and fails chosen calls on files under one directory, so a test can
//! make the writes of a library it does not control (sled, in the store's `meta/`) fail as a
//! dying disk or a full one would.
//!
//! ```text
//! NEEDLE_FAULTFS_DIR=DIR        only calls on a file under DIR count (its path, as
//!                               /proc/self/fd/N names it, starts with DIR/); unset: none do
//! NEEDLE_FAULTFS_TRACE=PATH     append `N CALL FILE` for each call that counts (`N CALL FILE
//!                               failed` for one made to fail)
//! NEEDLE_FAULTFS_AT=N           the N-th call that counts (1-based) fails; `N+`: and every later
//!                               one, as on a disk that is gone
//! NEEDLE_FAULTFS_ERRNO=E        the error it fails with: `EIO` (the default) or `ENOSPC`
//! ```
//!
//! Every other call, and every call on another file, goes to the real function
//! (`dlsym(RTLD_NEXT, …)`) unchanged. The counters are per process: a child process that loads
//! the library again counts from 1, and one that writes nothing under DIR is unaffected.

use std::ffi::{CStr, c_int, c_uint, c_void};
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use libc::{iovec, off_t, off64_t, size_t, ssize_t};

/// The next definition after this library's of the C function `$name`, as type `$ty`.
macro_rules! real {
    ($name:literal, $ty:ty) => {{
        static FOUND: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
        let mut f = FOUND.load(Ordering::Acquire);
        if f.is_null() {
            // SAFETY: the name is a NUL-terminated literal; RTLD_NEXT looks it up in the
            // objects loaded after this one, where the C library defines it.
            f = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!($name, "\0").as_ptr().cast()) };
            if f.is_null() {
                std::process::abort();
            }
            FOUND.store(f, Ordering::Release);
        }
        // SAFETY: `f` is the C library's `$name`, whose C signature `$ty` spells.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(f) }
    }};
}

/// What the environment asked for, read once, at the first call.
struct Config {
    /// DIR with a trailing `/`: the prefix of the paths that count.
    dir: Option<Vec<u8>>,
    /// The descriptor of the trace file, opened for appending.
    trace: Option<c_int>,
    /// The first call to fail, and whether every later one fails too.
    at: Option<(u64, bool)>,
    errno: c_int,
}

/// Calls on files under DIR so far, in this process.
static COUNTED: AtomicU64 = AtomicU64::new(0);

static CONFIG: OnceLock<Config> = OnceLock::new();

impl Config {
    fn from_env() -> Config {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let dir = var("NEEDLE_FAULTFS_DIR").map(|d| format!("{}/", d.trim_end_matches('/')));
        let trace = var("NEEDLE_FAULTFS_TRACE").map(|path| {
            let Ok(path) = std::ffi::CString::new(path) else {
                die(c"NEEDLE_FAULTFS_TRACE holds a NUL byte")
            };
            // SAFETY: `path` is NUL-terminated; open reads nothing else.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd < 0 {
                die(c"NEEDLE_FAULTFS_TRACE cannot be opened")
            }
            fd
        });
        let at = var("NEEDLE_FAULTFS_AT").map(|v| {
            let (n, every_later) = match v.strip_suffix('+') {
                Some(n) => (n, true),
                None => (v.as_str(), false),
            };
            match n.parse::<u64>() {
                Ok(n) if n > 0 => (n, every_later),
                _ => die(c"NEEDLE_FAULTFS_AT must be N or N+, N from 1"),
            }
        });
        let errno = match var("NEEDLE_FAULTFS_ERRNO").as_deref() {
            None | Some("EIO") => libc::EIO,
            Some("ENOSPC") => libc::ENOSPC,
            Some(_) => die(c"NEEDLE_FAULTFS_ERRNO must be EIO or ENOSPC"),
        };
        Config {
            dir: dir.map(String::into_bytes),
            trace,
            at,
            errno,
        }
    }
}

/// A configuration that cannot be followed ends the process: a test must not pass because
/// its faults were never injected. Said through the real `write`, as the library's own
/// printing would come back here while its configuration is being read.
fn die(why: &CStr) -> ! {
    let real = real!(
        "write",
        unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t
    );
    for part in [c"needle-faultfs: ", why, c"\n"] {
        let bytes = part.to_bytes();
        // SAFETY: a valid buffer of `bytes.len()` bytes to the real write; a failure to say
        // why changes nothing, the process ends next.
        unsafe { real(2, bytes.as_ptr().cast(), bytes.len()) };
    }
    std::process::abort()
}

/// Whether the call `call` on `fd` is made to fail, and with which `errno`; counts and traces
/// it when `fd` is a file under DIR. It allocates nothing: a signal handler may call `write`
/// (tokio's does, for SIGCHLD) while the interrupted thread holds the allocator's lock.
fn fault(fd: c_int, call: &str) -> Option<c_int> {
    let config = CONFIG.get_or_init(Config::from_env);
    let dir = config.dir.as_deref()?;
    let mut link = Line::new();
    write!(link, "/proc/self/fd/{fd}\0").ok()?;
    let mut buf = [0u8; 4096];
    // SAFETY: `link` is NUL-terminated; readlink writes at most `buf.len()` bytes into `buf`.
    let len = unsafe { libc::readlink(link.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let path = &buf[..usize::try_from(len).ok()?];
    if !path.starts_with(dir) {
        return None;
    }
    let n = COUNTED.fetch_add(1, Ordering::SeqCst) + 1;
    let fails = config
        .at
        .is_some_and(|(at, every_later)| n == at || (every_later && n > at));
    if let Some(trace) = config.trace {
        let mut line = Line::new();
        let written = write!(line, "{n} {call} ")
            .and_then(|()| line.push(path))
            .and_then(|()| line.push(if fails { b" failed\n" } else { b"\n" }));
        if written.is_err() {
            die(c"a trace line is longer than its buffer");
        }
        let real = real!(
            "write",
            unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t
        );
        // SAFETY: a valid buffer of `line.len` bytes; one short append of the trace, which
        // O_APPEND keeps whole beside other threads' lines.
        unsafe { real(trace, line.as_ptr().cast(), line.len) };
    }
    fails.then_some(config.errno)
}

/// A line formatted on the stack.
struct Line {
    buf: [u8; 4352],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 4352],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) -> std::fmt::Result {
        let end = self.len + bytes.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    fn as_ptr(&self) -> *const libc::c_char {
        self.buf.as_ptr().cast()
    }
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes())
    }
}

/// Reads the configuration as the library is loaded, before the program's `main` and its
/// threads and signal handlers: the first write may come from any of them.
extern "C" fn load() {
    CONFIG.get_or_init(Config::from_env);
}

// SAFETY: `.init_array` holds pointers to functions the dynamic loader calls, without
// arguments, when it loads this library; `load` is one.
#[used]
#[unsafe(link_section = ".init_array")]
static LOAD: extern "C" fn() = load;

/// The failed call's return value, `errno` set.
fn failed<T: From<i8>>(errno: c_int) -> T {
    // SAFETY: __errno_location gives this thread's errno, valid for the thread's life.
    unsafe { *libc::__errno_location() = errno };
    T::from(-1)
}

/// `write(2)`, failed when the plan says so.
///
/// # Safety
/// As the C library's `write`: `buf` holds `count` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    if let Some(errno) = fault(fd, "write") {
        return failed(errno);
    }
    let real = real!(
        "write",
        unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t
    );
    // SAFETY: the caller's arguments, passed on unchanged to the function they were meant for.
    unsafe { real(fd, buf, count) }
}

/// `writev(2)`, failed when the plan says so.
///
/// # Safety
/// As the C library's `writev`: `iov` points at `iovcnt` valid `iovec`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, iovcnt: c_int) -> ssize_t {
    if let Some(errno) = fault(fd, "writev") {
        return failed(errno);
    }
    let real = real!(
        "writev",
        unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t
    );
    // SAFETY: the caller's arguments, passed on unchanged to the function they were meant for.
    unsafe { real(fd, iov, iovcnt) }
}

/// `pwrite(2)`, failed when the plan says so.
///
/// # Safety
/// As the C library's `pwrite`: `buf` holds `count` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    offset: off_t,
) -> ssize_t {
    if let Some(errno) = fault(fd, "pwrite") {
        return failed(errno);
    }
    let real = real!(
        "pwrite",
        unsafe extern "C" fn(c_int, *const c_void, size_t, off_t) -> ssize_t
    );
    // SAFETY: the caller's arguments, passed on unchanged to the function they were meant for.
    unsafe { real(fd, buf, count, offset) }
}

/// `pwrite64`, what Rust's `FileExt::write_at` calls on Linux, failed when the plan says so.
///
/// # Safety
/// As the C library's `pwrite64`: `buf` holds `count` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pwrite64(
    fd: c_int,
    buf: *const c_void,
    count: size_t,
    offset: off64_t,
) -> ssize_t {
    if let Some(errno) = fault(fd, "pwrite64") {
        return failed(errno);
    }
    let real = real!(
        "pwrite64",
        unsafe extern "C" fn(c_int, *const c_void, size_t, off64_t) -> ssize_t
    );
    // SAFETY: the caller's arguments, passed on unchanged to the function they were meant for.
    unsafe { real(fd, buf, count, offset) }
}

/// `fsync(2)` (Rust's `sync_all`), failed when the plan says so.
///
/// # Safety
/// None beyond the C function's: it takes a plain descriptor.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    if let Some(errno) = fault(fd, "fsync") {
        return failed(errno);
    }
    let real = real!("fsync", unsafe extern "C" fn(c_int) -> c_int);
    // SAFETY: the caller's argument, passed on unchanged to the function it was meant for.
    unsafe { real(fd) }
}

/// `fdatasync(2)` (Rust's `sync_data`), failed when the plan says so.
///
/// # Safety
/// None beyond the C function's: it takes a plain descriptor.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    if let Some(errno) = fault(fd, "fdatasync") {
        return failed(errno);
    }
    let real = real!("fdatasync", unsafe extern "C" fn(c_int) -> c_int);
    // SAFETY: the caller's argument, passed on unchanged to the function it was meant for.
    unsafe { real(fd) }
}

/// `sync_file_range(2)`, with which sled 0.34 makes each log write durable on Linux, failed
/// when the plan says so.
///
/// # Safety
/// None beyond the C function's: it takes plain numbers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sync_file_range(
    fd: c_int,
    offset: off64_t,
    nbytes: off64_t,
    flags: c_uint,
) -> c_int {
    if let Some(errno) = fault(fd, "sync_file_range") {
        return failed(errno);
    }
    let real = real!(
        "sync_file_range",
        unsafe extern "C" fn(c_int, off64_t, off64_t, c_uint) -> c_int
    );
    // SAFETY: the caller's arguments, passed on unchanged to the function they were meant for.
    unsafe { real(fd, offset, nbytes, flags) }
}
