//! Recipe diagnostics: one recipe per kind of error, snapshotted as `render_plain` prints
//! them. Each snapshot's description holds the recipe, so its `line:col`s can be checked by eye.

use std::path::PathBuf;

mod common;

use common::catalog;
use needle_core::recipe::{RecipeErrors, RecipeSource, SetArg, expand, parse};
use serde_json::json;

fn source(text: &str) -> RecipeSource {
    RecipeSource {
        path: PathBuf::from("recipes/demo.toml"),
        // `code` paths resolve against the crate: `src/lib.rs` exists, `gen.py` does not.
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        text: text.to_string(),
    }
}

/// The errors of parsing, or of expanding when parsing succeeds.
fn errors_with(text: &str, sets: &[&str]) -> RecipeErrors {
    let sets: Vec<SetArg> = sets.iter().map(|s| s.parse().unwrap()).collect();
    let catalog = catalog();
    match parse(source(text), &sets, &catalog) {
        Err(e) => e,
        Ok(recipe) => match expand(&recipe, &catalog) {
            Err(e) => e,
            Ok(_) => panic!("expected errors from:\n{text}"),
        },
    }
}

/// Snapshot the plain rendering of a recipe's errors under the recipe itself, numbered, so
/// that each `line:col` can be checked by eye.
macro_rules! check {
    ($text:expr) => {
        check!($text, &[])
    };
    ($text:expr, $sets:expr) => {{
        let text: &str = $text;
        let sets: &[&str] = $sets;
        let errors = errors_with(text, sets);
        let mut shown = String::new();
        for set in sets {
            shown.push_str(&format!("--set {set}\n"));
        }
        for (i, line) in text.lines().enumerate() {
            shown.push_str(&format!("{:>3} | {line}\n", i + 1));
        }
        shown.push_str("\n");
        shown.push_str(&errors.render_plain());
        insta::with_settings!({ omit_expression => true }, {
            insta::assert_snapshot!(shown);
        });
        errors
    }};
}

#[test]
fn toml_syntax_errors_are_all_reported() {
    check!(
        r#"[recipe]
name = "t"
broken = 
[steps.a]
op = "exec
cmd = ["x"]
"#
    );
}

#[test]
fn duplicate_key() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x"]
op = "exec"
"#
    );
}

#[test]
fn non_finite_float() {
    check!(
        r#"[recipe]
name = "t"

[vars]
lr = nan

[steps.a]
op = "exec"
cmd = ["x", "${lr}"]
params = { scale = -inf }
"#
    );
}

#[test]
fn unknown_top_level_tables() {
    check!(
        r#"name = "t"

[recipe]
name = "t"
descripton = "x"

[step.a]
op = "exec"

[steps.a]
op = "exec"
cmd = ["x"]
"#
    );
}

#[test]
fn missing_recipe_and_no_steps() {
    check!(
        r#"[vars]
x = 1
"#
    );
}

#[test]
fn recipe_without_name_and_empty_steps() {
    check!(
        r#"[recipe]
description = "no name"

[steps]
"#
    );
}

#[test]
fn unknown_step_key() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x"]
parmas = { n = 1 }
retry = 2
"#
    );
}

#[test]
fn invalid_step_name() {
    check!(
        r#"[recipe]
name = "t"

[steps."a b"]
op = "exec"
cmd = ["x"]
"#
    );
}

#[test]
fn missing_and_unknown_op() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
cmd = ["x"]

[steps.b]
op = "trian"

[steps.c]
op = "frobnicate"
"#
    );
}

#[test]
fn exec_fields() {
    check!(
        r#"[recipe]
name = "t"

[steps.data]
op = "exec"

[steps.shell]
op = "exec"
cmd = "python3 gen.py"

[steps.mixed]
op = "exec"
cmd = ["python3", 3]

[steps.fit]
op = "train"
inputs = { data = "data" }
params = { steps = 1 }
cmd = ["python3"]
code = ["src/lib.rs"]
"#
    );
}

#[test]
fn unknown_param() {
    check!(
        r#"[recipe]
name = "t"

[steps.data]
op = "exec"
cmd = ["x"]

[steps.fit]
op = "train"
inputs = { data = "data" }
params = { steps = 1, lrate = 0.1, colour = "red" }
"#
    );
}

