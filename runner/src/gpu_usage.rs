//! GPU usage during a local run: every [`INTERVAL`] each of the run's GPUs that this machine
//! has is sampled for its utilisation and memory, and the samples are kept in the store with
//! the run ([`needle_core::store::GpuUsage`]) for `status` and `report`.
//!
//! ```text
//! Sampler::start ──▶ thread "needle-gpu-usage"
//!                      NVML (libnvidia-ml.so.1, loaded at run time) ──▶ read every 500 ms
//!                      else nvidia-smi --query-gpu=… -lms 500 ───────▶ a line per GPU per 500 ms
//!                      each sample ──▶ GpuUsage (buckets) ──▶ saved at the first, every 10 s, at the end
//! Sampler::stop  ──▶ wakes or kills it, waits at most STOP_WAIT
//! ```
//!
//! The sampler never holds the run up: it works on its own thread, starts after the run has,
//! and anything that goes wrong (no NVML, a broken nvidia-smi, a full disk) is a warning, once,
//! and the end of sampling, never of the run. A machine without GPUs gets nothing: no NVML to
//! load and no `nvidia-smi` on `PATH` means no thread does anything and no process is spawned.
//!
//! A run's GPUs are the ids its steps see in `CUDA_VISIBLE_DEVICES`: an index (`0`), a UUID
//! (`GPU-8f1c…`, or a prefix of one, as CUDA accepts) or a MIG id (`MIG-…`). A UUID is matched
//! by UUID, an index by index (NVML's and nvidia-smi's are both PCI bus order; the runner sets
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID` for steps so that CUDA's agree), a MIG id as the GPU it is a
//! part of (utilisation is only known for a whole GPU, and not at all in MIG mode). Ids the
//! machine does not know (`--gpus 4` on a laptop) are not sampled.
//!
//! `NEEDLE_GPU_USAGE` picks the source: `auto` (the default: NVML, else nvidia-smi),
//! `nvidia-smi` (never NVML: the tests' fake nvidia-smi must win on a machine with GPUs), or
//! `off`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use needle_core::store::{
    Attempt, GpuIdentity, GpuSample, GpuSeries, GpuUsage, Millis, RunRecord, Store, now_millis,
};

/// How often each GPU is sampled.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// How often the samples so far are saved: what a runner killed mid-run leaves, and how stale
/// a `status` of the running run may be.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// How long [`Sampler::stop`] waits for the sampler's thread before leaving it behind (a
/// driver call that hangs must not keep the run from ending).
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The variable that picks the source (see the module's doc).
pub const ENV: &str = "NEEDLE_GPU_USAGE";

/// What nvidia-smi is asked for, in this order, per GPU.
pub const QUERY: &str = "index,uuid,name,utilization.gpu,memory.used,memory.total";

/// The GPU ids an attempt held, as the run handed them to it: the label of its lane in
/// `status` and `report`, and what a [`GpuSeries::id`] is matched against.
pub fn attempt_gpus(attempt: &Attempt) -> Vec<String> {
    attempt.gpus.clone()
}

/// Sampling in progress; [`Sampler::stop`] ends it (so does dropping it).
pub struct Sampler {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    stop: bool,
    /// The nvidia-smi process (and group) being read, until it is reaped: only then may its
    /// id name another process.
    child: Option<u32>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.lock().stop
    }

    /// Sleep for `d`, or until stopped; whether to go on.
    fn wait(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut state = self.lock();
        while !state.stop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            state = self
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        false
    }
}

impl Sampler {
    /// Sample `devices` (the run's GPU ids) for run `run`, which started at `start`. `None`
    /// when there is nothing to sample (no GPU, or `NEEDLE_GPU_USAGE=off`). Returns at once:
    /// finding the GPUs happens on the sampler's thread.
    pub fn start(
        store: Arc<Store>,
        run: u64,
        start: Millis,
        devices: &[String],
    ) -> Option<Sampler> {
        if devices.is_empty() {
            return None;
        }
        let source = match std::env::var(ENV).as_deref() {
            Ok("off") => return None,
            Ok("nvidia-smi") => Source::NvidiaSmi,
            Ok("auto") | Ok("") | Err(_) => Source::Auto,
            Ok(other) => {
                tracing::warn!("{ENV}=`{other}` is not one of auto, nvidia-smi, off: using auto");
                Source::Auto
            }
        };
        let shared = Arc::new(Shared::default());
        let (done_tx, done) = mpsc::channel();
        let devices = devices.to_vec();
        let spawned = std::thread::Builder::new()
            .name("needle-gpu-usage".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let mut recorder = Recorder::new(&store, run, start);
                    sample(source, &devices, &shared, &mut recorder);
                    recorder.save();
                    let _ = done_tx.send(());
                }
            });
        match spawned {
            Ok(_) => Some(Sampler { shared, done }),
            Err(e) => {
                tracing::warn!("GPU usage is not sampled: could not start its thread: {e}");
                None
            }
        }
    }

    /// Stop sampling and save what was sampled; waits for that at most [`STOP_WAIT`].
    pub fn stop(self) {
        // The work is in `Drop`, so that an early return of the caller stops it too.
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stop = true;
            if let Some(pid) = state.child {
                // SAFETY: a signal to the group of our own child, which is not reaped while
                // `child` names it, so the id is still its own.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                }
            }
        }
        self.shared.wake.notify_all();
        if let Err(mpsc::RecvTimeoutError::Timeout) = self.done.recv_timeout(STOP_WAIT) {
            tracing::warn!(
                "GPU usage: the sampler did not stop within {}s; what it sampled since its last save is not kept",
                STOP_WAIT.as_secs()
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Auto,
    NvidiaSmi,
}

/// Find the GPUs and sample them until stopped.
fn sample(source: Source, devices: &[String], shared: &Shared, recorder: &mut Recorder) {
    if source == Source::Auto {
        match nvml::open() {
            nvml::Opened::Nvml(lib) => return nvml::sample(&lib, devices, shared, recorder),
            nvml::Opened::NoGpu => return,
            nvml::Opened::Missing => {}
        }
    }
    let Some(program) = find_in_path("nvidia-smi") else {
        tracing::debug!("GPU usage: neither NVML nor nvidia-smi here");
        return;
    };
    smi::sample(&program, devices, shared, recorder);
}

/// The first executable `name` in `PATH`, as a spawn would find it; looking first means a
/// machine without it spawns nothing.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Collects samples into the run's [`GpuUsage`] and saves it now and then.
struct Recorder<'a> {
    store: &'a Store,
    usage: GpuUsage,
    /// The run's GPU id → its series in `usage`, once it had a sample.
    series: BTreeMap<String, usize>,
    saved: Option<Instant>,
    save_failed: bool,
}

impl<'a> Recorder<'a> {
    fn new(store: &'a Store, run: u64, start: Millis) -> Recorder<'a> {
        Recorder {
            store,
            usage: GpuUsage::new(run, "", INTERVAL.as_millis() as u64, start),
            series: BTreeMap::new(),
            saved: None,
            save_failed: false,
        }
    }

    fn set_source(&mut self, source: &str) {
        self.usage.source = source.to_string();
    }

    /// Count `sample` of the physical GPU `gpu` for the run's GPU `id`, taken `at`.
    fn record(&mut self, id: &str, gpu: &GpuIdentity, at: Millis, sample: GpuSample) {
        let position = match self.series.get(id) {
            Some(&i) => i,
            None => {
                let i = self.usage.add_gpu(id, gpu);
                self.series.insert(id.to_string(), i);
                i
            }
        };
        self.usage.record(position, at, sample);
        if self.saved.is_none_or(|t| t.elapsed() >= SAVE_EVERY) {
            self.save();
        }
    }

    /// Save what was sampled, if anything was.
    fn save(&mut self) {
        if self.usage.gpus.is_empty() || self.save_failed {
            return;
        }
        self.saved = Some(Instant::now());
        if let Err(e) = self.store.put_gpu_usage(&self.usage) {
            self.save_failed = true;
            let cause = std::error::Error::source(&e).map(|s| format!(": {s}"));
            tracing::warn!(
                "GPU usage of this run is not saved: {e}{}",
                cause.unwrap_or_default()
            );
        }
    }
}

/// A run's GPU id as CUDA reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum DeviceId {
    Index(u32),
    /// `GPU-…`, whole or a prefix.
    Uuid(String),
    Mig(String),
}

impl DeviceId {
    fn parse(id: &str) -> Option<DeviceId> {
        let id = id.trim();
        if let Ok(i) = id.parse() {
            Some(DeviceId::Index(i))
        } else if id.starts_with("GPU-") {
            Some(DeviceId::Uuid(id.to_string()))
        } else if id.starts_with("MIG-") {
            Some(DeviceId::Mig(id.to_string()))
        } else {
            None
        }
    }

    /// Whether this id names the physical GPU `gpu`; `mig_parents` maps MIG ids to the UUID
    /// of their GPU.
    fn names(&self, gpu: &GpuIdentity, mig_parents: &BTreeMap<String, String>) -> bool {
        match self {
            DeviceId::Index(i) => gpu.index == *i,
            DeviceId::Uuid(u) => gpu.uuid.starts_with(u.as_str()),
            DeviceId::Mig(m) => mig_parents.get(m).is_some_and(|parent| *parent == gpu.uuid),
        }
    }
}

/// Sampling through nvidia-smi: one `-lms` process for the whole run, read line by line.
mod smi {
    use super::*;

    /// One line of `--query-gpu=QUERY --format=csv,noheader,nounits`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Row {
        pub gpu: GpuIdentity,
        pub sample: GpuSample,
    }

    /// `0, GPU-8f1c…, NVIDIA H100 80GB HBM3, 20, 1234, 81559`; a value nvidia-smi does not
    /// know is `[N/A]` or `[Not Supported]`. `None` for anything else.
    pub fn parse_row(line: &str) -> Option<Row> {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 6 {
            return None;
        }
        let n = fields.len();
        let index = fields[0].parse().ok()?;
        let uuid = fields[1];
        if !uuid.starts_with("GPU-") {
            return None;
        }
        // A comma in the name (none known, but it is free text) leaves it in several fields.
        let name = fields[2..n - 3].join(", ");
        let number = |s: &str| -> Option<Option<u64>> {
            if s.starts_with('[') || s == "N/A" {
                Some(None)
            } else {
                s.parse().ok().map(Some)
            }
        };
        let util = number(fields[n - 3])?;
        let used = number(fields[n - 2])?;
        let total = number(fields[n - 1])?;
        Some(Row {
            gpu: GpuIdentity {
                index,
                uuid: uuid.to_string(),
                name,
            },
            sample: GpuSample {
                util: util.map(|u| u.min(100) as u32),
                memory_used_mib: used.unwrap_or(0),
                memory_total_mib: total.unwrap_or(0),
            },
        })
    }

    /// MIG device UUID → its GPU's UUID, from `nvidia-smi -L`:
    /// ```text
    /// GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-…)
    ///   MIG 1g.5gb      Device  0: (UUID: MIG-c6d4f1ef-…)
    /// ```
    pub fn parse_mig_parents(listing: &str) -> BTreeMap<String, String> {
        let uuid_in = |line: &str| {
            let at = line.find("(UUID: ")? + "(UUID: ".len();
            let rest = &line[at..];
            Some(rest[..rest.find(')')?].trim().to_string())
        };
        let mut parents = BTreeMap::new();
        let mut gpu = None;
        for line in listing.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("GPU ") {
                gpu = uuid_in(trimmed);
            } else if trimmed.starts_with("MIG ")
                && let (Some(mig), Some(gpu)) = (uuid_in(trimmed), &gpu)
            {
                parents.insert(mig, gpu.clone());
            }
        }
        parents
    }

    pub fn sample(
        program: &std::path::Path,
        devices: &[String],
        shared: &Shared,
        recorder: &mut Recorder,
    ) {
        recorder.set_source("nvidia-smi");
        let ids: Vec<(String, DeviceId)> = devices
            .iter()
            .filter_map(|d| Some((d.clone(), DeviceId::parse(d)?)))
            .collect();
        if ids.is_empty() {
            return;
        }
        let mig_parents = if ids.iter().any(|(_, d)| matches!(d, DeviceId::Mig(_))) {
            Command::new(program)
                .arg("-L")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map(|o| parse_mig_parents(&String::from_utf8_lossy(&o.stdout)))
                .unwrap_or_default()
        } else {
            BTreeMap::new()
        };
        let child = {
            let mut state = shared.lock();
            if state.stop {
                return;
            }
            let spawned = Command::new(program)
                .arg(format!("--query-gpu={QUERY}"))
                .args(["--format=csv,noheader,nounits", "-lms"])
                .arg(INTERVAL.as_millis().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                // nvidia-smi says what is wrong on stdout; stderr could fill unread.
                .stderr(Stdio::null())
                // Its own group: stopping kills it and anything it started (a wrapper script's
                // children hold the pipe too).
                .process_group(0)
                .spawn();
            match spawned {
                Ok(child) => {
                    state.child = Some(child.id());
                    child
                }
                Err(e) => {
                    tracing::warn!(
                        "GPU usage is not sampled: could not start `{}`: {e}",
                        program.display()
                    );
                    return;
                }
            }
        };
        let mut child = child;
        let mut bad: Option<String> = None;
        if let Some(stdout) = child.stdout.take() {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let at = now_millis();
                match parse_row(&line) {
                    Some(row) => {
                        for (id, device) in &ids {
                            if device.names(&row.gpu, &mig_parents) {
                                recorder.record(id, &row.gpu, at, row.sample);
                            }
                        }
                    }
                    None if bad.is_none() => {
                        tracing::warn!(
                            "GPU usage: `{} --query-gpu={QUERY}` printed `{}` where a sample was expected",
                            program.display(),
                            line.chars().take(200).collect::<String>()
                        );
                        bad = Some(line);
                    }
                    None => {}
                }
            }
        }
        // Reaped only once the id is withdrawn, so that `stop` never signals a stranger.
        let stopped = {
            let mut state = shared.lock();
            state.child = None;
            state.stop
        };
        if !stopped {
            // Ended on its own (or closed its output): the group may linger.
            // SAFETY: our unreaped child's group, as in `Drop`.
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
            }
        }
        let status = child.wait();
        if !stopped && !shared.stopping() {
            let how = match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(
                "GPU usage sampling ended before the run: `{}` stopped ({how})",
                program.display()
            );
        }
    }
}

