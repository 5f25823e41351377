//! The run loop: resolves keys, skips what the store holds, starts ready steps as resources
//! free up, commits outputs, and records the runs.
//!
//! One engine executes every run of its store: the runner's own, and the runs that other
//! `needle run`s hand it while it goes (`join`). Their steps share one pool of GPUs, CPU slots
//! and memory, one ready queue per run ranked by priority then arrival, and one map of the keys
//! in flight, so that a step two runs have in common executes once.
//!
//! A node's life (nodes of every run are numbered together; each run owns a range):
//! ```text
//! Waiting ──inputs done──▶ (key known) ──in store──▶ Cached
//!                              │
//!                              ├──same key running──▶ Follower ──leader commits──▶ Cached
//!                              ▼
//!                            Ready ──resources──▶ Running ──exit 0──▶ Committing ──▶ Succeeded
//!                                                    │  ▲
//!                                                    │  └──Retrying (after backoff)
//!                                                    └──no attempts left──▶ Failed ──▶ dependents Skipped
//! Ctrl-C (of a run): its running steps are stopped (SIGTERM, then SIGKILL) and recorded
//! Interrupted, its steps that never started stay Pending; a step that a follower of another
//! run waits for is handed to that follower instead, and goes on.
//! ```
//! A run ends when none of its nodes is Ready, Running, Committing, Retrying or a Follower:
//! its record is stored then, and its end reported, while the other runs go on.
//!
//! The outside world (child exits, commits, timers, signals, runs joining or cancelled) enters
//! one `select!` loop as [`Event`]s; nothing else mutates the engine's state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use needle_core::digest::{ArtifactDigest, StepKey};
use needle_core::ops::OpKind;
use needle_core::plan::{NodeInput, Plan, PlanNode};
use needle_core::store::remote::{LiveRun, LiveSnapshot};
use needle_core::store::{
    Attempt, AttemptResult, Execution, Health, InputCheck, RunRecord, RunStep, StepProgress,
    StepSpec, StepStatus, Store, StoreError, now_millis,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::attempt::{AttemptEnd, AttemptSpec, Event, Handle, RunOutcome};
use crate::commit::{CommitJob, MAX_BATCH, MAX_BATCH_WAIT, commit_loop};
use crate::executor::Executor;
use crate::executor::Machine;
use crate::gpus::Gpu;
use crate::progress::{Progress, RunningStep};
use crate::scheduler::{GpuGrant, Grant, Pool};
use crate::slurm::SlurmConfig;
use crate::{process, staging};

#[cfg(test)]
pub(crate) mod fake;
mod runs;
mod search;
#[cfg(test)]
mod tests;

use runs::RunSlot;
pub use runs::{Joining, OnEnd, RunOptions, new_record};
use search::Verdict;

/// What the runner executes with: the pool every run shares, and its own run's options.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Run through Slurm, configured so; `None`: locally.
    pub slurm: Option<SlurmConfig>,
    /// The GPUs local steps may be given; empty: steps asking for GPUs run on the CPU.
    pub gpus: Vec<Gpu>,
    pub cpus: u32,
    pub mem_mb: u64,
    /// The run's MPS daemon (`--mps`), whose clients its GPU steps are; it quits when the
    /// last holder drops it.
    pub mps: Option<Arc<crate::mps::Mps>>,
    /// The options of the runner's own run.
    pub run: RunOptions,
}

/// Where a node is in its life (see the diagram above), with what it has there. Its key and
/// attempts are in its run's record (`RunStep`); this is what the loop needs beside them.
enum State {
    /// Waiting for `missing` inputs (and gate) to be done; 0 with its key not yet resolved,
    /// or sent back to wait (its run interrupted, or an output it reads dropped as damaged).
    Waiting {
        missing: usize,
    },
    /// Queued to start: its key is known, and no node of any run holds it.
    Ready {
        spec: StepSpec,
    },
    /// Another node executes the same key; it finishes as that one does (`followers`).
    Follower {
        spec: StepSpec,
    },
    Running {
        spec: StepSpec,
        attempt: Running,
    },
    /// Exited 0: its output waits for, or is in, a commit batch.
    Committing,
    /// Failed, and waiting for its backoff before the next attempt.
    Retrying {
        spec: StepSpec,
    },
    /// Terminal (the run record's status says how), with its output where it has one.
    Finished {
        output: Option<ArtifactDigest>,
    },
}

