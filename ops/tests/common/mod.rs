//! Helpers shared by the ops' integration tests: a hand-built `OpContext`, directory
//! snapshots for byte-for-byte comparisons.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use needle_core::ops::ParamsSchema;
use needle_ops::{Op, OpContext};
use serde_json::Value;

/// A context for `op` writing into `out`, its params the schema's defaults overridden by
/// `params` (a JSON object).
pub fn context(op: &dyn Op, params: Value, out: &Path, cpus: u32) -> OpContext {
    let schema = op.schema();
    let mut all = BTreeMap::new();
    if let ParamsSchema::Fixed(specs) = &schema.params {
        for spec in specs {
            if let Some(default) = &spec.default {
                all.insert(spec.name.to_string(), default.clone());
            }
        }
    }
    for (k, v) in params.as_object().expect("params are a JSON object") {
        all.insert(k.clone(), v.clone());
    }
    OpContext {
        op: schema.name.to_string(),
        params: all,
        inputs: BTreeMap::new(),
        out: out.to_path_buf(),
        seed: 7,
        cpus,
        gpus: Vec::new(),
        recipe_dir: PathBuf::new(),
    }
}

/// Every file under `dir`, relative path → bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}
