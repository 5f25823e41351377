//! `lineage` shows every ancestor with op and params, and `--down` every descendant.

use crate::common::*;
use crate::sweep::recipe;

#[test]
fn lineage_up_shows_every_ancestor_with_op_and_params() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2, 3]"));
    p.json(&["run", "recipe.toml"], 0);

    let up = p.json(&["lineage", "1:s3[x=2,y=q]"], 0);
    let names: Vec<&str> = up["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s3", "s2", "s1", "root"]);
    for s in up["steps"].as_array().unwrap() {
        assert_eq!(s["op"], "exec");
    }
    let s2 = &up["steps"][1];
    assert_eq!(s2["params"]["y"], "q");
    assert_eq!(s2["bindings"]["x"], 2);
    assert_eq!(up["edges"].as_array().unwrap().len(), 3);

    let tree = p.needle(&["lineage", "1:s3[x=2,y=q]"]);
    assert_code(&tree, 0);
    let text = stdout(&tree);
    for needle in [
        "s3[x=2,y=q]",
        "up: s2[x=2,y=q]",
        "y=q",
        "up: s1[x=2]",
        "up: root",
        "3 ancestor step(s)",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }

    let dot = p.needle(&["lineage", "1:s3[x=2,y=q]", "--format", "dot"]);
    assert_code(&dot, 0);
    assert!(stdout(&dot).starts_with("digraph lineage {"));
    assert_eq!(stdout(&dot).matches(" -> ").count(), 3);

    let mermaid = p.needle(&["lineage", "1:s3[x=2,y=q]", "--format", "mermaid"]);
    assert_code(&mermaid, 0);
    let text = stdout(&mermaid);
    assert!(text.starts_with("flowchart LR\n"), "{text}");
    assert_eq!(text.matches(" -->|").count(), 3, "{text}");
    assert!(text.contains("s3<br/>[x=2,y=q]"), "{text}");
}

#[test]
fn lineage_down_shows_every_descendant() {
    let p = Project::new();
    p.write("recipe.toml", &recipe("[1, 2, 3]"));
    let run = p.json(&["run", "recipe.toml"], 0);
    let root_key = steps_named(&run, "root")[0]["key"]
        .as_str()
        .unwrap()
        .to_string();

    let down = p.json(&["lineage", &root_key[..10], "--down"], 0);
    let steps = down["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 16, "the root and its 15 descendants");
    assert_eq!(steps.iter().filter(|s| s["name"] == "s3").count(), 6);

    // An artifact digest works as a reference too: its producer's lineage.
    let out = steps_named(&run, "root")[0]["output"]
        .as_str()
        .unwrap()
        .to_string();
    let by_artifact = p.json(&["lineage", &out, "--down"], 0);
    assert_eq!(by_artifact["steps"].as_array().unwrap().len(), 16);
}