impl State {
    /// Whether a run with a node in this state has work left.
    fn busy(&self) -> bool {
        !matches!(self, State::Waiting { .. } | State::Finished { .. })
    }
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
    opts: EngineOptions,
    runs: Vec<RunSlot>,
    /// Per node, all runs' nodes numbered together: its run (an index into `runs`).
    run_of: Vec<usize>,
    /// Per node: its state.
    nodes: Vec<State>,
    dependents: Vec<Vec<usize>>,
    priority: Vec<u64>,
    pool: Pool,
    /// A running attempt handed from a node of a cancelled run to a follower in another:
    /// the events of the attempt, which name the first, are the second's.
    handed: HashMap<usize, usize>,
    /// Key → the node executing it; later nodes with the same key, of any run, wait for it.
    inflight: HashMap<StepKey, usize>,
    followers: HashMap<usize, Vec<usize>>,
    forced_done: HashSet<usize>,
    /// Each search node's decision, read when the first node it gates resolves.
    rungs: HashMap<usize, Result<Arc<search::Rung>, String>>,
    /// Inputs found whole in this runner (each artifact and blob is hashed once).
    input_check: InputCheck,
    /// Inputs found damaged by this runner: found again, the step reading them fails.
    damaged: HashSet<ArtifactDigest>,
    committing: usize,
    /// Ctrl-Cs and SIGTERMs the runner got.
    signals: u32,
    events_tx: UnboundedSender<Event>,
    events_rx: UnboundedReceiver<Event>,
    commit_tx: Option<std::sync::mpsc::Sender<Vec<CommitJob>>>,
    /// Finished steps waiting to be committed together, and since when the oldest waits.
    to_commit: Vec<CommitJob>,
    to_commit_since: Instant,
    committer: Option<std::thread::JoinHandle<()>>,
    /// Clean staging slots, reused by later attempts.
    free_slots: Vec<PathBuf>,
    /// `cmd[0]` → where it is on PATH, looked up once per name.
    programs: HashMap<String, Option<PathBuf>>,
    /// `needle-worker`, beside this binary: built-in ops run as `needle-worker OP`.
    worker: PathBuf,
    /// Where readers of the store see the runner's own run as far as it has got.
    live: Option<Arc<LiveRun>>,
    /// The own run's outcome, once it ended.
    own: Option<RunOutcome>,
    progress_urgent: bool,
    progress_recorded: Instant,
    /// Told the key of each step this run commits (the shared cache uploads it).
    on_committed: Option<Box<dyn Fn(StepKey) + Send>>,
}

impl Engine {
    /// An engine for the runner's own run (`plan`, recorded as `record`), which others may
    /// join while it goes.
    pub fn new(
        store: Arc<Store>,
        plan: Plan,
        record: RunRecord,
        opts: EngineOptions,
        progress: Box<dyn Progress>,
        on_end: OnEnd,
    ) -> Engine {
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
        let executor = Executor::new(opts.slurm.as_ref(), &store);
        let pool = executor.pool(&machine(&opts));
        let own_opts = opts.run.clone();
        let mut engine = Engine {
            store,
            executor,
            opts,
            runs: Vec::new(),
            run_of: Vec::new(),
            nodes: Vec::new(),
            dependents: Vec::new(),
            priority: Vec::new(),
            pool,
            handed: HashMap::new(),
            inflight: HashMap::new(),
            followers: HashMap::new(),
            forced_done: HashSet::new(),
            rungs: HashMap::new(),
            input_check: InputCheck::default(),
            damaged: HashSet::new(),
            committing: 0,
            signals: 0,
            events_tx,
            events_rx,
            commit_tx: Some(commit_tx),
            to_commit: Vec::new(),
            to_commit_since: Instant::now(),
            committer: Some(committer),
            free_slots: Vec::new(),
            programs: HashMap::new(),
            worker: worker_path(),
            live: None,
            own: None,
            progress_urgent: false,
            progress_recorded: Instant::now(),
            on_committed: None,
        };
        engine.add_run(plan, record, own_opts, progress, on_end, None);
        engine
    }

    /// A sender of events to this engine's loop, for the threads that hand it runs.
    pub fn events(&self) -> UnboundedSender<Event> {
        self.events_tx.clone()
    }

    /// Call `f` with the key of each step a run of this engine commits (its own run's and
    /// those that joined it), once it is committed.
    pub fn on_committed(mut self, f: impl Fn(StepKey) + Send + 'static) -> Engine {
        self.on_committed = Some(Box::new(f));
        self
    }

    /// Make sure the executor can run anything, before the run is recorded: for Slurm, that
    /// the controller answers; the jobs a killed runner left for this store are cancelled.
    pub async fn start_executor(&mut self) -> Result<(), crate::slurm::SlurmError> {
        let stale = self.executor.start().await?;
        if !stale.is_empty() {
            self.runs[0].progress.note(&format!(
                "cancelled {} Slurm job(s) an earlier runner of this store left: {}",
                stale.len(),
                stale.join(" ")
            ));
        }
        Ok(())
    }

