//! sled's own writes failing: `EIO` and `ENOSPC` at each write and sync the metadata database
//! makes to its files in `meta/` (its log, snapshots, config), injected below sled by
//! `tests/faultfs` (an `LD_PRELOAD` library), under `needle run` and under the commands that
//! delete or rewrite metadata: `gc`, `pin`, `unpin` and `verify --repair`. Each is first run
//! without a fault, to count its calls, then once per call on a fresh copy of one store: `EIO`
//! from that call on, `ENOSPC` for that call alone at every other one. The command ends
//! saying the store failed (exit 3), or exits 0 having done all its work; afterwards, the
//! fault gone, the store opens and verifies (or `verify --rebuild` restores it from the
//! journal, and then it verifies), everything that must survive exports byte for byte, and the
//! command run again finishes its work.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// Two recipes: the first commits before any fault; the second, run under the fault, adds
/// two sweep points and a step over all of them.
fn first() -> String {
    parts_and_total("sled-faults", "[1, 2]")
}

fn second() -> String {
    parts_and_total("sled-faults", "[1, 2, 3, 4]")
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

/// Which files' calls are counted and failed: sled's own in `meta/`, or every file of the
/// store (for `verify --rebuild`, which writes a new database beside `meta/`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Under {
    Meta,
    Store,
}

/// Where a fault goes: the `at`-th write or sync [`Under`] its directory (and every later one
/// when `every_later`, as on a disk that is gone), failing with `errno`.
#[derive(Debug, Clone, Copy)]
struct Fault {
    at: usize,
    every_later: bool,
    errno: &'static str,
}

/// `needle ARGS` with the fault library loaded, counting the calls `under` names into
/// `trace`, failing the one `fault` names.
fn faulted(p: &Project, args: &[&str], under: Under, trace: &Path, fault: Option<Fault>) -> Output {
    let dir = match under {
        Under::Meta => p.store().join("meta"),
        Under::Store => p.store(),
    };
    let mut cmd = p.cmd(args);
    cmd.env("LD_PRELOAD", faultfs())
        .env("NEEDLE_FAULTFS_DIR", std::fs::canonicalize(dir).unwrap())
        .env("NEEDLE_FAULTFS_TRACE", trace)
        .timeout(LIMIT);
    if let Some(f) = fault {
        let at = format!("{}{}", f.at, if f.every_later { "+" } else { "" });
        cmd.env("NEEDLE_FAULTFS_AT", at)
            .env("NEEDLE_FAULTFS_ERRNO", f.errno);
    }
    cmd.output().expect("needle runs")
}

/// Artifacts as `export` writes them: each reference with its files and their bytes.
type Exports = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// A store with the first recipe's run in it, its last step pinned; what its steps export.
/// The pin is written last so that sled's log is ahead of its snapshot: the next process to
/// open it, the faulted run, writes a snapshot first, so its writes are faulted too.
fn committed(p: &Project) -> Exports {
    p.write("first.toml", &first());
    p.write("second.toml", &second());
    p.json(&["run", "first.toml"], 0);
    let exported = exports(p, &COMMITTED);
    assert_code(&p.needle(&["pin", "1:total"]), 0);
    exported
}

