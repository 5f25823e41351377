//! `Store::gc_plan` / `Store::gc_apply`: remove what no kept run or pin reaches.
//!
//! **What is kept.** The kept runs are every recorded run, or with `keep_last = N` the N most
//! recent (by id; a run left `running` by a killed runner is history like any other). From
//! them and the pins, reachability follows records:
//!
//! - a kept run keeps each of its steps' output artifacts (cached ones too) and the step
//!   records of its steps' keys; a step record an execution of a kept run wrote is kept too
//!   (a killed runner never recorded its steps in its run record, but their records say which
//!   run executed them);
//! - a kept step keeps its output and the artifacts its inputs name;
//! - a kept artifact keeps the step lineage shows as its producer
//!   ([`crate::lineage::latest_producer`]), so `needle lineage` of anything kept reads the
//!   same after gc; a pin keeps its artifact, and so its whole ancestry;
//! - bytes: the blobs of kept manifests and the code files (and what their `environment`
//!   commands printed) of kept steps; the logs that kept
//!   records name or that kept runs wrote; views of kept artifacts; `resume/<key>` of a step
//!   that has not succeeded, unless it belongs to a dropped run (no kept run names its key and
//!   it has not changed since before the oldest kept run started).
//!
//! Older runs' records are dropped (`needle runs` lists exactly the kept ones): what they
//! produced survives only where a kept run or a pin reaches it, so a record kept beyond that
//! would point at missing outputs.
//!
//! **Order.** Views of dropped artifacts go first (they hold no data of their own), then one
//! metadata transaction drops every record (runs, steps, manifests, index entries, `dropped`
//! records), then blob files, logs and resume dirs; last, the journal is compacted (rewritten
//! with the records that remain, `journal.rs`). A SIGKILL at any moment leaves a store that
//! `verify --hash` accepts: before the transaction every record and its blobs are there;
//! after it, what remains on disk of the dropped things is unreferenced, and the next gc
//! removes it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::journal::{Op, TreeId};
use super::meta::{decode, decode_u64, parse_key};
use super::repair::split_index_key;
use super::{EntryKind, Manifest, Millis, RunRecord, StepRecord, Store, StoreError, fsutil};
use crate::digest::{ArtifactDigest, BlobDigest, StepKey};
use crate::lineage::latest_producer;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// Keep only this many of the most recent runs; `None` keeps every run.
    pub keep_last: Option<usize>,
}

/// A count of things and the bytes they hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub count: usize,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }
}

/// What a gc removes (or, after [`Store::gc_apply`], removed), and what it keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcSummary {
    pub runs: usize,
    pub steps: usize,
    pub artifacts: usize,
    /// Producer and consumer index entries, and `dropped` records no run or pin names.
    pub index_entries: usize,
    pub blobs: Tally,
    /// Views (and gathers) hold hard links to blobs; only their copies (executables) count as
    /// bytes.
    pub views: Tally,
    pub logs: Tally,
    pub resume: Tally,
    /// Blobs, view copies, logs and resume dirs together.
    pub bytes: u64,
    pub kept: Kept,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub runs: usize,
    pub steps: usize,
    pub artifacts: usize,
    pub pins: usize,
    pub blobs: Tally,
}

/// What [`Store::gc_apply`] will remove, decided by [`Store::gc_plan`] under the store's lock.
#[derive(Debug, Clone, Default)]
pub struct GcPlan {
    runs: Vec<Vec<u8>>,
    steps: Vec<Vec<u8>>,
    artifacts: Vec<Vec<u8>>,
    producers: Vec<Vec<u8>>,
    consumers: Vec<Vec<u8>>,
    dropped: Vec<Vec<u8>>,
    /// GPU usage of runs dropped (or never recorded: a runner that died before its run was).
    gpu_usage: Vec<Vec<u8>>,
    /// Progress of runs dropped, or never recorded (see `progress.rs`).
    run_progress: Vec<Vec<u8>>,
    views: Vec<(ArtifactDigest, PathBuf)>,
    gathers: Vec<PathBuf>,
    blobs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    resume: Vec<PathBuf>,
    pub summary: GcSummary,
}

