//! sled's own writes failing under a run: `EIO` and `ENOSPC` at each write and sync the
//! metadata database makes to its files in `meta/` (its log, snapshots, config), injected
//! below sled by `tests/faultfs` (an `LD_PRELOAD` library). The run stops saying the store
//! failed (exit 3); afterwards, the fault gone, the store opens and verifies (or `verify
//! --rebuild` restores it from the journal, and then it verifies), everything committed before
//! the fault is still there, byte for byte, and the next run finishes the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// Two recipes: the first commits before any fault; the second, run under the fault, adds
/// two sweep points and a step over all of them.
const FIRST: &str = r#"
[recipe]
name = "sled-faults"

[sweep]
i = [1, 2]

[steps.work]
op = "exec"
cmd = ["sh", "-c", "seq 1 ${i}00 > \"$NEEDLE_OUT/data\""]

[steps.total]
op = "exec"
inputs = { parts = "work[*]" }
cmd = ["sh", "-c", "cat \"$NEEDLE_IN_PARTS\"/*/data | wc -l > \"$NEEDLE_OUT/total\""]
"#;

fn second() -> String {
    FIRST.replace("i = [1, 2]", "i = [1, 2, 3, 4]")
}

/// The first run's steps, as `export` names them.
const COMMITTED: [&str; 3] = ["1:work[i=1]", "1:work[i=2]", "1:total"];

/// A command that hangs is a failure, not a stuck suite.
const LIMIT: Duration = Duration::from_secs(60);

/// The fault library, built once for this test process into its own target directory (beside
/// this build's), so it neither waits for nor disturbs the build that runs the tests.
fn faultfs() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = bin()
            .parent()
            .and_then(Path::parent)
            .expect("the binary lies in <target>/<profile>/")
            .join("faultfs");
        let out = std::process::Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["build", "--locked", "-p", "needle-faultfs", "--target-dir"])
            .arg(&target)
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building tests/faultfs failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("debug/libneedle_faultfs.so")
    })
}

/// Where a fault goes: the `at`-th write or sync in `meta/` (and every later one when
/// `every_later`, as on a disk that is gone), failing with `errno`.
#[derive(Debug, Clone, Copy)]
struct Fault {
    at: usize,
    every_later: bool,
    errno: &'static str,
}

/// `needle ARGS` with the fault library loaded, counting sled's calls into `trace`, failing
/// the one `fault` names.
fn faulted(p: &Project, args: &[&str], trace: &Path, fault: Option<Fault>) -> Output {
    let meta = std::fs::canonicalize(p.store().join("meta")).unwrap();
    let mut cmd = p.cmd(args);
    cmd.env("LD_PRELOAD", faultfs())
        .env("NEEDLE_FAULTFS_DIR", &meta)
        .env("NEEDLE_FAULTFS_TRACE", trace)
        .timeout(LIMIT);
    if let Some(f) = fault {
        let at = format!("{}{}", f.at, if f.every_later { "+" } else { "" });
        cmd.env("NEEDLE_FAULTFS_AT", at)
            .env("NEEDLE_FAULTFS_ERRNO", f.errno);
    }
    cmd.output().expect("needle runs")
}

/// Each of the first run's artifacts, as `export` writes it: its files and their bytes.
type Exports = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// A store with the first recipe's run in it, its last step pinned; what its steps export.
/// The pin is written last so that sled's log is ahead of its snapshot: the next process to
/// open it, the faulted run, writes a snapshot first, so its writes are faulted too.
fn committed(p: &Project) -> Exports {
    p.write("first.toml", FIRST);
    p.write("second.toml", &second());
    p.json(&["run", "first.toml"], 0);
    let exported = exports(p);
    assert_code(&p.needle(&["pin", "1:total"]), 0);
    exported
}

/// Each of the first run's artifacts exported.
fn exports(p: &Project) -> Exports {
    COMMITTED
        .iter()
        .enumerate()
        .map(|(n, r)| {
            let dir = p.path(&format!("export-{n}"));
            let _ = std::fs::remove_dir_all(&dir);
            let out = p.needle(&["export", r, dir.to_str().unwrap()]);
            assert_code(&out, 0);
            let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read(e.path()).unwrap())
                })
                .collect();
            files.sort();
            (r.to_string(), files)
        })
        .collect()
}

