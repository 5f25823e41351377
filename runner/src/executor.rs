//! Where attempts run, and everything the engine asks of that place: the pool it hands out,
//! the shape of a step in it, what a granted step holds, starting an attempt, stopping
//! attempts, and the work a place needs before and during a run (Slurm: cancelling jobs an
//! earlier runner left, polling the jobs in flight). The engine decides what runs when; this
//! says how, so the engine never asks which executor it has.

use std::sync::Arc;

use needle_core::recipe::{GpuRequest, Resources};
use needle_core::store::Store;
use tokio::sync::mpsc::UnboundedSender;

use crate::attempt::{AttemptSpec, Event, Handle, Held};
use crate::gpus::Gpu;
use crate::mps::Mps;
use crate::scheduler::{GpuGrant, GpuNeed, Grant, Pool, Shape};
use crate::slurm::{Slurm, SlurmConfig, SlurmError};
use crate::{local, process};

#[derive(Clone, Default)]
pub enum Executor {
    /// Child processes of the runner, on the GPUs and CPU slots of this machine.
    #[default]
    Local,
    /// Slurm batch jobs: the cluster places them; the runner limits how many are in flight.
    Slurm(Arc<Slurm>),
    /// Scripted attempts on this machine's pool, without processes: the engine's unit tests.
    #[cfg(test)]
    Fake(Arc<crate::engine::fake::Fake>),
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Executor::Local => f.write_str("Local"),
            Executor::Slurm(_) => f.write_str("Slurm"),
            #[cfg(test)]
            Executor::Fake(_) => f.write_str("Fake"),
        }
    }
}

/// What a local step may be given: the run's GPUs, CPU slots, memory, and its MPS daemon.
pub struct Machine<'a> {
    pub gpus: &'a [Gpu],
    pub cpus: u32,
    pub mem_mb: u64,
    pub mps: Option<&'a Arc<Mps>>,
}

impl Executor {
    /// Local without a Slurm configuration; else Slurm, its state kept under the store.
    pub fn new(slurm: Option<&SlurmConfig>, store: &Store) -> Executor {
        match slurm {
            None => Executor::Local,
            Some(config) => Executor::Slurm(Arc::new(Slurm::new(config.clone(), store.root()))),
        }
    }

    /// What steps are granted from: the machine's GPUs, CPU slots and memory; under Slurm one
    /// token per job in flight (Slurm places jobs, needle only throttles them).
    pub fn pool(&self, machine: &Machine<'_>) -> Pool {
        match self {
            Executor::Slurm(slurm) => Pool::new(&[], slurm.max_jobs(), u64::MAX),
            _ => {
                let memory: Vec<Option<u64>> = machine.gpus.iter().map(|g| g.mem_mb).collect();
                Pool::new(&memory, machine.cpus, machine.mem_mb)
            }
        }
    }

    /// Make sure it can run anything, before the run is recorded: for Slurm, that the
    /// controller answers. Returns the jobs an earlier runner of this store left, now
    /// cancelled.
    pub async fn start(&self) -> Result<Vec<String>, SlurmError> {
        match self {
            Executor::Slurm(slurm) => slurm.start().await,
            _ => Ok(Vec::new()),
        }
    }

    /// The task that follows the run's jobs, where there is one; it stops when dropped.
    pub fn follow(&self) -> Option<AbortOnDrop> {
        match self {
            Executor::Slurm(slurm) => Some(AbortOnDrop(tokio::spawn(slurm.clone().poll_forever()))),
            _ => None,
        }
    }

    /// What a step of `resources` takes from the pool.
    pub fn shape(&self, resources: &Resources, machine: &Machine<'_>) -> Shape {
        match self {
            Executor::Slurm(_) => Shape {
                gpus: GpuNeed::None,
                cpus: 1,
                mem_mb: 0,
            },
            _ => Shape::of(resources, machine.cpus, !machine.gpus.is_empty()),
        }
    }