/// Each of `refs` exported.
fn exports<R: AsRef<str>>(p: &Project, refs: &[R]) -> Exports {
    refs.iter()
        .enumerate()
        .map(|(n, r)| {
            let dir = p.path(&format!("export-{n}"));
            let _ = std::fs::remove_dir_all(&dir);
            let out = p.needle(&["export", r.as_ref(), dir.to_str().unwrap()]);
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
            (r.as_ref().to_string(), files)
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
    let verify = needle(p, &["verify"]);
    if verify.status.code() == Some(0) {
        return false;
    }
    assert_code(&verify, 3);
    assert!(
        stderr(&verify).contains("needle verify --rebuild"),
        "{what}: an unreadable store must point at the rebuild: {}",
        stderr(&verify)
    );
    assert_code(&needle(p, &["verify", "--rebuild"]), 0);
    assert_code(&needle(p, &["verify"]), 0);
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// The command went on and succeeded.
    Tolerated,
    /// The command stopped; the store opened as it was.
    StoreFailed,
    /// The command stopped; the store opened once rebuilt from its journal.
    Rebuilt,
}

/// The kinds of call sled makes in `meta/`, each of which a sweep must fail at least once.
const KINDS: [&str; 4] = ["pwrite64", "sync_file_range", "fsync", "write"];

/// The kind of a traced call (`N CALL FILE [failed]`).
fn kind(call: &str) -> &str {
    call.split(' ').nth(1).expect("a trace line names its call")
}

/// A project holding a copy of `template`'s directory: its store and its recipes.
fn copy_of(template: &Project) -> Project {
    let p = Project::new();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(template.dir.path().join("."))
        .arg(p.dir.path())
        .status()
        .unwrap();
    assert!(copied.success());
    p
}

/// `needle ARGS`, a hang failing the test rather than stalling it.
fn needle(p: &Project, args: &[&str]) -> Output {
    p.cmd(args).timeout(LIMIT).output().expect("needle runs")
}

/// A faultless `needle ARGS` on a copy of `template`, traced: what it printed, and sled's
/// calls, which must include every kind of [`KINDS`].
fn traced(template: &Project, args: &[&str], under: Under) -> (Output, Vec<String>) {
    let p = copy_of(template);
    let out = faulted(&p, args, under, &p.path("calls"), None);
    assert_code(&out, 0);
    let calls = p.lines("calls");
    for call in KINDS {
        assert!(
            calls.iter().any(|c| kind(c) == call),
            "`needle {}` made no {call}: {calls:?}",
            args.join(" ")
        );
    }
    (out, calls)
}

/// A disk that is gone (every call from the N-th on fails with `EIO`) at each of `calls`
/// calls, and a disk full for one call (`ENOSPC`) at every other one.
fn faults(calls: usize) -> impl Iterator<Item = Fault> {
    let gone = (1..=calls).map(|at| Fault {
        at,
        every_later: true,
        errno: "EIO",
    });
    let full = (1..=calls).step_by(2).map(|at| Fault {
        at,
        every_later: false,
        errno: "ENOSPC",
    });
    gone.chain(full)
}

/// `needle ARGS` once per fault of [`faults`] over `calls` (a faultless run's), each on a
/// fresh copy of `template`. After each, what every command must show: no panic; exit 0, or 3
/// saying the store's metadata failed; a store that opens and verifies ([`recover`]); then
/// `check`'s own checks, given the copy, how the command ended and what to say on failure.
/// Each kind of call must have been failed. Returns the failed calls' kinds and what came
/// of them, counted.
fn sweep(
    template: &Project,
    args: &[&str],
    under: Under,
    calls: &[String],
    check: impl Fn(&Project, Outcome, &str),
) -> BTreeMap<(String, Outcome), usize> {
    let mut seen = BTreeMap::new();
    for fault in faults(calls.len()) {
        let p = copy_of(template);
        let out = faulted(&p, args, under, &p.path("calls"), Some(fault));
        let what = format!("`needle {}`, {fault:?}: {}", args.join(" "), stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{what}");
        let failed = p
            .lines("calls")
            .into_iter()
            .find(|c| c.ends_with(" failed"));
        let outcome = match out.status.code() {
            Some(0) => Outcome::Tolerated,
            Some(3) => {
                assert!(failed.is_some(), "{what}");
                // A failed call outside `meta/` names its file, which lies in the store.
                let err = stderr(&out);
                let store = p.store().display().to_string();
                assert!(
                    err.contains("the store's metadata")
                        || (under == Under::Store && err.contains(&store)),
                    "{what}: the command must say the store failed"
                );
                Outcome::StoreFailed
            }
            code => panic!("{what}: exit code {code:?}, expected 0 or 3"),
        };
        let rebuilt = recover(&p, &what);
        check(&p, outcome, &what);
        if let Some(call) = failed {
            let outcome = if rebuilt { Outcome::Rebuilt } else { outcome };
            *seen.entry((kind(&call).to_string(), outcome)).or_default() += 1;
        }
    }
    eprintln!(
        "`needle {}`: {} calls; failed call and outcome: {seen:?}",
        args.join(" "),
        calls.len()
    );
    let failed: BTreeSet<&str> = seen.keys().map(|(call, _)| call.as_str()).collect();
    let made: BTreeSet<&str> = calls.iter().map(|c| kind(c)).collect();
    assert_eq!(failed, made, "a kind of call was never failed");
    seen
}

/// Every write and sync sled makes in a run failed in turn (`EIO` from it on, `ENOSPC` at
/// every other one): the run stops saying the store failed, nothing committed is lost, the
/// store opens (or is rebuilt) and verifies, and the next run finishes the rest.
#[test]
fn sleds_own_writes_failing_lose_nothing_committed() {
    let template = Project::new();
    let before = committed(&template);
    // A reference: the calls a faultless run makes, and the digests it reaches. 31 calls: 47
    // faulted runs, 13-30 s here.
    let args = ["run", "second.toml", "--json"];
    let (run, calls) = traced(&template, &args, Under::Meta);
    let want = outputs(&serde_json::from_slice::<Value>(&run.stdout).unwrap());
    let seen = sweep(&template, &args, Under::Meta, &calls, |p, _, what| {
        assert_eq!(
            &exports(p, &COMMITTED),
            &before,
            "{what}: the first run's artifacts changed"
        );
        let kept = succeeded(p, "2");
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
        assert_eq!(&outputs(&rerun), &want, "{what}");
    });
    assert!(
        !seen.keys().any(|(_, o)| *o == Outcome::Tolerated),
        "a run went on past a failed write of sled: {seen:?}"
    );
}

// The commands that delete or rewrite metadata: `gc`, `pin`, `unpin`, `verify --repair`, each
// faulted at every call as `run` is above, on a store where it has work to do.

/// A store with two runs: the first recipe's (`1:work[i=1]`, `1:work[i=2]`, `1:total`), then
/// the same with `i = 5` (`2:work[i=5]`, `2:total`), every output distinct. Its artifacts'
/// digests, by reference.
fn two_runs() -> (Project, BTreeMap<String, String>) {
    let p = Project::new();
    p.write("first.toml", &first());
    p.write("fifth.toml", &parts_and_total("sled-faults", "[5]"));
    let mut digests = BTreeMap::new();
    for (id, recipe) in [(1, "first.toml"), (2, "fifth.toml")] {
        let run = p.json(&["run", recipe], 0);
        for s in run["steps"].as_array().unwrap() {
            let name = s["name"].as_str().unwrap();
            let reference = match s["bindings"]["i"].as_i64() {
                Some(i) => format!("{id}:{name}[i={i}]"),
                None => format!("{id}:{name}"),
            };
            digests.insert(reference, s["output"].as_str().unwrap().to_string());
        }
    }
    let distinct: BTreeSet<&String> = digests.values().collect();
    assert_eq!(distinct.len(), 5, "{digests:?}");
    (p, digests)
}

/// A copy of `base` with `1:work[i=1]` pinned: the pin, written last, leaves sled's log ahead
/// of its snapshot, so the faulted command writes a snapshot as it opens the store.
fn pinned(base: &Project) -> Project {
    let p = copy_of(base);
    assert_code(&p.needle(&["pin", "1:work[i=1]"]), 0);
    p
}

/// The digests of `refs`.
fn digests_of(digests: &BTreeMap<String, String>, refs: &[&str]) -> Vec<String> {
    refs.iter().map(|r| digests[*r].clone()).collect()
}

/// What `gc --keep-last 1` would still free: records, blobs, logs, resume dirs and views.
fn collectable(p: &Project) -> u64 {
    let dry = p.json(&["gc", "--keep-last", "1", "--dry-run"], 0);
    let freed = &dry["freed"];
    let records = ["runs", "steps", "artifacts", "index_entries"]
        .iter()
        .map(|k| freed[k].as_u64().unwrap());
    let files = ["blobs", "logs", "resume", "views"]
        .iter()
        .map(|k| freed[k]["count"].as_u64().unwrap());
    records.chain(files).sum()
}

/// `gc --keep-last 1` with each of sled's calls failing in turn (13 calls, 20 faulted runs), on
/// a store where it drops the first run, `1:work[i=2]` and `1:total` and keeps the second run
/// and the pinned `1:work[i=1]`: a gc that exits 0 has collected everything (it does so when
/// the failed call is sled's record of the journal's compaction, which gc only warns about: the
/// compacted journal is whole, and the next open finds its place in it); gc again, without the
/// fault, collects what is left; and what gc keeps exports byte for byte after both.
#[test]
fn gc_with_sleds_writes_failing_keeps_what_it_must() {
    let (base, digests) = two_runs();
    let kept = digests_of(&digests, &["1:work[i=1]", "2:work[i=5]", "2:total"]);
    let before = exports(&base, &kept);
    let template = pinned(&base);
    let args = ["gc", "--keep-last", "1", "--json"];
    let (gc, calls) = traced(&template, &args, Under::Meta);
    let freed = &serde_json::from_slice::<Value>(&gc.stdout).unwrap()["freed"];
    assert_eq!(
        (freed["runs"].as_u64(), freed["blobs"]["count"].as_u64()),
        (Some(1), Some(2)),
        "gc must have something to collect: {freed}"
    );
    sweep(&template, &args, Under::Meta, &calls, |p, outcome, what| {
        if outcome == Outcome::Tolerated {
            assert_eq!(collectable(p), 0, "{what}: gc said it was done");
        }
        assert_code(&needle(p, &args), 0);
        assert_eq!(collectable(p), 0, "{what}: gc again left something");
        // Checked once, after both: nothing makes again what the faulted gc lost.
        assert_eq!(exports(p, &kept), before, "{what}: gc lost what it keeps");
    });
}

/// The pinned artifacts, by digest.
fn pins(p: &Project) -> BTreeSet<String> {
    p.json(&["pin"], 0)
        .as_array()
        .unwrap()
        .iter()
        .map(|pin| pin["artifact"].as_str().unwrap().to_string())
        .collect()
}

/// `needle ARGS` (a pin or an unpin) with each of sled's calls failing in turn: the pins are
/// those before (`old`) or after (`new`), never another set, and `new` where the command
/// exited 0; the command again, without the fault, leaves `new`; and the artifacts of both
/// sets export byte for byte.
fn pin_sweep(args: &[&str], old: &[&str], new: &[&str]) {
    let (base, digests) = two_runs();
    let set =
        |refs: &[&str]| -> BTreeSet<String> { digests_of(&digests, refs).into_iter().collect() };
    let (old, new) = (set(old), set(new));
    let touched: Vec<&String> = old.union(&new).collect();
    let before = exports(&base, &touched);
    let template = pinned(&base);
    let (_, calls) = traced(&template, args, Under::Meta);
    sweep(&template, args, Under::Meta, &calls, |p, outcome, what| {
        let now = pins(p);
        assert!(now == old || now == new, "{what}: the pins are {now:?}");
        if outcome == Outcome::Tolerated {
            assert_eq!(now, new, "{what}: the command said it was done");
        }
        let again = needle(p, args);
        // An unpin that the store finished as it opened finds nothing left to unpin.
        let unpinned = now == new && stderr(&again).contains("is not pinned");
        assert_code(&again, if unpinned { 2 } else { 0 });
        assert_eq!(pins(p), new, "{what}: the command again");
        assert_eq!(exports(p, &touched), before, "{what}: an artifact changed");
    });
}

/// `pin` and `unpin`, each with sled's calls failing in turn (11 calls, 17 faulted runs each):
/// see [`pin_sweep`].
#[test]
fn pin_and_unpin_with_sleds_writes_failing_leave_one_pin_state() {
    pin_sweep(
        &["pin", "1:total"],
        &["1:work[i=1]"],
        &["1:work[i=1]", "1:total"],
    );
    pin_sweep(&["unpin", "1:work[i=1]"], &["1:work[i=1]"], &[]);
}

/// `verify --repair` with sled's calls failing in turn (11 calls, 17 faulted runs), on a store
/// where the blob of `1:work[i=2]` is damaged: a repair that exits 0 leaves a store that
/// verifies with `--hash`; the repair again, without the fault, does; and every other artifact
/// exports byte for byte after both.
#[test]
fn verify_repair_with_sleds_writes_failing_loses_nothing_undamaged() {
    let (base, digests) = two_runs();
    let undamaged = digests_of(
        &digests,
        &["1:work[i=1]", "1:total", "2:work[i=5]", "2:total"],
    );
    let before = exports(&base, &undamaged);
    let damaged = copy_of(&base);
    crate::repair::damage(&damaged, "1:work[i=2]", "data");
    let template = pinned(&damaged);
    let args = ["verify", "--repair"];
    let (repair, calls) = traced(&template, &args, Under::Meta);
    assert!(
        stdout(&repair).contains("dropped blob"),
        "{}",
        stdout(&repair)
    );
    sweep(&template, &args, Under::Meta, &calls, |p, outcome, what| {
        if outcome == Outcome::Tolerated {
            assert_code(&needle(p, &["verify", "--hash"]), 0);
        }
        assert_code(&needle(p, &args), 0);
        assert_code(&needle(p, &["verify", "--hash"]), 0);
        // Checked once, after both repairs: nothing makes again what the faulted one lost.
        assert_eq!(
            exports(p, &undamaged),
            before,
            "{what}: an undamaged artifact changed"
        );
    });
}

/// `verify --rebuild` of a store whose `meta/` is gone, with each write and sync under the
/// store failing in turn (the new database it writes in `meta.rebuild-<pid>/`, the lock, the
/// syncs of directories): a rebuild that stops leaves a store the next rebuild restores whole
/// (every run, pin and artifact, byte for byte), and one that exits 0 has restored it. The
/// journal is only read, so a failing disk can cost the rebuild, never what it rebuilds from.
#[test]
fn a_rebuild_with_the_disk_failing_can_be_done_again() {
    let (base, digests) = two_runs();
    let all: Vec<&String> = digests.values().collect();
    let before = exports(&base, &all);
    let template = pinned(&base);
    let (want_pins, want_runs) = (pins(&template), runs(&template));
    std::fs::remove_dir_all(template.store().join("meta")).unwrap();
    let args = ["verify", "--rebuild"];
    let (rebuilt, calls) = traced(&template, &args, Under::Store);
    assert!(stdout(&rebuilt).contains("rebuilt"), "{}", stdout(&rebuilt));
    sweep(&template, &args, Under::Store, &calls, |p, _, what| {
        assert_eq!(pins(p), want_pins, "{what}: the pins");
        assert_eq!(runs(p), want_runs, "{what}: the runs");
        assert_eq!(exports(p, &all), before, "{what}: an artifact changed");
    });
}

/// The store's runs: id, state and each step's output.
fn runs(p: &Project) -> Vec<(u64, String, Vec<String>)> {
    let ids: Vec<u64> = p
        .json(&["runs"], 0)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_u64().unwrap())
        .collect();
    ids.into_iter()
        .map(|id| {
            let status = p.json(&["status", &id.to_string()], 0);
            let outputs = status["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["output"].to_string())
                .collect();
            (id, status["state"].to_string(), outputs)
        })
        .collect()
}
