//! Killing the runner with SIGKILL mid-run loses nothing: the store verifies, and the next run
//! executes only what had not been committed (each step at most once more: the ones in flight).

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn sigkill_mid_run_leaves_a_consistent_store_and_the_rerun_finishes_the_rest() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "crash"

[sweep]
i = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39]

[steps.work]
op = "exec"
cmd = ["sh", "-c", "echo ${i} >> \"$NEEDLE_RECIPE_DIR/executions\"; sleep 0.2; seq 1 200 > \"$NEEDLE_OUT/data\"; echo ${i} > \"$NEEDLE_OUT/i\""]
"#,
    );
    let mut child = p
        .background(&["run", "recipe.toml", "-j", "4"])
        .spawn()
        .unwrap();
    // Kill it once some steps have run, while others are still going.
    let t0 = Instant::now();
    while p.lines("executions").len() < 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "steps never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: SIGKILL to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let before = p.lines("executions").len();
    assert!(before < 40, "the run finished before the kill: {before}");

    let verify = p.needle(&["verify", "--hash"]);
    assert_code(&verify, 0);

    let run = p.json(&["run", "recipe.toml", "-j", "4"], 0);
    let executed = run["executed"].as_u64().unwrap();
    let cached = run["cached"].as_u64().unwrap();
    assert_eq!(executed + cached, 40, "{run}");
    // Every step ran; none more than twice (once before the kill, uncommitted, and once
    // after); what was committed before the kill did not run again.
    let lines = p.lines("executions");
    assert_eq!(lines.len() as u64, before as u64 + executed, "{run}");
    for i in 0..40 {
        let n = lines.iter().filter(|l| **l == i.to_string()).count();
        assert!((1..=2).contains(&n), "step {i} ran {n} times");
    }
    assert!(
        cached > 0,
        "nothing committed before the kill survived: {run}"
    );

    assert_code(&p.needle(&["verify", "--hash"]), 0);
    let again = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(again["executed"], 0);
}

