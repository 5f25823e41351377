//! `needle gc`, `--dry-run`, `--keep-last`, `pin` / `unpin`, and gc against a running run.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// A haystack of three images; a subset sharing one of its image blobs, with the var `v`;
/// a step reading the subset. Each step appends its name to `ran` when it executes.
pub const CHAIN: &str = r#"
[recipe]
name = "chain"
[vars]
v = 1
[steps.hay]
op = "exec"
cmd = ["sh", "-c", "mkdir -p \"$NEEDLE_OUT/images\"; for i in 1 2 3; do echo image-$i > \"$NEEDLE_OUT/images/$i.png\"; done; echo hay >> \"$NEEDLE_RECIPE_DIR/ran\""]
[steps.sub]
op = "exec"
cmd = ["sh", "-c", "mkdir -p \"$NEEDLE_OUT/images\"; cp \"$NEEDLE_IN_DATA/images/1.png\" \"$NEEDLE_OUT/images/\"; echo ${v} > \"$NEEDLE_OUT/v\"; echo sub >> \"$NEEDLE_RECIPE_DIR/ran\""]
inputs = { data = "hay" }
[steps.use]
op = "exec"
cmd = ["sh", "-c", "cat \"$NEEDLE_IN_DATA/images/1.png\" \"$NEEDLE_IN_DATA/v\" > \"$NEEDLE_OUT/o\"; echo use >> \"$NEEDLE_RECIPE_DIR/ran\""]
inputs = { data = "sub" }
"#;

fn gc(p: &Project, args: &[&str]) -> Value {
    let mut all = vec!["gc"];
    all.extend_from_slice(args);
    p.json(&all, 0)
}

fn run_ids(p: &Project) -> Vec<u64> {
    p.json(&["runs"], 0)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_u64().unwrap())
        .collect()
}

fn output(run: &Value, step: &str) -> String {
    steps_named(run, step)[0]["output"]
        .as_str()
        .unwrap()
        .to_string()
}

fn verify_ok(p: &Project) {
    let out = p.needle(&["verify", "--hash"]);
    assert_code(&out, 0);
}

#[test]
fn gc_keeps_runs_and_pins_and_frees_the_rest() {
    let p = Project::new();
    p.write("chain.toml", CHAIN);
    let r1 = p.json(&["run", "chain.toml"], 0);
    p.json(&["run", "chain.toml", "--set", "v=2"], 0);
    p.json(&["run", "chain.toml", "--set", "v=3"], 0);

    // Every run kept: nothing of theirs goes.
    let all = gc(&p, &["--dry-run"]);
    assert_eq!(all["freed"]["steps"], 0, "{all}");
    assert_eq!(all["freed"]["blobs"]["count"], 0, "{all}");
    assert_eq!(all["freed"]["kept"]["runs"], 3);

    // What --keep-last 1 would free, and that a dry run frees none of it.
    let dry = gc(&p, &["--keep-last", "1", "--dry-run"]);
    let f = &dry["freed"];
    assert_eq!(dry["dry_run"], true);
    assert_eq!(
        (f["runs"].as_u64(), f["steps"].as_u64()),
        (Some(2), Some(4)),
        "{dry}"
    );
    assert_eq!(f["artifacts"], 4, "sub and use of runs 1 and 2");
    assert_eq!(
        f["blobs"]["count"], 4,
        "their `v` and `o` files; the image is shared"
    );
    assert!(f["bytes"].as_u64().unwrap() > 0);
    assert_eq!(run_ids(&p), [1, 2, 3], "a dry run removes nothing");
    let text = stdout(&p.needle(&["gc", "--keep-last", "1", "--dry-run"]));
    assert!(text.starts_with("would free "), "{text}");
    assert!(text.contains("2 runs, 4 steps, 4 artifacts"), "{text}");
    assert!(text.contains("dry run: nothing was removed"), "{text}");

    // A pin keeps run 1's `use` and its lineage.
    let pinned = output(&r1, "use");
    let out = p.needle(&["pin", "1:use"]);
    assert_code(&out, 0);
    assert!(
        stdout(&out).contains("3 step(s) of its lineage"),
        "{}",
        stdout(&out)
    );
    let pins = p.json(&["pin"], 0);
    assert_eq!(pins.as_array().unwrap().len(), 1);
    assert_eq!(pins[0]["artifact"], pinned.as_str());
    assert_eq!(pins[0]["step"], "use");
    assert_eq!(pins[0]["reference"], "1:use");

    let freed = gc(&p, &["--keep-last", "1"]);
    assert_eq!(freed["freed"]["runs"], 2);
    assert_eq!(
        freed["freed"]["steps"], 2,
        "only run 2's sub and use: run 1's are pinned"
    );
    assert_eq!(run_ids(&p), [3]);
    verify_ok(&p);
    let lineage = p.json(&["lineage", &pinned[..12]], 0);
    let names: Vec<&str> = lineage["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["use", "sub", "hay"]);
    // Its bytes are whole: the shared image, and its own.
    let dir = p.path("exported");
    assert_code(
        &p.needle(&["export", &pinned[..12], dir.to_str().unwrap()]),
        0,
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("o")).unwrap(),
        "image-1\n1\n"
    );

    // Unpinned, it goes with the next gc; a run of v=1 then executes sub and use again.
    let out = p.needle(&["unpin", &pinned[..8]]);
    assert_code(&out, 0);
    assert_code(&p.needle(&["unpin", &pinned[..8]]), 2);
    assert_eq!(p.json(&["pin"], 0).as_array().unwrap().len(), 0);
    let freed = gc(&p, &["--keep-last", "1"]);
    assert_eq!(freed["freed"]["steps"], 2);
    verify_ok(&p);
    std::fs::remove_file(p.path("ran")).unwrap();
    let again = p.json(&["run", "chain.toml"], 0);
    assert_eq!(p.lines("ran"), ["sub", "use"]);
    assert_eq!(output(&again, "use"), pinned, "the same bytes as before");
}

