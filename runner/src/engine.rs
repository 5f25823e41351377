//! The run loop: resolves keys, skips what the store holds, starts ready steps as resources
//! free up, commits outputs, and records the run.
//!
//! A node's life:
//! ```text
//! Waiting ──inputs done──▶ (key known) ──in store──▶ Cached
//!                              │
//!                              ├──same key running──▶ Follower ──leader commits──▶ Cached
//!                              ▼
//!                            Ready ──resources──▶ Running ──exit 0──▶ Committing ──▶ Succeeded
//!                                                    │  ▲
//!                                                    │  └──retry after backoff (AttemptFailedWillRetry)
//!                                                    └──no attempts left──▶ Failed ──▶ dependents Skipped
//! Ctrl-C: running steps are stopped (SIGTERM, then SIGKILL) and recorded Interrupted;
//! steps that never started stay Pending.
//! ```
//! The outside world (child exits, commits, timers, signals) enters one `select!` loop as
//! [`Event`]s; nothing else mutates the engine's state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use needle_core::digest::{ArtifactDigest, StepKey};
use needle_core::ops::OpKind;
use needle_core::plan::{NodeInput, Plan};
use needle_core::store::remote::{LiveRun, LiveSnapshot};
use needle_core::store::{
    Attempt, AttemptResult, Execution, Health, InputCheck, RunRecord, RunState, RunStep,
    StepProgress, StepSpec, StepStatus, Store, StoreError, now_millis,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::attempt::{AttemptEnd, AttemptSpec, Event, Handle, Held, InputArtifacts, RunOutcome};
use crate::commit::{CommitJob, MAX_BATCH, MAX_BATCH_WAIT, commit_loop};
use crate::gpus::Gpu;
use crate::progress::{Progress, RunningStep};
use crate::scheduler::{GpuGrant, Grant, Pool, ReadyQueue, Shape};
use crate::slurm::{Slurm, SlurmConfig};
use crate::{executor, process, staging};

/// Where attempts run.
#[derive(Clone, Default)]
pub enum Executor {
    /// Child processes of the runner, on the GPUs and CPU slots of this machine.
    #[default]
    Local,
    /// Slurm batch jobs: the cluster places them; the runner limits how many are in flight.
    Slurm(Arc<Slurm>),
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Executor::Local => f.write_str("Local"),
            Executor::Slurm(_) => f.write_str("Slurm"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Run through Slurm, configured so; `None`: locally.
    pub slurm: Option<SlurmConfig>,
    /// The GPUs local steps may be given; empty: steps asking for GPUs run on the CPU.
    pub gpus: Vec<Gpu>,
    pub cpus: u32,
    pub mem_mb: u64,
    /// Step names whose instances execute even when cached.
    pub force: BTreeSet<String>,
    /// The run's MPS daemon (`--mps`), whose clients its GPU steps are; it quits when the
    /// last holder drops it.
    pub mps: Option<Arc<crate::mps::Mps>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Ready,
    Running,
    Committing,
    Follower,
    /// Terminal: see the run record's status.
    Finished,
}

struct Running {
    handle: Option<Handle>,
    grant: Grant,
    started: Instant,
    /// Its staging slot, where its progress lines are.
    slot: PathBuf,
}

pub struct Engine {
    store: Arc<Store>,
    executor: Executor,
    plan: Plan,
    opts: EngineOptions,
    record: RunRecord,
    phase: Vec<Phase>,
    outputs: Vec<Option<ArtifactDigest>>,
    specs: Vec<Option<StepSpec>>,
    missing: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    priority: Vec<u64>,
    ready: ReadyQueue,
    pool: Pool,
    running: HashMap<usize, Running>,
    /// Key → the node executing it; later nodes with the same key wait for it.
    inflight: HashMap<StepKey, usize>,
    followers: HashMap<usize, Vec<usize>>,
    forced_done: HashSet<usize>,
    /// Inputs found whole in this run (each artifact and blob is hashed once per run).
    input_check: InputCheck,
    /// Inputs found damaged in this run: found again, the step reading them fails.
    damaged: HashSet<ArtifactDigest>,
    committing: usize,
    retries_pending: usize,
    interrupts: u32,
    events_tx: UnboundedSender<Event>,
    events_rx: UnboundedReceiver<Event>,
    commit_tx: Option<std::sync::mpsc::Sender<Vec<CommitJob>>>,
    /// Finished steps waiting to be committed together, and since when the oldest waits.
    to_commit: Vec<CommitJob>,
    to_commit_since: Instant,
    committer: Option<std::thread::JoinHandle<()>>,
    progress: Box<dyn Progress>,
    t0: Instant,
    /// Clean staging slots, reused by later attempts.
    free_slots: Vec<PathBuf>,
    /// `cmd[0]` → where it is on PATH, looked up once per name.
    programs: HashMap<String, Option<PathBuf>>,
    /// `needle-worker`, beside this binary: built-in ops run as `needle-worker OP`.
    worker: PathBuf,
    /// Where readers of the store see this run as far as it has got (`needle status`).
    live: Option<Arc<LiveRun>>,
    /// Steps whose state changed since the run's progress was last recorded (a committed
    /// step's is recorded with its commit): see `Store::put_run_progress`.
    progress_dirty: Vec<usize>,
    progress_urgent: bool,
    progress_recorded: Instant,
    /// Told the key of each step this run commits (the shared cache uploads it).
    on_committed: Option<Box<dyn Fn(StepKey) + Send>>,
}

impl Engine {
    pub fn new(
        store: Arc<Store>,
        plan: Plan,
        record: RunRecord,
        opts: EngineOptions,
        progress: Box<dyn Progress>,
    ) -> Engine {
        let n = plan.nodes.len();
        let dependents = plan.dependents();
        let priority = plan.remaining_path();
        let missing = plan
            .nodes
            .iter()
            .map(|node| {
                node.inputs
                    .values()
                    .flat_map(NodeInput::nodes)
                    .collect::<HashSet<_>>()
                    .len()
            })
            .collect();
        let (events_tx, events_rx) = unbounded_channel();
        let (commit_tx, commit_rx) = std::sync::mpsc::channel();
        let committer = {
            let store = store.clone();
            let events = events_tx.clone();
            std::thread::Builder::new()
                .name("needle-commit".into())
                .spawn(move || commit_loop(store, commit_rx, events))
                .expect("spawning the commit thread")
        };
        let executor = match &opts.slurm {
            None => Executor::Local,
            Some(config) => Executor::Slurm(Arc::new(Slurm::new(config.clone(), store.root()))),
        };
        let pool = match &executor {
            Executor::Local => {
                let memory: Vec<Option<u64>> = opts.gpus.iter().map(|g| g.mem_mb).collect();
                Pool::new(&memory, opts.cpus, opts.mem_mb)
            }
            // One token per job in flight: Slurm places jobs, needle only throttles them.
            Executor::Slurm(slurm) => Pool::new(&[], slurm.max_jobs(), u64::MAX),
        };
        Engine {
            store,
            executor,
            plan,
            opts,
            record,
            phase: vec![Phase::Waiting; n],
            outputs: vec![None; n],
            specs: vec![None; n],
            missing,
            dependents,
            priority,
            ready: ReadyQueue::default(),
            pool,
            running: HashMap::new(),
            inflight: HashMap::new(),
            followers: HashMap::new(),
            forced_done: HashSet::new(),
            input_check: InputCheck::default(),
            damaged: HashSet::new(),
            committing: 0,
            retries_pending: 0,
            interrupts: 0,
            events_tx,
            events_rx,
            commit_tx: Some(commit_tx),
            to_commit: Vec::new(),
            to_commit_since: Instant::now(),
            committer: Some(committer),
            progress,
            t0: Instant::now(),
            free_slots: Vec::new(),
            programs: HashMap::new(),
            worker: worker_path(),
            live: None,
            progress_dirty: Vec::new(),
            progress_urgent: false,
            progress_recorded: Instant::now(),
            on_committed: None,
        }
    }

    /// Call `f` with the key of each step this run commits, once it is committed.
    pub fn on_committed(mut self, f: impl Fn(StepKey) + Send + 'static) -> Engine {
        self.on_committed = Some(Box::new(f));
        self
    }

    /// Make sure the executor can run anything, before the run is recorded: for Slurm, that
    /// the controller answers; the jobs a killed runner left for this store are cancelled.
    pub async fn start_executor(&mut self) -> Result<(), String> {
        match &self.executor {
            Executor::Local => Ok(()),
            Executor::Slurm(slurm) => {
                let stale = slurm.start().await?;
                if !stale.is_empty() {
                    self.progress.note(&format!(
                        "cancelled {} Slurm job(s) an earlier runner of this store left: {}",
                        stale.len(),
                        stale.join(" ")
                    ));
                }
                Ok(())
            }
        }
    }

    /// Offer copies of the run's progress to `live` as the run goes (when a reader asks).
    pub fn with_live(mut self, live: Arc<LiveRun>) -> Engine {
        self.live = Some(live);
        self
    }

    /// Run to the end (or to Ctrl-C). The run record is written before the first step starts
    /// and again at the end.
    pub async fn execute(mut self) -> Result<(RunOutcome, RunRecord), StoreError> {
        self.store.put_run(&self.record)?;
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .expect("installing the SIGINT handler");
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
        // Follows the run's Slurm jobs; dropped (and so stopped) with the run.
        let _poller = match &self.executor {
            Executor::Local => None,
            Executor::Slurm(slurm) => Some(AbortOnDrop(tokio::spawn(slurm.clone().poll_forever()))),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

        let roots: Vec<usize> = (0..self.plan.nodes.len())
            .filter(|&i| self.missing[i] == 0)
            .collect();
        for i in roots {
            self.resolve(i)?;
        }
        self.update_progress();

        loop {
            self.start_ready();
            if self.running.is_empty() && self.committing == 0 && self.retries_pending == 0 {
                break;
            }
            // Nothing left to start: what comes next waits on commits, so commit now rather
            // than when the batch fills.
            if !self.to_commit.is_empty() && (self.ready.is_empty() || self.interrupts > 0) {
                self.flush_commits();
            }
            let commit_due = self.to_commit_since + MAX_BATCH_WAIT;
            let waiting = !self.to_commit.is_empty();
            tokio::select! {
                Some(ev) = self.events_rx.recv() => self.handle(ev)?,
                _ = interrupt.recv() => self.interrupt(),
                _ = terminate.recv() => self.interrupt(),
                _ = tick.tick() => self.update_progress(),
                _ = tokio::time::sleep_until(commit_due.into()), if waiting => self.flush_commits(),
            }
        }
        self.finish()
    }

    fn handle(&mut self, ev: Event) -> Result<(), StoreError> {
        match ev {
            Event::Started { node, handle } => {
                if self.running.contains_key(&node) && self.interrupts > 0 {
                    self.stop(std::slice::from_ref(&handle), false);
                }
                if let Some(r) = self.running.get_mut(&node) {
                    r.handle = Some(handle);
                }
            }
            Event::Ended(end) => self.on_attempt_end(end)?,
            Event::Committed(results, slots) => {
                self.free_slots.extend(slots);
                for (node, result) in results {
                    self.committing -= 1;
                    match result {
                        Ok(output) => {
                            if let (Some(f), Some(key)) =
                                (&self.on_committed, self.record.steps[node].key)
                            {
                                f(key);
                            }
                            self.record.steps[node].status = StepStatus::Succeeded { output };
                            self.progress.finished(&self.record.steps[node], None);
                            self.settle_followers(node, Ok(output));
                            self.on_done(node, output)?;
                        }
                        Err(error) => {
                            if let Some(last) = self.record.steps[node].attempts.last_mut() {
                                last.result = AttemptResult::OutputError {
                                    error: error.clone(),
                                };
                            }
                            let reason = format!("output not committed: {error}");
                            self.progress.failed(&self.record.steps[node], &reason, &[]);
                            self.fail(node, reason);
                        }
                    }
                }
            }
            Event::RetryDue { node } => {
                self.retries_pending -= 1;
                if self.interrupts > 0 {
                    self.finish_node(node, StepStatus::Interrupted);
                } else {
                    self.push_ready(node);
                }
            }
        }
        // The live display refreshes on the tick: recounting per event would cost O(steps²).
        if self.progress_urgent {
            self.record_progress();
        }
        Ok(())
    }

    /// Inputs done: compute the key, then cached, follower or ready.
    fn resolve(&mut self, first: usize) -> Result<(), StoreError> {
        let mut work = vec![first];
        while let Some(i) = work.pop() {
            // Sent back to wait for an input executing again (see `inputs_whole`), or
            // released twice meanwhile.
            if self.missing[i] > 0 || self.phase[i] != Phase::Waiting {
                continue;
            }
            let spec = self.plan.nodes[i]
                .spec(|u| self.outputs[u])
                .expect("resolve runs once every input has an output");
            let key = spec.key();
            self.record.steps[i].key = Some(key);
            self.specs[i] = Some(spec);
            let forced = self.opts.force.contains(&self.plan.nodes[i].name);

            if let Some(&leader) = self.inflight.get(&key) {
                self.phase[i] = Phase::Follower;
                self.followers.entry(leader).or_default().push(i);
                continue;
            }
            let may_reuse = !forced || self.forced_done.contains(&i);
            if may_reuse && let Some(rec) = self.store.step(&key)? {
                self.record.steps[i].status = StepStatus::Cached { output: rec.output };
                self.progress_dirty.push(i);
                self.phase[i] = Phase::Finished;
                self.outputs[i] = Some(rec.output);
                self.progress.finished(&self.record.steps[i], None);
                work.extend(self.release_dependents(i));
                continue;
            }
            if !self.inputs_whole(i, &mut work)? {
                continue;
            }
            self.inflight.insert(key, i);
            self.push_ready(i);
        }
        Ok(())
    }

    /// Before step `i` executes: hash the blobs of its inputs against their digests (each
    /// artifact once per run). A damaged input is dropped from the store with what it makes
    /// untrue (`Store::drop_damaged`: the manifests using a damaged blob, the step records
    /// that produced them), and the steps of this run that output a dropped artifact execute
    /// again; `i` waits for them as for any input, then is resolved anew. False then, or when
    /// `i` failed: an input found damaged a second time in this run (after its producer ran
    /// again), or one that no step of this run produced.
    fn inputs_whole(&mut self, i: usize, work: &mut Vec<usize>) -> Result<bool, StoreError> {
        let inputs: Vec<(String, ArtifactDigest)> = self.specs[i]
            .as_ref()
            .expect("resolve sets the spec")
            .inputs
            .iter()
            .flat_map(|(name, d)| d.artifacts().into_iter().map(|a| (name.clone(), a)))
            .collect();
        for (name, artifact) in inputs {
            let Health::Damaged(damage) = self
                .store
                .check_artifact(&artifact, &mut self.input_check)?
            else {
                continue;
            };
            let what = damage
                .blobs
                .iter()
                .next()
                .map(|(b, problem)| format!("blob {} {problem}", b.short()))
                .or_else(|| damage.artifacts.values().next().cloned())
                .unwrap_or_default();
            let dropped = self.store.drop_damaged(&damage)?;
            let producers: Vec<usize> = (0..self.plan.nodes.len())
                .filter(|&u| {
                    self.phase[u] == Phase::Finished
                        && self.outputs[u].is_some_and(|o| dropped.artifact_digests.contains(&o))
                })
                .collect();
            let step = self.plan.nodes[i].display_name();
            let dropped_text = format!(
                "dropped {} artifact(s) and {} step record(s) using it",
                dropped.artifacts.len(),
                dropped.steps.len()
            );
            if !self.damaged.insert(artifact) || producers.is_empty() {
                let reason = format!(
                    "input `{name}` ({}) is damaged: {what}; {dropped_text}{}",
                    artifact.short(),
                    if producers.is_empty() {
                        " (the next `needle run` or `rerun` executes its producer again)"
                    } else {
                        ", again after its producer executed anew"
                    }
                );
                self.progress.failed(&self.record.steps[i], &reason, &[]);
                self.fail(i, reason);
                return Ok(false);
            }
            let names: Vec<String> = producers
                .iter()
                .map(|&u| format!("`{}`", self.plan.nodes[u].display_name()))
                .collect();
            self.progress.note(&format!(
                "        input `{name}` of `{step}` is damaged: {what}; {dropped_text}; \
                 executing {} again",
                names.join(", ")
            ));
            for u in producers {
                self.reexecute(u, work);
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// `u` finished with an output that was dropped as damaged: it executes again. Its
    /// dependents that are still waiting wait for it again. The others keep their state: a
    /// cached one's record stands, and one that started had its inputs checked whole first,
    /// so it did not read the dropped bytes.
    fn reexecute(&mut self, u: usize, work: &mut Vec<usize>) {
        self.outputs[u] = None;
        self.phase[u] = Phase::Waiting;
        self.record.steps[u].status = StepStatus::Pending;
        self.progress_dirty.push(u);
        self.progress_urgent = true;
        self.progress.reopened(&self.record.steps[u]);
        for &d in &self.dependents[u] {
            if self.phase[d] == Phase::Waiting {
                self.missing[d] += 1;
            }
        }
        work.push(u);
    }

    /// Hand the waiting finished steps to the commit thread as one batch.
    fn flush_commits(&mut self) {
        if self.to_commit.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_commit);
        self.commit_tx
            .as_ref()
            .expect("the committer lives until the end")
            .send(batch)
            .expect("the commit thread is alive");
    }

    fn push_ready(&mut self, i: usize) {
        self.phase[i] = Phase::Ready;
        let shape = match self.executor {
            Executor::Local => Shape::of(
                &self.plan.nodes[i].resources,
                self.opts.cpus,
                !self.opts.gpus.is_empty(),
            ),
            Executor::Slurm(_) => Shape {
                gpus: crate::scheduler::GpuNeed::None,
                cpus: 1,
                mem_mb: 0,
            },
        };
        self.ready.push(i, self.priority[i], shape);
    }

    /// Dependents whose last missing input was `i`.
    fn release_dependents(&mut self, i: usize) -> Vec<usize> {
        let mut now_ready = Vec::new();
        for &d in &self.dependents[i] {
            self.missing[d] -= 1;
            if self.missing[d] == 0 && self.phase[d] == Phase::Waiting {
                now_ready.push(d);
            }
        }
        now_ready
    }

    fn on_done(&mut self, i: usize, output: ArtifactDigest) -> Result<(), StoreError> {
        self.phase[i] = Phase::Finished;
        self.outputs[i] = Some(output);
        for d in self.release_dependents(i) {
            self.resolve(d)?;
        }
        Ok(())
    }

    fn settle_followers(&mut self, leader: usize, result: Result<ArtifactDigest, &str>) {
        let key = self.record.steps[leader]
            .key
            .expect("a running node has a key");
        self.inflight.remove(&key);
        let Some(followers) = self.followers.remove(&leader) else {
            return;
        };
        let leader_name = self.plan.nodes[leader].display_name();
        for f in followers {
            match result {
                Ok(output) => {
                    self.record.steps[f].status = StepStatus::Cached { output };
                    self.progress_dirty.push(f);
                    self.progress.finished(&self.record.steps[f], None);
                    // Errors surface when the follower's own dependents resolve.
                    let _ = self.on_done(f, output);
                }
                Err(reason) => {
                    self.fail(f, format!("same step as `{leader_name}`, which {reason}"))
                }
            }
        }
    }

    fn start_ready(&mut self) {
        if self.interrupts > 0 {
            return;
        }
        while let Some((i, shape)) = self.ready.pop_fitting(&self.pool) {
            let grant = self.pool.take(shape).expect("pop_fitting checked the fit");
            self.launch(i, grant);
        }
    }

    fn launch(&mut self, i: usize, grant: Grant) {
        let node = &self.plan.nodes[i];
        let key = self.record.steps[i].key.expect("a ready node has a key");
        let spec = self.specs[i].as_ref().expect("a ready node has a spec");
        let attempt = self.record.steps[i].attempts.len() as u32 + 1;
        let inputs = spec
            .inputs
            .iter()
            .map(|(name, digests)| {
                let input = match digests {
                    needle_core::store::InputDigests::One(a) => InputArtifacts::One(*a),
                    needle_core::store::InputDigests::Gather(members) => InputArtifacts::Gather(
                        members
                            .iter()
                            .map(|m| (m.label.clone(), m.artifact))
                            .collect(),
                    ),
                };
                (name.clone(), input)
            })
            .collect();
        let (cmd, program) = match node.kind {
            OpKind::Builtin => {
                let exe = self.worker.to_string_lossy().into_owned();
                let cmd = vec![exe, node.op.clone()];
                (cmd, Some(self.worker.clone()))
            }
            OpKind::Exec => {
                let cmd = node.cmd.clone().unwrap_or_default();
                let program = cmd.first().and_then(|first| {
                    self.programs
                        .entry(first.clone())
                        .or_insert_with(|| process::find_on_path(first))
                        .clone()
                });
                (cmd, program)
            }
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => match staging::new_slot(&self.store) {
                Ok(slot) => slot,
                Err(e) => {
                    self.pool.give_back(&grant);
                    self.fail(i, format!("could not prepare a staging directory: {e}"));
                    return;
                }
            },
        };
        // The resources a Slurm job asks for are the step's own; the grant is a job token,
        // and Slurm names the GPUs.
        let held = match self.executor {
            Executor::Local => self.held(&grant, &node.resources),
            Executor::Slurm(_) => Held {
                cpus: node.resources.cpus.max(1),
                ..Held::default()
            },
        };
        let attempt_spec = AttemptSpec {
            node: i,
            key,
            run: self.record.id,
            attempt,
            step_name: node.name.clone(),
            cmd,
            program,
            slot: slot.clone(),
            code: node.code.iter().map(|(p, d)| (p.clone(), *d)).collect(),
            inputs,
            params: node.params.clone(),
            held,
            builtin: node.kind == OpKind::Builtin,
            timeout: node.timeout,
            log_rel: Store::log_rel_path(&key, self.record.id, attempt),
            recipe_dir: self.plan.recipe.source.dir.clone(),
        };
        self.phase[i] = Phase::Running;
        self.record.steps[i].attempts.push(Attempt {
            n: attempt,
            started: now_millis(),
            ended: 0,
            result: AttemptResult::Interrupted,
            gpus: attempt_spec.held.gpus.clone(),
            // A part's share; whole GPUs and memory alone have none to record.
            gpu_share: matches!(grant.gpu, GpuGrant::Part { .. })
                .then_some(attempt_spec.held.gpu_share)
                .flatten(),
            // What it asked for; the environment also says what a share of a known GPU is.
            gpu_mem_gb: (!attempt_spec.held.gpus.is_empty())
                .then(|| node.resources.gpus.mem_gb())
                .flatten(),
            log: attempt_spec.log_rel.clone(),
            job: None,
        });
        self.running.insert(
            i,
            Running {
                handle: None,
                grant,
                started: Instant::now(),
                slot,
            },
        );
        self.progress.started(&self.record.steps[i], attempt);
        match &self.executor {
            Executor::Local => {
                tokio::spawn(executor::run_attempt(
                    self.store.clone(),
                    attempt_spec,
                    self.events_tx.clone(),
                ));
            }
            Executor::Slurm(slurm) => {
                tokio::spawn(crate::slurm::run_attempt(
                    slurm.clone(),
                    self.store.clone(),
                    attempt_spec,
                    node.resources,
                    self.events_tx.clone(),
                ));
            }
        }
    }

    /// What a local step holds of `grant`, as it will see it.
    fn held(&self, grant: &Grant, asked: &needle_core::recipe::Resources) -> Held {
        let gpus: Vec<&Gpu> = grant
            .gpu
            .gpus()
            .iter()
            .map(|&g| &self.opts.gpus[g])
            .collect();
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
            mps: (self.opts.mps.as_ref())
                .filter(|_| !gpus.is_empty())
                .map(|m| m.dirs().clone()),
            gpus: gpus.iter().map(|g| g.id.clone()).collect(),
            gpu_share,
            gpu_mem_gb,
            gpu_mem_fraction,
            cpus: grant.cpus,
        }
    }

    fn on_attempt_end(&mut self, end: AttemptEnd) -> Result<(), StoreError> {
        let i = end.node;
        let running = self.running.remove(&i).expect("an attempt ends once");
        self.pool.give_back(&running.grant);
        let interrupted = self.interrupts > 0;
        let result =
            if interrupted && end.result != AttemptResult::Success && !end.result.wrote_outside() {
                AttemptResult::Interrupted
            } else {
                end.result
            };
        let attempt = {
            let a = self.record.steps[i]
                .attempts
                .last_mut()
                .expect("launch recorded the attempt");
            a.started = end.started;
            a.ended = end.ended;
            a.result = result.clone();
            a.log = end.log.clone().unwrap_or_default();
            if let Some(gpus) = &end.gpus {
                a.gpus = gpus.clone();
            }
            a.job = end.job.clone();
            a.clone()
        };

        if result == AttemptResult::Success {
            let staging = end.staging.expect("a successful attempt has a staging dir");
            self.phase[i] = Phase::Committing;
            self.committing += 1;
            self.forced_done.insert(i);
            let node = &self.plan.nodes[i];
            let job = CommitJob {
                node: i,
                key: self.record.steps[i].key.expect("running node has a key"),
                spec: self.specs[i].clone().expect("running node has a spec"),
                record_id: node.id,
                name: node.name.clone(),
                bindings: node.bindings.clone(),
                execution: Execution {
                    run: self.record.id,
                    attempt: attempt.n,
                    started: attempt.started,
                    ended: attempt.ended,
                    output: ArtifactDigest::from_bytes([0; 32]),
                    gpus: attempt.gpus.clone(),
                    gpu_share: attempt.gpu_share,
                    gpu_mem_gb: attempt.gpu_mem_gb,
                    cpus: match self.executor {
                        Executor::Local => running.grant.cpus,
                        Executor::Slurm(_) => node.resources.cpus.max(1),
                    },
                    log: attempt.log.clone(),
                    job: attempt.job.clone(),
                },
                staging,
                forced: self.opts.force.contains(&node.name),
                // Its status once committed is set by the commit (see `commit_batch`).
                progress: self.step_progress(i),
            };
            if self.to_commit.is_empty() {
                self.to_commit_since = Instant::now();
            }
            self.to_commit.push(job);
            if self.to_commit.len() >= MAX_BATCH {
                self.flush_commits();
            }
            return Ok(());
        }

        if let Some(slot) = end.staging {
            match staging::clean_slot(&slot, true) {
                Ok(()) => self.free_slots.push(slot),
                // Not reusable; the store clears staging/ when it next opens.
                Err(e) => tracing::warn!("could not clean staging slot {}: {e}", slot.display()),
            }
        }
        let log_tail = if attempt.log.is_empty() {
            Vec::new()
        } else {
            tail(&self.store.path(&attempt.log), 12)
        };
        if interrupted {
            self.finish_node(i, StepStatus::Interrupted);
            let key = self.record.steps[i].key.expect("key");
            self.inflight.remove(&key);
            return Ok(());
        }
        let retries = self.plan.nodes[i].retries;
        if attempt.n <= retries.count && !result.wrote_outside() {
            let delay = retries.delay_before(attempt.n + 1);
            self.progress
                .retrying(&self.record.steps[i], &result, delay, &log_tail);
            self.phase[i] = Phase::Waiting;
            self.retries_pending += 1;
            let tx = self.events_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(Event::RetryDue { node: i });
            });
        } else {
            let mut reason = result.describe();
            if let Some(full) = self.store.full() {
                reason.push_str(&format!(
                    "; the store's filesystem `{}` is full ({} free): free space, then run it \
                     again",
                    full.mount.display(),
                    needle_core::store::human_bytes(full.free)
                ));
            }
            self.progress
                .failed(&self.record.steps[i], &reason, &log_tail);
            self.fail(i, reason);
        }
        Ok(())
    }

    /// Mark `i` failed and every node downstream of it skipped.
    fn fail(&mut self, i: usize, reason: String) {
        if let Some(key) = self.record.steps[i].key
            && self.inflight.get(&key) == Some(&i)
        {
            self.settle_followers(i, Err("failed"));
        }
        self.finish_node(i, StepStatus::Failed { reason });
        let upstream = self.plan.nodes[i].display_name();
        let mut stack = self.dependents[i].clone();
        let mut skipped = 0;
        while let Some(d) = stack.pop() {
            if self.phase[d] == Phase::Waiting {
                self.finish_node(
                    d,
                    StepStatus::Skipped {
                        upstream: upstream.clone(),
                    },
                );
                skipped += 1;
                stack.extend(self.dependents[d].iter().copied());
            }
        }
        if skipped > 0 {
            self.progress.note(&format!(
                "        skipped {skipped} step(s) downstream of `{upstream}`"
            ));
        }
    }

    fn finish_node(&mut self, i: usize, status: StepStatus) {
        self.phase[i] = Phase::Finished;
        self.progress_urgent |= !matches!(status, StepStatus::Cached { .. });
        self.record.steps[i].status = status;
        self.progress_dirty.push(i);
        if !matches!(self.record.steps[i].status, StepStatus::Failed { .. }) {
            self.progress.finished(&self.record.steps[i], None);
        }
    }

    fn interrupt(&mut self) {
        self.interrupts += 1;
        self.progress
            .interrupted(self.interrupts, self.running.len());
        for node in self.ready.drain() {
            self.phase[node] = Phase::Waiting;
        }
        let handles: Vec<Handle> = self
            .running
            .values()
            .filter_map(|r| r.handle.clone())
            .collect();
        // The first Ctrl-C asks politely, the second does not.
        self.stop(&handles, self.interrupts > 1);
    }

    /// Stop started attempts: SIGTERM (or SIGKILL) to local process groups, scancel to jobs.
    fn stop(&self, handles: &[Handle], kill: bool) {
        let mut jobs = Vec::new();
        for h in handles {
            match h {
                Handle::Process(pid) => {
                    process::kill_group(*pid, if kill { libc::SIGKILL } else { libc::SIGTERM })
                }
                Handle::Job(id) => jobs.push(id.clone()),
            }
        }
        if let Executor::Slurm(slurm) = &self.executor
            && !jobs.is_empty()
        {
            let slurm = slurm.clone();
            tokio::spawn(async move { slurm.cancel(&jobs, kill).await });
        }
    }

    /// Record how far the steps that changed have got, for readers after a killed runner.
    /// A failure costs only that record: the final run record is written at the end anyway.
    /// Cached steps are recorded at most once a second, and not in a run's first second: a
    /// run of cached steps that ends at once writes its final record alone. A step that failed,
    /// was skipped or interrupted, or must execute again is recorded before the next step
    /// starts (`urgent`).
    fn record_progress(&mut self) {
        let due = self.progress_urgent || self.progress_recorded.elapsed() >= PROGRESS_EVERY;
        if self.progress_dirty.is_empty() || !due {
            return;
        }
        self.progress_recorded = Instant::now();
        self.progress_urgent = false;
        let mut nodes = std::mem::take(&mut self.progress_dirty);
        nodes.sort_unstable();
        nodes.dedup();
        let progress: Vec<StepProgress> = nodes.iter().map(|&i| self.step_progress(i)).collect();
        if let Err(e) = self.store.put_run_progress(self.record.id, &progress) {
            tracing::warn!("could not record the run's progress: {e}");
        }
    }

    fn step_progress(&self, i: usize) -> StepProgress {
        let step = &self.record.steps[i];
        StepProgress {
            node: i as u32,
            key: step.key,
            status: step.status.clone(),
            attempts: step.attempts.clone(),
        }
    }

    fn update_progress(&mut self) {
        self.record_progress();
        let running: Vec<RunningStep> = self
            .running
            .iter()
            .map(|(&i, r)| RunningStep {
                name: self.plan.nodes[i].display_name(),
                elapsed: r.started.elapsed(),
                progress: staging::last_progress(&r.slot),
            })
            .collect();
        self.progress.update(&self.counts(), &running);
        if let Some(live) = &self.live {
            live.offer(|| LiveSnapshot {
                record: self.record.clone(),
                // A running attempt's log is in its slot until it ends (see executor.rs).
                logs: (self.running.iter())
                    .map(|(&i, r)| (i, r.slot.join("log")))
                    .collect(),
            });
        }
    }

    fn counts(&self) -> RunOutcome {
        let mut o = RunOutcome {
            run: self.record.id,
            state: RunState::Running,
            executed: 0,
            cached: 0,
            failed: 0,
            skipped: 0,
            interrupted: 0,
            pending: 0,
            duration_ms: self.t0.elapsed().as_millis() as u64,
        };
        for s in &self.record.steps {
            match s.status {
                StepStatus::Succeeded { .. } => o.executed += 1,
                StepStatus::Cached { .. } => o.cached += 1,
                StepStatus::Failed { .. } => o.failed += 1,
                StepStatus::Skipped { .. } => o.skipped += 1,
                StepStatus::Interrupted => o.interrupted += 1,
                StepStatus::Pending => o.pending += 1,
            }
        }
        o
    }

    fn finish(mut self) -> Result<(RunOutcome, RunRecord), StoreError> {
        debug_assert!(
            self.to_commit.is_empty(),
            "the loop ends with every commit done"
        );
        drop(self.commit_tx.take());
        if let Some(handle) = self.committer.take() {
            let _ = handle.join();
        }
        let mut outcome = self.counts();
        outcome.state = if self.interrupts > 0 {
            RunState::Interrupted
        } else if outcome.failed > 0 || outcome.skipped > 0 || outcome.pending > 0 {
            RunState::Failed
        } else {
            RunState::Succeeded
        };
        self.record.state = outcome.state;
        self.record.ended = Some(now_millis());
        tracing::debug!(
            runner_cpu_s = cpu_seconds(libc::RUSAGE_SELF),
            input_artifacts = self.input_check.artifacts,
            input_blobs = self.input_check.blobs_hashed,
            input_bytes = self.input_check.bytes,
            input_check_ms = self.input_check.time.as_secs_f64() * 1e3,
            steps_cpu_s = cpu_seconds(libc::RUSAGE_CHILDREN),
            "cpu time"
        );
        self.store.put_run(&self.record)?;
        self.progress.done(&outcome);
        Ok((outcome, self.record))
    }
}

/// The share a step asked for, as it wrote it (the pool counts it in [`SHARE_UNITS`]).
fn asked_share(asked: &needle_core::recipe::Resources) -> f64 {
    match asked.gpus {
        needle_core::recipe::GpuRequest::Part {
            share: Some(share), ..
        } => share,
        _ => 1.0,
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// User + system CPU seconds of this process (`RUSAGE_SELF`) or its reaped children.
fn cpu_seconds(who: i32) -> f64 {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass; nothing else is touched.
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// `needle-worker`, beside this binary. Should that fail to resolve (it does not on Linux),
/// the name alone leaves the search to PATH, and a failure to spawn is the step's result.
pub fn worker_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("needle-worker")))
        .unwrap_or_else(|| PathBuf::from("needle-worker"))
}

/// Build the run record's step list from a plan.
pub fn run_steps(plan: &Plan) -> Vec<RunStep> {
    plan.nodes
        .iter()
        .map(|node| RunStep {
            id: node.id,
            name: node.name.clone(),
            op: node.op.clone(),
            bindings: node.bindings.clone(),
            arms: node.arms.clone(),
            inputs: node
                .inputs
                .iter()
                .map(|(name, input)| (name.clone(), input.nodes()))
                .collect::<BTreeMap<_, _>>(),
            key: None,
            status: StepStatus::Pending,
            attempts: Vec::new(),
        })
        .collect()
}

/// The last `n` lines of a log, for failure messages.
pub fn tail(path: &std::path::Path, n: usize) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// How often the run's progress (other than commits) is recorded.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