#[test]
fn missing_param() {
    check!(
        r#"[recipe]
name = "t"

[steps.data]
op = "exec"
cmd = ["x"]

[steps.fit]
op = "train"
inputs = { data = "data" }
params = { lr = 0.1 }
"#
    );
}

#[test]
fn param_type_mismatch() {
    check!(
        r#"[recipe]
name = "t"

[steps.data]
op = "exec"
cmd = ["x"]

[steps.fit]
op = "train"
inputs = { data = "data" }
params = { steps = "x", lr = "fast", arch = "c" }
"#
    );
}

#[test]
fn param_type_mismatch_after_substitution() {
    check!(
        r#"[recipe]
name = "t"

[vars]
lr = "fast"

[sweep]
arch = ["a", "b", "x", "y"]

[steps.data]
op = "exec"
cmd = ["x"]

[steps.fit]
op = "train"
inputs = { data = "data" }
params = { steps = 10, arch = "${arch}", lr = "${lr}" }
"#
    );
}

#[test]
fn inputs_against_schema() {
    check!(
        r#"[recipe]
name = "t"

[steps.data]
op = "exec"
cmd = ["x"]

[steps.fit]
op = "train"
params = { steps = 1 }
inputs = { dat = "data" }

[steps.bad]
op = "exec"
cmd = ["x"]
inputs = { a = 3, b = "x[0]" }
"#
    );
}

#[test]
fn unknown_input_step() {
    check!(
        r#"[recipe]
name = "t"

[steps.haystack]
op = "exec"
cmd = ["x"]

[steps.fit]
op = "train"
params = { steps = 1 }
inputs = { data = "haystak" }

[steps.report]
op = "exec"
cmd = ["x"]
inputs = { all = "evaluate[*]" }
"#
    );
}

#[test]
fn step_reading_itself() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x"]
inputs = { prev = "a" }
"#
    );
}

#[test]
fn cycle() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x"]
inputs = { x = "c" }

[steps.b]
op = "exec"
cmd = ["x"]
inputs = { x = "a" }

[steps.c]
op = "exec"
cmd = ["x"]
inputs = { x = "b[*]" }

[steps.d]
op = "exec"
cmd = ["x"]
inputs = { x = "c" }
"#
    );
}

#[test]
fn undefined_var() {
    check!(
        r#"[recipe]
name = "t"

[vars]
lr_ = 0.1

[steps.a]
op = "exec"
cmd = ["x", "--lr=${lr}", "${seed}"]
params = { nested = { deep = ["${lr}"] } }
"#
    );
}

#[test]
fn unused_sweep_var() {
    check!(
        r#"[recipe]
name = "t"

[sweep]
arch = ["a", "b"]
seed = [1, 2]
[[sweep.zip]]
lr = [0.1, 0.2]
steps = [1, 2]
[[sweep.exclude]]
seed = 2

[steps.a]
op = "exec"
cmd = ["x", "${arch}", "${lr}"]
"#
    );
}

#[test]
fn malformed_templates() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x", "${n", "${}", "${1st}", "${a.b}"]
"#
    );
}

#[test]
fn vars_not_allowed() {
    check!(
        r#"[recipe]
name = "t"

[vars]
n = 1
step = "a"

[steps.a]
op = "exec"
cmd = ["x"]

[steps.b]
op = "${step}"
cmd = ["x"]
inputs = { x = "${step}" }
resources = { gpus = "${n}" }
retries = { count = "${n}" }
timeout = "${n}m"
code = ["${step}.py"]
"#
    );
}

#[test]
fn code_paths() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x"]
code = ["src/lib.rs", "./src/../Cargo.toml", "/etc/passwd", "../x", "src/../../y", "gen.py", 3]
"#
    );
}

#[test]
fn resources_retries_timeout() {
    check!(
        r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x"]
resources = { gpus = -1, cpus = 1.5, mem_gb = "4G", gpu = 1 }
retries = { count = 2, backof = "1s" }
timeout = "10 minutes please"

[steps.b]
op = "exec"
cmd = ["x"]
retries = "twice"
timeout = 0

[steps.c]
op = "exec"
cmd = ["x"]
retries = { backoff = "soon" }
"#
    );
}

