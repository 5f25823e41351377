//! The engine driven by a fake executor (`fake.rs`): scheduling, retries, cancellation and
//! failure propagation, with no process started. A test and the engine share one
//! current-thread runtime, so the engine runs only while the test waits: everything one round
//! of the loop launches is in the launch channel when the test wakes (see [`round`]).

use std::sync::Arc;
use std::time::Duration;

use needle_core::plan::{self, Plan};
use needle_core::store::{LockMode, RunRecord, RunState, RunStep, StepStatus, Store};
use needle_ops::Registry;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::fake::{Fake, Launched, Script};
use super::{Engine, EngineOptions, Joining, RunOptions, Signals, new_record};
use crate::attempt::{AttemptSpec, Event, RunOutcome};
use crate::commands::{PlannedCode, load_recipe, read_recipe};
use crate::executor::Executor;
use crate::gpus::Gpu;
use crate::progress::{Progress, RunningStep};

/// A store and a recipe directory that outlive the engines run on them.
struct Bench {
    dir: tempfile::TempDir,
    store: Arc<Store>,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(&dir.path().join("store"), LockMode::Fail).expect("a store");
        Bench {
            dir,
            store: Arc::new(store),
        }
    }

    fn plan(&self, steps: &str) -> Plan {
        let path = self.dir.path().join("recipe.toml");
        std::fs::write(&path, format!("[recipe]\nname = \"fake\"\n\n{steps}")).unwrap();
        let source = read_recipe(&path).expect("the recipe reads");
        let (recipe, expansion) =
            load_recipe(source, &[], &Registry::new()).expect("the recipe is valid");
        plan::build(recipe, expansion, &mut PlannedCode::default()).expect("the recipe plans")
    }

    /// Run `steps` on `machine` with attempts ended by `script`, while `driver` plays its part
    /// (see [`Ctl`]).
    fn run<D, F>(
        &self,
        steps: &str,
        machine: EngineOptions,
        script: impl Fn(&AttemptSpec) -> Script + Send + Sync + 'static,
        driver: D,
    ) -> Ran
    where
        D: FnOnce(Ctl) -> F,
        F: Future<Output = ()>,
    {
        let plan = self.plan(steps);
        let id = self.store.next_run_id().unwrap();
        let record = new_record(id, &plan, &[], None);
        let (fake, launched) = Fake::new(script);
        let (interrupted_tx, interrupted) = unbounded_channel();
        let engine = Engine::new(
            self.store.clone(),
            plan,
            record,
            machine,
            Box::new(Quiet(Some(interrupted_tx))),
            Box::new(|_, _| {}),
        )
        .with_executor(Executor::Fake(fake.clone()));
        let (signal, signals) = unbounded_channel();
        let ctl = Ctl {
            fake: fake.clone(),
            launched,
            ctrl_c: signal,
            interrupted,
            events: engine.events(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (outcome, ()) = runtime.block_on(async {
            // A guard against a hang, not a measurement: these runs take milliseconds.
            tokio::time::timeout(Duration::from_secs(60), async {
                tokio::join!(engine.execute_with(Signals::Sent(signals)), driver(ctl))
            })
            .await
            .expect("the engine and the test finish")
        });
        let outcome = outcome.expect("the run ends without a store error");
        let record = self.store.run(id).unwrap().expect("the run is recorded");
        Ran {
            outcome,
            record,
            fake,
        }
    }
}

/// What a test's driver has while the engine runs.
struct Ctl {
    fake: Arc<Fake>,
    /// Each attempt, as it is launched.
    launched: UnboundedReceiver<Launched>,
    /// `false`: a Ctrl-C; `true`: a SIGTERM.
    ctrl_c: UnboundedSender<bool>,
    /// The runner's own run was interrupted (the how-manieth time).
    interrupted: UnboundedReceiver<u32>,
    /// The engine's events, for a run that joins.
    events: UnboundedSender<Event>,
}

/// A run's end: its outcome, its stored record, and the fake it ran on.
struct Ran {
    outcome: RunOutcome,
    record: RunRecord,
    fake: Arc<Fake>,
}

/// `cpus` CPU slots and the GPUs `gpus` (ids, memory unknown).
fn machine(cpus: u32, gpus: &[&str]) -> EngineOptions {
    EngineOptions {
        slurm: None,
        gpus: (gpus.iter())
            .map(|id| Gpu {
                id: id.to_string(),
                mem_mb: None,
            })
            .collect(),
        cpus,
        mem_mb: 1 << 20,
        mps: None,
        run: RunOptions::default(),
    }
}

/// An `exec` step (its command never runs) with the TOML fields `extra`.
fn step(name: &str, extra: &str) -> String {
    format!("[steps.{name}]\nop = \"exec\"\ncmd = [\"true\", \"{name}\"]\n{extra}\n\n")
}

/// The attempts one round of the engine's loop launched: the first to come, and those
/// launched with it.
async fn round(launched: &mut UnboundedReceiver<Launched>) -> Vec<Launched> {
    let mut round = vec![launched.recv().await.expect("the engine launches")];
    while let Ok(more) = launched.try_recv() {
        round.push(more);
    }
    round
}

fn names(round: &[Launched]) -> Vec<&str> {
    let mut names: Vec<&str> = round.iter().map(|l| l.step.as_str()).collect();
    names.sort_unstable();
    names
}

fn status<'r>(record: &'r RunRecord, name: &str) -> &'r RunStep {
    (record.steps.iter())
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
}

