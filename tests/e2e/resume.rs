//! Long steps: progress lines reach the display, and what a step keeps in `NEEDLE_RESUME`
//! survives a failed attempt, for the next one, and goes once the step succeeds.

use crate::common::*;

#[test]
fn progress_lines_show_while_a_step_runs() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "progress"
[steps.train]
op = "exec"
cmd = ["sh", "-c", "echo '{\"done\":5,\"total\":10,\"unit\":\"step\",\"loss\":0.25,\"rate\":812.0}' >> \"$NEEDLE_PROGRESS\"; sleep 3; echo > \"$NEEDLE_OUT/v\""]
"#,
    );
    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 0);
    let err = stderr(&out);
    assert!(
        err.contains("running train") && err.contains("5/10 step · loss 0.2500 · 812/s"),
        "{err}"
    );
}

#[test]
fn a_step_resumes_from_what_it_kept_and_the_key_stays() {
    let p = Project::new();
    // First attempt: a "checkpoint", then a crash. Second: picks it up and finishes.
    p.write(
        "train.sh",
        r#"mkdir -p "$NEEDLE_RESUME"
if [ -f "$NEEDLE_RESUME/checkpoint" ]; then
  echo "resumed from $(cat "$NEEDLE_RESUME/checkpoint")" > "$NEEDLE_OUT/result"
else
  echo "step 500" > "$NEEDLE_RESUME/checkpoint"
  exit 9
fi
"#,
    );
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "resume"
[steps.train]
op = "exec"
cmd = ["sh", "train.sh"]
code = ["train.sh"]
"#,
    );
    let failed = p.json(&["run", "recipe.toml"], 1);
    let key = failed["steps"][0]["key"].as_str().unwrap().to_string();
    assert!(
        p.store()
            .join("resume")
            .join(&key)
            .join("checkpoint")
            .exists()
    );

    let rerun = p.json(&["rerun", "last"], 0);
    assert_eq!(
        rerun["steps"][0]["key"],
        key.as_str(),
        "resuming leaves the key alone"
    );
    let out = rerun["steps"][0]["output"].as_str().unwrap().to_string();
    let show = p.json(&["show", &out], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(view.join("result")).unwrap(),
        "resumed from step 500\n"
    );
    assert!(
        !p.store().join("resume").join(&key).exists(),
        "what it kept goes once it succeeds"
    );
}
