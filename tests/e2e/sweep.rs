//! Sweeps share what no swept var reaches, cache what ran, and re-execute only what changed.

use crate::common::*;

/// A 4-step chain under a 3 × 2 sweep; `root` reads no swept var. Every step appends its name
/// to ran.txt, so the test sees what really executed, not only what needle reports.
pub(crate) fn recipe(xs: &str) -> String {
    format!(
        r#"
[recipe]
name = "sweep"

[vars]
x = 1
y = "p"

[sweep]
x = {xs}
y = ["p", "q"]

[steps.root]
op = "exec"
cmd = ["sh", "-c", "echo root >> \"$NEEDLE_RECIPE_DIR/ran.txt\"; echo base > \"$NEEDLE_OUT/v\""]

[steps.s1]
op = "exec"
cmd = ["sh", "-c", "echo s1 x=${{x}} >> \"$NEEDLE_RECIPE_DIR/ran.txt\"; cat \"$NEEDLE_IN_UP/v\" > \"$NEEDLE_OUT/v\"; echo x=${{x}} >> \"$NEEDLE_OUT/v\""]
inputs = {{ up = "root" }}

[steps.s2]
op = "exec"
cmd = ["sh", "-c", "echo s2 >> \"$NEEDLE_RECIPE_DIR/ran.txt\"; cat \"$NEEDLE_IN_UP/v\" > \"$NEEDLE_OUT/v\"; echo y=$NEEDLE_PARAM_Y >> \"$NEEDLE_OUT/v\""]
inputs = {{ up = "s1" }}
params = {{ y = "${{y}}" }}

[steps.s3]
op = "exec"
cmd = ["sh", "-c", "echo s3 >> \"$NEEDLE_RECIPE_DIR/ran.txt\"; cat \"$NEEDLE_IN_UP/v\" > \"$NEEDLE_OUT/v\"; echo done >> \"$NEEDLE_OUT/v\""]
inputs = {{ up = "s2" }}
"#
    )
}

#[test]
fn plan_counts_the_shared_step_once() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2, 3]"));
    let plan = p.json(&["plan", "recipe.toml"], 0);
    let s = &plan["summary"];
    assert_eq!(s["arms"], 6);
    assert_eq!(s["instances"], 24);
    assert_eq!(s["unique"], 1 + 3 + 6 + 6);
    assert_eq!(s["cached"], 0);
    assert_eq!(s["to_run"], 16);
    let roots = steps_named(&plan, "root");
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0]["arms"].as_array().unwrap().len(), 6);
    assert_eq!(roots[0]["status"], "pending");
    assert!(
        roots[0]["key"].is_string(),
        "a root's key is known before it runs"
    );
    for s1 in steps_named(&plan, "s1") {
        assert_eq!(
            s1["arms"].as_array().unwrap().len(),
            2,
            "each x is shared by both y"
        );
        assert!(s1["key"].is_null(), "its input is not produced yet");
    }
    // Planning writes nothing.
    assert!(!p.store().exists());
}

#[test]
fn run_executes_each_unique_step_once_then_nothing() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2, 3]"));

    let first = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(first["executed"], 16);
    assert_eq!(first["cached"], 0);
    let ran = p.lines("ran.txt");
    assert_eq!(ran.len(), 16);
    assert_eq!(ran.iter().filter(|l| *l == "root").count(), 1);

    let second = p.needle(&["run", "recipe.toml"]);
    assert_code(&second, 0);
    assert!(
        stdout(&second).contains("nothing to do: all 16 steps were cached"),
        "{}",
        stdout(&second)
    );
    assert_eq!(p.lines("ran.txt").len(), 16, "a cached step never executes");

    let plan = p.json(&["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["cached"], 16);
    assert_eq!(plan["summary"]["to_run"], 0);
}

#[test]
fn changing_one_swept_value_runs_only_that_arm() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2, 3]"));
    p.json(&["run", "recipe.toml"], 0);

    p.write("recipe.toml", &recipe("[1, 2, 4]"));
    let plan = p.json(&["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["cached"], 11);
    assert_eq!(plan["summary"]["to_run"], 5);

    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 5, "s1[x=4], s2 and s3 for both y");
    assert_eq!(run["cached"], 11);
    let mut ran = p.lines("ran.txt")[16..].to_vec();
    ran.sort();
    assert_eq!(ran, ["s1 x=4", "s2", "s2", "s3", "s3"]);
}

#[test]
fn set_pins_a_swept_var() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2, 3]"));
    let plan = p.json(&["plan", "recipe.toml", "--set", "x=2"], 0);
    assert_eq!(plan["summary"]["arms"], 2);
    assert_eq!(plan["summary"]["unique"], 1 + 1 + 2 + 2);
    for s in plan["steps"].as_array().unwrap() {
        if s["name"] != "root" {
            assert_eq!(s["arm"]["x"], 2);
        }
    }
}

