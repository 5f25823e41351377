//! A temporary project directory with a store, and helpers to run needle in it.

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;
use serde_json::Value;

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn store(&self) -> PathBuf {
        self.path(".needle")
    }

    /// Write a file (creating parents), returning its path.
    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `needle ARGS` in the project directory, with the store there.
    pub fn needle(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("needle runs")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.current_dir(self.dir.path())
            .env("NEEDLE_STORE", self.store())
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(args);
        c
    }

    /// `needle ARGS` in the project, to spawn in the background; its output goes nowhere
    /// unless the caller pipes it.
    pub fn background(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(bin());
        c.current_dir(self.dir.path())
            .env("NEEDLE_STORE", self.store())
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    }

    /// `needle ARGS --json`, asserting the exit code, parsing stdout.
    pub fn json(&self, args: &[&str], code: i32) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        let out = self.needle(&all);
        assert_code(&out, code);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Lines of a file steps append to, to count what really executed.
    pub fn lines(&self, rel: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(rel))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

pub fn bin() -> &'static Path {
    // Checked once; every test that asks again gets the same answer, not a poisoned lock.
    static WORKER_STALE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let needle = Path::new(env!("CARGO_BIN_EXE_needle"));
    if let Some(why) = WORKER_STALE.get_or_init(|| worker_staleness(needle)) {
        panic!("{why}");
    }
    needle
}

/// Why the `needle-worker` beside `needle` cannot be trusted, if it cannot. This test target
/// does not build it: `cargo test -p needle-runner` after an edit of `models/` or `ops/` tests an old
/// worker, and passes or fails for the wrong reason.
fn worker_staleness(needle: &Path) -> Option<String> {
    let worker = needle.with_file_name("needle-worker");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(built) = modified(&worker) else {
        return Some(format!(
            "{} is missing: build it with `cargo build -p needle-models` (or run `make test`)",
            worker.display()
        ));
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stack: Vec<PathBuf> = ["core/src", "ops/src", "models/src"]
        .iter()
        .map(|d| root.join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if modified(&path).is_some_and(|m| m > built) {
                return Some(format!(
                    "{} is older than {}: build it with `cargo build -p needle-models` (or run `make test`)",
                    worker.display(),
                    path.display()
                ));
            }
        }
    }
    None
}

pub fn assert_code(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit code {code}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The steps of a `run --json` or `status --json` answer with this name.
pub fn steps_named<'a>(v: &'a Value, name: &str) -> Vec<&'a Value> {
    v["steps"]
        .as_array()
        .expect("steps[]")
        .iter()
        .filter(|s| s["name"] == name)
        .collect()
}

/// The view of `step`'s output in `run` (the JSON of `run` or `status`).
pub fn output_view(p: &Project, run: &Value, step: &str) -> PathBuf {
    let output = steps_named(run, step)[0]["output"]
        .as_str()
        .unwrap()
        .to_string();
    let show = p.json(&["show", &output], 0);
    PathBuf::from(show["view"].as_str().unwrap())
}

/// (step label with its bindings, output digest) of every step of a `run --json` answer,
/// sorted: two runs of one recipe compare equal when they made the same artifacts.
pub fn outputs(run: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!("{}{}", s["name"], s["bindings"]),
                s["output"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A recipe `name` of a step `work` swept over `i` in `values` (a TOML array), each writing
/// `seq 1 i00`, and a step `total` over all of them: small, with outputs that all differ.
pub fn parts_and_total(name: &str, values: &str) -> String {
    format!(
        r#"
[recipe]
name = "{name}"

[sweep]
i = {values}

[steps.work]
op = "exec"
cmd = ["sh", "-c", "seq 1 ${{i}}00 > \"$NEEDLE_OUT/data\""]

[steps.total]
op = "exec"
inputs = {{ parts = "work[*]" }}
cmd = ["sh", "-c", "cat \"$NEEDLE_IN_PARTS\"/*/data | wc -l > \"$NEEDLE_OUT/total\""]
"#
    )
}

/// Poll `done` until it holds; fail naming `what` after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether this process may mount filesystems (it is root). Where it may not, a test that
/// needs to says so and is skipped, unless `NEEDLE_TEST_PRIVILEGED=require` (set by `make
/// test`) makes that a failure: CI must not pass by skipping what needs root (mounts, memory
/// cgroups, the kernel log).
pub fn may_mount(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_fail(&format!("{what} needs root, and this test runs as a user"));
    false
}

/// `mount ARGS DIR`; `None` (skipped, or a failure under `NEEDLE_TEST_PRIVILEGED=require`) when
/// it fails.
pub fn mount_or_skip(args: &[&str], dir: &Path) -> Option<()> {
    let out = std::process::Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .expect("mount runs");
    if out.status.success() {
        return Some(());
    }
    skip_or_fail(&format!(
        "`mount {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ));
    None
}

pub fn skip_or_fail(why: &str) {
    if std::env::var("NEEDLE_TEST_PRIVILEGED").is_ok_and(|v| v == "require") {
        panic!("{why} (NEEDLE_TEST_PRIVILEGED=require)");
    }
    eprintln!("skipping: {why}");
}

/// A read-only bind mount of `src` on `dir`, unmounted on drop.
pub struct ReadOnlyMount {
    dir: PathBuf,
}

impl ReadOnlyMount {
    pub fn of(src: &Path, dir: &Path) -> Option<ReadOnlyMount> {
        if !may_mount("a read-only bind mount") {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        mount_or_skip(&["--bind", src.to_str().unwrap()], dir)?;
        let mounted = ReadOnlyMount {
            dir: dir.to_path_buf(),
        };
        mount_or_skip(&["-o", "remount,bind,ro"], dir)?;
        Some(mounted)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}
