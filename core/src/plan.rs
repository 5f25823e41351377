//! Plans: the DAG of a recipe's *unique* steps, before anything runs.
//!
//! An [`Expansion`] has one instance per (step, restriction of the sweep). Two instances with
//! the same op, version, params, argv, code and upstream nodes are the same work; the plan
//! merges them into one [`PlanNode`] identified by its structural [`StepId`] and shared by the
//! union of their arms. This is how a sweep runs a step that no swept var reaches once.
//!
//! A node's *content key* ([`StepKey`]) additionally needs its inputs' output digests, so it is
//! known only once its upstream is cached or has run: see [`PlanNode::spec`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use petgraph::Direction;
use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::digest::{ArtifactDigest, BlobDigest, StepId};
use crate::recipe::{
    Arm, Expansion, InstanceInput, Recipe, Resources, RetryPolicy, bindings_label,
};
use crate::store::{GatherMember, InputDigests, StepSpec};
use crate::value::Value;

/// A recipe's unique steps, topologically ordered (inputs before consumers).
#[derive(Debug, Clone)]
pub struct Plan {
    pub recipe: Recipe,
    pub arms: Vec<Arm>,
    pub nodes: Vec<PlanNode>,
    /// Step instances before merging: the sum over arms of the steps each arm runs.
    pub instances: usize,
}

#[derive(Debug, Clone)]
pub struct PlanNode {
    pub id: StepId,
    /// Index into `recipe.steps`.
    pub step: usize,
    pub name: String,
    pub op: String,
    pub op_version: u32,
    pub bindings: BTreeMap<String, Value>,
    /// Indices into [`Plan::arms`], ascending.
    pub arms: Vec<u32>,
    pub params: BTreeMap<String, Value>,
    pub cmd: Option<Vec<String>>,
    /// Code file (relative to the recipe dir, `/`-separated) → content digest.
    pub code: BTreeMap<String, BlobDigest>,
    pub inputs: BTreeMap<String, NodeInput>,
    pub resources: Resources,
    pub retries: RetryPolicy,
    pub timeout: Option<Duration>,
}

/// An input of a node, by node index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeInput {
    One(usize),
    /// (label of the upstream instance's bindings, node index), in the expansion's order.
    Gather(Vec<(String, usize)>),
}

impl NodeInput {
    pub fn nodes(&self) -> Vec<usize> {
        match self {
            NodeInput::One(i) => vec![*i],
            NodeInput::Gather(members) => members.iter().map(|(_, i)| *i).collect(),
        }
    }
}

/// Hashes `code` files while a plan is built. `needle plan` only hashes; `needle run` also
/// copies the bytes into the store, so what ran can always be shown.
pub trait CodeHasher {
    fn hash_file(&mut self, path: &Path) -> std::io::Result<BlobDigest>;
}

/// Hashes without storing.
pub struct HashOnly;

impl CodeHasher for HashOnly {
    fn hash_file(&mut self, path: &Path) -> std::io::Result<BlobDigest> {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(path)?)?;
        Ok(BlobDigest::from_hasher(&h))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("could not read code file `{path}` of step `{step}`")]
    Code {
        step: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("code path `{path}` of step `{step}` holds a file name that is not UTF-8")]
    CodeName { step: String, path: PathBuf },
}