fn succeed(_: &AttemptSpec) -> Script {
    Script::Succeed
}

async fn nothing(_: Ctl) {}

#[test]
fn a_failure_skips_its_dependents_and_spares_its_siblings() {
    let bench = Bench::new();
    let steps = step("root", "")
        + &step("good", "inputs = { up = \"root\" }")
        + &step("bad", "inputs = { up = \"root\" }")
        + &step("after_bad", "inputs = { up = \"bad\" }");
    let script = |a: &AttemptSpec| match a.step_name.as_str() {
        "bad" => Script::Fail(3),
        _ => Script::Succeed,
    };
    let Ran {
        outcome, record, ..
    } = bench.run(&steps, machine(4, &[]), script, nothing);

    assert_eq!(outcome.state, RunState::Failed);
    assert_eq!(
        (outcome.executed, outcome.failed, outcome.skipped),
        (2, 1, 1)
    );
    assert!(matches!(
        status(&record, "good").status,
        StepStatus::Succeeded { .. }
    ));
    match &status(&record, "bad").status {
        StepStatus::Failed { reason } => assert!(reason.contains("code 3"), "{reason}"),
        other => panic!("bad: {other:?}"),
    }
    assert_eq!(
        status(&record, "after_bad").status,
        StepStatus::Skipped {
            upstream: "bad".into()
        }
    );
}

#[test]
fn a_step_is_retried_until_it_succeeds_and_fails_when_its_retries_run_out() {
    let bench = Bench::new();
    let steps = step("flaky", "retries = { count = 2, backoff = \"1ms\" }")
        + &step("hopeless", "retries = { count = 1, backoff = \"1ms\" }")
        + &step("after", "inputs = { up = \"hopeless\" }");
    let script = |a: &AttemptSpec| match (a.step_name.as_str(), a.attempt) {
        ("flaky", 3) => Script::Succeed,
        _ => Script::Fail(1),
    };
    let Ran {
        outcome,
        record,
        fake,
    } = bench.run(&steps, machine(4, &[]), script, nothing);

    assert_eq!((outcome.executed, outcome.failed), (1, 1));
    assert_eq!(outcome.skipped, 1);
    let flaky_attempts: Vec<u32> = (fake.launches().iter())
        .filter(|l| l.step == "flaky")
        .map(|l| l.attempt)
        .collect();
    assert_eq!(flaky_attempts, [1, 2, 3]);
    let flaky = status(&record, "flaky");
    assert!(matches!(flaky.status, StepStatus::Succeeded { .. }));
    assert_eq!(flaky.attempts.len(), 3);
    let hopeless = status(&record, "hopeless");
    assert!(matches!(hopeless.status, StepStatus::Failed { .. }));
    assert_eq!(hopeless.attempts.len(), 2, "one try and one retry");
}

#[test]
fn four_quarter_shares_run_together_on_one_gpu_and_a_whole_gpu_step_runs_alone() {
    let bench = Bench::new();
    let quarters: String = (["a", "b", "c", "d"].iter())
        .map(|n| step(n, "resources = { gpus = 0.25 }"))
        .collect();
    let steps = quarters + &step("whole", "resources = { gpus = 1 }");
    let hold = |_: &AttemptSpec| Script::Hold;
    let Ran { outcome, fake, .. } =
        bench.run(&steps, machine(8, &["0"]), hold, |mut ctl| async move {
            for _ in 0..2 {
                let round = round(&mut ctl.launched).await;
                match names(&round)[..] {
                    ["a", "b", "c", "d"] => {
                        for l in &round {
                            assert_eq!(l.held.gpus, ["0"]);
                            assert_eq!(l.held.gpu_share, Some(0.25));
                        }
                    }
                    ["whole"] => assert_eq!(round[0].held.gpu_share, Some(1.0)),
                    _ => panic!("launched together: {:?}", names(&round)),
                }
                for l in &round {
                    ctl.fake.end(&l.job, Script::Succeed);
                }
            }
        });
    assert_eq!(outcome.executed, 5);
    assert_eq!(fake.most_open(), 4);
}

