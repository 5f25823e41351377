//! `needle run RECIPE`: execute what the store does not hold yet.

use std::collections::BTreeSet;
use std::sync::Arc;

use needle_core::digest::StepKey;
use needle_core::plan::{self, Plan};
use needle_core::recipe::{Recipe, RecipeDiagnostic, RecipeErrors, RecipeSource, SetArg};
use needle_core::store::remote::{LiveRun, Server};
use needle_core::store::{RunRecord, RunState, Store, StoreRead};
use needle_ops::Registry;

use crate::attempt::RunOutcome;
use crate::cli::{Cli, ExecArgs, RunArgs};
use crate::commands::plan::{Predicted, predict, remote_steps};
use crate::commands::{PlannedCode, load_recipe, print_json, read_recipe, store_root};
use crate::engine::{Engine, EngineOptions, RunOptions, new_record};
use crate::error::{CliError, Exit};
use crate::gpu_usage::Sampler;
use crate::gpus::Gpu;
use crate::join::client::{Executes, open_or_join};
use crate::join::server::JoinServer;
use crate::join::{JoinRequest, PROTOCOL, PoolSpec};
use crate::mps::Mps;
use crate::progress;
use crate::remote::{self, Remote, Transfer, Uploader};
use crate::report::search::Decisions;
use crate::scheduler::gb_to_mb;

pub fn run(cli: &Cli, args: &RunArgs) -> Result<Exit, CliError> {
    let source = read_recipe(&args.recipe.recipe)?;
    let registry = Registry::new();
    let (recipe, expansion) = load_recipe(source, &args.recipe.sets, &registry)?;
    let opts = engine_options(&args.exec, &recipe)?;
    let remote = Remote::from_args(&args.exec.remote, args.exec.config.as_deref())?;
    // Planned before the store opens: every error of a recipe leaves the store untouched.
    let mut code = PlannedCode::default();
    let plan = plan::build(recipe, expansion, &mut code)?;
    let request = RunRequest {
        sets: &args.recipe.sets,
        rerun_of: None,
        json: args.exec.json,
        remote,
    };
    run_or_join(cli, plan, code, opts, request)
}

/// What a run is asked for beside its plan and pool.
pub struct RunRequest<'a> {
    pub sets: &'a [SetArg],
    /// The run this one reruns.
    pub rerun_of: Option<u64>,
    pub json: bool,
    /// The shared cache of a run that executes here (a run that joins uses the runner's).
    pub remote: Option<Remote>,
}

/// Execute `plan` here, holding the store; or, when a runner holds it, hand the run to that
/// runner and follow it there (see `join`).
pub fn run_or_join(
    cli: &Cli,
    plan: Plan,
    code: PlannedCode,
    opts: EngineOptions,
    run: RunRequest<'_>,
) -> Result<Exit, CliError> {
    let RunRequest {
        sets,
        rerun_of,
        json,
        remote,
    } = run;
    let request = JoinRequest {
        protocol: PROTOCOL,
        recipe_path: plan.recipe.source.path.clone(),
        recipe_dir: plan.recipe.source.dir.clone(),
        recipe_text: plan.recipe.source.text.clone(),
        sets: (sets.iter())
            .map(|s| (s.var.clone(), s.value.clone()))
            .collect(),
        rerun_of,
        pool: pool_spec(&opts),
        force: opts.run.force.iter().cloned().collect(),
        priority: opts.run.priority,
        max_gpus: opts.run.max_gpus,
    };
    match open_or_join(&store_root(cli)?, cli.wait, &request)? {
        Executes::Here(store) => {
            code.keep_in(&store)?;
            execute(*store, plan, sets, opts, rerun_of, json, remote)
        }
        Executes::Joined(joined) => {
            let (outcome, record) = joined.follow(plan.nodes.len())?;
            report_end(&outcome, &record, json, None);
            Ok(exit_code(&outcome))
        }
    }
}

