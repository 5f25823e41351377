//! Model-based test of the store, in the style of sled's `tests/tree/mod.rs`: random sequences
//! of operations, reopens included, each checked against an in-memory model.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use needle_core::digest::{ArtifactDigest, BlobDigest, StepId, StepKey};
use needle_core::store::{
    EntryKind, Execution, Found, GatherMember, InputDigests, LockMode, Manifest, ManifestEntry,
    RunRecord, RunState, RunStep, RunSummary, StepCommit, StepRecord, StepSpec, StepStatus, Store,
    StoreError,
};
use proptest::prelude::*;

/// One step to commit: its key (from a small space, so keys recur: a forced re-execution),
/// its output files and its inputs (indices into the artifacts known so far).
#[derive(Debug, Clone)]
struct StepOp {
    key: u8,
    /// File number → bytes; file `n` goes to `d{n % 3}/f{n}`.
    files: BTreeMap<u8, Vec<u8>>,
    empty_dir: bool,
    /// Each input: one artifact, or a gather of several.
    inputs: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum Op {
    /// Absorb and commit one or more steps in one call.
    Commit(Vec<StepOp>),
    /// A batch whose last step's manifest names a blob that is not in the store: refused whole.
    BadCommit(Vec<StepOp>),
    /// A new run, or (`Some`) a replacement of a recorded one.
    PutRun {
        replace: Option<u8>,
        statuses: Vec<u8>,
    },
    View(u8),
    Reopen,
}

fn step_op() -> impl Strategy<Value = StepOp> {
    (
        0u8..12,
        prop::collection::btree_map(0u8..6, prop::collection::vec(0u8..3, 0..4), 0..4),
        prop::bool::weighted(0.2),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..3), 0..3),
    )
        .prop_map(|(key, files, empty_dir, inputs)| StepOp {
            key,
            files,
            empty_dir,
            inputs,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(step_op(), 1..4).prop_map(Op::Commit),
        1 => prop::collection::vec(step_op(), 1..3).prop_map(Op::BadCommit),
        2 => (prop::option::of(any::<u8>()), prop::collection::vec(0u8..6, 0..6))
            .prop_map(|(replace, statuses)| Op::PutRun { replace, statuses }),
        1 => any::<u8>().prop_map(Op::View),
        1 => Just(Op::Reopen),
    ]
}

/// A tree of output files: path → bytes (`None`: an empty dir).
type Tree = BTreeMap<String, Option<Vec<u8>>>;

#[derive(Default)]
struct Model {
    steps: BTreeMap<StepKey, StepRecord>,
    /// Artifacts in commit order (inputs pick from them), with their files.
    artifacts: Vec<ArtifactDigest>,
    manifests: BTreeMap<ArtifactDigest, (Manifest, Tree)>,
    producers: BTreeSet<(ArtifactDigest, StepKey)>,
    consumers: BTreeSet<(ArtifactDigest, StepKey)>,
    runs: BTreeMap<u64, RunRecord>,
    last_run_id: u64,
}

/// The tree a step op writes: path → bytes (`None`: an empty dir).
fn tree_of(s: &StepOp) -> Tree {
    let mut tree: Tree = s
        .files
        .iter()
        .map(|(n, bytes)| (format!("d{}/f{n}", n % 3), Some(bytes.clone())))
        .collect();
    if s.empty_dir {
        tree.insert("e/mpty".into(), None);
    }
    tree
}

/// The manifest the model expects for `tree`, computed without the store.
fn expected_manifest(tree: &Tree) -> Manifest {
    Manifest {
        entries: tree
            .iter()
            .map(|(path, bytes)| ManifestEntry {
                path: path.clone(),
                kind: match bytes {
                    Some(b) => EntryKind::File {
                        blob: BlobDigest::from_bytes(*blake3::hash(b).as_bytes()),
                        size: b.len() as u64,
                        executable: false,
                    },
                    None => EntryKind::Dir,
                },
            })
            .collect(),
    }
}

fn key_of(n: u8) -> StepKey {
    StepKey::of_parts(&[b"model step", &[n]])
}

impl Model {
    fn inputs(&self, s: &StepOp) -> BTreeMap<String, InputDigests> {
        if self.artifacts.is_empty() {
            return BTreeMap::new();
        }
        let pick = |i: &u8| self.artifacts[*i as usize % self.artifacts.len()];
        s.inputs
            .iter()
            .enumerate()
            .map(|(i, members)| {
                let input = if members.len() == 1 {
                    InputDigests::One(pick(&members[0]))
                } else {
                    InputDigests::Gather(
                        members
                            .iter()
                            .map(|m| GatherMember {
                                label: format!("x={m}"),
                                artifact: pick(m),
                            })
                            .collect(),
                    )
                };
                (format!("in{i}"), input)
            })
            .collect()
    }