/// The steps of run `run` that `status` says succeeded: committed, so never executed again.
/// None when the run was stopped before it was recorded.
fn succeeded(p: &Project, run: &str) -> Vec<String> {
    let out = p.needle(&["status", run, "--json"]);
    if out.status.code() == Some(2) && stderr(&out).contains(&format!("no run `{run}`")) {
        return Vec::new();
    }
    assert_code(&out, 0);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = status["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "succeeded")
        .map(|s| format!("{}{}", s["name"], s["bindings"]))
        .collect();
    names.sort();
    names
}

/// After a faulted run: the store opens and verifies, rebuilt from its journal where sled's
/// files cannot be opened; what the fault returns.
fn recover(p: &Project, what: &str) -> bool {
    let verify = p.cmd(&["verify"]).timeout(LIMIT).output().unwrap();
    if verify.status.code() == Some(0) {
        return false;
    }
    assert_code(&verify, 3);
    assert!(
        stderr(&verify).contains("needle verify --rebuild"),
        "{what}: an unreadable store must point at the rebuild: {}",
        stderr(&verify)
    );
    let rebuilt = p
        .cmd(&["verify", "--rebuild"])
        .timeout(LIMIT)
        .output()
        .unwrap();
    assert_code(&rebuilt, 0);
    assert_code(&p.needle(&["verify"]), 0);
    true
}

/// One faulted run of the second recipe on a copy of `template` (a store after the first
/// run), then the checks: its exit code and message, the store after it, the first run's
/// exports, the steps it committed, and a rerun that finishes with the digests `want`. The
/// call that was failed, if the run reached it, and what came of it.
fn try_fault(
    template: &Project,
    before: &Exports,
    fault: Fault,
    want: &[(String, String)],
) -> Option<(String, Outcome)> {
    let p = Project::new();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(template.store())
        .arg(p.store())
        .status()
        .unwrap();
    assert!(copied.success());
    p.write("second.toml", &second());
    let trace = p.path("calls");
    let run = faulted(&p, &["run", "second.toml", "--json"], &trace, Some(fault));
    let what = format!("{fault:?}: {}", stderr(&run));
    assert!(!stderr(&run).contains("panicked"), "{what}");
    let failed = p
        .lines("calls")
        .into_iter()
        .find(|c| c.ends_with(" failed"));
    let outcome = match run.status.code() {
        // A failure sled shrugged off (none does now) must lose nothing either.
        Some(0) => Outcome::Tolerated,
        Some(3) => {
            assert!(failed.is_some(), "{what}");
            assert!(
                stderr(&run).contains("the store's metadata"),
                "{what}: the run must say the store failed"
            );
            Outcome::StoreFailed
        }
        code => panic!("{what}: exit code {code:?}, expected 0 or 3"),
    };
    let rebuilt = recover(&p, &what);
    assert_eq!(
        &exports(&p),
        before,
        "{what}: the first run's artifacts changed"
    );
    let kept = succeeded(&p, "2");
    let rerun = p.json(&["run", "second.toml"], 0);
    for s in rerun["steps"].as_array().unwrap() {
        let name = format!("{}{}", s["name"], s["bindings"]);
        if kept.contains(&name) {
            assert_eq!(
                s["status"], "cached",
                "{what}: {name} was committed: {rerun}"
            );
        }
    }
    assert_eq!(&outputs(&rerun), want, "{what}");
    let call = failed?.split(' ').nth(1).unwrap().to_string();
    Some((call, if rebuilt { Outcome::Rebuilt } else { outcome }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The run went on and succeeded.
    Tolerated,
    /// The run stopped; the store opened as it was.
    StoreFailed,
    /// The run stopped; the store opened once rebuilt from its journal.
    Rebuilt,
}

/// Every write and sync sled makes in a run failed in turn (`EIO` from it on, `ENOSPC` at
/// every other one): the run stops saying the store failed, nothing committed is lost, the
/// store opens (or is rebuilt) and verifies, and the next run finishes the rest.
#[test]
fn sleds_own_writes_failing_lose_nothing_committed() {
    let template = Project::new();
    let before = committed(&template);
    // A reference: the calls a faultless run makes, and the digests it reaches.
    let p = Project::new();
    committed(&p);
    let trace = p.path("calls");
    let run = faulted(&p, &["run", "second.toml", "--json"], &trace, None);
    assert_code(&run, 0);
    let want = outputs(&serde_json::from_slice::<Value>(&run.stdout).unwrap());
    let calls = p.lines("calls");
    let kinds: BTreeSet<String> = calls
        .iter()
        .map(|c| c.split(' ').nth(1).unwrap().to_string())
        .collect();
    for call in ["pwrite64", "sync_file_range", "fsync", "write"] {
        assert!(kinds.contains(call), "no {call} in {calls:?}");
    }

    // A disk that is gone (every call from the N-th fails with EIO) at each call; a disk that
    // is full for one call at every other one (ENOSPC): 47 faulted runs, 13-30 s here.
    let faults = (1..=calls.len())
        .map(|at| Fault {
            at,
            every_later: true,
            errno: "EIO",
        })
        .chain((1..=calls.len()).step_by(2).map(|at| Fault {
            at,
            every_later: false,
            errno: "ENOSPC",
        }));
    let mut seen: BTreeMap<(String, Outcome), usize> = BTreeMap::new();
    for fault in faults {
        if let Some(reached) = try_fault(&template, &before, fault, &want) {
            *seen.entry(reached).or_default() += 1;
        }
    }
    eprintln!("{} calls; failed call and outcome: {seen:?}", calls.len());
    let failed: BTreeSet<String> = seen.keys().map(|(call, _)| call.clone()).collect();
    assert_eq!(failed, kinds, "a kind of call was never failed");
    assert!(
        !seen.keys().any(|(_, o)| *o == Outcome::Tolerated),
        "a run went on past a failed write of sled: {seen:?}"
    );
}
