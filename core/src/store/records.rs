//! What the store's metadata holds. Serialised as JSON inside sled, so `needle show --json` and
//! a curious user with a sled reader see the same shapes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::{ArtifactDigest, BlobDigest, StepId, StepKey};
use crate::recipe::Arm;
use crate::value::Value;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A directory tree: relative path → entry. The artifact digest is the hash of its canonical
/// encoding ([`Manifest::digest`]), so equal trees are one artifact, whichever step made them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Sorted by path. Paths use `/` and never contain `..` or a leading `/`.
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    #[serde(flatten)]
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    File {
        blob: BlobDigest,
        size: u64,
        executable: bool,
    },
    /// An empty directory (non-empty ones are implied by their files).
    Dir,
}

impl Manifest {
    pub fn digest(&self) -> ArtifactDigest {
        let mut buf = Vec::with_capacity(self.entries.len() * 96);
        for e in &self.entries {
            buf.extend_from_slice(e.path.as_bytes());
            buf.push(0);
            match &e.kind {
                EntryKind::File {
                    blob,
                    size,
                    executable,
                } => {
                    buf.push(if *executable { b'x' } else { b'f' });
                    buf.extend_from_slice(blob.as_bytes());
                    buf.extend_from_slice(&size.to_le_bytes());
                }
                EntryKind::Dir => buf.push(b'd'),
            }
        }
        ArtifactDigest::of_parts(&[&buf])
    }

    pub fn total_size(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { size, .. } => size,
                EntryKind::Dir => 0,
            })
            .sum()
    }

    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
            .count()
    }
}

/// The digests a step read, by input name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InputDigests {
    One(ArtifactDigest),
    /// A gather input: one artifact per upstream instance, labelled by its bindings
    /// (`qt_images=100`), in the order the instance saw them.
    Gather(Vec<GatherMember>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatherMember {
    pub label: String,
    pub artifact: ArtifactDigest,
}

impl InputDigests {
    pub fn artifacts(&self) -> Vec<ArtifactDigest> {
        match self {
            InputDigests::One(a) => vec![*a],
            InputDigests::Gather(members) => members.iter().map(|m| m.artifact).collect(),
        }
    }
}

/// Everything that determines a step's output, and thus its key. See [`StepSpec::key`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    pub op: String,
    pub op_version: u32,
    /// Resolved params (a JSON object).
    pub params: BTreeMap<String, Value>,
    /// `exec` only: the resolved argv.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `exec` only: code file (relative path) → content digest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub code: BTreeMap<String, BlobDigest>,
    /// Built-in ops' `path` params: param name → fingerprint (hex) of the files there when the
    /// plan was made (see [`crate::plan::fingerprint_path`]). Absent from the encoding when
    /// empty, so the keys of steps without `path` params are what they were before it existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub paths: BTreeMap<String, String>,
    /// `environment` commands → digest (hex) of what each printed when the plan was made.
    /// Absent from the encoding when empty, as `paths`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    pub inputs: BTreeMap<String, InputDigests>,
}

impl StepSpec {
    /// A spec with no params, argv or code files.
    pub fn bare(op: &str, op_version: u32, inputs: BTreeMap<String, InputDigests>) -> StepSpec {
        StepSpec {
            op: op.to_string(),
            op_version,
            params: BTreeMap::new(),
            cmd: None,
            code: BTreeMap::new(),
            paths: BTreeMap::new(),
            environment: BTreeMap::new(),
            inputs,
        }
    }

    /// The step's content key: BLAKE3 over a canonical encoding of everything above. Two specs
    /// with equal keys are the same work; the store never executes a key twice unless forced.
    pub fn key(&self) -> StepKey {
        let v = serde_json::to_value(self).expect("a step spec serialises");
        StepKey::of_parts(&[&crate::canonical::encode(&v)])
    }
}

