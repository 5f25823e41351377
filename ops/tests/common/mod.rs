//! Helpers shared by the ops' integration tests: a hand-built `OpContext`, directory
//! snapshots for byte-for-byte comparisons.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use needle_ops::{Op, OpContext};
use serde_json::Value;

/// A context for `op` writing into `out`, its params the schema's defaults overridden by
/// `params` (a JSON object).
pub fn context(op: &dyn Op, params: Value, out: &Path, cpus: u32) -> OpContext {
    let mut ctx = OpContext::standalone(&op.schema(), params, out);
    ctx.cpus = cpus;
    ctx
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
