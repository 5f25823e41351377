//! The store's exclusive lock: an OS file lock (`flock`) on `<root>/lock`.
//!
//! The lock is tied to an open file description, so it is released when the holder exits,
//! however it exits; a stale lock file is harmless. The holder writes a line naming itself
//! into the file after locking, so a second process can say who holds the store.
//!
//! A process the holder started shares the lock's file description from its fork until its
//! exec (which closes it: the file is close-on-exec). When the holder is killed in that
//! window, the lock outlives it by the child's few milliseconds: a process finding the lock
//! held by a holder that has exited waits for it, briefly, instead of failing. So does a
//! process that closed its store and opens it again while a child it started is in that
//! window (the holder named is then itself, but it holds the store no more).
//!
//! A read-only command holds the store only for the moment it reads (while a run holds it,
//! readers go through the runner instead): a process finding the lock held by a reader waits
//! for it up to [`READER_WAIT`] before failing, so `needle run` is not refused because a
//! `needle show` happened to be reading.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Fail at once, naming the holder.
    Fail,
    /// Wait for the holder to finish.
    Wait,
}

/// What the holder of the lock does with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// It may write (`run`, `rerun`, `gc`, `verify`…).
    Write,
    /// It only reads, and for a moment (`show`, `lineage`, `doctor`…).
    Read,
}

/// Held for as long as the store is open; dropping it releases the lock.
pub(crate) struct StoreLock {
    /// `None` for a store on a read-only filesystem, which no process can write.
    #[allow(dead_code)] // held for its `flock`
    file: Option<File>,
    /// Its store's root, as it was opened, while this process holds it (see [`HELD_HERE`]).
    root: Option<std::path::PathBuf>,
}

impl StoreLock {
    /// No lock: for a store nobody can write (it is on a read-only filesystem).
    pub(crate) fn none() -> StoreLock {
        StoreLock {
            file: None,
            root: None,
        }
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        if let Some(root) = self.root.take() {
            let mut held = HELD_HERE.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = held.iter().position(|r| *r == root) {
                held.swap_remove(i);
            }
        }
    }
}

/// The roots of the stores this process holds open. A lock whose holder line names this
/// process on a root not listed here is held by a child of ours between its fork and exec.
static HELD_HERE: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

impl StoreLock {
    /// Lock `<root>/lock`, then write this process's description into it.
    pub(crate) fn acquire(
        root: &Path,
        mode: LockMode,
        purpose: Purpose,
    ) -> Result<StoreLock, StoreError> {
        let path = root.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(StoreError::io("open the lock file", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&mut file);
                // Named as holder but holding it no more: exited, or this very process.
                let gone = |pid: i32| {
                    if pid == std::process::id() as i32 {
                        !(HELD_HERE.lock().unwrap_or_else(|e| e.into_inner()))
                            .iter()
                            .any(|r| r == root)
                    } else {
                        !is_alive(pid)
                    }
                };
                let patience = if holder_pid(&holder).is_some_and(gone) {
                    Some(RELEASE_WAIT)
                } else if holder.ends_with(READING) {
                    Some(READER_WAIT)
                } else {
                    None
                };
                let released = match patience {
                    Some(limit) => {
                        waiting(root);
                        wait_for_release(&file, &path, limit)?
                    }
                    None => false,
                };
                if !released {
                    // Another process may have taken the lock meanwhile: name that one.
                    let holder = if patience.is_some() {
                        read_holder(&mut file)
                    } else {
                        holder
                    };
                    match mode {
                        LockMode::Fail => {
                            return Err(StoreError::Locked {
                                root: root.to_path_buf(),
                                holder,
                            });
                        }
                        LockMode::Wait => {
                            tracing::info!(store = %root.display(), %holder, "waiting for the store lock");
                            waiting(root);
                            file.lock().map_err(StoreError::io("lock", &path))?;
                        }
                    }
                }
            }
            Err(TryLockError::Error(e)) => return Err(StoreError::io("lock", &path)(e)),
        }
        let line = describe_self(purpose);
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(line.as_bytes()))
            .map_err(StoreError::io("write the lock file", &path))?;
        (HELD_HERE.lock().unwrap_or_else(|e| e.into_inner())).push(root.to_path_buf());
        Ok(StoreLock {
            file: Some(file),
            root: Some(root.to_path_buf()),
        })
    }
}

