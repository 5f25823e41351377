//! A step's staging slot, shared by the local and the Slurm executor: the slot itself (`out/`,
//! `work/`, the log, the progress file), what an attempt is launched with (its working
//! directory holding a copy of its `code` files, an empty `$NEEDLE_OUT`, read-only views of
//! its inputs, its params, a seed and its GPUs), and the end of an attempt whichever executor
//! ran it (its inputs checked, its log kept).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use needle_core::store::{AttemptResult, InputDigests, Store, StoreError, now_millis};
use needle_core::value::{Value, render_plain};

use crate::attempt::{AttemptEnd, AttemptSpec, Held};

/// The end of an attempt that has run, whichever executor ran it: what it did to its inputs
/// outranks how it exited (see `input_guard.rs`), and its log is kept. `gpus` and `job` are left for
/// an executor that learns them from the attempt. A change to an input whose time is before
/// `checked_from` (ms) was there before the attempt began.
pub async fn ended(
    store: &Arc<Store>,
    spec: &AttemptSpec,
    started: u64,
    checked_from: u64,
    result: AttemptResult,
    staging: Option<PathBuf>,
) -> AttemptEnd {
    let result = match staging {
        Some(_) => crate::input_guard::after_attempt(store, spec, checked_from, result).await,
        None => result,
    };
    crate::input_guard::done_reading_inputs(spec);
    let log = staging
        .as_deref()
        .and_then(|slot| keep_log(store, slot, &spec.log_rel));
    AttemptEnd {
        node: spec.node,
        result,
        started,
        ended: now_millis(),
        staging,
        log,
        gpus: None,
        job: None,
    }
}

/// Keep what the attempt wrote as its log under `logs/`; an attempt that wrote nothing gets
/// no file (most short steps write nothing, and a file each would cost an inode each).
pub fn keep_log(store: &Store, slot: &Path, rel: &str) -> Option<String> {
    let log = slot.join("log");
    if fs::metadata(&log).ok()?.len() == 0 {
        return None;
    }
    let dest = store.path(rel);
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).ok()?;
    }
    match fs::rename(&log, &dest) {
        Ok(()) => Some(rel.to_string()),
        Err(e) => {
            tracing::warn!("could not keep the log of {rel}: {e}");
            None
        }
    }
}

pub fn append_log(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// What one attempt starts, whoever starts it: the local executor as a child process
/// ([`local_command`]), the Slurm executor as a batch job.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    /// `cmd[0]` as the recipe wrote it.
    pub argv0: String,
    pub args: Vec<String>,
    /// The attempt's working directory (`work/` of its slot).
    pub cwd: PathBuf,
    /// Where its stdout and stderr go, together.
    pub log: PathBuf,
    /// Variables set for the step, on top of the runner's environment minus its `NEEDLE_*`.
    pub env: Vec<(String, std::ffi::OsString)>,
}

impl Launch {
    pub fn set(&mut self, k: impl Into<String>, v: impl Into<std::ffi::OsString>) {
        self.env.push((k.into(), v.into()));
    }
}