/// What a run's pool is made of, for a runner deciding whether a run may share it.
fn pool_spec(opts: &EngineOptions) -> PoolSpec {
    PoolSpec {
        executor: if opts.slurm.is_some() {
            "slurm"
        } else {
            "local"
        }
        .into(),
        gpus: opts.gpus.iter().map(|g| g.id.clone()).collect(),
        gpu_mem_mb: opts.gpus.iter().map(|g| g.mem_mb).collect(),
        cpus: opts.cpus,
        mps: opts.mps.is_some(),
    }
}

/// Resources and forced steps for a run, checked against the recipe before anything runs.
pub fn engine_options(exec: &ExecArgs, recipe: &Recipe) -> Result<EngineOptions, CliError> {
    let slurm = crate::config::executor(exec)?;
    // Slurm places the GPUs of its jobs; this machine's are not the run's.
    let gpus = if slurm.is_none() {
        exec.gpus.resolve(exec.gpu_mem)
    } else {
        Vec::new()
    };
    let cpus = exec
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
        .max(1);
    let mem_mb = total_memory_mb();
    // Slurm checks a job's resources against the cluster when it is submitted.
    if slurm.is_none() {
        check_resources(recipe, &gpus, mem_mb)?;
    }
    if gpus.is_empty() && slurm.is_none() {
        let wanting: Vec<String> = recipe
            .steps
            .iter()
            .filter(|s| !s.resources.gpus.is_none())
            .map(|s| format!("`{}`", s.name))
            .collect();
        if !wanting.is_empty() {
            eprintln!(
                "note: no GPU in this run: {} {} on the CPU (--gpus gives a run GPUs)",
                wanting.join(", "),
                if wanting.len() == 1 { "runs" } else { "run" }
            );
        }
    }
    let names: BTreeSet<&str> = recipe.steps.iter().map(|s| s.name.as_str()).collect();
    for f in &exec.force {
        if !names.contains(f.as_str()) {
            let known: Vec<&str> = names.iter().copied().collect();
            return Err(CliError::usage(format!(
                "--force `{f}`: no such step in recipe `{}` (steps: {})",
                recipe.name,
                known.join(", ")
            )));
        }
    }
    let mps = match (exec.mps, &slurm, gpus.is_empty()) {
        (false, _, _) => None,
        (true, Some(_), _) => {
            return Err(CliError::usage(
                "--mps starts an MPS server on this machine, and Slurm runs the steps elsewhere \
                 (hint: ask the cluster for its MPS or shard GRES with --sbatch-arg)",
            ));
        }
        (true, None, true) => {
            return Err(CliError::usage(
                "--mps: this run has no GPU (hint: --gpus gives a run GPUs)",
            ));
        }
        (true, None, false) => Some(Arc::new(Mps::start()?)),
    };
    if let Some(max) = exec.max_gpus
        && !gpus.is_empty()
        && let Some(step) = (recipe.steps.iter()).find(|s| gpu_amount(&s.resources.gpus) > max)
    {
        return Err(CliError::usage(format!(
            "--max-gpus {max}: step `{}` asks for more ({}), so it could never start",
            step.name,
            gpu_amount(&step.resources.gpus)
        )));
    }
    Ok(EngineOptions {
        slurm,
        gpus,
        cpus,
        mem_mb,
        mps,
        run: RunOptions {
            force: exec.force.iter().cloned().collect(),
            priority: exec.priority,
            max_gpus: exec.max_gpus,
        },
    })
}

/// How many GPUs a step holds, shares counted as parts of one (as `--max-gpus` counts).
fn gpu_amount(r: &needle_core::recipe::GpuRequest) -> f64 {
    use needle_core::recipe::GpuRequest;
    match *r {
        GpuRequest::None => 0.0,
        GpuRequest::Whole { count, .. } => count as f64,
        GpuRequest::Part { share, .. } => share.unwrap_or(0.0),
    }
}