/// A step that completed and whose output is committed. Written only after its blobs are
/// durable, in the same transaction as its output manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub key: StepKey,
    /// The structural id of the plan node that first produced this key.
    pub id: StepId,
    /// Step name in its recipe.
    pub name: String,
    /// Bindings of the swept vars this step depended on, when it first ran.
    pub bindings: BTreeMap<String, Value>,
    pub spec: StepSpec,
    /// The current output. A forced re-execution that produces other bytes replaces it; both
    /// stay listed in `executions`.
    pub output: ArtifactDigest,
    /// Every successful execution, oldest first.
    pub executions: Vec<Execution>,
    /// The shared cache this record was fetched from (`needle pull`, or a run): its
    /// executions ran on another machine, their run numbers are that machine's, and their
    /// logs stayed there. Not part of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_from: Option<String>,
}

impl StepRecord {
    /// A record outside any sweep, with no executions yet: the engine adds the execution that
    /// produced `output` before committing.
    pub fn new(
        key: StepKey,
        id: StepId,
        name: &str,
        spec: StepSpec,
        output: ArtifactDigest,
    ) -> Self {
        StepRecord {
            key,
            id,
            name: name.to_string(),
            bindings: BTreeMap::new(),
            spec,
            output,
            executions: Vec::new(),
            fetched_from: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub run: u64,
    pub attempt: u32,
    pub started: Millis,
    pub ended: Millis,
    pub output: ArtifactDigest,
    /// GPUs the step held, as it saw them in `CUDA_VISIBLE_DEVICES` (on a machine without
    /// GPUs they are labels only).
    #[serde(default, with = "gpu_ids")]
    pub gpus: Vec<String>,
    /// The share of its GPU it held; `None`: whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_share: Option<f64>,
    /// The GPU memory it asked for, in GB (`resources.gpu_mem_gb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_gb: Option<f64>,
    pub cpus: u32,
    /// Where the combined stdout/stderr of this attempt is, relative to the store root;
    /// empty when it wrote nothing.
    pub log: String,
    /// The batch job it ran as, when a cluster scheduler ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobPlacement>,
}

/// Where a cluster scheduler ran an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPlacement {
    /// `slurm`.
    pub scheduler: String,
    /// The scheduler's job id.
    pub id: String,
    /// The node it ran on (empty when it never started).
    #[serde(default)]
    pub node: String,
}

impl std::fmt::Display for JobPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} job {}", self.scheduler, self.id)?;
        if !self.node.is_empty() {
            write!(f, " on {}", self.node)?;
        }
        Ok(())
    }
}

/// One recorded run of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u64,
    pub recipe_name: String,
    /// As the user gave it.
    pub recipe_path: String,
    /// Absolute; `code` files resolve against it, also on `rerun`.
    pub recipe_dir: PathBuf,
    /// The recipe's text as it was run; `rerun` runs this text again.
    pub recipe_text: String,
    /// `--set` values, as given.
    pub sets: Vec<(String, Value)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<u64>,
    pub started: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Millis>,
    pub state: RunState,
    pub arms: Vec<Arm>,
    pub steps: Vec<RunStep>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Still going, or its runner died (the store lock tells which).
    Running,
    Succeeded,
    /// Finished with at least one failed step.
    Failed,
    /// Stopped by Ctrl-C.
    Interrupted,
}

/// One unique step (plan node) of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStep {
    pub id: StepId,
    pub name: String,
    pub op: String,
    pub bindings: BTreeMap<String, Value>,
    /// Indices into [`RunRecord::arms`].
    pub arms: Vec<u32>,
    /// Input name → indices into [`RunRecord::steps`].
    pub inputs: BTreeMap<String, Vec<usize>>,
    /// Known once every input's output digest is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<StepKey>,
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started (yet, or ever: the run stopped first).
    Pending,
    /// Its key was already in the store.
    Cached { output: ArtifactDigest },
    /// Executed in this run.
    Succeeded { output: ArtifactDigest },
    /// Every allowed attempt failed; see `attempts`.
    Failed { reason: String },
    /// An upstream step failed or was interrupted.
    Skipped { upstream: String },
    /// Stopped by Ctrl-C while running.
    Interrupted,
    /// Never run: a `[search]` stopped its arm at an earlier rung (`by` says where and why).
    Stopped { by: String },
}

