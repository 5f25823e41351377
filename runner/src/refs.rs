//! `REF`: a unique prefix of a step key or artifact digest, or `RUN:STEP` with the arm's
//! bindings where a sweep made several (`3:train[arch=a,lr=0.1]`, `last:train`).

use needle_core::digest::{ArtifactDigest, StepKey, is_hex_prefix};
use needle_core::store::{Found, RunRecord, StoreRead};
use needle_core::value::render_short;

use crate::commands::find_run;
use crate::error::CliError;
use crate::progress::step_label;

/// The shortest prefix accepted, so that a typo does not match half the store.
const MIN_PREFIX: usize = 4;

#[derive(Debug)]
pub enum Target {
    /// A step as one run saw it (it may have failed or never run).
    RunStep {
        run: Box<RunRecord>,
        index: usize,
    },
    Step(StepKey),
    Artifact(ArtifactDigest),
}

impl Target {
    /// The step key, where the target has one.
    pub fn step_key(&self) -> Option<StepKey> {
        match self {
            Target::RunStep { run, index } => run.steps[*index].key,
            Target::Step(k) => Some(*k),
            Target::Artifact(_) => None,
        }
    }
}

/// The stored step a target stands for: the step itself, or an artifact's producer. `text` is
/// the reference as given, for the error.
pub fn stored_step(
    store: &dyn StoreRead,
    target: &Target,
    text: &str,
) -> Result<StepKey, CliError> {
    match target {
        Target::Artifact(a) => needle_core::lineage::producer(store, a)?
            .map(|r| r.key)
            .ok_or_else(|| CliError::usage(format!("no recorded step produced `{}`", a.short()))),
        other => match other.step_key() {
            Some(k) if store.step(&k)?.is_some() => Ok(k),
            _ => Err(CliError::usage(format!(
                "`{text}` has no output in the store (it failed or never ran); lineage follows artifacts"
            ))),
        },
    }
}

/// The artifact a target stands for: itself, or the step's output.
pub fn artifact_of(store: &dyn StoreRead, target: &Target) -> Result<ArtifactDigest, CliError> {
    match target {
        Target::Artifact(a) => Ok(*a),
        Target::Step(k) => Ok(store
            .step(k)?
            .ok_or_else(|| CliError::usage(format!("step `{}` is not in the store", k.short())))?
            .output),
        Target::RunStep { run, index } => {
            let step = &run.steps[*index];
            match &step.status {
                needle_core::store::StepStatus::Cached { output }
                | needle_core::store::StepStatus::Succeeded { output } => Ok(*output),
                other => Err(CliError::usage(format!(
                    "`{}` has no output in run {}: it {}",
                    crate::progress::step_label(step),
                    run.id,
                    other.label()
                ))),
            }
        }
    }
}

pub fn resolve(store: &dyn StoreRead, text: &str) -> Result<Target, CliError> {
    if let Some((run, step)) = text.split_once(':') {
        return resolve_run_step(store, run, step);
    }
    let prefix = text.to_ascii_lowercase();
    if !is_hex_prefix(&prefix) || prefix.len() < MIN_PREFIX {
        return Err(CliError::usage(format!(
            "`{text}` is not a reference (expected a step key or artifact digest prefix of at \
             least {MIN_PREFIX} hex digits, or RUN:STEP such as `last:train`)"
        )));
    }
    let found = store.find_prefix(&prefix)?;
    match found.as_slice() {
        [] => Err(CliError::usage(format!(
            "no step or artifact in the store starts with `{prefix}`"
        ))),
        [Found::Step(k)] => Ok(Target::Step(*k)),
        [Found::Artifact(a)] => Ok(Target::Artifact(*a)),
        many => {
            let list: Vec<String> = many
                .iter()
                .take(8)
                .map(|f| match f {
                    Found::Step(k) => format!("step {}", k.hex()),
                    Found::Artifact(a) => format!("artifact {}", a.hex()),
                })
                .collect();
            Err(CliError::usage(format!(
                "`{prefix}` is ambiguous; it starts {} records:\n  {}",
                many.len(),
                list.join("\n  ")
            )))
        }
    }
}

fn resolve_run_step(store: &dyn StoreRead, run: &str, step: &str) -> Result<Target, CliError> {
    let record = find_run(store, run)?;
    let (name, filters) = parse_step_ref(step)?;
    let candidates: Vec<usize> = record
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.name == name)
        .filter(|(_, s)| {
            filters.iter().all(|(k, v)| {
                s.bindings
                    .get(k)
                    .is_some_and(|bound| render_short(bound) == *v)
            })
        })
        .map(|(i, _)| i)
        .collect();
    match candidates.as_slice() {
        [one] => Ok(Target::RunStep {
            index: *one,
            run: Box::new(record),
        }),
        [] => {
            if record.steps.iter().any(|s| s.name == name) {
                Err(CliError::usage(format!(
                    "no instance of `{name}` in run {} has those bindings",
                    record.id
                )))
            } else {
                let mut names: Vec<&str> = record.steps.iter().map(|s| s.name.as_str()).collect();
                names.sort_unstable();
                names.dedup();
                Err(CliError::usage(format!(
                    "run {} has no step `{name}` (steps: {})",
                    record.id,
                    names.join(", ")
                )))
            }
        }
        many => {
            let examples: Vec<String> = many
                .iter()
                .take(6)
                .map(|&i| format!("{}:{}", record.id, step_label(&record.steps[i])))
                .collect();
            Err(CliError::usage(format!(
                "`{run}:{step}` matches {} steps of run {}; name the arm, e.g.\n  {}",
                many.len(),
                record.id,
                examples.join("\n  ")
            )))
        }
    }
}

/// `train` or `train[arch=a,lr=0.1]`.
fn parse_step_ref(s: &str) -> Result<(String, Vec<(String, String)>), CliError> {
    let Some((name, rest)) = s.split_once('[') else {
        return Ok((s.to_string(), Vec::new()));
    };
    let inner = rest.strip_suffix(']').ok_or_else(|| {
        CliError::usage(format!(
            "`{s}`: bindings must end with `]`, as in train[arch=a]"
        ))
    })?;
    let filters = inner
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| CliError::usage(format!("`{pair}` in `{s}` is not var=value")))
        })
        .collect::<Result<_, _>>()?;
    Ok((name.to_string(), filters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_refs() {
        assert_eq!(parse_step_ref("train").unwrap(), ("train".into(), vec![]));
        assert_eq!(
            parse_step_ref("train[arch=a, lr=0.1]").unwrap(),
            (
                "train".into(),
                vec![("arch".into(), "a".into()), ("lr".into(), "0.1".into())]
            )
        );
        assert!(parse_step_ref("train[arch=a").is_err());
    }
}
