//! `needle diff REF_A REF_B`: two artifacts' ancestries side by side, showing only what
//! differs — ops, params, commands, code files — e.g. two sweep arms' evaluations.
//!
//! Steps are matched by name (and, where an ancestry holds several steps of one name, by their
//! sweep bindings). Input digests are left out: they differ whenever anything upstream does,
//! which the upstream step's own line already says.

use std::collections::BTreeMap;

use needle_core::lineage::{Direction, walk};
use needle_core::store::{StepRecord, StoreRead};
use needle_core::why::{Change, diff};

use crate::cli::{Cli, DiffArgs};
use crate::commands::{open_reader, print_json};
use crate::error::{CliError, Exit};
use crate::refs::{resolve, stored_step};

/// The ancestry of a reference, its steps by match label.
fn ancestry(
    store: &dyn StoreRead,
    reference: &str,
) -> Result<(StepRecord, BTreeMap<String, StepRecord>), CliError> {
    let key = stored_step(store, &resolve(store, reference)?, reference)?;
    let graph = walk(store, &key, Direction::Up)?;
    let mut by_name: BTreeMap<String, Vec<StepRecord>> = BTreeMap::new();
    for s in &graph.steps {
        let rec = store.step(&s.key)?.expect("a walked step is stored");
        by_name.entry(rec.name.clone()).or_default().push(rec);
    }
    let mut out = BTreeMap::new();
    for (name, recs) in by_name {
        if recs.len() == 1 {
            out.insert(name, recs.into_iter().next().expect("one"));
        } else {
            for r in recs {
                let label = format!(
                    "{name}[{}]",
                    needle_core::recipe::bindings_label(&r.bindings)
                );
                out.insert(label, r);
            }
        }
    }
    let root = store.step(&key)?.expect("resolved to a stored step");
    Ok((root, out))
}

#[derive(serde::Serialize)]
struct StepDiff {
    step: String,
    a: Option<String>,
    b: Option<String>,
    changes: Vec<Change>,
}

pub fn diff_cmd(cli: &Cli, args: &DiffArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let (root_a, a) = ancestry(&store, &args.a)?;
    let (root_b, b) = ancestry(&store, &args.b)?;
    let mut rows = Vec::new();
    let mut same = Vec::new();
    let labels: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for label in labels {
        match (a.get(label), b.get(label)) {
            (Some(x), Some(y)) if x.key == y.key => same.push(label.clone()),
            (x, y) => {
                let changes = match (x, y) {
                    (Some(x), Some(y)) => diff(&x.spec, &y.spec)
                        .into_iter()
                        .filter(|c| {
                            !matches!(
                                c,
                                Change::Input {
                                    before: Some(_),
                                    after: Some(_),
                                    ..
                                }
                            )
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                rows.push(StepDiff {
                    step: label.clone(),
                    a: x.map(|r| r.key.short()),
                    b: y.map(|r| r.key.short()),
                    changes,
                });
            }
        }
    }
    if args.json {
        print_json(&serde_json::json!({
            "a": root_a.key, "b": root_b.key, "differ": rows, "same": same,
        }));
        return Ok(Exit::Success);
    }
    let name = |r: &StepRecord| {
        if r.bindings.is_empty() {
            r.name.clone()
        } else {
            format!(
                "{}[{}]",
                r.name,
                needle_core::recipe::bindings_label(&r.bindings)
            )
        }
    };
    println!("A  {}  {}", name(&root_a), root_a.key.short());
    println!("B  {}  {}", name(&root_b), root_b.key.short());
    if rows.is_empty() {
        println!("the same step: nothing in their ancestries differs");
        return Ok(Exit::Success);
    }
    for row in &rows {
        let keys = format!(
            "{} | {}",
            row.a.as_deref().unwrap_or("(absent)"),
            row.b.as_deref().unwrap_or("(absent)")
        );
        println!("{}  ({keys})", row.step);
        if row.changes.is_empty() && row.a.is_some() && row.b.is_some() {
            println!("  - same op and params; only what it read differs");
        }
        for c in &row.changes {
            println!("  - {c}");
        }
    }
    if !same.is_empty() {
        println!("same in both: {} ({} steps)", same.join(", "), same.len());
    }
    Ok(Exit::Success)
}