#[test]
fn a_half_and_three_quarters_never_share_a_gpu() {
    let bench = Bench::new();
    let steps =
        step("half", "resources = { gpus = 0.5 }") + &step("most", "resources = { gpus = 0.75 }");
    let hold = |_: &AttemptSpec| Script::Hold;
    // On two GPUs they run side by side, one on each.
    let Ran { outcome, .. } = bench.run(
        &steps,
        machine(8, &["0", "1"]),
        hold,
        |mut ctl| async move {
            let round = round(&mut ctl.launched).await;
            assert_eq!(names(&round), ["half", "most"]);
            assert_ne!(round[0].held.gpus, round[1].held.gpus);
            for l in &round {
                ctl.fake.end(&l.job, Script::Succeed);
            }
        },
    );
    assert_eq!(outcome.executed, 2);
    // On one, one after the other.
    let bench = Bench::new();
    let Ran { outcome, .. } = bench.run(&steps, machine(8, &["0"]), hold, |mut ctl| async move {
        for _ in 0..2 {
            let round = round(&mut ctl.launched).await;
            assert_eq!(round.len(), 1, "together: {:?}", names(&round));
            ctl.fake.end(&round[0].job, Script::Succeed);
        }
    });
    assert_eq!(outcome.executed, 2);
}

#[test]
fn the_step_with_the_longest_path_ahead_starts_first() {
    let bench = Bench::new();
    let steps = step("short", "")
        + &step("long1", "")
        + &step("long2", "inputs = { up = \"long1\" }")
        + &step("long3", "inputs = { up = \"long2\" }");
    let hold = |_: &AttemptSpec| Script::Hold;
    let Ran { outcome, .. } = bench.run(&steps, machine(1, &[]), hold, |mut ctl| {
        async move {
            let mut order = Vec::new();
            for _ in 0..4 {
                let round = round(&mut ctl.launched).await;
                assert_eq!(round.len(), 1, "one CPU slot: {:?}", names(&round));
                order.push(round[0].step.clone());
                ctl.fake.end(&round[0].job, Script::Succeed);
            }
            // `long2` waits for `long1`'s output to be committed; the slot does not.
            assert_eq!(order, ["long1", "short", "long2", "long3"]);
        }
    });
    assert_eq!(outcome.executed, 4);
}

#[test]
fn ctrl_c_stops_the_running_step_and_leaves_the_rest_pending() {
    let bench = Bench::new();
    let steps = step("first", "") + &step("second", "inputs = { up = \"first\" }");
    let hold = |_: &AttemptSpec| Script::Hold;
    let Ran {
        outcome,
        record,
        fake,
    } = bench.run(&steps, machine(2, &[]), hold, |mut ctl| {
        async move {
            let round = round(&mut ctl.launched).await;
            assert_eq!(names(&round), ["first"]);
            // The engine stops it (SIGTERM), and the fake ends it so; nothing else starts.
            ctl.ctrl_c.send(false).unwrap();
        }
    });
    assert_eq!(outcome.state, RunState::Interrupted);
    assert_eq!(fake.stopped().len(), 1);
    assert!(!fake.stopped()[0].1, "the first Ctrl-C sends SIGTERM");
    assert_eq!((outcome.interrupted, outcome.pending), (1, 1));
    assert_eq!(status(&record, "first").status, StepStatus::Interrupted);
    assert_eq!(status(&record, "second").status, StepStatus::Pending);
}

#[test]
fn a_second_run_of_the_same_recipe_launches_nothing() {
    let bench = Bench::new();
    let steps = step("a", "") + &step("b", "inputs = { up = \"a\" }");
    let first = bench.run(&steps, machine(2, &[]), succeed, nothing);
    assert_eq!(first.outcome.executed, 2);
    let never = |a: &AttemptSpec| panic!("{} launched although cached", a.step_name);
    let second = bench.run(&steps, machine(2, &[]), never, nothing);
    assert_eq!((second.outcome.executed, second.outcome.cached), (0, 2));
    assert!(matches!(
        status(&second.record, "b").status,
        StepStatus::Cached { .. }
    ));
}