    /// The record a commit of `s` writes: a previous record of the key gets an execution more.
    fn record(&self, s: &StepOp, output: ArtifactDigest, run: u64) -> StepRecord {
        let key = key_of(s.key);
        let mut executions = self
            .steps
            .get(&key)
            .map(|r| r.executions.clone())
            .unwrap_or_default();
        executions.push(Execution {
            run,
            attempt: 1,
            started: 10,
            ended: 20,
            output,
            gpus: vec![],
            gpu_share: None,
            gpu_mem_gb: None,
            cpus: 1,
            log: Store::log_rel_path(&key, run, 1),
            job: None,
        });
        let mut record = StepRecord::new(
            key,
            StepId::of_parts(&[key.as_bytes()]),
            &format!("step{}", s.key),
            StepSpec::bare("exec", 1, self.inputs(s)),
            output,
        );
        record.executions = executions;
        record
    }

    fn apply_commit(&mut self, c: &StepCommit, tree: Tree) {
        let r = &c.record;
        if !self.manifests.contains_key(&r.output) {
            self.artifacts.push(r.output);
            self.manifests.insert(r.output, (c.manifest.clone(), tree));
        }
        self.producers.insert((r.output, r.key));
        for input in r.spec.inputs.values() {
            for a in input.artifacts() {
                self.consumers.insert((a, r.key));
            }
        }
        self.steps.insert(r.key, r.clone());
    }
}

fn write_tree(dir: &Path, tree: &Tree) {
    for (path, bytes) in tree {
        let p = dir.join(path);
        match bytes {
            Some(b) => {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, b).unwrap();
            }
            None => fs::create_dir_all(&p).unwrap(),
        }
    }
}

fn run_record(id: u64, statuses: &[u8]) -> RunRecord {
    let out = ArtifactDigest::of_parts(&[b"out"]);
    RunRecord {
        id,
        recipe_name: "model".into(),
        recipe_path: "recipes/model.toml".into(),
        recipe_dir: "/nowhere".into(),
        recipe_text: "[recipe]\nname = \"model\"\n".into(),
        sets: vec![("n".into(), id.into())],
        rerun_of: None,
        started: id * 1000,
        ended: None,
        state: RunState::Running,
        arms: vec![],
        steps: statuses
            .iter()
            .map(|s| RunStep {
                id: StepId::of_parts(&[&[*s]]),
                name: format!("s{s}"),
                op: "exec".into(),
                bindings: BTreeMap::new(),
                arms: vec![0],
                inputs: BTreeMap::new(),
                key: None,
                status: match s {
                    0 => StepStatus::Pending,
                    1 => StepStatus::Cached { output: out },
                    2 => StepStatus::Succeeded { output: out },
                    3 => StepStatus::Failed {
                        reason: "no".into(),
                    },
                    4 => StepStatus::Skipped {
                        upstream: "s3".into(),
                    },
                    _ => StepStatus::Interrupted,
                },
                attempts: vec![],
            })
            .collect(),
    }
}

fn check(store: &Store, model: &Model) {
    for (key, record) in &model.steps {
        assert_eq!(store.step(key).unwrap().as_ref(), Some(record));
        assert_eq!(store.find_prefix(&key.hex()).unwrap(), [Found::Step(*key)]);
    }
    for n in 0..12 {
        if !model.steps.contains_key(&key_of(n)) {
            assert_eq!(store.step(&key_of(n)).unwrap(), None);
        }
    }
    for (a, (manifest, _)) in &model.manifests {
        assert_eq!(store.manifest(a).unwrap().as_ref(), Some(manifest));
        assert_eq!(store.find_prefix(&a.hex()).unwrap(), [Found::Artifact(*a)]);
        let producers: Vec<StepKey> = model
            .producers
            .range((*a, StepKey::from_bytes([0; 32]))..=(*a, StepKey::from_bytes([255; 32])))
            .map(|(_, k)| *k)
            .collect();
        assert_eq!(store.producers(a).unwrap(), producers);
        let consumers: Vec<StepKey> = model
            .consumers
            .range((*a, StepKey::from_bytes([0; 32]))..=(*a, StepKey::from_bytes([255; 32])))
            .map(|(_, k)| *k)
            .collect();
        assert_eq!(store.consumers(a).unwrap(), consumers);
    }
    let summaries: Vec<RunSummary> = model.runs.values().map(RunSummary::of).collect();
    assert_eq!(store.runs().unwrap(), summaries);
    for (id, run) in &model.runs {
        assert_eq!(store.run(*id).unwrap().as_ref(), Some(run));
    }
}

