//! Model-based test of the store, in the style of sled's `tests/tree/mod.rs`: random sequences
//! of operations, reopens, crashes, gc, pins, repairs of damaged blobs and rebuilds from the
//! journal included, each checked against an in-memory model, and by `verify` (which also
//! checks that the journal replays to exactly the metadata).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use needle_core::digest::{ArtifactDigest, BlobDigest, StepId, StepKey};
use needle_core::store::{
    EntryKind, Execution, Found, GatherMember, GcOptions, InputDigests, LockMode, Manifest,
    ManifestEntry, PinRecord, RunRecord, RunState, RunStep, RunSummary, StepCommit, StepRecord,
    StepSpec, StepStatus, Store, StoreError,
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
    /// Pin, or unpin, a recorded artifact.
    Pin(u8),
    Unpin(u8),
    /// gc keeping every run, or the last few.
    Gc(Option<u8>),
    /// Go on from a copy of the store's files taken while it is open: what a SIGKILL after the
    /// last operation leaves.
    Crash,
    /// Rebuild the metadata from the journal, after doing this to `meta/`.
    Rebuild(MetaDamage),
    /// Overwrite a blob of a recorded artifact, then `verify --repair`.
    Repair(u8),
}

#[derive(Debug, Clone, Copy)]
enum MetaDamage {
    /// Nothing: a rebuild of a healthy store.
    None,
    Deleted,
    /// Every file overwritten with garbage.
    Garbage,
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
        1 => any::<u8>().prop_map(Op::Pin),
        1 => any::<u8>().prop_map(Op::Unpin),
        1 => prop::option::of(0u8..3).prop_map(Op::Gc),
        1 => Just(Op::Crash),
        1 => prop_oneof![
            Just(MetaDamage::None),
            Just(MetaDamage::Deleted),
            Just(MetaDamage::Garbage)
        ]
        .prop_map(Op::Rebuild),
        1 => any::<u8>().prop_map(Op::Repair),
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
    pins: BTreeMap<ArtifactDigest, PinRecord>,
    /// Artifacts a repair dropped (runs and pins may still name them).
    dropped: BTreeSet<ArtifactDigest>,
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
    /// Its key is its spec's (`verify` checks): the op's `key` number and its inputs, so the
    /// same number with the same inputs is a forced re-execution.
    fn record(&self, s: &StepOp, output: ArtifactDigest, run: u64) -> StepRecord {
        let mut spec = StepSpec::bare("exec", 1, self.inputs(s));
        spec.params.insert("n".into(), i64::from(s.key).into());
        let key = spec.key();
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
            spec,
            output,
        );
        record.executions = executions;
        record
    }

    fn apply_commit(&mut self, c: &StepCommit, tree: Tree) {
        let r = &c.record;
        self.dropped.remove(&r.output);
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

/// Overwrite the first blob of the `i`-th artifact holding one; `None` when none does.
fn damage_a_blob(store: &Store, model: &Model, i: u8) -> Option<BlobDigest> {
    let blobs: Vec<BlobDigest> = model
        .artifacts
        .iter()
        .filter_map(|a| {
            model.manifests[a]
                .0
                .entries
                .iter()
                .find_map(|e| match e.kind {
                    EntryKind::File { blob, .. } => Some(blob),
                    EntryKind::Dir => None,
                })
        })
        .collect();
    let blob = *blobs.get(i as usize % blobs.len().max(1))?;
    let path = store.blob_path(&blob);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, b"damaged behind the store's back").unwrap();
    Some(blob)
}