/// Sampling through NVML, loaded at run time.
mod nvml {
    use super::*;
    use nvml_wrapper::Nvml;
    use nvml_wrapper::error::NvmlError;

    pub enum Opened {
        Nvml(Box<Nvml>),
        /// NVML is here but finds no GPU (no driver loaded, or no device).
        NoGpu,
        /// No NVML library: try nvidia-smi.
        Missing,
    }

    pub fn open() -> Opened {
        match Nvml::init() {
            Ok(nvml) => match nvml.device_count() {
                Ok(0) => Opened::NoGpu,
                Ok(_) => Opened::Nvml(Box::new(nvml)),
                Err(e) => {
                    tracing::debug!("GPU usage: NVML counts no GPU: {e}");
                    Opened::NoGpu
                }
            },
            Err(NvmlError::LibloadingError(e)) => {
                tracing::debug!("GPU usage: no NVML: {e}");
                Opened::Missing
            }
            Err(NvmlError::FailedToLoadSymbol(e)) => {
                tracing::debug!("GPU usage: NVML too old: {e}");
                Opened::Missing
            }
            Err(NvmlError::DriverNotLoaded) => Opened::NoGpu,
            Err(e) => {
                tracing::warn!("GPU usage is not sampled: NVML: {e}");
                Opened::NoGpu
            }
        }
    }

