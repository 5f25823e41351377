//! Local steps die with their runner, however it dies (SIGKILL included): nothing could commit
//! their output, and left running they would hold a GPU and write into their resume directory
//! beside the next run's attempt.
//!
//! A small process of its own (this binary, started as `needle __reap` before the first local
//! step) shares a table with the runner: one slot per running step, holding its process group.
//! It also holds one end of a socket whose other end only the runner has (close-on-exec: no
//! step inherits it). When the runner dies, however it dies, the kernel closes that end; the
//! reaper reads end-of-file, kills every group still in the table (the step and whatever it
//! started) and exits. A runner that ends normally has stopped its steps already and left the
//! table empty.
//!
//! Why a shared table: writing a slot is a store to memory. A message per step start and end
//! cost a `send` each and woke the reaper each time, about a tenth of a 1,000-step run of
//! trivial steps (BENCHMARKS.md). Why not `PR_SET_PDEATHSIG` in the child before its `exec`
//! (`spawn.rs` could make the call): it fires when the *thread* that started the step ends, not
//! the runner, and it does not reach what the step itself starts in its group.
//!
//! A step is spawned before its slot can be written. For a runner killed in between, every
//! step also carries this runner's token in its environment ([`ENV`]), and the reaper kills the
//! processes (with their groups) whose environment holds it. What it cannot cover: a step's
//! process that has dropped the token from its environment by then and was not in the table
//! yet, or a step beyond the table's [`SLOTS`] simultaneous ones (said once, as a warning).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The first argument that makes `needle` a reaper.
pub const ARG: &str = "__reap";

/// The variable holding the runner's token in each local step's environment.
pub const ENV: &str = "NEEDLE_REAPER";

/// This runner's token: unique to it among the processes of the machine.
pub fn token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        // A pid is unique among live processes, and it is not reused within a nanosecond.
        format!("{:x}-{nanos:x}", std::process::id())
    })
}

/// Steps running at once that the table can hold. Pages are touched only as slots are used.
pub const SLOTS: usize = 1 << 16;

/// The runner's side: the shared table, which slots are free, and the socket's end (kept open
/// for the runner's lifetime: its closing is the signal).
struct Reaper {
    table: Table,
    _socket: UnixStream,
}

/// The slots, and which of them are free.
struct Table {
    slots: &'static [AtomicU32],
    free: Mutex<Free>,
}

impl Table {
    fn new(slots: &'static [AtomicU32]) -> Table {
        Table {
            slots,
            free: Mutex::new(Free::default()),
        }
    }

    /// Write `pgid` into a free slot; `None` when all are taken.
    fn take(&self, pgid: u32) -> Option<u32> {
        let slot = {
            let mut free = self.free.lock().expect("the slot list is never poisoned");
            match free.returned.pop() {
                Some(slot) => slot,
                None if (free.high as usize) < self.slots.len() => {
                    free.high += 1;
                    free.high - 1
                }
                None => return None,
            }
        };
        self.slots[slot as usize].store(pgid, Ordering::Release);
        Some(slot)
    }

    fn give_back(&self, slot: u32) {
        self.slots[slot as usize].store(0, Ordering::Release);
        let mut free = self.free.lock().expect("the slot list is never poisoned");
        free.returned.push(slot);
    }
}

#[derive(Default)]
struct Free {
    /// Slots given back, reused first.
    returned: Vec<u32>,
    /// Slots below this have been handed out at least once.
    high: u32,
}

/// `None` when the reaper could not be started (steps then outlive a killed runner: said once,
/// as a warning).
static REAPER: OnceLock<Option<Reaper>> = OnceLock::new();

fn start() -> Option<Reaper> {
    let started = (|| -> std::io::Result<Reaper> {
        let (memfd, table) = shared_table()?;
        let (ours, theirs) = UnixStream::pair()?;
        let exe = std::env::current_exe()?;
        Command::new(exe)
            .arg(ARG)
            .arg(token())
            // The table on stdin, mapped read-only there; the socket on stdout, read for its
            // end. Nothing the reaper could print lands in the table.
            .stdin(Stdio::from(memfd))
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .stderr(Stdio::null())
            // Its own group: a Ctrl-C at the terminal is the runner's to handle, not its.
            .process_group(0)
            .spawn()?;
        // Not waited for: it exits with the runner (until then a zombie costs nothing; once
        // the runner is gone, init reaps it). Its end of the socket closed here with the
        // `Command`, so that the runner's death is the only end-of-file it can read.
        Ok(Reaper {
            table: Table::new(table),
            _socket: ours,
        })
    })();
    started
        .inspect_err(|e| {
            tracing::warn!(
                "could not start the process that stops steps when the runner is killed: {e}"
            )
        })
        .ok()
}

