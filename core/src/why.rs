//! Why a step runs: what in its key differs from the closest earlier step of the same name.
//!
//! A step's key is a digest of its spec (op, op version, params, argv, code files, `path`
//! fingerprints, input digests), so "why did this run" is a diff of specs. The closest earlier
//! step is the stored one of the same name with the fewest differences (ties: the most recently
//! executed), which for a one-value edit of a recipe names exactly that value.

use std::collections::BTreeSet;
use std::fmt;

use crate::store::{InputDigests, StepRecord, StepSpec};
use crate::value::Value;

/// One difference between an earlier spec and a later one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    Op {
        before: String,
        after: String,
    },
    OpVersion {
        op: String,
        before: u32,
        after: u32,
    },
    Param {
        name: String,
        before: Option<Value>,
        after: Option<Value>,
    },
    Argv {
        before: Option<Vec<String>>,
        after: Option<Vec<String>>,
    },
    Code {
        path: String,
        what: Presence,
    },
    Path {
        param: String,
        what: Presence,
    },
    /// What an `environment` command prints: `before` and `after` are digests (hex) of it,
    /// the blobs the store keeps of it.
    Environment {
        command: String,
        what: Presence,
        before: Option<String>,
        after: Option<String>,
    },
    Input {
        name: String,
        before: Option<InputDigests>,
        after: Option<InputDigests>,
    },
}

/// How a keyed item (a code file, a path param) differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Added,
    Removed,
    Changed,
}

/// Every difference from `before` to `after`, in a fixed order: op, version, params, argv,
/// code files, paths, environment commands, inputs.
pub fn diff(before: &StepSpec, after: &StepSpec) -> Vec<Change> {
    let mut out = Vec::new();
    if before.op != after.op {
        out.push(Change::Op {
            before: before.op.clone(),
            after: after.op.clone(),
        });
    } else if before.op_version != after.op_version {
        out.push(Change::OpVersion {
            op: after.op.clone(),
            before: before.op_version,
            after: after.op_version,
        });
    }
    let names: BTreeSet<&String> = before.params.keys().chain(after.params.keys()).collect();
    for name in names {
        let (b, a) = (before.params.get(name), after.params.get(name));
        if b != a {
            out.push(Change::Param {
                name: name.clone(),
                before: b.cloned(),
                after: a.cloned(),
            });
        }
    }
    if before.cmd != after.cmd && !argv_explained(before, after, &out) {
        out.push(Change::Argv {
            before: before.cmd.clone(),
            after: after.cmd.clone(),
        });
    }
    for (path, what) in keyed(&before.code, &after.code) {
        out.push(Change::Code { path, what });
    }
    for (param, what) in keyed(&before.paths, &after.paths) {
        out.push(Change::Path { param, what });
    }
    for (command, what) in keyed(&before.environment, &after.environment) {
        out.push(Change::Environment {
            before: before.environment.get(&command).cloned(),
            after: after.environment.get(&command).cloned(),
            command,
            what,
        });
    }
    let names: BTreeSet<&String> = before.inputs.keys().chain(after.inputs.keys()).collect();
    for name in names {
        let (b, a) = (before.inputs.get(name), after.inputs.get(name));
        if b != a {
            out.push(Change::Input {
                name: name.clone(),
                before: b.cloned(),
                after: a.cloned(),
            });
        }
    }
    out
}

/// Whether the changed params explain every difference between the two argvs: each differing
/// argument becomes the new one when the changed params' old values are replaced by their new
/// ones in it (`--lr ${lr}`, `echo lr=${lr}` after an edit of `lr`).
fn argv_explained(before: &StepSpec, after: &StepSpec, changes: &[Change]) -> bool {
    let (Some(b), Some(a)) = (&before.cmd, &after.cmd) else {
        return false;
    };
    if b.len() != a.len() {
        return false;
    }
    let pairs: Vec<(String, String)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Param {
                before: Some(x),
                after: Some(y),
                ..
            } => Some((crate::value::render_short(x), crate::value::render_short(y))),
            _ => None,
        })
        .collect();
    b.iter().zip(a).filter(|(x, y)| x != y).all(|(x, y)| {
        let replaced = pairs
            .iter()
            .fold(x.to_string(), |t, (px, py)| t.replace(px.as_str(), py));
        replaced == *y
    })
}

fn keyed<V: PartialEq>(
    before: &std::collections::BTreeMap<String, V>,
    after: &std::collections::BTreeMap<String, V>,
) -> Vec<(String, Presence)> {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    names
        .into_iter()
        .filter_map(|k| match (before.get(k), after.get(k)) {
            (None, Some(_)) => Some((k.clone(), Presence::Added)),
            (Some(_), None) => Some((k.clone(), Presence::Removed)),
            (Some(b), Some(a)) if b != a => Some((k.clone(), Presence::Changed)),
            _ => None,
        })
        .collect()
}

/// The closest of `earlier` to `spec` (a step of the sweep arm `bindings`) and what differs
/// from it: fewest differences first, then the same arm, then the most recently executed.
/// `None` when `earlier` is empty.
pub fn closest<'a>(
    spec: &StepSpec,
    bindings: &std::collections::BTreeMap<String, Value>,
    earlier: impl IntoIterator<Item = &'a StepRecord>,
) -> Option<(&'a StepRecord, Vec<Change>)> {
    earlier
        .into_iter()
        .map(|r| (r, diff(&r.spec, spec)))
        .min_by_key(|(r, changes)| {
            let last = r.executions.last().map_or(0, |e| e.started);
            (
                changes.len(),
                r.bindings != *bindings,
                std::cmp::Reverse(last),
            )
        })
}

