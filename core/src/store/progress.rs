//! How far a run has got, recorded as it gets there.
//!
//! A run record is written when the run starts and when it ends. A runner killed in between
//! (SIGKILL, a lost machine) would leave every step `pending` with no key, although the store
//! holds what its steps committed. So each step's state is also recorded as it changes, apart
//! from the (large) run record:
//!
//! ```text
//! run_progress   run id (u64 BE) ‖ node (u32 BE)   → StepProgress
//! ```
//!
//! A step that succeeds is recorded in the transaction that commits its output: a run record
//! read later never shows a committed step as pending. Other changes (cached, failed, skipped,
//! interrupted) are written in batches as the run goes, without a flush of their own: a kill
//! loses at most the last moments of them. Reading a run that has not ended lays its progress
//! over its record; the final record replaces the progress, which is removed with it.

use super::journal::{Op, TreeId};
use super::meta::{decode, to_json};
use super::{Attempt, RunRecord, StepStatus, Store, StoreError};
use crate::digest::StepKey;

pub(super) const TREE: &str = "run_progress";

/// One step of a run as far as it has got.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepProgress {
    /// Index into [`RunRecord::steps`].
    pub node: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<StepKey>,
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

pub(super) fn key(run: u64, node: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&run.to_be_bytes());
    k[8..].copy_from_slice(&node.to_be_bytes());
    k
}

/// The encoded entries of `progress`, for a transaction.
pub(super) fn encode(run: u64, progress: &[StepProgress]) -> Vec<([u8; 12], Vec<u8>)> {
    progress
        .iter()
        .map(|p| (key(run, p.node), to_json(p)))
        .collect()
}

impl Store {
    /// Record how far steps of run `run` have got, durably.
    pub fn put_run_progress(&self, run: u64, progress: &[StepProgress]) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        let encoded = encode(run, progress);
        let bytes: usize = encoded.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.ensure_room(bytes as u64)?;
        self.write(|| {
            let ops = encoded
                .into_iter()
                .map(|(k, v)| Op::insert(TreeId::RunProgress, k.to_vec(), v))
                .collect();
            Ok((ops, ()))
        })
    }

    /// The keys of run `run`'s progress entries.
    pub(super) fn progress_keys(&self, run: u64) -> Result<Vec<sled::IVec>, StoreError> {
        self.trees
            .run_progress
            .scan_prefix(run.to_be_bytes())
            .keys()
            .map(|k| k.map_err(StoreError::from))
            .collect()
    }

    /// Keys of the progress of runs that `keep` does not keep, to remove.
    pub(super) fn progress_keys_without(
        &self,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for k in self.trees.run_progress.iter().keys() {
            let k = k?;
            let run = k
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            match run {
                Some(id) if keep(id) => {}
                Some(_) => out.push(k.to_vec()),
                None => {
                    return Err(StoreError::corrupt(format!(
                        "key `{}` of tree `{TREE}`",
                        String::from_utf8_lossy(&k)
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Lay run `record`'s progress over it, unless it has ended (its record is then whole).
    pub(super) fn with_progress(&self, mut record: RunRecord) -> Result<RunRecord, StoreError> {
        if record.ended.is_some() {
            return Ok(record);
        }
        for item in self.trees.run_progress.scan_prefix(record.id.to_be_bytes()) {
            let (k, v) = item?;
            let p: StepProgress = decode(TREE, &k, &v)?;
            let Some(step) = record.steps.get_mut(p.node as usize) else {
                return Err(StoreError::corrupt(format!(
                    "progress of step {} of run {}, which has {} steps",
                    p.node,
                    record.id,
                    record.steps.len()
                )));
            };
            step.key = p.key.or(step.key);
            step.status = p.status;
            if p.attempts.len() >= step.attempts.len() {
                step.attempts = p.attempts;
            }
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::{Lab, run_record};
    use crate::store::{AttemptResult, RunState};

    #[test]
    fn a_run_that_never_ended_shows_its_progress_and_an_ended_one_its_record() {
        let mut lab = Lab::new();
        let done = lab.exec(1, "a", "x", &[("v", b"1")], &[]);
        let mut run = run_record(1, &[done, done]);
        run.ended = None;
        run.state = RunState::Running;
        for s in &mut run.steps {
            s.key = None;
            s.status = StepStatus::Pending;
            s.attempts.clear();
        }
        lab.store().put_run(&run).unwrap();
        let attempt = Attempt {
            n: 1,
            started: 5,
            ended: 9,
            result: AttemptResult::Success,
            gpus: vec!["0".into()],
            gpu_share: Some(0.25),
            gpu_mem_gb: None,
            log: String::new(),
            job: None,
        };
        let progress = StepProgress {
            node: 0,
            key: Some(done.key),
            status: StepStatus::Succeeded {
                output: done.output,
            },
            attempts: vec![attempt],
        };
        lab.store()
            .put_run_progress(1, std::slice::from_ref(&progress))
            .unwrap();
        lab.reopen();

        let read = lab.store().run(1).unwrap().unwrap();
        assert_eq!(read.steps[0].key, Some(done.key));
        assert_eq!(read.steps[0].status, progress.status);
        assert_eq!(read.steps[0].attempts, progress.attempts);
        assert_eq!(read.steps[1].status, StepStatus::Pending);

        // The final record wins, and the progress goes with it.
        run.ended = Some(20);
        run.state = RunState::Failed;
        lab.store().put_run(&run).unwrap();
        assert_eq!(lab.store().run(1).unwrap().unwrap(), run);
        assert!(lab.store().progress_keys(1).unwrap().is_empty());
    }

    #[test]
    fn progress_of_a_step_the_record_does_not_have_is_corrupt() {
        let lab = Lab::new();
        let mut run = run_record(3, &[]);
        run.ended = None;
        lab.store().put_run(&run).unwrap();
        let p = StepProgress {
            node: 5,
            key: None,
            status: StepStatus::Interrupted,
            attempts: Vec::new(),
        };
        lab.store().put_run_progress(3, &[p]).unwrap();
        let e = lab.store().run(3).unwrap_err();
        assert!(e.to_string().contains("progress of step 5 of run 3"), "{e}");
    }
}
