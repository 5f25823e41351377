//! `needle logs REF`: the combined stdout and stderr of a step's attempt.

use std::io::Write;
use std::path::PathBuf;

use needle_core::digest::StepKey;
use needle_core::store::StoreRead;

use crate::cli::{Cli, LogsArgs};
use crate::commands::open_reader;
use crate::engine::tail;
use crate::error::{CliError, Exit};
use crate::refs::{Target, resolve};

pub fn logs(cli: &Cli, args: &LogsArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let target = resolve(&store, &args.reference)?;
    let logs: Vec<(u32, String)> = match &target {
        // A step the run found cached has no attempts in it: its logs are those of the
        // executions that made it (or, fetched from a remote, stayed where they ran).
        Target::RunStep { run, index } => {
            let step = &run.steps[*index];
            match step.key {
                Some(k) if step.attempts.is_empty() && step.status.is_done() => {
                    logs_of_key(&store, &k)?
                }
                _ => step.attempts.iter().map(|a| (a.n, a.log.clone())).collect(),
            }
        }
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
    // An attempt under way writes its log in its staging slot; the log moves under logs/
    // when it ends (so, should it end meanwhile, the recorded path holds it).
    let live = running_log(&store, &target, chosen.0)?;
    let path = match &live {
        Some(p) if p.exists() => p.clone(),
        _ => store.path(&chosen.1),
    };
    if live.is_some() && !path.exists() {
        eprintln!("(attempt {} has written nothing so far)", chosen.0);
        return Ok(Exit::Success);
    }
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

/// Where attempt `n` of a step of the live run writes its output now, if it is under way.
fn running_log(
    store: &dyn StoreRead,
    target: &Target,
    n: u32,
) -> Result<Option<PathBuf>, CliError> {
    let Target::RunStep { run, index } = target else {
        return Ok(None);
    };
    let under_way = store.is_live(run.id)
        && run.steps[*index]
            .attempts
            .last()
            .is_some_and(|a| a.n == n && a.ended == 0);
    if !under_way {
        return Ok(None);
    }
    Ok(store.live_log(run.id, *index)?)
}

/// Every attempt's log of a committed step, in execution order.
fn logs_of_key(store: &dyn StoreRead, key: &StepKey) -> Result<Vec<(u32, String)>, CliError> {
    let rec = store
        .step(key)?
        .ok_or_else(|| CliError::usage(format!("step `{}` is not in the store", key.short())))?;
    if let Some(url) = &rec.fetched_from {
        return Err(CliError::usage(format!(
            "step `{}` was fetched from `{url}`: its logs stayed on the machine that ran it",
            key.short()
        )));
    }
    Ok(rec
        .executions
        .iter()
        .map(|e| (e.attempt, e.log.clone()))
        .collect())
}
