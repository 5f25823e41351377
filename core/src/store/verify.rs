//! `Store::verify`: the store's promises, checked from its records down to its bytes.
//! `verify` only reads; [`Store::repair`] then drops what it found damaged (`repair.rs`).
//!
//! - every artifact's manifest hashes to its digest, and every file it lists is a blob in
//!   `blobs/` of the recorded size (and, with `hash`, of the recorded content); so is every
//!   step's code file;
//! - every step's key is the digest of its spec, its output artifact is recorded, and the
//!   producer index lists it;
//! - every run's finished steps, and every pin, point at recorded artifacts, or at artifacts
//!   dropped as damaged (a `dropped` record says so: their producers execute again when a run
//!   needs them);
//! - the journal reads whole and replays to exactly the records sled holds, so that a rebuild
//!   would give them back (`journal.rs`).

use std::collections::BTreeMap;

use super::journal::{self, TreeId};
use super::meta::display_key;
use super::repair::Damage;
use crate::digest::{ArtifactDigest, BlobDigest};
use crate::store::{
    Dropped, EntryKind, Manifest, PinRecord, RunRecord, RunSummary, StepRecord, StepStatus, Store,
    StoreError,
};

/// What [`Store::verify`] looked at and what it found wrong.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub steps: usize,
    pub artifacts: usize,
    pub runs: usize,
    pub pins: usize,
    /// Distinct blobs checked (size, and content when hashing).
    pub blobs: usize,
    pub bytes_hashed: u64,
    /// Outputs of recorded runs (and pins) that were dropped as damaged: not problems, but
    /// their producers will execute again when a run needs them.
    pub dropped_outputs: usize,
    /// Records the journal replays to (every record sled holds, when all is well); `None` for
    /// a store on a read-only filesystem, whose journal is not checked.
    pub journal_records: Option<usize>,
    /// One line per problem, naming the record and what is wrong.
    pub problems: Vec<String>,
    /// The problems as [`Store::drop_damaged`] takes them.
    #[serde(skip)]
    pub damage: Damage,
}

/// What [`Store::repair`] found, dropped, and found afterwards.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Repaired {
    pub before: VerifyReport,
    pub dropped: Dropped,
    pub after: VerifyReport,
}

impl Store {
    /// Check every record against the bytes on disk; `hash` also re-hashes every blob.
    pub fn verify(&self, hash: bool) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // Every blob with its size (unknown for a code file) and the records that use it, so
        // that a damaged blob is reported with all of them.
        let mut users: BTreeMap<BlobDigest, (Option<u64>, Vec<String>)> = BTreeMap::new();
        for item in self.trees.artifacts.iter() {
            let (key, value) = item?;
            report.artifacts += 1;
            let name = String::from_utf8_lossy(&key).into_owned();
            let manifest: Manifest = match serde_json::from_slice(&value) {
                Ok(m) => m,
                Err(e) => {
                    let what = format!("unreadable manifest ({e})");
                    report.problems.push(format!("artifact {name}: {what}"));
                    report.damage.artifacts.insert(key.to_vec(), what);
                    continue;
                }
            };
            if manifest.digest().hex() != name {
                let what = format!("its manifest hashes to {}", manifest.digest().hex());
                report.problems.push(format!("artifact {name}: {what}"));
                report.damage.artifacts.insert(key.to_vec(), what);
            }
            for e in &manifest.entries {
                if let EntryKind::File { blob, size, .. } = &e.kind {
                    let user = users.entry(*blob).or_insert((Some(*size), Vec::new()));
                    user.0.get_or_insert(*size);
                    user.1.push(format!(
                        "`{}` of artifact {}",
                        e.path,
                        &name[..12.min(name.len())]
                    ));
                }
            }
        }

