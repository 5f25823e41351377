//! `needle plan RECIPE`: what a run would do, before anything runs.

use std::collections::BTreeMap;

use needle_core::digest::{ArtifactDigest, StepKey};
use needle_core::plan::{self, Plan};
use needle_core::store::StoreRead;
use needle_ops::Registry;

use crate::cli::{Cli, PlanArgs};
use crate::commands::run::{check_resources, fmt_gb};
use crate::commands::{PlannedCode, load_recipe, open_reader_if_exists, print_json, read_recipe};
use crate::error::{CliError, Exit};
use crate::gpus::Gpu;
use crate::remote::{Remote, RemoteIndex};
use crate::scheduler::{GpuNeed, SHARE_UNITS};
use needle_core::recipe::GpuRequest;

/// What the plan predicts for one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predicted {
    /// Its key is in the store.
    Cached {
        key: StepKey,
        output: ArtifactDigest,
    },
    /// Its key is not in the store, and the remote (the shared cache) has it: a run fetches
    /// it instead of executing it.
    Remote {
        key: StepKey,
        output: ArtifactDigest,
    },
    /// Its inputs are known, its key is not in the store.
    Run { key: StepKey },
    /// An input has yet to be produced, so its key is not known yet. It runs unless that
    /// input comes out byte-identical to an earlier run's.
    RunAfterInputs,
}

impl Predicted {
    pub fn key(&self) -> Option<StepKey> {
        match self {
            Predicted::Cached { key, .. }
            | Predicted::Remote { key, .. }
            | Predicted::Run { key } => Some(*key),
            Predicted::RunAfterInputs => None,
        }
    }

    pub fn is_cached(&self) -> bool {
        matches!(self, Predicted::Cached { .. })
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Predicted::Remote { .. })
    }

    /// The output it will have without executing: stored here or on the remote.
    pub fn output(&self) -> Option<ArtifactDigest> {
        match self {
            Predicted::Cached { output, .. } | Predicted::Remote { output, .. } => Some(*output),
            _ => None,
        }
    }
}

/// Walk the plan in order, following cached outputs (the store's, then the remote's) as far
/// as they reach.
pub fn predict(
    plan: &Plan,
    store: Option<&dyn StoreRead>,
    remote: Option<&RemoteIndex>,
) -> Result<Vec<Predicted>, CliError> {
    let mut outputs: Vec<Option<ArtifactDigest>> = vec![None; plan.nodes.len()];
    let mut out = Vec::with_capacity(plan.nodes.len());
    for (i, node) in plan.nodes.iter().enumerate() {
        let Some(spec) = node.spec(|u| outputs[u]) else {
            out.push(Predicted::RunAfterInputs);
            continue;
        };
        let key = spec.key();
        let record = match store {
            Some(s) => s.step(&key)?,
            None => None,
        };
        match record {
            Some(r) => {
                outputs[i] = Some(r.output);
                out.push(Predicted::Cached {
                    key,
                    output: r.output,
                });
            }
            None => match remote.and_then(|r| r.output(&key)) {
                Some(output) => {
                    outputs[i] = Some(output);
                    out.push(Predicted::Remote { key, output });
                }
                None => out.push(Predicted::Run { key }),
            },
        }
    }
    Ok(out)
}

/// The distinct steps a run would fetch from the remote: key and output, in plan order.
pub fn remote_steps(predicted: &[Predicted]) -> Vec<(StepKey, ArtifactDigest)> {
    let mut seen = std::collections::HashSet::new();
    (predicted.iter())
        .filter_map(|p| match p {
            Predicted::Remote { key, output } => seen.insert(*key).then_some((*key, *output)),
            _ => None,
        })
        .collect()
}

pub fn plan(cli: &Cli, args: &PlanArgs) -> Result<Exit, CliError> {
    let source = read_recipe(&args.recipe.recipe)?;
    let registry = Registry::new();
    let (recipe, expansion) = load_recipe(source, &args.recipe.sets, &registry)?;
    let gpus = args.gpus.resolve(args.gpu_mem);
    check_resources(&recipe, &gpus, u64::MAX / 2)?;
    let plan = plan::build(recipe, expansion, &mut PlannedCode::default())?;
    // Planning hashes code files without storing them (`keep_in` is not called), so it reads the store
    // only: while a run holds it, through the runner, which sees what it has committed.
    let reader = open_reader_if_exists(cli)?;
    let store = reader.as_ref().map(|r| r as &dyn StoreRead);
    let remote = Remote::from_args(&args.remote, None)?;
    let index = remote.as_ref().and_then(crate::remote::index_or_warn);
    let predicted = predict(&plan, store, index.as_ref())?;
    let remote_shown = remote.is_some();
    let reasons = if args.why {
        Some(reasons(&plan, &predicted, store)?)
    } else {
        None
    };
    if args.json {
        let mut v = plan_json(&plan, &predicted);
        if let Some(remote) = &remote {
            v["remote"] = serde_json::json!({ "url": remote.url(), "reachable": index.is_some() });
        }
        v["gpus"] = packing_json(&plan, &gpus);
        if let Some(reasons) = &reasons {
            for (step, r) in v["steps"]
                .as_array_mut()
                .expect("steps")
                .iter_mut()
                .zip(reasons)
            {
                step["why"] = serde_json::json!(r);
            }
        }
        print_json(&v);
    } else {
        print_plan(&plan, &predicted, args.steps, remote_shown);
        print_packing(&plan, &gpus);
        if !args.steps {
            println!();
            println!("  `needle plan --steps` lists every unique step; `--json` for scripts.");
        }
        if let Some(reasons) = &reasons {
            print_reasons(&plan, &predicted, reasons);
        }
    }
    Ok(Exit::Success)
}