/// A step asking for more GPUs, GPU memory or memory than the run has can never start: say
/// so up front, at the line that asks. A run without any GPU is the exception: its steps run
/// on the CPU (see `Shape::of`).
pub fn check_resources(recipe: &Recipe, gpus: &[Gpu], mem_mb: u64) -> Result<(), CliError> {
    let mut problems = Vec::new();
    for step in &recipe.steps {
        let at = |key: &str| step.resource_spans.get(key).unwrap_or(&step.span).clone();
        let r = &step.resources;
        if !gpus.is_empty() && r.gpus.whole() as usize > gpus.len() {
            problems.push(
                RecipeDiagnostic::at(
                    at("gpus"),
                    format!(
                        "step `{}` asks for {} GPU(s), but this run has {}",
                        step.name,
                        r.gpus.whole(),
                        gpus.len()
                    ),
                )
                .with_help("--gpus N hands out N GPU ids; `gpus = 0.5` asks for part of one"),
            );
        }
        if let (false, Some(gb)) = (gpus.is_empty(), r.gpus.mem_gb())
            && let Some(problem) = gpu_memory_problem(gpus, gb)
        {
            problems.push(
                RecipeDiagnostic::at(
                    at("gpu_mem_gb"),
                    format!(
                        "step `{}` asks for {gb} GB of GPU memory, but {problem}",
                        step.name
                    ),
                )
                .with_help(
                    "--gpu-mem GB states each GPU's memory; `gpus = 0.5` without `gpu_mem_gb` \
                     packs by share alone",
                ),
            );
        }
        let want_mb = gb_to_mb(r.mem_gb);
        if want_mb > mem_mb {
            problems.push(RecipeDiagnostic::at(
                at("mem_gb"),
                format!(
                    "step `{}` asks for {} GB of memory, but this machine has {:.1} GB",
                    step.name,
                    r.mem_gb,
                    mem_mb as f64 / 1024.0
                ),
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RecipeErrors::new(&recipe.source, problems).into())
    }
}

/// Why no GPU of the run can give a step `gb` of its memory, if none can.
fn gpu_memory_problem(gpus: &[Gpu], gb: f64) -> Option<String> {
    let want = gb_to_mb(gb);
    let known: Vec<u64> = gpus.iter().filter_map(|g| g.mem_mb).collect();
    if known.iter().any(|&m| m >= want) {
        return None;
    }
    let unknown: Vec<&str> = (gpus.iter())
        .filter(|g| g.mem_mb.is_none())
        .map(|g| g.id.as_str())
        .collect();
    Some(match known.iter().max() {
        None => format!(
            "the memory of this run's GPUs ({}) is not known",
            unknown.join(", ")
        ),
        Some(&largest) => format!("the largest GPU of this run has {}", fmt_gb(largest)),
    })
}

/// MB as GB, as a person writes it: `80 GB`, `39.5 GB`.
pub fn fmt_gb(mb: u64) -> String {
    let gb = mb as f64 / 1024.0;
    if (gb - gb.round()).abs() < 0.05 {
        format!("{} GB", gb.round())
    } else {
        format!("{gb:.1} GB")
    }
}

fn total_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(u64::MAX / 2, |kb| kb / 1024)
}

/// Record and execute a plan, and the runs that join it meanwhile; print the summary when the
/// plan's own run ends; map its outcome to an exit code.
pub fn execute(
    store: Store,
    plan: Plan,
    sets: &[SetArg],
    opts: EngineOptions,
    rerun_of: Option<u64>,
    json: bool,
    remote: Option<Remote>,
) -> Result<Exit, CliError> {
    let store = Arc::new(store);
    let uploader = remote.and_then(|r| share(&store, &plan, r));
    let record = new_record(store.next_run_id()?, &plan, sets, rerun_of);
    let total = plan.nodes.len();
    let live = Arc::new(LiveRun::new(record.id));
    let server = serve_reads(&store, &live);
    let pool = pool_spec(&opts);
    // The GPUs of a local run are sampled beside it, on a thread of its own (`gpu_usage`).
    let local_gpus: Vec<String> = if opts.slurm.is_some() {
        Vec::new()
    } else {
        opts.gpus.iter().map(|g| g.id.clone()).collect()
    };
    let sampler = Sampler::start(store.clone(), record.id, record.started, &local_gpus);
    let mut engine = Engine::new(
        store.clone(),
        plan,
        record,
        opts,
        progress::for_stderr(total),
        Box::new({
            let store = store.clone();
            move |outcome, record| report_end(outcome, record, json, Some(&*store))
        }),
    )
    .with_live(live.clone());
    if let Some(uploader) = &uploader {
        engine = engine.on_committed(uploader.sender());
    }
    let joins = serve_joins(store.root(), pool, &engine);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Io {
            context: "could not start the async runtime".into(),
            source,
        })?;
    let started = runtime.block_on(engine.start_executor()).map_err(|e| {
        CliError::usage(format!(
            "the Slurm executor cannot reach Slurm: {} (hint: are the Slurm client commands on PATH, and slurmctld up? `sinfo` should answer)",
            needle_core::error_chain::joined(&e, ": ")
        ))
    });
    let ended = match started {
        Ok(()) => runtime.block_on(engine.execute()).map_err(CliError::from),
        Err(e) => Err(e),
    };
    // Runs that come from now on wait for the store to be free, and run themselves.
    if let Some(joins) = &joins {
        joins.ending();
    }
    if let Some(sampler) = sampler {
        sampler.stop();
    }
    // The final record is stored (or the run failed to store it): readers read the store
    // from now on. The server's threads are done with the store once it is dropped.
    live.end();
    drop(server);
    if let Some(uploader) = uploader {
        report_uploads(uploader);
    }
    drop(store);
    drop(joins);
    Ok(exit_code(&ended?))
}

