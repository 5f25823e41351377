//! Sweep expansion: arms, instances, inputs and substituted params.

use std::collections::BTreeMap;
use std::path::PathBuf;

mod common;

use common::catalog;
use needle_core::recipe::{
    Expansion, GpuRequest, Instance, InstanceInput, Recipe, RecipeSource, SetArg, expand, parse,
};
use serde_json::{Value, json};

fn source(text: &str) -> RecipeSource {
    RecipeSource {
        path: PathBuf::from("recipe.toml"),
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        text: text.to_string(),
    }
}

fn parse_with(text: &str, sets: &[&str]) -> Recipe {
    let sets: Vec<SetArg> = sets.iter().map(|s| s.parse().unwrap()).collect();
    match parse(source(text), &sets, &catalog()) {
        Ok(r) => r,
        Err(e) => panic!("recipe did not parse:\n{}", e.render_plain()),
    }
}

fn expand_with(text: &str, sets: &[&str]) -> (Recipe, Expansion) {
    let recipe = parse_with(text, sets);
    match expand(&recipe, &catalog()) {
        Ok(x) => (recipe, x),
        Err(e) => panic!("recipe did not expand:\n{}", e.render_plain()),
    }
}

fn expand_text(text: &str) -> (Recipe, Expansion) {
    expand_with(text, &[])
}

/// The instances of one step, with their global indices.
fn of<'x>(r: &Recipe, x: &'x Expansion, step: &str) -> Vec<(usize, &'x Instance)> {
    let s = r.steps.iter().position(|st| st.name == step).unwrap();
    x.instances
        .iter()
        .enumerate()
        .filter(|(_, i)| i.step == s)
        .collect()
}

fn labels(x: &Expansion) -> Vec<String> {
    x.arms.iter().map(|a| a.label()).collect()
}

