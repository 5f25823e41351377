//! The runs an engine executes: the runner's own and those that joined it. Each has its
//! plan, record and ready queue, a range of the engine's node numbers, and its own end; what
//! one run does to another (a Ctrl-C that hands a step over, a step executed for both) is here.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Instant;

use needle_core::plan::{NodeInput, Plan};
use needle_core::store::{RunRecord, RunState, StepStatus, Store, StoreError, now_millis};

use super::{Engine, State, run_steps};
use crate::attempt::RunOutcome;
use crate::progress::Progress;
use crate::scheduler::{ReadyQueue, SHARE_UNITS};

/// What one run asks of the engine, beside its plan.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Step names whose instances execute even when cached.
    pub force: BTreeSet<String>,
    /// Higher goes first when runs compete for the pool; equal: the earlier run first.
    pub priority: i32,
    /// The most GPUs (whole ones and shares, added up) its steps hold at once.
    pub max_gpus: Option<f64>,
}

/// Told how a run ended, once, with its final record (stored by then).
pub type OnEnd = Box<dyn FnOnce(&RunOutcome, &RunRecord) + Send>;

/// Keeps a joining run's code files in the store; why not, if it cannot. The engine only
/// passes the error on to the client, so it is whatever the caller's is.
pub type KeepCode = Box<dyn FnOnce(&Store) -> Result<(), BoxError> + Send>;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the engine refused a run that joined it (the runner goes on).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Its code files could not be kept: one changed since it was planned, or the store failed.
    #[error(transparent)]
    Code(BoxError),
    #[error("the runner could not record the run")]
    Record(#[source] StoreError),
}

impl std::fmt::Debug for Joining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joining")
            .field("recipe", &self.plan.recipe.name)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// A run another `needle run` hands the runner (see `join`): planned, not yet recorded.
pub struct Joining {
    pub plan: Plan,
    /// Run when the run is accepted.
    pub keep_code: KeepCode,
    pub sets: Vec<needle_core::recipe::SetArg>,
    pub rerun_of: Option<u64>,
    pub opts: RunOptions,
    /// Names the client's connection, for its cancel.
    pub client: u64,
    pub progress: Box<dyn Progress>,
    /// Told the run's id once it is recorded, or why it was refused.
    pub accepted: std::sync::mpsc::Sender<Result<u64, Refusal>>,
    pub on_end: OnEnd,
}

/// One run the engine executes.
pub(super) struct RunSlot {
    pub(super) plan: Plan,
    pub(super) record: RunRecord,
    /// The engine's number of its node 0.
    pub(super) first: usize,
    pub(super) opts: RunOptions,
    pub(super) progress: Box<dyn Progress>,
    pub(super) ready: ReadyQueue,
    /// Its nodes in a busy state (see [`State::busy`]).
    pub(super) busy: usize,
    /// Ctrl-Cs (or cancels from its client) so far.
    pub(super) interrupts: u32,
    /// GPU share units its running steps hold, for `max_gpus`.
    pub(super) gpu_units: u64,
    pub(super) t0: Instant,
    /// `None` once the run has ended.
    pub(super) on_end: Option<OnEnd>,
    /// The client that joined it, to find it when that client cancels.
    pub(super) client: Option<u64>,
    /// Steps (its own numbers) whose state changed since its progress was last recorded.
    pub(super) progress_dirty: Vec<usize>,
    /// Run id → its steps another run executed for it.
    pub(super) shared: BTreeMap<u64, usize>,
}

impl RunSlot {
    pub(super) fn live(&self) -> bool {
        self.on_end.is_some()
    }

    /// The GPU share units it may still take under `max_gpus`.
    pub(super) fn gpu_room(&self) -> u64 {
        match self.opts.max_gpus {
            None => u64::MAX,
            Some(max) => ((max * SHARE_UNITS as f64).round() as u64).saturating_sub(self.gpu_units),
        }
    }

    /// Its rank among runs competing for the pool: higher priority, then the earlier run.
    pub(super) fn rank(&self) -> (Reverse<i32>, u64) {
        (Reverse(self.opts.priority), self.record.id)
    }
}

