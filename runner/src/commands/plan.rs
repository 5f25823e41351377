//! `needle plan RECIPE`: what a run would do, before anything runs.

use std::collections::BTreeMap;

use needle_core::digest::{ArtifactDigest, StepKey};
use needle_core::plan::{self, HashOnly, Plan};
use needle_core::store::StoreRead;
use needle_ops::Registry;

use crate::cli::{Cli, PlanArgs};
use crate::commands::run::check_resources;
use crate::commands::{load_recipe, open_reader_if_exists, print_json, read_recipe};
use crate::error::{CliError, Exit};

/// What the plan predicts for one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predicted {
    /// Its key is in the store.
    Cached {
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
            Predicted::Cached { key, .. } | Predicted::Run { key } => Some(*key),
            Predicted::RunAfterInputs => None,
        }
    }

    pub fn is_cached(&self) -> bool {
        matches!(self, Predicted::Cached { .. })
    }
}

/// Walk the plan in order, following cached outputs as far as they reach.
pub fn predict(plan: &Plan, store: Option<&dyn StoreRead>) -> Result<Vec<Predicted>, CliError> {
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
            None => out.push(Predicted::Run { key }),
        }
    }
    Ok(out)
}

pub fn plan(cli: &Cli, args: &PlanArgs) -> Result<Exit, CliError> {
    let source = read_recipe(&args.recipe.recipe)?;
    let registry = Registry::new();
    let (recipe, expansion) = load_recipe(source, &args.recipe.sets, &registry)?;
    check_resources(&recipe, args.gpus.resolve().len() as u32, u64::MAX / 2)?;
    let plan = plan::build(recipe, expansion, &mut HashOnly)?;
    // Planning hashes code files without storing them (`HashOnly`), so it reads the store
    // only: while a run holds it, through the runner, which sees what it has committed.
    let reader = open_reader_if_exists(cli)?;
    let store = reader.as_ref().map(|r| r as &dyn StoreRead);
    let predicted = predict(&plan, store)?;
    let reasons = if args.why {
        Some(reasons(&plan, &predicted, store)?)
    } else {
        None
    };
    if args.json {
        let mut v = plan_json(&plan, &predicted);
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
        print_plan(&plan, &predicted, args.steps);
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
    let outputs: Vec<Option<ArtifactDigest>> = predicted
        .iter()
        .map(|p| match p {
            Predicted::Cached { output, .. } => Some(*output),
            _ => None,
        })
        .collect();
    let mut out = Vec::with_capacity(plan.nodes.len());
    let mut named: BTreeMap<&str, Vec<needle_core::store::StepRecord>> = BTreeMap::new();
    for (node, p) in plan.nodes.iter().zip(predicted) {
        let lines = match p {
            Predicted::Cached { .. } => Vec::new(),
            Predicted::RunAfterInputs => {
                let upstream: Vec<String> = node
                    .inputs
                    .values()
                    .flat_map(|i| i.nodes())
                    .filter(|&u| !predicted[u].is_cached())
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
                        .lines(&node.name)
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
        if p.is_cached() {
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
            let output = match p {
                Predicted::Cached { output, .. } => Some(*output),
                _ => None,
            };
            serde_json::json!({
                "name": node.name,
                "op": node.op,
                "id": node.id,
                "key": p.key(),
                "arm": node.bindings,
                "arms": plan.arm_ids(node),
                "status": if p.is_cached() { "cached" } else { "pending" },
                "output": output,
                "inputs": node.inputs.iter().map(|(k, v)| (k.clone(), v.nodes().iter().map(|&i| plan.nodes[i].id).collect::<Vec<_>>())).collect::<BTreeMap<_, _>>(),
            })
        })
        .collect();
    let cached = predicted.iter().filter(|p| p.is_cached()).count();
    serde_json::json!({
        "recipe": plan.recipe.name,
        "arms": plan.arms,
        "steps": steps,
        "summary": {
            "arms": plan.arms.len(),
            "instances": plan.instances,
            "unique": plan.nodes.len(),
            "cached": cached,
            "to_run": plan.nodes.len() - cached,
        },
    })
}

fn print_plan(plan: &Plan, predicted: &[Predicted], every_step: bool) {
    let cached = predicted.iter().filter(|p| p.is_cached()).count();
    println!(
        "plan for `{}` ({})",
        plan.recipe.name,
        plan.recipe.source.path.display()
    );
    println!(
        "  {} arm(s) · {} step instances · {} unique steps · {cached} cached · {} to run",
        plan.arms.len(),
        plan.instances,
        plan.nodes.len(),
        plan.nodes.len() - cached
    );
    println!();
    if every_step {
        println!("  {:<7} {:<14} {:<40} arms", "status", "key", "step");
        for (node, p) in plan.nodes.iter().zip(predicted) {
            let (status, key) = match p {
                Predicted::Cached { key, .. } => ("cached", key.short()),
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
    println!(
        "  {:<name_w$} {:<op_w$} {:>6} {:>7} {:>7}  shared",
        "step", "op", "unique", "cached", "to run"
    );
    for (s, def) in plan.recipe.steps.iter().enumerate() {
        let nodes: Vec<usize> = (0..plan.nodes.len())
            .filter(|&i| plan.nodes[i].step == s)
            .collect();
        let c = nodes.iter().filter(|&&i| predicted[i].is_cached()).count();
        let shared = sharing(plan, &nodes);
        println!(
            "  {:<name_w$} {:<op_w$} {:>6} {:>7} {:>7}  {shared}",
            def.name,
            def.op,
            nodes.len(),
            c,
            nodes.len() - c
        );
    }
    println!();
    println!("  `needle plan --steps` lists every unique step; `--json` for scripts.");
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
