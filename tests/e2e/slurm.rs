//! The Slurm executor against a real single-node Slurm with four fake GPUs
//! (`scripts/slurm-local.sh`, started by `make test`). Without Slurm these tests say so and
//! pass, unless `NEEDLE_TEST_SLURM=require` (set by `make test`) makes its absence a failure.
//!
//! Tests run in parallel on one cluster: assertions hold whatever else the cluster runs (at
//! most four GPU jobs at once, distinct devices, this test's own jobs cancelled), except the
//! one that takes the node down, which runs alone.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// Held by each test while it uses the cluster: shared by most, alone by one that takes the
/// only node down (every job on it would fail).
static CLUSTER: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The cluster shared with the other tests; `None` where there is no Slurm (and need not be).
fn shared_cluster() -> Option<std::sync::RwLockReadGuard<'static, ()>> {
    slurm_available().then(|| CLUSTER.read().unwrap_or_else(|e| e.into_inner()))
}

/// The cluster with no other test's jobs on it.
fn cluster_alone() -> Option<std::sync::RwLockWriteGuard<'static, ()>> {
    slurm_available().then(|| CLUSTER.write().unwrap_or_else(|e| e.into_inner()))
}

/// Whether Slurm answers here; panics if it must and does not.
fn slurm_available() -> bool {
    let ok = Command::new("sinfo")
        .args(["-h", "-o", "%G"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("gpu:4"));
    if !ok {
        let must = std::env::var("NEEDLE_TEST_SLURM").is_ok_and(|v| v == "require");
        assert!(
            !must,
            "Slurm with 4 GPUs is not up (run `scripts/slurm-local.sh start` as root)"
        );
        eprintln!("skipped: no local Slurm with 4 GPUs (scripts/slurm-local.sh starts one)");
    }
    ok
}

const SLURM: [&str; 4] = ["--executor", "slurm", "--poll", "200ms"];

fn with_slurm<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(SLURM);
    all
}

/// `squeue`'s state of each job (`-t all`: finished ones too).
fn job_states(ids: &[String]) -> BTreeMap<String, String> {
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-j", &ids.join(","), "-o", "%i|%T"])
        .output()
        .expect("squeue runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('|'))
        .map(|(id, state)| (id.trim().to_string(), state.trim().to_string()))
        .collect()
}

const SWEEP: &str = r#"
[recipe]
name = "slurm-sweep"

[sweep]
i = [0, 1, 2, 3, 4, 5, 6, 7]

[steps.gen]
op = "exec"
cmd = ["sh", "-c", "echo \"${i} $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES $(date +%s%N)\" >> \"$NEEDLE_RECIPE_DIR/starts\"; sleep 1; seq 1 ${i}00 > \"$NEEDLE_OUT/data\"; echo \"${i} $(date +%s%N)\" >> \"$NEEDLE_RECIPE_DIR/ends\""]
resources = { gpus = 1 }

[steps.count]
op = "exec"
inputs = { data = "gen" }
cmd = ["sh", "-c", "wc -l < \"$NEEDLE_IN_DATA/data\" > \"$NEEDLE_OUT/n\""]
"#;

#[test]
fn a_sweep_runs_as_jobs_on_distinct_gpus_and_matches_a_local_run() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write("recipe.toml", SWEEP);
    let run = p.json(&with_slurm(&["run", "recipe.toml"]), 0);
    assert_eq!(run["executed"], 16, "{run}");

    // Every step ran as a Slurm job, recorded with its job id and node.
    let status = p.json(&["status", "last"], 0);
    for step in status["steps"].as_array().unwrap() {
        let job = &step["attempts"][0]["job"];
        assert_eq!(job["scheduler"], "slurm", "{step}");
        assert!(
            job["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{step}"
        );
        assert!(
            job["node"].as_str().is_some_and(|n| !n.is_empty()),
            "{step}"
        );
    }

    // What the jobs saw: a Slurm job id, one GPU each, distinct among those running at once,
    // and never more than the cluster's four at once.
    struct Span {
        gpu: String,
        start: u128,
        end: u128,
    }
    let ends: BTreeMap<String, u128> = p
        .lines("ends")
        .iter()
        .map(|l| {
            let (i, t) = l.split_once(' ').unwrap();
            (i.to_string(), t.parse().unwrap())
        })
        .collect();
    let spans: Vec<Span> = p
        .lines("starts")
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "a job id and one GPU: {l}");
            assert!(!f[1].is_empty() && !f[2].contains(','), "{l}");
            Span {
                gpu: f[2].to_string(),
                start: f[3].parse().unwrap(),
                end: ends[f[0]],
            }
        })
        .collect();
    assert_eq!(spans.len(), 8);
    for a in &spans {
        let overlapping: Vec<&Span> = spans
            .iter()
            .filter(|b| b.start <= a.start && a.start < b.end)
            .collect();
        assert!(
            overlapping.len() <= 4,
            "{} GPU steps at once",
            overlapping.len()
        );
        let mut gpus: Vec<&str> = overlapping.iter().map(|s| s.gpu.as_str()).collect();
        gpus.sort();
        gpus.dedup();
        assert_eq!(gpus.len(), overlapping.len(), "GPUs shared: {gpus:?}");
    }
    // The recorded attempts carry the GPUs Slurm gave.
    for step in steps_named(&status, "gen") {
        assert_eq!(
            step["attempts"][0]["gpus"].as_array().unwrap().len(),
            1,
            "{step}"
        );
    }

    // The same recipe run locally gives the same digests.
    let local = Project::new();
    local.write("recipe.toml", SWEEP);
    let local_run = local.json(&["run", "recipe.toml"], 0);
    assert_eq!(outputs(&run), outputs(&local_run));

    // And a second Slurm run submits nothing.
    let again = p.json(&with_slurm(&["run", "recipe.toml"]), 0);
    assert_eq!(again["executed"], 0, "{again}");
}

