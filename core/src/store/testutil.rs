//! A small laboratory for the store-maintenance tests (gc, repair): steps committed the way
//! the engine commits them, with logs and run records.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::digest::StepId;

pub(crate) struct Lab {
    pub tmp: tempfile::TempDir,
    pub store: Option<Store>,
}

/// A step as a run saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    pub key: StepKey,
    pub output: ArtifactDigest,
    pub cached: bool,
}

impl Lab {
    pub fn new() -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("s"), LockMode::Fail).unwrap();
        Lab {
            tmp,
            store: Some(store),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("s")
    }

    pub fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    pub fn reopen(&mut self) {
        self.store = None;
        self.store = Some(Store::open(&self.root(), LockMode::Fail).unwrap());
    }

    /// Close the store, rebuild its metadata from the journal (hashing every blob in the
    /// verification), and open it again.
    pub fn rebuild(&mut self) -> Rebuilt {
        self.store = None;
        let (store, rebuilt) = Store::rebuild(&self.root(), LockMode::Fail, true).unwrap();
        self.store = Some(store);
        rebuilt
    }

    /// Every record, raw.
    pub fn records(&self) -> RawRecords {
        self.store().raw_records().unwrap()
    }

    /// Execute step `name` in run `run`: write `files`, absorb them, write its log, commit.
    /// `salt` makes its key differ from another step's of the same name and inputs.
    pub fn exec(
        &self,
        run: u64,
        name: &str,
        salt: &str,
        files: &[(&str, &[u8])],
        inputs: &[(&str, ArtifactDigest)],
    ) -> Done {
        let store = self.store();
        let inputs = inputs
            .iter()
            .map(|(n, a)| (n.to_string(), InputDigests::One(*a)))
            .collect();
        let mut spec = StepSpec::bare("exec", 1, inputs);
        spec.params
            .insert("salt".into(), crate::value::Value::String(salt.into()));
        let key = spec.key();
        let dir = store.new_staging().unwrap();
        for (p, bytes) in files {
            let path = dir.join(p);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        }
        let manifest = store.absorb_dir(&dir).unwrap();
        let output = manifest.digest();
        let log = Store::log_rel_path(&key, run, 1);
        let log_path = store.path(&log);
        fs::create_dir_all(log_path.parent().unwrap()).unwrap();
        fs::write(&log_path, format!("{name} ran in run {run}\n")).unwrap();
        let mut record =
            StepRecord::new(key, StepId::of_parts(&[key.as_bytes()]), name, spec, output);
        record.executions.push(Execution {
            run,
            attempt: 1,
            started: now_millis(),
            ended: now_millis(),
            output,
            gpus: vec![],
            gpu_share: None,
            gpu_mem_gb: None,
            cpus: 1,
            log,
            job: None,
        });
        store.commit(&[StepCommit { record, manifest }]).unwrap();
        Done {
            key,
            output,
            cached: false,
        }
    }

    /// Record run `id` with these steps (all named `s`), in order, finished.
    pub fn run(&self, id: u64, steps: &[Done]) {
        self.store().put_run(&run_record(id, steps)).unwrap();
    }

    /// Every file under the store's `dir` (relative paths), sorted.
    pub fn files(&self, dir: &str) -> Vec<String> {
        let root = self.root().join(dir);
        let mut out = Vec::new();
        walk(&root, &root, &mut out);
        out.sort();
        out
    }

    /// Overwrite the bytes of `blob` in place (through every hard link to it), size kept.
    pub fn flip(&self, blob: &BlobDigest) {
        let path = self.store().blob_path(blob);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 0x20;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, bytes).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    }

    pub fn blob_of(&self, artifact: &ArtifactDigest, path: &str) -> BlobDigest {
        let m = self.store().manifest(artifact).unwrap().unwrap();
        match m.entries.iter().find(|e| e.path == path).unwrap().kind {
            EntryKind::File { blob, .. } => blob,
            EntryKind::Dir => panic!("`{path}` is a directory"),
        }
    }

    /// `verify --hash` finds nothing wrong.
    pub fn assert_verifies(&self) {
        let report = self.store().verify(true).unwrap();
        assert!(report.problems.is_empty(), "{:#?}", report.problems);
    }
}

pub(crate) fn key(tag: &str) -> StepKey {
    StepKey::of_parts(&[tag.as_bytes()])
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

/// Run `id` with these steps (all named `s`), in order, finished.
pub(crate) fn run_record(id: u64, steps: &[Done]) -> RunRecord {
    RunRecord {
        id,
        recipe_name: "r".into(),
        recipe_path: "r.toml".into(),
        recipe_dir: "/tmp".into(),
        recipe_text: "[recipe]\nname = \"r\"\n".into(),
        sets: vec![],
        rerun_of: None,
        started: now_millis(),
        ended: Some(now_millis()),
        state: RunState::Succeeded,
        arms: vec![],
        steps: steps
            .iter()
            .map(|d| RunStep {
                id: StepId::of_parts(&[d.key.as_bytes()]),
                name: "s".into(),
                op: "exec".into(),
                bindings: BTreeMap::new(),
                arms: vec![],
                inputs: BTreeMap::new(),
                key: Some(d.key),
                status: if d.cached {
                    StepStatus::Cached { output: d.output }
                } else {
                    StepStatus::Succeeded { output: d.output }
                },
                attempts: if d.cached {
                    vec![]
                } else {
                    vec![Attempt {
                        n: 1,
                        started: 0,
                        ended: 0,
                        result: AttemptResult::Success,
                        gpus: vec![],
                        gpu_share: None,
                        gpu_mem_gb: None,
                        log: Store::log_rel_path(&d.key, id, 1),
                        job: None,
                    }]
                },
            })
            .collect(),
    }
}
