//! Whether a step killed by SIGKILL was the OOM killer's doing.
//!
//! needle sends SIGKILL only after a time-out's grace or on a second Ctrl-C, and reports those
//! as such; any other SIGKILL came from elsewhere, most often the kernel's OOM killer. Where
//! the kernel log can be read (`/dev/kmsg`: root, or `kernel.dmesg_restrict = 0`), it says so
//! for certain ("Killed process 1234 (python3)"); elsewhere the OOM-kill counter of needle's
//! memory cgroup, if readable, says whether the killer was at work. Neither is needed: without
//! them the reason says what a SIGKILL usually means.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;
use std::time::Duration;

use needle_core::store::{AttemptResult, OomEvidence};

/// Add what the kernel knows to a SIGKILL result of the process `pid`, which ran for `ran`.
pub fn explain(result: AttemptResult, pid: u32, ran: Duration) -> AttemptResult {
    match result {
        AttemptResult::Signaled { signal, .. } if signal == libc::SIGKILL => {
            AttemptResult::Signaled {
                signal,
                oom: evidence(pid, ran),
            }
        }
        other => other,
    }
}

/// Read the baseline the cgroup fallback compares with; call once before the first step.
pub fn note_baseline() {
    baseline();
}

fn evidence(pid: u32, ran: Duration) -> Option<OomEvidence> {
    if let Some(kills) = kernel_log_kills(ran) {
        if kills.contains(&pid) {
            return Some(OomEvidence::KernelLog);
        }
        return (!kills.is_empty()).then_some(OomEvidence::OomKillerActive);
    }
    match (*baseline(), cgroup_oom_kills()) {
        (Some(before), Some(now)) if now > before => Some(OomEvidence::OomKillerActive),
        _ => None,
    }
}

/// The pids the kernel log says the OOM killer killed within the last `ran` (and a second
/// more: the log's clock and ours differ slightly); `None` when the log cannot be read.
fn kernel_log_kills(ran: Duration) -> Option<Vec<u32>> {
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let since_us = monotonic_us().saturating_sub(ran.as_micros() as u64 + 1_000_000);
    let mut kills = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        // One record per read; EAGAIN at the end; EPIPE when a record was overwritten meanwhile.
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(pid) = oom_kill_record(&buf[..n], since_us) {
                    kills.push(pid);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return None,
        }
    }
    Some(kills)
}

/// The pid of a `/dev/kmsg` record `prio,seq,usec,flags;… Killed process PID (name) …` logged
/// at or after `since_us`.
fn oom_kill_record(record: &[u8], since_us: u64) -> Option<u32> {
    let text = std::str::from_utf8(record).ok()?;
    let (header, message) = text.split_once(';')?;
    let usec: u64 = header.split(',').nth(2)?.parse().ok()?;
    if usec < since_us {
        return None;
    }
    let (_, rest) = message.split_once("Killed process ")?;
    rest.split_whitespace().next()?.parse().ok()
}

fn monotonic_us() -> u64 {
    // SAFETY: an all-zero timespec is a valid value of the plain C struct.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

fn baseline() -> &'static Option<u64> {
    static BASELINE: OnceLock<Option<u64>> = OnceLock::new();
    BASELINE.get_or_init(cgroup_oom_kills)
}

/// How many processes the OOM killer has killed in this process's memory cgroup (v2
/// `memory.events`, v1 `memory.oom_control`), if that can be read.
fn cgroup_oom_kills() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let file = if id == "0" && controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.events")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.oom_control")
        } else {
            continue;
        };
        if let Some(n) = std::fs::read_to_string(file).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        }) {
            return Some(n);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_oom_record() {
        let rec = b"3,2051,2020416401,-;Memory cgroup out of memory: Killed process 31051 \
            (python3) total-vm:221368kB, anon-rss:30464kB";
        assert_eq!(oom_kill_record(rec, 2_000_000_000), Some(31051));
        assert_eq!(oom_kill_record(rec, 2_100_000_000), None, "too old");
        let other = b"6,2052,2020416500,-;EXT4-fs (vda): mounted filesystem";
        assert_eq!(oom_kill_record(other, 0), None);
    }

    #[test]
    fn other_results_pass_unchanged() {
        let r = AttemptResult::Signaled {
            signal: libc::SIGSEGV,
            oom: None,
        };
        assert_eq!(explain(r.clone(), 1, Duration::ZERO), r);
        let r = AttemptResult::Failed { code: 1 };
        assert_eq!(explain(r.clone(), 1, Duration::ZERO), r);
    }
}