const LONG: &str = r#"
[recipe]
name = "slurm-long"

[sweep]
i = [0, 1, 2]

[steps.long]
op = "exec"
cmd = ["sh", "-c", "echo $SLURM_JOB_ID >> \"$NEEDLE_RECIPE_DIR/jobs\"; sleep 120; echo ${i} > \"$NEEDLE_OUT/v\""]
"#;

#[test]
fn ctrl_c_cancels_the_submitted_jobs() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write("recipe.toml", LONG);
    let child = p
        .background(&with_slurm(&["run", "recipe.toml"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("three running jobs", Duration::from_secs(60), || {
        p.lines("jobs").len() == 3
    });
    let jobs = p.lines("jobs");
    // SAFETY: SIGINT to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_code(&out, 130);
    wait_for("the jobs to be cancelled", Duration::from_secs(30), || {
        job_states(&jobs).values().all(|s| s == "CANCELLED")
    });
    let status = p.json(&["status", "last"], 0);
    assert_eq!(status["state"], "interrupted");
    for step in steps_named(&status, "long") {
        assert_eq!(step["status"], "interrupted", "{step}");
    }
}

/// A step that may retry once, whose first Slurm job `end` ends from outside while it runs: the
/// run still succeeds, its first attempt lost for a reason holding `reason(job)`.
fn a_lost_first_job_is_retried(
    p: &Project,
    run: &[&str],
    end: impl FnOnce(&str),
    reason: impl FnOnce(&str) -> String,
) {
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-lost"

[steps.flaky]
op = "exec"
retries = 1
cmd = ["sh", "-c", "echo $SLURM_JOB_ID >> \"$NEEDLE_RECIPE_DIR/jobs\"; if [ -e \"$NEEDLE_RECIPE_DIR/again\" ]; then echo ok > \"$NEEDLE_OUT/v\"; else touch \"$NEEDLE_RECIPE_DIR/again\"; sleep 120; fi"]
"#,
    );
    let child = p
        .background(run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first job", Duration::from_secs(60), || {
        p.lines("jobs").len() == 1
    });
    let first = p.lines("jobs")[0].clone();
    end(&first);
    let out = child.wait_with_output().unwrap();
    assert_code(&out, 0);
    let status = p.json(&["status", "last"], 0);
    let attempts = steps_named(&status, "flaky")[0]["attempts"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(attempts.len(), 2, "{status}");
    assert_eq!(attempts[0]["result"]["result"], "lost", "{status}");
    assert!(
        attempts[0]["result"]["reason"]
            .as_str()
            .unwrap()
            .contains(&reason(&first)),
        "{status}"
    );
    assert_eq!(attempts[1]["result"]["result"], "success");
}

#[test]
fn a_job_lost_outside_needle_is_a_failed_attempt_that_retries() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    // An administrator (or a node failure, or preemption) ends the job.
    let scancel = |job: &str| {
        assert!(Command::new("scancel").arg(job).status().unwrap().success());
    };
    a_lost_first_job_is_retried(
        &p,
        &with_slurm(&["run", "recipe.toml", "--json"]),
        scancel,
        |job| format!("job {job} was cancelled outside needle"),
    );
}