impl GcPlan {
    /// The deletions [`Store::gc_apply`] makes, the metadata transaction counting as one, and
    /// the compaction of the journal after them as one more.
    pub fn operations(&self) -> usize {
        self.views.len()
            + self.gathers.len()
            + 1
            + self.blobs.len()
            + self.logs.len()
            + self.resume.len()
            + 1
    }
}

/// The records reachability works on, read once.
#[derive(Debug, Default)]
pub(crate) struct Records {
    pub runs: BTreeMap<u64, RunRecord>,
    pub steps: HashMap<StepKey, StepRecord>,
    /// Artifact → the steps the producer index lists for it, in key order.
    pub producers: HashMap<ArtifactDigest, Vec<StepKey>>,
    pub pins: Vec<ArtifactDigest>,
}

/// What reachability keeps.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Reached {
    pub runs: BTreeSet<u64>,
    pub steps: HashSet<StepKey>,
    /// Digests, whether or not a manifest is recorded for each.
    pub artifacts: HashSet<ArtifactDigest>,
}

/// Reachability from the kept runs and the pins (see the module's doc).
pub(crate) fn reach(records: &Records, keep_last: Option<usize>) -> Reached {
    let skip = keep_last.map_or(0, |n| records.runs.len().saturating_sub(n));
    let runs: BTreeSet<u64> = records.runs.keys().skip(skip).copied().collect();
    let mut steps_todo: Vec<StepKey> = Vec::new();
    let mut artifacts_todo: Vec<ArtifactDigest> = records.pins.clone();
    for id in &runs {
        for s in &records.runs[id].steps {
            steps_todo.extend(s.key);
            artifacts_todo.extend(s.status.output());
        }
    }
    steps_todo.extend(
        records
            .steps
            .values()
            .filter(|r| r.executions.iter().any(|e| runs.contains(&e.run)))
            .map(|r| r.key),
    );

    let mut reached = Reached {
        runs,
        ..Reached::default()
    };
    loop {
        if let Some(k) = steps_todo.pop() {
            let Some(rec) = records.steps.get(&k) else {
                continue; // a failed step: no record
            };
            if reached.steps.insert(k) {
                artifacts_todo.push(rec.output);
                artifacts_todo.extend(rec.spec.inputs.values().flat_map(|i| i.artifacts()));
            }
        } else if let Some(a) = artifacts_todo.pop() {
            if reached.artifacts.insert(a) {
                let candidates = records
                    .producers
                    .get(&a)
                    .into_iter()
                    .flatten()
                    .filter_map(|k| records.steps.get(k));
                if let Some(p) = latest_producer(&a, candidates) {
                    steps_todo.push(p.key);
                }
            }
        } else {
            return reached;
        }
    }
}