        for item in self.trees.steps.iter() {
            let (key, value) = item?;
            report.steps += 1;
            let name = String::from_utf8_lossy(&key).into_owned();
            let rec: StepRecord = match serde_json::from_slice(&value) {
                Ok(r) => r,
                Err(e) => {
                    let what = format!("unreadable record ({e})");
                    report.problems.push(format!("step {name}: {what}"));
                    report.damage.steps.insert(key.to_vec(), what);
                    continue;
                }
            };
            if rec.spec.key().hex() != name {
                let what = format!("its spec hashes to {}", rec.spec.key().hex());
                report
                    .problems
                    .push(format!("step {name} ({}): {what}", rec.name));
                report.damage.steps.insert(key.to_vec(), what);
            }
            if !self.has_artifact(&rec.output)? {
                let what = format!("its output {} has no manifest", rec.output.hex());
                report
                    .problems
                    .push(format!("step {name} ({}): {what}", rec.name));
                report.damage.steps.insert(key.to_vec(), what);
            } else if !self.producers(&rec.output)?.contains(&rec.key) {
                report.problems.push(format!(
                    "step {name} ({}): the producer index does not list it for {}",
                    rec.name,
                    rec.output.hex()
                ));
                report.damage.missing_producers.push((rec.output, rec.key));
            }
            for (path, blob) in &rec.spec.code {
                users
                    .entry(*blob)
                    .or_insert((None, Vec::new()))
                    .1
                    .push(format!("code file `{path}` of step {}", rec.key.short()));
            }
            for (command, digest) in &rec.spec.environment {
                let Ok(blob) = digest.parse::<BlobDigest>() else {
                    report.problems.push(format!(
                        "step {name} ({}): what `{command}` printed is named `{digest}`, not a digest",
                        rec.name
                    ));
                    continue;
                };
                users
                    .entry(blob)
                    .or_insert((None, Vec::new()))
                    .1
                    .push(format!(
                        "what `{command}` printed for step {}",
                        rec.key.short()
                    ));
            }
        }

        let blobs: Vec<(BlobDigest, Option<u64>)> =
            users.iter().map(|(b, (size, _))| (*b, *size)).collect();
        let results = self.check_blobs_parallel(&blobs, hash);
        for ((blob, _), result) in blobs.iter().zip(results) {
            report.blobs += 1;
            match result {
                Ok(n) => report.bytes_hashed += n,
                Err(problem) => {
                    let used = users[blob].1.join(", ");
                    report
                        .problems
                        .push(format!("blob {} {problem}; used by {used}", blob.hex()));
                    report.damage.blobs.insert(*blob, problem.to_string());
                }
            }
        }

