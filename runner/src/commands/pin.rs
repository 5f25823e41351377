//! `needle pin REF`: keep an artifact, and the steps and artifacts its lineage shows, through
//! every `needle gc`, whatever `--keep-last` says. `needle pin` alone lists the pins.

use needle_core::lineage::{self, Direction};
use needle_core::store::{PinRecord, Store, now_millis};

use crate::cli::{Cli, PinArgs};
use crate::commands::show::human_bytes;
use crate::commands::{fmt_time, open_existing, print_json};
use crate::error::{CliError, Exit};
use crate::refs::{artifact_of, resolve};

pub fn pin(cli: &Cli, args: &PinArgs) -> Result<Exit, CliError> {
    let store = open_existing(cli)?;
    let Some(text) = &args.reference else {
        return list(&store, args.json);
    };
    let artifact = artifact_of(&store, &resolve(&store, text)?)?;
    if store.manifest(&artifact)?.is_none() {
        return Err(CliError::usage(format!(
            "artifact `{}` is not in the store (dropped by gc or as damaged); run its recipe \
             again to make it",
            artifact.short()
        )));
    }
    let producer = lineage::producer(&store, &artifact)?;
    let record = PinRecord {
        pinned: now_millis(),
        reference: text.clone(),
        step: producer.as_ref().map(|p| p.name.clone()),
    };
    let new = store.pin(&artifact, &record)?;
    let ancestry = match &producer {
        Some(p) => lineage::walk(&store, &p.key, Direction::Up)?.steps.len(),
        None => 0,
    };
    if args.json {
        print_json(&serde_json::json!({
            "artifact": artifact,
            "step": record.step,
            "new": new,
            "lineage_steps": ancestry,
        }));
        return Ok(Exit::Success);
    }
    let name = record
        .step
        .as_deref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    if new {
        println!(
            "pinned {}{name}: gc keeps it and the {ancestry} step(s) of its lineage",
            artifact.short()
        );
    } else {
        println!("{}{name} was pinned already", artifact.short());
    }
    Ok(Exit::Success)
}

fn list(store: &Store, json: bool) -> Result<Exit, CliError> {
    let mut rows = Vec::new();
    for (artifact, pin) in store.pins()? {
        let state = match store.manifest(&artifact)? {
            Some(m) => serde_json::json!({"bytes": m.total_size(), "files": m.file_count()}),
            None => {
                let why = store
                    .dropped(&artifact)?
                    .map_or_else(|| "no manifest".to_string(), |d| d.reason);
                serde_json::json!({ "dropped": why })
            }
        };
        rows.push((artifact, pin, state));
    }
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(a, pin, state)| {
                let mut v = serde_json::json!({
                    "artifact": a,
                    "step": pin.step,
                    "reference": pin.reference,
                    "pinned": fmt_time(pin.pinned),
                });
                v.as_object_mut()
                    .expect("an object")
                    .extend(state.as_object().expect("an object").clone());
                v
            })
            .collect();
        print_json(&list);
        return Ok(Exit::Success);
    }
    if rows.is_empty() {
        println!("no pins (`needle pin REF` keeps an artifact and its lineage through gc)");
        return Ok(Exit::Success);
    }
    let width = rows
        .iter()
        .map(|(_, p, _)| p.step.as_deref().map_or(1, str::len))
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "{:<12}  {:<width$}  {:>10}  {:<20}  reference",
        "artifact", "step", "size", "pinned"
    );
    for (a, pin, state) in &rows {
        let size = match state["bytes"].as_u64() {
            Some(b) => human_bytes(b),
            None => "dropped".into(),
        };
        println!(
            "{:<12}  {:<width$}  {:>10}  {:<20}  {}",
            a.short(),
            pin.step.as_deref().unwrap_or("-"),
            size,
            fmt_time(pin.pinned),
            pin.reference
        );
        if let Some(why) = state["dropped"].as_str() {
            println!("{:<12}  dropped as damaged: {why}", "");
        }
    }
    Ok(Exit::Success)
}