    /// What a step granted `grant` holds, as it will see it. Under Slurm the grant is a job
    /// token: the step holds what it asked for, and Slurm names the GPUs.
    pub fn held(&self, grant: &Grant, asked: &Resources, machine: &Machine<'_>) -> Held {
        match self {
            Executor::Slurm(_) => Held {
                cpus: asked.cpus.max(1),
                ..Held::default()
            },
            _ => local_held(grant, asked, machine),
        }
    }

    /// CPU slots a step held, as its record says.
    pub fn cpus_held(&self, grant: &Grant, asked: &Resources) -> u32 {
        match self {
            Executor::Slurm(_) => asked.cpus.max(1),
            _ => grant.cpus,
        }
    }

    /// Start an attempt; its events come on `events`.
    pub fn launch(
        &self,
        store: Arc<Store>,
        spec: AttemptSpec,
        resources: Resources,
        events: UnboundedSender<Event>,
    ) {
        match self {
            Executor::Local => {
                tokio::spawn(local::run_attempt(store, spec, events));
            }
            Executor::Slurm(slurm) => {
                tokio::spawn(crate::slurm::run_attempt(
                    slurm.clone(),
                    store,
                    spec,
                    resources,
                    events,
                ));
            }
            #[cfg(test)]
            Executor::Fake(fake) => fake.launch(spec, events),
        }
    }

    /// Stop started attempts: SIGTERM (or SIGKILL) to local process groups, scancel to jobs.
    pub fn stop(&self, handles: &[Handle], kill: bool) {
        let mut jobs = Vec::new();
        for h in handles {
            match h {
                Handle::Process(pid) => {
                    process::kill_group(*pid, if kill { libc::SIGKILL } else { libc::SIGTERM })
                }
                Handle::Job(id) => jobs.push(id.clone()),
            }
        }
        if jobs.is_empty() {
            return;
        }
        match self {
            Executor::Slurm(slurm) => {
                let slurm = slurm.clone();
                tokio::spawn(async move { slurm.cancel(&jobs, kill).await });
            }
            #[cfg(test)]
            Executor::Fake(fake) => fake.stop(&jobs, kill),
            Executor::Local => {}
        }
    }
}

/// What a local step holds of `grant`: its GPUs by id, its share and memory of them, its CPU
/// slots.
fn local_held(grant: &Grant, asked: &Resources, machine: &Machine<'_>) -> Held {
    let gpus: Vec<&Gpu> = grant.gpu.gpus().iter().map(|&g| &machine.gpus[g]).collect();
    let capacity_gb = gpus
        .first()
        .and_then(|g| g.mem_mb)
        .map(|mb| mb as f64 / 1024.0);
    let (gpu_share, gpu_mem_gb, gpu_mem_fraction) = match grant.gpu {
        GpuGrant::None => (None, None, None),
        GpuGrant::Whole(_) => (Some(1.0), asked.gpus.mem_gb().or(capacity_gb), None),
        GpuGrant::Part { units, .. } => {
            let share = (units > 0).then(|| asked_share(asked));
            let asked_gb = asked.gpus.mem_gb();
            let gb = asked_gb.or_else(|| Some(share? * capacity_gb?));
            let fraction = match (asked_gb, capacity_gb) {
                (Some(gb), Some(cap)) => Some((gb / cap).min(1.0)),
                _ => share,
            };
            (share, gb, fraction)
        }
    };
    Held {
        mps: (machine.mps)
            .filter(|_| !gpus.is_empty())
            .map(|m| m.dirs().clone()),
        gpus: gpus.iter().map(|g| g.id.clone()).collect(),
        gpu_share,
        gpu_mem_gb,
        gpu_mem_fraction,
        cpus: grant.cpus,
    }
}

/// The share a step asked for, as it wrote it (the pool counts it in share units).
fn asked_share(asked: &Resources) -> f64 {
    match asked.gpus {
        GpuRequest::Part {
            share: Some(share), ..
        } => share,
        _ => 1.0,
    }
}

/// Aborts its task when dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