#[test]
fn identical_upstream_output_does_not_rerun_dependents() {
    let p = Project::new();
    p.write(
        "gen.sh",
        "# v1\necho same > \"$NEEDLE_OUT/data\"\necho gen >> \"$NEEDLE_RECIPE_DIR/ran.txt\"\n",
    );
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "identical"

[steps.gen]
op = "exec"
cmd = ["sh", "gen.sh"]
code = ["gen.sh"]

[steps.use]
op = "exec"
cmd = ["sh", "-c", "cp \"$NEEDLE_IN_DATA/data\" \"$NEEDLE_OUT/copy\"; echo use >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]
inputs = { data = "gen" }
"#,
    );
    p.json(&["run", "recipe.toml"], 0);
    assert_eq!(p.lines("ran.txt"), ["gen", "use"]);

    // Forced: gen runs again, produces the same bytes, so use keeps its key.
    let forced = p.json(&["run", "recipe.toml", "--force", "gen"], 0);
    assert_eq!(forced["executed"], 1);
    assert_eq!(steps_named(&forced, "use")[0]["status"], "cached");
    assert_eq!(p.lines("ran.txt"), ["gen", "use", "gen"]);

    // A comment changes gen's code, so its key; its output is the same bytes.
    p.write("gen.sh", "# v2: reworded\necho same > \"$NEEDLE_OUT/data\"\necho gen >> \"$NEEDLE_RECIPE_DIR/ran.txt\"\n");
    let edited = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(edited["executed"], 1);
    assert_eq!(steps_named(&edited, "use")[0]["status"], "cached");
    assert_eq!(p.lines("ran.txt"), ["gen", "use", "gen", "gen"]);

    // Both executions of the forced step are recorded.
    let show = p.json(&["show", "1:gen"], 0);
    assert_eq!(show["executions"].as_array().unwrap().len(), 2);
}

#[test]
fn gather_reads_every_arm() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "gather"

[sweep]
n = [1, 2, 3]

[steps.each]
op = "exec"
cmd = ["sh", "-c", "echo ${n} > \"$NEEDLE_OUT/n\""]

[steps.all]
op = "exec"
cmd = ["sh", "-c", "cat \"$NEEDLE_IN_EACH\"/*/n | sort > \"$NEEDLE_OUT/all\"; cp \"$NEEDLE_IN_EACH/index.json\" \"$NEEDLE_OUT/\""]
inputs = { each = "each[*]" }
"#,
    );
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 4);
    let all = steps_named(&run, "all");
    assert_eq!(all.len(), 1);
    let out = all[0]["output"].as_str().unwrap();
    let show = p.json(&["show", out], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(view.join("all")).unwrap(),
        "1\n2\n3\n"
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(view.join("index.json")).unwrap()).unwrap();
    let labels: Vec<&str> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["n=1", "n=2", "n=3"]);
}

/// Run `writer`, which writes into its input `each` (= `input`) while `reader` reads the same
/// (each waits for the other, 30 s at most, so both are running when it changes), and return
/// the two failures' reasons.
fn writer_beside_reader(sweep: &str, value: &str, input: &str) -> (String, String) {
    let p = Project::new();
    let wait = |file: &str| {
        format!(
            "i=0; while [ ! -e \\\"$NEEDLE_RECIPE_DIR/{file}\\\" ] && [ $i -lt 1500 ]; do sleep 0.02; i=$((i+1)); done"
        )
    };
    p.write(
        "recipe.toml",
        &format!(
            r#"
[recipe]
name = "shared"
{sweep}
[steps.each]
op = "exec"
cmd = ["sh", "-c", "echo {value} > \"$NEEDLE_OUT/n\""]

[steps.writer]
op = "exec"
cmd = ["sh", "-c", "{}; chmod u+w \"$NEEDLE_IN_EACH\"; touch \"$NEEDLE_IN_EACH/extra\" \"$NEEDLE_RECIPE_DIR/written\""]
inputs = {{ each = "{input}" }}

[steps.reader]
op = "exec"
cmd = ["sh", "-c", "touch \"$NEEDLE_RECIPE_DIR/reading\"; {}; cat \"$NEEDLE_IN_EACH\"/* > \"$NEEDLE_OUT/n\""]
inputs = {{ each = "{input}" }}
"#,
            wait("reading"),
            wait("written")
        ),
    );
    let run = p.json(&["run", "recipe.toml", "-j", "2"], 1);
    assert_eq!(run["failed"], 2, "{run}");
    let status = p.json(&["status", "last"], 0);
    let detail = |step: &str| steps_named(&status, step)[0]["detail"].to_string();
    (detail("writer"), detail("reader"))
}