fn bindings(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

const HEADER: &str = "[recipe]\nname = \"t\"\n";

#[test]
fn no_sweep_is_one_default_arm() {
    let text = format!(
        r#"{HEADER}
[vars]
n = 3

[steps.gen]
op = "exec"
cmd = ["gen", "${{n}}"]

[steps.fit]
op = "train"
inputs = {{ data = "gen" }}
params = {{ steps = "${{n}}" }}
"#
    );
    let (r, x) = expand_text(&text);
    assert_eq!(x.arms.len(), 1);
    assert!(x.arms[0].bindings.is_empty());
    assert_eq!(x.arms[0].label(), "default");
    assert_eq!(x.instances.len(), 2);
    let fit = of(&r, &x, "fit");
    assert_eq!(fit[0].1.inputs["data"], InstanceInput::One(0));
    // Defaults filled in, ints widened to the float `lr` expects.
    assert_eq!(
        fit[0].1.params,
        bindings(&[
            ("steps", json!(3)),
            ("lr", json!(0.001)),
            ("arch", json!("a"))
        ])
    );
    assert_eq!(x.instances[0].cmd, Some(vec!["gen".into(), "3".into()]));
    assert_eq!(x.instances[0].arms, vec![0]);
}

const PRODUCT: &str = r#"
[sweep]
arch = ["a", "b"]
size = [1, 2, 3]

[steps.data]
op = "exec"
cmd = ["gen"]

[steps.fit]
op = "exec"
cmd = ["fit", "${arch}"]
inputs = { data = "data" }

[steps.eval]
op = "exec"
cmd = ["eval", "--size=${size}"]
inputs = { model = "fit" }
"#;

#[test]
fn product_in_declaration_order() {
    let (r, x) = expand_text(&format!("{HEADER}{PRODUCT}"));
    assert_eq!(
        labels(&x),
        [
            "arch=a,size=1",
            "arch=a,size=2",
            "arch=a,size=3",
            "arch=b,size=1",
            "arch=b,size=2",
            "arch=b,size=3"
        ]
    );
    // The shared root runs once for every arm.
    let data = of(&r, &x, "data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0].1.arms, (0..6).collect::<Vec<u32>>());
    assert!(data[0].1.bindings.is_empty());

    let fit = of(&r, &x, "fit");
    assert_eq!(fit.len(), 2);
    assert_eq!(fit[0].1.bindings, bindings(&[("arch", json!("a"))]));
    assert_eq!(fit[0].1.arms, vec![0, 1, 2]);
    assert_eq!(fit[1].1.arms, vec![3, 4, 5]);
    for (_, f) in &fit {
        assert_eq!(f.inputs["data"], InstanceInput::One(data[0].0));
    }

    // eval depends on size directly and on arch through its input.
    let eval = of(&r, &x, "eval");
    assert_eq!(eval.len(), 6);
    assert_eq!(
        eval[4].1.bindings,
        bindings(&[("arch", json!("b")), ("size", json!(2))])
    );
    assert_eq!(eval[4].1.inputs["model"], InstanceInput::One(fit[1].0));
    assert_eq!(
        eval[4].1.cmd,
        Some(vec!["eval".to_string(), "--size=2".to_string()])
    );
}

#[test]
fn zip_is_one_axis() {
    let text = format!(
        r#"{HEADER}
[sweep]
arch = ["a", "b"]
[[sweep.zip]]
lr = [0.1, 0.01]
steps = [100, 200]

[steps.data]
op = "exec"
cmd = ["gen"]

[steps.fit]
op = "train"
inputs = {{ data = "data" }}
params = {{ arch = "${{arch}}", lr = "${{lr}}", steps = "${{steps}}" }}
"#
    );
    let (r, x) = expand_text(&text);
    assert_eq!(
        labels(&x),
        [
            "arch=a,lr=0.1,steps=100",
            "arch=a,lr=0.01,steps=200",
            "arch=b,lr=0.1,steps=100",
            "arch=b,lr=0.01,steps=200"
        ]
    );
    let fit = of(&r, &x, "fit");
    assert_eq!(fit.len(), 4);
    assert_eq!(
        fit[3].1.params,
        bindings(&[
            ("arch", json!("b")),
            ("lr", json!(0.01)),
            ("steps", json!(200))
        ])
    );
}

#[test]
fn exclude_and_include() {
    let text = format!(
        r#"{HEADER}
[vars]
size = 2

[sweep]
arch = ["a", "b"]
size = [1, 3]
[[sweep.exclude]]
arch = "b"
size = 3
[[sweep.include]]
arch = "c"
[[sweep.include]]
arch = "a"
size = 1

[steps.eval]
op = "exec"
cmd = ["eval", "${{arch}}", "${{size}}"]
"#
    );
    let (_, x) = expand_text(&text);
    // `b,3` excluded; `c` takes the `[vars]` default of `size`; the second include is an
    // existing arm and is not repeated.
    assert_eq!(
        labels(&x),
        [
            "arch=a,size=1",
            "arch=a,size=3",
            "arch=b,size=1",
            "arch=c,size=2"
        ]
    );
    assert_eq!(x.instances.len(), 4);
}

#[test]
fn include_without_vars_default_takes_first_value() {
    let text = format!(
        r#"{HEADER}
[sweep]
arch = ["a", "b"]
size = [5, 7]
[[sweep.include]]
arch = "z"

[steps.eval]
op = "exec"
cmd = ["eval", "${{arch}}", "${{size}}"]
"#
    );
    let (_, x) = expand_text(&text);
    assert_eq!(x.arms.last().unwrap().label(), "arch=z,size=5");
}

const SETS: &str = r#"
[vars]
n = 10

[sweep]
arch = ["a", "b"]
size = [1, 2]
[[sweep.include]]
arch = "c"
size = 9

[steps.eval]
op = "exec"
cmd = ["eval", "${arch}", "${size}", "${n}"]
"#;

#[test]
fn set_overrides_a_default() {
    let (_, x) = expand_with(&format!("{HEADER}{SETS}"), &["n=42"]);
    assert_eq!(x.arms.len(), 5);
    assert_eq!(x.instances[0].cmd.as_ref().unwrap()[3], "42");
}

#[test]
fn set_defines_a_referenced_var() {
    let text = format!(
        r#"{HEADER}
[steps.run]
op = "exec"
cmd = ["run", "--seed", "${{seed}}"]
"#
    );
    let (r, x) = expand_with(&text, &["seed=7"]);
    assert_eq!(r.vars["seed"], json!(7));
    assert_eq!(x.instances[0].cmd.as_ref().unwrap()[2], "7");
}

#[test]
fn set_pins_a_swept_var() {
    let (r, x) = expand_with(&format!("{HEADER}{SETS}"), &["arch=b"]);
    // The include with `arch = "c"` is dropped too.
    assert_eq!(labels(&x), ["arch=b,size=1", "arch=b,size=2"]);
    assert_eq!(r.vars["arch"], json!("b"));

    // A value outside the list replaces it.
    let (_, x) = expand_with(&format!("{HEADER}{SETS}"), &["size=7"]);
    assert_eq!(labels(&x), ["arch=a,size=7", "arch=b,size=7"]);

    // Pinning a var to the include's value keeps the include.
    let (_, x) = expand_with(&format!("{HEADER}{SETS}"), &["size=9", "arch=c"]);
    assert_eq!(labels(&x), ["arch=c,size=9"]);
}

#[test]
fn set_pins_a_zipped_group() {
    let text = format!(
        r#"{HEADER}
[sweep]
[[sweep.zip]]
lr = [0.1, 0.01, 0.001]
steps = [100, 200, 300]

[steps.fit]
op = "exec"
cmd = ["fit", "${{lr}}", "${{steps}}"]
"#
    );
    let (_, x) = expand_with(&text, &["steps=200"]);
    assert_eq!(labels(&x), ["lr=0.01,steps=200"]);
}

#[test]
fn gather_agrees_on_shared_vars() {
    let text = format!(
        r#"{HEADER}{PRODUCT}
[steps.summary]
op = "exec"
cmd = ["summarize", "${{arch}}"]
inputs = {{ evals = "eval[*]" }}

[steps.report]
op = "exec"
cmd = ["report"]
inputs = {{ all = "eval[*]", per_arch = "summary[*]" }}
"#
    );
    let (r, x) = expand_text(&text);
    let eval = of(&r, &x, "eval");
    let summary = of(&r, &x, "summary");
    assert_eq!(summary.len(), 2);
    for (k, (_, s)) in summary.iter().enumerate() {
        let arch = if k == 0 { "a" } else { "b" };
        assert_eq!(s.bindings, bindings(&[("arch", json!(arch))]));
        let expected: Vec<usize> = eval[3 * k..3 * k + 3].iter().map(|(i, _)| *i).collect();
        assert_eq!(s.inputs["evals"], InstanceInput::Gather(expected));
        assert_eq!(s.arms.len(), 3);
    }
    let report = of(&r, &x, "report");
    assert_eq!(report.len(), 1);
    assert_eq!(
        report[0].1.inputs["all"],
        InstanceInput::Gather(eval.iter().map(|(i, _)| *i).collect())
    );
    assert_eq!(
        report[0].1.inputs["per_arch"],
        InstanceInput::Gather(summary.iter().map(|(i, _)| *i).collect())
    );
}

#[test]
fn instances_are_topologically_ordered() {
    let text = format!(
        r#"{HEADER}
[sweep]
k = [1, 2]

[steps.last]
op = "exec"
cmd = ["c"]
inputs = {{ x = "middle" }}

[steps.middle]
op = "exec"
cmd = ["b", "${{k}}"]
inputs = {{ x = "first" }}

[steps.first]
op = "exec"
cmd = ["a"]

[steps.other]
op = "exec"
cmd = ["d"]
"#
    );
    let (r, x) = expand_text(&text);
    let order: Vec<&str> = x
        .instances
        .iter()
        .map(|i| r.steps[i.step].name.as_str())
        .collect();
    // Among steps that are ready together, the earlier in the file goes first.
    assert_eq!(
        order,
        ["first", "middle", "middle", "last", "last", "other"]
    );
    for (i, inst) in x.instances.iter().enumerate() {
        for input in inst.inputs.values() {
            assert!(input.indices().iter().all(|&j| j < i));
        }
    }
}

#[test]
fn whole_string_var_keeps_its_type() {
    let text = format!(
        r#"{HEADER}
[vars]
n = 3
lr = 1
sizes = [16, 32]
name = "x"
opts = {{ a = 1 }}

[steps.data]
op = "exec"
cmd = ["gen"]
params = {{ n = "${{n}}", sizes = "${{sizes}}", opts = "${{opts}}", nested = ["${{n}}", {{ deep = "${{name}}" }}] }}

[steps.fit]
op = "train"
inputs = {{ data = "data" }}
params = {{ steps = "${{n}}", lr = "${{lr}}" }}
"#
    );
    let (r, x) = expand_text(&text);
    let data = &of(&r, &x, "data")[0].1.params;
    assert_eq!(data["n"], json!(3));
    assert_eq!(data["sizes"], json!([16, 32]));
    assert_eq!(data["opts"], json!({"a": 1}));
    assert_eq!(data["nested"], json!([3, {"deep": "x"}]));
    // The op's schema widens the int `lr` to a float.
    let fit = &of(&r, &x, "fit")[0].1.params;
    assert_eq!(fit["lr"], json!(1.0));
    assert!(fit["lr"].is_f64());
    assert_eq!(fit["steps"], json!(3));
}

#[test]
fn interpolation_and_escapes() {
    let text = format!(
        r#"{HEADER}
[vars]
n = 3
lr = 0.5
sizes = [1, 2]
flag = true

[steps.run]
op = "exec"
cmd = ["run", "--n=${{n}}", "--lr ${{lr}}", "${{sizes}}", "x${{flag}}", "$${{n}}", "cost $5", "${{n}}"]
params = {{ tag = "n${{n}}-lr${{lr}}", literal = "$${{HOME}}" }}
"#
    );
    let (_, x) = expand_text(&text);
    let run = &x.instances[0];
    assert_eq!(
        run.cmd.as_ref().unwrap(),
        &[
            "run", "--n=3", "--lr 0.5", "[1,2]", "xtrue", "${n}", "cost $5", "3"
        ]
    );
    assert_eq!(run.params["tag"], json!("n3-lr0.5"));
    assert_eq!(run.params["literal"], json!("${HOME}"));
}

#[test]
fn arm_ids_are_stable() {
    let one = format!("{HEADER}{PRODUCT}");
    // The same arms declared in another order, with a different step layout.
    let two = format!(
        r#"{HEADER}
[sweep]
size = [3, 2, 1]
arch = ["b", "a"]

[steps.all]
op = "exec"
cmd = ["x", "${{size}}", "${{arch}}"]
"#
    );
    let (_, x1) = expand_text(&one);
    let (_, x2) = expand_text(&two);
    let ids = |x: &Expansion| -> BTreeMap<String, String> {
        x.arms.iter().map(|a| (a.label(), a.id.clone())).collect()
    };
    assert_eq!(ids(&x1), ids(&x2));
    let id = &ids(&x1)["arch=a,size=1"];
    assert_eq!(id.len(), 8);
    // Pinned: arm ids name results across runs, so this must never change.
    let expected = blake3::hash(br#"{"arch":"a","size":1}"#).to_hex()[..8].to_string();
    assert_eq!(id, &expected);
    assert_eq!(id, "346fa86c");
}

/// A root, four chained steps swept over 2,500 arms, and a final gather: the shape of the
/// expansion benchmark.
fn big_recipe(arms: usize) -> String {
    let values: Vec<String> = (0..arms).map(|i| i.to_string()).collect();
    let mut text = format!(
        "{HEADER}\n[sweep]\narm = [{}]\n\n[steps.root]\nop = \"exec\"\ncmd = [\"root\"]\n",
        values.join(", ")
    );
    let chain = ["first", "second", "third", "last"];
    for (i, name) in chain.iter().enumerate() {
        let upstream = if i == 0 { "root" } else { chain[i - 1] };
        let arg = if i == 0 { "${arm}" } else { "x" };
        text.push_str(&format!(
            "\n[steps.{name}]\nop = \"exec\"\ncmd = [\"{name}\", \"{arg}\"]\ninputs = {{ up = \"{upstream}\" }}\n"
        ));
    }
    text.push_str(
        "\n[steps.final]\nop = \"exec\"\ncmd = [\"final\"]\ninputs = { all = \"last[*]\" }\n",
    );
    text
}

#[test]
fn large_sweep_counts() {
    let started = std::time::Instant::now();
    let (r, x) = expand_text(&big_recipe(2500));
    eprintln!("parse+expand of 2500 arms: {:?}", started.elapsed());
    assert_eq!(x.arms.len(), 2500);
    assert_eq!(of(&r, &x, "root").len(), 1);
    for step in ["first", "second", "third", "last"] {
        assert_eq!(of(&r, &x, step).len(), 2500, "{step}");
    }
    let last = of(&r, &x, "last");
    let fin = of(&r, &x, "final");
    assert_eq!(fin.len(), 1);
    assert_eq!(
        fin[0].1.inputs["all"],
        InstanceInput::Gather(last.iter().map(|(i, _)| *i).collect())
    );
    assert_eq!(fin[0].1.arms.len(), 2500);
    assert_eq!(x.instances.len(), 1 + 4 * 2500 + 1);
}

#[test]
fn step_fields_are_parsed() {
    let text = format!(
        r#"{HEADER}description = "all the fields"

[vars]
n = 3

[steps.gen]
op = "exec"
cmd = ["python3", "src/gen.py", "--n", "${{n}}"]
code = ["./src/../src/lib.rs", "src/", "src"]
params = {{ images = 20000, seed = 1 }}
resources = {{ gpus = 1, cpus = 2, mem_gb = 4.5 }}
retries = {{ count = 2, backoff = "500ms" }}
timeout = "10m"

[steps.fit]
op = "train"
inputs = {{ data = "gen" }}
params = {{ steps = 5 }}
resources = {{ mem_gb = 8 }}
retries = 3
timeout = 90
"#
    );
    let r = parse_with(&text, &[]);
    assert_eq!(r.name, "t");
    assert_eq!(r.description.as_deref(), Some("all the fields"));
    let gen_step = &r.steps[0];
    assert_eq!(gen_step.op, "exec");
    assert_eq!(gen_step.code, ["src/lib.rs", "src"]);
    assert_eq!(
        gen_step.resources.gpus,
        GpuRequest::Whole {
            count: 1,
            mem_gb: None
        }
    );
    assert_eq!(gen_step.resources.cpus, 2);
    assert_eq!(gen_step.resources.mem_gb, 4.5);
    assert_eq!(gen_step.retries.count, 2);
    assert_eq!(
        gen_step.retries.backoff,
        std::time::Duration::from_millis(500)
    );
    assert_eq!(gen_step.timeout, Some(std::time::Duration::from_secs(600)));
    assert_eq!(gen_step.vars_used.iter().collect::<Vec<_>>(), ["n"]);
    assert_eq!(
        gen_step.params,
        bindings(&[("images", json!(20000)), ("seed", json!(1))])
    );
    let at = gen_step.param_spans["images"].clone();
    assert_eq!(&text[at], "20000");
    assert!(text[gen_step.span.clone()].starts_with("[steps.gen]"));

    let fit = &r.steps[1];
    assert_eq!(fit.op_version, 3);
    assert_eq!(fit.resources.gpus, GpuRequest::None);
    assert_eq!(fit.resources.cpus, 1);
    assert_eq!(fit.resources.mem_gb, 8.0);
    assert_eq!(fit.retries.count, 3);
    assert_eq!(fit.retries.backoff, std::time::Duration::from_secs(1));
    assert_eq!(fit.timeout, Some(std::time::Duration::from_secs(90)));
    assert_eq!(fit.inputs["data"].step, "gen");
    assert!(!fit.inputs["data"].gather);
    assert!(fit.vars_used.is_empty());
}

#[test]
fn gpu_requests_whole_shares_and_memory() {
    let step = |resources: &str| {
        let text = format!(
            "[recipe]\nname = \"t\"\n[steps.a]\nop = \"exec\"\ncmd = [\"true\"]\nresources = {resources}\n"
        );
        let r = parse_with(&text, &[]);
        let span = r.steps[0].resource_spans.get("gpu_mem_gb").cloned();
        (r.steps[0].resources.gpus, span.map(|s| text[s].to_string()))
    };
    assert_eq!(step("{ gpus = 0 }").0, GpuRequest::None);
    assert_eq!(step("{ cpus = 2 }").0, GpuRequest::None);
    assert_eq!(
        step("{ gpus = 2.0 }").0,
        GpuRequest::Whole {
            count: 2,
            mem_gb: None
        }
    );
    assert_eq!(
        step("{ gpus = 0.25 }").0,
        GpuRequest::Part {
            share: Some(0.25),
            mem_gb: None
        }
    );
    let (gpus, span) = step("{ gpus = 0.5, gpu_mem_gb = 6 }");
    assert_eq!(
        gpus,
        GpuRequest::Part {
            share: Some(0.5),
            mem_gb: Some(6.0)
        }
    );
    assert_eq!(span.as_deref(), Some("6"));
    assert_eq!(
        step("{ gpu_mem_gb = 2.5 }").0,
        GpuRequest::Part {
            share: None,
            mem_gb: Some(2.5)
        }
    );
    assert_eq!(
        step("{ gpus = 1, gpu_mem_gb = 40 }").0,
        GpuRequest::Whole {
            count: 1,
            mem_gb: Some(40.0)
        }
    );
}

const SEARCH: &str = r#"
[recipe]
name = "halving"

[vars]
steps = 1

[sweep]
lr = [0.1, 0.2, 0.3]

[search]
budget = "steps"
rungs = [10, 20, 40]
metric = "evaluate.loss"
direction = "min"
continue = "train"

[steps.data]
op = "exec"
cmd = ["echo"]

[steps.train]
op = "exec"
cmd = ["echo", "${lr}", "${steps}"]
inputs = { data = "data" }

[steps.evaluate]
op = "exec"
cmd = ["echo"]
inputs = { model = "train" }

[steps.table]
op = "exec"
cmd = ["echo"]
inputs = { all = "evaluate[*]" }
"#;

#[test]
fn a_search_sweeps_its_budget_and_gates_each_rung_on_the_one_before() {
    let (r, x) = expand_text(SEARCH);
    assert_eq!(x.arms.len(), 9, "3 lrs x 3 rungs");
    let search = r.search.as_ref().unwrap();
    assert_eq!(search.keep, 0.5);
    let deciders = of(&r, &x, "search");
    assert_eq!(deciders.len(), 3, "one decision per rung");
    let decider_of = |steps: i64| {
        deciders
            .iter()
            .find(|(_, i)| i.bindings["steps"] == json!(steps))
            .unwrap()
            .0
    };
    // Each decision gathers its rung's evaluations of every arm, and is gated by the one
    // before (the first by none).
    for (i, inst) in &deciders {
        let InstanceInput::Gather(members) = &inst.inputs["metrics"] else {
            panic!("metrics is a gather")
        };
        assert_eq!(members.len(), 3);
        for &m in members {
            assert_eq!(x.instances[m].bindings["steps"], inst.bindings["steps"]);
        }
        let want = match inst.bindings["steps"].as_i64().unwrap() {
            10 => None,
            20 => Some(decider_of(10)),
            _ => Some(decider_of(20)),
        };
        assert_eq!(inst.gate, want, "decision {i}");
    }
    // A training of a later rung reads its own arm's training of the rung before, and is
    // gated by that rung's decision; the first rung trains from the start.
    for (i, inst) in of(&r, &x, "train") {
        let steps = inst.bindings["steps"].as_i64().unwrap();
        match inst.inputs.get("continue_from") {
            None => {
                assert_eq!(steps, 10);
                assert_eq!(inst.gate, None);
            }
            Some(InstanceInput::One(before)) => {
                let before = &x.instances[*before];
                assert_eq!(before.bindings["lr"], inst.bindings["lr"]);
                assert_eq!(before.bindings["steps"], json!(steps / 2));
                assert_eq!(inst.gate, Some(decider_of(steps / 2)), "train {i}");
            }
            Some(other) => panic!("{other:?}"),
        }
    }
    // The shared data step is not gated; nothing reads an instance after it.
    assert!(of(&r, &x, "data").iter().all(|(_, i)| i.gate.is_none()));
    for (i, inst) in x.instances.iter().enumerate() {
        for input in inst.inputs.values() {
            assert!(
                input.indices().iter().all(|&u| u < i),
                "instance {i} reads ahead"
            );
        }
        assert!(
            inst.gate.is_none_or(|g| g < i),
            "instance {i} is gated ahead"
        );
    }
    // A gather of every rung's evaluations comes after all of them.
    let tables = of(&r, &x, "table");
    assert_eq!(tables.len(), 1);
    assert!(of(&r, &x, "evaluate").iter().all(|(e, _)| *e < tables[0].0));
}

/// `[sweep.random]` or `[sweep.sobol]` drawing `n` arms of four vars, beside a grid axis.
fn sampled(table: &str, n: usize) -> String {
    format!(
        r#"{HEADER}
[sweep]
arch = ["a", "b"]

[sweep.{table}]
n = {n}
seed = 7
lr = {{ log_uniform = [1e-5, 1e-2] }}
dropout = {{ uniform = [0.0, 0.3] }}
warmup = {{ choice = [0, 50, 100] }}
layers = {{ int = [2, 8] }}

[steps.data]
op = "exec"
cmd = ["gen", "--warmup=${{warmup}}"]

[steps.fit]
op = "train"
inputs = {{ data = "data" }}
params = {{ steps = "${{layers}}", lr = "${{lr}}", arch = "${{arch}}" }}

[steps.eval]
op = "exec"
cmd = ["eval", "${{dropout}}"]
inputs = {{ model = "fit" }}
"#
    )
}

#[test]
fn a_sampled_table_is_one_axis_of_n_draws() {
    for table in ["random", "sobol"] {
        let (r, x) = expand_text(&sampled(table, 8));
        assert_eq!(x.arms.len(), 2 * 8, "{table}: n draws times the grid's 2");
        // The grid axis comes first: arch=a with every draw, then arch=b with the same draws.
        let draws = |arch: &str| -> Vec<BTreeMap<String, Value>> {
            x.arms
                .iter()
                .filter(|a| a.bindings["arch"] == json!(arch))
                .map(|a| {
                    let mut b = a.bindings.clone();
                    b.remove("arch");
                    b
                })
                .collect()
        };
        assert_eq!(draws("a"), draws("b"));
        for arm in &x.arms {
            let b = &arm.bindings;
            assert!((1e-5..=1e-2).contains(&b["lr"].as_f64().unwrap()));
            assert!((0.0..=0.3).contains(&b["dropout"].as_f64().unwrap()));
            assert!([0, 50, 100].contains(&b["warmup"].as_i64().unwrap()));
            assert!((2..=8).contains(&b["layers"].as_i64().unwrap()));
        }
        // A step sees its draw with its type: `steps` an int, `lr` a float.
        let fit = of(&r, &x, "fit");
        assert_eq!(fit.len(), 16);
        let arm = &x.arms[fit[0].1.arms[0] as usize];
        assert_eq!(fit[0].1.params["steps"], arm.bindings["layers"]);
        assert_eq!(fit[0].1.params["lr"], arm.bindings["lr"]);
        // `data` depends on `warmup` alone: one instance for each value drawn.
        let mut warmups: Vec<i64> = x
            .arms
            .iter()
            .map(|a| a.bindings["warmup"].as_i64().unwrap())
            .collect();
        warmups.sort();
        warmups.dedup();
        assert_eq!(of(&r, &x, "data").len(), warmups.len());
        // The first draw is every sampled var's default.
        assert_eq!(r.vars["lr"], x.arms[0].bindings["lr"]);
    }
}

#[test]
fn more_sampled_arms_keep_the_earlier_ones() {
    for table in ["random", "sobol"] {
        let ids = |n: usize| -> Vec<String> {
            let (_, x) = expand_text(&sampled(table, n));
            x.arms.iter().map(|a| a.id.clone()).collect()
        };
        let (few, more) = (ids(4), ids(12));
        assert!(few.iter().all(|id| more.contains(id)), "{table}");
        assert_eq!(more.len(), 24);
        // Another seed draws other arms.
        let (_, x) = expand_text(&sampled(table, 4).replace("seed = 7", "seed = 8"));
        assert!(x.arms.iter().all(|a| !few.contains(&a.id)), "{table}");
    }
}

#[test]
fn set_fixes_a_sampled_var_in_every_draw() {
    let (_, all) = expand_text(&sampled("random", 8));
    let (r, x) = expand_with(&sampled("random", 8), &["lr=0.001"]);
    assert_eq!(r.vars["lr"], json!(0.001));
    assert_eq!(x.arms.len(), 16);
    for (pinned, drawn) in x.arms.iter().zip(&all.arms) {
        assert_eq!(pinned.bindings["lr"], json!(0.001));
        // The other vars keep their draws.
        for var in ["dropout", "warmup", "layers", "arch"] {
            assert_eq!(pinned.bindings[var], drawn.bindings[var], "{var}");
        }
    }
    // Fixing every sampled var leaves one arm per grid position.
    let fixed = ["lr=0.001", "dropout=0.1", "warmup=0", "layers=3"];
    let (_, x) = expand_with(&sampled("random", 8), &fixed);
    assert_eq!(
        labels(&x),
        [
            "arch=a,dropout=0.1,layers=3,lr=0.001,warmup=0",
            "arch=b,dropout=0.1,layers=3,lr=0.001,warmup=0"
        ]
    );
}

#[test]
fn exclude_drops_sampled_arms() {
    let text = sampled("sobol", 16).replace(
        "[steps.data]",
        "[[sweep.exclude]]\narch = \"b\"\nwarmup = 0\n\n[steps.data]",
    );
    let (_, x) = expand_text(&text);
    let (_, all) = expand_text(&sampled("sobol", 16));
    let zero = all
        .arms
        .iter()
        .filter(|a| a.bindings["arch"] == json!("b") && a.bindings["warmup"] == json!(0))
        .count();
    assert!(zero > 0);
    assert_eq!(x.arms.len(), 32 - zero);
}

#[test]
fn random_and_sobol_lists_are_still_grid_vars() {
    let text = format!(
        r#"{HEADER}
[sweep]
random = [1, 2]
sobol = ["x", "y"]

[steps.a]
op = "exec"
cmd = ["a", "${{random}}", "${{sobol}}"]
"#
    );
    let (_, x) = expand_text(&text);
    assert_eq!(x.arms.len(), 4);
}
