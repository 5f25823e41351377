//! `needle status RUN`: the steps of one run and how each ended.

use needle_core::store::{
    AttemptResult, GpuUsage, RunRecord, RunStep, StepStatus, StoreRead, fmt_ms, now_millis,
};

use crate::cli::{Cli, StatusArgs};
use crate::commands::runs::state_label;
use crate::commands::{find_run, fmt_time, gpu_label, open_reader, print_json};
use crate::error::{CliError, Exit};
use crate::gpu_usage::{self, GpuSummary};
use crate::progress::step_label;

pub fn status(cli: &Cli, args: &StatusArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let run = find_run(&store, &args.run)?;
    let live = store.is_live(run.id);
    let usage = store.gpu_usage(run.id)?;
    let gpus = usage
        .as_ref()
        .map(|u| {
            gpu_usage::summarise(
                &run,
                u,
                gpu_usage::run_end(&run, Some(u), live, now_millis()),
            )
        })
        .unwrap_or_default();
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
                    "status": step_state(s, live),
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
            "state": state_label(run.state, live),
            "started": fmt_time(run.started),
            "ended": run.ended.map(fmt_time),
            "rerun_of": run.rerun_of,
            "sets": run.sets.iter().map(|(k, v)| serde_json::json!({"var": k, "value": v})).collect::<Vec<_>>(),
            "arms": run.arms,
            "steps": steps,
            "gpu_usage": usage.as_ref().map(|u| usage_json(&run, u, &gpus)),
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
        state_label(run.state, live),
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
    // The GPU column only where some step held a GPU: CPU recipes print as before.
    let labels: Vec<String> = (run.steps.iter())
        .map(|s| match s.attempts.last() {
            Some(a) => gpu_label(&a.gpus, a.gpu_share, a.gpu_mem_gb),
            None => String::new(),
        })
        .collect();
    let gpu_w = labels.iter().map(|g| g.chars().count()).max().unwrap_or(0);
    let gpu_col = |g: &str| {
        if gpu_w == 0 {
            String::new()
        } else {
            format!("  {g:<w$}", w = gpu_w.max(3))
        }
    };
    println!(
        "  {:<11} {:<14} {:<44} {:>8}{}  detail",
        "status",
        "key",
        "step",
        "took",
        gpu_col("gpu")
    );
    // The steps a search stopped for one reason (an arm's later rungs) make one line.
    let mut stopped_for: std::collections::HashMap<&str, usize> = Default::default();
    for s in &run.steps {
        if let StepStatus::Stopped { by } = &s.status {
            *stopped_for.entry(by.as_str()).or_default() += 1;
        }
    }
    let mut shown_stop = std::collections::HashSet::new();
    for (s, gpu) in run.steps.iter().zip(&labels) {
        let mut label = step_label(s);
        if let StepStatus::Stopped { by } = &s.status {
            if !shown_stop.insert(by.as_str()) {
                continue;
            }
            let more = stopped_for[by.as_str()] - 1;
            if more > 0 {
                label = format!("{label} +{more} more");
            }
        }
        let key = s.key.map(|k| k.short()).unwrap_or_else(|| "-".into());
        let took = match s.attempts.last() {
            Some(a) if a.ended >= a.started && a.ended > 0 => fmt_ms(a.ended - a.started),
            // Under way: for how long so far.
            Some(a) if live && a.ended == 0 => fmt_ms(now_millis().saturating_sub(a.started)),
            _ => String::new(),
        };
        let mut detail = detail(&s.status).unwrap_or_default();
        if s.attempts.len() > 1 {
            detail = format!("{} attempts {detail}", s.attempts.len());
        }
        println!(
            "  {:<11} {:<14} {:<44} {:>8}{}  {detail}",
            step_state(s, live),
            key,
            label,
            took,
            gpu_col(gpu)
        );
    }
    if let Some(usage) = &usage {
        print_usage(usage, &gpus);
    }
    Ok(Exit::Success)
}

/// `gpu_usage` of `status --json`: each sampled GPU's summary and its series.
fn usage_json(run: &RunRecord, usage: &GpuUsage, gpus: &[GpuSummary]) -> serde_json::Value {
    let gpus: Vec<serde_json::Value> = gpus
        .iter()
        .zip(&usage.gpus)
        .map(|(summary, series)| {
            let mut v = serde_json::to_value(summary).expect("a summary serialises");
            v["series"] = serde_json::json!({
                "n": series.n,
                "util": series.util,
                "memory_mib": series.memory_mib,
            });
            v
        })
        .collect();
    serde_json::json!({
        "source": usage.source,
        "interval_ms": usage.interval_ms,
        "bucket_ms": usage.bucket_ms,
        "start_offset_ms": usage.start.saturating_sub(run.started),
        "gpus": gpus,
    })
}

/// The GPU section: busy share, peak memory and held share of each sampled GPU.
fn print_usage(usage: &GpuUsage, gpus: &[GpuSummary]) {
    if gpus.is_empty() {
        return;
    }
    println!();
    println!(
        "  GPUs, sampled every {} through {} (busy: mean utilisation; held: time a step held it)",
        fmt_ms(usage.interval_ms),
        usage.source
    );
    let width = gpus.iter().map(|g| g.id.len()).max().unwrap_or(0).max(3);
    println!(
        "  {:<width$} {:>5}  {:<24} {:>5}  name",
        "gpu", "busy", "peak memory", "held"
    );
    for g in gpus {
        let busy = g
            .busy_percent
            .map_or_else(|| "-".to_string(), |b| format!("{b:.0}%"));
        let share = if g.memory_total_mib > 0 {
            format!(
                " ({:.0}%)",
                100.0 * g.memory_peak_mib as f64 / g.memory_total_mib as f64
            )
        } else {
            String::new()
        };
        let memory = format!(
            "{:.1} of {:.1} GiB{share}",
            g.memory_peak_mib as f64 / 1024.0,
            g.memory_total_mib as f64 / 1024.0
        );
        let name = if g.id.starts_with("MIG-") {
            format!("{} (GPU {}, the whole GPU's figures)", g.name, g.index)
        } else {
            g.name.clone()
        };
        println!(
            "  {:<width$} {busy:>5}  {memory:<24} {:>4.0}%  {name}",
            g.id, g.held_percent
        );
    }
}

/// A step's state as `status` and `show` print it. In the run being executed (`live`), a
/// pending step that has attempts is under way: running (its last attempt has not ended),
/// committing (it succeeded; its output is being stored) or waiting to retry (it failed).
pub fn step_state(step: &RunStep, live: bool) -> &'static str {
    match (&step.status, step.attempts.last()) {
        (StepStatus::Pending, Some(a)) if live => {
            if a.ended == 0 {
                "running"
            } else if a.result == AttemptResult::Success {
                "committing"
            } else {
                "retrying"
            }
        }
        (status, _) => status.label(),
    }
}

fn detail(status: &StepStatus) -> Option<String> {
    match status {
        StepStatus::Cached { output } | StepStatus::Succeeded { output } => {
            Some(format!("-> {}", output.short()))
        }
        StepStatus::Failed { reason } => Some(reason.clone()),
        StepStatus::Skipped { upstream } => Some(format!("because `{upstream}` failed")),
        StepStatus::Stopped { by } => Some(by.clone()),
        StepStatus::Interrupted | StepStatus::Pending => None,
    }
}