impl StepStatus {
    pub fn is_done(&self) -> bool {
        matches!(
            self,
            StepStatus::Cached { .. } | StepStatus::Succeeded { .. }
        )
    }

    pub fn output(&self) -> Option<ArtifactDigest> {
        match self {
            StepStatus::Cached { output } | StepStatus::Succeeded { output } => Some(*output),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Cached { .. } => "cached",
            StepStatus::Succeeded { .. } => "succeeded",
            StepStatus::Failed { .. } => "failed",
            StepStatus::Skipped { .. } => "skipped",
            StepStatus::Interrupted => "interrupted",
            StepStatus::Stopped { .. } => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub n: u32,
    pub started: Millis,
    pub ended: Millis,
    pub result: AttemptResult,
    /// GPUs it held, as it saw them in `CUDA_VISIBLE_DEVICES`.
    #[serde(default, with = "gpu_ids")]
    pub gpus: Vec<String>,
    /// The share of its GPU it held; `None`: whole GPUs (or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_share: Option<f64>,
    /// The GPU memory it asked for, in GB (`resources.gpu_mem_gb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_gb: Option<f64>,
    /// Relative to the store root; empty when the attempt wrote nothing.
    pub log: String,
    /// The batch job it ran as, when a cluster scheduler ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobPlacement>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AttemptResult {
    Success,
    /// Exited with a non-zero code.
    Failed {
        code: i32,
    },
    /// Killed by a signal needle did not send (a segfault, the OOM killer…).
    Signaled {
        signal: i32,
        /// For a SIGKILL: what the kernel says about who sent it, where it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oom: Option<OomEvidence>,
    },
    TimedOut {
        after_ms: u64,
    },
    /// The command could not be started at all.
    SpawnFailed {
        error: String,
    },
    /// It exited 0, but its output could not be committed.
    OutputError {
        error: String,
    },
    /// It wrote where it must not: into its inputs (which are the store's blobs) or the store.
    /// Whatever its exit status, the step failed; `what` says what it changed and how the store
    /// was repaired.
    WroteOutside {
        what: String,
    },
    Interrupted,
    /// The scheduler lost it: node failure, preemption, cancelled outside needle.
    Lost {
        reason: String,
    },
}

/// Why a SIGKILL that needle did not send is thought to be the kernel's OOM killer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OomEvidence {
    /// The kernel log names the step's process as killed by the OOM killer.
    KernelLog,
    /// The OOM killer killed some process while the step ran (the log does not name this one,
    /// or only the memory cgroup's counter could be read).
    OomKillerActive,
}

impl AttemptResult {
    pub fn describe(&self) -> String {
        match self {
            AttemptResult::Success => "succeeded".into(),
            AttemptResult::Failed { code } => describe_exit(*code),
            AttemptResult::Signaled { signal, oom } => describe_signal(*signal, *oom),
            AttemptResult::TimedOut { after_ms } => {
                format!("timed out after {}", fmt_ms(*after_ms))
            }
            AttemptResult::SpawnFailed { error } => format!("could not start: {error}"),
            AttemptResult::OutputError { error } => format!("output not committed: {error}"),
            AttemptResult::WroteOutside { what } => {
                format!("wrote outside its output directory: {what}")
            }
            AttemptResult::Interrupted => "interrupted".into(),
            AttemptResult::Lost { reason } => format!("lost: {reason}"),
        }
    }

