//! Read-only commands while a run holds the store: they read through the runner's socket and
//! give the answers they give after the run for what was committed; writers are still told
//! who holds the store; a killed runner's socket and misbehaving clients harm nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// `first` finishes at once (many small files, a log line); `slow` runs until the test
/// creates `go`, printing a line first.
const RECIPE: &str = r#"
[recipe]
name = "concurrent"

[steps.first]
op = "exec"
cmd = ["sh", "-c", "for i in $(seq 1 3000); do echo $i > \"$NEEDLE_OUT/file-$i.txt\"; done; echo first says hi"]

[steps.slow]
op = "exec"
inputs = { data = "first" }
cmd = ["sh", "-c", "echo waiting for go; touch \"$NEEDLE_RECIPE_DIR/started\"; while [ ! -e \"$NEEDLE_RECIPE_DIR/go\" ]; do sleep 0.05; done; cat \"$NEEDLE_IN_DATA/file-7.txt\" > \"$NEEDLE_OUT/seven\""]
"#;

fn spawn_run(p: &Project) -> Child {
    p.background(&["run", "recipe.toml", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until `slow` has started (and printed its line).
fn wait_started(p: &Project) {
    wait_for("`slow` to start", Duration::from_secs(60), || {
        p.path("started").exists()
    });
}

/// Let `slow` finish and return the run's `--json` summary.
fn finish(p: &Project, run: Child) -> Value {
    p.write("go", "");
    let out = run.wait_with_output().unwrap();
    assert_code(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn text(p: &Project, args: &[&str]) -> String {
    let out = p.needle(args);
    assert_code(&out, 0);
    stdout(&out)
}

#[test]
fn read_only_commands_answer_while_a_run_holds_the_store() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let run = spawn_run(&p);
    wait_started(&p);
    assert!(p.store().join("runner.sock").exists());

    // The run as far as it has got.
    let runs = p.json(&["runs"], 0);
    assert_eq!(runs[0]["state"], "running", "{runs}");
    assert_eq!(runs[0]["executed"], 1, "{runs}");
    let status = p.json(&["status", "last"], 0);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(steps_named(&status, "first")[0]["status"], "succeeded");
    assert_eq!(steps_named(&status, "slow")[0]["status"], "running");
    let table = text(&p, &["status", "last"]);
    assert!(table.contains("running"), "{table}");
    let slow = text(&p, &["show", "last:slow"]);
    assert!(slow.contains("status   running"), "{slow}");
    // The running step's output so far.
    assert_eq!(text(&p, &["logs", "last:slow"]), "waiting for go\n");

    // What was committed, as it will read after the run.
    let first_key = steps_named(&status, "first")[0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let show_during = p.json(&["show", &first_key], 0);
    let show_run_during = p.json(&["show", "last:first"], 0);
    let output = show_during["output"].as_str().unwrap().to_string();
    let artifact_during = p.json(&["show", &output[..12]], 0);
    let lineage_during = p.json(&["lineage", "last:first"], 0);
    let logs_during = text(&p, &["logs", "last:first"]);
    assert_eq!(logs_during, "first says hi\n");
    // The view the runner built holds the files.
    let view = artifact_during["view"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(view).join("file-7.txt")).unwrap(),
        "7\n"
    );
    // Planning sees the committed step as cached, and stores nothing.
    let plan = p.json(&["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["cached"], 1, "{plan}");
    assert_eq!(steps_named(&plan, "first")[0]["status"], "cached");
    assert_eq!(steps_named(&plan, "slow")[0]["status"], "pending");
    assert_code(&p.needle(&["plan", "recipe.toml", "--why"]), 0);

    // Writers other than runs (which join it: join.rs) are still told who holds the store.
    let second = p.needle(&["gc", "--keep-last", "0"]);
    assert_code(&second, 3);
    let err = stderr(&second);
    assert!(
        err.contains(&format!("in use by pid {}", run.id())),
        "{err}"
    );
    assert_code(&p.needle(&["verify"]), 3);

    let summary = finish(&p, run);
    assert_eq!(summary["executed"], 2, "{summary}");
    assert!(
        !p.store().join("runner.sock").exists(),
        "removed at the end"
    );

    // The same answers from the store itself.
    assert_eq!(p.json(&["show", &first_key], 0), show_during);
    assert_eq!(p.json(&["show", "last:first"], 0), show_run_during);
    assert_eq!(
        p.json(&["show", &output[..12]], 0)["files"],
        artifact_during["files"]
    );
    assert_eq!(p.json(&["lineage", "last:first"], 0), lineage_during);
    assert_eq!(text(&p, &["logs", "last:first"]), logs_during);
    let runs = p.json(&["runs"], 0);
    assert_eq!(runs[0]["state"], "succeeded");
    assert_eq!(p.json(&["status", "last"], 0)["state"], "succeeded");
    assert_eq!(p.json(&["plan", "recipe.toml"], 0)["summary"]["cached"], 2);
}

#[test]
fn a_killed_runners_socket_does_not_confuse_the_next_commands() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let mut run = spawn_run(&p);
    wait_started(&p);
    let live = p.json(&["status", "last"], 0);
    let first_key = steps_named(&live, "first")[0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    // SAFETY: SIGKILL to the child we spawned.
    unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
    run.wait().unwrap();
    assert!(
        p.store().join("runner.sock").exists(),
        "a killed runner leaves its socket"
    );

    // Nobody listens there: the commands read the store themselves, and say the run lost its
    // runner (its record is as it was stored when it started).
    let status = p.json(&["status", "last"], 0);
    assert_eq!(status["state"], "aborted", "{status}");
    assert_eq!(p.json(&["runs"], 0)[0]["state"], "aborted");
    assert_eq!(p.json(&["show", &first_key], 0)["name"], "first");
    assert_code(&p.needle(&["lineage", &first_key]), 0);
    assert_eq!(p.json(&["plan", "recipe.toml"], 0)["summary"]["cached"], 1);

    // The next run replaces the socket with its own and serves on it.
    std::fs::remove_file(p.path("started")).unwrap();
    let run = spawn_run(&p);
    wait_started(&p);
    let status = p.json(&["status", "last"], 0);
    assert_eq!(status["run"], 2);
    assert_eq!(status["state"], "running");
    assert_eq!(steps_named(&status, "first")[0]["status"], "cached");
    let summary = finish(&p, run);
    assert_eq!(summary["cached"], 1, "{summary}");
    assert_eq!(summary["executed"], 1, "{summary}");
    assert_code(&p.needle(&["verify", "--hash"]), 0);
}

/// A raw connection to the runner's socket.
fn connect(p: &Project) -> UnixStream {
    let s = UnixStream::connect(p.store().join("runner.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

#[test]
fn clients_sending_garbage_or_hanging_do_not_disturb_the_run() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let run = spawn_run(&p);
    wait_started(&p);
    let first = p.json(&["show", "last:first"], 0);
    let output = first["output"].as_str().unwrap().to_string();

    // Garbage gets an error line, then the connection is closed.
    let mut s = connect(&p);
    s.write_all(b"\x00\x01 GET / HTTP/1.1\r\n").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"error\""), "{line}");
    line.clear();
    assert_eq!(reader.read_line(&mut line).unwrap(), 0, "closed");

    // Clients that connect and say nothing, or half a request.
    let mut hanging: Vec<UnixStream> = (0..3).map(|_| connect(&p)).collect();
    let mut half = connect(&p);
    half.write_all(b"{\"op\":\"ste").unwrap();
    hanging.push(half);

    // Clients that ask for a big answer (the manifest of 3000 files, more than a socket
    // buffer holds) and leave without reading it: the runner's write fails, it must not die
    // of SIGPIPE.
    // (Under load the earlier ones may still be serving: then the runner turns a connection
    // away at once, past MAX_CLIENTS, and the write may fail. Either is fine.)
    for _ in 0..5 {
        let mut s = connect(&p);
        let _ =
            s.write_all(format!("{{\"op\":\"manifest\",\"artifact\":\"{output}\"}}\n").as_bytes());
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
    }
    // One that asks as fast as it can while the others wait.
    let flood = {
        let mut s = connect(&p);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            for _ in 0..300 {
                if s.write_all(b"{\"op\":\"runs\"}\n").is_err() {
                    break;
                }
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
            }
        })
    };

    // Meanwhile the commands are answered, and the run goes on.
    let status = p.json(&["status", "last"], 0);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(text(&p, &["logs", "last:first"]), "first says hi\n");
    flood.join().unwrap();
    let summary = finish(&p, run);
    assert_eq!(summary["executed"], 2, "{summary}");
    drop(hanging);
    assert_eq!(
        std::fs::read_to_string(
            Path::new(p.json(&["show", "last:slow"], 0)["view"].as_str().unwrap()).join("seven")
        )
        .unwrap(),
        "7\n"
    );
    assert_code(&p.needle(&["verify", "--hash"]), 0);
}

#[test]
fn wait_reads_through_the_runner_instead_of_waiting() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let run = spawn_run(&p);
    wait_started(&p);
    // --wait is for the store being busy; a runner that answers is not busy: the answer is
    // the run as it is now, not as it ends.
    let status = p.json(&["status", "last", "--wait"], 0);
    assert_eq!(status["state"], "running");
    finish(&p, run);
}

#[test]
fn a_stopped_runner_is_named_instead_of_hanging_its_readers() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let run = spawn_run(&p);
    wait_started(&p);
    // Ctrl-Z: the runner's socket accepts connections, nobody answers them.
    // SAFETY: signals to the child we spawned.
    unsafe { libc::kill(run.id() as i32, libc::SIGSTOP) };
    let t0 = Instant::now();
    let out = p.needle(&["status", "last"]);
    let took = t0.elapsed();
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(run.id() as i32, libc::SIGCONT) };
    assert_code(&out, 3);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("in use by pid {}", run.id())),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
    // Going again, it answers again.
    assert_eq!(p.json(&["status", "last"], 0)["state"], "running");
    finish(&p, run);
}