    pub fn sample(nvml: &Nvml, devices: &[String], shared: &Shared, recorder: &mut Recorder) {
        recorder.set_source("nvml");
        let count = nvml.device_count().unwrap_or(0);
        let mut gpus = Vec::new();
        for index in 0..count {
            let Ok(device) = nvml.device_by_index(index) else {
                continue;
            };
            let (Ok(uuid), Ok(name)) = (device.uuid(), device.name()) else {
                continue;
            };
            gpus.push((GpuIdentity { index, uuid, name }, device));
        }
        let mut mig_parents = BTreeMap::new();
        for d in devices {
            if let Some(DeviceId::Mig(mig)) = DeviceId::parse(d)
                && let Ok(parent) = nvml
                    .device_by_uuid(mig.as_str())
                    .and_then(|m| m.mig_parent_device().and_then(|p| p.uuid()))
            {
                mig_parents.insert(mig, parent);
            }
        }
        // The run's id → the position of its GPU in `gpus`.
        let watched: Vec<(String, usize)> = devices
            .iter()
            .filter_map(|d| {
                let id = DeviceId::parse(d)?;
                let at = gpus.iter().position(|(g, _)| id.names(g, &mig_parents))?;
                Some((d.clone(), at))
            })
            .collect();
        if watched.is_empty() {
            return;
        }
        let mut failed = false;
        loop {
            for (id, at) in &watched {
                let (gpu, device) = &gpus[*at];
                let util = device.utilization_rates().map(|u| u.gpu.min(100)).ok();
                match device.memory_info() {
                    Ok(memory) => recorder.record(
                        id,
                        gpu,
                        now_millis(),
                        GpuSample {
                            util,
                            memory_used_mib: memory.used >> 20,
                            memory_total_mib: memory.total >> 20,
                        },
                    ),
                    Err(e) if !failed => {
                        failed = true;
                        tracing::warn!("GPU usage: NVML could not read GPU {id}: {e}");
                    }
                    Err(_) => {}
                }
            }
            if !shared.wait(INTERVAL) {
                return;
            }
        }
    }
}

