//! What an attempt is, between the engine and the executors: what it needs
//! ([`AttemptSpec`]), what it holds ([`Held`]), how it ended ([`AttemptEnd`]), and the
//! [`Event`]s that report it to the engine. A leaf: it depends on no other module of the runner
//! but `mps` (the directories of a run's MPS server) and, for the event that hands the engine
//! a joining run, `engine`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use needle_core::digest::{ArtifactDigest, BlobDigest, StepKey};
use needle_core::store::{AttemptResult, InputDigests, RunState};
use needle_core::value::Value;

/// What reaches the loop from outside.
#[derive(Debug)]
pub enum Event {
    /// An attempt's process runs, or its batch job was submitted.
    Started {
        node: usize,
        handle: Handle,
    },
    Ended(AttemptEnd),
    /// Results of one commit batch, and the staging slots it has cleaned for reuse.
    Committed(Vec<(usize, Result<ArtifactDigest, String>)>, Vec<PathBuf>),
    RetryDue {
        node: usize,
    },
    /// Another `needle run` hands the runner its run (see `join`).
    Join(Box<crate::engine::Joining>),
    /// The client `client` cancelled its run (Ctrl-C), or went away.
    Cancel {
        client: u64,
    },
}

/// What the runner holds of a started attempt, to stop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handle {
    /// The pid of a local attempt, leader of its process group.
    Process(u32),
    /// A Slurm job id.
    Job(String),
}

/// How a run ended, for the summary and the exit code.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunOutcome {
    pub run: u64,
    pub state: RunState,
    pub executed: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: usize,
    pub pending: usize,
    /// Steps a `[search]` stopped: their arm was not kept at an earlier rung.
    #[serde(default)]
    pub stopped: usize,
    pub duration_ms: u64,
    /// Run id → how many of this run's steps another run executed for it (the same key, in
    /// flight there when this run reached it). Counted among `cached`.
    #[serde(default)]
    pub shared: std::collections::BTreeMap<u64, usize>,
}

/// Everything one attempt needs. Built by the engine, consumed by [`run_attempt`].
#[derive(Debug, Clone)]
pub struct AttemptSpec {
    pub node: usize,
    pub key: StepKey,
    pub run: u64,
    pub attempt: u32,
    pub step_name: String,
    /// argv; a first element with a `/` is resolved against the working directory.
    pub cmd: Vec<String>,
    /// Where the engine found `cmd[0]` on PATH (looked up once per name, not per step).
    pub program: Option<PathBuf>,
    /// (relative path, blob) of each code file, copied into the working directory.
    pub code: Vec<(String, BlobDigest)>,
    pub inputs: BTreeMap<String, InputDigests>,
    pub params: BTreeMap<String, Value>,
    pub held: Held,
    /// A built-in op (`needle-worker`): its caching allocator is capped to its GPU share.
    pub builtin: bool,
    pub timeout: Option<Duration>,
    /// Where the log goes under the store root, if the attempt writes any.
    pub log_rel: String,
    pub recipe_dir: PathBuf,
    /// A clean staging slot (`out/` and `work/` empty): see [`new_slot`], [`clean_slot`].
    pub slot: PathBuf,
}

/// What an attempt holds, as its step sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held {
    /// Its devices, as `CUDA_VISIBLE_DEVICES` names them.
    pub gpus: Vec<String>,
    /// The share of its GPUs' compute it holds: 1 for whole GPUs, in (0, 1) for a share of
    /// one; `None` for no GPU, or part of one asked for by memory alone.
    pub gpu_share: Option<f64>,
    /// The GPU memory it may use, in GB, where known: what it asked for, else its share of
    /// its GPU's memory, else (whole GPUs) the memory of one.
    pub gpu_mem_gb: Option<f64>,
    /// The part of its GPU's memory it may use, for part of a GPU whose memory is known, or
    /// when it asked for none: its share.
    pub gpu_mem_fraction: Option<f64>,
    pub cpus: u32,
    /// The run's MPS server, for a GPU step of a run with `--mps`.
    pub mps: Option<crate::mps::MpsDirs>,
}

/// How an attempt ended, sent to the engine as [`Event::Ended`].
#[derive(Debug)]
pub struct AttemptEnd {
    pub node: usize,
    pub result: AttemptResult,
    pub started: u64,
    pub ended: u64,
    /// The staging slot; on success its `out/` is the output to absorb. Reused once clean.
    pub staging: Option<PathBuf>,
    /// The attempt's log, relative to the store root; `None` when it wrote nothing.
    pub log: Option<String>,
    /// The GPUs it really had, where the executor learns them only from the attempt (a
    /// Slurm job); `None`: those of its grant.
    pub gpus: Option<Vec<String>>,
    /// The batch job it ran as.
    pub job: Option<needle_core::store::JobPlacement>,
}