    /// The same engine on another executor (a fake, in tests).
    #[cfg(test)]
    fn with_executor(mut self, executor: Executor) -> Engine {
        self.pool = executor.pool(&machine(&self.opts));
        self.executor = executor;
        self
    }

    /// Offer copies of the own run's progress to `live` as it goes (when a reader asks).
    pub fn with_live(mut self, live: Arc<LiveRun>) -> Engine {
        self.live = Some(live);
        self
    }

    /// Run until every run has ended: the own run, and those that joined meanwhile. Each
    /// run's record is written before its first step starts and again at its end. Returns the
    /// own run's outcome.
    pub async fn execute(self) -> Result<RunOutcome, StoreError> {
        self.execute_with(Signals::os()).await
    }

    /// [`Engine::execute`], told of Ctrl-C and SIGTERM by `signals`.
    async fn execute_with(mut self, mut signals: Signals) -> Result<RunOutcome, StoreError> {
        self.store.put_run(&self.runs[0].record)?;
        // Follows the run's Slurm jobs; dropped (and so stopped) with the run.
        let _poller = self.executor.follow();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

        self.start_run(0)?;
        self.update_progress();

        loop {
            self.start_ready();
            self.end_idle_runs()?;
            if self.runs.iter().all(|r| !r.live()) {
                break;
            }
            // Nothing left to start: what comes next waits on commits, so commit now rather
            // than when the batch fills.
            let nothing_to_start = self
                .runs
                .iter()
                .all(|r| r.ready.is_empty() || r.interrupts > 0);
            if !self.to_commit.is_empty() && nothing_to_start {
                self.flush_commits();
            }
            let commit_due = self.to_commit_since + MAX_BATCH_WAIT;
            let waiting = !self.to_commit.is_empty();
            tokio::select! {
                Some(ev) = self.events_rx.recv() => self.handle(ev)?,
                terminate = signals.next() => self.on_signal(terminate),
                _ = tick.tick() => self.update_progress(),
                _ = tokio::time::sleep_until(commit_due.into()), if waiting => self.flush_commits(),
            }
        }
        self.finish()
    }

    fn handle(&mut self, ev: Event) -> Result<(), StoreError> {
        match ev {
            Event::Started { node, handle } => {
                let node = self.handed.get(&node).copied().unwrap_or(node);
                let interrupted = self.runs[self.run_of[node]].interrupts > 0;
                if let State::Running { attempt, .. } = &mut self.nodes[node] {
                    if interrupted {
                        self.executor.stop(std::slice::from_ref(&handle), false);
                    }
                    attempt.handle = Some(handle);
                }
            }
            Event::Ended(mut end) => {
                if let Some(to) = self.handed.remove(&end.node) {
                    end.node = to;
                }
                self.on_attempt_end(end)?
            }
            Event::Committed(results, slots) => {
                self.free_slots.extend(slots);
                for (node, result) in results {
                    self.committing -= 1;
                    match result {
                        Ok(output) => {
                            if let (Some(f), Some(key)) = (&self.on_committed, self.step(node).key)
                            {
                                f(key);
                            }
                            self.step_mut(node).status = StepStatus::Succeeded { output };
                            self.finished_note(node);
                            self.settle_followers(node, Ok(output));
                            self.on_done(node, output)?;
                        }
                        Err(error) => {
                            if let Some(last) = self.step_mut(node).attempts.last_mut() {
                                last.result = AttemptResult::OutputError {
                                    error: error.clone(),
                                };
                            }
                            let reason = format!("output not committed: {error}");
                            self.failed_note(node, &reason, &[]);
                            self.fail(node, reason);
                        }
                    }
                }
            }
            Event::RetryDue { node } => {
                if self.runs[self.run_of[node]].interrupts == 0 {
                    let spec = self.take_spec(node);
                    self.push_ready(node, spec);
                } else if let Some(to) = self.hand_over(node) {
                    self.finish_node(node, StepStatus::Interrupted);
                    let spec = self.take_spec(to);
                    self.push_ready(to, spec);
                } else {
                    self.finish_node(node, StepStatus::Interrupted);
                }
            }
            Event::Join(joining) => self.join(*joining)?,
            Event::Cancel { client } => {
                if let Some(r) = self
                    .runs
                    .iter()
                    .position(|s| s.live() && s.client == Some(client))
                {
                    self.interrupt_run(r);
                }
            }
        }
        // The live display refreshes on the tick: recounting per event would cost O(steps²).
        if self.progress_urgent {
            self.record_progress();
        }
        Ok(())
    }