/// A new run's record, before any step ran.
pub fn new_record(
    id: u64,
    plan: &Plan,
    sets: &[needle_core::recipe::SetArg],
    rerun_of: Option<u64>,
) -> RunRecord {
    RunRecord {
        id,
        recipe_name: plan.recipe.name.clone(),
        recipe_path: plan.recipe.source.path.display().to_string(),
        recipe_dir: plan.recipe.source.dir.clone(),
        recipe_text: plan.recipe.source.text.clone(),
        sets: sets
            .iter()
            .map(|s| (s.var.clone(), s.value.clone()))
            .collect(),
        rerun_of,
        started: now_millis(),
        ended: None,
        state: RunState::Running,
        arms: plan.arms.clone(),
        steps: run_steps(plan),
    }
}

impl Engine {
    /// Add a run's nodes after those of the runs before it. It starts when the loop next
    /// resolves its roots (see [`Engine::start_run`]).
    pub(super) fn add_run(
        &mut self,
        plan: Plan,
        record: RunRecord,
        opts: RunOptions,
        progress: Box<dyn Progress>,
        on_end: OnEnd,
        client: Option<u64>,
    ) -> usize {
        let r = self.runs.len();
        let first = self.nodes.len();
        let n = plan.nodes.len();
        self.run_of.extend(std::iter::repeat_n(r, n));
        self.nodes.extend(plan.nodes.iter().map(|node| {
            State::Waiting {
                missing: (node.inputs.values())
                    .flat_map(NodeInput::nodes)
                    .chain(node.gate)
                    .collect::<HashSet<_>>()
                    .len(),
            }
        }));
        self.dependents.extend(
            (plan.dependents().into_iter())
                .map(|ds| ds.into_iter().map(|d| d + first).collect::<Vec<_>>()),
        );
        self.priority.extend(plan.remaining_path());
        self.runs.push(RunSlot {
            plan,
            record,
            first,
            opts,
            progress,
            ready: ReadyQueue::default(),
            busy: 0,
            interrupts: 0,
            gpu_units: 0,
            t0: Instant::now(),
            on_end: Some(on_end),
            client,
            progress_dirty: Vec::new(),
            shared: BTreeMap::new(),
        });
        r
    }

    /// Resolve run `r`'s roots: its cached steps finish, the others become ready.
    pub(super) fn start_run(&mut self, r: usize) -> Result<(), StoreError> {
        let first = self.runs[r].first;
        let roots: Vec<usize> = (first..first + self.runs[r].plan.nodes.len())
            .filter(|&i| matches!(self.nodes[i], State::Waiting { missing: 0 }))
            .collect();
        for i in roots {
            self.resolve(i)?;
        }
        Ok(())
    }

    /// A run another `needle run` hands over: record it, and start it beside the others.
    pub(super) fn join(&mut self, joining: Joining) -> Result<(), StoreError> {
        let Joining {
            plan,
            keep_code,
            sets,
            rerun_of,
            opts,
            client,
            progress,
            accepted,
            on_end,
        } = joining;
        // The client is refused if its code cannot be kept; the runner goes on.
        if let Err(e) = keep_code(&self.store) {
            let _ = accepted.send(Err(Refusal::Code(e)));
            return Ok(());
        }
        let recorded = (self.store.next_run_id())
            .map(|id| new_record(id, &plan, &sets, rerun_of))
            .and_then(|record| self.store.put_run(&record).map(|()| record));
        let record = match recorded {
            Ok(record) => record,
            Err(e) => {
                let _ = accepted.send(Err(Refusal::Record(e)));
                return Ok(());
            }
        };
        let id = record.id;
        // A client that went away meanwhile has sent its cancel after this run: it comes next.
        let _ = accepted.send(Ok(id));
        let r = self.add_run(plan, record, opts, progress, on_end, Some(client));
        self.publish_joined();
        if self.runs[0].live() {
            let own = self.runs[0].record.id;
            let text = format!(
                "run {id} ({}) joined this runner: its steps share the pool with run {own}",
                self.runs[r].record.recipe_name
            );
            self.runs[0].progress.note(&text);
        }
        self.start_run(r)
    }

