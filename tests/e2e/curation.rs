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