        // Runs: read raw, so that one unreadable record is a problem, not a failed verify.
        for item in self.trees.run_index.iter() {
            let (key, value) = item?;
            report.runs += 1;
            let id = display_key(&key);
            if let Err(e) = serde_json::from_slice::<RunSummary>(&value) {
                let what = format!("unreadable summary ({e})");
                report.problems.push(format!("run {id}: {what}"));
                report.damage.runs.insert(key.to_vec(), what);
                continue;
            }
            let run: RunRecord = match self.trees.runs.get(&key)? {
                None => {
                    let what = "listed but not recorded".to_string();
                    report.problems.push(format!("run {id}: {what}"));
                    report.damage.runs.insert(key.to_vec(), what);
                    continue;
                }
                Some(v) => match serde_json::from_slice(&v) {
                    Ok(r) => r,
                    Err(e) => {
                        let what = format!("unreadable record ({e})");
                        report.problems.push(format!("run {id}: {what}"));
                        report.damage.runs.insert(key.to_vec(), what);
                        continue;
                    }
                },
            };
            for s in &run.steps {
                if let StepStatus::Cached { output } | StepStatus::Succeeded { output } = &s.status
                {
                    let what = format!("step {} finished with {}", s.name, output.hex());
                    self.check_named(&mut report, output, &format!("run {}", run.id), &what)?;
                }
            }
        }
        for item in self.trees.pins.iter() {
            let (key, value) = item?;
            report.pins += 1;
            let name = String::from_utf8_lossy(&key).into_owned();
            let Ok(artifact) = name.parse::<ArtifactDigest>() else {
                report
                    .problems
                    .push(format!("pin `{name}`: not an artifact digest"));
                report.damage.pins.insert(key.to_vec());
                continue;
            };
            if let Err(e) = serde_json::from_slice::<PinRecord>(&value) {
                report
                    .problems
                    .push(format!("pin {name}: unreadable record ({e})"));
                report.damage.pins.insert(key.to_vec());
            }
            self.check_named(
                &mut report,
                &artifact,
                &format!("pin {}", artifact.short()),
                "it",
            )?;
        }
        self.check_journal(&mut report)?;
        Ok(report)
    }

    /// The journal replays to exactly the records sled holds (see `journal.rs`).
    fn check_journal(&self, report: &mut VerifyReport) -> Result<(), StoreError> {
        // Held throughout: no write may come between the replay and the comparison.
        let guard = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let Some(journal) = guard.as_ref() else {
            return Ok(());
        };
        let path = journal.path();
        let mut replay = journal::replay(path)?;
        report.journal_records = Some(replay.records.len());
        let mut problems = Vec::new();
        if let Some(stop) = &replay.stop {
            problems.push(format!(
                "the journal `{}` cannot be read past offset {} ({}): {} later change(s) would \
                 be lost to a rebuild",
                path.display(),
                stop.offset,
                stop.reason,
                replay.frames_after
            ));
        }
        let mut differ = 0usize;
        let mut example = None;
        for tree in TreeId::ALL {
            for item in self.trees.get(tree).iter() {
                let (k, v) = item?;
                if tree == TreeId::Default && &*k == journal::POS_KEY {
                    continue;
                }
                let what = match replay.records.remove(&(tree, k.to_vec())) {
                    Some(j) if j == *v => continue,
                    Some(_) => "holds another value in the journal",
                    None => "is missing from the journal",
                };
                differ += 1;
                example.get_or_insert_with(|| {
                    format!("`{}` record `{}` {what}", tree.name(), display_key(&k))
                });
            }
        }
        for (tree, k) in replay.records.keys() {
            differ += 1;
            example.get_or_insert_with(|| {
                format!(
                    "`{}` record `{}` is in the journal only",
                    tree.name(),
                    display_key(k)
                )
            });
        }
        // A journal that cannot be read through is rewritten by `--repair` from sled. One that
        // reads whole but differs is not: which side lost what cannot be told, sled is the one
        // known to lose records silently (a damaged file it opens as empty), and the journal
        // was written first.
        if !problems.is_empty() {
            report.damage.journal = Some(problems.join("; "));
        }
        if let Some(example) = example {
            let hint = if replay.stop.is_none() {
                " (hint: `needle verify --rebuild` restores the metadata from the journal)"
            } else {
                ""
            };
            problems.push(format!(
                "the journal does not replay to the metadata: {differ} record(s) differ, e.g. \
                 {example}{hint}"
            ));
        }
        report.problems.extend(problems);
        Ok(())
    }

    /// A run or pin names `artifact`: it must be recorded, or dropped as damaged.
    fn check_named(
        &self,
        report: &mut VerifyReport,
        artifact: &ArtifactDigest,
        who: &str,
        what: &str,
    ) -> Result<(), StoreError> {
        if self.has_artifact(artifact)? {
            return Ok(());
        }
        if self.dropped(artifact)?.is_some() {
            report.dropped_outputs += 1;
            return Ok(());
        }
        report
            .problems
            .push(format!("{who}: {what}, which has no manifest"));
        report.damage.lost.insert(
            *artifact,
            format!("{who} named it, but its manifest was missing"),
        );
        Ok(())
    }

    /// Verify with hashing, drop what is damaged ([`Store::drop_damaged`]), and verify again.
    /// The second pass checks records and sizes only: under the store's lock, the blobs that
    /// remain are the ones the first pass hashed whole.
    pub fn repair(&self) -> Result<Repaired, StoreError> {
        let before = self.verify(true)?;
        let dropped = if before.damage.is_empty() {
            Dropped::default()
        } else {
            self.drop_damaged(&before.damage)?
        };
        let after = self.verify(false)?;
        Ok(Repaired {
            before,
            dropped,
            after,
        })
    }

    fn has_artifact(&self, a: &ArtifactDigest) -> Result<bool, StoreError> {
        Ok(self.trees.artifacts.contains_key(a.hex().as_bytes())?)
    }
}