/// Per node, why it runs: nothing for a cached node, else one line per difference from the
/// closest stored step of its name (or why there is none).
fn reasons(
    plan: &Plan,
    predicted: &[Predicted],
    store: Option<&dyn StoreRead>,
) -> Result<Vec<Vec<String>>, CliError> {
    let outputs: Vec<Option<ArtifactDigest>> = predicted.iter().map(Predicted::output).collect();
    let mut out = Vec::with_capacity(plan.nodes.len());
    let mut named: BTreeMap<&str, Vec<needle_core::store::StepRecord>> = BTreeMap::new();
    for (node, p) in plan.nodes.iter().zip(predicted) {
        let lines = match p {
            Predicted::Cached { .. } | Predicted::Remote { .. } => Vec::new(),
            Predicted::RunAfterInputs => {
                let upstream: Vec<String> = node
                    .inputs
                    .values()
                    .flat_map(|i| i.nodes())
                    .filter(|&u| predicted[u].output().is_none())
                    .map(|u| format!("`{}`", plan.nodes[u].display_name()))
                    .collect();
                vec![format!(
                    "its inputs are not made yet: {} run first (it is cached after all if they come out as before)",
                    upstream.join(", ")
                )]
            }
            Predicted::Run { .. } => {
                let spec = node
                    .spec(|u| outputs[u])
                    .expect("a Run node's inputs are known");
                match store {
                    Some(store) => {
                        // One scan of the store per step name, however many arms it has.
                        if !named.contains_key(node.name.as_str()) {
                            named.insert(node.name.as_str(), store.steps_named(&node.name)?);
                        }
                        crate::commands::why::Reason::find(
                            &named[node.name.as_str()],
                            &node.bindings,
                            &spec,
                            None,
                        )
                        .lines(&node.name, Some(store))
                    }
                    None => vec!["there is no store yet: nothing ran before".into()],
                }
            }
        };
        out.push(lines);
    }
    Ok(out)
}

fn print_reasons(plan: &Plan, predicted: &[Predicted], reasons: &[Vec<String>]) {
    println!();
    println!("  why each step runs:");
    for ((node, p), lines) in plan.nodes.iter().zip(predicted).zip(reasons) {
        if p.output().is_some() {
            continue;
        }
        println!("  {}", node.display_name());
        for line in lines {
            println!("    - {line}");
        }
    }
}

