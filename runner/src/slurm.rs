//! The Slurm executor: each attempt is a batch job running the command the local executor
//! would run, with the same environment, in the same staging slot.
//!
//! The store (blobs, views, staging) must be on a filesystem the compute nodes share with
//! the runner; jobs only read their inputs and write into their slot, and the runner alone
//! commits outputs and writes metadata, as with the local executor.
//!
//! A job's life, as the runner sees it:
//! ```text
//! submitted (sbatch) ──▶ Pending ──▶ Running ──▶ Ended(result)
//!      │                    │           │
//!      └─ refused: the      │           └─ past the step's timeout: scancel ─▶ TimedOut
//!         attempt could      └─ Ctrl-C: scancel ─▶ Interrupted
//!         not start
//! ```
//! One poller follows every job of the run with one `squeue` call per interval, so a sweep
//! of a thousand steps costs the controller one query a second, not a thousand. A job that
//! ended is read once with `scontrol show job` (its exit code); one the controller already
//! forgot, with `sacct` where accounting exists.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use needle_core::recipe::Resources;
use needle_core::store::{AttemptResult, JobPlacement, Store, now_millis};
use tokio::sync::{Semaphore, mpsc};

use crate::attempt::{AttemptEnd, AttemptSpec, Event, Handle};
use crate::process;
use crate::staging::{self, Launch};

/// How needle talks to Slurm: from the command line or the `[executor]` table of a config
/// file.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Most jobs submitted and not yet ended at once (the rest wait in needle, not in the
    /// scheduler's queue).
    pub max_jobs: u32,
    /// How often the poller asks the controller.
    pub poll: Duration,
    /// Passed to every `sbatch` as they are (`--qos=high`, `--constraint=a100`).
    pub sbatch_args: Vec<String>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: None,
            account: None,
            max_jobs: 100,
            poll: Duration::from_secs(2),
            sbatch_args: Vec::new(),
        }
    }
}

/// Most `sbatch` (and `scancel`) processes at once: submitting is quick, and the controller
/// serialises them anyway.
const SUBMITTERS: usize = 8;

/// How long a Slurm command may take before the runner gives up on that call.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What the poller reports of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Running { node: String },
    Ended(AttemptResult),
}

/// A job's state as `squeue` prints it, and what it means for the attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Not started yet (pending, configuring, requeued, suspended…).
    Waiting,
    /// Running, or completing (its epilog runs; the final state follows).
    Running,
    /// Ended: the exit status is in `scontrol show job`.
    Finished,
    /// Ended without running to its end by its own doing.
    Lost(String),
    Cancelled,
    TimedOut,
}

impl JobState {
    pub fn parse(state: &str) -> JobState {
        // `CANCELLED by 0` in some versions' scontrol output.
        let state = state.split_whitespace().next().unwrap_or("");
        match state {
            "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
            | "RESIZING" | "SUSPENDED" | "STOPPED" | "SIGNALING" | "STAGE_OUT" => JobState::Waiting,
            "RUNNING" | "COMPLETING" => JobState::Running,
            "COMPLETED" | "FAILED" => JobState::Finished,
            "CANCELLED" => JobState::Cancelled,
            "TIMEOUT" => JobState::TimedOut,
            "NODE_FAIL" => JobState::Lost("its node failed (NODE_FAIL)".into()),
            "PREEMPTED" => JobState::Lost("preempted by a higher-priority job".into()),
            "BOOT_FAIL" => JobState::Lost("its node failed to boot (BOOT_FAIL)".into()),
            "DEADLINE" => JobState::Lost("it passed its deadline (DEADLINE)".into()),
            "OUT_OF_MEMORY" => JobState::Lost(
                "out of memory (OUT_OF_MEMORY: raise the step's resources.mem_gb)".into(),
            ),
            "REVOKED" => JobState::Lost("revoked by a sibling cluster (REVOKED)".into()),
            other => JobState::Lost(format!("it ended in state {other}")),
        }
    }
}