    /// A Ctrl-C or a SIGTERM to the runner. The first Ctrl-C interrupts the runner's own run,
    /// as a client's interrupts its run; with the own run over, or at a second signal, or a
    /// SIGTERM, every run is interrupted (the runner is going away).
    pub(super) fn on_signal(&mut self, terminate: bool) {
        self.signals += 1;
        let own_only = !terminate && self.signals == 1 && self.runs[0].live();
        if own_only {
            self.interrupt_run(0);
            let others = self.runs.iter().filter(|s| s.live()).count() - 1;
            if others > 0 {
                self.runs[0].progress.note(&format!(
                    "this runner goes on for the {others} run(s) that joined it; Ctrl-C again \
                     interrupts them too"
                ));
            }
            return;
        }
        for r in 0..self.runs.len() {
            if self.runs[r].live() {
                self.interrupt_run(r);
            }
        }
    }

    /// Interrupt run `r` (its client's Ctrl-C, or the client went away): its steps that no
    /// other live run waits for are stopped (SIGTERM; SIGKILL the second time), those that
    /// one does go on as that run's; its steps not started stay pending.
    pub(super) fn interrupt_run(&mut self, r: usize) {
        self.runs[r].interrupts += 1;
        let count = self.runs[r].interrupts;
        let mine: Vec<usize> = (self.running())
            .map(|(i, _)| i)
            .filter(|&i| self.run_of[i] == r)
            .collect();
        self.runs[r].progress.interrupted(count, mine.len());
        if count == 1 {
            for i in self.runs[r].ready.drain() {
                self.set_state(i, State::Waiting { missing: 0 });
                match self.hand_over(i) {
                    Some(to) => {
                        let spec = self.take_spec(to);
                        self.push_ready(to, spec);
                    }
                    None => self.forget_key(i),
                }
            }
            let first = self.runs[r].first;
            for i in first..first + self.runs[r].plan.nodes.len() {
                if matches!(self.nodes[i], State::Follower { .. }) {
                    self.unfollow(i);
                    self.finish_node(i, StepStatus::Interrupted);
                }
            }
        }
        let mut handles = Vec::new();
        for i in mine {
            match self.hand_over(i) {
                Some(to) => self.move_running(i, to),
                None => {
                    if let State::Running { attempt, .. } = &self.nodes[i] {
                        handles.extend(attempt.handle.clone());
                    }
                }
            }
        }
        self.stop(&handles, count > 1);
    }

    /// `i`'s key is no longer in flight (it was never started).
    pub(super) fn forget_key(&mut self, i: usize) {
        if let Some(key) = self.step(i).key
            && self.inflight.get(&key) == Some(&i)
        {
            self.inflight.remove(&key);
        }
    }

    /// Follower `f` stops waiting for its leader.
    pub(super) fn unfollow(&mut self, f: usize) {
        for list in self.followers.values_mut() {
            list.retain(|&x| x != f);
        }
    }

    /// `i`, of an interrupted run, leads followers: the first of them in a live run that is
    /// not interrupted becomes the leader (returned), the others follow it; followers of
    /// interrupted runs are interrupted. `None`: no live run waits for `i`.
    pub(super) fn hand_over(&mut self, i: usize) -> Option<usize> {
        let followers = self.followers.remove(&i)?;
        let (going, stopped): (Vec<usize>, Vec<usize>) = followers.into_iter().partition(|&f| {
            let s = &self.runs[self.run_of[f]];
            s.live() && s.interrupts == 0
        });
        for f in stopped {
            self.finish_node(f, StepStatus::Interrupted);
        }
        let (&to, rest) = going.split_first()?;
        let key = self.step(i).key.expect("a leader has a key");
        self.inflight.insert(key, to);
        if !rest.is_empty() {
            self.followers.insert(to, rest.to_vec());
        }
        Some(to)
    }

