//! `needle pull REF`: fetch steps from the shared cache (`remote/`) into the store, each
//! verified against its digests before it is committed: one step (a key prefix as the cache
//! lists it), or every step of a recipe's plan that the cache holds (what a `run` would fetch).

use needle_core::digest::{ArtifactDigest, StepKey};
use needle_core::plan;
use needle_core::store::StoreRead;
use needle_ops::Registry;

use crate::cli::{Cli, PullArgs};
use crate::commands::plan::{predict, remote_steps};
use crate::commands::{PlannedCode, load_recipe, open_store, print_json, read_recipe};
use crate::error::{CliError, Exit};
use crate::remote::{self, Remote, RemoteIndex, Transfer};

pub fn pull(cli: &Cli, args: &PullArgs) -> Result<Exit, CliError> {
    let remote = Remote::required(args.remote.as_deref())?;
    let index = remote::block_on(remote.index())?;
    let recipe = std::path::Path::new(&args.reference);
    let (store, wanted) = if recipe.is_file() {
        let source = read_recipe(recipe)?;
        let (recipe, expansion) = load_recipe(source, &args.sets, &Registry::new())?;
        let mut code = PlannedCode::default();
        let plan = plan::build(recipe, expansion, &mut code)?;
        let store = open_store(cli)?;
        code.keep_in(&store)?;
        let predicted = predict(&plan, Some(&store as &dyn StoreRead), Some(&index))?;
        let wanted = remote_steps(&predicted);
        (store, wanted)
    } else {
        let found = find_in(&index, &args.reference)?;
        let store = open_store(cli)?;
        let wanted = if store.step(&found.0)?.is_some() {
            Vec::new()
        } else {
            vec![found]
        };
        (store, wanted)
    };
    let transfer = Transfer::new("pulled", args.json);
    let pulled = remote::block_on(remote::pull_steps(&remote, &store, &wanted, &transfer));
    if args.json {
        print_json(&serde_json::json!({
            "remote": remote.url(),
            "pulled": pulled.steps,
            "failed": remote::failures_json(&pulled.failed),
            "objects": transfer.objects(),
            "bytes": transfer.bytes(),
        }));
    } else {
        println!(
            "remote {}: {} step(s) fetched ({})",
            remote.url(),
            pulled.steps.len(),
            transfer.summary()
        );
        for (key, e) in &pulled.failed {
            println!(
                "  not fetched: step {}: {}",
                key.short(),
                remote::error_chain(e)
            );
        }
    }
    Ok(if pulled.failed.is_empty() {
        Exit::Success
    } else {
        Exit::StepFailed
    })
}

/// The one remote step whose key starts with `text`.
fn find_in(index: &RemoteIndex, text: &str) -> Result<(StepKey, ArtifactDigest), CliError> {
    let prefix = text.to_ascii_lowercase();
    if prefix.len() < 4 || !needle_core::digest::is_hex_prefix(&prefix) {
        return Err(CliError::usage(format!(
            "`{text}` is neither a recipe file nor a step key prefix (at least 4 hex digits)"
        )));
    }
    let found: Vec<(StepKey, ArtifactDigest)> = (index.steps.iter())
        .filter(|(k, _)| k.hex().starts_with(&prefix))
        .map(|(k, o)| (*k, *o))
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(CliError::usage(format!(
            "no step on the remote starts with `{prefix}`"
        ))),
        many => Err(CliError::usage(format!(
            "`{prefix}` is ambiguous: {} steps on the remote start with it",
            many.len()
        ))),
    }
}