/// Build the plan: hash code files, give every instance its structural id, merge equal ones.
pub fn build(
    recipe: Recipe,
    expansion: Expansion,
    hasher: &mut dyn CodeHasher,
) -> Result<Plan, PlanError> {
    let mut code_cache: HashMap<String, BTreeMap<String, BlobDigest>> = HashMap::new();
    let mut nodes: Vec<PlanNode> = Vec::new();
    let mut by_id: HashMap<StepId, usize> = HashMap::new();
    // instance index → node index
    let mut node_of: Vec<usize> = Vec::with_capacity(expansion.instances.len());
    let mut instances = 0usize;

    for inst in &expansion.instances {
        let def = &recipe.steps[inst.step];
        instances += inst.arms.len();

        let mut code = BTreeMap::new();
        for entry in &def.code {
            if !code_cache.contains_key(entry) {
                let files = hash_code_entry(&recipe.source.dir, entry, &def.name, hasher)?;
                code_cache.insert(entry.clone(), files);
            }
            code.extend(code_cache[entry].iter().map(|(k, v)| (k.clone(), *v)));
        }

        let inputs: BTreeMap<String, NodeInput> = inst
            .inputs
            .iter()
            .map(|(name, input)| {
                let resolved = match input {
                    InstanceInput::One(i) => NodeInput::One(node_of[*i]),
                    InstanceInput::Gather(members) => NodeInput::Gather(
                        members
                            .iter()
                            .map(|i| {
                                let label = bindings_label(&expansion.instances[*i].bindings);
                                (label, node_of[*i])
                            })
                            .collect(),
                    ),
                };
                (name.clone(), resolved)
            })
            .collect();

        let id = structural_id(
            &def.op,
            def.op_version,
            &inst.params,
            inst.cmd.as_deref(),
            &code,
            &inputs,
            &nodes,
        );
        match by_id.get(&id) {
            Some(&n) => {
                let node = &mut nodes[n];
                node.arms.extend(inst.arms.iter().copied());
                node.arms.sort_unstable();
                node.arms.dedup();
                node_of.push(n);
            }
            None => {
                by_id.insert(id, nodes.len());
                node_of.push(nodes.len());
                nodes.push(PlanNode {
                    id,
                    step: inst.step,
                    name: def.name.clone(),
                    op: def.op.clone(),
                    op_version: def.op_version,
                    bindings: inst.bindings.clone(),
                    arms: inst.arms.clone(),
                    params: inst.params.clone(),
                    cmd: inst.cmd.clone(),
                    code,
                    inputs,
                    resources: def.resources,
                    retries: def.retries,
                    timeout: def.timeout,
                });
            }
        }
    }

    Ok(Plan {
        recipe,
        arms: expansion.arms,
        nodes,
        instances,
    })
}

fn structural_id(
    op: &str,
    op_version: u32,
    params: &BTreeMap<String, Value>,
    cmd: Option<&[String]>,
    code: &BTreeMap<String, BlobDigest>,
    inputs: &BTreeMap<String, NodeInput>,
    nodes: &[PlanNode],
) -> StepId {
    let inputs: BTreeMap<&str, Value> = inputs
        .iter()
        .map(|(name, input)| {
            let v = match input {
                NodeInput::One(i) => Value::String(nodes[*i].id.hex()),
                NodeInput::Gather(members) => Value::Array(
                    members
                        .iter()
                        .map(|(label, i)| {
                            Value::Array(vec![
                                Value::String(label.clone()),
                                Value::String(nodes[*i].id.hex()),
                            ])
                        })
                        .collect(),
                ),
            };
            (name.as_str(), v)
        })
        .collect();
    let v = serde_json::json!({
        "op": op,
        "op_version": op_version,
        "params": params,
        "cmd": cmd,
        "code": code,
        "inputs": inputs,
    });
    StepId::of_parts(&[&crate::canonical::encode(&v)])
}