fn plan_json(plan: &Plan, predicted: &[Predicted]) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = plan
        .nodes
        .iter()
        .zip(predicted)
        .map(|(node, p)| {
            let output = p.output();
            let status = match p {
                Predicted::Cached { .. } => "cached",
                Predicted::Remote { .. } => "remote",
                _ => "pending",
            };
            serde_json::json!({
                "name": node.name,
                "op": node.op,
                "id": node.id,
                "key": p.key(),
                "arm": node.bindings,
                "arms": plan.arm_ids(node),
                "status": status,
                "output": output,
                "inputs": node.inputs.iter().map(|(k, v)| (k.clone(), v.nodes().iter().map(|&i| plan.nodes[i].id).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
            })
        })
        .collect();
    let cached = predicted.iter().filter(|p| p.is_cached()).count();
    let remote = predicted.iter().filter(|p| p.is_remote()).count();
    serde_json::json!({
        "recipe": plan.recipe.name,
        "arms": plan.arms,
        "steps": steps,
        "summary": {
            "arms": plan.arms.len(),
            "instances": plan.instances,
            "unique": plan.nodes.len(),
            "cached": cached,
            "remote": remote,
            "to_run": plan.nodes.len() - cached - remote,
        },
    })
}

/// What a `[search]` will do, as far as the plan can tell: how many arms each rung keeps, and
/// about how many steps run if the arms are as alike as their counts (a node of a later rung
/// runs with the chance that one of its arms is kept).
fn search_line(plan: &Plan) -> Option<String> {
    let search = plan.recipe.search.as_ref()?;
    let arm_key = |a: u32| search.arm_key(&plan.arms[a as usize].bindings);
    let n0 = (0..plan.arms.len() as u32)
        .map(arm_key)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let mut live = vec![n0];
    for _ in 1..search.rungs.len() {
        live.push(search.kept_of(*live.last().expect("one rung at least")));
    }
    let expected: f64 = (plan.nodes.iter())
        .map(|node| {
            let rung = (node.bindings.get(&search.budget)).and_then(|b| search.rung_of(b));
            match rung {
                None | Some(0) => 1.0,
                Some(r) => {
                    let mine = (node.arms.iter().map(|&a| arm_key(a)))
                        .collect::<std::collections::HashSet<_>>()
                        .len();
                    (mine as f64 * live[r] as f64 / n0 as f64).min(1.0)
                }
            }
        })
        .sum();
    let rungs: Vec<String> = search
        .rungs
        .iter()
        .map(needle_core::value::render_short)
        .collect();
    let arms: Vec<String> = live.iter().map(usize::to_string).collect();
    Some(format!(
        "search: successive halving by `{}.{}` ({} is better), keeping {} at each rung: {} arms at {} = {}; about {} of the {} steps run",
        search.metric_step,
        search.metric_field,
        if search.maximize { "higher" } else { "lower" },
        search.keep,
        arms.join(" → "),
        search.budget,
        rungs.join(", "),
        expected.round(),
        plan.nodes.len()
    ))
}

/// `remote_shown`: a remote is configured, so its column is shown (even when it holds none).
fn print_plan(plan: &Plan, predicted: &[Predicted], every_step: bool, remote_shown: bool) {
    let cached = predicted.iter().filter(|p| p.is_cached()).count();
    let remote = predicted.iter().filter(|p| p.is_remote()).count();
    let remote_part = if remote_shown {
        format!(" · {remote} remote")
    } else {
        String::new()
    };
    println!(
        "plan for `{}` ({})",
        plan.recipe.name,
        plan.recipe.source.path.display()
    );
    println!(
        "  {} arm(s) · {} step instances · {} unique steps · {cached} cached{remote_part} · {} to run",
        plan.arms.len(),
        plan.instances,
        plan.nodes.len(),
        plan.nodes.len() - cached - remote
    );
    if let Some(line) = search_line(plan) {
        println!("  {line}");
    }
    println!();
    if every_step {
        println!("  {:<7} {:<14} {:<40} arms", "status", "key", "step");
        for (node, p) in plan.nodes.iter().zip(predicted) {
            let (status, key) = match p {
                Predicted::Cached { key, .. } => ("cached", key.short()),
                Predicted::Remote { key, .. } => ("remote", key.short()),
                Predicted::Run { key } => ("run", key.short()),
                Predicted::RunAfterInputs => ("run", "(after inputs)".to_string()),
            };
            println!(
                "  {status:<7} {key:<14} {:<40} {}",
                node.display_name(),
                node.arms.len()
            );
        }
        return;
    }
    // One line per recipe step: how many unique instances, and how the sweep shares them.
    let name_w = plan
        .recipe
        .steps
        .iter()
        .map(|d| d.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let op_w = plan
        .recipe
        .steps
        .iter()
        .map(|d| d.op.len())
        .max()
        .unwrap_or(2)
        .max(2);
    let remote_head = if remote_shown {
        format!(" {:>7}", "remote")
    } else {
        String::new()
    };
    println!(
        "  {:<name_w$} {:<op_w$} {:>6} {:>7}{remote_head} {:>7}  shared",
        "step", "op", "unique", "cached", "to run"
    );
    for (s, def) in plan.recipe.steps.iter().enumerate() {
        let nodes: Vec<usize> = (0..plan.nodes.len())
            .filter(|&i| plan.nodes[i].step == s)
            .collect();
        let c = nodes.iter().filter(|&&i| predicted[i].is_cached()).count();
        let r = nodes.iter().filter(|&&i| predicted[i].is_remote()).count();
        let shared = sharing(plan, &nodes);
        let remote_cell = if remote_shown {
            format!(" {r:>7}")
        } else {
            String::new()
        };
        println!(
            "  {:<name_w$} {:<op_w$} {:>6} {:>7}{remote_cell} {:>7}  {shared}",
            def.name,
            def.op,
            nodes.len(),
            c,
            nodes.len() - c - r
        );
    }
}

/// How many instances of a step asking for `need` fit on the run's GPUs at once (CPU slots
/// and memory aside), and how many on each GPU where it shares one.
fn fit(need: GpuNeed, gpus: &[Gpu]) -> (u64, Option<u64>) {
    match need {
        GpuNeed::None => (0, None),
        GpuNeed::Whole { count, mem_mb } => {
            let eligible = (gpus.iter())
                .filter(|g| mem_mb == 0 || g.mem_mb.is_some_and(|m| m >= mem_mb))
                .count() as u64;
            (eligible / count.max(1) as u64, None)
        }
        GpuNeed::Part { units, mem_mb } => {
            let on = |g: &Gpu| {
                let by_share = (units > 0).then(|| (SHARE_UNITS / units) as u64);
                let by_mem = (mem_mb > 0).then(|| g.mem_mb.map_or(0, |m| m / mem_mb));
                match (by_share, by_mem) {
                    (Some(a), Some(b)) => a.min(b),
                    (Some(a), None) | (None, Some(a)) => a,
                    (None, None) => 0,
                }
            };
            let per: Vec<u64> = gpus.iter().map(on).collect();
            let uniform = per.windows(2).all(|w| w[0] == w[1]);
            (
                per.iter().sum(),
                uniform.then(|| per.first().copied()).flatten(),
            )
        }
    }
}

/// The run's GPUs and how each recipe step that asks for GPUs packs onto them.
fn print_packing(plan: &Plan, gpus: &[Gpu]) {
    let asking: Vec<_> = (plan.recipe.steps.iter())
        .filter(|d| !d.resources.gpus.is_none())
        .collect();
    if asking.is_empty() {
        return;
    }
    println!();
    if gpus.is_empty() {
        println!(
            "  no GPU in this run: steps asking for GPUs run on the CPU (--gpus gives a run GPUs)"
        );
    } else {
        let ids: Vec<&str> = gpus.iter().map(|g| g.id.as_str()).collect();
        let mems: Vec<String> = gpus
            .iter()
            .map(|g| g.mem_mb.map_or("memory unknown".into(), fmt_gb))
            .collect();
        let mem = if mems.len() == 1 {
            mems[0].clone()
        } else if mems.windows(2).all(|w| w[0] == w[1]) {
            format!("{} each", mems[0])
        } else {
            mems.join(", ")
        };
        println!("  {} GPU(s): {} ({mem})", gpus.len(), ids.join(", "));
        let name_w = asking
            .iter()
            .map(|d| d.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let labels: Vec<String> = asking.iter().map(|d| d.resources.gpus.label()).collect();
        let label_w = labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(3)
            .max(3);
        for (d, label) in asking.iter().zip(&labels) {
            let (total, per) = fit(GpuNeed::of(&d.resources.gpus), gpus);
            let how = match (d.resources.gpus, per) {
                (GpuRequest::Whole { count: 1, .. }, _) => format!("a GPU alone, {total} at once"),
                (GpuRequest::Whole { count, .. }, _) => {
                    format!("{count} GPUs alone, {total} at once")
                }
                (_, Some(per)) => format!("{per} at once on each GPU, {total} in all"),
                (_, None) => format!("{total} at once in all (GPUs differ)"),
            };
            println!("    {:<name_w$} {label:<label_w$}  {how}", d.name);
        }
    }
}

fn packing_json(plan: &Plan, gpus: &[Gpu]) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = (plan.recipe.steps.iter())
        .filter(|d| !d.resources.gpus.is_none())
        .map(|d| {
            let r = d.resources.gpus;
            let (total, per) = fit(GpuNeed::of(&r), gpus);
            let share = match r {
                GpuRequest::Part { share, .. } => share,
                _ => None,
            };
            serde_json::json!({
                "step": d.name,
                "whole": r.whole(),
                "share": share,
                "gpu_mem_gb": r.mem_gb(),
                "at_once": total,
                "per_gpu": per,
            })
        })
        .collect();
    serde_json::json!({
        "devices": gpus.iter().map(|g| serde_json::json!({"id": g.id, "mem_mb": g.mem_mb})).collect::<Vec<_>>(),
        "steps": steps,
    })
}

/// "once for all 6 arms", "each by 2 arms", "one per arm".
fn sharing(plan: &Plan, nodes: &[usize]) -> String {
    let arms = plan.arms.len();
    if nodes.is_empty() || arms < 2 {
        return String::new();
    }
    let sizes: Vec<usize> = nodes.iter().map(|&i| plan.nodes[i].arms.len()).collect();
    let (min, max) = (
        *sizes.iter().min().expect("non-empty"),
        *sizes.iter().max().expect("non-empty"),
    );
    if nodes.len() == 1 && arms > 1 {
        format!("once for all {arms} arms")
    } else if max == 1 {
        "one per arm".to_string()
    } else if min == max {
        format!("each shared by {max} arms")
    } else {
        format!("shared by {min}-{max} arms")
    }
}