impl Model {
    /// What a repair drops with a damaged blob: every manifest listing it, every step whose
    /// output is one of them, and their index entries; steps that read them stay.
    fn drop_blob(&mut self, blob: BlobDigest) {
        let gone: BTreeSet<ArtifactDigest> = self
            .manifests
            .iter()
            .filter(|(_, (m, _))| {
                m.entries
                    .iter()
                    .any(|e| matches!(e.kind, EntryKind::File { blob: b, .. } if b == blob))
            })
            .map(|(a, _)| *a)
            .collect();
        let steps: BTreeSet<StepKey> = self
            .steps
            .iter()
            .filter(|(_, r)| gone.contains(&r.output))
            .map(|(k, _)| *k)
            .collect();
        self.manifests.retain(|a, _| !gone.contains(a));
        self.artifacts.retain(|a| !gone.contains(a));
        self.steps.retain(|k, _| !steps.contains(k));
        self.producers
            .retain(|(a, k)| !gone.contains(a) && !steps.contains(k));
        self.consumers.retain(|(_, k)| !steps.contains(k));
        self.dropped.extend(gone);
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

/// A run whose finished steps name artifacts the model holds (a run record names only what
/// was committed, or `verify` would say it is lost); with none yet, they are pending.
fn run_record(id: u64, statuses: &[u8], artifacts: &[ArtifactDigest]) -> RunRecord {
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
            .enumerate()
            .map(|(i, s)| {
                let out = (!artifacts.is_empty()).then(|| artifacts[i % artifacts.len()]);
                RunStep {
                    id: StepId::of_parts(&[&[*s]]),
                    name: format!("s{s}"),
                    op: "exec".into(),
                    bindings: BTreeMap::new(),
                    arms: vec![0],
                    inputs: BTreeMap::new(),
                    key: None,
                    status: match (s, out) {
                        (1, Some(output)) => StepStatus::Cached { output },
                        (2, Some(output)) => StepStatus::Succeeded { output },
                        (0..=2, _) => StepStatus::Pending,
                        (3, _) => StepStatus::Failed {
                            reason: "no".into(),
                        },
                        (4, _) => StepStatus::Skipped {
                            upstream: "s3".into(),
                        },
                        _ => StepStatus::Interrupted,
                    },
                    attempts: vec![],
                }
            })
            .collect(),
    }
}

fn check(store: &Store, model: &Model) {
    for (key, record) in &model.steps {
        assert_eq!(store.step(key).unwrap().as_ref(), Some(record));
        assert_eq!(store.find_prefix(&key.hex()).unwrap(), [Found::Step(*key)]);
    }
    let counts = store.counts().unwrap();
    assert_eq!(counts.steps, model.steps.len());
    assert_eq!(counts.artifacts, model.manifests.len());
    assert_eq!(counts.runs, model.runs.len());
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
    let pins: Vec<(ArtifactDigest, PinRecord)> =
        model.pins.iter().map(|(a, p)| (*a, p.clone())).collect();
    assert_eq!(store.pins().unwrap(), pins);
    let report = store.verify(false).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(
        report.journal_records,
        Some(store.raw_records().unwrap().values().map(Vec::len).sum())
    );
}

/// After a gc, drop from the model what the store no longer holds, having checked that gc kept
/// what the kept runs and the pins need.
fn after_gc(store: &Store, model: &mut Model, keep_last: Option<usize>) {
    let kept: BTreeSet<u64> = match keep_last {
        Some(n) => model.runs.keys().rev().take(n).copied().collect(),
        None => model.runs.keys().copied().collect(),
    };
    model.runs.retain(|id, _| kept.contains(id));
    for run in model.runs.values() {
        for s in &run.steps {
            if let Some(out) = s.status.output() {
                assert!(
                    model.dropped.contains(&out) || store.manifest(&out).unwrap().is_some(),
                    "a kept run's output"
                );
            }
        }
    }
    for a in model.pins.keys() {
        assert!(
            model.dropped.contains(a) || store.manifest(a).unwrap().is_some(),
            "a pinned artifact"
        );
    }
    model.steps.retain(|k, _| store.step(k).unwrap().is_some());
    model
        .manifests
        .retain(|a, _| store.manifest(a).unwrap().is_some());
    let manifests = &model.manifests;
    model.artifacts.retain(|a| manifests.contains_key(a));
    let steps = &model.steps;
    model
        .producers
        .retain(|(a, k)| store.producers(a).unwrap().contains(k) && steps.contains_key(k));
    model.consumers.retain(|(_, k)| steps.contains_key(k));
}

/// Copy the tree `from` to `to` (files and directories; modes as they are).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_tree(&src, &dst);
        } else if kind.is_file() {
            fs::copy(&src, &dst).unwrap();
        }
    }
}