fn exit_code(outcome: &RunOutcome) -> Exit {
    match outcome.state {
        RunState::Succeeded => Exit::Success,
        RunState::Interrupted => Exit::Interrupted,
        RunState::Failed | RunState::Running => Exit::StepFailed,
    }
}

/// A run's summary, as text or (`--json`) JSON on stdout; with the store, a search's outcome
/// too.
fn report_end(
    outcome: &RunOutcome,
    record: &RunRecord,
    json: bool,
    store: Option<&dyn needle_core::store::StoreRead>,
) {
    if json {
        print_json(&summary_json(outcome, record));
        return;
    }
    print_summary(outcome, record);
    let search = store.and_then(|s| Decisions::read(s, record).ok());
    if let Some(line) = search.and_then(|d| d.line(record)) {
        println!("  {line} · needle results {}", record.id);
    }
}

/// Take runs that other `needle run`s hand this runner. Without it they wait for this run, or
/// fail naming it: no reason to fail the run.
fn serve_joins(root: &std::path::Path, pool: PoolSpec, engine: &Engine) -> Option<JoinServer> {
    match JoinServer::start(root, pool, engine.events()) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!("other runs cannot join this one: {e}");
            None
        }
    }
}

/// Before a run: fetch what the remote holds of the plan, so the run finds it cached; then
/// start uploading what the run commits, and what this store holds that the remote lacks.
/// A remote that does not answer is warned about, and the run goes on without it.
fn share(store: &Arc<Store>, plan: &Plan, remote: Remote) -> Option<Uploader> {
    let index = remote::index_or_warn(&remote)?;
    let predicted = match predict(plan, Some(&**store as &dyn StoreRead), Some(&index)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warning: could not plan against the remote: {e}");
            return None;
        }
    };
    let wanted = remote_steps(&predicted);
    if !wanted.is_empty() {
        let transfer = Transfer::new("pulled", false);
        let pulled = remote::block_on(remote::pull_steps(&remote, store, &wanted, &transfer));
        eprintln!(
            "remote {}: fetched {} step(s) ({})",
            remote.url(),
            pulled.steps.len(),
            transfer.summary()
        );
        for (key, e) in &pulled.failed {
            eprintln!(
                "warning: step {} not fetched: {}; it executes here instead",
                key.short(),
                remote::error_chain(e)
            );
        }
    }
    if !remote.upload {
        return None;
    }
    let local: Vec<StepKey> = (predicted.iter())
        .filter_map(|p| match p {
            Predicted::Cached { key, .. } if index.output(key).is_none() => Some(*key),
            _ => None,
        })
        .collect();
    let uploader = Uploader::start(remote, store.clone(), index);
    for key in local {
        uploader.send(key);
    }
    Some(uploader)
}