/// Tests learn here which stores a thread of theirs began to wait for, instead of sleeping and
/// guessing whether it waits.
#[cfg(test)]
pub(crate) static WAITED_FOR: std::sync::Mutex<Vec<std::path::PathBuf>> =
    std::sync::Mutex::new(Vec::new());

fn waiting(_root: &Path) {
    #[cfg(test)]
    WAITED_FOR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(_root.to_path_buf());
}

/// How long a lock whose holder has exited may take to be released (see the module's doc).
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// How long a read-only command may keep a process that wants the store waiting.
pub(crate) const READER_WAIT: Duration = Duration::from_secs(30);

/// The end of a reader's holder line. At the end, after the time, so that no command line can
/// fake it.
const READING: &str = "; reading";

/// Poll for the lock for up to `limit`; true once it is ours.
fn wait_for_release(file: &File, path: &Path, limit: Duration) -> Result<bool, StoreError> {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::io("lock", path)(e));
            }
        }
    }
    Ok(false)
}

/// The pid at the start of a holder line (see [`describe_self`]).
fn holder_pid(holder: &str) -> Option<i32> {
    holder.strip_prefix("pid ")?.split(' ').next()?.parse().ok()
}

/// Whether process `pid` still runs on this machine (a zombie has closed its files: it does
/// not count).
fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `pid 1234 (needle run recipes/x.toml) since 2026-11-30T03:10:00Z`, with `; reading` after it
/// for a reader.
fn describe_self(purpose: Purpose) -> String {
    let mut args = std::env::args_os().map(|a| a.to_string_lossy().into_owned());
    let program = args
        .next()
        .map(|p| {
            Path::new(&p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or(p)
        })
        .unwrap_or_else(|| "?".into());
    let cmdline = std::iter::once(program)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ");
    let reading = match purpose {
        Purpose::Write => "",
        Purpose::Read => READING,
    };
    format!(
        "pid {} ({cmdline}) since {}{reading}\n",
        std::process::id(),
        humantime::format_rfc3339_seconds(SystemTime::now())
    )
}

/// The holder's line. It writes it just after locking, so a reader that comes in between
/// may see an empty file: retry briefly before saying "unknown".
fn read_holder(file: &mut File) -> String {
    for _ in 0..10 {
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut text).is_ok() {
            let text = text.trim();
            if !text.is_empty() {
                return text.to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    "another process (it has not said which)".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_lines_name_their_pid() {
        assert_eq!(
            holder_pid("pid 1234 (needle run x.toml) since 2026-11-30T03:10:00Z"),
            Some(1234)
        );
        assert_eq!(holder_pid("another process (it has not said which)"), None);
    }

    /// A child between fork and exec shares the lock's file description: `try_clone` (a
    /// `dup`) stands for it here. The store closed and opened again meanwhile is waited for,
    /// not refused as held by this very process.
    #[test]
    fn a_store_closed_while_a_child_shares_its_lock_opens_again_once_the_child_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let lock = StoreLock::acquire(&root, LockMode::Fail, Purpose::Write).unwrap();
        let child = lock.file.as_ref().unwrap().try_clone().unwrap();
        drop(lock);
        let again = {
            let root = root.clone();
            std::thread::spawn(move || {
                StoreLock::acquire(&root, LockMode::Fail, Purpose::Write).map(|_| ())
            })
        };
        while !WAITED_FOR.lock().unwrap().contains(&root) {
            assert!(!again.is_finished(), "{:?}", again.join());
            std::thread::yield_now();
        }
        drop(child);
        again.join().unwrap().unwrap();
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(is_alive(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!is_alive(pid));
    }
}