#[test]
fn a_step_dies_with_its_killed_runner() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "orphan"
[steps.long]
op = "exec"
cmd = ["sh", "-c", "sleep 60 & echo $! > \"$NEEDLE_RECIPE_DIR/grandchild\"; echo $$ > \"$NEEDLE_RECIPE_DIR/pid\"; exec sleep 60"]
"#,
    );
    let mut child = p.background(&["run", "recipe.toml"]).spawn().unwrap();
    let t0 = Instant::now();
    let step_pid: i32 = loop {
        if let Some(pid) = p.lines("pid").first().and_then(|l| l.parse().ok()) {
            break pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the step never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // What the step started itself goes with it.
    let grandchild: i32 = p.lines("grandchild")[0].parse().unwrap();
    assert!(runs(step_pid) && runs(grandchild));
    // SAFETY: SIGKILL to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    wait_for(
        "the step and its child to die with their runner",
        Duration::from_secs(5),
        || !runs(step_pid) && !runs(grandchild),
    );
    // The next run starts at once and runs the step again.
    p.write(
        "recipe.toml",
        &std::fs::read_to_string(p.path("recipe.toml"))
            .unwrap()
            .replace("exec sleep 60", "true"),
    );
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 1, "{run}");
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is not).
fn runs(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// A kill at every write the runner makes to the store — the run's record as it starts,
/// each blob, journal append, sled transaction and flush of every commit, the run's record
/// after the last step — never changes the final digests, and the store verifies after it.
/// The points are named in the store (`NEEDLE_TEST_FAULT`, see `core/src/store/faults.rs`):
/// a trace of one run lists them, then one run per point aborts there.
#[test]
fn a_kill_at_every_write_of_a_run_never_changes_the_final_digests() {
    let reference = Project::new();
    reference.write("recipe.toml", &parts_and_total("crash-small", "[1, 2, 3]"));
    let trace = reference.path("points");
    let out = reference
        .cmd(&["run", "recipe.toml", "-j", "2", "--json"])
        .env("NEEDLE_TEST_FAULT", format!("trace:{}", trace.display()))
        .output()
        .unwrap();
    assert_code(&out, 0);
    let want = outputs(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(want.len(), 4);
    let points = reference.lines("points");
    for kind in [
        "absorb.link",
        "journal.append",
        "sled.transaction",
        "sled.flush",
    ] {
        assert!(points.iter().any(|p| p == kind), "{kind}: {points:?}");
    }

    let mut killed_at = std::collections::BTreeSet::new();
    for at in 1..=points.len() {
        let p = Project::new();
        p.write("recipe.toml", &parts_and_total("crash-small", "[1, 2, 3]"));
        let trace = p.path("points");
        let run = p
            .cmd(&["run", "recipe.toml", "-j", "2"])
            .env(
                "NEEDLE_TEST_FAULT",
                format!("abort@{at},trace:{}", trace.display()),
            )
            .output()
            .unwrap();
        let passed = p.lines("points");
        if run.status.signal() == Some(libc::SIGABRT) {
            assert_eq!(passed.len(), at, "{}", stderr(&run));
            killed_at.insert(passed[at - 1].clone());
            assert_code(&p.needle(&["verify", "--hash"]), 0);
        } else {
            // Steps that finish together are committed together: this run wrote less.
            assert_code(&run, 0);
            assert!(passed.len() < at, "write {at} passed, no kill: {passed:?}");
        }
        let got = outputs(&p.json(&["run", "recipe.toml", "-j", "2"], 0));
        assert_eq!(got, want, "killed at write {at} of {passed:?}");
    }
    let names: std::collections::BTreeSet<String> = points.into_iter().collect();
    assert_eq!(killed_at, names, "a kind of write was never killed at");
}

#[test]
fn a_killed_runs_status_shows_what_it_committed_and_what_failed() {
    let p = Project::new();
    // With one slot, steps start one at a time by longest remaining path: `bad` (the head of
    // a chain) fails first, then `a` and `b` commit, then `wait` (which gathers every `b`)
    // says it runs, and the runner is killed.
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "killed"

[sweep]
i = [1, 2, 3]

[steps.bad]
op = "exec"
cmd = ["sh", "-c", "exit 3"]

[steps.bad2]
op = "exec"
inputs = { x = "bad" }
cmd = ["true"]

[steps.bad3]
op = "exec"
inputs = { x = "bad2" }
cmd = ["true"]

[steps.bad4]
op = "exec"
inputs = { x = "bad3" }
cmd = ["true"]

[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo a${i} > \"$NEEDLE_OUT/v\""]

[steps.b]
op = "exec"
inputs = { a = "a" }
cmd = ["sh", "-c", "echo b${i} > \"$NEEDLE_OUT/v\""]

[steps.wait]
op = "exec"
inputs = { all = "b[*]" }
cmd = ["sh", "-c", "cd \"$NEEDLE_RECIPE_DIR\"; [ -e waiting ] && exit 0; touch waiting; exec sleep 120"]
"#,
    );
    let mut child = p
        .background(&["run", "recipe.toml", "-j", "1"])
        .spawn()
        .unwrap();
    wait_for("the last step to start", Duration::from_secs(60), || {
        p.path("waiting").exists()
    });
    // SAFETY: SIGKILL to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();

    let status = p.json(&["status", "last"], 0);
    for name in ["a", "b"] {
        for s in steps_named(&status, name) {
            assert_eq!(s["status"], "succeeded", "{s}");
            assert!(s["key"].is_string(), "{s}");
            assert!(s["output"].is_string(), "{s}");
        }
    }
    assert_eq!(steps_named(&status, "bad")[0]["status"], "failed");
    assert_eq!(steps_named(&status, "bad2")[0]["status"], "skipped");
    assert_eq!(steps_named(&status, "wait")[0]["status"], "pending");
    let text = stdout(&p.needle(&["status", "last"]));
    assert!(text.contains("aborted"), "{text}");
    assert!(text.contains("exited with code 3"), "{text}");
    // A committed step of the killed run can be looked at.
    let show = p.needle(&["show", "1:b[i=2]"]);
    assert_code(&show, 0);
    assert!(stdout(&show).contains("output"), "{}", stdout(&show));
    assert_code(&p.needle(&["lineage", "1:b[i=2]"]), 0);

    // The next run executes only what had not finished (`wait` does not wait again).
    let run = p.json(&["run", "recipe.toml", "-j", "2"], 1);
    assert_eq!(run["cached"], 6, "{run}");
    assert_code(&p.needle(&["verify"]), 0);
}
