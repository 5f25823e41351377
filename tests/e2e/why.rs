//! `needle why` and `plan --why`: after a one-value edit of a recipe they name that param; after
//! a one-byte edit of a code file, that file; a first run has nothing to compare with.

use crate::common::*;

fn recipe(lr: &str) -> String {
    format!(
        r#"
[recipe]
name = "why"

[vars]
lr = {lr}

[steps.data]
op = "exec"
cmd = ["sh", "-c", "echo data > \"$NEEDLE_OUT/d\""]

[steps.train]
op = "exec"
inputs = {{ data = "data" }}
cmd = ["sh", "train.sh", "${{lr}}"]
code = ["train.sh"]
params = {{ lr = "${{lr}}" }}
"#
    )
}

#[test]
fn why_names_the_changed_param_and_the_changed_code_file() {
    let p = Project::new();
    p.write("train.sh", "echo \"$1\" > \"$NEEDLE_OUT/model\"\n");
    p.write("recipe.toml", &recipe("0.1"));
    p.json(&["run", "recipe.toml"], 0);
    let out = p.needle(&["why", "last:train"]);
    assert_code(&out, 0);
    assert!(
        stdout(&out).contains("nothing named `train` ran before"),
        "{}",
        stdout(&out)
    );

    // A one-value edit: the plan says why before anything runs, `why` after.
    p.write("recipe.toml", &recipe("0.2"));
    let plan = p.needle(&["plan", "recipe.toml", "--why"]);
    assert_code(&plan, 0);
    let text = stdout(&plan);
    assert!(text.contains("param lr changed: 0.1 → 0.2"), "{text}");
    assert!(
        !text.contains("  data\n"),
        "a cached step has no reason:\n{text}"
    );
    p.json(&["run", "recipe.toml"], 0);
    let out = stdout(&p.needle(&["why", "last:train"]));
    assert!(out.contains("param lr changed: 0.1 → 0.2"), "{out}");
    assert_eq!(out.matches("\n  - ").count(), 1, "only the param:\n{out}");
    // The step that did not change was cached, and `why` says so.
    let out = stdout(&p.needle(&["why", "last:data"]));
    assert!(out.contains("cached in run 2"), "{out}");

    // A one-byte edit of the code file.
    p.write("train.sh", "echo \"$1\" > \"$NEEDLE_OUT/model\" \n");
    p.json(&["run", "recipe.toml"], 0);
    let out = stdout(&p.needle(&["why", "last:train"]));
    assert!(out.contains("code file train.sh changed"), "{out}");
    assert_eq!(out.matches("\n  - ").count(), 1, "only the file:\n{out}");

    let v = p.json(&["why", "last:train"], 0);
    assert_eq!(v["reason"]["changes"][0]["kind"], "code");
    assert_eq!(v["reason"]["changes"][0]["path"], "train.sh");
}

/// `environment` commands key a step on what they print: a changed dependency re-runs it, and
/// `why` and `show` say what changed; gc keeps what they printed, and verify checks it.
#[test]
fn environment_commands_key_a_step_and_say_what_changed() {
    let p = Project::new();
    p.write("versions.sh", "echo torch 2.11.0\necho numpy 2.0.1\n");
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "env"

[steps.train]
op = "exec"
environment = ["sh ./versions.sh", "python3 -V"]
cmd = ["sh", "-c", "echo trained > \"$NEEDLE_OUT/model\""]
"#,
    );
    p.json(&["run", "recipe.toml"], 0);
    assert_eq!(p.json(&["run", "recipe.toml"], 0)["executed"], 0);

    p.write("versions.sh", "echo torch 2.12.0\necho numpy 2.0.1\n");
    let plan = stdout(&p.needle(&["plan", "recipe.toml", "--why"]));
    assert!(
        plan.contains("what `sh ./versions.sh` prints changed"),
        "{plan}"
    );
    assert_eq!(p.json(&["run", "recipe.toml"], 0)["executed"], 1);
    let why = stdout(&p.needle(&["why", "last:train"]));
    assert!(
        why.contains("what `sh ./versions.sh` prints changed: -torch 2.11.0, +torch 2.12.0"),
        "{why}"
    );
    let show = stdout(&p.needle(&["show", "last:train"]));
    assert!(
        show.contains("sh ./versions.sh: torch 2.12.0 (and 1 more lines)"),
        "{show}"
    );
    assert!(show.contains("python3 -V: Python 3."), "{show}");

    assert_code(&p.needle(&["gc"]), 0);
    assert_code(&p.needle(&["verify", "--hash"]), 0);
    assert!(stdout(&p.needle(&["show", "last:train"])).contains("torch 2.12.0"));

    // A command that fails is refused before anything runs, naming the step and the command.
    p.write("versions.sh", "echo 'no such module' >&2\nexit 1\n");
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 2);
    assert!(
        stderr(&out).contains(
            "environment command `sh ./versions.sh` of step `train`\n  caused by: it failed (exit status: 1): no such module"
        ),
        "{}",
        stderr(&out)
    );
}