fn short(v: &Option<Value>) -> String {
    match v {
        Some(v) => crate::value::render_short(v),
        None => "(unset)".into(),
    }
}

fn input_short(v: &Option<InputDigests>) -> String {
    match v {
        Some(InputDigests::One(a)) => a.short(),
        Some(InputDigests::Gather(m)) => format!("{} gathered artifacts", m.len()),
        None => "(none)".into(),
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Op { before, after } => write!(f, "op changed: {before} → {after}"),
            Change::OpVersion { op, before, after } => {
                write!(f, "op {op} changed version: {before} → {after}")
            }
            Change::Param {
                name,
                before,
                after,
            } => write!(
                f,
                "param {name} changed: {} → {}",
                short(before),
                short(after)
            ),
            Change::Argv { before, after } => write!(
                f,
                "command changed: {} → {}",
                before.as_ref().map_or("(none)".into(), |c| c.join(" ")),
                after.as_ref().map_or("(none)".into(), |c| c.join(" "))
            ),
            Change::Code { path, what } => match what {
                Presence::Changed => write!(f, "code file {path} changed"),
                Presence::Added => write!(f, "code file {path} added"),
                Presence::Removed => write!(f, "code file {path} removed"),
            },
            Change::Path { param, what } => match what {
                Presence::Changed => write!(f, "the files at path param {param} changed"),
                Presence::Added => write!(f, "path param {param} added"),
                Presence::Removed => write!(f, "path param {param} removed"),
            },
            Change::Environment { command, what, .. } => match what {
                Presence::Changed => write!(f, "what `{command}` prints changed"),
                Presence::Added => write!(f, "environment command `{command}` added"),
                Presence::Removed => write!(f, "environment command `{command}` removed"),
            },
            Change::Input {
                name,
                before,
                after,
            } => match (before, after) {
                (Some(InputDigests::Gather(b)), Some(InputDigests::Gather(a))) => {
                    let changed: Vec<&str> = a
                        .iter()
                        .filter(|m| !b.contains(m))
                        .map(|m| m.label.as_str())
                        .collect();
                    write!(
                        f,
                        "input {name} changed: {} of {} gathered artifacts differ ({})",
                        changed.len(),
                        a.len(),
                        changed.join(", ")
                    )
                }
                _ => write!(
                    f,
                    "input {name} changed: {} → {}",
                    input_short(before),
                    input_short(after)
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::digest::{ArtifactDigest, BlobDigest};

    fn spec(params: serde_json::Value) -> StepSpec {
        let mut s = StepSpec::bare("exec", 1, BTreeMap::new());
        s.params = serde_json::from_value(params).unwrap();
        s.cmd = Some(vec!["python3".into(), "train.py".into()]);
        s
    }

    #[test]
    fn a_one_value_edit_is_named_and_nothing_else() {
        let a = spec(json!({"lr": 0.1, "arch": "unet"}));
        let b = spec(json!({"lr": 0.2, "arch": "unet"}));
        let changes = diff(&a, &b);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].to_string(), "param lr changed: 0.1 → 0.2");
    }

    #[test]
    fn an_argv_difference_no_param_explains_is_reported() {
        let mut a = spec(json!({"lr": 0.1}));
        let mut b = spec(json!({"lr": 0.2}));
        a.cmd = Some(vec!["train".into(), "0.1".into(), "1".into()]);
        b.cmd = Some(vec!["train".into(), "0.2".into(), "1".into()]);
        assert_eq!(diff(&a, &b).len(), 1, "the param explains the argv");
        b.cmd = Some(vec!["train".into(), "0.2".into(), "2".into()]);
        let text: Vec<String> = diff(&a, &b).iter().map(|c| c.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert_eq!(text[1], "command changed: train 0.1 1 → train 0.2 2");
    }

    #[test]
    fn code_files_inputs_and_argv_are_told_apart() {
        let mut a = spec(json!({}));
        a.code
            .insert("train.py".into(), BlobDigest::of_parts(&[b"print(1)"]));
        a.inputs.insert(
            "data".into(),
            InputDigests::One(ArtifactDigest::of_parts(&[b"one"])),
        );
        let mut b = a.clone();
        b.code
            .insert("train.py".into(), BlobDigest::of_parts(&[b"print(2)"]));
        let text: Vec<String> = diff(&a, &b).iter().map(|c| c.to_string()).collect();
        assert_eq!(text, ["code file train.py changed"]);

        b.inputs.insert(
            "data".into(),
            InputDigests::One(ArtifactDigest::of_parts(&[b"two"])),
        );
        b.cmd = Some(vec!["python3".into(), "eval.py".into()]);
        let kinds: Vec<String> = diff(&a, &b).iter().map(|c| c.to_string()).collect();
        assert!(kinds[0].starts_with("command changed"), "{kinds:?}");
        assert!(kinds[2].starts_with("input data changed"), "{kinds:?}");
    }
}