fn run_ops(ops: Vec<Op>) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let mut store = Store::open(&root, LockMode::Fail).unwrap();
    let mut model = Model::default();
    let mut run = 0u64;

    for op in ops {
        match op {
            Op::Commit(steps) => {
                run += 1;
                let mut commits = vec![];
                let mut trees = vec![];
                for s in &steps {
                    let tree = tree_of(s);
                    let dir = store.new_staging().unwrap();
                    write_tree(&dir, &tree);
                    let manifest = store.absorb_dir(&dir).unwrap();
                    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
                    assert_eq!(manifest, expected_manifest(&tree));
                    let record = model.record(s, manifest.digest(), run);
                    commits.push(StepCommit { record, manifest });
                    trees.push(tree);
                }
                store.commit(&commits).unwrap();
                for (c, tree) in commits.iter().zip(trees) {
                    model.apply_commit(c, tree);
                }
            }
            Op::BadCommit(steps) => {
                run += 1;
                let mut commits = vec![];
                for s in &steps {
                    let tree = tree_of(s);
                    let dir = store.new_staging().unwrap();
                    write_tree(&dir, &tree);
                    let manifest = store.absorb_dir(&dir).unwrap();
                    let record = model.record(s, manifest.digest(), run);
                    commits.push(StepCommit { record, manifest });
                }
                // The last one's output names bytes that were never absorbed.
                let last = commits.last_mut().unwrap();
                last.manifest.entries.push(ManifestEntry {
                    path: "zz-missing".into(),
                    kind: EntryKind::File {
                        blob: BlobDigest::from_bytes(*blake3::hash(b"never stored").as_bytes()),
                        size: 12,
                        executable: false,
                    },
                });
                last.record.output = last.manifest.digest();
                let err = store.commit(&commits).unwrap_err();
                assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            }
            Op::PutRun { replace, statuses } => {
                let id = match replace {
                    Some(i) if !model.runs.is_empty() => *model
                        .runs
                        .keys()
                        .nth(i as usize % model.runs.len())
                        .unwrap(),
                    _ => {
                        let id = store.next_run_id().unwrap();
                        assert_eq!(id, model.last_run_id + 1);
                        model.last_run_id = id;
                        id
                    }
                };
                let record = run_record(id, &statuses);
                store.put_run(&record).unwrap();
                model.runs.insert(id, record);
            }
            Op::View(i) => {
                if model.artifacts.is_empty() {
                    continue;
                }
                let a = model.artifacts[i as usize % model.artifacts.len()];
                let view = store.view(&a).unwrap();
                let (_, tree) = &model.manifests[&a];
                for (path, bytes) in tree {
                    match bytes {
                        Some(b) => assert_eq!(&fs::read(view.join(path)).unwrap(), b),
                        None => assert!(view.join(path).is_dir()),
                    }
                }
                let count = tree.len();
                let mut seen = 0;
                for d in fs::read_dir(&view).unwrap() {
                    for f in fs::read_dir(d.unwrap().path()).unwrap() {
                        let _ = f.unwrap();
                        seen += 1;
                    }
                }
                assert_eq!(seen, count, "nothing more in the view");
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(&root, LockMode::Fail).unwrap();
            }
        }
        check(&store, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..30)) {
        run_ops(ops);
    }
}

/// A sequence that exercises every op at least once, whatever proptest draws.
#[test]
fn store_matches_model_fixed() {
    let s = |key, files: &[(u8, &[u8])], inputs: Vec<Vec<u8>>| StepOp {
        key,
        files: files.iter().map(|(n, b)| (*n, b.to_vec())).collect(),
        empty_dir: key % 2 == 0,
        inputs,
    };
    run_ops(vec![
        Op::Commit(vec![s(0, &[(0, b"a"), (1, b"b")], vec![])]),
        Op::Commit(vec![
            s(1, &[(0, b"a")], vec![vec![0]]),
            s(2, &[(3, b"c")], vec![vec![0, 1]]),
        ]),
        Op::PutRun {
            replace: None,
            statuses: vec![1, 2, 3, 4],
        },
        Op::BadCommit(vec![s(3, &[(1, b"d")], vec![vec![1]])]),
        Op::Reopen,
        // Forced re-execution of step 1 with other bytes.
        Op::Commit(vec![s(1, &[(0, b"other")], vec![vec![0]])]),
        Op::View(2),
        Op::PutRun {
            replace: Some(0),
            statuses: vec![2],
        },
        Op::Reopen,
        Op::PutRun {
            replace: None,
            statuses: vec![],
        },
    ]);
}
