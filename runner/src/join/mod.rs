//! Several runs on one store: a `needle run` (or `rerun`) that finds the store held by a live
//! runner hands that runner its run and follows it, instead of failing or waiting.
//!
//! sled is single-process, so only the runner writes the store; a second run must therefore be
//! executed by the runner itself. The runner listens on `<root>/join.sock` ([`server`]); the
//! second `needle run` ([`client`]) plans its recipe first (every recipe error is reported by
//! the client, as for any run), then sends the recipe's text, its `--set` values and its
//! options. The runner plans it again (the same text, the same code files: the same keys),
//! records it as a run of its own and schedules its steps beside its other runs' on one pool
//! (see `engine`). The client prints the run's progress as the runner reports it, and exits
//! with its run's exit code.
//!
//! ```text
//! client                                        runner (a thread per client)
//!   connect <root>/join.sock       ──────────▶  accept
//!   {"join":{recipe, sets, pool, run options}}  ─▶  checked against the runner's pool, planned,
//!                                                   handed to the engine (Event::Join)
//!                                  ◀──────────  {"accepted":{"run":8,"total":19}}
//!                                               or {"refused":{"message":…,"retry":false}}
//!                                  ◀──────────  {"progress":{…}}  …  as the run goes
//!   {"cancel":null}  (Ctrl-C)      ──────────▶  Event::Cancel: the run is interrupted
//!   (EOF: the client died)         ──────────▶  the same
//!                                  ◀──────────  {"ended":{outcome, record}}
//! ```
//! One JSON value per line each way, as on `runner.sock`. A runner whose last run is ending
//! refuses with `retry: true`: the client then waits for the store's lock and runs itself.
//! What cannot be shared is refused with a message: a run for another executor, other GPUs,
//! CPU slots or MPS than the runner's pool.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

use needle_core::store::{AttemptResult, RunRecord, RunStep};
use needle_core::value::Value;

use crate::attempt::RunOutcome;
use crate::progress::{Progress, RunningStep};

/// The runner's socket for runs that join it, in the store.
pub const SOCKET: &str = "join.sock";

/// Bumped whenever a message changes shape.
pub const PROTOCOL: u32 = 1;

/// The longest line the runner reads: a recipe at its largest, escaped, and the rest.
const MAX_REQUEST: usize = 2 * needle_core::recipe::MAX_RECIPE_BYTES + 64 * 1024;

/// What the pool of a run is made of: runs that share a runner must agree on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// `local` or `slurm`.
    pub executor: String,
    /// The GPU ids its steps are given, and the memory of each (MB, where known).
    pub gpus: Vec<String>,
    pub gpu_mem_mb: Vec<Option<u64>>,
    pub cpus: u32,
    pub mps: bool,
}

impl PoolSpec {
    /// Why a run with pool `theirs` cannot join a runner with this pool, if it cannot.
    pub fn refuses(&self, theirs: &PoolSpec) -> Option<String> {
        if self.executor != "local" || theirs.executor != "local" {
            return Some(format!(
                "this run's executor is {}, the runner's {}: only local runs share a runner",
                theirs.executor, self.executor
            ));
        }
        if self.gpus != theirs.gpus {
            return Some(format!(
                "this run asks for GPUs {}, and the runner schedules onto GPUs {}: runs that \
                 share a runner share its GPUs (hint: --gpus {})",
                list(&theirs.gpus),
                list(&self.gpus),
                if self.gpus.is_empty() {
                    "none".to_string()
                } else {
                    self.gpus.join(",")
                }
            ));
        }
        if self.gpu_mem_mb != theirs.gpu_mem_mb {
            let gb = |mem: &[Option<u64>]| match mem.first().copied().flatten() {
                Some(mb) => format!("{} GB", mb as f64 / 1024.0),
                None => "unknown".to_string(),
            };
            return Some(format!(
                "this run gives its GPUs {} of memory, and the runner {} (hint: the runner's \
                 --gpu-mem)",
                gb(&theirs.gpu_mem_mb),
                gb(&self.gpu_mem_mb)
            ));
        }
        if self.cpus != theirs.cpus {
            return Some(format!(
                "this run asks for {} CPU slot(s), and the runner has {} (hint: --jobs {})",
                theirs.cpus, self.cpus, self.cpus
            ));
        }
        if self.mps != theirs.mps {
            return Some(format!(
                "this run {} MPS, and the runner {} (hint: {} --mps)",
                if theirs.mps {
                    "asks for"
                } else {
                    "does not use"
                },
                if self.mps { "uses it" } else { "does not" },
                if self.mps { "add" } else { "leave out" }
            ));
        }
        None
    }
}

fn list(gpus: &[String]) -> String {
    if gpus.is_empty() {
        "none".into()
    } else {
        format!("`{}`", gpus.join(","))
    }
}