    /// Whether the step wrote where it must not (see [`AttemptResult::WroteOutside`]): such a
    /// failure is reported as it is, also during Ctrl-C, and not retried: the inputs it damaged
    /// were taken away, so another attempt could not even start.
    pub fn wrote_outside(&self) -> bool {
        matches!(self, AttemptResult::WroteOutside { .. })
    }
}

/// `exited with code 3`, with what the code usually means where a shell or the C library
/// gave it that meaning.
fn describe_exit(code: i32) -> String {
    let hint = match code {
        126 => Some("the command was found but could not be executed".to_string()),
        127 => Some("the command was not found".to_string()),
        129..=192 => signal_words(code - 128).map(|(name, words)| {
            let words = words.map(|w| format!(" ({w})")).unwrap_or_default();
            let oom = if code - 128 == SIGKILL {
                ": the OOM killer does this when memory runs out"
            } else {
                ""
            };
            format!("as a shell reports a command it ran that was killed by {name}{words}{oom}")
        }),
        _ => None,
    };
    match hint {
        Some(hint) => format!("exited with code {code} ({hint})"),
        None => format!("exited with code {code}"),
    }
}

const SIGKILL: i32 = 9;

/// `killed by signal SIGSEGV (segmentation fault)`; for a SIGKILL, which needle sends only
/// after a time-out or a second Ctrl-C (both reported as such), who else sends it.
fn describe_signal(signal: i32, oom: Option<OomEvidence>) -> String {
    if signal == SIGKILL {
        return match oom {
            Some(OomEvidence::KernelLog) => "killed by SIGKILL from the kernel's OOM killer: it \
                ran out of memory (the kernel log says so: `dmesg`)"
                .into(),
            Some(OomEvidence::OomKillerActive) => "killed by SIGKILL (not by needle); the \
                kernel's OOM killer was at work while it ran, so most likely it ran out of memory"
                .into(),
            None => "killed by SIGKILL (not by needle: the OOM killer does this when memory \
                runs out)"
                .into(),
        };
    }
    match signal_words(signal) {
        Some((name, Some(words))) => format!("killed by signal {name} ({words})"),
        Some((name, None)) => format!("killed by signal {name}"),
        None => format!("killed by signal {signal}"),
    }
}

/// A signal's name and, where it says more than the name, what it means. Linux's numbering
/// (x86, Arm and RISC-V agree on it).
fn signal_words(signal: i32) -> Option<(&'static str, Option<&'static str>)> {
    Some(match signal {
        1 => ("SIGHUP", Some("hangup")),
        2 => ("SIGINT", Some("interrupt")),
        3 => ("SIGQUIT", Some("quit")),
        4 => ("SIGILL", Some("illegal instruction")),
        5 => ("SIGTRAP", Some("trace or breakpoint trap")),
        6 => (
            "SIGABRT",
            Some("aborted: a failed assertion, abort() or an uncaught C++ exception"),
        ),
        7 => (
            "SIGBUS",
            Some("bus error: a bad memory access, e.g. a truncated mapped file"),
        ),
        8 => (
            "SIGFPE",
            Some("arithmetic error, e.g. an integer division by zero"),
        ),
        9 => ("SIGKILL", None),
        10 => ("SIGUSR1", None),
        11 => ("SIGSEGV", Some("segmentation fault")),
        12 => ("SIGUSR2", None),
        13 => (
            "SIGPIPE",
            Some("broken pipe: it wrote to a pipe nobody reads"),
        ),
        14 => ("SIGALRM", Some("alarm clock")),
        15 => ("SIGTERM", Some("terminated")),
        24 => ("SIGXCPU", Some("CPU time limit exceeded")),
        25 => ("SIGXFSZ", Some("file size limit exceeded")),
        31 => ("SIGSYS", Some("bad system call")),
        _ => return None,
    })
}

/// `1.2s`, `3m04s`, `1h02m`.
pub fn fmt_ms(ms: u64) -> String {
    let s = ms as f64 / 1000.0;
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s as u64) % 60)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s as u64) / 60) % 60)
    }
}

/// A pinned artifact: `needle gc` keeps it, and the steps and artifacts its lineage shows,
/// whatever `--keep-last` says. Kept in the `pins` tree, by artifact digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PinRecord {
    pub pinned: Millis,
    /// The reference as the user gave it (`last:train`, a digest prefix).
    pub reference: String,
    /// The name of the step that produced it, when it was pinned (for the listing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// An artifact whose bytes were found damaged and whose records were dropped (by
/// `needle verify --repair`, or by a run that checked its inputs). Runs and pins that name it
/// stay valid history: their step ran and produced it; its producer executes again when a
/// run needs it. Kept in the `dropped` tree, by artifact digest, while a run or pin names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DroppedRecord {
    pub dropped: Millis,
    pub reason: String,
}