    fn node(&self, i: usize) -> &PlanNode {
        let s = &self.runs[self.run_of[i]];
        &s.plan.nodes[i - s.first]
    }

    fn step(&self, i: usize) -> &RunStep {
        let s = &self.runs[self.run_of[i]];
        &s.record.steps[i - s.first]
    }

    fn step_mut(&mut self, i: usize) -> &mut RunStep {
        let s = &mut self.runs[self.run_of[i]];
        &mut s.record.steps[i - s.first]
    }

    /// Node `i` enters `state`; what it had in the state it leaves is returned.
    fn set_state(&mut self, i: usize, state: State) -> State {
        let run = &mut self.runs[self.run_of[i]];
        match (self.nodes[i].busy(), state.busy()) {
            (false, true) => run.busy += 1,
            (true, false) => run.busy -= 1,
            _ => {}
        }
        std::mem::replace(&mut self.nodes[i], state)
    }

    /// The output of node `i`, once it finished with one.
    fn output(&self, i: usize) -> Option<ArtifactDigest> {
        match self.nodes[i] {
            State::Finished { output } => output,
            _ => None,
        }
    }

    /// The spec of node `i`, which leaves the state that held it (ready, following, running
    /// or retrying) for `Waiting`, until the caller says where it goes.
    fn take_spec(&mut self, i: usize) -> StepSpec {
        match self.set_state(i, State::Waiting { missing: 0 }) {
            State::Ready { spec }
            | State::Follower { spec }
            | State::Running { spec, .. }
            | State::Retrying { spec } => spec,
            _ => panic!("node {i} has no spec to take"),
        }
    }

    /// Step `i`'s state changed: record it with its run's progress.
    fn dirty(&mut self, i: usize) {
        let s = &mut self.runs[self.run_of[i]];
        s.progress_dirty.push(i - s.first);
    }

    /// Tell step `i`'s run that it reached a terminal state other than failure.
    fn finished_note(&mut self, i: usize) {
        let s = &mut self.runs[self.run_of[i]];
        s.progress.finished(&s.record.steps[i - s.first], None);
    }

    fn failed_note(&mut self, i: usize, reason: &str, log: &[String]) {
        let s = &mut self.runs[self.run_of[i]];
        s.progress.failed(&s.record.steps[i - s.first], reason, log);
    }

    fn note(&mut self, i: usize, text: &str) {
        self.runs[self.run_of[i]].progress.note(text);
    }

    /// Inputs done: compute the key, then cached, follower or ready.
    fn resolve(&mut self, first: usize) -> Result<(), StoreError> {
        let mut work = vec![first];
        while let Some(i) = work.pop() {
            // Sent back to wait for an input executing again (see `inputs_whole`), or
            // released twice meanwhile.
            if !matches!(self.nodes[i], State::Waiting { missing: 0 }) {
                continue;
            }
            match self.verdict(i) {
                Verdict::Go => {}
                Verdict::Stop(by) => {
                    self.finish_node(i, StepStatus::Stopped { by });
                    work.extend(self.release_dependents(i));
                    continue;
                }
                Verdict::Unreadable(reason) => {
                    let reason = format!("the search's decision: {reason}");
                    self.failed_note(i, &reason, &[]);
                    self.fail(i, reason);
                    continue;
                }
            }
            let base = self.runs[self.run_of[i]].first;
            let spec = self
                .node(i)
                .spec_without(|u| self.output(base + u), |u| self.is_stopped(base + u))
                .expect("resolve runs once every input has an output");
            let key = spec.key();
            self.step_mut(i).key = Some(key);
            let forced = (self.runs[self.run_of[i]].opts.force).contains(&self.node(i).name);

            if let Some(&leader) = self.inflight.get(&key) {
                // An interrupted run starts nothing new, and waits for nothing: pending.
                if self.runs[self.run_of[i]].interrupts > 0 {
                    continue;
                }
                self.set_state(i, State::Follower { spec });
                self.followers.entry(leader).or_default().push(i);
                continue;
            }
            let may_reuse = !forced || self.forced_done.contains(&i);
            if may_reuse && let Some(rec) = self.store.step(&key)? {
                self.step_mut(i).status = StepStatus::Cached { output: rec.output };
                self.dirty(i);
                self.set_state(
                    i,
                    State::Finished {
                        output: Some(rec.output),
                    },
                );
                self.finished_note(i);
                work.extend(self.release_dependents(i));
                continue;
            }
            if !self.inputs_whole(i, &spec, &mut work)? {
                continue;
            }
            self.inflight.insert(key, i);
            self.push_ready(i, spec);
        }
        Ok(())
    }