/// Preemption with requeue and a failed node both make Slurm start a job again: the command
/// then finds an empty output directory, not what its first start left half-written, and the
/// log keeps both starts. `scontrol requeue` does what they do.
#[test]
fn a_job_slurm_starts_again_finds_its_output_directory_empty() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-requeue"

[steps.long]
op = "exec"
cmd = ["sh", "-c", "echo \"$SLURM_JOB_ID $${SLURM_RESTART_COUNT:-0} $(ls \"$NEEDLE_OUT\" | wc -l)\" >> \"$NEEDLE_RECIPE_DIR/starts\"; if [ \"$${SLURM_RESTART_COUNT:-0}\" -eq 0 ]; then echo half > \"$NEEDLE_OUT/partial\"; echo first start; sleep 120; fi; echo whole > \"$NEEDLE_OUT/v\""]
"#,
    );
    let child = p
        .background(&with_slurm(&["run", "recipe.toml", "--json"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first start", Duration::from_secs(60), || {
        p.lines("starts").len() == 1
    });
    let job = p.lines("starts")[0].split(' ').next().unwrap().to_string();
    let scontrol = |args: &[&str]| {
        let out = Command::new("scontrol").args(args).output().unwrap();
        assert!(out.status.success(), "scontrol {args:?}: {out:?}");
    };
    scontrol(&["requeue", &job]);
    // Slurm holds a requeued job back for two minutes once it is pending again; the test
    // need not wait for that. But not to this very second: slurmd revoked the job's
    // credential at the requeue, to the second, and refuses a start whose credential is as old
    // ("Job credential revoked": the job then fails with exit code 1, as CI once saw).
    wait_for("the job pending again", Duration::from_secs(60), || {
        job_states(std::slice::from_ref(&job))
            .get(&job)
            .map(String::as_str)
            == Some("PENDING")
    });
    scontrol(&["update", &format!("jobid={job}"), "StartTime=now+1"]);
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        let log = p.needle(&["logs", "last:long"]);
        panic!(
            "run failed: {}\nlog: {}{}\nstarts: {:?}",
            stderr(&out),
            stdout(&log),
            stderr(&log),
            p.lines("starts")
        );
    }
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(
        p.lines("starts"),
        [format!("{job} 0 0"), format!("{job} 1 0")],
        "the second start found files"
    );
    let view = output_view(&p, &run, "long");
    let mut files: Vec<String> = std::fs::read_dir(&view)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["v"]);
    let status = p.json(&["status", "last"], 0);
    let attempts = steps_named(&status, "long")[0]["attempts"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(attempts.len(), 1, "{status}");
    let log = stdout(&p.needle(&["logs", "last:long"]));
    assert!(log.contains("first start"), "{log}");
    assert!(
        log.contains("Slurm started this job again (restart 1"),
        "{log}"
    );
}

/// The node taken down while this is alive, and back up once it is dropped (also when the
/// test fails: the other tests need the node).
struct NodeDown(String);

