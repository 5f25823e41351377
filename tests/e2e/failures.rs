//! A failing step fails its branch only; `rerun` picks up what failed; retries, time-outs,
//! Ctrl-C and a busy store behave as documented.

use std::time::{Duration, Instant};

use crate::common::*;

const BRANCHES: &str = r#"
[recipe]
name = "branches"

[steps.root]
op = "exec"
cmd = ["sh", "-c", "echo root > \"$NEEDLE_OUT/v\"; echo root >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]

[steps.good]
op = "exec"
cmd = ["sh", "-c", "cp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"; echo good >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]
inputs = { up = "root" }

[steps.bad]
op = "exec"
cmd = ["sh", "bad.sh"]
code = ["bad.sh"]
inputs = { up = "root" }

[steps.after_bad]
op = "exec"
cmd = ["sh", "-c", "cp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"; echo after_bad >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]
inputs = { up = "bad" }
"#;

#[test]
fn failure_skips_its_branch_and_rerun_finishes_it_after_a_fix() {
    let p = Project::new();
    p.write("recipe.toml", BRANCHES);
    p.write(
        "bad.sh",
        "echo bad >> \"$NEEDLE_RECIPE_DIR/ran.txt\"\necho 'something broke' >&2\nexit 3\n",
    );

    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("exited with code 3"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("something broke"),
        "the log tail is shown: {}",
        stderr(&out)
    );

    let status = p.json(&["status", "1"], 0);
    assert_eq!(steps_named(&status, "root")[0]["status"], "succeeded");
    assert_eq!(steps_named(&status, "good")[0]["status"], "succeeded");
    assert_eq!(steps_named(&status, "bad")[0]["status"], "failed");
    assert_eq!(steps_named(&status, "after_bad")[0]["status"], "skipped");

    // The log keeps what the script printed.
    let logs = p.needle(&["logs", "1:bad"]);
    assert_code(&logs, 0);
    assert!(stdout(&logs).contains("something broke"));

    // Fix the script; rerun executes only what failed or was skipped.
    p.write("bad.sh", "cp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"\necho bad-fixed >> \"$NEEDLE_RECIPE_DIR/ran.txt\"\n");
    let rerun = p.json(&["rerun", "1"], 0);
    assert_eq!(rerun["executed"], 2);
    assert_eq!(rerun["cached"], 2);
    assert_eq!(p.lines("ran.txt")[3..], ["bad-fixed", "after_bad"]);

    let runs = p.json(&["runs"], 0);
    assert_eq!(runs.as_array().unwrap().len(), 2);
    assert_eq!(runs[0]["state"], "failed");
    assert_eq!(runs[1]["state"], "succeeded");
}

#[test]
fn rerun_uses_the_recorded_recipe_and_sets() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "sets"
[vars]
n = 1
[steps.only]
op = "exec"
cmd = ["sh", "-c", "echo ${n} > \"$NEEDLE_OUT/n\"; test -e \"$NEEDLE_RECIPE_DIR/ok\""]
"#,
    );
    let failed = p.json(&["run", "recipe.toml", "--set", "n=7"], 1);
    assert_eq!(failed["failed"], 1);
    // The file on disk changes, the transient cause goes away; rerun still runs n=7.
    p.write("recipe.toml", "this is no longer a recipe");
    p.write("ok", "");
    let rerun = p.json(&["rerun", "last"], 0);
    assert_eq!(rerun["executed"], 1);
    let out = rerun["steps"][0]["output"].as_str().unwrap().to_string();
    let show = p.json(&["show", &out], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(view.join("n")).unwrap(), "7\n");
}

#[test]
fn retries_with_backoff_until_success() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "flaky"
[steps.flaky]
op = "exec"
cmd = ["sh", "-c", "echo try >> \"$NEEDLE_RECIPE_DIR/tries\"; test $(wc -l < \"$NEEDLE_RECIPE_DIR/tries\") -ge 3 && echo ok > \"$NEEDLE_OUT/v\""]
retries = { count = 3, backoff = "50ms" }
"#,
    );
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 1);
    assert_eq!(run["steps"][0]["attempts"], 3);
    assert_eq!(p.lines("tries").len(), 3);
}