/// A run's request to join.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    pub protocol: u32,
    pub recipe_path: std::path::PathBuf,
    pub recipe_dir: std::path::PathBuf,
    pub recipe_text: String,
    pub sets: Vec<(String, Value)>,
    pub rerun_of: Option<u64>,
    pub pool: PoolSpec,
    pub force: Vec<String>,
    pub priority: i32,
    pub max_gpus: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToRunner {
    Join(Box<JoinRequest>),
    /// Ctrl-C in the client: interrupt its run (a second one: kill its steps).
    Cancel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToClient {
    Accepted {
        run: u64,
    },
    /// Not joined: why; `retry`: the runner is going away, the store will be free.
    Refused {
        message: String,
        retry: bool,
    },
    Progress(Box<ProgressCall>),
    /// The run's end, with its final record (stored by then).
    Ended {
        outcome: RunOutcome,
        record: Box<RunRecord>,
    },
}

/// A call of [`Progress`], as the runner made it for the client's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressCall {
    Started {
        step: RunStep,
        attempt: u32,
    },
    Finished {
        step: RunStep,
        note: Option<String>,
    },
    Reopened {
        step: RunStep,
    },
    Retrying {
        step: RunStep,
        result: AttemptResult,
        delay_ms: u64,
        log: Vec<String>,
    },
    Failed {
        step: RunStep,
        reason: String,
        log: Vec<String>,
    },
    Interrupted {
        count: u32,
        running: usize,
    },
    Note {
        text: String,
    },
    Update {
        counts: RunOutcome,
        running: Vec<RunningStep>,
    },
    Done {
        outcome: RunOutcome,
    },
}

impl ProgressCall {
    /// Make this call on `p`, as the runner made it.
    pub fn replay(self, p: &mut dyn Progress) {
        match self {
            ProgressCall::Started { step, attempt } => p.started(&step, attempt),
            ProgressCall::Finished { step, note } => p.finished(&step, note.as_deref()),
            ProgressCall::Reopened { step } => p.reopened(&step),
            ProgressCall::Retrying {
                step,
                result,
                delay_ms,
                log,
            } => p.retrying(
                &step,
                &result,
                std::time::Duration::from_millis(delay_ms),
                &log,
            ),
            ProgressCall::Failed { step, reason, log } => p.failed(&step, &reason, &log),
            ProgressCall::Interrupted { count, running } => p.interrupted(count, running),
            ProgressCall::Note { text } => p.note(&text),
            ProgressCall::Update { counts, running } => p.update(&counts, &running),
            ProgressCall::Done { outcome } => p.done(&outcome),
        }
    }
}

/// The runner's side of a client's display: each call goes to the client's connection.
pub struct Relay(pub std::sync::mpsc::Sender<ToClient>);

impl Relay {
    fn send(&self, call: ProgressCall) {
        // A client gone is told nothing more; its reader cancels the run.
        let _ = self.0.send(ToClient::Progress(Box::new(call)));
    }
}

impl Progress for Relay {
    fn started(&mut self, step: &RunStep, attempt: u32) {
        self.send(ProgressCall::Started {
            step: step.clone(),
            attempt,
        });
    }

    fn finished(&mut self, step: &RunStep, note: Option<&str>) {
        self.send(ProgressCall::Finished {
            step: step.clone(),
            note: note.map(str::to_string),
        });
    }

    fn reopened(&mut self, step: &RunStep) {
        self.send(ProgressCall::Reopened { step: step.clone() });
    }

    fn retrying(
        &mut self,
        step: &RunStep,
        result: &AttemptResult,
        delay: std::time::Duration,
        log: &[String],
    ) {
        self.send(ProgressCall::Retrying {
            step: step.clone(),
            result: result.clone(),
            delay_ms: delay.as_millis() as u64,
            log: log.to_vec(),
        });
    }

    fn failed(&mut self, step: &RunStep, reason: &str, log: &[String]) {
        self.send(ProgressCall::Failed {
            step: step.clone(),
            reason: reason.into(),
            log: log.to_vec(),
        });
    }

    fn interrupted(&mut self, count: u32, running: usize) {
        self.send(ProgressCall::Interrupted { count, running });
    }

    fn note(&mut self, text: &str) {
        self.send(ProgressCall::Note { text: text.into() });
    }

    fn update(&mut self, counts: &RunOutcome, running: &[RunningStep]) {
        self.send(ProgressCall::Update {
            counts: counts.clone(),
            running: running.to_vec(),
        });
    }

    fn done(&mut self, outcome: &RunOutcome) {
        self.send(ProgressCall::Done {
            outcome: outcome.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(executor: &str, gpus: &[&str], cpus: u32, mps: bool) -> PoolSpec {
        PoolSpec {
            executor: executor.into(),
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            gpu_mem_mb: vec![None; gpus.len()],
            cpus,
            mps,
        }
    }

    #[test]
    fn only_the_same_local_pool_is_shared() {
        let runner = pool("local", &["0", "1"], 8, false);
        assert_eq!(runner.refuses(&runner.clone()), None);
        let why = |theirs: PoolSpec| runner.refuses(&theirs).unwrap();
        assert!(why(pool("slurm", &[], 8, false)).contains("executor is slurm"));
        assert!(why(pool("local", &["0"], 8, false)).contains("hint: --gpus 0,1"));
        assert!(why(pool("local", &["0", "1"], 2, false)).contains("hint: --jobs 8"));
        let mut more_memory = runner.clone();
        more_memory.gpu_mem_mb = vec![Some(40 * 1024); 2];
        assert!(why(more_memory).contains("40 GB of memory, and the runner unknown"));
        assert!(why(pool("local", &["0", "1"], 8, true)).contains("leave out --mps"));
    }
}