impl NodeDown {
    fn now() -> NodeDown {
        let out = Command::new("sinfo")
            .args(["-h", "-o", "%N"])
            .output()
            .unwrap();
        let node = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let down = Command::new("scontrol")
            .args([
                "update",
                &format!("nodename={node}"),
                "state=down",
                "reason=needle-test",
            ])
            .status()
            .unwrap();
        assert!(down.success(), "scontrol could not take {node} down");
        NodeDown(node)
    }
}

impl Drop for NodeDown {
    fn drop(&mut self) {
        // Refused when the node came back by itself already (ReturnToService=2).
        let _ = Command::new("scontrol")
            .args(["update", &format!("nodename={}", self.0), "state=resume"])
            .status();
        // Up and answering (`idle*` would be a node that does not respond yet), so that the
        // next test's job does not start on a node still coming back.
        wait_for("the node back up", Duration::from_secs(60), || {
            Command::new("sinfo")
                .args(["-h", "-o", "%T"])
                .output()
                .is_ok_and(|o| {
                    let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
                    ["idle", "mixed", "allocated"].contains(&state.as_str())
                })
        });
    }
}

/// A job whose node fails (on a cluster that does not requeue) is a lost attempt, and the
/// step's retry runs once the node is back.
#[test]
fn a_job_whose_node_fails_is_a_lost_attempt_that_retries() {
    let Some(_alone) = cluster_alone() else {
        return;
    };
    let p = Project::new();
    p.write(
        "needle.toml",
        "[executor]\nkind = \"slurm\"\npoll = \"200ms\"\nsbatch_args = [\"--no-requeue\"]\n",
    );
    let node_fails = |job: &str| {
        let _down = NodeDown::now();
        wait_for(
            "the job to fail with its node",
            Duration::from_secs(60),
            || job_states(&[job.to_string()]).get(job).map(String::as_str) == Some("NODE_FAIL"),
        );
    };
    a_lost_first_job_is_retried(&p, &["run", "recipe.toml", "--json"], node_fails, |job| {
        format!("Slurm job {job}: its node failed (NODE_FAIL)")
    });
}

/// A step that touches more memory than its `--mem` is killed by Slurm (the test cluster polls
/// each step's memory: `JobAcctGatherParams=OverMemoryKill`), and needle says it ran out of
/// memory: a lost attempt, retried; the retry, which touches little, succeeds.
#[test]
fn a_job_over_its_memory_is_out_of_memory_and_retried() {
    let Some(_shared) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write(
        "hog.py",
        "import signal\n\
         touched = bytearray(400 << 20)\n\
         for i in range(0, len(touched), 4096):\n    touched[i] = 1\n\
         signal.pause()\n",
    );
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-oom"

[steps.hog]
op = "exec"
retries = 1
timeout = "2m"
resources = { mem_gb = 0.1 }
cmd = ["sh", "-c", "echo $SLURM_JOB_ID >> \"$NEEDLE_RECIPE_DIR/jobs\"; if [ -e \"$NEEDLE_RECIPE_DIR/again\" ]; then echo ok > \"$NEEDLE_OUT/v\"; else touch \"$NEEDLE_RECIPE_DIR/again\"; exec python3 \"$NEEDLE_RECIPE_DIR/hog.py\"; fi"]
"#,
    );
    let run = p.json(&with_slurm(&["run", "recipe.toml"]), 0);
    let first = p.lines("jobs")[0].clone();
    let status = p.json(&["status", "last"], 0);
    let attempts = steps_named(&status, "hog")[0]["attempts"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(attempts.len(), 2, "{run}\n{status}");
    assert_eq!(attempts[0]["result"]["result"], "lost", "{status}");
    let reason = attempts[0]["result"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("Slurm job {first}: out of memory")),
        "{status}"
    );
    assert!(reason.contains("resources.mem_gb"), "{status}");
    assert_eq!(attempts[1]["result"]["result"], "success");
}

