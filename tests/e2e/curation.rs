//! The curation half of the Emu pipeline through the binary: haystacks, scorers and the funnel
//! as built-in ops, deterministic, with the funnel table shown by `needle show`.

use crate::common::*;

const RECIPE: &str = r#"
[recipe]
name = "curation"

[steps.rated]
op = "haystack"
params = { images = 600, seed = 1 }

[steps.pool]
op = "haystack"
params = { images = 1000, seed = 2 }

[steps.aesthetic]
op = "scorer"
inputs = { data = "rated" }
params = { kind = "aesthetic", sample = 500, steps = 100 }

[steps.needles]
op = "filter"
inputs = { data = "pool", aesthetic = "aesthetic" }
params = { generalists = 100, specialists = 20 }
"#;

#[test]
fn the_funnel_runs_and_is_deterministic() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let first = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(first["executed"], 4);

    let show = p.needle(&["show", "last:needles"]);
    assert_code(&show, 0);
    let text = stdout(&show);
    assert!(text.contains("Kept 20 of 1000 images"), "{text}");
    assert!(text.contains("| specialists | 100 | 20 |"), "{text}");

    // The same recipe in another store gives the same digests, step by step.
    let other = p.path("other-store");
    let out = p
        .cmd(&["run", "recipe.toml", "--json"])
        .env("NEEDLE_STORE", &other)
        .output()
        .unwrap();
    assert_code(&out, 0);
    let second: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outputs(&first), outputs(&second));
}

/// The repository's root, where `recipes/` is.
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_emu_recipes_plan() {
    let p = Project::new();
    for recipe in [
        "emu-mini",
        "emu-ablation",
        "emu-controls",
        "emu-seeds",
        "emu-early-stop",
    ] {
        let path = repo().join(format!("recipes/{recipe}.toml"));
        let out = p.needle(&["plan", path.to_str().unwrap()]);
        assert_code(&out, 0);
    }
}

#[test]
fn the_seed_spread_pools_evaluations() {
    let p = Project::new();
    // Two seeds' `evaluate` metrics: 2 prompts each, per-prompt win / tie / lose.
    let mut members = Vec::new();
    for (k, appeal) in [[[3, 0, 1], [2, 1, 1]], [[4, 0, 0], [1, 1, 2]]]
        .iter()
        .enumerate()
    {
        let dir = p.path(&format!("seed-{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        let per_prompt = serde_json::json!({
            "appeal": {"a red circle": appeal[0], "a blue star": appeal[1]},
            "faithfulness": {"a red circle": [1, 3, 0], "a blue star": [0, 4, 0]},
        });
        std::fs::write(
            dir.join("metrics.json"),
            serde_json::json!({"per_prompt": per_prompt}).to_string(),
        )
        .unwrap();
        members.push(serde_json::json!({"label": format!("seed={k}"), "dir": dir}));
    }
    let out_dir = p.path("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let inputs = serde_json::json!({"runs": {"dir": p.path("."), "members": members}});
    let out = std::process::Command::new("python3")
        .arg(repo().join("recipes/emu_seed_spread.py"))
        .env("NEEDLE_INPUTS", inputs.to_string())
        .env("NEEDLE_OUT", &out_dir)
        .output()
        .unwrap();
    assert_code(&out, 0);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    // Win shares 5/8 and 5/8: no spread; faithfulness 1/8 each.
    assert_eq!(m["seeds"], 2);
    assert!(
        (m["appeal_win_mean"].as_f64().unwrap() - 0.625).abs() < 1e-9,
        "{m}"
    );
    assert!(m["appeal_win_sd"].as_f64().unwrap().abs() < 1e-9, "{m}");
    assert!(
        (m["appeal_lose_mean"].as_f64().unwrap() - 0.25).abs() < 1e-9,
        "{m}"
    );
    let [lo, hi] = [0, 1].map(|i| m["appeal_win_95_seeds_and_prompts"][i].as_f64().unwrap());
    assert!(lo <= 0.625 && 0.625 <= hi && lo >= 0.25, "{m}");
    let summary = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(
        summary.contains("Over 2 seeds (seed=0, seed=1)"),
        "{summary}"
    );
}