/// A second run joining the engine: `steps` planned on `bench`'s store; its outcome lands in
/// the returned slot when it ends.
fn joining(bench: &Bench, steps: &str) -> (Joining, Arc<std::sync::Mutex<Option<RunOutcome>>>) {
    let ended = Arc::new(std::sync::Mutex::new(None));
    let (accepted, _) = std::sync::mpsc::channel();
    let joining = Joining {
        plan: bench.plan(steps),
        keep_code: Box::new(|_| Ok(())),
        sets: Vec::new(),
        rerun_of: None,
        opts: RunOptions::default(),
        client: 7,
        progress: Box::new(Quiet(None)),
        accepted,
        on_end: Box::new({
            let ended = ended.clone();
            move |outcome, _| *ended.lock().unwrap() = Some(outcome.clone())
        }),
    };
    (joining, ended)
}

/// Run 1 holds `shared`; run 2 joins with `shared` and `extra`. Returns once run 2's `extra`
/// has launched (so run 2 has resolved `shared` too), with `shared`'s job.
async fn join_beside(ctl: &mut Ctl, join: Joining) -> String {
    let first = round(&mut ctl.launched).await;
    assert_eq!(names(&first), ["shared"]);
    ctl.events.send(Event::Join(Box::new(join))).unwrap();
    let second = round(&mut ctl.launched).await;
    assert_eq!(names(&second), ["extra"], "`shared` runs already");
    first[0].job.clone()
}

fn hold_shared(a: &AttemptSpec) -> Script {
    match a.step_name.as_str() {
        "shared" => Script::Hold,
        _ => Script::Succeed,
    }
}

/// Run 1 holds `shared`; run 2 joins with `shared` and `extra`; then `then` plays its part,
/// given `shared`'s job. Returns run 1's end and run 2's outcome.
fn beside_a_joined_run<F>(then: impl FnOnce(Ctl, String) -> F) -> (Ran, RunOutcome)
where
    F: Future<Output = ()>,
{
    let bench = Bench::new();
    let (join, ended) = joining(&bench, &(step("shared", "") + &step("extra", "")));
    let ran = bench.run(
        &step("shared", ""),
        machine(4, &[]),
        hold_shared,
        |mut ctl| async move {
            let job = join_beside(&mut ctl, join).await;
            then(ctl, job).await
        },
    );
    let second = ended.lock().unwrap().clone().expect("the joined run ended");
    (ran, second)
}

#[test]
fn a_step_two_runs_have_in_common_executes_once() {
    let (ran, second) = beside_a_joined_run(|ctl, job| async move {
        ctl.fake.end(&job, Script::Succeed);
    });
    assert_eq!(ran.outcome.executed, 1);
    assert_eq!((second.executed, second.cached), (1, 1));
    assert_eq!(
        second.shared,
        [(1, 1)].into(),
        "run 1 executed one step for it"
    );
    let shared_launches = (ran.fake.launches().iter())
        .filter(|l| l.step == "shared")
        .count();
    assert_eq!(shared_launches, 1);
}

#[test]
fn ctrl_c_of_one_run_hands_a_step_another_run_shares_over_instead_of_stopping_it() {
    let (ran, second) = beside_a_joined_run(|mut ctl, job| async move {
        // The first Ctrl-C interrupts the runner's own run only.
        ctl.ctrl_c.send(false).unwrap();
        assert_eq!(ctl.interrupted.recv().await, Some(1));
        // The attempt goes on, as run 2's: ending it finishes run 2's `shared`.
        ctl.fake.end(&job, Script::Succeed);
    });
    assert!(ran.fake.stopped().is_empty(), "{:?}", ran.fake.stopped());
    assert_eq!(ran.outcome.state, RunState::Interrupted);
    assert_eq!(
        status(&ran.record, "shared").status,
        StepStatus::Interrupted
    );
    assert_eq!(second.state, RunState::Succeeded);
    assert_eq!(second.executed, 2, "run 2 executed `shared` itself");
}

/// Progress that shows nothing, and tells of interruptions where asked.
struct Quiet(Option<UnboundedSender<u32>>);

impl Progress for Quiet {
    fn started(&mut self, _: &RunStep, _: u32) {}
    fn finished(&mut self, _: &RunStep, _: Option<&str>) {}
    fn reopened(&mut self, _: &RunStep) {}
    fn retrying(
        &mut self,
        _: &RunStep,
        _: &needle_core::store::AttemptResult,
        _: Duration,
        _: &[String],
    ) {
    }
    fn failed(&mut self, _: &RunStep, _: &str, _: &[String]) {}
    fn interrupted(&mut self, count: u32, _: usize) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(count);
        }
    }
    fn note(&mut self, _: &str) {}
    fn update(&mut self, _: &RunOutcome, _: &[RunningStep]) {}
    fn done(&mut self, _: &RunOutcome) {}
}
