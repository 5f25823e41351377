//! `needle logs REF`: the combined stdout and stderr of a step's attempt.

use std::io::Write;

use needle_core::digest::StepKey;
use needle_core::store::Store;

use crate::cli::{Cli, LogsArgs};
use crate::commands::open_existing;
use crate::engine::tail;
use crate::error::{CliError, Exit};
use crate::refs::{Target, resolve};

pub fn logs(cli: &Cli, args: &LogsArgs) -> Result<Exit, CliError> {
    let store = open_existing(cli)?;
    let target = resolve(&store, &args.reference)?;
    let logs: Vec<(u32, String)> = match &target {
        Target::RunStep { run, index } => run.steps[*index]
            .attempts
            .iter()
            .map(|a| (a.n, a.log.clone()))
            .collect(),
        Target::Step(k) => logs_of_key(&store, k)?,
        Target::Artifact(_) => {
            return Err(CliError::usage(
                "logs belong to steps; give a step key or RUN:STEP, not an artifact",
            ));
        }
    };
    let chosen = match args.attempt {
        Some(n) => logs
            .iter()
            .find(|(a, _)| *a == n)
            .ok_or_else(|| CliError::usage(format!("no attempt {n} (there are {})", logs.len())))?,
        None => logs
            .last()
            .ok_or_else(|| CliError::usage("this step has no log: it never started"))?,
    };
    if chosen.1.is_empty() {
        eprintln!("(attempt {} wrote no output)", chosen.0);
        return Ok(Exit::Success);
    }
    let path = store.path(&chosen.1);
    if let Some(n) = args.tail {
        for line in tail(&path, n) {
            println!("{line}");
        }
        return Ok(Exit::Success);
    }
    let bytes = std::fs::read(&path).map_err(|source| CliError::Io {
        context: format!("could not read log `{}`", path.display()),
        source,
    })?;
    let _ = std::io::stdout().write_all(&bytes);
    Ok(Exit::Success)
}

/// Every attempt's log of a committed step, in execution order.
fn logs_of_key(store: &Store, key: &StepKey) -> Result<Vec<(u32, String)>, CliError> {
    let rec = store
        .step(key)?
        .ok_or_else(|| CliError::usage(format!("step `{}` is not in the store", key.short())))?;
    Ok(rec
        .executions
        .iter()
        .map(|e| (e.attempt, e.log.clone()))
        .collect())
}