fn run_ops(ops: Vec<Op>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut root = tmp.path().join("store");
    let mut crashes = 0;
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
                let record = run_record(id, &statuses, &model.artifacts);
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
            Op::Pin(i) => {
                if model.artifacts.is_empty() {
                    continue;
                }
                let a = model.artifacts[i as usize % model.artifacts.len()];
                let pin = PinRecord {
                    pinned: i as u64,
                    reference: format!("pin {i}"),
                    step: None,
                };
                let new = store.pin(&a, &pin).unwrap();
                assert_eq!(new, !model.pins.contains_key(&a));
                model.pins.entry(a).or_insert(pin);
            }
            Op::Unpin(i) => {
                if model.artifacts.is_empty() {
                    continue;
                }
                let a = model.artifacts[i as usize % model.artifacts.len()];
                assert_eq!(store.unpin(&a).unwrap(), model.pins.remove(&a).is_some());
            }
            Op::Gc(keep) => {
                let keep_last = keep.map(usize::from);
                let plan = store.gc_plan(GcOptions { keep_last }).unwrap();
                store.gc_apply(&plan).unwrap();
                after_gc(&store, &mut model, keep_last);
            }
            Op::Crash => {
                crashes += 1;
                let copy = tmp.path().join(format!("crashed-{crashes}"));
                copy_tree(&root, &copy);
                drop(store);
                root = copy;
                store = Store::open(&root, LockMode::Fail).unwrap();
            }
            Op::Rebuild(damage) => {
                let before = store.raw_records().unwrap();
                drop(store);
                let meta = root.join("meta");
                match damage {
                    MetaDamage::None => {}
                    MetaDamage::Deleted => fs::remove_dir_all(&meta).unwrap(),
                    MetaDamage::Garbage => {
                        for entry in fs::read_dir(&meta).unwrap().flatten() {
                            if entry.file_type().unwrap().is_file() {
                                let len = entry.metadata().unwrap().len().max(1) as usize;
                                fs::write(entry.path(), vec![0x5a; len]).unwrap();
                            }
                        }
                    }
                }
                let (rebuilt, report) = Store::rebuild(&root, LockMode::Fail, true).unwrap();
                store = rebuilt;
                assert_eq!(store.raw_records().unwrap(), before, "after {damage:?}");
                assert!(report.verify.problems.is_empty(), "{:#?}", report.verify);
                assert_eq!(report.stopped, None);
            }
            Op::Repair(i) => {
                let Some(blob) = damage_a_blob(&store, &model, i) else {
                    continue;
                };
                let repaired = store.repair().unwrap();
                assert!(
                    !repaired.before.problems.is_empty(),
                    "the damage was not seen"
                );
                model.drop_blob(blob);
                assert!(repaired.after.problems.is_empty(), "{:#?}", repaired.after);
            }
        }
        check(&store, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

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
        Op::Pin(1),
        Op::Pin(1),
        Op::Repair(1),
        Op::PutRun {
            replace: None,
            statuses: vec![2, 2],
        },
        Op::Repair(0),
        Op::Commit(vec![s(0, &[(0, b"a"), (1, b"b")], vec![])]),
        Op::Rebuild(MetaDamage::Deleted),
        Op::Crash,
        Op::Commit(vec![s(4, &[(2, b"e")], vec![vec![2]])]),
        Op::PutRun {
            replace: None,
            statuses: vec![2, 1],
        },
        Op::Gc(Some(1)),
        Op::Rebuild(MetaDamage::Garbage),
        Op::Unpin(1),
        Op::Gc(Some(0)),
        Op::Rebuild(MetaDamage::None),
        Op::Reopen,
    ]);
}