    /// Whether the search stopped node `i`'s arm (its gate's decision did not keep any arm of
    /// it, or an input it reads alone was stopped), and why.
    fn verdict(&mut self, i: usize) -> Verdict {
        let base = self.runs[self.run_of[i]].first;
        for input in self.node(i).inputs.values() {
            if let NodeInput::One(u) = input
                && let StepStatus::Stopped { by } = &self.step(base + u).status
            {
                return Verdict::Stop(by.clone());
            }
        }
        let Some(gate) = self.node(i).gate else {
            return Verdict::Go;
        };
        let output = (self.output(base + gate)).expect("a gate is done before what it gates");
        let plan = &self.runs[self.run_of[i]].plan;
        // Read once per rung: every node of the next rung asks it.
        let rung = (self.rungs.entry(base + gate)).or_insert_with(|| {
            (search::Rung::read(&self.store, plan, gate, output).map(Arc::new))
                .map_err(|e| needle_core::error_chain::joined(&e, ": "))
        });
        match rung {
            Ok(rung) => rung.verdict(plan, i - base),
            Err(e) => Verdict::Unreadable(e.clone()),
        }
    }

    /// The nodes running an attempt, with it.
    fn running(&self) -> impl Iterator<Item = (usize, &Running)> {
        (self.nodes.iter().enumerate()).filter_map(|(i, state)| match state {
            State::Running { attempt, .. } => Some((i, attempt)),
            _ => None,
        })
    }

    fn is_stopped(&self, i: usize) -> bool {
        matches!(self.step(i).status, StepStatus::Stopped { .. })
    }