/// `ExitCode=3:0` (exit code 3) or `0:11` (signal 11), as `scontrol` and `sacct` print it.
pub fn exit_result(exit_code: &str) -> AttemptResult {
    let (code, signal) = exit_code.split_once(':').unwrap_or((exit_code, "0"));
    let code: i32 = code.trim().parse().unwrap_or(-1);
    let signal: i32 = signal.trim().parse().unwrap_or(0);
    match (code, signal) {
        (0, 0) => AttemptResult::Success,
        (_, s) if s != 0 => AttemptResult::Signaled {
            signal: s,
            oom: None,
        },
        (c, _) => AttemptResult::Failed { code: c },
    }
}

/// The `key=value` fields of one `scontrol -o show job` line.
pub fn scontrol_fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

/// Jobs the poller follows, and those needle cancelled itself.
#[derive(Default)]
struct Jobs {
    watched: HashMap<String, Watched>,
}

struct Watched {
    events: mpsc::UnboundedSender<JobEvent>,
    running: bool,
}

/// The executor: submits attempts, follows their jobs, cancels them.
pub struct Slurm {
    config: SlurmConfig,
    /// Marks this store's jobs (`--comment`), so a later runner finds those a killed one
    /// left behind.
    comment: String,
    jobs: Mutex<Jobs>,
    submitters: Semaphore,
}

impl Slurm {
    pub fn new(config: SlurmConfig, store_root: &Path) -> Slurm {
        Slurm {
            config,
            comment: format!("needle-store:{}", store_root.display()),
            jobs: Mutex::new(Jobs::default()),
            submitters: Semaphore::new(SUBMITTERS),
        }
    }

    pub fn max_jobs(&self) -> u32 {
        self.config.max_jobs.max(1)
    }

