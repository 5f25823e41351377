//! `needle status RUN`: the steps of one run and how each ended.

use needle_core::store::{StepStatus, fmt_ms};

use crate::cli::{Cli, StatusArgs};
use crate::commands::runs::state_label;
use crate::commands::{find_run, fmt_time, open_existing, print_json};
use crate::error::{CliError, Exit};
use crate::progress::step_label;

pub fn status(cli: &Cli, args: &StatusArgs) -> Result<Exit, CliError> {
    let store = open_existing(cli)?;
    let run = find_run(&store, &args.run)?;
    if args.json {
        let steps: Vec<serde_json::Value> = run
            .steps
            .iter()
            .map(|s| {
                let arms: Vec<&str> = s
                    .arms
                    .iter()
                    .map(|&a| run.arms[a as usize].id.as_str())
                    .collect();
                serde_json::json!({
                    "name": s.name,
                    "op": s.op,
                    "bindings": s.bindings,
                    "arms": arms,
                    "id": s.id,
                    "key": s.key,
                    "status": s.status.label(),
                    "output": s.status.output(),
                    "detail": detail(&s.status),
                    "attempts": s.attempts,
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "run": run.id,
            "recipe": run.recipe_name,
            "path": run.recipe_path,
            "state": state_label(run.state),
            "started": fmt_time(run.started),
            "ended": run.ended.map(fmt_time),
            "rerun_of": run.rerun_of,
            "sets": run.sets.iter().map(|(k, v)| serde_json::json!({"var": k, "value": v})).collect::<Vec<_>>(),
            "arms": run.arms,
            "steps": steps,
        }));
        return Ok(Exit::Success);
    }

    let took = run
        .ended
        .map(|e| format!(" in {}", fmt_ms(e.saturating_sub(run.started))))
        .unwrap_or_default();
    println!(
        "run {} of `{}` ({}): {}{took}, started {}",
        run.id,
        run.recipe_name,
        run.recipe_path,
        state_label(run.state),
        fmt_time(run.started)
    );
    if let Some(of) = run.rerun_of {
        println!("  rerun of run {of}");
    }
    if !run.sets.is_empty() {
        let sets: Vec<String> = run
            .sets
            .iter()
            .map(|(k, v)| format!("{k}={}", needle_core::value::render_short(v)))
            .collect();
        println!("  --set {}", sets.join(" --set "));
    }
    println!();
    println!(
        "  {:<11} {:<14} {:<44} {:>8}  detail",
        "status", "key", "step", "took"
    );
    for s in &run.steps {
        let key = s.key.map(|k| k.short()).unwrap_or_else(|| "-".into());
        let took = s
            .attempts
            .last()
            .filter(|a| a.ended >= a.started && a.ended > 0)
            .map(|a| fmt_ms(a.ended - a.started))
            .unwrap_or_default();
        let mut detail = detail(&s.status).unwrap_or_default();
        if s.attempts.len() > 1 {
            detail = format!("{} attempts {detail}", s.attempts.len());
        }
        println!(
            "  {:<11} {:<14} {:<44} {:>8}  {detail}",
            s.status.label(),
            key,
            step_label(s),
            took
        );
    }
    Ok(Exit::Success)
}

fn detail(status: &StepStatus) -> Option<String> {
    match status {
        StepStatus::Cached { output } | StepStatus::Succeeded { output } => {
            Some(format!("-> {}", output.short()))
        }
        StepStatus::Failed { reason } => Some(reason.clone()),
        StepStatus::Skipped { upstream } => Some(format!("because `{upstream}` failed")),
        StepStatus::Interrupted | StepStatus::Pending => None,
    }
}
