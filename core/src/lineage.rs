//! Lineage: the steps an artifact came from, or the steps that came from it.
//!
//! Edges follow content, not recipes: a step's ancestors are the producers of the artifacts it
//! read (by digest), so lineage stays true across recipe edits, reruns and sweeps. When several
//! steps produced the same bytes, the most recent producer stands for them.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::Serialize;

use crate::digest::{ArtifactDigest, StepKey};
use crate::store::{Millis, StepRecord, StoreError, StoreRead};
use crate::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Ancestors: what the step read, transitively.
    Up,
    /// Descendants: what read the step's output, transitively.
    Down,
}

#[derive(Debug, Clone, Serialize)]
pub struct LineageGraph {
    pub direction: Direction,
    /// The step the query started from.
    pub root: StepKey,
    /// In breadth-first order from the root (the root first).
    pub steps: Vec<LineageStep>,
    /// Always from the upstream step to the downstream one, whatever the direction.
    pub edges: Vec<LineageEdge>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LineageStep {
    pub key: StepKey,
    pub name: String,
    pub op: String,
    pub bindings: BTreeMap<String, Value>,
    pub params: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    pub output: ArtifactDigest,
    /// End of the latest execution.
    pub ended: Millis,
    pub duration_ms: u64,
    /// Hops from the root.
    pub depth: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct LineageEdge {
    pub from: StepKey,
    pub to: StepKey,
    pub input: String,
    pub artifact: ArtifactDigest,
}

/// The step that produced `artifact` most recently, if any is recorded.
pub fn producer(
    store: &dyn StoreRead,
    artifact: &ArtifactDigest,
) -> Result<Option<StepRecord>, StoreError> {
    let mut records = Vec::new();
    for key in store.producers(artifact)? {
        if let Some(rec) = store.step(&key)? {
            records.push(rec);
        }
    }
    Ok(latest_producer(artifact, &records).cloned())
}

/// Of `records` (in key order), the one lineage shows as the producer of `artifact`: the
/// latest to end among those whose current output it is (a forced re-execution may have
/// moved a record's output on). `gc` keeps exactly this one, so lineage reads the same after.
pub fn latest_producer<'a>(
    artifact: &ArtifactDigest,
    records: impl IntoIterator<Item = &'a StepRecord>,
) -> Option<&'a StepRecord> {
    let mut best: Option<&StepRecord> = None;
    for rec in records {
        if rec.output != *artifact {
            continue;
        }
        if best.is_none_or(|b| last_ended(rec) > last_ended(b)) {
            best = Some(rec);
        }
    }
    best
}

fn last_ended(r: &StepRecord) -> Millis {
    r.executions.last().map_or(0, |e| e.ended)
}

fn to_step(r: &StepRecord, depth: usize) -> LineageStep {
    let last = r.executions.last();
    LineageStep {
        key: r.key,
        name: r.name.clone(),
        op: r.spec.op.clone(),
        bindings: r.bindings.clone(),
        params: r.spec.params.clone(),
        cmd: r.spec.cmd.clone(),
        output: r.output,
        ended: last.map_or(0, |e| e.ended),
        duration_ms: last.map_or(0, |e| e.ended.saturating_sub(e.started)),
        depth,
    }
}

/// Walk from `root` in `direction`, breadth first.
pub fn walk(
    store: &dyn StoreRead,
    root: &StepKey,
    direction: Direction,
) -> Result<LineageGraph, StoreError> {
    let first = store
        .step(root)?
        .ok_or_else(|| StoreError::corrupt(format!("no step record for `{root}`")))?;
    let mut seen: HashSet<StepKey> = HashSet::from([first.key]);
    let mut steps = vec![to_step(&first, 0)];
    let mut edges = Vec::new();
    let mut queue = VecDeque::from([(first, 0usize)]);

    while let Some((rec, depth)) = queue.pop_front() {
        let next: Vec<(StepRecord, LineageEdge)> = match direction {
            Direction::Up => {
                let mut out = Vec::new();
                for (input, digests) in &rec.spec.inputs {
                    for artifact in digests.artifacts() {
                        if let Some(up) = producer(store, &artifact)? {
                            let edge = LineageEdge {
                                from: up.key,
                                to: rec.key,
                                input: input.clone(),
                                artifact,
                            };
                            out.push((up, edge));
                        }
                    }
                }
                out
            }
            Direction::Down => {
                let mut out = Vec::new();
                for key in store.consumers(&rec.output)? {
                    let Some(down) = store.step(&key)? else {
                        continue;
                    };
                    for (input, digests) in &down.spec.inputs {
                        if digests.artifacts().contains(&rec.output) {
                            let edge = LineageEdge {
                                from: rec.key,
                                to: down.key,
                                input: input.clone(),
                                artifact: rec.output,
                            };
                            out.push((down.clone(), edge));
                        }
                    }
                }
                out
            }
        };
        for (other, edge) in next {
            edges.push(edge);
            if seen.insert(other.key) {
                steps.push(to_step(&other, depth + 1));
                queue.push_back((other, depth + 1));
            }
        }
    }
    Ok(LineageGraph {
        direction,
        root: *root,
        steps,
        edges,
    })
}
