//! `needle push [RUN|REF]`: upload steps to the shared cache (`remote/`): every step a run
//! executed or found cached (default: the last run), or one step or artifact with every step
//! upstream of it, so that another machine's plan reaches it.

use std::collections::BTreeSet;

use needle_core::digest::StepKey;
use needle_core::store::StoreRead;

use crate::cli::{Cli, PushArgs};
use crate::commands::{find_run, open_reader, print_json};
use crate::error::{CliError, Exit};
use crate::remote::{self, Remote, Transfer};

pub fn push(cli: &Cli, args: &PushArgs) -> Result<Exit, CliError> {
    let remote = Remote::required(args.remote.as_deref())?;
    let reader = open_reader(cli)?;
    let store: &dyn StoreRead = &reader;
    let text = args.reference.as_deref().unwrap_or("last");
    let keys = steps_to_push(store, text)?;
    let (pushed, transfer) = remote::block_on(async {
        let known = remote.index().await?;
        let transfer = Transfer::new("pushed", args.json);
        let pushed = remote::push_steps(&remote, store, &keys, &known, &transfer).await;
        Ok::<_, remote::RemoteError>((pushed, transfer))
    })?;
    if args.json {
        print_json(&serde_json::json!({
            "remote": remote.url(),
            "steps": keys.len(),
            "written": pushed.written,
            "present": pushed.present,
            "failed": remote::failures_json(&pushed.failed),
            "objects": transfer.objects(),
            "bytes": transfer.bytes(),
        }));
    } else {
        println!(
            "remote {}: {} step(s) uploaded, {} already there ({})",
            remote.url(),
            pushed.written,
            pushed.present,
            transfer.summary()
        );
        for (key, e) in &pushed.failed {
            println!(
                "  not uploaded: step {}: {}",
                key.short(),
                remote::error_chain(e)
            );
        }
    }
    Ok(if pushed.failed.is_empty() {
        Exit::Success
    } else {
        Exit::StepFailed
    })
}

/// A run's done steps, or a step (an artifact's producer) and every step upstream of it.
fn steps_to_push(store: &dyn StoreRead, text: &str) -> Result<Vec<StepKey>, CliError> {
    let is_run = text == "last" || text == "latest" || text.parse::<u64>().is_ok();
    if is_run {
        let run = find_run(store, text)?;
        let keys: BTreeSet<StepKey> = (run.steps.iter())
            .filter(|s| s.status.is_done())
            .filter_map(|s| s.key)
            .collect();
        return Ok(keys.into_iter().collect());
    }
    let target = crate::refs::resolve(store, text)?;
    let first = crate::refs::stored_step(store, &target, text)?;
    let mut seen = BTreeSet::new();
    let mut todo = vec![first];
    while let Some(key) = todo.pop() {
        if !seen.insert(key) {
            continue;
        }
        let Some(record) = store.step(&key)? else {
            continue;
        };
        for input in record.spec.inputs.values().flat_map(|i| i.artifacts()) {
            if let Some(producer) = needle_core::lineage::producer(store, &input)? {
                todo.push(producer.key);
            }
        }
    }
    Ok(seen.into_iter().collect())
}