/// A job the controller has forgotten by the time needle looks (MinJobAge passed) is
/// answered by accounting: `sacct`, here reading the test cluster's job completion log. The
/// cluster keeps jobs an hour, so a `squeue` in front of the real one forgets each job as soon
/// as accounting knows how it ended, and says which it hid.
#[test]
fn a_job_the_controller_forgot_is_answered_by_sacct() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v squeue"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let bin = p.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let shim = bin.join("squeue");
    p.write(
        "bin/squeue",
        &format!(
            r#"#!/bin/sh
out=$('{real}' "$@") || exit $?
printf '%s\n' "$out" | while IFS= read -r line; do
  [ -n "$line" ] || continue
  id=${{line%%|*}}
  if [ -n "$(sacct -c -n -P -j "$id" -o State 2>/dev/null)" ]; then
    echo "$id" >> '{forgotten}'
    continue
  fi
  printf '%s\n' "$line"
done
"#,
            real = real.trim(),
            forgotten = p.path("forgotten").display()
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-forgotten"

[steps.good]
op = "exec"
cmd = ["sh", "-c", "echo $SLURM_JOB_ID >> \"$NEEDLE_RECIPE_DIR/jobs\"; echo ok > \"$NEEDLE_OUT/v\""]

[steps.bad]
op = "exec"
cmd = ["sh", "-c", "echo $SLURM_JOB_ID >> \"$NEEDLE_RECIPE_DIR/jobs\"; exit 3"]
"#,
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = p
        .cmd(&with_slurm(&["run", "recipe.toml", "--json"]))
        .env("PATH", path)
        .output()
        .unwrap();
    assert_code(&out, 1);
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut jobs = p.lines("jobs");
    jobs.sort();
    // The shim hides any ended job it lists, and needle's look for jobs a killed runner left
    // lists the whole cluster's: other tests' jobs may be among them.
    let mut forgotten: Vec<String> = p
        .lines("forgotten")
        .into_iter()
        .filter(|id| jobs.contains(id))
        .collect();
    forgotten.sort();
    forgotten.dedup();
    assert_eq!(forgotten, jobs, "squeue hid every job once it had ended");
    assert_eq!(run["executed"], 1, "{run}");
    assert_eq!(run["failed"], 1, "{run}");
    let status = stdout(&p.needle(&["status", "last"]));
    assert!(status.contains("exited with code 3"), "{status}");
}

#[test]
fn a_timeout_cancels_the_job_and_a_refused_job_fails_with_slurms_reason() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-limits"

[steps.slow]
op = "exec"
timeout = "2s"
cmd = ["sh", "-c", "echo $SLURM_JOB_ID >> \"$NEEDLE_RECIPE_DIR/jobs\"; sleep 120"]

[steps.greedy]
op = "exec"
cmd = ["true"]
resources = { gpus = 5 }

[steps.fine]
op = "exec"
cmd = ["sh", "-c", "echo ok > \"$NEEDLE_OUT/v\""]
"#,
    );
    let run = p.json(&with_slurm(&["run", "recipe.toml"]), 1);
    assert_eq!(run["failed"], 2, "{run}");
    assert_eq!(steps_named(&run, "fine")[0]["status"], "succeeded");

    let status = p.json(&["status", "last"], 0);
    let slow = &steps_named(&status, "slow")[0]["attempts"][0]["result"];
    assert_eq!(slow["result"], "timed_out", "{status}");
    let jobs = p.lines("jobs");
    wait_for(
        "the timed-out job to be cancelled",
        Duration::from_secs(30),
        || job_states(&jobs).values().all(|s| s == "CANCELLED"),
    );

    let greedy = &steps_named(&status, "greedy")[0];
    let reason = greedy["status"].to_string() + &greedy["attempts"][0]["result"].to_string();
    assert!(reason.contains("sbatch refused the job"), "{greedy}");
    assert!(
        reason.contains("node configuration is not available"),
        "{greedy}"
    );
}

#[test]
fn jobs_a_killed_runner_left_are_cancelled_by_the_next_run() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-orphans"