/// A memory file of [`SLOTS`] zeroed slots and the runner's shared, writable mapping of it.
fn shared_table() -> std::io::Result<(OwnedFd, &'static [AtomicU32])> {
    let bytes = SLOTS * std::mem::size_of::<AtomicU32>();
    // SAFETY: memfd_create takes a NUL-terminated name; the fd it returns is ours alone.
    let fd = unsafe { libc::memfd_create(c"needle-reaper".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let table = map(&fd, bytes, libc::PROT_READ | libc::PROT_WRITE)?;
    Ok((fd, table))
}

/// Map `bytes` of `fd`, shared, for the rest of the process's life (never unmapped: the table
/// must outlive every `Watch`).
fn map(fd: &OwnedFd, bytes: usize, prot: i32) -> std::io::Result<&'static [AtomicU32]> {
    // SAFETY: a new shared mapping of a file we hold open; the kernel picks the address.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the mapping is `bytes` long, page-aligned, zero-filled or written only through
    // atomics, and never unmapped; AtomicU32 has the layout of u32.
    Ok(unsafe {
        std::slice::from_raw_parts(
            ptr.cast::<AtomicU32>(),
            bytes / std::mem::size_of::<AtomicU32>(),
        )
    })
}

/// Start the reaper if it is not running yet. Called before a step is spawned, so that the
/// step is unprotected only for the moment between its spawn and its slot's write, not for
/// the reaper's own start as well.
pub fn ready() {
    REAPER.get_or_init(start);
}

/// While this lives, group `pgid` is killed if the runner dies. Drop it once the step has
/// ended and its group has been killed.
pub struct Watch(Option<u32>);

impl Watch {
    pub fn new(pgid: u32) -> Watch {
        let Some(reaper) = REAPER.get_or_init(start) else {
            return Watch(None);
        };
        let slot = reaper.table.take(pgid);
        if slot.is_none() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    "more than {SLOTS} steps are running at once: those beyond it would keep \
                     running if the runner were killed"
                )
            });
        }
        Watch(slot)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let (Some(slot), Some(Some(reaper))) = (self.0, REAPER.get()) {
            reaper.table.give_back(slot);
        }
    }
}

/// `needle __reap TOKEN`: map the table from stdin, wait for end-of-file on stdout, kill.
pub fn main() -> i32 {
    // SAFETY: fds 0 and 1 were given to this process by the runner and are used only here.
    let (table_fd, socket) = unsafe { (OwnedFd::from_raw_fd(0), OwnedFd::from_raw_fd(1)) };
    // Without the table, the token still finds the steps.
    let table = map(
        &table_fd,
        SLOTS * std::mem::size_of::<AtomicU32>(),
        libc::PROT_READ,
    )
    .unwrap_or(&[]);
    let token = std::env::args().nth(2).unwrap_or_default();
    serve(std::fs::File::from(socket), table, &token)
}

