//! `needle doctor`: what this installation has to work with — libtorch, CUDA and the GPUs,
//! CPUs — and what the store holds. Reports problems instead of failing on them; a store in
//! use by a run is said to be so.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use needle_core::store::remote::Reader;
use needle_core::store::{LockMode, StoreCounts, StoreError, StoreRead};
use serde::{Deserialize, Serialize};

use crate::cli::{Cli, JsonArg, RemoteArgs};
use crate::commands::print_json;
use crate::commands::show::human_bytes;
use crate::error::{CliError, Exit};
use crate::remote::Remote;

#[derive(Debug, Serialize)]
struct Report {
    needle: &'static str,
    /// What `needle-worker --torch-info` reports; `{"error": …}` when it could not.
    libtorch: TorchReport,
    gpus: Gpus,
    cpus: usize,
    store: StoreReport,
    /// The shared cache, when one is configured.
    remote: Option<RemoteReport>,
}

#[derive(Debug, Serialize)]
struct RemoteReport {
    url: Option<String>,
    /// How many step records it lists; `None` when it could not be listed (see `error`).
    steps: Option<usize>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum TorchReport {
    Info(TorchInfo),
    Error { error: String },
}

/// `needle_models::torch::TorchInfo`, as the worker prints it.
#[derive(Debug, Serialize, Deserialize)]
struct TorchInfo {
    version: Option<String>,
    built_against: String,
    lib_dir: Option<String>,
    cuda: bool,
    cuda_devices: i64,
    cudnn: bool,
    threads: i32,
}

#[derive(Debug, Serialize)]
struct Gpus {
    /// `nvidia-smi -L`, line by line; `None` when there is no `nvidia-smi` or it failed.
    nvidia_smi: Option<Vec<String>>,
    cuda_visible_devices: Option<String>,
    /// What `--gpus auto` hands out: each device as a step sees it, and its memory in MB.
    auto: Vec<AutoGpu>,
}

#[derive(Debug, Serialize)]
struct AutoGpu {
    id: String,
    mem_mb: Option<u64>,
}

#[derive(Debug, Serialize)]
struct StoreReport {
    path: String,
    exists: bool,
    /// Bytes on disk (allocated blocks; hard links counted once).
    size_bytes: u64,
    /// `None` when the store could not be read (see `locked_by`, `error`).
    counts: Option<StoreCounts>,
    /// Who holds the store, when a run has it open (it counts for doctor when it can).
    locked_by: Option<String>,
    /// Why it could not be read, for any other reason.
    error: Option<String>,
}

pub fn doctor(cli: &Cli, args: &JsonArg) -> Result<Exit, CliError> {
    let report = Report {
        needle: env!("CARGO_PKG_VERSION"),
        libtorch: match torch_info() {
            Ok(info) => TorchReport::Info(info),
            Err(e) => TorchReport::Error {
                error: needle_core::error_chain::joined(&e, ": "),
            },
        },
        gpus: Gpus {
            nvidia_smi: nvidia_smi(),
            cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
            auto: crate::gpus::GpuSpec::Auto
                .resolve(None)
                .into_iter()
                .map(|g| AutoGpu {
                    id: g.id,
                    mem_mb: g.mem_mb,
                })
                .collect(),
        },
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        store: store_report(&cli.store),
        remote: remote_report(),
    };
    if args.json {
        print_json(&report);
    } else {
        print_text(&report);
    }
    Ok(Exit::Success)
}

/// The configured remote and whether it answers: one listing of its step records.
fn remote_report() -> Option<RemoteReport> {
    let remote = match Remote::from_args(&RemoteArgs::default(), None) {
        Ok(remote) => remote?,
        Err(e) => {
            return Some(RemoteReport {
                url: None,
                steps: None,
                error: Some(e.to_string()),
            });
        }
    };
    let listed = crate::remote::block_on(remote.index());
    Some(RemoteReport {
        url: Some(remote.url().to_string()),
        steps: listed.as_ref().ok().map(|index| index.steps.len()),
        error: listed.err().map(|e| crate::remote::error_chain(&e)),
    })
}

/// Why the worker could not say which libtorch it loads.
#[derive(Debug, thiserror::Error)]
enum TorchInfoError {
    #[error("could not start `{}`", worker.display())]
    Spawn {
        worker: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` failed: {stderr}", worker.display())]
    Failed { worker: PathBuf, stderr: String },
    #[error("unexpected answer from the worker")]
    Answer(#[source] serde_json::Error),
}

/// libtorch is loaded only by `needle-worker`, so ask it, as a step would find it.
fn torch_info() -> Result<TorchInfo, TorchInfoError> {
    let worker = crate::engine::worker_path();
    let out = match std::process::Command::new(&worker)
        .arg("--torch-info")
        .output()
    {
        Ok(out) => out,
        Err(source) => return Err(TorchInfoError::Spawn { worker, source }),
    };
    if !out.status.success() {
        return Err(TorchInfoError::Failed {
            worker,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(TorchInfoError::Answer)
}

fn nvidia_smi() -> Option<Vec<String>> {
    let out = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
    )
}

fn store_report(path: &Path) -> StoreReport {
    let root = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut report = StoreReport {
        path: root.display().to_string(),
        exists: root.exists(),
        size_bytes: 0,
        counts: None,
        locked_by: None,
        error: None,
    };
    if !report.exists {
        return report;
    }
    // Counted first, and the store closed again at once: a run that holds it counts for us
    // (through its socket); never wait for a run's lock otherwise (only for another reader's
    // moment), never hold it longer than the counting takes.
    match Reader::open(&root, LockMode::Fail) {
        Ok(reader) => {
            if let Some(run) = reader.live_run() {
                report.locked_by = Some(format!("run {run}, which counted for doctor"));
            }
            match reader.counts() {
                Ok(counts) => report.counts = Some(counts),
                Err(e) => report.error = Some(e.to_string()),
            }
        }
        Err(StoreError::Locked { holder, .. }) => report.locked_by = Some(holder),
        Err(e) => report.error = Some(e.to_string()),
    }
    report.size_bytes = disk_usage(&root);
    report
}

/// Allocated bytes under `root`, each inode once (views hard-link their blobs), symlinks not
/// followed. Unreadable entries are skipped: a run may be removing staging dirs meanwhile.
fn disk_usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;

    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    total
}

fn print_text(r: &Report) {
    println!("needle      {}", r.needle);
    let t = match &r.libtorch {
        TorchReport::Info(t) => t,
        TorchReport::Error { error: e } => {
            println!("libtorch    not usable: {e}");
            print_store(&r.store);
            return;
        }
    };
    let version = t.version.as_deref().unwrap_or("unknown version");
    let mut libtorch = version.to_string();
    if t.version.as_deref().is_some_and(|v| v != t.built_against) {
        libtorch.push_str(&format!(" (built against {})", t.built_against));
    }
    if let Some(dir) = &t.lib_dir {
        libtorch.push_str(&format!(", from {dir}"));
    }
    println!("libtorch    {libtorch}");

    let listed = r.gpus.nvidia_smi.as_ref().map_or(0, Vec::len);
    if t.cuda {
        let cudnn = if t.cudnn { "yes" } else { "no" };
        println!(
            "cuda        yes: {} device(s), cudnn {cudnn}",
            t.cuda_devices
        );
    } else if listed > 0 {
        println!(
            "cuda        no: torch sees no GPU, though nvidia-smi lists {listed} \
             (check the driver, and CUDA_VISIBLE_DEVICES)"
        );
    } else {
        println!("cuda        no");
    }
    match &r.gpus.nvidia_smi {
        None => println!("gpus        none (no nvidia-smi)"),
        Some(lines) if lines.is_empty() => println!("gpus        none (nvidia-smi lists none)"),
        Some(lines) => {
            for (i, l) in lines.iter().enumerate() {
                let label = if i == 0 { "gpus" } else { "" };
                println!("{label:<12}{l}");
            }
        }
    }
    match &r.gpus.cuda_visible_devices {
        Some(v) => println!("            CUDA_VISIBLE_DEVICES={v}"),
        None => println!("            CUDA_VISIBLE_DEVICES is not set"),
    }
    let auto: Vec<String> = (r.gpus.auto.iter())
        .map(|g| match g.mem_mb {
            Some(mb) => format!("{} ({})", g.id, crate::commands::run::fmt_gb(mb)),
            None => format!("{} (memory unknown)", g.id),
        })
        .collect();
    if auto.is_empty() {
        println!("            a run gets no GPU (--gpus auto): GPU steps run on the CPU");
    } else {
        println!("            a run gets (--gpus auto): {}", auto.join(", "));
    }
    println!("cpus        {} (torch threads: {})", r.cpus, t.threads);
    print_store(&r.store);
    if let Some(remote) = &r.remote {
        let url = remote.url.as_deref().unwrap_or("(not usable)");
        match (remote.steps, &remote.error) {
            (Some(n), _) => println!("remote      {url}: answers, {n} step record(s)"),
            (None, error) => println!(
                "remote      {url}: unreachable: {}",
                error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
}

fn print_store(s: &StoreReport) {
    if !s.exists {
        println!("store       {}: none yet", s.path);
        return;
    }
    let size = human_bytes(s.size_bytes);
    let in_use = match &s.locked_by {
        Some(holder) => format!("; in use by {holder}"),
        None => String::new(),
    };
    match (&s.counts, &s.locked_by, &s.error) {
        (Some(c), _, _) => println!(
            "store       {}: {size} on disk, {} steps, {} artifacts, {} runs{in_use}",
            s.path, c.steps, c.artifacts, c.runs
        ),
        (None, Some(holder), _) => println!(
            "store       {}: {size} on disk; in use by {holder}, so not counted",
            s.path
        ),
        (None, None, error) => println!(
            "store       {}: {size} on disk; unreadable: {}",
            s.path,
            error.as_deref().unwrap_or("unknown error")
        ),
    }
}
