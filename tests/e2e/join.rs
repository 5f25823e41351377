//! Several runs on one store: a `needle run` started while another holds the store joins its
//! runner. Both finish; a step they have in common executes once; together they never hold
//! more of the pool than it has (checked from a trace the steps write); Ctrl-C or a kill of
//! one side leaves the other going, and a store that verifies.

use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// Every step: a `+` line in `trace` when it starts and a `-` line before it ends (inside the
/// time it holds its resources), with its GPUs, GPU share and CPU slots. `$1` says what it
/// does between: `hold` waits for the file `$2`, `mark` creates the file `$2`, `work` takes a
/// moment. `hold` steps also count themselves in `executed`.
const STEP: &str = r#"d="$NEEDLE_RECIPE_DIR"
line() { echo "$1 $NEEDLE_RUN $NEEDLE_STEP ${CUDA_VISIBLE_DEVICES:-none} ${NEEDLE_GPU_SHARE:-0} $NEEDLE_CPUS" >> "$d/trace"; }
line +
case "$1" in
  hold) echo "$NEEDLE_STEP" >> "$d/executed"; echo $$ > "$d/$NEEDLE_STEP.pid"; touch "$d/$NEEDLE_STEP.started"
        while [ ! -e "$d/$2" ]; do sleep 0.02; done ;;
  mark) touch "$d/$2" ;;
  work) sleep 0.1 ;;
esac
echo "$*" > "$NEEDLE_OUT/v"
line -
"#;

/// A step of a recipe running `step.sh` with `args`.
fn step(name: &str, args: &str, extra: &str) -> String {
    format!(
        "[steps.{name}]\nop = \"exec\"\ncmd = [\"sh\", \"step.sh\", {args}]\ncode = [\"step.sh\"]\n{extra}\n"
    )
}

fn recipe(name: &str, steps: &[String]) -> String {
    format!("[recipe]\nname = \"{name}\"\n\n{}", steps.join("\n"))
}

fn project() -> Project {
    let p = Project::new();
    p.write("step.sh", STEP);
    p
}

