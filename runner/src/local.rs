//! The local executor: one attempt of one step, as a child process (prepared in its staging
//! slot, see `staging.rs`). It runs in its own process group, so Ctrl-C in the terminal reaches
//! the runner alone, and the runner stops the whole group cleanly; a time-out stops it with
//! SIGTERM, then SIGKILL after a grace.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use needle_core::store::{AttemptResult, Store, now_millis};
use tokio::sync::mpsc::UnboundedSender;

use crate::attempt::{AttemptSpec, Event, Handle};
use crate::process::kill_group;
use crate::staging::{append_log, ended, open_log, prepare};

/// How long a process group gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Prepare, spawn and wait for one attempt. Never fails: a problem becomes the attempt's
/// result. Sends [`Event::Started`] with the child's pid once it runs, then [`Event::Ended`].
pub async fn run_attempt(store: Arc<Store>, spec: AttemptSpec, events: UnboundedSender<Event>) {
    let started = now_millis();
    crate::oom::note_baseline();
    let mut fs_started = None;
    let (result, staging) = attempt(&store, &spec, &events, &mut fs_started).await;
    let checked_from = fs_started.map_or(started, |fs: u64| fs.min(started));
    let end = ended(&store, &spec, started, checked_from, result, staging).await;
    let _ = events.send(Event::Ended(end));
}

/// `fs_started` gets the filesystem's clock as the attempt begins: the time the kernel gave
/// its log file when opening it. File times come from the kernel's coarse clock, up to a tick
/// (4-10 ms) behind `now_millis()`, so a step writing into an input in its first milliseconds
/// could leave a time before the attempt's start as the runner read it, and be told the input
/// was damaged before it started.
async fn attempt(
    store: &Store,
    spec: &AttemptSpec,
    events: &UnboundedSender<Event>,
    fs_started: &mut Option<u64>,
) -> (AttemptResult, Option<PathBuf>) {
    // Preparing is a handful of quick filesystem calls: done in place, it costs less than a
    // hand-off to a blocking thread and back.
    let (staging, mut launch) = match prepare(store, spec) {
        Ok(p) => p,
        Err(e) => return (e.not_started(), None),
    };
    let log = launch.log.clone();
    let log_file = match open_log(&log) {
        Ok(f) => f,
        Err(e) => return (e.not_started(), Some(staging)),
    };
    *fs_started = log_file
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    // How the reaper finds a step the runner was killed too early to list.
    launch.set(crate::reaper::ENV, crate::reaper::token());
    crate::reaper::ready();
    let spawned = crate::spawn::spawn(&crate::spawn::Spawn {
        program: &launch.program,
        argv0: &launch.argv0,
        args: &launch.args,
        cwd: &launch.cwd,
        env: &launch.env,
        log: std::os::fd::AsFd::as_fd(&log_file),
    });
    drop(log_file);
    let not_started = |e: &dyn std::fmt::Display| {
        let error = format!("`{}`: {e}", spec.cmd[0]);
        let _ = append_log(&log, &format!("needle: could not start {error}\n"));
        AttemptResult::SpawnFailed { error }
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return (not_started(&e), Some(staging)),
    };
    let pid = child.id();
    // Dropped when this returns, after the group has been killed.
    let _watch = crate::reaper::Watch::new(pid);
    let _ = events.send(Event::Started {
        node: spec.node,
        handle: Handle::Process(pid),
    });

    let t0 = Instant::now();
    let status = match spec.timeout {
        None => child.wait().await,
        Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                stop_group(pid, &mut child).await;
                let after_ms = t0.elapsed().as_millis() as u64;
                let limit = humantime::format_duration(limit);
                let _ = append_log(&log, &format!("needle: timed out after {limit}\n"));
                return (AttemptResult::TimedOut { after_ms }, Some(staging));
            }
        },
    };
    // The step's own children may outlive it; they belong to its group and go with it.
    kill_group(pid, libc::SIGKILL);
    let result = match &status {
        Ok(s) => crate::oom::explain(exit_result(*s), pid, t0.elapsed()),
        Err(e) if let Some(why) = crate::spawn::never_started(e) => not_started(why),
        Err(e) => AttemptResult::SpawnFailed {
            error: format!("waiting for the process failed: {e}"),
        },
    };
    (result, Some(staging))
}

fn exit_result(s: std::process::ExitStatus) -> AttemptResult {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(0), _) => AttemptResult::Success,
        (Some(code), _) => AttemptResult::Failed { code },
        (None, Some(signal)) => AttemptResult::Signaled { signal, oom: None },
        (None, None) => AttemptResult::Failed { code: -1 },
    }
}

/// SIGTERM the group, then SIGKILL it if its leader is still there after [`KILL_GRACE`];
/// whatever remains of the group then goes too.
async fn stop_group(pid: u32, child: &mut crate::spawn::Child) {
    kill_group(pid, libc::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }
    // The leader may have gone at SIGTERM while one of its own children (a trainer saving a
    // checkpoint) lingers: it goes too.
    kill_group(pid, libc::SIGKILL);
}