    /// Running `i` goes on as `to` (same key, another run): its attempt is `to`'s from now.
    pub(super) fn move_running(&mut self, i: usize, to: usize) {
        let State::Running {
            attempt: running, ..
        } = self.set_state(i, State::Waiting { missing: 0 })
        else {
            panic!("node {i} is handed over running, but does not run");
        };
        let (from_run, to_run) = (self.run_of[i], self.run_of[to]);
        let units = running.grant.gpu.units();
        self.runs[from_run].gpu_units -= units;
        self.runs[to_run].gpu_units += units;
        let attempt = self.step(i).attempts.last().cloned();
        self.step_mut(to).attempts.extend(attempt);
        self.handed.insert(i, to);
        let spec = self.take_spec(to);
        self.set_state(
            to,
            State::Running {
                spec,
                attempt: running,
            },
        );
        let n = self.step(to).attempts.len() as u32;
        let s = &mut self.runs[to_run];
        s.progress.started(&s.record.steps[to - s.first], n);
        self.finish_node(i, StepStatus::Interrupted);
    }

    pub(super) fn counts(&self, r: usize) -> RunOutcome {
        let s = &self.runs[r];
        let mut o = RunOutcome {
            run: s.record.id,
            state: RunState::Running,
            executed: 0,
            cached: 0,
            failed: 0,
            skipped: 0,
            interrupted: 0,
            pending: 0,
            stopped: 0,
            duration_ms: s.t0.elapsed().as_millis() as u64,
            shared: s.shared.clone(),
        };
        for step in &s.record.steps {
            match step.status {
                StepStatus::Succeeded { .. } => o.executed += 1,
                StepStatus::Cached { .. } => o.cached += 1,
                StepStatus::Failed { .. } => o.failed += 1,
                StepStatus::Skipped { .. } => o.skipped += 1,
                StepStatus::Interrupted => o.interrupted += 1,
                StepStatus::Pending => o.pending += 1,
                StepStatus::Stopped { .. } => o.stopped += 1,
            }
        }
        o
    }

    /// End every live run with no work left: store its final record, report its end.
    pub(super) fn end_idle_runs(&mut self) -> Result<(), StoreError> {
        for r in 0..self.runs.len() {
            if !self.runs[r].live() || self.runs[r].busy > 0 {
                continue;
            }
            // Its last steps may wait in a commit batch: they are Committing, so busy.
            let mut outcome = self.counts(r);
            let s = &mut self.runs[r];
            outcome.state = if s.interrupts > 0 {
                RunState::Interrupted
            } else if outcome.failed > 0 || outcome.skipped > 0 || outcome.pending > 0 {
                RunState::Failed
            } else {
                RunState::Succeeded
            };
            s.record.state = outcome.state;
            s.record.ended = Some(now_millis());
            s.progress_dirty.clear();
            let stored = self.store.put_run(&self.runs[r].record);
            let s = &mut self.runs[r];
            s.progress.done(&outcome);
            let on_end = s.on_end.take().expect("a live run has its end to report");
            on_end(&outcome, &s.record);
            if r == 0 {
                if let Some(live) = &self.live {
                    live.end();
                }
                self.own = Some(outcome);
                stored?;
                let others: Vec<String> = (self.runs.iter())
                    .filter(|s| s.live())
                    .map(|s| s.record.id.to_string())
                    .collect();
                // After a Ctrl-C, `on_signal` said so already.
                if !others.is_empty() && self.signals == 0 {
                    eprintln!(
                        "this runner goes on until run(s) {} that joined it end (Ctrl-C \
                         interrupts them)",
                        others.join(", ")
                    );
                }
            } else {
                self.publish_joined();
                if let Err(e) = stored {
                    tracing::warn!("could not store the record of run {}: {e}", outcome.run);
                }
            }
        }
        Ok(())
    }

    /// Tell readers which joined runs are going (`needle runs` shows them running).
    pub(super) fn publish_joined(&self) {
        if let Some(live) = &self.live {
            let going = (self.runs.iter().skip(1))
                .filter(|s| s.live())
                .map(|s| s.record.id);
            live.set_joined(going.collect());
        }
    }
}