impl Store {
    /// Decide what a gc removes. Reads only; an unreadable record stops it (gc must not
    /// decide on records it cannot read: `needle verify --repair` first).
    pub fn gc_plan(&self, opts: GcOptions) -> Result<GcPlan, StoreError> {
        let records = self.gc_records()?;
        let reached = reach(&records, opts.keep_last);
        let mut plan = GcPlan::default();
        let s = &mut plan.summary;

        // Records.
        for id in records.runs.keys() {
            if !reached.runs.contains(id) {
                plan.runs.push(id.to_be_bytes().to_vec());
            }
        }
        // Run summaries without a record are dropped too.
        for item in self.trees.run_index.iter() {
            let (key, _) = item?;
            if decode_u64(Some(&key)).is_none_or(|id| !records.runs.contains_key(&id)) {
                plan.runs.push(key.to_vec());
            }
        }
        s.runs = plan.runs.len();
        plan.gpu_usage = self.gpu_usage_keys_without(|id| reached.runs.contains(&id))?;
        plan.run_progress = self.progress_keys_without(|id| reached.runs.contains(&id))?;
        for k in records.steps.keys() {
            if !reached.steps.contains(k) {
                plan.steps.push(k.hex().into_bytes());
            }
        }
        s.steps = plan.steps.len();
        let mut kept_manifests = Vec::new();
        for item in self.trees.artifacts.iter() {
            let (key, value) = item?;
            let a: ArtifactDigest = parse_key(&key, "artifacts")?;
            if reached.artifacts.contains(&a) {
                let m: Manifest = decode("artifacts", &key, &value)?;
                kept_manifests.push((a, m));
            } else {
                plan.artifacts.push(key.to_vec());
            }
        }
        s.artifacts = plan.artifacts.len();
        for item in self.trees.producers.iter() {
            let (key, _) = item?;
            let (a, k) = parse_index_key(&key)?;
            if !(reached.steps.contains(&k) && reached.artifacts.contains(&a)) {
                plan.producers.push(key.to_vec());
            }
        }
        for item in self.trees.consumers.iter() {
            let (key, _) = item?;
            if !reached.steps.contains(&parse_index_key(&key)?.1) {
                plan.consumers.push(key.to_vec());
            }
        }
        let manifests: HashSet<ArtifactDigest> = kept_manifests.iter().map(|(a, _)| *a).collect();
        for item in self.trees.dropped.iter() {
            let (key, _) = item?;
            let keep = parse_key::<crate::digest::ArtifactKind>(&key, "dropped")
                .is_ok_and(|a| reached.artifacts.contains(&a) && !manifests.contains(&a));
            if !keep {
                plan.dropped.push(key.to_vec());
            }
        }
        s.index_entries = plan.producers.len() + plan.consumers.len() + plan.dropped.len();
        s.kept = Kept {
            runs: reached.runs.len(),
            steps: reached.steps.len(),
            artifacts: kept_manifests.len(),
            pins: records.pins.len(),
            blobs: Tally::default(),
        };

        // Bytes.
        let mut blobs: HashSet<BlobDigest> = HashSet::new();
        for (_, m) in &kept_manifests {
            for e in &m.entries {
                if let EntryKind::File { blob, .. } = &e.kind {
                    blobs.insert(*blob);
                }
            }
        }
        let mut logs: HashSet<String> = HashSet::new();
        for k in &reached.steps {
            let rec = &records.steps[k];
            blobs.extend(rec.spec.code.values().copied());
            // What its `environment` commands printed, kept beside its code.
            blobs.extend(
                (rec.spec.environment.values()).filter_map(|d| d.parse::<BlobDigest>().ok()),
            );
            logs.extend(rec.executions.iter().map(|e| e.log.clone()));
        }
        for id in &reached.runs {
            for step in &records.runs[id].steps {
                logs.extend(step.attempts.iter().map(|a| a.log.clone()));
            }
        }
        self.plan_blobs(&blobs, &mut plan)?;
        self.plan_views(&manifests, &mut plan)?;
        self.plan_logs(&logs, &reached.runs, &mut plan)?;
        self.plan_resume(&records, &reached, &mut plan)?;
        let s = &mut plan.summary;
        s.bytes = s.blobs.bytes + s.views.bytes + s.logs.bytes + s.resume.bytes;
        Ok(plan)
    }

    /// Remove what `plan` says, in the order of the module's doc.
    pub fn gc_apply(&self, plan: &GcPlan) -> Result<(), StoreError> {
        self.gc_apply_until(plan, usize::MAX)
    }

    /// [`Store::gc_apply`], stopping after `limit` of its [`GcPlan::operations`]: what a
    /// SIGKILL at that moment would leave (the tests' crash points).
    pub(crate) fn gc_apply_until(&self, plan: &GcPlan, limit: usize) -> Result<(), StoreError> {
        let mut done = 0;
        let mut go = || {
            done += 1;
            done <= limit
        };
        let t0 = std::time::Instant::now();
        for (a, view) in &plan.views {
            if !go() {
                return Ok(());
            }
            fsutil::remove_tree(view)?;
            self.forget_view(a);
        }
        for gather in &plan.gathers {
            if !go() {
                return Ok(());
            }
            fsutil::remove_tree(gather)?;
        }
        let views = t0.elapsed();
        if !go() {
            return Ok(());
        }
        self.gc_records_transaction(plan)?;
        let records = t0.elapsed() - views;
        for path in plan.blobs.iter().chain(&plan.logs).chain(&plan.resume) {
            if !go() {
                return Ok(());
            }
            fsutil::remove_tree(path)?;
        }
        if !go() {
            return Ok(());
        }
        // The journal still holds what was just dropped: keep it as small as the records. A
        // failure costs only space.
        if let Err(e) = self.compact_journal() {
            tracing::warn!("could not compact the store's journal after gc: {e}");
        }
        tracing::debug!(
            views_ms = views.as_secs_f64() * 1e3,
            records_ms = records.as_secs_f64() * 1e3,
            files_ms = (t0.elapsed() - views - records).as_secs_f64() * 1e3,
            "gc applied"
        );
        Ok(())
    }

