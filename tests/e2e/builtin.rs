//! Built-in ops run as `needle-worker OP`: the `files` op imports data from outside the store,
//! re-runs when the data changes, and fails a step (not the run) with its error in the log.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::common::*;

const RECIPE: &str = r#"
[recipe]
name = "import"

[steps.data]
op = "files"
params = { path = "data" }

[steps.count]
op = "exec"
cmd = ["sh", "-c", "cd \"$NEEDLE_IN_DATA\" && find . -type f | sort > \"$NEEDLE_OUT/listing\""]
inputs = { data = "data" }
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("data/a.txt", "alpha");
    p.write("data/sub/b.txt", "beta");
    p.write("recipe.toml", RECIPE);
    p
}

fn touch(path: &Path) {
    let later = SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(later)
        .unwrap();
}

fn status_of<'a>(run: &'a serde_json::Value, step: &str) -> &'a str {
    steps_named(run, step)[0]["status"].as_str().unwrap()
}

#[test]
fn files_imports_a_directory_and_reruns_when_it_changes() {
    let p = project();
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(status_of(&run, "data"), "succeeded");
    let view = output_view(&p, &run, "data");
    assert_eq!(
        std::fs::read_to_string(view.join("a.txt")).unwrap(),
        "alpha"
    );
    assert_eq!(
        std::fs::read_to_string(view.join("sub/b.txt")).unwrap(),
        "beta"
    );
    let first = steps_named(&run, "data")[0]["output"].clone();

    // Nothing changed: nothing runs.
    let again = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(again["executed"], 0);

    // Touched, same bytes: the import runs again, its output is the same artifact, and the
    // step reading it stays cached.
    touch(&p.path("data/a.txt"));
    let touched = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(status_of(&touched, "data"), "succeeded");
    assert_eq!(steps_named(&touched, "data")[0]["output"], first);
    assert_eq!(status_of(&touched, "count"), "cached");

    // New bytes: both run.
    p.write("data/sub/c.txt", "gamma");
    let changed = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(status_of(&changed, "data"), "succeeded");
    assert_eq!(status_of(&changed, "count"), "succeeded");
    let listing = std::fs::read_to_string(output_view(&p, &changed, "count").join("listing"));
    assert!(listing.unwrap().contains("c.txt"));
}

#[test]
fn a_missing_path_is_a_plan_error() {
    let p = project();
    p.write(
        "recipe.toml",
        &RECIPE.replace("path = \"data\"", "path = \"nothing-here\""),
    );
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 2);
    let err = stderr(&out);
    assert!(err.contains("param `path` of step `data`"), "{err}");
    assert!(err.contains("nothing-here"), "{err}");
    assert!(!p.store().join("meta").exists() || p.json(&["runs"], 0) == serde_json::json!([]));
}

#[test]
fn a_failing_builtin_fails_its_step_with_the_error_in_the_log() {
    let p = project();
    // A FIFO passes the planner's stat but is no file to copy.
    let fifo = p.path("data/pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 1);
    let logs = p.needle(&["logs", "last:data"]);
    assert_code(&logs, 0);
    let log = stdout(&logs);
    assert!(log.contains("error:"), "{log}");
    assert!(
        log.contains("pipe` is neither a file nor a directory"),
        "{log}"
    );
}

#[test]
fn the_worker_refuses_unknown_ops() {
    let p = Project::new();
    let worker = bin().with_file_name("needle-worker");
    let run = |args: &[&str]| {
        std::process::Command::new(&worker)
            .current_dir(p.path(""))
            .args(args)
            .output()
            .expect("needle-worker runs (it is built with the workspace)")
    };
    let out = run(&["no-such-op"]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("`no-such-op` is not a built-in op"));
    // Outside a run, the environment is missing: said so, exit 1.
    let out = run(&["files"]);
    assert_code(&out, 1);
    assert!(stderr(&out).contains("is this running under `needle run`?"));
}