#[test]
fn sweep_shapes() {
    check!(
        r#"[recipe]
name = "t"

[sweep]
arch = "a"
size = []
lr = [0.1, 0.2]
[[sweep.zip]]
lr = [0.1, 0.2]
steps = [1, 2, 3]
[[sweep.zip]]
seed = [1, 2]
size2 = [1, 2, 3]
[[sweep.exclude]]
colour = "red"
[[sweep.exclude]]
[[sweep.include]]
lr = 0.5
arc = "a"

[steps.a]
op = "exec"
cmd = ["x", "${arch}", "${size}", "${lr}", "${steps}", "${seed}", "${size2}"]
"#
    );
}

#[test]
fn reserved_names() {
    check!(
        r#"[recipe]
name = "t"

[vars]
zip = 1

[sweep]
include = [1, 2]

[sweep.exclude]
a = 1

[steps.a]
op = "exec"
cmd = ["x"]
"#
    );
}

#[test]
fn set_of_an_unknown_var() {
    check!(
        r#"[recipe]
name = "t"

[vars]
arch = "a"

[steps.a]
op = "exec"
cmd = ["x", "${arch}"]
"#,
        &["arc=b", "seed=3"]
    );
}

#[test]
fn set_pinning_a_zip_to_a_missing_row() {
    check!(
        r#"[recipe]
name = "t"

[sweep]
[[sweep.zip]]
lr = [0.1, 0.2]
steps = [1, 2]

[steps.a]
op = "exec"
cmd = ["x", "${lr}", "${steps}"]
"#,
        &["lr=0.3"]
    );
}

#[test]
fn every_arm_excluded() {
    check!(
        r#"[recipe]
name = "t"

[sweep]
arch = ["a"]
[[sweep.exclude]]
arch = "a"

[steps.a]
op = "exec"
cmd = ["x", "${arch}"]
"#
    );
}

#[test]
fn too_many_arms() {
    let values: Vec<String> = (0..400).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let text = format!(
        "[recipe]\nname = \"t\"\n\n[sweep]\na = [{list}]\nb = [{list}]\n\n[steps.a]\nop = \"exec\"\ncmd = [\"x\", \"${{a}}\", \"${{b}}\"]\n"
    );
    let errors = errors_with(&text, &[]);
    insta::assert_snapshot!(errors.render_plain());
}

#[test]
fn sampled_distributions() {
    // One line per way a distribution can be wrong; every one is reported.
    let errors = check!(
        r#"[recipe]
name = "t"

[sweep.random]
n = 8
seed = 1
a = { logunif = [1e-5, 1e-2] }
b = { uniform = [0.5] }
c = { uniform = [0.3, 0.1] }
d = { log_uniform = [0, 1e-2] }
e = { int = [2, 8.5] }
f = { choice = [] }
g = [1, 2]
h = 0.5
i = { uniform = [0, 1], int = [0, 1] }
j = { uniform = ["0", 1] }
k = { choice = 3 }

[steps.s]
op = "exec"
cmd = ["x", "${a}", "${b}", "${c}", "${d}", "${e}", "${f}", "${g}", "${h}", "${i}", "${j}", "${k}"]
"#
    );
    assert_eq!(errors.errors.len(), 11, "{}", errors.render_plain());
}

#[test]
fn sampled_table_shape() {
    // No `n`, no `seed`, a var swept in the grid too, one no step uses, a second table.
    check!(
        r#"[recipe]
name = "t"

[sweep]
lr = [0.1, 0.2]

[sweep.random]
lr = { uniform = [0.0, 1.0] }
unused = { int = [1, 3] }

[sweep.sobol]
n = 4
seed = 1
wd = { uniform = [0.0, 0.1] }

[steps.s]
op = "exec"
cmd = ["x", "${lr}", "${wd}"]
"#
    );
}