#[test]
fn pin_refuses_what_has_no_output() {
    let p = Project::new();
    p.write(
        "r.toml",
        r#"
[recipe]
name = "fails"
[steps.bad]
op = "exec"
cmd = ["sh", "-c", "exit 3"]
"#,
    );
    assert_code(&p.needle(&["run", "r.toml"]), 1);
    let out = p.needle(&["pin", "last:bad"]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("has no output"), "{}", stderr(&out));
    let out = p.needle(&["pin", "ffff"]);
    assert_code(&out, 2);
    let out = p.needle(&["unpin", "last:bad"]);
    assert_code(&out, 2);
}

#[test]
fn gc_never_runs_during_a_run() {
    let p = Project::new();
    p.write(
        "hold.toml",
        r#"
[recipe]
name = "hold"
[steps.hold]
op = "exec"
cmd = ["sh", "-c", "touch \"$NEEDLE_RECIPE_DIR/started\"; i=0; while [ ! -e \"$NEEDLE_RECIPE_DIR/release\" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo held > \"$NEEDLE_OUT/v\""]
"#,
    );
    let mut run = p
        .background(&["run", "hold.toml"])
        .spawn()
        .expect("needle run starts");
    wait_for("the step to start", Duration::from_secs(30), || {
        p.path("started").exists()
    });
    // gc fails at once, naming the run that holds the store.
    let out = p.needle(&["gc", "--keep-last", "0"]);
    assert_code(&out, 3);
    let err = stderr(&out);
    assert!(
        err.contains("in use by pid") && err.contains(&run.id().to_string()),
        "{err}"
    );
    assert!(err.contains("needle run hold.toml"), "{err}");

    // With --wait it waits for the run to end, then collects.
    let waiting = p
        .background(&["gc", "--wait", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("needle gc starts");
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(p.path("release"), "").unwrap();
    assert!(run.wait().unwrap().success());
    let out = waiting.wait_with_output().unwrap();
    assert_code(&out, 0);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["freed"]["kept"]["runs"], 1);
    assert_eq!(
        v["freed"]["kept"]["steps"], 1,
        "the run it waited for is kept whole"
    );
    verify_ok(&p);
}