/// What `status` says of one GPU of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GpuSummary {
    pub id: String,
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Mean utilisation over the run (%), to 0.1; `None` where the GPU reports none (MIG).
    pub busy_percent: Option<f64>,
    pub memory_peak_mib: u64,
    pub memory_total_mib: u64,
    /// Share of the run's wall time during which some step held this GPU (%), to 0.1.
    pub held_percent: f64,
    pub samples: u64,
}

/// Each sampled GPU's busy share, peak memory and held share over `run`, which ran until `end`
/// (its end, or now while it runs): one per series of `usage`, in its order.
pub fn summarise(run: &RunRecord, usage: &GpuUsage, end: Millis) -> Vec<GpuSummary> {
    let wall = end.saturating_sub(run.started);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    usage
        .gpus
        .iter()
        .map(|s: &GpuSeries| GpuSummary {
            id: s.id.clone(),
            index: s.index,
            uuid: s.uuid.clone(),
            name: s.name.clone(),
            busy_percent: s.busy_percent().map(round),
            memory_peak_mib: s.memory_peak_mib(),
            memory_total_mib: s.memory_total_mib,
            held_percent: if wall == 0 {
                0.0
            } else {
                round(100.0 * held_ms(run, &s.id, end) as f64 / wall as f64)
            },
            samples: s.samples(),
        })
        .collect()
}