#[test]
fn sampled_arm_count_and_seed() {
    check!(
        r#"[recipe]
name = "t"

[sweep.sobol]
n = 100000
seed = -1
lr = { uniform = [0.0, 1.0] }

[sweep.rnadom]
wd = { uniform = [0.0, 0.1] }

[steps.s]
op = "exec"
cmd = ["x", "${lr}", "${wd}"]
"#
    );
    check!(
        r#"[recipe]
name = "t"

[sweep.random]
n = 0
seed = "7"
lr = { uniform = [0.0, 1.0] }

[steps.s]
op = "exec"
cmd = ["x", "${lr}"]
"#
    );
    // `n` and `seed` set the table: they cannot name a sampled var.
    check!(
        r#"[recipe]
name = "t"

[sweep.random]
n = 4
seed = { int = [0, 9] }

[steps.s]
op = "exec"
cmd = ["x", "${seed}"]
"#
    );
}

#[test]
fn sampled_values_against_param_types() {
    // Draws are checked against the op's param types as grid values are.
    check!(
        r#"[recipe]
name = "t"

[sweep.random]
n = 4
seed = 0
steps = { uniform = [10, 100] }

[steps.gen]
op = "exec"
cmd = ["gen"]

[steps.fit]
op = "train"
inputs = { data = "gen" }
params = { steps = "${steps}" }
"#
    );
}

#[test]
fn sampled_sweeps_past_their_limits() {
    let values: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let text = format!(
        "[recipe]\nname = \"t\"\n\n[sweep]\na = [{}]\n\n[sweep.random]\nn = 10000\nseed = 0\nb = {{ uniform = [0, 1] }}\n\n[steps.a]\nop = \"exec\"\ncmd = [\"x\", \"${{a}}\", \"${{b}}\"]\n",
        values.join(", ")
    );
    let errors = errors_with(&text, &[]);
    insta::assert_snapshot!(errors.render_plain());
    let vars: String = (0..30)
        .map(|i| format!("v{i} = {{ int = [0, 9] }}\n"))
        .collect();
    let refs: Vec<String> = (0..30).map(|i| format!("\"${{v{i}}}\"")).collect();
    let text = format!(
        "[recipe]\nname = \"t\"\n\n[sweep.random]\nn = 100000\nseed = 0\n{vars}\n[steps.a]\nop = \"exec\"\ncmd = [\"x\", {}]\n",
        refs.join(", ")
    );
    let errors = errors_with(&text, &[]);
    insta::assert_snapshot!(errors.render_plain());
}

#[test]
fn every_error_of_a_file_is_collected() {
    let errors = check!(
        r#"[recipe]
name = "emu-mini"

[vars]
arch = "pixel"

[sweep]
qt_images = [100, 200]
unused = [1, 2]

[steps.haystack]
op = "exec"
cmd = ["python3", "gen.py", "--n", "${n}"]
code = ["gen.py"]

[steps.pretrain]
op = "train"
inputs = { data = "haystak" }
params = { arch = "${arch}", stepz = 10 }
resources = { gpus = 1, mem = 4 }

[steps.tune]
op = "trian"
inputs = { model = "pretrain" }
params = { images = "${qt_images}" }
"#
    );
    assert!(errors.errors.len() >= 7, "{}", errors.render_plain());
}

#[test]
fn json_and_graphical_renderings() {
    let text = r#"[recipe]
name = "t"

[steps.a]
op = "exec"
cmd = ["x", "${nope}"]
"#;
    let errors = errors_with(text, &["zzz=1"]);
    assert_eq!(
        errors.to_json(),
        json!([
            {"message": "`--set zzz=1`: the recipe has no var `zzz`", "line": null, "col": null, "help": "the recipe's vars are `nope`"},
            {"message": "undefined var `nope`", "line": 6, "col": 14, "help": "define it in `[vars]` or sweep it in `[sweep]`"},
        ])
    );
    let mut rendered = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut rendered, &errors)
        .unwrap();
    assert!(
        rendered.contains("recipes/demo.toml:6:14"),
        "no path:line:col in\n{rendered}"
    );
    assert!(rendered.contains("undefined var `nope`"), "{rendered}");
    insta::assert_snapshot!(rendered);
}
