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
