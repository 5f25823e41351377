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
use std::path::{Path, PathBuf};
use std::time::Duration;

use petgraph::Direction;
use petgraph::algo::toposort;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::digest::{ArtifactDigest, BlobDigest, StepId};
use crate::ops::OpKind;
use crate::recipe::{
    Arm, Expansion, InstanceInput, Recipe, Resources, RetryPolicy, StepDef, bindings_label,
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
    /// How the node runs: its `cmd`, or `needle-worker OP`.
    pub kind: OpKind,
    pub bindings: BTreeMap<String, Value>,
    /// Indices into [`Plan::arms`], ascending.
    pub arms: Vec<u32>,
    pub params: BTreeMap<String, Value>,
    pub cmd: Option<Vec<String>>,
    /// Code file (relative to the recipe dir, `/`-separated) → content digest.
    pub code: BTreeMap<String, BlobDigest>,
    /// `path` param → fingerprint of what is there (see [`fingerprint_path`]).
    pub paths: BTreeMap<String, String>,
    /// `environment` command → digest of what it printed.
    pub environment: BTreeMap<String, String>,
    pub inputs: BTreeMap<String, NodeInput>,
    pub resources: Resources,
    pub retries: RetryPolicy,
    pub timeout: Option<Duration>,
    /// Under `[search]`: the node whose decision says whether this one runs (see
    /// [`crate::recipe::Search`]).
    pub gate: Option<usize>,
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

    /// What an `environment` command prints, digested (hex), run in `dir`. `core` runs no
    /// processes: the binary that plans provides this; without it, a recipe with
    /// `environment` cannot be planned.
    fn probe(&mut self, command: &str, dir: &Path) -> Result<String, ProbeError> {
        let _ = (command, dir);
        Err(ProbeError::CannotRun)
    }
}

/// Why an `environment` command printed nothing a step could be keyed on.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// This planner runs no processes (see [`CodeHasher::probe`]).
    #[error("it cannot be run here")]
    CannotRun,
    #[error("it is empty")]
    Empty,
    #[error("could not run it")]
    Spawn(#[source] std::io::Error),
    /// It exited non-zero: the last line it wrote on stderr.
    #[error("it failed ({status}): {said}")]
    Failed {
        status: std::process::ExitStatus,
        said: String,
    },
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
    #[error("code path `{entry}` of step `{step}`")]
    CodeEntry {
        step: String,
        entry: String,
        #[source]
        source: crate::recipe::CodeError,
    },
    #[error("environment command `{command}` of step `{step}`")]
    Environment {
        step: String,
        command: String,
        #[source]
        source: ProbeError,
    },
    #[error("param `{param}` of step `{step}`: could not read `{path}`")]
    Path {
        step: String,
        param: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Build the plan: hash code files, fingerprint `path` params, give every instance its
/// structural id, merge equal ones.
pub fn build(
    recipe: Recipe,
    expansion: Expansion,
    hasher: &mut dyn CodeHasher,
) -> Result<Plan, PlanError> {
    let mut code_cache: HashMap<String, BTreeMap<String, BlobDigest>> = HashMap::new();
    let mut path_cache: HashMap<PathBuf, String> = HashMap::new();
    let mut probe_cache: HashMap<String, String> = HashMap::new();
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

        let mut paths = BTreeMap::new();
        for param in &def.path_params {
            // The validator checked the type: a path param is a string.
            let Some(Value::String(p)) = inst.params.get(param) else {
                continue;
            };
            let root = recipe.source.dir.join(p);
            let fingerprint = match path_cache.get(&root) {
                Some(f) => f.clone(),
                None => {
                    let f = fingerprint_path(&root).map_err(|source| PlanError::Path {
                        step: def.name.clone(),
                        param: param.clone(),
                        path: root.clone(),
                        source,
                    })?;
                    path_cache.insert(root, f.clone());
                    f
                }
            };
            paths.insert(param.clone(), fingerprint);
        }

        let mut environment = BTreeMap::new();
        for command in &def.environment {
            if !probe_cache.contains_key(command) {
                let digest = hasher
                    .probe(command, &recipe.source.dir)
                    .map_err(|source| PlanError::Environment {
                        step: def.name.clone(),
                        command: command.clone(),
                        source,
                    })?;
                probe_cache.insert(command.clone(), digest);
            }
            environment.insert(command.clone(), probe_cache[command].clone());
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
            def,
            &inst.params,
            inst.cmd.as_deref(),
            Found {
                code: &code,
                paths: &paths,
                environment: &environment,
            },
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
                    kind: def.kind,
                    bindings: inst.bindings.clone(),
                    arms: inst.arms.clone(),
                    params: inst.params.clone(),
                    cmd: inst.cmd.clone(),
                    code,
                    paths,
                    environment,
                    inputs,
                    resources: def.resources,
                    retries: def.retries,
                    timeout: def.timeout,
                    gate: inst.gate,
                });
            }
        }
    }

    // Gates name instances; a gate comes before what it gates, so every one is mapped.
    for node in &mut nodes {
        node.gate = node.gate.map(|g| node_of[g]);
    }
    Ok(Plan {
        recipe,
        arms: expansion.arms,
        nodes,
        instances,
    })
}

