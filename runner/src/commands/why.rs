//! `needle why REF`: why a step ran (or will run): what in its key differs from the closest
//! earlier step of the same name in the store. `needle plan --why` gives the reason per step.

use std::collections::BTreeMap;

use needle_core::digest::StepKey;
use needle_core::lineage::producer;
use needle_core::store::{Execution, StepRecord, StepSpec, StepStatus, StoreRead};
use needle_core::value::Value;
use needle_core::why::{Change, closest};

use crate::cli::{Cli, WhyArgs};
use crate::commands::{fmt_time, open_reader, print_json};
use crate::error::{CliError, Exit};
use crate::progress::step_label;
use crate::refs::{Target, resolve};

/// Why a step with this spec is not the same as anything stored before it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reason {
    /// The closest earlier step of the same name, if any.
    pub closest: Option<StepKey>,
    pub closest_run: Option<u64>,
    pub changes: Vec<Change>,
}

impl Reason {
    /// A step of the arm `bindings` with `spec`, against `named` (the stored steps of its
    /// name, `Store::steps_named`): with `since`, only those first executed by an earlier
    /// run, before that time.
    pub fn find(
        named: &[StepRecord],
        bindings: &BTreeMap<String, Value>,
        spec: &StepSpec,
        since: Option<&Execution>,
    ) -> Reason {
        let earlier = named
            .iter()
            .filter(|r| match (since, r.executions.first()) {
                (Some(t), Some(e)) => e.run < t.run && e.started < t.started,
                _ => true,
            });
        match closest(spec, bindings, earlier) {
            Some((r, changes)) => Reason {
                closest: Some(r.key),
                closest_run: r.executions.last().map(|e| e.run),
                changes,
            },
            None => Reason {
                closest: None,
                closest_run: None,
                changes: Vec::new(),
            },
        }
    }

    /// One line per change, or why there is none to show. With the store, a changed
    /// `environment` command's line says which of its lines changed.
    pub fn lines(&self, name: &str, store: Option<&dyn StoreRead>) -> Vec<String> {
        match self.closest {
            None => vec![format!(
                "nothing named `{name}` ran before: it is the first of its kind in this store"
            )],
            Some(_) if self.changes.is_empty() => {
                vec!["its spec equals an earlier step's (the op's output differed)".into()]
            }
            Some(_) => (self.changes.iter())
                .map(|c| match (c, store) {
                    (
                        Change::Environment {
                            before: Some(b),
                            after: Some(a),
                            ..
                        },
                        Some(store),
                    ) => match printed_lines_changed(store, b, a) {
                        Some(lines) => format!("{c}: {lines}"),
                        None => c.to_string(),
                    },
                    _ => c.to_string(),
                })
                .collect(),
        }
    }
}

/// The lines an environment command's output lost (`-`) and gained (`+`), at most six, where
/// the store has both (`needle plan` keeps nothing, so the newer is not there until a run).
fn printed_lines_changed(store: &dyn StoreRead, before: &str, after: &str) -> Option<String> {
    let read = |hex: &str| -> Option<String> {
        let digest: needle_core::digest::BlobDigest = hex.parse().ok()?;
        std::fs::read_to_string(store.blob_path(&digest)).ok()
    };
    let (b, a) = (read(before)?, read(after)?);
    let gone = b.lines().filter(|l| !a.lines().any(|x| x == *l));
    let new = a.lines().filter(|l| !b.lines().any(|x| x == *l));
    let mut shown: Vec<String> = gone
        .map(|l| format!("-{}", l.trim()))
        .chain(new.map(|l| format!("+{}", l.trim())))
        .collect();
    if shown.is_empty() {
        return None;
    }
    let more = shown.len().saturating_sub(6);
    shown.truncate(6);
    if more > 0 {
        shown.push(format!("and {more} more"));
    }
    Some(shown.join(", "))
}

pub fn why(cli: &Cli, args: &WhyArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let target = resolve(&store, &args.reference)?;
    let (label, key, run_status) = match &target {
        Target::RunStep { run, index } => {
            let step = &run.steps[*index];
            (
                step_label(step),
                step.key,
                Some((run.id, step.status.clone())),
            )
        }
        Target::Step(k) => (k.short(), Some(*k), None),
        Target::Artifact(a) => match producer(&store, a)? {
            Some(r) => (r.name.clone(), Some(r.key), None),
            None => {
                return Err(CliError::usage(format!(
                    "artifact `{}` was made by no recorded step",
                    a.short()
                )));
            }
        },
    };
    let Some(key) = key else {
        let msg = format!(
            "{label}: its key is not known: an input was never produced (an upstream step failed or was skipped)"
        );
        return finish(args.json, &label, None, &msg, None);
    };
    let Some(rec) = store.step(&key)? else {
        let msg = format!(
            "{label}: its key {} is not in the store (the step did not succeed); `needle plan RECIPE --why` says what differs",
            key.short()
        );
        return finish(args.json, &label, Some(key), &msg, None);
    };
    let label = if matches!(target, Target::Step(_) | Target::Artifact(_)) {
        rec.name.clone()
    } else {
        label
    };
    let first = rec.executions.first();
    if let Some((run, StepStatus::Cached { .. })) = &run_status {
        let msg = format!(
            "{label}: cached in run {run}: key {} was already in the store (executed in run {}, {})",
            key.short(),
            first.map_or(0, |e| e.run),
            first.map_or(String::new(), |e| fmt_time(e.started))
        );
        return finish(args.json, &label, Some(key), &msg, None);
    }
    let named = store.steps_named(&rec.name)?;
    let reason = Reason::find(&named, &rec.bindings, &rec.spec, first);
    let head = match (&reason.closest, first) {
        (Some(c), Some(e)) => format!(
            "{label} (key {}) executed in run {} because, compared with the closest earlier `{}` (key {}{}):",
            key.short(),
            e.run,
            rec.name,
            c.short(),
            reason
                .closest_run
                .map_or(String::new(), |r| format!(", run {r}"))
        ),
        _ => format!("{label} (key {}):", key.short()),
    };
    finish(
        args.json,
        &label,
        Some(key),
        &head,
        Some((&rec.name, &reason, &store)),
    )
}

fn finish(
    json: bool,
    label: &str,
    key: Option<StepKey>,
    head: &str,
    reason: Option<(&str, &Reason, &dyn StoreRead)>,
) -> Result<Exit, CliError> {
    if json {
        print_json(&serde_json::json!({
            "step": label,
            "key": key,
            "summary": head,
            "reason": reason.map(|(_, r, _)| r),
        }));
        return Ok(Exit::Success);
    }
    println!("{head}");
    if let Some((name, r, store)) = reason {
        for line in r.lines(name, Some(store)) {
            println!("  - {line}");
        }
    }
    Ok(Exit::Success)
}
