//! Bad recipes and bad invocations exit 2 and write nothing to the store.

use crate::common::*;

#[test]
fn recipe_errors_exit_2_and_leave_no_store() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "broken"

[steps.a]
op = "exce"
cmd = ["true"]

[steps.b]
op = "exec"
cmd = ["echo", "${missing}"]
inputs = { x = "nowhere" }
"#,
    );
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 2);
    let err = stderr(&out);
    // Every error of the file, each at its line and column.
    assert!(
        err.contains("recipe.toml:6:6: error: unknown op `exce`"),
        "{err}"
    );
    assert!(
        err.contains("recipe.toml:11:17: error: undefined var `missing`"),
        "{err}"
    );
    assert!(err.contains("exce"), "{err}");
    assert!(err.contains("missing"), "{err}");
    assert!(err.contains("nowhere"), "{err}");
    assert!(!p.store().exists(), "nothing is written for a bad recipe");

    let plan = p.needle(&["plan", "recipe.toml"]);
    assert_code(&plan, 2);
}

#[test]
fn bad_invocations_exit_2() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "ok"
[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo > \"$NEEDLE_OUT/v\""]
resources = { gpus = 2 }
"#,
    );
    let out = p.needle(&["run", "recipe.toml", "--gpus", "1"]);
    assert_code(&out, 2);
    assert!(
        stderr(&out).contains("asks for 2 GPU(s), but this run has 1"),
        "{}",
        stderr(&out)
    );
    assert!(!p.store().exists());

    let out = p.needle(&["run", "recipe.toml", "--gpus", "2", "--force", "nope"]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("--force `nope`"));

    assert_code(&p.needle(&["run", "missing.toml"]), 2);
    assert_code(&p.needle(&["frobnicate"]), 2);
}

#[test]
fn unknown_references_are_explained() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "ok"
[sweep]
n = [1, 2]
[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo ${n} > \"$NEEDLE_OUT/v\""]
"#,
    );
    p.json(&["run", "recipe.toml"], 0);
    let out = p.needle(&["show", "1:a"]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("matches 2 steps"), "{}", stderr(&out));
    assert!(stderr(&out).contains("1:a[n=1]"), "{}", stderr(&out));
    assert_code(&p.needle(&["show", "1:a[n=2]"]), 0);
    assert_code(&p.needle(&["show", "1:zzz"]), 2);
    assert_code(&p.needle(&["show", "ffff"]), 2);
    assert_code(&p.needle(&["status", "9"]), 2);
}

#[test]
fn completions_are_generated() {
    let p = Project::new();
    let out = p.needle(&["completions", "bash"]);
    assert_code(&out, 0);
    assert!(stdout(&out).contains("needle"));
}

#[test]
fn params_too_large_for_the_environment_are_refused_before_anything_runs() {
    let p = Project::new();
    let big = "x".repeat(140 * 1024);
    let medium = "y".repeat(100 * 1024);
    p.write(
        "recipe.toml",
        &format!(
            r#"[recipe]
name = "big"

[steps.one]
op = "exec"
cmd = ["true"]
params = {{ blob = "{big}" }}

[steps.many]
op = "exec"
cmd = ["true"]
params = {{ a = "{medium}", b = "{medium}" }}
"#
        ),
    );
    for cmd in ["plan", "run"] {
        let out = p.needle(&[cmd, "recipe.toml"]);
        assert_code(&out, 2);
        let err = stderr(&out);
        assert!(
            err.contains("recipe.toml:7:19: error: param `blob` of step `one` is 140.0 KiB as `NEEDLE_PARAM_BLOB`: one environment variable holds at most 128.0 KiB"),
            "{err}"
        );
        assert!(
            err.contains("recipe.toml:9:1: error: the params of step `many` take"),
            "{err}"
        );
    }
    assert!(!p.store().exists());
}