#[test]
fn two_steps_reading_one_input_when_it_changes_each_name_the_other() {
    // A gather, and a plain input's view: which check ran first decides the words, not who
    // is named.
    for (sweep, value, input) in [
        ("\n[sweep]\nn = [1, 2]\n", "${n}", "each[*]"),
        ("", "1", "each"),
    ] {
        let (writer, reader) = writer_beside_reader(sweep, value, input);
        assert!(writer.contains("`reader`"), "{writer}");
        assert!(reader.contains("`writer`"), "{reader}");
        for said in [&writer, &reader] {
            assert!(said.contains("either may have changed it"), "{said}");
        }
    }
}

#[test]
fn gathers_are_made_once_read_only_and_made_again_after_a_step_changes_one() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "gathers"

[sweep]
n = [1, 2]

[steps.each]
op = "exec"
cmd = ["sh", "-c", "echo ${n} > \"$NEEDLE_OUT/n\""]

[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo \"$NEEDLE_IN_EACH\" > \"$NEEDLE_OUT/dir\"; cat \"$NEEDLE_IN_EACH\"/*/n > \"$NEEDLE_OUT/n\""]
inputs = { each = "each[*]" }

[steps.b]
op = "exec"
cmd = ["sh", "b.sh"]
code = ["b.sh"]
inputs = { each = "each[*]" }
"#,
    );
    let reads = "echo \"$NEEDLE_IN_EACH\" > \"$NEEDLE_OUT/dir\"\ncat \"$NEEDLE_IN_EACH\"/*/n > \"$NEEDLE_OUT/n\"\n";
    p.write("b.sh", reads);
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 4);
    let read = |step: &str, file: &str| {
        let view = output_view(&p, &p.json(&["status", "last"], 0), step);
        std::fs::read_to_string(view.join(file)).unwrap()
    };
    // Both steps read the same members: one directory, in the store, read-only.
    let dir = read("a", "dir").trim().to_string();
    assert_eq!(read("b", "dir").trim(), dir);
    let dir = std::path::PathBuf::from(dir);
    assert_eq!(dir.parent().unwrap(), p.store().join("views"));
    assert!(
        dir.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("gather-"),
        "{}",
        dir.display()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o555
    );
    let link = std::fs::read_link(dir.join("n=1")).unwrap();
    assert!(link.is_relative(), "{}", link.display());
    assert_eq!(read("a", "n"), "1\n2\n");

    // A step that writes into it, and through it into a member, fails; the directory goes,
    // and so does the member's damaged blob.
    p.write(
        "b.sh",
        &format!(
            "chmod u+w \"$NEEDLE_IN_EACH\" \"$NEEDLE_IN_EACH/n=1/n\"\n\
             touch \"$NEEDLE_IN_EACH/extra\"\necho 9 >> \"$NEEDLE_IN_EACH/n=1/n\"\n{reads}"
        ),
    );
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 1);
    let err = stderr(&out);
    for said in [
        "changed `n` in its input `each[n=1]`",
        "the blob was dropped",
        "it changed its input `each`, the directory of its gathered members",
    ] {
        assert!(err.contains(said), "`{said}` not in:\n{err}");
    }
    assert!(!dir.exists(), "the changed gather is removed");

    // The next step to read those members gets it back, whole.
    p.write("b.sh", &format!("# again\n{reads}"));
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(
        run["executed"], 2,
        "each[n=1], whose blob was dropped, and b: {run}"
    );
    assert!(dir.join("index.json").is_file());
    assert!(!dir.join("extra").exists());
    assert_eq!(read("b", "n"), "1\n2\n");
}

/// A sampled sweep of `n` arms: each arm's step appends its draws to ran.txt.
fn sampled_recipe(n: usize) -> String {
    format!(
        r#"
[recipe]
name = "sampled"

[sweep.random]
n = {n}
seed = 3
lr = {{ log_uniform = [1e-4, 1e-1] }}
width = {{ int = [1, 1000000] }}

[steps.train]
op = "exec"
cmd = ["sh", "-c", "echo ${{lr}} ${{width}} >> \"$NEEDLE_RECIPE_DIR/ran.txt\"; echo ${{lr}} > \"$NEEDLE_OUT/lr\""]
"#
    )
}

#[test]
fn more_sampled_arms_run_only_the_new_ones() {
    let p = Project::new();
    p.write("recipe.toml", &sampled_recipe(4));
    let first = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(first["executed"], 4);
    let ran = p.lines("ran.txt");
    assert_eq!(ran.len(), 4);

    // Six arms drawn with the same seed: the first four are the arms already run.
    p.write("recipe.toml", &sampled_recipe(6));
    let plan = p.json(&["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["arms"], 6);
    assert_eq!(plan["summary"]["cached"], 4);
    let second = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(second["executed"], 2);
    assert_eq!(second["cached"], 4);
    let all = p.lines("ran.txt");
    assert_eq!(all.len(), 6, "a cached arm never executes again");
    assert_eq!(all[..4], ran[..]);
    let mut distinct = all.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 6, "six different draws: {all:?}");
}