/// Wait for a run's uploads; say what they did, and warn of what they could not.
fn report_uploads(uploader: Uploader) {
    let (pushed, transfer) = uploader.finish();
    if pushed.written > 0 || !pushed.failed.is_empty() {
        eprintln!(
            "remote: uploaded {} step(s) ({})",
            pushed.written,
            transfer.summary()
        );
    }
    if let Some((key, e)) = pushed.failed.first() {
        eprintln!(
            "warning: {} step(s) not uploaded (first: step {}: {}); `needle push` uploads \
             them later",
            pushed.failed.len(),
            key.short(),
            remote::error_chain(e)
        );
    }
}

/// Answer the read-only commands (`show`, `status`, `plan`…) on the store's socket while the
/// run holds the store. Without it they wait for the run, so failing to serve is no reason
/// to fail the run.
fn serve_reads(store: &Arc<Store>, live: &Arc<LiveRun>) -> Option<Server> {
    match Server::start(store.clone(), live.clone()) {
        Ok(server) => Some(server),
        Err(e) => {
            let cause = std::error::Error::source(&e).map(|s| format!(": {s}"));
            tracing::warn!(
                "read-only commands cannot read the store during this run: {e}{}",
                cause.unwrap_or_default()
            );
            None
        }
    }
}

fn summary_json(o: &RunOutcome, record: &RunRecord) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = record
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "bindings": s.bindings,
                "key": s.key,
                "status": s.status.label(),
                "output": s.status.output(),
                "attempts": s.attempts.len(),
            })
        })
        .collect();
    serde_json::json!({
        "run": o.run,
        "recipe": record.recipe_name,
        "state": o.state,
        "executed": o.executed,
        "cached": o.cached,
        "failed": o.failed,
        "skipped": o.skipped,
        "interrupted": o.interrupted,
        "pending": o.pending,
        "stopped": o.stopped,
        "duration_ms": o.duration_ms,
        "shared": o.shared,
        "steps": steps,
    })
}

fn print_summary(o: &RunOutcome, record: &RunRecord) {
    let total = record.steps.len();
    let took = needle_core::store::fmt_ms(o.duration_ms);
    let state = match o.state {
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Interrupted => "interrupted",
        RunState::Running => "running",
    };
    println!("run {} ({}): {state} in {took}", o.run, record.recipe_name);
    if o.executed == 0 && o.cached == total {
        println!("  nothing to do: all {total} steps were cached");
    } else {
        let mut parts = vec![
            format!("{} executed", o.executed),
            format!("{} cached", o.cached),
        ];
        for (n, what) in [
            (o.failed, "failed"),
            (o.skipped, "skipped"),
            (o.interrupted, "interrupted"),
            (o.pending, "not started"),
            (o.stopped, "stopped by the search"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        println!("  {} of {total} steps", parts.join(" · "));
    }
    for (run, n) in &o.shared {
        println!("  {n} of the cached executed once for this run and run {run} (same keys)");
    }
    if o.failed > 0 || o.interrupted > 0 || o.pending > 0 {
        println!(
            "  details: needle status {}    after a fix: needle rerun {}",
            o.run, o.run
        );
    } else {
        println!("  details: needle status {}", o.run);
    }
}

/// The source of a recorded run, as it was run.
pub fn recorded_source(record: &RunRecord) -> RecipeSource {
    RecipeSource {
        path: record.recipe_path.clone().into(),
        dir: record.recipe_dir.clone(),
        text: record.recipe_text.clone(),
    }
}