    fn gc_records_transaction(&self, plan: &GcPlan) -> Result<(), StoreError> {
        self.write(|| {
            let mut ops = Vec::new();
            for k in &plan.runs {
                ops.push(Op::remove(TreeId::Runs, k.clone()));
                ops.push(Op::remove(TreeId::RunIndex, k.clone()));
            }
            for (tree, keys) in [
                (TreeId::Steps, &plan.steps),
                (TreeId::Artifacts, &plan.artifacts),
                (TreeId::Producers, &plan.producers),
                (TreeId::Consumers, &plan.consumers),
                (TreeId::Dropped, &plan.dropped),
                (TreeId::GpuUsage, &plan.gpu_usage),
                (TreeId::RunProgress, &plan.run_progress),
            ] {
                ops.extend(keys.iter().map(|k| Op::remove(tree, k.clone())));
            }
            Ok((ops, ()))
        })
    }

    fn gc_records(&self) -> Result<Records, StoreError> {
        let mut records = Records::default();
        for item in self.trees.runs.iter() {
            let (key, value) = item?;
            let id = decode_u64(Some(&key)).ok_or_else(|| {
                StoreError::corrupt(format!(
                    "key `{}` of tree `runs`",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            let run: RunRecord = decode("runs", &key, &value)?;
            // A run whose runner died holds what it got to in its progress.
            records.runs.insert(id, self.with_progress(run)?);
        }
        for item in self.trees.steps.iter() {
            let (key, value) = item?;
            let rec: StepRecord = decode("steps", &key, &value)?;
            records.steps.insert(parse_key(&key, "steps")?, rec);
        }
        for item in self.trees.producers.iter() {
            let (key, _) = item?;
            let (a, k) = parse_index_key(&key)?;
            records.producers.entry(a).or_default().push(k);
        }
        for item in self.trees.pins.iter() {
            let (key, _) = item?;
            records.pins.push(parse_key(&key, "pins")?);
        }
        Ok(records)
    }

    /// Every file under `blobs/` whose name is a digest no kept record needs.
    fn plan_blobs(&self, keep: &HashSet<BlobDigest>, plan: &mut GcPlan) -> Result<(), StoreError> {
        let root = self.root.join("blobs");
        for fanout in list(&root)? {
            let Some(prefix) = name_of(&fanout).filter(|n| n.len() == 2) else {
                continue;
            };
            if !fanout.is_dir() {
                continue;
            }
            for path in list(&fanout)? {
                let Some(blob) = name_of(&path)
                    .and_then(|rest| format!("{prefix}{rest}").parse::<BlobDigest>().ok())
                else {
                    continue; // not a blob's name: not ours to judge
                };
                let len = fs::symlink_metadata(&path)
                    .map_err(StoreError::io("inspect", &path))?
                    .len();
                if keep.contains(&blob) {
                    plan.summary.kept.blobs.add(len);
                } else {
                    plan.summary.blobs.add(len);
                    plan.blobs.push(path);
                }
            }
        }
        Ok(())
    }

    /// Views of artifacts that are not kept (or not artifacts at all).
    fn plan_views(
        &self,
        keep: &HashSet<ArtifactDigest>,
        plan: &mut GcPlan,
    ) -> Result<(), StoreError> {
        for path in list(&self.root.join("views"))? {
            let name = name_of(&path);
            if name.is_some_and(|n| n.starts_with(super::GATHER_PREFIX)) {
                // A gather goes with any of its members (an unreadable one goes too: it is
                // made again when next needed).
                let members = fs::read_to_string(path.join(super::GATHER_INDEX))
                    .ok()
                    .and_then(|index| super::gather::gather_members(&index));
                if !members.is_some_and(|m| m.iter().all(|a| keep.contains(a))) {
                    plan.summary.views.add(tree_bytes(&path, true));
                    plan.gathers.push(path);
                }
                continue;
            }
            let Some(a) = name.and_then(|n| n.parse::<ArtifactDigest>().ok()) else {
                continue;
            };
            if !keep.contains(&a) {
                // Hard links to blobs free nothing by themselves; copies do.
                plan.summary.views.add(tree_bytes(&path, true));
                plan.views.push((a, path));
            }
        }
        Ok(())
    }

    /// Logs no kept record names and no kept run wrote (`<key>.<run>-<attempt>.log`).
    fn plan_logs(
        &self,
        named: &HashSet<String>,
        runs: &BTreeSet<u64>,
        plan: &mut GcPlan,
    ) -> Result<(), StoreError> {
        for fanout in list(&self.root.join("logs"))? {
            if !fanout.is_dir() {
                continue;
            }
            for path in list(&fanout)? {
                let (Some(dir), Some(file)) = (name_of(&fanout), name_of(&path)) else {
                    continue;
                };
                let rel = format!("logs/{dir}/{file}");
                let run = file
                    .strip_suffix(".log")
                    .and_then(|f| f.rsplit_once('.'))
                    .and_then(|(_, ra)| ra.split_once('-'))
                    .and_then(|(r, _)| r.parse::<u64>().ok());
                if named.contains(&rel) || run.is_some_and(|r| runs.contains(&r)) {
                    continue;
                }
                plan.summary.logs.add(tree_bytes(&path, false));
                plan.logs.push(path);
            }
        }
        Ok(())
    }

    /// `resume/<key>` of a step that succeeded, or of a dropped run's step.
    fn plan_resume(
        &self,
        records: &Records,
        reached: &Reached,
        plan: &mut GcPlan,
    ) -> Result<(), StoreError> {
        let root = self.root.join("resume");
        if !root.is_dir() {
            return Ok(());
        }
        let named: HashSet<StepKey> = reached
            .runs
            .iter()
            .flat_map(|id| records.runs[id].steps.iter().filter_map(|s| s.key))
            .collect();
        let oldest_kept: Option<Millis> =
            reached.runs.iter().map(|id| records.runs[id].started).min();
        for path in list(&root)? {
            let Some(key) = name_of(&path).and_then(|n| n.parse::<StepKey>().ok()) else {
                continue;
            };
            let done = records.steps.contains_key(&key);
            let dropped_run = !named.contains(&key)
                && oldest_kept.is_none_or(|start| newest_mtime(&path) < start);
            if done || dropped_run {
                plan.summary.resume.add(tree_bytes(&path, false));
                plan.resume.push(path);
            }
        }
        Ok(())
    }
}

fn parse_index_key(key: &[u8]) -> Result<(ArtifactDigest, StepKey), StoreError> {
    let (a, k) = split_index_key(key);
    let bad = || {
        StoreError::corrupt(format!(
            "index key `{}` is not artifact/step",
            String::from_utf8_lossy(key)
        ))
    };
    let a = std::str::from_utf8(a).ok().and_then(|s| s.parse().ok());
    let k = std::str::from_utf8(k).ok().and_then(|s| s.parse().ok());
    Ok((a.ok_or_else(bad)?, k.ok_or_else(bad)?))
}

/// The entries of `dir`, sorted; none when it does not exist.
fn list(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        out.push(entry.map_err(StoreError::io("list", dir))?.path());
    }
    out.sort();
    Ok(out)
}

fn name_of(path: &Path) -> Option<&str> {
    path.file_name()?.to_str()
}

/// Bytes of the files under `path` (a file or a tree); with `own_only`, only files with no
/// other hard link (what removing them frees).
fn tree_bytes(path: &Path, own_only: bool) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return if own_only && meta.nlink() > 1 {
            0
        } else {
            meta.len()
        };
    }
    fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| tree_bytes(&e.path(), own_only))
                .sum()
        })
        .unwrap_or(0)
}

/// The latest modification under `path` (itself included), in milliseconds since the epoch.
fn newest_mtime(path: &Path) -> Millis {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as Millis);
    if !meta.is_dir() {
        return own;
    }
    fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| newest_mtime(&e.path()))
                .fold(own, Millis::max)
        })
        .unwrap_or(own)
}

#[cfg(test)]
mod tests;