    /// Check that Slurm answers, and cancel the jobs a killed runner left for this store:
    /// the caller holds the store's lock, so no live runner owns them, and they would only
    /// write into staging slots nobody will read.
    pub async fn start(&self) -> Result<Vec<String>, SlurmError> {
        let out = slurm_command("squeue", ["-h", "-t", "PD,R,CG", "-o", "%i|%k"]).await?;
        let stale: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_once('|'))
            .filter(|(_, comment)| *comment == self.comment)
            .map(|(id, _)| id.to_string())
            .collect();
        if !stale.is_empty() {
            self.cancel(&stale, false).await;
        }
        Ok(stale)
    }

    /// Cancel jobs; `kill` sends SIGKILL at once instead of Slurm's TERM, wait, KILL.
    pub async fn cancel(&self, ids: &[String], kill: bool) {
        if ids.is_empty() {
            return;
        }
        let _permit = self.submitters.acquire().await;
        let mut args: Vec<&str> = Vec::new();
        if kill {
            args.push("--signal=KILL");
        }
        args.extend(ids.iter().map(String::as_str));
        if let Err(e) = slurm_command("scancel", args).await {
            tracing::warn!(
                "scancel {}: {}",
                ids.join(" "),
                needle_core::error_chain::joined(&e, ": ")
            );
        }
    }

    fn watch(&self, id: &str) -> mpsc::UnboundedReceiver<JobEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.jobs.lock().expect("jobs lock").watched.insert(
            id.to_string(),
            Watched {
                events: tx,
                running: false,
            },
        );
        rx
    }

    /// Follow every watched job until the run ends (the engine drops the task).
    pub async fn poll_forever(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(self.config.poll).await;
            let ids: Vec<String> = {
                let jobs = self.jobs.lock().expect("jobs lock");
                jobs.watched.keys().cloned().collect()
            };
            if ids.is_empty() {
                continue;
            }
            match self.poll_once(&ids).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    // A controller restarting is normal; say so once it lasts.
                    if failures == 3 || failures.is_multiple_of(30) {
                        let e = needle_core::error_chain::joined(&e, ": ");
                        tracing::warn!("Slurm does not answer ({failures} polls): {e}");
                    }
                }
            }
        }
    }

    async fn poll_once(&self, ids: &[String]) -> Result<(), SlurmError> {
        let list = ids.join(",");
        let states =
            match slurm_command("squeue", ["-h", "-t", "all", "-j", &list, "-o", "%i|%T|%N"]).await
            {
                Ok(out) => out,
                // Every id unknown: squeue fails rather than printing nothing.
                Err(SlurmError::Failed { stderr, .. }) if stderr.contains("Invalid job id") => {
                    String::new()
                }
                Err(e) => return Err(e),
            };
        let mut seen: HashMap<&str, (JobState, &str)> = HashMap::new();
        for line in states.lines() {
            let mut parts = line.splitn(3, '|');
            if let (Some(id), Some(state), node) = (parts.next(), parts.next(), parts.next()) {
                seen.insert(
                    id.trim(),
                    (JobState::parse(state), node.unwrap_or("").trim()),
                );
            }
        }
        for id in ids {
            let event = match seen.get(id.as_str()) {
                Some((JobState::Waiting, _)) => None,
                Some((JobState::Running, node)) => Some(JobEvent::Running {
                    node: node.to_string(),
                }),
                Some((state, _)) => Some(JobEvent::Ended(self.final_result(id, state).await)),
                // Forgotten by the controller (MinJobAge passed): ask accounting.
                None => Some(JobEvent::Ended(forgotten_job(id).await)),
            };
            let Some(event) = event else { continue };
            let mut jobs = self.jobs.lock().expect("jobs lock");
            let Some(w) = jobs.watched.get_mut(id) else {
                continue;
            };
            match event {
                JobEvent::Running { .. } if w.running => {}
                JobEvent::Running { .. } => {
                    w.running = true;
                    let _ = w.events.send(event);
                }
                JobEvent::Ended(_) => {
                    let w = jobs.watched.remove(id).expect("present");
                    let _ = w.events.send(event);
                }
            }
        }
        Ok(())
    }

    /// How a job that left the queue ended.
    async fn final_result(&self, id: &str, state: &JobState) -> AttemptResult {
        match state {
            JobState::Finished => {
                match slurm_command("scontrol", ["-o", "show", "job", id]).await {
                    Ok(out) => {
                        let fields = scontrol_fields(&out);
                        match fields.get("ExitCode") {
                            Some(code) => exit_result(code),
                            None => AttemptResult::Lost {
                                reason: format!(
                                    "Slurm job {id} ended, but scontrol shows no exit code"
                                ),
                            },
                        }
                    }
                    Err(_) => forgotten_job(id).await,
                }
            }
            JobState::Cancelled => AttemptResult::Lost {
                reason: format!("Slurm job {id} was cancelled outside needle"),
            },
            JobState::TimedOut => AttemptResult::Lost {
                reason: format!("Slurm job {id} reached its time limit"),
            },
            JobState::Lost(why) => AttemptResult::Lost {
                reason: format!("Slurm job {id}: {why}"),
            },
            JobState::Waiting | JobState::Running => unreachable!("not a final state"),
        }
    }
}

/// A job `squeue` no longer knows: `sacct` knows, where accounting (or `jobcomp`) exists.
async fn forgotten_job(id: &str) -> AttemptResult {
    for args in [
        vec!["-n", "-P", "-X", "-j", id, "-o", "State,ExitCode"],
        vec!["-c", "-n", "-P", "-j", id, "-o", "State,ExitCode"],
    ] {
        if let Ok(out) = slurm_command("sacct", args).await
            && let Some((state, code)) = out.lines().next().and_then(|l| l.split_once('|'))
        {
            return match JobState::parse(state) {
                JobState::Finished => exit_result(code),
                JobState::Lost(why) => AttemptResult::Lost {
                    reason: format!("Slurm job {id}: {why}"),
                },
                _ => AttemptResult::Lost {
                    reason: format!("Slurm job {id} ended {state}"),
                },
            };
        }
    }
    AttemptResult::Lost {
        reason: format!(
            "Slurm job {id} left the queue and no accounting says how it ended (MinJobAge too short?)"
        ),
    }
}