/// Hash one `code` entry: a file, or every file under a directory (sorted).
fn hash_code_entry(
    dir: &Path,
    entry: &str,
    step: &str,
    hasher: &mut dyn CodeHasher,
) -> Result<BTreeMap<String, BlobDigest>, PlanError> {
    let root = dir.join(entry);
    let mut files = Vec::new();
    collect_files(&root, &mut files).map_err(|source| PlanError::Code {
        step: step.to_string(),
        path: root.clone(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(dir).unwrap_or(&file);
        let rel = rel_string(rel).ok_or_else(|| PlanError::CodeName {
            step: step.to_string(),
            path: file.clone(),
        })?;
        let digest = hasher.hash_file(&file).map_err(|source| PlanError::Code {
            step: step.to_string(),
            path: file.clone(),
            source,
        })?;
        out.insert(rel, digest);
    }
    Ok(out)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for e in entries {
            collect_files(&e, out)?;
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn rel_string(rel: &Path) -> Option<String> {
    let parts: Option<Vec<&str>> = rel
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .map(|c| c.as_os_str().to_str())
        .collect();
    Some(parts?.join("/"))
}

impl Plan {
    /// The plan as a graph: node `i` is `nodes[i]`, an edge runs from an upstream node to the
    /// node reading it, labelled with the input name (once per pair, however many gathered
    /// instances of the upstream merged into it).
    pub fn graph(&self) -> DiGraph<(), String> {
        let mut g = DiGraph::with_capacity(self.nodes.len(), self.nodes.len());
        for _ in &self.nodes {
            g.add_node(());
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for (name, input) in &node.inputs {
                let mut ups = input.nodes();
                ups.sort_unstable();
                ups.dedup();
                for up in ups {
                    g.add_edge(NodeIndex::new(up), NodeIndex::new(i), name.clone());
                }
            }
        }
        g
    }

    /// Indices of the nodes that read `node`'s output, for every node.
    pub fn dependents(&self) -> Vec<Vec<usize>> {
        let g = self.graph();
        g.node_indices()
            .map(|n| {
                let mut ds: Vec<usize> = g
                    .neighbors_directed(n, Direction::Outgoing)
                    .map(|d| d.index())
                    .collect();
                ds.sort_unstable();
                ds.dedup();
                ds
            })
            .collect()
    }

    /// For each node, the number of nodes on the longest path from it to a sink, itself
    /// included. The scheduler starts the longest remaining chain first.
    pub fn remaining_path(&self) -> Vec<u64> {
        let g = self.graph();
        let order = toposort(&g, None).expect("a plan is acyclic: recipes with cycles are refused");
        let mut len = vec![1u64; self.nodes.len()];
        for n in order.into_iter().rev() {
            let longest = g
                .neighbors_directed(n, Direction::Outgoing)
                .map(|d| len[d.index()])
                .max()
                .unwrap_or(0);
            len[n.index()] = 1 + longest;
        }
        len
    }

    /// Arm ids a node belongs to.
    pub fn arm_ids(&self, node: &PlanNode) -> Vec<&str> {
        node.arms
            .iter()
            .map(|&a| self.arms[a as usize].id.as_str())
            .collect()
    }
}

impl PlanNode {
    /// The spec (and so the key) of this node once every input's output is known;
    /// `output_of(node)` gives an upstream node's output, or `None` while it has none.
    pub fn spec(&self, output_of: impl Fn(usize) -> Option<ArtifactDigest>) -> Option<StepSpec> {
        let mut inputs = BTreeMap::new();
        for (name, input) in &self.inputs {
            let digests = match input {
                NodeInput::One(i) => InputDigests::One(output_of(*i)?),
                NodeInput::Gather(members) => InputDigests::Gather(
                    members
                        .iter()
                        .map(|(label, i)| {
                            Some(GatherMember {
                                label: label.clone(),
                                artifact: output_of(*i)?,
                            })
                        })
                        .collect::<Option<Vec<_>>>()?,
                ),
            };
            inputs.insert(name.clone(), digests);
        }
        Some(StepSpec {
            op: self.op.clone(),
            op_version: self.op_version,
            params: self.params.clone(),
            cmd: self.cmd.clone(),
            code: self.code.clone(),
            inputs,
        })
    }

    /// `name` or `name[arch=a,lr=0.1]`: how tables and progress lines name this node.
    pub fn display_name(&self) -> String {
        if self.bindings.is_empty() {
            self.name.clone()
        } else {
            format!("{}[{}]", self.name, bindings_label(&self.bindings))
        }
    }
}