    /// Before step `i` executes: hash the blobs of its inputs against their digests (each
    /// artifact once per run). A damaged input is dropped from the store with what it makes
    /// untrue (`Store::drop_damaged`: the manifests using a damaged blob, the step records
    /// that produced them), and the steps of its run that output a dropped artifact execute
    /// again; `i` waits for them as for any input, then is resolved anew. False then, or when
    /// `i` failed: an input found damaged a second time in this run (after its producer ran
    /// again), or one that no step of this run produced.
    fn inputs_whole(
        &mut self,
        i: usize,
        spec: &StepSpec,
        work: &mut Vec<usize>,
    ) -> Result<bool, StoreError> {
        let inputs: Vec<(String, ArtifactDigest)> = spec
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
            let run = &self.runs[self.run_of[i]];
            let producers: Vec<usize> = (run.first..run.first + run.plan.nodes.len())
                .filter(|&u| {
                    (self.output(u)).is_some_and(|o| dropped.artifact_digests.contains(&o))
                })
                .collect();
            let step = self.node(i).display_name();
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
                self.failed_note(i, &reason, &[]);
                self.fail(i, reason);
                return Ok(false);
            }
            let names: Vec<String> = producers
                .iter()
                .map(|&u| format!("`{}`", self.node(u).display_name()))
                .collect();
            let text = format!(
                "        input `{name}` of `{step}` is damaged: {what}; {dropped_text}; \
                 executing {} again",
                names.join(", ")
            );
            self.note(i, &text);
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
        self.rungs.remove(&u);
        self.set_state(u, State::Waiting { missing: 0 });
        self.step_mut(u).status = StepStatus::Pending;
        self.dirty(u);
        self.progress_urgent = true;
        let s = &mut self.runs[self.run_of[u]];
        s.progress.reopened(&s.record.steps[u - s.first]);
        for &d in &self.dependents[u] {
            if let State::Waiting { missing } = &mut self.nodes[d] {
                *missing += 1;
            }
        }
        work.push(u);
    }

    /// Hand the waiting finished steps to the commit thread, one batch per run (a batch
    /// records the progress of one run).
    fn flush_commits(&mut self) {
        let mut batches: BTreeMap<u64, Vec<CommitJob>> = BTreeMap::new();
        for job in std::mem::take(&mut self.to_commit) {
            batches.entry(job.execution.run).or_default().push(job);
        }
        for batch in batches.into_values() {
            self.commit_tx
                .as_ref()
                .expect("the committer lives until the end")
                .send(batch)
                .expect("the commit thread is alive");
        }
    }

    /// Queue `i` to start. In a run that was interrupted it stays pending instead.
    fn push_ready(&mut self, i: usize, spec: StepSpec) {
        let r = self.run_of[i];
        if self.runs[r].interrupts > 0 {
            self.set_state(i, State::Waiting { missing: 0 });
            if let Some(key) = self.step(i).key
                && self.inflight.get(&key) == Some(&i)
            {
                self.inflight.remove(&key);
            }
            return;
        }
        self.set_state(i, State::Ready { spec });
        let shape = (self.executor).shape(&self.node(i).resources, &machine(&self.opts));
        self.runs[r].ready.push(i, self.priority[i], shape);
    }

    /// Dependents whose last missing input was `i`.
    fn release_dependents(&mut self, i: usize) -> Vec<usize> {
        let mut now_ready = Vec::new();
        for &d in &self.dependents[i] {
            if let State::Waiting { missing } = &mut self.nodes[d] {
                *missing -= 1;
                if *missing == 0 {
                    now_ready.push(d);
                }
            }
        }
        now_ready
    }

    fn on_done(&mut self, i: usize, output: ArtifactDigest) -> Result<(), StoreError> {
        self.set_state(
            i,
            State::Finished {
                output: Some(output),
            },
        );
        for d in self.release_dependents(i) {
            self.resolve(d)?;
        }
        Ok(())
    }

    fn settle_followers(&mut self, leader: usize, result: Result<ArtifactDigest, &str>) {
        let key = self.step(leader).key.expect("a running node has a key");
        self.inflight.remove(&key);
        let Some(followers) = self.followers.remove(&leader) else {
            return;
        };
        let leader_name = self.node(leader).display_name();
        let leader_run = self.runs[self.run_of[leader]].record.id;
        for f in followers {
            // A step of another run says which run executed it.
            let who = if self.run_of[f] == self.run_of[leader] {
                format!("`{leader_name}`")
            } else {
                format!("`{leader_name}` of run {leader_run}")
            };
            match result {
                Ok(output) => {
                    self.step_mut(f).status = StepStatus::Cached { output };
                    self.dirty(f);
                    if self.run_of[f] != self.run_of[leader] {
                        let run = &mut self.runs[self.run_of[f]];
                        *run.shared.entry(leader_run).or_default() += 1;
                        self.note(
                            f,
                            &format!("shared  {} with {who}", self.node(f).display_name()),
                        );
                    }
                    self.finished_note(f);
                    // Errors surface when the follower's own dependents resolve.
                    let _ = self.on_done(f, output);
                }
                Err(reason) => self.fail(f, format!("same step as {who}, which {reason}")),
            }
        }
    }

    /// Start ready steps while they fit: the best-ranked run first, then the next (a run whose
    /// next step does not fit does not keep another's smaller steps waiting).
    fn start_ready(&mut self) {
        loop {
            let mut order: Vec<usize> = (0..self.runs.len())
                .filter(|&r| {
                    let s = &self.runs[r];
                    s.live() && s.interrupts == 0 && !s.ready.is_empty()
                })
                .collect();
            order.sort_by_key(|&r| self.runs[r].rank());
            let Some((r, i, shape)) = order.into_iter().find_map(|r| {
                let room = self.runs[r].gpu_room();
                (self.runs[r].ready)
                    .pop_fitting(&self.pool, room)
                    .map(|(i, shape)| (r, i, shape))
            }) else {
                return;
            };
            let grant = self.pool.take(shape).expect("pop_fitting checked the fit");
            self.runs[r].gpu_units += grant.gpu.units();
            self.launch(i, grant);
        }
    }

    /// Return what run `r`'s step held to the pool.
    fn give_back(&mut self, r: usize, grant: &Grant) {
        self.pool.give_back(grant);
        self.runs[r].gpu_units -= grant.gpu.units();
    }

    fn launch(&mut self, i: usize, grant: Grant) {
        let r = self.run_of[i];
        let (run_id, recipe_dir) = (
            self.runs[r].record.id,
            self.runs[r].plan.recipe.source.dir.clone(),
        );
        let key = self.step(i).key.expect("a ready node has a key");
        let attempt = self.step(i).attempts.len() as u32 + 1;
        let spec = self.take_spec(i);
        let node = &self.runs[r].plan.nodes[i - self.runs[r].first];
        let inputs = spec.inputs.clone();
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
                    self.give_back(r, &grant);
                    let e = needle_core::error_chain::joined(&e, ": ");
                    self.fail(i, format!("could not prepare a staging directory: {e}"));
                    return;
                }
            },
        };
        // The resources a Slurm job asks for are the step's own; the grant is a job token,
        // and Slurm names the GPUs.
        let node = &self.runs[r].plan.nodes[i - self.runs[r].first];
        let resources = node.resources;
        let held = (self.executor).held(&grant, &resources, &machine(&self.opts));
        let attempt_spec = AttemptSpec {
            node: i,
            key,
            run: run_id,
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
            log_rel: Store::log_rel_path(&key, run_id, attempt),
            recipe_dir,
        };
        self.step_mut(i).attempts.push(Attempt {
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
                .then(|| resources.gpus.mem_gb())
                .flatten(),
            log: attempt_spec.log_rel.clone(),
            job: None,
        });
        let running = Running {
            handle: None,
            grant,
            started: Instant::now(),
            slot,
        };
        self.set_state(
            i,
            State::Running {
                spec,
                attempt: running,
            },
        );
        let s = &mut self.runs[r];
        s.progress.started(&s.record.steps[i - s.first], attempt);
        self.executor.launch(
            self.store.clone(),
            attempt_spec,
            resources,
            self.events_tx.clone(),
        );
    }

    fn on_attempt_end(&mut self, end: AttemptEnd) -> Result<(), StoreError> {
        let i = end.node;
        let State::Running {
            spec,
            attempt: running,
        } = self.set_state(i, State::Waiting { missing: 0 })
        else {
            panic!("node {i}'s attempt ended, but it does not run");
        };
        let r = self.run_of[i];
        self.give_back(r, &running.grant);
        let interrupted = self.runs[r].interrupts > 0;
        let result =
            if interrupted && end.result != AttemptResult::Success && !end.result.wrote_outside() {
                AttemptResult::Interrupted
            } else {
                end.result
            };
        let attempt = {
            let a = self
                .step_mut(i)
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
            self.set_state(i, State::Committing);
            self.committing += 1;
            self.forced_done.insert(i);
            let key = self.step(i).key.expect("running node has a key");
            let progress = self.step_progress(i);
            let run = &self.runs[r];
            let node = &run.plan.nodes[i - run.first];
            let job = CommitJob {
                node: i,
                key,
                spec,
                record_id: node.id,
                name: node.name.clone(),
                bindings: node.bindings.clone(),
                execution: Execution {
                    run: run.record.id,
                    attempt: attempt.n,
                    started: attempt.started,
                    ended: attempt.ended,
                    output: ArtifactDigest::from_bytes([0; 32]),
                    gpus: attempt.gpus.clone(),
                    gpu_share: attempt.gpu_share,
                    gpu_mem_gb: attempt.gpu_mem_gb,
                    cpus: self.executor.cpus_held(&running.grant, &node.resources),
                    log: attempt.log.clone(),
                    job: attempt.job.clone(),
                },
                staging,
                forced: run.opts.force.contains(&node.name),
                // Its status once committed is set by the commit (see `commit_batch`).
                progress,
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
            // A run that has not been interrupted may have come to wait for it meanwhile.
            self.finish_node(i, StepStatus::Interrupted);
            match self.hand_over(i) {
                Some(to) => {
                    let spec = self.take_spec(to);
                    self.push_ready(to, spec);
                }
                None => self.forget_key(i),
            }
            return Ok(());
        }
        let retries = self.node(i).retries;
        if attempt.n <= retries.count && !result.wrote_outside() {
            let delay = retries.delay_before(attempt.n + 1);
            let s = &mut self.runs[r];
            s.progress
                .retrying(&s.record.steps[i - s.first], &result, delay, &log_tail);
            self.set_state(i, State::Retrying { spec });
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
            self.failed_note(i, &reason, &log_tail);
            self.fail(i, reason);
        }
        Ok(())
    }

    /// Mark `i` failed and every node downstream of it skipped.
    fn fail(&mut self, i: usize, reason: String) {
        if let Some(key) = self.step(i).key
            && self.inflight.get(&key) == Some(&i)
        {
            self.settle_followers(i, Err("failed"));
        }
        self.finish_node(i, StepStatus::Failed { reason });
        let upstream = self.node(i).display_name();
        let mut stack = self.dependents[i].clone();
        let mut skipped = 0;
        while let Some(d) = stack.pop() {
            if matches!(self.nodes[d], State::Waiting { .. }) {
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
            self.note(
                i,
                &format!("        skipped {skipped} step(s) downstream of `{upstream}`"),
            );
        }
    }

    fn finish_node(&mut self, i: usize, status: StepStatus) {
        self.set_state(i, State::Finished { output: None });
        self.progress_urgent |= !matches!(status, StepStatus::Cached { .. });
        let failed = matches!(status, StepStatus::Failed { .. });
        self.step_mut(i).status = status;
        self.dirty(i);
        if !failed {
            self.finished_note(i);
        }
    }

    /// Stop started attempts (see [`Executor::stop`]).
    fn stop(&self, handles: &[Handle], kill: bool) {
        self.executor.stop(handles, kill);
    }

    /// Record how far the steps that changed have got, for readers after a killed runner.
    /// A failure costs only that record: the final run record is written at the end anyway.
    /// Cached steps are recorded at most once a second, and not in a run's first second: a
    /// run of cached steps that ends at once writes its final record alone. A step that failed,
    /// was skipped or interrupted, or must execute again is recorded before the next step
    /// starts (`urgent`).
    fn record_progress(&mut self) {
        let due = self.progress_urgent || self.progress_recorded.elapsed() >= PROGRESS_EVERY;
        if !due {
            return;
        }
        self.progress_recorded = Instant::now();
        self.progress_urgent = false;
        for r in 0..self.runs.len() {
            let s = &mut self.runs[r];
            if s.progress_dirty.is_empty() || !s.live() {
                continue;
            }
            let mut nodes = std::mem::take(&mut s.progress_dirty);
            nodes.sort_unstable();
            nodes.dedup();
            let first = s.first;
            let progress: Vec<StepProgress> = (nodes.iter())
                .map(|&n| self.step_progress(first + n))
                .collect();
            let id = self.runs[r].record.id;
            if let Err(e) = self.store.put_run_progress(id, &progress) {
                tracing::warn!("could not record the progress of run {id}: {e}");
            }
        }
    }

    fn step_progress(&self, i: usize) -> StepProgress {
        let step = self.step(i);
        StepProgress {
            node: (i - self.runs[self.run_of[i]].first) as u32,
            key: step.key,
            status: step.status.clone(),
            attempts: step.attempts.clone(),
        }
    }

    fn update_progress(&mut self) {
        self.record_progress();
        let mut running: Vec<Vec<RunningStep>> = (0..self.runs.len()).map(|_| Vec::new()).collect();
        for (i, r) in self.running() {
            running[self.run_of[i]].push(RunningStep {
                name: self.node(i).display_name(),
                elapsed: r.started.elapsed(),
                progress: staging::last_progress(&r.slot),
            });
        }
        for (r, running) in running.into_iter().enumerate() {
            if self.runs[r].live() {
                let counts = self.counts(r);
                self.runs[r].progress.update(&counts, &running);
            }
        }
        if let Some(live) = &self.live
            && self.runs[0].live()
        {
            let own = &self.runs[0];
            live.offer(|| LiveSnapshot {
                record: own.record.clone(),
                // A running attempt's log is in its slot until it ends (see local.rs).
                logs: (self.running())
                    .filter(|&(i, _)| self.run_of[i] == 0)
                    .map(|(i, r)| (i - own.first, r.slot.join("log")))
                    .collect(),
            });
        }
    }

    fn finish(mut self) -> Result<RunOutcome, StoreError> {
        debug_assert!(
            self.to_commit.is_empty(),
            "the loop ends with every commit done"
        );
        drop(self.commit_tx.take());
        if let Some(handle) = self.committer.take() {
            let _ = handle.join();
        }
        tracing::debug!(
            runner_cpu_s = cpu_seconds(libc::RUSAGE_SELF),
            input_artifacts = self.input_check.artifacts,
            input_blobs = self.input_check.blobs_hashed,
            input_bytes = self.input_check.bytes,
            input_check_ms = self.input_check.time.as_secs_f64() * 1e3,
            steps_cpu_s = cpu_seconds(libc::RUSAGE_CHILDREN),
            "cpu time"
        );
        Ok(self.own.take().expect("the own run ended"))
    }
}

/// Where the runner's Ctrl-Cs and SIGTERMs come from.
enum Signals {
    Os {
        interrupt: tokio::signal::unix::Signal,
        terminate: tokio::signal::unix::Signal,
    },
    /// A test's: `true` for a SIGTERM.
    #[cfg(test)]
    Sent(UnboundedReceiver<bool>),
}

impl Signals {
    fn os() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals::Os {
            interrupt: signal(SignalKind::interrupt()).expect("installing the SIGINT handler"),
            terminate: signal(SignalKind::terminate()).expect("installing the SIGTERM handler"),
        }
    }

    /// The next signal: whether it is a SIGTERM (else a Ctrl-C). Pending forever once the
    /// source is gone.
    async fn next(&mut self) -> bool {
        match self {
            Signals::Os {
                interrupt,
                terminate,
            } => tokio::select! {
                _ = interrupt.recv() => false,
                _ = terminate.recv() => true,
            },
            #[cfg(test)]
            Signals::Sent(rx) => match rx.recv().await {
                Some(terminate) => terminate,
                None => std::future::pending().await,
            },
        }
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

/// What the run's machine offers local steps.
fn machine(opts: &EngineOptions) -> Machine<'_> {
    Machine {
        gpus: &opts.gpus,
        cpus: opts.cpus,
        mem_mb: opts.mem_mb,
        mps: opts.mps.as_ref(),
    }
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
