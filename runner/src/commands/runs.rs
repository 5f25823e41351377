//! `needle runs`: every recorded run, oldest first.

use needle_core::store::{RunState, StoreRead, fmt_ms};

use crate::cli::{Cli, JsonArg};
use crate::commands::{fmt_time, open_reader, print_json};
use crate::error::{CliError, Exit};

/// How a run's state reads. A run marked running is running if the runner holding the store
/// says it executes it (`live`); otherwise it lost its runner (killed, or the machine went
/// down): only one process holds a store at a time.
pub fn state_label(state: RunState, live: bool) -> &'static str {
    match state {
        RunState::Running if live => "running",
        RunState::Running => "aborted",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Interrupted => "interrupted",
    }
}

pub fn runs(cli: &Cli, args: &JsonArg) -> Result<Exit, CliError> {
    // No store is "unavailable" (exit 3), as for every other command that reads one.
    let store = open_reader(cli)?;
    let runs = store.runs()?;
    if args.json {
        let list: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "run": r.id,
                    "recipe": r.recipe_name,
                    "path": r.recipe_path,
                    "state": state_label(r.state, store.is_live(r.id)),
                    "started": fmt_time(r.started),
                    "duration_ms": r.ended.map(|e| e.saturating_sub(r.started)),
                    "arms": r.arms,
                    "steps": r.steps,
                    "executed": r.executed,
                    "cached": r.cached,
                    "failed": r.failed,
                    "skipped": r.skipped,
                })
            })
            .collect();
        print_json(&list);
        return Ok(Exit::Success);
    }
    if runs.is_empty() {
        println!("no runs yet");
        return Ok(Exit::Success);
    }
    println!(
        "{:>4}  {:<11} {:<20} {:<20} {:>8} {:>5} {:>6} {:>8} {:>6} {:>7}",
        "run",
        "state",
        "recipe",
        "started",
        "took",
        "arms",
        "steps",
        "executed",
        "cached",
        "failed"
    );
    for r in runs {
        let took = r
            .ended
            .map(|e| fmt_ms(e.saturating_sub(r.started)))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:>4}  {:<11} {:<20} {:<20} {:>8} {:>5} {:>6} {:>8} {:>6} {:>7}",
            r.id,
            state_label(r.state, store.is_live(r.id)),
            r.recipe_name,
            fmt_time(r.started),
            took,
            r.arms,
            r.steps,
            r.executed,
            r.cached,
            r.failed
        );
    }
    Ok(Exit::Success)
}