/// Why a staging slot could not be made ready for an attempt: the attempt cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("could not create `{}`", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not remove `{}`", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not copy code to `{}`", path.display())]
    CopyCode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not chmod `{}`", path.display())]
    Chmod {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store could not give a slot, or a view of an input.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl StagingError {
    /// What the attempt it was for ends with: it could not start, for this reason and its
    /// causes, on one line (it goes into the run record).
    pub fn not_started(&self) -> AttemptResult {
        AttemptResult::SpawnFailed {
            error: needle_core::error_chain::joined(self, ": "),
        }
    }
}

/// Staging layout: `out/` (the output), `work/` (the working directory, with code copies).
/// Inputs are read where the store keeps them: views, and gathers of views.
pub fn prepare(store: &Store, spec: &AttemptSpec) -> Result<(PathBuf, Launch), StagingError> {
    let staging = spec.slot.clone();
    let progress = staging.join(PROGRESS);
    // A previous attempt's progress must not show as this one's.
    if let Err(e) = fs::remove_file(&progress)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(StagingError::Remove {
            path: progress,
            source: e,
        });
    }
    let out = staging.join("out");
    let work = staging.join("work");

    for (rel, blob) in &spec.code {
        let dest = work.join(rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|source| StagingError::Create {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        if let Err(source) = fs::copy(store.blob_path(blob), &dest) {
            return Err(StagingError::CopyCode { path: dest, source });
        }
        // Blobs are read-only; the copy should behave like the user's file.
        let mode = if crate::process::is_executable(&spec.recipe_dir.join(rel)) {
            0o755
        } else {
            0o644
        };
        if let Err(source) = set_mode(&dest, mode) {
            return Err(StagingError::Chmod { path: dest, source });
        }
    }

    let program = {
        let first = &spec.cmd[0];
        if first.contains('/') && !first.starts_with('/') {
            work.join(first)
        } else {
            // The engine resolved bare names on PATH once; a name it could not find is passed
            // on as it is, so spawning fails with the usual "not found".
            spec.program.clone().unwrap_or_else(|| PathBuf::from(first))
        }
    };
    let mut launch = Launch {
        program,
        argv0: spec.cmd[0].clone(),
        args: spec.cmd[1..].to_vec(),
        cwd: work,
        log: staging.join("log"),
        env: Vec::new(),
    };
    let mut inputs_json = serde_json::Map::new();
    let mut gathers = Vec::new();
    for (name, input) in &spec.inputs {
        // Store paths are the store root's plus ASCII names: UTF-8 wherever the root is.
        let (dir, entry) = match input {
            InputDigests::One(a) => {
                let dir = store.view(a)?;
                let entry = serde_json::json!({ "dir": dir.to_string_lossy() });
                (dir, entry)
            }
            InputDigests::Gather(members) => {
                let (dir, views) = store.gather(members)?;
                gathers.push(dir.clone());
                let members: Vec<serde_json::Value> = members
                    .iter()
                    .zip(views)
                    .map(|(member, view)| {
                        serde_json::json!({ "label": member.label, "dir": view.to_string_lossy() })
                    })
                    .collect();
                let entry = serde_json::json!({ "dir": dir.to_string_lossy(), "members": members });
                (dir, entry)
            }
        };
        launch.set(format!("NEEDLE_IN_{}", env_name(name)), dir);
        inputs_json.insert(name.clone(), entry);
    }
    // Known before the step can change any of them: see `input_guard.rs`.
    crate::input_guard::reading_inputs(spec, &gathers);
    let inputs_json = serde_json::Value::Object(inputs_json).to_string();
    launch.set(
        "NEEDLE_INPUTS",
        inputs_env(&inputs_json, &staging, MAX_ENV_VALUE).map_err(|source| {
            StagingError::Write {
                path: staging.join("inputs.json"),
                source,
            }
        })?,
    );
    for (name, v) in &spec.params {
        launch.set(format!("NEEDLE_PARAM_{}", env_name(name)), render_plain(v));
    }
    let params = Value::Object(spec.params.clone().into_iter().collect());
    launch.set("NEEDLE_PARAMS", needle_core::canonical::to_string(&params));
    launch.set("NEEDLE_OUT", out);
    launch.set("NEEDLE_SEED", spec.key.seed().to_string());
    launch.set("NEEDLE_KEY", spec.key.hex());
    launch.set("NEEDLE_STEP", &spec.step_name);
    launch.set("NEEDLE_RUN", spec.run.to_string());
    launch.set("NEEDLE_ATTEMPT", spec.attempt.to_string());
    launch.set("NEEDLE_RECIPE_DIR", &spec.recipe_dir);
    launch.set("NEEDLE_PROGRESS", progress);
    launch.set("NEEDLE_RESUME", store.resume_path(&spec.key));
    launch.set("NEEDLE_CPUS", spec.held.cpus.to_string());
    launch.set("OMP_NUM_THREADS", spec.held.cpus.to_string());
    set_gpu_env(&mut launch, &spec.held, spec.builtin);
    Ok((staging, launch))
}

/// `CUDA_VISIBLE_DEVICES` names exactly the step's devices (empty: none, so the CPU), and
/// `NEEDLE_GPU_SHARE` / `NEEDLE_GPU_MEM_GB` say how much of them it holds. Indices mean what
/// `nvidia-smi` says (PCI bus order) unless the runner's environment chose an order itself.
/// A built-in op's caching allocator is capped to its part of the GPU's memory (torch reads
/// `per_process_memory_fraction` from `PYTORCH_CUDA_ALLOC_CONF`, added to what the user set).
fn set_gpu_env(launch: &mut Launch, held: &Held, builtin: bool) {
    launch.set("CUDA_VISIBLE_DEVICES", held.gpus.join(","));
    if held.gpus.is_empty() {
        return;
    }
    if std::env::var_os("CUDA_DEVICE_ORDER").is_none() {
        launch.set("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
    }
    for (k, v) in held.mps.iter().flat_map(|m| m.env()) {
        launch.set(k, v);
    }
    if let Some(share) = held.gpu_share {
        launch.set("NEEDLE_GPU_SHARE", share.to_string());
    }
    if let Some(gb) = held.gpu_mem_gb {
        launch.set(
            "NEEDLE_GPU_MEM_GB",
            format!("{gb:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.'),
        );
    }
    if let (true, Some(fraction)) = (builtin, held.gpu_mem_fraction) {
        let cap = format!("per_process_memory_fraction:{fraction:.4}");
        let conf = match std::env::var("PYTORCH_CUDA_ALLOC_CONF") {
            Ok(user) if !user.trim().is_empty() => format!("{user},{cap}"),
            _ => cap,
        };
        launch.set("PYTORCH_CUDA_ALLOC_CONF", conf);
    }
}

/// The log of a local attempt: it starts in the slot (a reused file when the last attempt
/// wrote nothing) and is moved under logs/ afterwards if anything was written.
pub fn open_log(path: &Path) -> Result<fs::File, StagingError> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| StagingError::Create {
            path: path.to_path_buf(),
            source,
        })
}

/// The file in a slot where the step's progress lines go (`NEEDLE_PROGRESS`).
pub const PROGRESS: &str = "progress";

/// A staging slot: `out/` and `work/` under a directory in `staging/`, one a runner left clean
/// if there is one (see [`Store::reuse_staging`]), else a fresh one.
pub fn new_slot(store: &Store) -> Result<PathBuf, StagingError> {
    let (slot, reused) = match store.reuse_staging() {
        Some(slot) => (slot, true),
        None => (store.new_staging()?, false),
    };
    for sub in ["out", "work"] {
        let dir = slot.join(sub);
        let made = match fs::create_dir(&dir) {
            Err(e) if reused && e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A step may have left it read-only.
                set_mode(&dir, 0o755)
            }
            other => other,
        };
        if let Err(source) = made {
            return Err(StagingError::Create { path: dir, source });
        }
    }
    Ok(slot)
}

/// The last progress line a running step wrote, if any. Reads only the file's tail.
pub fn last_progress(slot: &Path) -> Option<needle_ops::Progress> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(slot.join(PROGRESS)).ok()?;
    let len = f.metadata().ok()?.len();
    let from = len.saturating_sub(1024);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

/// Longest `NEEDLE_INPUTS` passed as it is: Linux refuses a single environment string over
/// 128 KiB (`MAX_ARG_STRLEN`), and the whole environment shares the argv's limit.
const MAX_ENV_VALUE: usize = 64 * 1024;

/// The value of `NEEDLE_INPUTS`: the JSON itself, or, when longer than `max`, `@` and the path
/// of `inputs.json` in the staging slot, which holds it.
fn inputs_env(json: &str, staging: &Path, max: usize) -> std::io::Result<String> {
    if json.len() <= max {
        return Ok(json.to_string());
    }
    let file = staging.join("inputs.json");
    fs::write(&file, json)?;
    Ok(format!("@{}", file.display()))
}

/// Empty a staging slot for its next attempt: `work/` emptied, and `out/` too when `output`
/// (it may hold files; it does not once its output is absorbed). Emptying rather than
/// recreating keeps inode churn (slow on ext4) out of every step. A directory left as the
/// last cleaning left it is not listed again (see [`untouched`]).
pub fn clean_slot(slot: &Path, output: bool) -> std::io::Result<()> {
    let subs: &[&str] = if output { &["out", "work"] } else { &["work"] };
    for sub in subs {
        let dir = slot.join(sub);
        if untouched(&dir) {
            continue;
        }
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.symlink_metadata()?.is_dir() {
                make_writable(&path);
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
        set_mode(&dir, 0o755)?;
        needle_core::store::set_store_time(&dir)?;
    }
    Ok(())
}

/// Whether `dir` is still as [`clean_slot`] left it: empty, 0755, with the store's time. Adding,
/// removing or renaming an entry sets a directory's modification time to the present, and a
/// chmod changes its mode, so one `lstat` says so without listing it (most steps write nothing
/// into their working directory). Only a step that puts the store's time back on its working
/// directory itself could leave something behind unseen.
fn untouched(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(dir).is_ok_and(|m| {
        m.is_dir()
            && m.mode() & 0o7777 == 0o755
            && m.nlink() == 2
            && needle_core::store::has_store_time(&m)
    })
}

/// A step may leave read-only directories behind; make them removable.
fn make_writable(dir: &Path) {
    let _ = set_mode(dir, 0o755);
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}

/// `data-set.v2` → `DATA_SET_V2`.
pub fn env_name(name: &str) -> String {
    needle_core::ops::env_name(name)
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn gpu_env(held: &Held, builtin: bool) -> BTreeMap<String, String> {
        let mut launch = Launch {
            program: PathBuf::new(),
            argv0: String::new(),
            args: Vec::new(),
            cwd: PathBuf::new(),
            log: PathBuf::new(),
            env: Vec::new(),
        };
        set_gpu_env(&mut launch, held, builtin);
        (launch.env.into_iter())
            .map(|(k, v)| (k, v.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn a_step_learns_its_gpus_and_how_much_of_them_it_holds() {
        let share = Held {
            gpus: vec!["GPU-8f1c".into()],
            gpu_share: Some(0.25),
            gpu_mem_gb: Some(20.0),
            gpu_mem_fraction: Some(0.25),
            cpus: 2,
            mps: None,
        };
        let env = gpu_env(&share, true);
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "GPU-8f1c");
        assert_eq!(env["NEEDLE_GPU_SHARE"], "0.25");
        assert_eq!(env["NEEDLE_GPU_MEM_GB"], "20");
        if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() {
            assert_eq!(
                env["PYTORCH_CUDA_ALLOC_CONF"],
                "per_process_memory_fraction:0.2500"
            );
        }
        // A user's command is not capped: it reads NEEDLE_GPU_MEM_GB if it wants to.
        assert!(!gpu_env(&share, false).contains_key("PYTORCH_CUDA_ALLOC_CONF"));

        let whole = Held {
            gpus: vec!["0".into(), "1".into()],
            gpu_share: Some(1.0),
            gpu_mem_gb: Some(79.6),
            gpu_mem_fraction: None,
            cpus: 1,
            mps: Some(crate::mps::MpsDirs {
                pipe: "/tmp/m/pipe".into(),
                log: "/tmp/m/log".into(),
            }),
        };
        let env = gpu_env(&whole, true);
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "0,1");
        assert_eq!(env["NEEDLE_GPU_SHARE"], "1");
        assert_eq!(env["NEEDLE_GPU_MEM_GB"], "79.6");
        assert!(!env.contains_key("PYTORCH_CUDA_ALLOC_CONF"));
        assert_eq!(env["CUDA_MPS_PIPE_DIRECTORY"], "/tmp/m/pipe");
        assert_eq!(env["CUDA_MPS_LOG_DIRECTORY"], "/tmp/m/log");

        let none = gpu_env(&Held::default(), true);
        assert_eq!(none["CUDA_VISIBLE_DEVICES"], "");
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn long_inputs_go_to_a_file() {
        let t = tempfile::tempdir().unwrap();
        let json = r#"{"data":{"dir":"/x"}}"#;
        assert_eq!(inputs_env(json, t.path(), 100).unwrap(), json);
        let long = inputs_env(json, t.path(), 10).unwrap();
        let file = long.strip_prefix('@').expect("a file reference");
        assert_eq!(fs::read_to_string(file).unwrap(), json);
        // What a worker makes of both.
        let parsed = needle_ops::context::parse_inputs(json).unwrap();
        assert_eq!(parsed["data"], needle_ops::Input::One(PathBuf::from("/x")));
    }

    #[test]
    fn a_cleaned_work_dir_is_listed_again_only_once_something_changed_it() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let slot = t.path();
        fs::create_dir(slot.join("out")).unwrap();
        fs::create_dir(slot.join("work")).unwrap();
        fs::write(slot.join("work/left"), "x").unwrap();
        clean_slot(slot, false).unwrap();
        assert!(untouched(&slot.join("work")));
        assert_eq!(fs::read_dir(slot.join("work")).unwrap().count(), 0);

        // A file, a directory, or a chmod by the step: each is seen and undone.
        fs::write(slot.join("work/file"), "x").unwrap();
        assert!(!untouched(&slot.join("work")));
        clean_slot(slot, false).unwrap();
        fs::create_dir_all(slot.join("work/d/e")).unwrap();
        assert!(!untouched(&slot.join("work")));
        clean_slot(slot, false).unwrap();
        fs::set_permissions(slot.join("work"), fs::Permissions::from_mode(0o555)).unwrap();
        assert!(!untouched(&slot.join("work")));
        clean_slot(slot, false).unwrap();
        assert!(untouched(&slot.join("work")));
        assert_eq!(fs::read_dir(slot.join("work")).unwrap().count(), 0);

        // out/ only when asked.
        fs::write(slot.join("out/o"), "x").unwrap();
        clean_slot(slot, false).unwrap();
        assert!(slot.join("out/o").exists());
        clean_slot(slot, true).unwrap();
        assert!(!slot.join("out/o").exists());
    }

    #[test]
    fn an_attempt_that_cannot_have_its_log_says_where_and_why() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("gone/log");
        let e = open_log(&log).unwrap_err();
        let AttemptResult::SpawnFailed { error } = e.not_started() else {
            panic!("not a spawn failure: {e:?}");
        };
        let cause = std::io::Error::from_raw_os_error(2); // ENOENT: `gone/` is not there
        assert_eq!(
            error,
            format!("could not create `{}`: {cause}", log.display())
        );
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name("data"), "DATA");
        assert_eq!(env_name("data-set.v2"), "DATA_SET_V2");
    }
}