/// GPU ids as a step saw them in `CUDA_VISIBLE_DEVICES`: an index, a UUID (`GPU-…`) or a MIG
/// id. An index is written as a JSON number, as every id was before ids could be UUIDs, so a
/// record of a run on numbered GPUs reads the same to an older needle.
mod gpu_ids {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ids: &[String], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(ids.len()))?;
        for id in ids {
            match id.parse::<u32>() {
                Ok(n) if n.to_string() == *id => seq.serialize_element(&n)?,
                _ => seq.serialize_element(id)?,
            }
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Index(u64),
            Name(String),
        }
        let ids = Vec::<Id>::deserialize(d)?;
        Ok(ids
            .into_iter()
            .map(|id| match id {
                Id::Index(n) => n.to_string(),
                Id::Name(s) => s,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_ids_read_old_records_and_write_indices_as_numbers() {
        let old =
            r#"{"n":1,"started":0,"ended":0,"result":{"result":"success"},"gpus":[0,2],"log":""}"#;
        let a: Attempt = serde_json::from_str(old).unwrap();
        assert_eq!(a.gpus, ["0", "2"]);
        assert_eq!(a.gpu_share, None);
        assert_eq!(serde_json::to_string(&a).unwrap(), old);

        let shared = Attempt {
            gpus: vec!["GPU-8f1c".into()],
            gpu_share: Some(0.25),
            gpu_mem_gb: Some(6.0),
            ..a
        };
        let text = serde_json::to_string(&shared).unwrap();
        assert!(
            text.contains(r#""gpus":["GPU-8f1c"],"gpu_share":0.25,"gpu_mem_gb":6.0"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Attempt>(&text).unwrap(), shared);
    }
}

/// The encoding of a step's key, pinned: every store's cache is addressed by it, so a change
/// here (a field renamed, a float printed otherwise, an order changed) would silently make
/// every stored step look new. If this fails, the change must be deliberate: bump the store
/// format or keep the old encoding.
#[cfg(test)]
mod key_encoding {
    use super::*;
    use crate::digest::BlobDigest;
    use serde_json::json;

    fn spec() -> StepSpec {
        let a = ArtifactDigest::from_bytes([1; 32]);
        let b = ArtifactDigest::from_bytes([2; 32]);
        let mut spec = StepSpec::bare(
            "exec",
            3,
            BTreeMap::from([
                ("data".to_string(), InputDigests::One(a)),
                (
                    "runs".to_string(),
                    InputDigests::Gather(vec![
                        GatherMember {
                            label: "lr=0.001".into(),
                            artifact: a,
                        },
                        GatherMember {
                            label: "lr=0.01".into(),
                            artifact: b,
                        },
                    ]),
                ),
            ]),
        );
        spec.params = BTreeMap::from([
            ("lr".to_string(), json!(0.001)),
            ("steps".to_string(), json!(2000)),
            ("mult".to_string(), json!([1, 2, 4])),
            ("name".to_string(), json!("unet ü")),
            ("opts".to_string(), json!({"b": true, "a": null})),
        ]);
        spec.cmd = Some(vec![
            "python3".into(),
            "train.py".into(),
            "--lr".into(),
            "0.001".into(),
        ]);
        spec.code = BTreeMap::from([("train.py".to_string(), BlobDigest::from_bytes([3; 32]))]);
        spec
    }

    #[test]
    fn a_step_key_is_what_it_was() {
        assert_eq!(
            spec().key().hex(),
            "35ea6fd7f67bba33606f40f4e1aae8f7ec05de4aa9ba27eac04020660961d250",
            "the encoding of step keys changed: every stored step would run again"
        );
        let mut with_paths = spec();
        with_paths.paths.insert("data".into(), "ab".repeat(32));
        assert_eq!(
            with_paths.key().hex(),
            "3c8bcb8e860d16570a9085390ba7cd8a4a9071549b0c80d64f72068351c75777"
        );
        // The seed a step gets (`NEEDLE_SEED`) comes from its key: pinned too.
        assert_eq!(spec().key().seed(), 1_807_217_946);
    }
}