[steps.long]
op = "exec"
cmd = ["sh", "-c", "echo $SLURM_JOB_ID >> \"$NEEDLE_RECIPE_DIR/jobs\"; if [ -e \"$NEEDLE_RECIPE_DIR/quick\" ]; then echo ok > \"$NEEDLE_OUT/v\"; else sleep 120; fi"]
"#,
    );
    let mut child = p
        .background(&with_slurm(&["run", "recipe.toml"]))
        .spawn()
        .unwrap();
    wait_for("the job", Duration::from_secs(60), || {
        p.lines("jobs").len() == 1
    });
    // SAFETY: SIGKILL to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let orphan = p.lines("jobs");
    assert_eq!(
        job_states(&orphan)[&orphan[0]],
        "RUNNING",
        "the job outlives its runner"
    );

    p.write("quick", "");
    let out = p.needle(&with_slurm(&["run", "recipe.toml"]));
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains(&format!(
            "cancelled 1 Slurm job(s) an earlier runner of this store left: {}",
            orphan[0]
        )),
        "{}",
        stderr(&out)
    );
    wait_for(
        "the orphan to be cancelled",
        Duration::from_secs(30),
        || job_states(&orphan)[&orphan[0]] == "CANCELLED",
    );
}

#[test]
fn max_jobs_throttles_what_is_in_flight() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-throttle"

[sweep]
i = [0, 1, 2, 3, 4, 5]

[steps.work]
op = "exec"
cmd = ["sh", "-c", "echo \"+ $(date +%s%N)\" >> \"$NEEDLE_RECIPE_DIR/events\"; sleep 0.5; echo ${i} > \"$NEEDLE_OUT/v\"; echo \"- $(date +%s%N)\" >> \"$NEEDLE_RECIPE_DIR/events\""]
"#,
    );
    let run = p.json(&with_slurm(&["run", "recipe.toml", "--max-jobs", "2"]), 0);
    assert_eq!(run["executed"], 6, "{run}");
    let mut events: Vec<(u128, i32)> = p
        .lines("events")
        .iter()
        .map(|l| {
            let (sign, t) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), if sign == "+" { 1 } else { -1 })
        })
        .collect();
    events.sort();
    let mut now = 0;
    let mut most = 0;
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    assert!(most <= 2, "{most} jobs ran at once with --max-jobs 2");
}

#[test]
fn the_executor_comes_from_a_config_file_and_bad_ones_are_refused() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "slurm-config"

[steps.one]
op = "exec"
cmd = ["sh", "-c", "echo $SLURM_JOB_ID > \"$NEEDLE_RECIPE_DIR/job\"; echo 1 > \"$NEEDLE_OUT/v\""]
"#,
    );
    p.write(
        "needle.toml",
        "[executor]\nkind = \"slurm\"\npoll = \"200ms\"\nsbatch_args = [\"--nice=10\"]\n",
    );
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 1, "{run}");
    assert!(!p.lines("job")[0].is_empty(), "it ran as a Slurm job");

    p.write(
        "needle.toml",
        "[executor]\nkind = \"slurm\"\npartiton = \"gpu\"\n",
    );
    let out = p.needle(&["run", "recipe.toml", "--force", "one"]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("partiton"), "{}", stderr(&out));
}

#[test]
fn built_in_ops_run_as_jobs_and_give_the_local_digests() {
    let Some(_cluster) = shared_cluster() else {
        return;
    };
    const OPS: &str = r#"
[recipe]
name = "slurm-ops"

[steps.rated]
op = "haystack"
params = { images = 300, seed = 1 }

[steps.aesthetic]
op = "scorer"
inputs = { data = "rated" }
params = { kind = "aesthetic", sample = 200, steps = 20 }
resources = { gpus = 1, cpus = 2 }
"#;
    let p = Project::new();
    p.write("recipe.toml", OPS);
    let run = p.json(&with_slurm(&["run", "recipe.toml"]), 0);
    let status = p.json(&["status", "last"], 0);
    for step in status["steps"].as_array().unwrap() {
        assert_eq!(step["attempts"][0]["job"]["scheduler"], "slurm", "{step}");
    }
    let local = Project::new();
    local.write("recipe.toml", OPS);
    let local_run = local.json(&["run", "recipe.toml"], 0);
    assert_eq!(outputs(&run), outputs(&local_run));
}
