//! The engine's side of `[search]`: a node of a later rung starts only if the decision of the
//! rung before kept an arm of it. The decision is the output of the search step (its gate),
//! read from the store, so a rerun or a resumed search decides as the first did, from the
//! cache.

use std::collections::HashMap;

use needle_core::digest::ArtifactDigest;
use needle_core::plan::{NodeInput, Plan};
use needle_core::search::{DECISION_FILE, Decision, Ranked};
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

/// A rung's decision, indexed by arm (its bindings without the budget, [`Search::arm_key`]):
/// read once per run, then asked about every node of the next rung.
///
/// [`Search::arm_key`]: needle_core::recipe::Search::arm_key
pub struct Rung {
    decision: Decision,
    budget_var: String,
    /// Each arm's best place among the rung's metric steps that hold it.
    places: HashMap<String, Ranked>,
}

impl Rung {
    /// The decision of the search node `gate` (whose output is `output`).
    pub fn read(
        store: &Store,
        plan: &Plan,
        gate: usize,
        output: ArtifactDigest,
    ) -> Result<Rung, DecisionError> {
        let decision = read_decision(store, output)?;
        let search = (plan.recipe.search.as_ref()).ok_or(DecisionError::NoSearch)?;
        let mut places: HashMap<String, Ranked> = HashMap::new();
        if let Some(NodeInput::Gather(members)) = plan.nodes[gate].inputs.get("metrics") {
            for (label, m) in members {
                let Some(ranked) = decision.arm(label) else {
                    continue;
                };
                for &a in &plan.nodes[*m].arms {
                    let key = search.arm_key(&plan.arms[a as usize].bindings);
                    let better = places.get(&key).is_none_or(|p| ranked.rank < p.rank);
                    if better {
                        places.insert(key, ranked.clone());
                    }
                }
            }
        }
        Ok(Rung {
            decision,
            budget_var: search.budget.clone(),
            places,
        })
    }

    /// Whether `node` of the next rung goes on: when one of its arms was kept.
    pub fn verdict(&self, plan: &Plan, node: usize) -> Verdict {
        let search = plan
            .recipe
            .search
            .as_ref()
            .expect("a rung comes from a search");
        let best = (plan.nodes[node].arms.iter())
            .filter_map(|&a| {
                self.places
                    .get(&search.arm_key(&plan.arms[a as usize].bindings))
            })
            .min_by_key(|r| r.rank);
        let d = &self.decision;
        match best {
            Some(r) if r.kept => Verdict::Go,
            None => Verdict::Stop(format!(
                "stopped: no arm of it was ranked at rung {}",
                d.rung + 1
            )),
            Some(best) => Verdict::Stop(format!(
                "stopped at rung {} of {} ({} = {}): {} {} ranked {} of {}, the best {} went on",
                d.rung + 1,
                d.rungs,
                self.budget_var,
                render(&d.budget),
                d.metric,
                best.value,
                best.rank,
                d.arms.len(),
                d.kept()
            )),
        }
    }
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
    /// A gate in a plan without `[search]`: a bug in the plan, not in the store.
    #[error("the plan has no `[search]`")]
    NoSearch,
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