#[test]
fn timeout_fails_the_step() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slow"
[steps.slow]
op = "exec"
cmd = ["sleep", "30"]
timeout = "300ms"
"#,
    );
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("timed out after 300ms"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn ctrl_c_stops_running_steps_and_records_them_interrupted() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "long"
[steps.long]
op = "exec"
cmd = ["sh", "-c", "echo $$ > \"$NEEDLE_RECIPE_DIR/pid\"; sleep 60"]
"#,
    );
    let child = p
        .background(&["run", "recipe.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = p.path("pid");
    let t0 = Instant::now();
    while !pid_file.exists()
        || std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .is_empty()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the step never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let step_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: sending SIGINT to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_code(&out, 130);
    assert!(
        // SAFETY: signal 0 only checks whether the process exists.
        unsafe { libc::kill(step_pid, 0) } != 0,
        "the step's process is gone"
    );
    let status = p.json(&["status", "last"], 0);
    assert_eq!(status["state"], "interrupted");
    assert_eq!(steps_named(&status, "long")[0]["status"], "interrupted");
}

#[test]
fn a_second_run_that_cannot_join_gets_a_clear_message() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "hold"
[steps.hold]
op = "exec"
cmd = ["sh", "-c", "touch \"$NEEDLE_RECIPE_DIR/started\"; sleep 2; echo > \"$NEEDLE_OUT/v\""]
"#,
    );
    let first = p
        .background(&["run", "recipe.toml", "--jobs", "2"])
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !p.path("started").exists() {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another pool than the runner's: it cannot join it (join.rs has the runs that do).
    let second = p.needle(&["run", "recipe.toml", "--jobs", "1"]);
    assert_code(&second, 2);
    let err = stderr(&second);
    assert!(
        err.contains("cannot join the runner of this store"),
        "{err}"
    );
    assert!(
        err.contains(&first.id().to_string()),
        "names the holder: {err}"
    );

    // --wait waits for the first runner instead, then finds everything cached.
    let waited = p.json(&["run", "recipe.toml", "--jobs", "1", "--wait"], 0);
    assert_eq!(waited["cached"], 1);
    let mut first = first;
    assert!(first.wait().unwrap().success());
}

#[test]
fn a_lock_left_to_a_dead_runners_child_is_waited_for_briefly() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "after-a-crash"
[steps.one]
op = "exec"
cmd = ["sh", "-c", "echo 1 > \"$NEEDLE_OUT/v\""]
"#,
    );
    assert_code(&p.needle(&["run", "recipe.toml"]), 0);
    // The lock names a runner that has exited, but a process it forked (not exec'd yet, so
    // still sharing the lock) holds it a little longer.
    let lock = p.store().join("lock");
    std::fs::write(
        &lock,
        "pid 2147483000 (needle run recipe.toml) since 2026-11-30T09:14:18Z\n",
    )
    .unwrap();
    let mut holder = std::process::Command::new("flock")
        .arg(&lock)
        .args(["sleep", "1"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["cached"], 1, "{run}");
    assert!(
        t0.elapsed() > Duration::from_millis(300),
        "it waited for the lock"
    );
    holder.wait().unwrap();
}

/// File times come from the kernel's coarse clock, a tick behind the runner's: a step that
/// writes into its input in its first milliseconds was once told, about one try in eight,
/// that its input "was damaged before it started", and was retried. Thirty tries, each a
/// step adding a file to its own input's view at once, must all be blamed on the step.
#[test]
fn a_write_into_an_input_at_once_is_blamed_on_the_step_every_time() {
    let p = Project::new();
    let tries: Vec<String> = (1..=30).map(|i| i.to_string()).collect();
    p.write(
        "recipe.toml",
        &format!(
            r#"
[recipe]
name = "quick-writer"

[sweep]
i = [{}]

[steps.up]
op = "exec"
cmd = ["sh", "-c", "echo ${{i}} > \"$NEEDLE_OUT/v\""]

[steps.w]
op = "exec"
inputs = {{ up = "up" }}
retries = 2
cmd = ["sh", "-c", "echo cache > \"$NEEDLE_IN_UP/cache\""]
"#,
            tries.join(", ")
        ),
    );
    let run = p.json(&["run", "recipe.toml", "-j", "2"], 1);
    let status = p.json(&["status", &run["run"].to_string()], 0);
    let writers = steps_named(&status, "w");
    assert_eq!(writers.len(), 30);
    for w in writers {
        assert_eq!(w["status"], "failed", "{w}");
        let reason = w["detail"].as_str().unwrap();
        assert!(
            reason.contains("wrote outside its output directory"),
            "{reason}"
        );
        assert!(!reason.contains("before it started"), "{reason}");
        assert_eq!(w["attempts"].as_array().unwrap().len(), 1, "retried: {w}");
    }
}