/// When `run` ended: its recorded end; else (under way, or its runner was killed) `now` if it
/// is `live`, else the last moment anything of it was recorded.
pub fn run_end(run: &RunRecord, usage: Option<&GpuUsage>, live: bool, now: Millis) -> Millis {
    if let Some(end) = run.ended {
        return end;
    }
    if live {
        return now;
    }
    let attempts = run
        .steps
        .iter()
        .flat_map(|s| &s.attempts)
        .map(|a| a.ended.max(a.started));
    let sampled = usage.map(|u| {
        let buckets = u.gpus.iter().map(|s| s.n.len()).max().unwrap_or(0) as u64;
        u.start + buckets * u.bucket_ms
    });
    attempts.chain(sampled).fold(run.started, Millis::max)
}

/// Milliseconds before `end` during which some attempt of `run` held GPU `id` (overlapping
/// attempts, which share the GPU, count once). An attempt still under way holds it until `end`.
pub fn held_ms(run: &RunRecord, id: &str, end: Millis) -> u64 {
    let mut spans: Vec<(Millis, Millis)> = run
        .steps
        .iter()
        .flat_map(|s| &s.attempts)
        .filter(|a| attempt_gpus(a).iter().any(|g| g == id))
        .map(|a| {
            let until = if a.ended == 0 { end } else { a.ended.min(end) };
            (a.started, until.max(a.started))
        })
        .collect();
    spans.sort_unstable();
    let mut held = 0;
    let mut covered_to = 0;
    for (from, to) in spans {
        let from = from.max(covered_to);
        if to > from {
            held += to - from;
            covered_to = to;
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::smi::{parse_mig_parents, parse_row};
    use super::*;
    use needle_core::store::{AttemptResult, RunState, RunStep, StepStatus};

    fn gpu(index: u32, uuid: &str) -> GpuIdentity {
        GpuIdentity {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
        }
    }

    #[test]
    fn parses_nvidia_smis_rows() {
        let row = parse_row(
            "0, GPU-8f1c2d3e-0000-1111-2222-333344445555, NVIDIA H100 80GB HBM3, 20, 1234, 81559",
        )
        .unwrap();
        assert_eq!(row.gpu, gpu(0, "GPU-8f1c2d3e-0000-1111-2222-333344445555"));
        assert_eq!(
            row.sample,
            GpuSample {
                util: Some(20),
                memory_used_mib: 1234,
                memory_total_mib: 81559
            }
        );
        // In MIG mode a GPU has no utilisation.
        let mig = parse_row("3, GPU-aa, NVIDIA A100-SXM4-40GB, [N/A], 10, 40960").unwrap();
        assert_eq!(mig.sample.util, None);
        assert_eq!(mig.gpu.index, 3);
        // A name with a comma.
        let odd = parse_row("1, GPU-bb, Tesla, rev 2, 100, 5, 10").unwrap();
        assert_eq!(odd.gpu.name, "Tesla, rev 2");
        for garbage in [
            "",
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
            "0, GPU-aa, name, 20, 1234",
            "x, GPU-aa, name, 20, 1234, 5678",
            "0, 00000000:01:00.0, name, 20, 1234, 5678",
            "0, GPU-aa, name, busy, 1234, 5678",
            "index, uuid, name, utilization.gpu [%], memory.used [MiB], memory.total [MiB]",
        ] {
            assert_eq!(parse_row(garbage), None, "{garbage}");
        }
    }

    #[test]
    fn parses_mig_parents_from_the_listing() {
        let listing = "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5b)\n  MIG 1g.5gb      Device  0: (UUID: MIG-c6d4)\n  MIG 1g.5gb      Device  1: (UUID: MIG-77aa)\nGPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-9e3d)\n  MIG 3g.20gb     Device  0: (UUID: MIG-0102)\n";
        let parents = parse_mig_parents(listing);
        assert_eq!(parents.len(), 3);
        assert_eq!(parents["MIG-c6d4"], "GPU-5d5b");
        assert_eq!(parents["MIG-77aa"], "GPU-5d5b");
        assert_eq!(parents["MIG-0102"], "GPU-9e3d");
    }

    #[test]
    fn device_ids_match_by_uuid_else_by_index() {
        let g = gpu(2, "GPU-8f1c2d3e-0000");
        let parents = BTreeMap::from([("MIG-1".to_string(), "GPU-8f1c2d3e-0000".to_string())]);
        let names = |id: &str| DeviceId::parse(id).is_some_and(|d| d.names(&g, &parents));
        assert!(names("2"));
        assert!(!names("0"));
        assert!(names("GPU-8f1c2d3e-0000"));
        assert!(names("GPU-8f1c"), "a prefix, as CUDA takes it");
        assert!(!names("GPU-0000"));
        assert!(names("MIG-1"));
        assert!(!names("MIG-2"));
        assert!(!names("cpu"));
    }

    fn attempt(started: Millis, ended: Millis, gpus: Vec<u32>) -> Attempt {
        Attempt {
            n: 1,
            started,
            ended,
            result: AttemptResult::Success,
            gpus: gpus.iter().map(u32::to_string).collect(),
            gpu_share: None,
            gpu_mem_gb: None,
            log: String::new(),
            job: None,
        }
    }

    fn run(attempts: Vec<Attempt>) -> RunRecord {
        RunRecord {
            id: 1,
            recipe_name: "r".into(),
            recipe_path: "r.toml".into(),
            recipe_dir: "/".into(),
            recipe_text: String::new(),
            sets: Vec::new(),
            rerun_of: None,
            started: 1_000,
            ended: Some(11_000),
            state: RunState::Succeeded,
            arms: Vec::new(),
            steps: vec![RunStep {
                id: needle_core::digest::StepId::of_parts(&[b"s"]),
                name: "s".into(),
                op: "exec".into(),
                bindings: Default::default(),
                arms: Vec::new(),
                inputs: Default::default(),
                key: None,
                status: StepStatus::Pending,
                attempts,
            }],
        }
    }

    #[test]
    fn held_time_counts_shared_stretches_once() {
        let r = run(vec![
            attempt(1_000, 3_000, vec![0]),
            // Sharing GPU 0 with the first, then alone.
            attempt(2_000, 4_000, vec![0, 1]),
            attempt(6_000, 7_000, vec![0]),
            // Still running: held until the end given.
            attempt(10_000, 0, vec![1]),
        ]);
        assert_eq!(held_ms(&r, "0", 11_000), 4_000);
        assert_eq!(held_ms(&r, "1", 11_000), 3_000);
        assert_eq!(held_ms(&r, "2", 11_000), 0);
        let mut usage = GpuUsage::new(1, "nvml", 500, 1_000);
        let s = usage.add_gpu("0", &gpu(0, "GPU-0"));
        usage.record(
            s,
            1_000,
            GpuSample {
                util: Some(30),
                memory_used_mib: 100,
                memory_total_mib: 1_000,
            },
        );
        let summary = summarise(&r, &usage, 11_000);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].held_percent, 40.0);
        assert_eq!(summary[0].busy_percent, Some(30.0));
        assert_eq!(summary[0].memory_peak_mib, 100);
    }

    #[test]
    fn a_killed_runs_end_is_its_last_record() {
        let mut r = run(vec![attempt(2_000, 5_000, vec![0])]);
        r.ended = None;
        assert_eq!(run_end(&r, None, false, 99_000), 5_000);
        assert_eq!(run_end(&r, None, true, 99_000), 99_000);
        let mut usage = GpuUsage::new(1, "nvml", 500, 1_000);
        let s = usage.add_gpu("0", &gpu(0, "GPU-0"));
        let sample = GpuSample {
            util: Some(1),
            memory_used_mib: 1,
            memory_total_mib: 1,
        };
        usage.record(s, 7_200, sample);
        assert_eq!(run_end(&r, Some(&usage), false, 99_000), 7_500);
    }
}