/// What an instance's files and commands were found to be when planned: its code files, its
/// `path` params' fingerprints, what its `environment` commands printed.
struct Found<'a> {
    code: &'a BTreeMap<String, BlobDigest>,
    paths: &'a BTreeMap<String, String>,
    environment: &'a BTreeMap<String, String>,
}

fn structural_id(
    def: &StepDef,
    params: &BTreeMap<String, Value>,
    cmd: Option<&[String]>,
    found: Found<'_>,
    inputs: &BTreeMap<String, NodeInput>,
    nodes: &[PlanNode],
) -> StepId {
    let Found {
        code,
        paths,
        environment,
    } = found;
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
    let mut v = serde_json::json!({
        "op": def.op,
        "op_version": def.op_version,
        "params": params,
        "cmd": cmd,
        "code": code,
        "inputs": inputs,
    });
    // Only where there are any, so ids of steps without `path` params stay what they were.
    if !paths.is_empty() {
        v["paths"] = serde_json::json!(paths);
    }
    if !environment.is_empty() {
        v["environment"] = serde_json::json!(environment);
    }
    StepId::of_parts(&[&crate::canonical::encode(&v)])
}

/// Hash one `code` entry: a file, or every file under a directory (sorted).
fn hash_code_entry(
    dir: &Path,
    entry: &str,
    step: &str,
    hasher: &mut dyn CodeHasher,
) -> Result<BTreeMap<String, BlobDigest>, PlanError> {
    let files = crate::recipe::code_files(dir, entry).map_err(|source| PlanError::CodeEntry {
        step: step.to_string(),
        entry: entry.to_string(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for (rel, file) in files {
        let digest = hasher.hash_file(&file).map_err(|source| PlanError::Code {
            step: step.to_string(),
            path: file.clone(),
            source,
        })?;
        out.insert(rel, digest);
    }
    Ok(out)
}

/// The fingerprint (BLAKE3, hex) of the file or directory tree at `root`, following symlinks:
/// for every entry under it, sorted, its path relative to `root`, whether it is a directory,
/// and for a file its size and modification time in nanoseconds.
///
/// Stat only, no hashing: planning stays fast on a dataset of many gigabytes, and any edit
/// that goes through the filesystem (write, copy, touch, `git checkout`) changes an mtime. A
/// rewrite that keeps both size and mtime (`touch -r`, `cp -p` of other bytes) goes unseen; a
/// touch that changes nothing re-runs the step, but its output then has the digest it had, so
/// nothing downstream re-runs.
pub fn fingerprint_path(root: &Path) -> std::io::Result<String> {
    let mut buf = b"needle path fingerprint 1\0".to_vec();
    let mut ancestors = Vec::new();
    fingerprint_entry(root, &mut Vec::new(), &mut ancestors, &mut buf)?;
    Ok(blake3::hash(&buf).to_hex().to_string())
}

fn fingerprint_entry(
    path: &Path,
    rel: &mut Vec<u8>,
    ancestors: &mut Vec<(u64, u64)>,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;

    let meta = std::fs::metadata(path)?;
    buf.extend_from_slice(rel);
    buf.push(0);
    if !meta.is_dir() {
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        buf.push(if meta.is_file() { b'f' } else { b'o' });
        buf.extend_from_slice(&meta.size().to_le_bytes());
        buf.extend_from_slice(&mtime_ns.to_le_bytes());
        return Ok(());
    }
    buf.push(b'd');
    let id = (meta.dev(), meta.ino());
    if ancestors.contains(&id) {
        return Err(std::io::Error::other(format!(
            "`{}` is a symlink loop",
            path.display()
        )));
    }
    ancestors.push(id);
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        fingerprint_entry(&path.join(&name), rel, ancestors, buf)?;
        rel.truncate(len);
    }
    ancestors.pop();
    Ok(())
}

impl Plan {
    /// The plan as a graph: node `i` is `nodes[i]`, an edge runs from an upstream node to the
    /// node reading it, labelled with the input name (once per pair, however many gathered
    /// instances of the upstream merged into it), and from a gate to what it gates (`gate`).
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
            if let Some(gate) = node.gate {
                g.add_edge(NodeIndex::new(gate), NodeIndex::new(i), "gate".into());
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
        self.spec_without(output_of, |_| false)
    }

    /// [`PlanNode::spec`], where the gathered nodes for which `stopped` is true (stopped by a
    /// search) are left out of their gathers.
    pub fn spec_without(
        &self,
        output_of: impl Fn(usize) -> Option<ArtifactDigest>,
        stopped: impl Fn(usize) -> bool,
    ) -> Option<StepSpec> {
        let mut inputs = BTreeMap::new();
        for (name, input) in &self.inputs {
            let digests = match input {
                NodeInput::One(i) => InputDigests::One(output_of(*i)?),
                NodeInput::Gather(members) => InputDigests::Gather(
                    members
                        .iter()
                        .filter(|(_, i)| !stopped(*i))
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
            paths: self.paths.clone(),
            environment: self.environment.clone(),
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use serde_json::json;

    use super::*;
    use crate::ops::{InputsSchema, OpSchema, ParamSpec, ParamType, ParamsSchema, exec_schema};
    use crate::recipe::{RecipeSource, expand, parse};

    fn catalog() -> Vec<OpSchema> {
        vec![
            exec_schema(),
            OpSchema {
                name: "import",
                version: 1,
                summary: "a fake op with a path param",
                kind: OpKind::Builtin,
                params: ParamsSchema::Fixed(vec![ParamSpec {
                    name: "path",
                    ty: ParamType::Path,
                    default: None,
                    doc: "what to import",
                }]),
                inputs: InputsSchema::Fixed(vec![]),
            },
        ]
    }

    const RECIPE: &str = r#"
[recipe]
name = "paths"

[steps.data]
op = "import"
params = { path = "data" }

[steps.one]
op = "import"
params = { path = "data/a.txt" }

[steps.other]
op = "exec"
cmd = ["true"]
"#;

    fn plan_in(dir: &Path, text: &str) -> Result<Plan, PlanError> {
        let source = RecipeSource {
            path: dir.join("recipe.toml"),
            dir: dir.to_path_buf(),
            text: text.to_string(),
        };
        let recipe = parse(source, &[], &catalog()).expect("the recipe parses");
        let expansion = expand(&recipe, &catalog()).expect("the recipe expands");
        build(recipe, expansion, &mut HashOnly)
    }

    /// Step name → key, for a plan without inputs.
    fn keys(plan: &Plan) -> BTreeMap<String, String> {
        plan.nodes
            .iter()
            .map(|n| (n.name.clone(), n.spec(|_| None).unwrap().key().hex()))
            .collect()
    }

    fn project() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/sub")).unwrap();
        std::fs::write(dir.path().join("data/a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("data/sub/b.txt"), "b").unwrap();
        dir
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn touching_a_file_changes_the_keys_that_read_it_and_nothing_else() {
        let dir = project();
        let before = keys(&plan_in(dir.path(), RECIPE).unwrap());
        assert_eq!(
            before,
            keys(&plan_in(dir.path(), RECIPE).unwrap()),
            "planning twice gives the same keys"
        );

        // Reading the files does not count.
        std::fs::read(dir.path().join("data/sub/b.txt")).unwrap();
        assert_eq!(before, keys(&plan_in(dir.path(), RECIPE).unwrap()));

        let later = SystemTime::now() + Duration::from_secs(5);
        set_mtime(&dir.path().join("data/sub/b.txt"), later);
        let after = keys(&plan_in(dir.path(), RECIPE).unwrap());
        assert_ne!(
            before["data"], after["data"],
            "a file under the dir changed"
        );
        assert_eq!(before["one"], after["one"], "`one` reads another file");
        assert_eq!(before["other"], after["other"]);

        set_mtime(&dir.path().join("data/a.txt"), later);
        let again = keys(&plan_in(dir.path(), RECIPE).unwrap());
        assert_ne!(after["data"], again["data"]);
        assert_ne!(after["one"], again["one"]);
        assert_eq!(after["other"], again["other"]);
    }

    #[test]
    fn size_and_new_files_change_the_fingerprint() {
        let dir = project();
        let data = dir.path().join("data");
        let f0 = fingerprint_path(&data).unwrap();
        let a = data.join("a.txt");
        let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
        std::fs::write(&a, "a longer text").unwrap();
        set_mtime(&a, mtime);
        let f1 = fingerprint_path(&data).unwrap();
        assert_ne!(f0, f1, "a new size, with the old mtime");
        std::fs::create_dir(data.join("empty")).unwrap();
        let f2 = fingerprint_path(&data).unwrap();
        assert_ne!(f1, f2, "a new (empty) directory");
    }

    #[test]
    fn symlinks_are_followed_and_loops_refused() {
        let dir = project();
        let data = dir.path().join("data");
        let f0 = fingerprint_path(&data).unwrap();
        std::os::unix::fs::symlink(&data, data.join("sub/loop")).unwrap();
        let err = fingerprint_path(&data).unwrap_err();
        assert!(err.to_string().contains("symlink loop"), "{err}");
        std::fs::remove_file(data.join("sub/loop")).unwrap();
        assert_eq!(f0, fingerprint_path(&data).unwrap());
    }

    #[test]
    fn steps_without_path_params_keep_their_encoding() {
        let dir = project();
        let plan = plan_in(dir.path(), RECIPE).unwrap();
        let other = plan.nodes.iter().find(|n| n.name == "other").unwrap();
        let spec = serde_json::to_value(other.spec(|_| None).unwrap()).unwrap();
        assert!(spec.get("paths").is_none(), "{spec}");
        let data = plan.nodes.iter().find(|n| n.name == "data").unwrap();
        let spec = serde_json::to_value(data.spec(|_| None).unwrap()).unwrap();
        assert_eq!(spec["params"], json!({"path": "data"}));
        assert!(spec["paths"]["path"].is_string(), "{spec}");
        assert_eq!(data.kind, OpKind::Builtin);
        assert_eq!(other.kind, OpKind::Exec);
    }

    #[test]
    fn a_missing_path_names_the_step_and_param() {
        let dir = project();
        let source = |text: &str| RecipeSource {
            path: PathBuf::from("recipe.toml"),
            dir: dir.path().to_path_buf(),
            text: text.to_string(),
        };
        // Missing when the sweep is expanded: a recipe error at the param's value.
        let text = RECIPE.replace("data/a.txt", "data/nope.txt");
        let recipe = parse(source(&text), &[], &catalog()).expect("the recipe parses");
        let err = expand(&recipe, &catalog()).unwrap_err().render_plain();
        assert!(
            err.contains("recipe.toml:11:19: error: param `path` of step `one` names `data/nope.txt`, which does not exist"),
            "{err}"
        );
        // Gone by the time the plan is built: a plan error naming the step and param.
        let recipe = parse(source(RECIPE), &[], &catalog()).expect("the recipe parses");
        let expansion = expand(&recipe, &catalog()).expect("the recipe expands");
        std::fs::remove_file(dir.path().join("data/a.txt")).unwrap();
        let msg = build(recipe, expansion, &mut HashOnly)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("param `path` of step `one`"), "{msg}");
        assert!(msg.contains("a.txt"), "{msg}");
    }
}