fn spawn(p: &Project, args: &[&str]) -> Child {
    p.background(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_file(p: &Project, name: &str) {
    wait_for(name, Duration::from_secs(60), || p.path(name).exists());
}

fn finished(child: Child, code: i32) -> Value {
    let out = child.wait_with_output().unwrap();
    assert_code(&out, code);
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// [`finished`] for a client whose runner is `runner`: where the client did not end with
/// `code`, the runner is stopped and what both said is shown (the client alone cannot say why
/// its runner went away).
fn finished_beside(client: Child, code: i32, mut runner: Child) -> (Value, Child) {
    let out = client.wait_with_output().unwrap();
    if out.status.code() != Some(code) {
        let _ = runner.kill();
        let r = runner.wait_with_output().unwrap();
        panic!(
            "the client ended {:?}, not {code}: {}\nthe runner ended {:?}: {}",
            out.status,
            stderr(&out),
            r.status,
            stderr(&r)
        );
    }
    (
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        runner,
    )
}

fn status_of(step: &Value) -> &str {
    step["status"].as_str().unwrap()
}

/// Replay `trace`: at no moment do the steps hold together more than `gpus` GPUs (a share
/// of each at most 1) or `cpus` CPU slots. Returns how many steps ran at most at once.
fn check_trace(p: &Project, gpus: &[&str], cpus: f64) -> usize {
    trace_peaks(p, gpus, cpus, "").0
}

/// [`check_trace`], and the most GPU (shares added up) the steps of run `run` held at once.
fn trace_peaks(p: &Project, gpus: &[&str], cpus: f64, run: &str) -> (usize, f64) {
    let mut held: HashMap<String, f64> = HashMap::new();
    let mut cpu = 0.0;
    let (mut running, mut most) = (0usize, 0usize);
    let (mut of_run, mut most_of_run) = (0.0, 0.0f64);
    for line in p.lines("trace") {
        let f: Vec<&str> = line.split(' ').collect();
        let sign = if f[0] == "+" { 1.0 } else { -1.0 };
        let share: f64 = f[4].parse().unwrap();
        for gpu in f[3].split(',').filter(|g| *g != "none") {
            assert!(gpus.contains(&gpu), "a GPU outside the pool: {line}");
            *held.entry(gpu.to_string()).or_default() += sign * share;
            assert!(held[gpu] <= 1.0 + 1e-9, "GPU {gpu} held past whole: {line}");
        }
        if f[1] == run {
            let units = f[3].split(',').filter(|g| *g != "none").count() as f64;
            of_run += sign * share * units;
            most_of_run = most_of_run.max(of_run);
        }
        cpu += sign * f[5].parse::<f64>().unwrap();
        assert!(
            cpu <= cpus,
            "more CPU slots held than the pool's {cpus}: {line}"
        );
        if sign > 0.0 {
            running += 1;
            most = most.max(running);
        } else {
            running -= 1;
        }
    }
    (most, most_of_run)
}

#[test]
fn two_runs_share_one_pool_and_their_common_step_executes_once() {
    let p = project();
    let common = step("common", "\"hold\", \"go\"", "resources = { gpus = 1 }");
    p.write(
        "a.toml",
        &recipe(
            "first",
            &[
                common.clone(),
                "[sweep]\ni = [1, 2, 3, 4]\n".into(),
                step(
                    "half",
                    "\"work\"",
                    "inputs = { c = \"common\" }\nparams = { i = \"${i}\" }\nresources = { gpus = 0.5 }",
                ),
            ],
        ),
    );
    p.write(
        "b.toml",
        &recipe(
            "second",
            &[
                common,
                step("joined", "\"mark\", \"b-joined\"", ""),
                "[sweep]\nj = [1, 2, 3]\n".into(),
                step(
                    "whole",
                    "\"work\"",
                    "params = { j = \"${j}\" }\nresources = { gpus = 1 }",
                ),
            ],
        ),
    );
    let pool = ["--gpus", "0,1", "--jobs", "3", "--json"];
    let first = spawn(&p, &[&["run", "a.toml"][..], &pool].concat());
    wait_file(&p, "common.started");
    let second = spawn(&p, &[&["run", "b.toml"][..], &pool].concat());
    // Its roots are resolved when it joins: its `common` waits for the first run's.
    wait_file(&p, "b-joined");
    let runs = p.json(&["runs"], 0);
    assert_eq!(runs[0]["state"], "running", "side by side: {runs}");
    assert_eq!(runs[1]["state"], "running", "side by side: {runs}");
    p.write("go", "");

    let a = finished(first, 0);
    let b = finished(second, 0);
    assert_eq!(
        p.lines("executed"),
        ["common"],
        "the common step executed once"
    );
    assert_eq!(status_of(steps_named(&a, "common")[0]), "succeeded");
    assert_eq!(status_of(steps_named(&b, "common")[0]), "cached");
    assert_eq!(a["executed"], 5, "{a}");
    assert_eq!(b["executed"], 4, "{b}");
    assert_eq!(b["run"], 2, "{b}");
    assert_eq!(b["shared"], serde_json::json!({ "1": 1 }), "{b}");
    // Each run's report says what it shared; the first run's shared nothing of the second's.
    for (run, shared) in [("2", true), ("1", false)] {
        let html = p.path(&format!("report-{run}.html"));
        assert_code(&p.needle(&["report", run, "-o", html.to_str().unwrap()]), 0);
        let text = std::fs::read_to_string(&html).unwrap();
        assert_eq!(
            text.contains(
                "shared with run 1, which executed them while this run ran: <code>common</code>"
            ),
            shared,
            "report of run {run}"
        );
    }
    assert!(
        check_trace(&p, &["0", "1"], 3.0) >= 2,
        "steps of both ran side by side"
    );
    let runs = p.json(&["runs"], 0);
    assert_eq!(runs[0]["state"], "succeeded", "{runs}");
    assert_eq!(runs[1]["state"], "succeeded", "{runs}");
    assert_code(&p.needle(&["verify"]), 0);
}

/// The runner's recipe holds `common` until `go`; the client's has `common` too, and `y`.
fn two_recipes(p: &Project, y: &str) {
    let common = step("common", "\"hold\", \"go\"", "");
    p.write("x.toml", &recipe("x", std::slice::from_ref(&common)));
    p.write(
        "y.toml",
        &recipe(
            "y",
            &[
                common,
                step("y", y, ""),
                step("joined", "\"mark\", \"y-joined\"", ""),
            ],
        ),
    );
}

/// The runner on `x.toml`, once its `common` started, and the client on `y.toml`, once the
/// file `joined` exists (a step of `y` made it).
fn runner_and_client(p: &Project, joined: &str) -> (Child, Child) {
    let runner = spawn(p, &["run", "x.toml", "--json", "--jobs", "3"]);
    wait_file(p, "common.started");
    let client = spawn(p, &["run", "y.toml", "--json", "--jobs", "3"]);
    wait_file(p, joined);
    (runner, client)
}

#[test]
fn ctrl_c_in_the_runner_hands_the_step_a_joined_run_needs_to_it() {
    let p = project();
    two_recipes(&p, "\"work\"");
    let (runner, client) = runner_and_client(&p, "y-joined");
    // SAFETY: SIGINT to the child we spawned.
    unsafe { libc::kill(runner.id() as i32, libc::SIGINT) };
    // The runner's own run ends at once: its only step went on as the joined run's.
    wait_for("run 1 to end", Duration::from_secs(60), || {
        p.json(&["status", "1"], 0)["state"] == "interrupted"
    });
    p.write("go", "");
    let (y, runner) = finished_beside(client, 0, runner);
    assert_eq!(status_of(steps_named(&y, "common")[0]), "succeeded", "{y}");
    let x = finished(runner, 130);
    assert_eq!(
        status_of(steps_named(&x, "common")[0]),
        "interrupted",
        "{x}"
    );
    assert_eq!(p.lines("executed"), ["common"], "one attempt, handed over");
    assert_code(&p.needle(&["verify"]), 0);
}

#[test]
fn ctrl_c_in_a_client_cancels_its_run_and_leaves_the_other_finishing() {
    let p = project();
    two_recipes(&p, "\"hold\", \"never\"");
    let (runner, client) = runner_and_client(&p, "y.started");
    let y_pid: i32 = std::fs::read_to_string(p.path("y.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: SIGINT to the child we spawned.
    unsafe { libc::kill(client.id() as i32, libc::SIGINT) };
    let y = finished(client, 130);
    assert_eq!(y["state"], "interrupted", "{y}");
    assert_eq!(status_of(steps_named(&y, "y")[0]), "interrupted", "{y}");
    // SAFETY: signal 0 only checks whether the process exists.
    assert_ne!(unsafe { libc::kill(y_pid, 0) }, 0, "its step was stopped");
    // The runner's run goes on, and its step is not the cancelled run's to stop.
    p.write("go", "");
    let x = finished(runner, 0);
    assert_eq!(status_of(steps_named(&x, "common")[0]), "succeeded", "{x}");
    assert_code(&p.needle(&["verify"]), 0);
}

#[test]
fn killed_clients_and_runners_leave_a_store_that_verifies_and_finishes_alike() {
    let p = project();
    two_recipes(&p, "\"hold\", \"go-y\"");
    // A killed client: its run is recorded interrupted, the runner's finishes.
    let (runner, mut client) = runner_and_client(&p, "y.started");
    client.kill().unwrap();
    client.wait().unwrap();
    wait_for(
        "run 2 to be recorded interrupted",
        Duration::from_secs(60),
        || p.json(&["status", "2"], 0)["state"] == "interrupted",
    );
    p.write("go", "");
    finished(runner, 0);
    assert_code(&p.needle(&["verify"]), 0);

    // A killed runner: the client says so, the runner's steps go with it.
    std::fs::remove_file(p.path("go")).unwrap();
    std::fs::remove_file(p.path("y.started")).unwrap();
    let again = step("again", "\"hold\", \"go\"", "params = { n = \"again\" }");
    p.write("x.toml", &recipe("x", &[again]));
    let mut runner = spawn(&p, &["run", "x.toml", "--json", "--jobs", "3"]);
    wait_file(&p, "again.started");
    let client = spawn(&p, &["run", "y.toml", "--json", "--jobs", "3"]);
    wait_file(&p, "y.started");
    runner.kill().unwrap();
    runner.wait().unwrap();
    let out = client.wait_with_output().unwrap();
    assert_code(&out, 3);
    assert!(
        stderr(&out).contains("the runner went away"),
        "{}",
        stderr(&out)
    );
    assert_code(&p.needle(&["verify"]), 0);

    // The next run starts a runner of its own, and reaches what a run alone reaches.
    p.write("go-y", "");
    let y = p.json(&["run", "y.toml", "--jobs", "3"], 0);
    let alone = project();
    alone.write(
        "y.toml",
        &std::fs::read_to_string(p.path("y.toml")).unwrap(),
    );
    alone.write("go", "");
    alone.write("go-y", "");
    let reference = alone.json(&["run", "y.toml", "--jobs", "3"], 0);
    assert_eq!(outputs(&y), outputs(&reference));
}

#[test]
fn a_run_that_cannot_share_the_runners_pool_is_refused_with_the_reason() {
    let p = project();
    p.write(
        "x.toml",
        &recipe("x", &[step("common", "\"hold\", \"go\"", "")]),
    );
    let runner = spawn(&p, &["run", "x.toml", "--json", "--gpus", "none"]);
    wait_file(&p, "common.started");
    let out = p.needle(&["run", "x.toml", "--gpus", "0,1"]);
    assert_code(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains("asks for GPUs `0,1`, and the runner schedules onto GPUs none"),
        "{err}"
    );
    assert!(err.contains(&format!("pid {}", runner.id())), "{err}");
    p.write("go", "");
    finished(runner, 0);
}

#[test]
fn a_joined_run_of_higher_priority_starts_its_steps_first() {
    let p = project();
    // Distinct params, distinct keys: steps with the same key would execute once.
    let work = |name: String, extra: &str| {
        step(
            &name,
            "\"work\"",
            &format!("params = {{ n = \"{name}\" }}\n{extra}"),
        )
    };
    let mut xs = vec![step("gate", "\"hold\", \"go\"", "")];
    xs.extend((1..=3).map(|i| work(format!("a{i}"), "inputs = { g = \"gate\" }")));
    p.write("x.toml", &recipe("x", &xs));
    let ys: Vec<String> = (1..=2).map(|i| work(format!("b{i}"), "")).collect();
    p.write("y.toml", &recipe("y", &ys));
    // One CPU slot: one step at a time, in the order the runner picks.
    let runner = spawn(&p, &["run", "x.toml", "--json", "--jobs", "1"]);
    wait_file(&p, "gate.started");
    let client = spawn(
        &p,
        &["run", "y.toml", "--json", "--jobs", "1", "--priority", "5"],
    );
    wait_for("run 2 to join", Duration::from_secs(60), || {
        p.json(&["runs"], 0).as_array().unwrap().len() == 2
    });
    p.write("go", "");
    finished(client, 0);
    finished(runner, 0);
    let started: Vec<String> = (p.lines("trace").iter())
        .filter(|l| l.starts_with('+'))
        .map(|l| l.split(' ').nth(2).unwrap().to_string())
        .collect();
    assert_eq!(started, ["gate", "b1", "b2", "a1", "a2", "a3"]);
}

#[test]
fn max_gpus_caps_what_one_run_holds_and_leaves_the_rest_to_the_other() {
    let p = project();
    let gpu_steps = |prefix: &str, gpus: &str| -> Vec<String> {
        (1..=3)
            .map(|i| {
                let name = format!("{prefix}{i}");
                let extra =
                    format!("params = {{ n = \"{name}\" }}\nresources = {{ gpus = {gpus} }}");
                step(&name, "\"work\"", &extra)
            })
            .collect()
    };
    let mut xs = vec![step("gate", "\"hold\", \"go\"", "")];
    xs.extend(gpu_steps("a", "1"));
    p.write("x.toml", &recipe("x", &xs));
    p.write("y.toml", &recipe("y", &gpu_steps("b", "0.5")));
    let pool = ["--gpus", "0,1,2", "--jobs", "6", "--json"];
    let runner = spawn(
        &p,
        &[&["run", "x.toml", "--max-gpus", "1"][..], &pool].concat(),
    );
    wait_file(&p, "gate.started");
    let client = spawn(
        &p,
        &[&["run", "y.toml", "--max-gpus", "1.5"][..], &pool].concat(),
    );
    p.write("go", "");
    finished(client, 0);
    finished(runner, 0);
    let (_, first) = trace_peaks(&p, &["0", "1", "2"], 6.0, "1");
    let (_, second) = trace_peaks(&p, &["0", "1", "2"], 6.0, "2");
    assert!(first <= 1.0 + 1e-9, "run 1 held {first} GPUs at once");
    assert!(second <= 1.5 + 1e-9, "run 2 held {second} GPUs at once");
    // A step that could never start under the cap is refused before anything runs.
    let out = p.needle(&["run", "x.toml", "--gpus", "0,1,2", "--max-gpus", "0.5"]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("step `a"), "{}", stderr(&out));
}

#[test]
fn a_rerun_joins_the_runner_as_a_run_does() {
    let p = project();
    let flaky = r#"[recipe]
name = "flaky"

[steps.flaky]
op = "exec"
cmd = ["sh", "-c", "test -e \"$NEEDLE_RECIPE_DIR/fixed\" && echo ok > \"$NEEDLE_OUT/v\""]
"#;
    p.write("flaky.toml", flaky);
    assert_code(&p.needle(&["run", "flaky.toml"]), 1);
    p.write(
        "x.toml",
        &recipe("x", &[step("common", "\"hold\", \"go\"", "")]),
    );
    let runner = spawn(&p, &["run", "x.toml", "--json"]);
    wait_file(&p, "common.started");
    p.write("fixed", "");
    // The failed run's record is read through the runner, and its rerun executes there.
    let out = p.needle(&["rerun", "1", "--json"]);
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains("joined the runner"),
        "{}",
        stderr(&out)
    );
    let rerun: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (rerun["run"].as_u64(), rerun["executed"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(p.json(&["status", "3"], 0)["rerun_of"], 1);
    p.write("go", "");
    finished(runner, 0);
}