#[test]
fn a_run_waits_for_a_readers_moment_but_not_for_a_writer() {
    use needle_core::store::{LockMode, Store};

    let p = Project::new();
    p.write(
        "recipe.toml",
        "[recipe]\nname = \"r\"\n[steps.a]\nop = \"exec\"\ncmd = [\"sh\", \"-c\", \"echo a > \\\"$NEEDLE_OUT/a\\\"\"]\n",
    );
    p.json(&["run", "recipe.toml"], 0);

    // `needle show` and the like hold the store for the moment they read: a run started
    // meanwhile, without --wait, waits for them instead of failing.
    let reader = Store::open_to_read(&p.store(), LockMode::Fail).unwrap();
    let run = spawn_run(&p);
    std::thread::sleep(Duration::from_millis(500));
    drop(reader);
    let out = run.wait_with_output().unwrap();
    assert_code(&out, 0);

    // A writer (another run, gc, verify) is named at once.
    let writer = Store::open(&p.store(), LockMode::Fail).unwrap();
    let t0 = Instant::now();
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 3);
    assert!(
        stderr(&out).contains(&format!("pid {}", std::process::id())),
        "{}",
        stderr(&out)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    drop(writer);
}

#[test]
fn a_removed_lock_file_does_not_let_a_second_runner_in() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let run = spawn_run(&p);
    wait_started(&p);
    // Someone tidies the store by hand while it runs. (A second `run` would join the live
    // runner, which is not a second runner: join.rs.)
    std::fs::remove_file(p.store().join("lock")).unwrap();
    let second = p.needle(&["gc", "--keep-last", "0"]);
    assert_code(&second, 3);
    assert!(
        stderr(&second).contains("the store's lock file was removed or replaced"),
        "{}",
        stderr(&second)
    );
    // The first run's step was not disturbed: it finishes, and its log is kept.
    let summary = finish(&p, run);
    assert_eq!(summary["state"], "succeeded", "{summary}");
    assert!(text(&p, &["logs", "last:slow"]).contains("waiting for go"));
    assert_code(&p.needle(&["verify"]), 0);
}