/// The reaper's life: read until end-of-file (the runner has gone), then kill every group the
/// table still holds, and every process whose environment holds `token` (with its group).
pub fn serve(mut runner: impl Read, table: &[AtomicU32], token: &str) -> i32 {
    let mut buf = [0u8; 64];
    loop {
        match runner.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    for slot in table {
        let pgid = slot.load(Ordering::Acquire);
        if pgid > 1 {
            crate::process::kill_group(pgid, libc::SIGKILL);
        }
    }
    if !token.is_empty() {
        kill_carriers(&format!("{ENV}={token}"));
    }
    0
}

/// Kill each process (other than this one) whose environment holds the entry `entry`, and its
/// group if it leads one.
///
/// A process in the middle of its exec cannot be judged yet: the kernel releases a spawning
/// parent once the child's new memory is in place, but publishes where its environment lies
/// only afterwards, so for that moment `/proc/PID/environ` reads empty (and a child that has
/// not exec'd yet, sharing the runner's memory, shows the runner's). The scan is repeated, a
/// few milliseconds apart, until one pass finds no process with an empty environment
/// (bounded: a process may have been started with none) and at least two passes have been
/// made.
fn kill_carriers(entry: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    for pass in 0.. {
        let unsettled = kill_carriers_once(entry.as_bytes());
        if (pass > 0 && unsettled == 0) || std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// One pass of [`kill_carriers`]; returns how many processes read an empty environment.
fn kill_carriers_once(entry: &[u8]) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let me = std::process::id() as i32;
    let mut unsettled = 0;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 1 || pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(p.path().join("environ")) else {
            continue;
        };
        if environ.is_empty() {
            if may_still_exec(&p.path()) {
                unsettled += 1;
            }
            continue;
        }
        if environ.split(|&b| b == 0).any(|e| e == entry) {
            // SAFETY: kill(2) and getpgid(2) have no memory effects.
            unsafe {
                if libc::getpgid(pid) == pid {
                    libc::kill(-pid, libc::SIGKILL);
                }
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    unsettled
}

/// Whether the process at `/proc/PID` could be one whose environment is not published yet:
/// not a kernel thread and not a zombie, which read an empty environment for good.
fn may_still_exec(proc_dir: &std::path::Path) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The command name, in parentheses, may hold spaces: fields are counted after its end.
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("Z");
    let flags: u64 = fields
        .get(6)
        .and_then(|f| f.parse().ok())
        .unwrap_or(PF_KTHREAD);
    !matches!(state, "Z" | "X") && flags & PF_KTHREAD == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_still_in_the_table_at_the_end_are_killed() {
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
        let table: Vec<AtomicU32> = (0..4).map(|_| AtomicU32::new(0)).collect();
        table[1].store(sleeper.id(), Ordering::Release);
        // A slot given back, and pid 1's group, which is never signalled.
        table[3].store(1, Ordering::Release);
        assert_eq!(serve(&b"anything the runner sent"[..], &table, ""), 0);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(sleeper.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(
            done.try_wait().unwrap().is_none(),
            "a group not in the table is left alone"
        );
        done.kill().unwrap();
        done.wait().unwrap();
    }

    #[test]
    fn slots_are_reused_cleared_and_bounded() {
        let slots: &'static [AtomicU32] = Vec::from_iter((0..2).map(|_| AtomicU32::new(0))).leak();
        let table = Table::new(slots);
        let a = table.take(101).unwrap();
        let b = table.take(102).unwrap();
        assert_ne!(a, b);
        assert_eq!(table.take(103), None, "a full table takes no more");
        assert_eq!(slots[a as usize].load(Ordering::Acquire), 101);
        table.give_back(a);
        assert_eq!(slots[a as usize].load(Ordering::Acquire), 0);
        assert_eq!(table.take(104), Some(a), "a freed slot is used again");
        table.give_back(a);
        table.give_back(b);
        assert!(slots.iter().all(|s| s.load(Ordering::Acquire) == 0));
    }

    #[test]
    fn a_step_not_in_the_table_yet_is_found_by_its_token() {
        let token = "test-token-4d2a";
        // The scan starts right after each spawn, while the carrier may still be in its exec
        // (the race CI once lost): a few rounds, so that a scan that gives up early shows.
        for _ in 0..5 {
            let mut carrier = Command::new("sleep")
                .arg("30")
                .env(ENV, token)
                .process_group(0)
                .spawn()
                .unwrap();
            let table: Vec<AtomicU32> = (0..2).map(|_| AtomicU32::new(0)).collect();
            assert_eq!(serve(&b""[..], &table, token), 0);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(carrier.wait().unwrap().signal(), Some(libc::SIGKILL));
        }
        let mut other = Command::new("sleep")
            .arg("30")
            .env(ENV, "another-runner")
            .process_group(0)
            .spawn()
            .unwrap();
        let table: Vec<AtomicU32> = (0..2).map(|_| AtomicU32::new(0)).collect();
        assert_eq!(serve(&b""[..], &table, token), 0);
        assert!(
            other.try_wait().unwrap().is_none(),
            "another runner's step is left alone"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn only_live_user_processes_may_still_be_in_their_exec() {
        let me = std::path::PathBuf::from(format!("/proc/{}", std::process::id()));
        assert!(may_still_exec(&me));
        let mut done = Command::new("true").spawn().unwrap();
        let zombie = std::path::PathBuf::from(format!("/proc/{}", done.id()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while may_still_exec(&zombie) {
            assert!(std::time::Instant::now() < deadline, "`true` never ended");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        done.wait().unwrap();
        let kthreadd = std::path::Path::new("/proc/2");
        if kthreadd.join("stat").exists() {
            assert!(!may_still_exec(kthreadd), "a kernel thread never execs");
        }
    }
}
