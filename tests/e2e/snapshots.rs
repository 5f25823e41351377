//! What people read: plan tables, lineage trees and recipe errors, as snapshots (durations
//! redacted; keys are content addresses, so they are stable).

use crate::common::*;
use crate::sweep::recipe;

#[test]
fn plan_table() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2, 3]"));
    let out = p.needle(&["plan", "recipe.toml"]);
    assert_code(&out, 0);
    insta::assert_snapshot!(stdout(&out));
}

#[test]
fn lineage_tree() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2]"));
    p.json(&["run", "recipe.toml"], 0);
    let out = p.needle(&["lineage", "1:s3[x=1,y=p]"]);
    assert_code(&out, 0);
    insta::with_settings!({filters => vec![(r"\d+\.\ds\b", "[dur]")]}, {
        insta::assert_snapshot!(stdout(&out));
    });
}

#[test]
fn recipe_errors_through_the_binary() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"[recipe]
name = "broken"

[sweep]
lr = [0.1, 0.01]

[steps.train]
op = "exec"
cmd = ["python3", "train.py", "--lr", "${lr}", "--arch", "${arch}"]
code = ["train.py", "../secrets.txt"]
inputs = { data = "prep" }
retries = "twice"
"#,
    );
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 2);
    insta::assert_snapshot!(stderr(&out));
}
