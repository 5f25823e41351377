//! `code` directories at the root of a project: what they leave out, and what is too much.

use crate::common::*;

/// A project whose recipe names the whole project as its code, with the store beside it.
fn project_root_as_code() -> Project {
    let p = Project::new();
    p.write("train.py", "print('training')\n");
    p.write("lib/util.py", "X = 1\n");
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "root"

[steps.train]
op = "exec"
code = ["."]
cmd = ["sh", "-c", "ls -R > \"$NEEDLE_OUT/files\"; python3 train.py > \"$NEEDLE_OUT/said\""]
"#,
    );
    p
}

#[test]
fn the_project_root_as_code_leaves_out_the_store_and_runs_once() {
    let p = project_root_as_code();
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 1);
    let files = std::fs::read_to_string(output_view(&p, &run, "train").join("files")).unwrap();
    assert!(
        files.contains("train.py") && files.contains("util.py"),
        "{files}"
    );
    assert!(
        !files.contains(".needle") && !files.contains("blobs"),
        "{files}"
    );

    // The store has changed under the recipe: nothing of it is code, so nothing runs again.
    let again = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(again["executed"], 0, "{again}");

    // What Python leaves beside the code, and what .gitignore names, do not count either.
    p.write("lib/__pycache__/util.cpython-311.pyc", "compiled");
    p.write("notes.log", "scratch");
    p.write(".gitignore", "*.log\n");
    let plan = p.json(&["plan", "recipe.toml"], 0);
    assert_eq!(
        plan["summary"]["to_run"], 1,
        "the new .gitignore is code: {plan}"
    );
    p.json(&["run", "recipe.toml"], 0);
    p.write("notes.log", "more scratch");
    p.write("lib/__pycache__/util.cpython-311.pyc", "recompiled");
    let plan = p.json(&["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["to_run"], 0, "{plan}");
    // A real edit does.
    p.write("lib/util.py", "X = 2\n");
    let plan = p.json(&["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["to_run"], 1, "{plan}");
}

#[test]
fn code_holding_a_dataset_is_refused_at_its_line() {
    let p = project_root_as_code();
    // Sparse: two GiB that take no disk.
    let big = std::fs::File::create(p.path("data.bin")).unwrap();
    big.set_len(2 << 30).unwrap();
    let out = p.needle(&["plan", "recipe.toml"]);
    assert_code(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains("recipe.toml:7:9: error: code path `.` holds 2.0 GiB in 4 files"),
        "{err}"
    );
    assert!(err.contains("a `.needleignore`"), "{err}");
    // Left out, it is no code.
    p.write(".needleignore", "data.bin\n");
    assert_code(&p.needle(&["plan", "recipe.toml"]), 0);
}
