//! The commit thread: absorbs finished steps' outputs into the store and records them, a batch
//! at a time, off the engine's event loop; reports each result back as an [`Event`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use needle_core::digest::StepKey;
use needle_core::store::{
    Execution, Manifest, StepCommit, StepProgress, StepRecord, StepSpec, StepStatus, Store,
    StoreError,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::attempt::Event;

pub struct CommitJob {
    pub node: usize,
    pub key: StepKey,
    pub spec: StepSpec,
    pub record_id: needle_core::digest::StepId,
    pub name: String,
    pub bindings: BTreeMap<String, needle_core::value::Value>,
    pub execution: Execution,
    pub staging: PathBuf,
    pub forced: bool,
    /// How far the step got, recorded with its commit.
    pub progress: StepProgress,
}

/// Finished steps are committed together: when the engine has nothing else to start, when
/// this many wait, or when the oldest has waited this long, whichever comes first. Every
/// commit pays a few syncs whatever its size, so steps that finish while others keep the
/// slots busy share them.
pub const MAX_BATCH: usize = 256;

pub const MAX_BATCH_WAIT: Duration = Duration::from_millis(50);

/// The commit thread: absorbs outputs into blobs and records them, a batch at a time.
pub fn commit_loop(
    store: Arc<Store>,
    batches: std::sync::mpsc::Receiver<Vec<CommitJob>>,
    events: UnboundedSender<Event>,
) {
    while let Ok(batch) = batches.recv() {
        if !commit_batch(&store, batch, &events) {
            return;
        }
    }
}

/// Absorb and record one batch; false once the engine is gone.
fn commit_batch(store: &Store, batch: Vec<CommitJob>, events: &UnboundedSender<Event>) -> bool {
    let t0 = Instant::now();
    // One absorb for the whole batch: durability is paid once, not once per step.
    let outs: Vec<PathBuf> = batch.iter().map(|j| j.staging.join("out")).collect();
    let dirs: Vec<&std::path::Path> = outs.iter().map(PathBuf::as_path).collect();
    let manifests = store.absorb_dirs(&dirs);
    let prepared: Vec<Result<StepCommit, StoreError>> = batch
        .iter()
        .zip(manifests)
        .map(|(job, manifest)| step_commit(store, job, manifest?))
        .collect();
    let mut results = Vec::with_capacity(batch.len());
    let mut commits = Vec::with_capacity(batch.len());
    let mut committed_nodes = Vec::with_capacity(batch.len());
    let mut progress = Vec::with_capacity(batch.len());
    let mut slots = Vec::with_capacity(batch.len());
    for (job, outcome) in batch.iter().zip(prepared) {
        // An output that was refused is still in `out/`.
        let refused = outcome.is_err();
        match outcome {
            Ok(commit) => {
                let output = commit.record.output;
                committed_nodes.push((job.node, output));
                progress.push(StepProgress {
                    status: StepStatus::Succeeded { output },
                    ..job.progress.clone()
                });
                commits.push(commit);
            }
            Err(e) => results.push((job.node, Err(commit_error(store, job, &e)))),
        }
        if crate::staging::clean_slot(&job.staging, refused).is_ok() {
            slots.push(job.staging.clone());
        }
    }
    let absorbed = t0.elapsed();
    let run = batch.first().map_or(0, |j| j.execution.run);
    let committed = store.commit_for_run(&commits, run, &progress);
    tracing::debug!(
        batch = batch.len(),
        absorb_ms = absorbed.as_secs_f64() * 1e3,
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        "commit"
    );
    match committed {
        Ok(()) => {
            // What the steps kept to resume from is of no use now.
            for job in &batch {
                if let Err(e) = store.drop_resume(&job.key) {
                    tracing::warn!("could not remove the resume directory of {}: {e}", job.key);
                }
            }
            results.extend(committed_nodes.into_iter().map(|(n, o)| (n, Ok(o))))
        }
        Err(e) => {
            let by_node: HashMap<usize, &CommitJob> = batch.iter().map(|j| (j.node, j)).collect();
            results.extend(
                committed_nodes
                    .into_iter()
                    .map(|(n, _)| (n, Err(commit_error(store, by_node[&n], &e)))),
            );
        }
    }
    events.send(Event::Committed(results, slots)).is_ok()
}

fn step_commit(
    store: &Store,
    job: &CommitJob,
    manifest: Manifest,
) -> Result<StepCommit, StoreError> {
    let output = manifest.digest();
    let mut execution = job.execution.clone();
    execution.output = output;
    // Only a forced step can already have a record (the others were looked up as they became
    // ready); skip the lookup for the rest.
    let existing = if job.forced {
        store.step(&job.key)?
    } else {
        None
    };
    let record = match existing {
        // A forced re-execution: keep the history, point at the new output.
        Some(mut existing) => {
            existing.output = output;
            existing.executions.push(execution);
            existing
        }
        None => StepRecord {
            key: job.key,
            id: job.record_id,
            name: job.name.clone(),
            bindings: job.bindings.clone(),
            spec: job.spec.clone(),
            output,
            executions: vec![execution],
            fetched_from: None,
        },
    };
    Ok(StepCommit { record, manifest })
}

/// Why `job`'s output was not committed; a full disk in the words a user acts on.
fn commit_error(store: &Store, job: &CommitJob, e: &StoreError) -> String {
    if !e.is_no_space() {
        return needle_core::error_chain::joined(e, ": ");
    }
    let step = if job.bindings.is_empty() {
        job.name.clone()
    } else {
        format!(
            "{}[{}]",
            job.name,
            needle_core::recipe::bindings_label(&job.bindings)
        )
    };
    let (mount, free) = match store.space() {
        Ok(s) => (s.mount.display().to_string(), s.free),
        Err(_) => (store.root().display().to_string(), 0),
    };
    // Still in the slot unless the absorb got as far as moving it.
    let size = match tree_size(&job.staging.join("out")) {
        0 => String::new(),
        n => format!(" ({})", needle_core::store::human_bytes(n)),
    };
    format!(
        "no space left on device while storing the output of step `{step}`{size}: free space \
         on `{mount}` (the store's filesystem; {} free now), then run it again",
        needle_core::store::human_bytes(free)
    )
}

/// Bytes of the files under `dir`, symlinks followed (a linked file is stored as a copy).
fn tree_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match std::fs::metadata(e.path()) {
            Ok(m) if m.is_dir() => tree_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
