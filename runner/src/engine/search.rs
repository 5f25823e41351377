//! The engine's side of `[search]`: a node of a later rung starts only if the decision of the
//! rung before kept an arm of it. The decision is the output of the search step (its gate),
//! read from the store, so a rerun or a resumed search decides as the first did, from the
//! cache.

use std::collections::HashSet;

use needle_core::digest::ArtifactDigest;
use needle_core::plan::{NodeInput, Plan};
use needle_core::search::{DECISION_FILE, Decision};
use needle_core::store::{EntryKind, Store, StoreError};
use needle_core::value::Value;

/// What a gate's decision says of a node.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Go,
    /// Not kept: why, in words.
    Stop(String),
    /// The decision cannot be read.
    Unreadable(String),
}

/// The decision of the search node `gate` (whose output is `output`) on node `node`: it goes
/// on when one of its arms is one of a kept metric node's arms, the budget aside.
pub fn verdict(
    store: &Store,
    plan: &Plan,
    gate: usize,
    node: usize,
    output: ArtifactDigest,
) -> Verdict {
    let decision = match read_decision(store, output) {
        Ok(d) => d,
        Err(e) => return Verdict::Unreadable(needle_core::error_chain::joined(&e, ": ")),
    };
    let Some(search) = &plan.recipe.search else {
        return Verdict::Go;
    };
    let arm_key = |a: u32| {
        let mut b = plan.arms[a as usize].bindings.clone();
        b.remove(&search.budget);
        needle_core::canonical::to_string(&serde_json::json!(b))
    };
    let mine: HashSet<String> = plan.nodes[node].arms.iter().map(|&a| arm_key(a)).collect();
    let members: Vec<(String, usize)> = match plan.nodes[gate].inputs.get("metrics") {
        Some(NodeInput::Gather(members)) => members.clone(),
        _ => Vec::new(),
    };
    // This node's arms' places in the rung: the members that share one of its arms.
    let mut places = Vec::new();
    for (label, m) in &members {
        if plan.nodes[*m]
            .arms
            .iter()
            .any(|&a| mine.contains(&arm_key(a)))
            && let Some(ranked) = decision.arm(label)
        {
            if ranked.kept {
                return Verdict::Go;
            }
            places.push(ranked);
        }
    }
    let Some(best) = places.iter().min_by_key(|r| r.rank) else {
        return Verdict::Stop(format!(
            "stopped: no arm of it was ranked at rung {}",
            decision.rung + 1
        ));
    };
    Verdict::Stop(format!(
        "stopped at rung {} of {} ({} = {}): {} {} ranked {} of {}, the best {} went on",
        decision.rung + 1,
        decision.rungs,
        search.budget,
        render(&decision.budget),
        decision.metric,
        best.value,
        best.rank,
        decision.arms.len(),
        decision.kept()
    ))
}

fn render(v: &Value) -> String {
    needle_core::value::render_short(v)
}

/// Why a search step's decision could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    #[error("the search's output {0} cannot be read")]
    Store(String, #[source] StoreError),
    #[error("the search's output {0} is not in the store")]
    Missing(String),
    #[error("the search's output {0} has no `{DECISION_FILE}`")]
    NoFile(String),
    #[error("could not read `{}`", .0.display())]
    Read(std::path::PathBuf, #[source] std::io::Error),
    #[error("`{DECISION_FILE}` of {0} is not a decision")]
    Parse(String, #[source] serde_json::Error),
}

/// The decision a search step's output holds.
pub fn read_decision(store: &Store, output: ArtifactDigest) -> Result<Decision, DecisionError> {
    let short = || output.short().to_string();
    let manifest = store
        .manifest(&output)
        .map_err(|e| DecisionError::Store(short(), e))?
        .ok_or_else(|| DecisionError::Missing(short()))?;
    let blob = manifest
        .entries
        .iter()
        .find_map(|e| match &e.kind {
            EntryKind::File { blob, .. } if e.path == DECISION_FILE => Some(*blob),
            _ => None,
        })
        .ok_or_else(|| DecisionError::NoFile(short()))?;
    let path = store.blob_path(&blob);
    let bytes = std::fs::read(&path).map_err(|e| DecisionError::Read(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| DecisionError::Parse(short(), e))
}