/// Why a Slurm client command gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("could not run `{program}`")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program}` did not answer within {:?}", COMMAND_TIMEOUT)]
    Timeout { program: &'static str },
    /// It ran and failed: what it said on stderr.
    #[error("`{program}` {status}: {stderr}")]
    Failed {
        program: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Run a Slurm client command; its stdout, or why not (with its stderr where it failed).
async fn slurm_command<I, S>(program: &'static str, args: I) -> Result<String, SlurmError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => return Err(SlurmError::Spawn { program, source }),
        Err(_) => return Err(SlurmError::Timeout { program }),
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SlurmError::Failed {
            program,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The batch script of an attempt: record where it runs, set the step's variables, exec its
/// command. Values are single-quoted, so nothing in them reaches a shell as syntax.
pub fn job_script(launch: &Launch, slot: &Path, gpus: u32) -> Vec<u8> {
    let mut s: Vec<u8> = Vec::new();
    s.extend_from_slice(b"#!/bin/sh\n# written by needle: one attempt of one step\n");
    // Where it ran, for the run record: the node and the GPUs Slurm gave it.
    s.extend_from_slice(b"printf '%s\\n%s\\n' \"$(hostname)\" \"${CUDA_VISIBLE_DEVICES-}\" > ");
    quote_into(&mut s, slot.join(PLACEMENT).as_os_str());
    s.push(b'\n');
    // Slurm starts a job again after preempting it or losing its node, where the cluster
    // requeues: the command must not find what its first start left half-written.
    s.extend_from_slice(b"if [ \"${SLURM_RESTART_COUNT:-0}\" -gt 0 ]; then\n  echo \"needle: Slurm started this job again (restart $SLURM_RESTART_COUNT: preempted, requeued or its node failed); what its output directory held is removed\"\n  chmod -R u+w ");
    let out = slot.join("out");
    quote_into(&mut s, out.as_os_str());
    s.extend_from_slice(b" 2>/dev/null\n  find ");
    quote_into(&mut s, out.as_os_str());
    s.extend_from_slice(
        b" -mindepth 1 -delete || { echo \"needle: could not empty the output directory for the new start\" >&2; exit 1; }\nfi\n",
    );
    for (k, v) in &launch.env {
        // With GPUs, Slurm sets CUDA_VISIBLE_DEVICES to the ones it allocated.
        if k == "CUDA_VISIBLE_DEVICES" && gpus > 0 {
            continue;
        }
        s.extend_from_slice(b"export ");
        s.extend_from_slice(k.as_bytes());
        s.push(b'=');
        quote_into(&mut s, v);
        s.push(b'\n');
    }
    s.extend_from_slice(b"cd ");
    quote_into(&mut s, launch.cwd.as_os_str());
    s.extend_from_slice(b" || exit 1\nexec ");
    quote_into(&mut s, launch.program.as_os_str());
    for a in &launch.args {
        s.push(b' ');
        quote_into(&mut s, OsStr::new(a));
    }
    s.push(b'\n');
    s
}

/// `it's` → `'it'\''s'`.
fn quote_into(out: &mut Vec<u8>, v: &OsStr) {
    out.push(b'\'');
    for &b in v.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

/// The file in a slot where the job writes its node and GPUs.
const PLACEMENT: &str = "placement";

/// The `sbatch` arguments of an attempt (the script's path last).
pub fn sbatch_args(
    config: &SlurmConfig,
    comment: &str,
    spec: &AttemptSpec,
    resources: &Resources,
    log: &Path,
    script: &Path,
) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name=needle:{}", spec.step_name),
        format!("--output={}", log.display()),
        // A job Slurm starts again keeps what its first start logged.
        "--open-mode=append".to_string(),
        format!("--comment={comment}"),
        format!("--cpus-per-task={}", resources.cpus.max(1)),
    ];
    // Part of a GPU is a whole one here: Slurm shares a GPU only where the cluster is set up
    // for it (`shard` or `mps` GRES), and needle cannot know that. `sbatch_args` in
    // needle.toml can ask for those instead.
    let gpus = resources.gpus.devices();
    if gpus > 0 {
        args.push(format!("--gres=gpu:{gpus}"));
    }
    if resources.mem_gb > 0.0 {
        args.push(format!(
            "--mem={}M",
            (resources.mem_gb * 1024.0).ceil() as u64
        ));
    }
    if let Some(limit) = spec.timeout {
        // Slurm counts minutes; the runner enforces the exact limit itself, and Slurm's is
        // the backstop should the runner be gone.
        args.push(format!("--time={}", limit.as_secs().div_ceil(60) + 1));
    }
    if let Some(p) = &config.partition {
        args.push(format!("--partition={p}"));
    }
    if let Some(a) = &config.account {
        args.push(format!("--account={a}"));
    }
    args.extend(config.sbatch_args.iter().cloned());
    args.push(script.display().to_string());
    args
}

/// One attempt as a Slurm job. Never fails: a problem becomes the attempt's result.
pub async fn run_attempt(
    slurm: Arc<Slurm>,
    store: Arc<Store>,
    spec: AttemptSpec,
    resources: Resources,
    events: mpsc::UnboundedSender<Event>,
) {
    let started = now_millis();
    let (result, staging, job) = attempt(&slurm, &store, &spec, &resources, &events).await;
    let gpus = staging
        .as_deref()
        .map(read_placement)
        .map(|(_, gpus)| gpus)
        .unwrap_or_default();
    let end = staging::ended(&store, &spec, started, started, result, staging).await;
    let _ = events.send(Event::Ended(AttemptEnd {
        gpus: Some(gpus),
        job,
        ..end
    }));
}

async fn attempt(
    slurm: &Slurm,
    store: &Store,
    spec: &AttemptSpec,
    resources: &Resources,
    events: &mpsc::UnboundedSender<Event>,
) -> (AttemptResult, Option<PathBuf>, Option<JobPlacement>) {
    let (staging, launch) = match staging::prepare(store, spec) {
        Ok(p) => p,
        Err(e) => return (e.not_started(), None, None),
    };
    let _ = std::fs::remove_file(staging.join(PLACEMENT));
    let script = staging.join("job.sh");
    if let Err(e) = std::fs::write(
        &script,
        job_script(&launch, &staging, resources.gpus.devices()),
    ) {
        let error = format!("could not write `{}`: {e}", script.display());
        return (AttemptResult::SpawnFailed { error }, Some(staging), None);
    }
    let args = sbatch_args(
        &slurm.config,
        &slurm.comment,
        spec,
        resources,
        &launch.log,
        &script,
    );
    let submitted = {
        let _permit = slurm.submitters.acquire().await;
        let mut cmd = tokio::process::Command::new("sbatch");
        cmd.args(&args)
            .current_dir(&launch.cwd)
            .stdin(std::process::Stdio::null())
            .env_remove("CUDA_VISIBLE_DEVICES")
            .kill_on_drop(true);
        for k in process::inherited_needle_vars() {
            cmd.env_remove(k);
        }
        tokio::time::timeout(COMMAND_TIMEOUT, cmd.output()).await
    };
    let id = match submitted {
        Ok(Ok(out)) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            // `--parsable`: `id` or `id;cluster`.
            text.trim().split(';').next().unwrap_or("").to_string()
        }
        Ok(Ok(out)) => {
            let error = format!(
                "sbatch refused the job: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let _ = staging::append_log(&launch.log, &format!("needle: {error}\n"));
            return (AttemptResult::SpawnFailed { error }, Some(staging), None);
        }
        Ok(Err(e)) => {
            let error = format!("could not run `sbatch`: {e}");
            let _ = staging::append_log(&launch.log, &format!("needle: {error}\n"));
            return (AttemptResult::SpawnFailed { error }, Some(staging), None);
        }
        Err(_) => {
            let error = format!("`sbatch` did not answer within {COMMAND_TIMEOUT:?}");
            return (AttemptResult::SpawnFailed { error }, Some(staging), None);
        }
    };
    let mut job = JobPlacement {
        scheduler: "slurm".into(),
        id: id.clone(),
        node: String::new(),
    };
    let mut job_events = slurm.watch(&id);
    let _ = events.send(Event::Started {
        node: spec.node,
        handle: Handle::Job(id.clone()),
    });

    // Wait for it to start; the time limit counts from then.
    let mut running_since: Option<Instant> = None;
    loop {
        let deadline = running_since.zip(spec.timeout).map(|(t, limit)| t + limit);
        let event = match deadline {
            None => job_events.recv().await,
            Some(at) => match tokio::time::timeout_at(at.into(), job_events.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    let after_ms = running_since.map_or(0, |t| t.elapsed().as_millis() as u64);
                    slurm.cancel(std::slice::from_ref(&id), false).await;
                    // Wait for the cancel to take, so the slot is free to reuse.
                    while let Some(ev) = job_events.recv().await {
                        if matches!(ev, JobEvent::Ended(_)) {
                            break;
                        }
                    }
                    let limit = humantime::format_duration(spec.timeout.expect("a deadline"));
                    let _ = staging::append_log(
                        &launch.log,
                        &format!("needle: timed out after {limit}; cancelled Slurm job {id}\n"),
                    );
                    job.node = read_placement(&staging).0;
                    return (
                        AttemptResult::TimedOut { after_ms },
                        Some(staging),
                        Some(job),
                    );
                }
            },
        };
        match event {
            Some(JobEvent::Running { node }) => {
                job.node = node;
                running_since = Some(Instant::now());
            }
            Some(JobEvent::Ended(result)) => {
                let (node, _) = read_placement(&staging);
                if !node.is_empty() {
                    job.node = node;
                }
                let result = over_memory(result, &launch.log, &id);
                return (result, Some(staging), Some(job));
            }
            None => {
                let reason = format!("the runner stopped following Slurm job {id}");
                return (AttemptResult::Lost { reason }, Some(staging), Some(job));
            }
        }
    }
}

/// What slurmstepd writes into a job's output as it kills a step that used more memory than its
/// `--mem` (`JobAcctGatherParams=OverMemoryKill`, which polls the step's memory without
/// cgroups). The job then ends `FAILED` with signal 9, not `OUT_OF_MEMORY`: that state comes
/// from the cgroup plugin only.
const OVER_MEMORY: &str = "Exceeded job memory limit";

/// How much of the end of a job's output is searched for [`OVER_MEMORY`].
const OVER_MEMORY_TAIL: u64 = 64 << 10;

/// A job killed by SIGKILL whose output says slurmstepd killed it over its memory limit: out of
/// memory, as Slurm's `OUT_OF_MEMORY` state says it.
fn over_memory(result: AttemptResult, log: &Path, id: &str) -> AttemptResult {
    match result {
        AttemptResult::Signaled { signal, .. }
            if signal == libc::SIGKILL && log_tail(log).contains(OVER_MEMORY) =>
        {
            AttemptResult::Lost {
                reason: format!(
                    "Slurm job {id}: out of memory (slurmstepd killed it for exceeding its \
                     --mem: raise the step's resources.mem_gb)"
                ),
            }
        }
        other => other,
    }
}

/// The last [`OVER_MEMORY_TAIL`] bytes of `log`, as text; empty when it cannot be read.
fn log_tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let mut tail = Vec::new();
    let read = f
        .seek(SeekFrom::Start(len.saturating_sub(OVER_MEMORY_TAIL)))
        .and_then(|_| f.take(OVER_MEMORY_TAIL).read_to_end(&mut tail));
    match read {
        Ok(_) => String::from_utf8_lossy(&tail).into_owned(),
        Err(_) => String::new(),
    }
}

/// The node and GPU ids the job wrote into its slot (empty when it never started).
fn read_placement(slot: &Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(slot.join(PLACEMENT)).unwrap_or_default();
    let mut lines = text.lines();
    let node = lines.next().unwrap_or("").to_string();
    let gpus = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(String::from)
        .collect();
    (node, gpus)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_sigkill_is_out_of_memory_where_slurmstepd_says_it_killed_over_mem() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("log");
        let killed = || AttemptResult::Signaled {
            signal: libc::SIGKILL,
            oom: None,
        };
        std::fs::write(&log, "touched\n").unwrap();
        assert_eq!(over_memory(killed(), &log, "7"), killed());
        std::fs::write(
            &log,
            "touched\nslurmstepd-vm: error: StepId=7.batch exceeded memory limit (436137984 > \
             52428800), being killed\nslurmstepd-vm: error: Exceeded job memory limit\n",
        )
        .unwrap();
        match over_memory(killed(), &log, "7") {
            AttemptResult::Lost { reason } => {
                assert!(reason.contains("out of memory"), "{reason}");
                assert!(reason.contains("resources.mem_gb"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Only a kill: a step that printed the words and failed is a failure.
        let failed = AttemptResult::Failed { code: 1 };
        assert_eq!(over_memory(failed.clone(), &log, "7"), failed);
    }

    #[test]
    fn states_mean_what_slurm_says() {
        assert_eq!(JobState::parse("PENDING"), JobState::Waiting);
        assert_eq!(JobState::parse("RUNNING"), JobState::Running);
        assert_eq!(JobState::parse("COMPLETING"), JobState::Running);
        assert_eq!(JobState::parse("COMPLETED"), JobState::Finished);
        assert_eq!(JobState::parse("FAILED"), JobState::Finished);
        assert_eq!(JobState::parse("CANCELLED by 0"), JobState::Cancelled);
        assert_eq!(JobState::parse("TIMEOUT"), JobState::TimedOut);
        assert!(
            matches!(JobState::parse("NODE_FAIL"), JobState::Lost(w) if w.contains("node failed"))
        );
        assert!(
            matches!(JobState::parse("PREEMPTED"), JobState::Lost(w) if w.contains("preempted"))
        );
        assert!(
            matches!(JobState::parse("OUT_OF_MEMORY"), JobState::Lost(w) if w.contains("mem_gb"))
        );
        assert!(matches!(JobState::parse("WEIRD"), JobState::Lost(w) if w.contains("WEIRD")));
    }

    #[test]
    fn exit_codes_and_signals() {
        assert_eq!(exit_result("0:0"), AttemptResult::Success);
        assert_eq!(exit_result("3:0"), AttemptResult::Failed { code: 3 });
        assert_eq!(
            exit_result("0:11"),
            AttemptResult::Signaled {
                signal: 11,
                oom: None
            }
        );
        assert_eq!(exit_result("garbage"), AttemptResult::Failed { code: -1 });
    }

    #[test]
    fn scontrol_lines_split_into_fields() {
        let f = scontrol_fields(
            "JobId=2 JobName=x JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0",
        );
        assert_eq!(f["JobState"], "FAILED");
        assert_eq!(f["ExitCode"], "3:0");
    }

    #[test]
    fn scripts_quote_every_value() {
        let launch = Launch {
            program: PathBuf::from("/bin/echo"),
            argv0: "echo".into(),
            args: vec!["it's; rm -rf /".into(), "$HOME".into()],
            cwd: PathBuf::from("/s/work"),
            log: PathBuf::from("/s/log"),
            env: vec![
                ("NEEDLE_PARAM_X".into(), "a'b".into()),
                ("CUDA_VISIBLE_DEVICES".into(), "".into()),
            ],
        };
        let cpu = String::from_utf8(job_script(&launch, Path::new("/s"), 0)).unwrap();
        assert!(cpu.contains("export NEEDLE_PARAM_X='a'\\''b'\n"), "{cpu}");
        assert!(cpu.contains("export CUDA_VISIBLE_DEVICES=''\n"), "{cpu}");
        assert!(
            cpu.ends_with("exec '/bin/echo' 'it'\\''s; rm -rf /' '$HOME'\n"),
            "{cpu}"
        );
        // With GPUs the job keeps the devices Slurm gave it.
        let gpu = String::from_utf8(job_script(&launch, Path::new("/s"), 1)).unwrap();
        assert!(!gpu.contains("CUDA_VISIBLE_DEVICES="), "{gpu}");
    }

    #[test]
    fn a_script_runs_its_command_with_its_environment() {
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let launch = Launch {
            program: PathBuf::from("/bin/sh"),
            argv0: "sh".into(),
            args: vec![
                "-c".into(),
                "printf '%s|%s|%s' \"$1\" \"$NEEDLE_PARAM_X\" \"$(pwd)\" > out".into(),
                "sh".into(),
                "it's $HOME; `x`".into(),
            ],
            cwd: work.clone(),
            log: t.path().join("log"),
            env: vec![("NEEDLE_PARAM_X".into(), "a'b c".into())],
        };
        let script = t.path().join("job.sh");
        std::fs::write(&script, job_script(&launch, t.path(), 0)).unwrap();
        let status = std::process::Command::new("sh")
            .arg(&script)
            .status()
            .unwrap();
        assert!(status.success());
        let out = std::fs::read_to_string(work.join("out")).unwrap();
        assert_eq!(out, format!("it's $HOME; `x`|a'b c|{}", work.display()));
        let (node, gpus) = read_placement(t.path());
        assert!(!node.is_empty());
        assert!(gpus.is_empty());
    }

    /// Slurm starting a job again (preempted and requeued, or its node failed) runs the same
    /// script with SLURM_RESTART_COUNT set: the command finds an empty output directory.
    #[test]
    fn a_script_started_again_empties_its_output_directory() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::write(out.join("partial"), "half").unwrap();
        std::fs::write(out.join("sub/more"), "half").unwrap();
        std::fs::set_permissions(out.join("sub"), std::fs::Permissions::from_mode(0o555)).unwrap();
        let launch = Launch {
            program: PathBuf::from("/bin/sh"),
            argv0: "sh".into(),
            args: vec![
                "-c".into(),
                "ls -A \"$0\" > \"$0.seen\"".into(),
                out.display().to_string(),
            ],
            cwd: t.path().to_path_buf(),
            log: t.path().join("log"),
            env: vec![],
        };
        let script = t.path().join("job.sh");
        std::fs::write(&script, job_script(&launch, t.path(), 0)).unwrap();
        let run = |restarts: &str| {
            std::process::Command::new("sh")
                .arg(&script)
                .env("SLURM_RESTART_COUNT", restarts)
                .output()
                .unwrap()
        };
        // A first start leaves what is there.
        assert!(run("0").status.success());
        let seen = |t: &Path| std::fs::read_to_string(t.join("out.seen")).unwrap();
        assert_eq!(seen(t.path()), "partial\nsub\n");
        let again = run("1");
        assert!(again.status.success(), "{again:?}");
        assert_eq!(seen(t.path()), "");
        assert!(
            String::from_utf8_lossy(&again.stdout)
                .contains("Slurm started this job again (restart 1"),
            "{again:?}"
        );
    }
}
