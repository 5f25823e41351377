//! `[search]`: successive halving over exec steps with a synthetic metric whose best arm is
//! known. The right arms go on at every rung, the kept ones continue from their own previous
//! output instead of starting over, a rerun executes nothing, and a search killed mid-rung
//! resumes from what it had committed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// Trains "lr" up to `steps`: from its `continue_from` input's step count when it has one.
/// Appends `scratch LR` or `continued LR FROM` to `trained` in the recipe's directory. With
/// `HOLD_AT` set to a step count (in the runner's environment, so not part of any key), the
/// training to that count says so in `held` and waits forever.
const TRAIN: &str = r#"set -e
start=0
if [ -n "$NEEDLE_IN_CONTINUE_FROM" ]; then
  start=$(cat "$NEEDLE_IN_CONTINUE_FROM/steps")
  echo "continued $NEEDLE_PARAM_LR $(cat "$NEEDLE_IN_CONTINUE_FROM/lr") $start" >> "$NEEDLE_RECIPE_DIR/trained"
else
  echo "scratch $NEEDLE_PARAM_LR" >> "$NEEDLE_RECIPE_DIR/trained"
fi
if [ "$HOLD_AT" = "$NEEDLE_PARAM_STEPS" ]; then
  echo "$NEEDLE_PARAM_LR" >> "$NEEDLE_RECIPE_DIR/held"
  while :; do sleep 1; done
fi
echo "$NEEDLE_PARAM_STEPS" > "$NEEDLE_OUT/steps"
echo "$NEEDLE_PARAM_LR" > "$NEEDLE_OUT/lr"
"#;

/// The loss: the distance of lr from 0.33, plus 1/steps. Best arms: 0.3, 0.4, 0.2, 0.5, …
const EVALUATE: &str = r#"set -e
awk -v lr="$(cat "$NEEDLE_IN_MODEL/lr")" -v s="$(cat "$NEEDLE_IN_MODEL/steps")" \
  'BEGIN { d = lr - 0.33; printf "{\"loss\": %.6f}\n", d * d + 1 / s }' > "$NEEDLE_OUT/metrics.json"
"#;

const RECIPE: &str = r#"
[recipe]
name = "halving"

[vars]
steps = 1

[sweep]
lr = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]

[search]
budget = "steps"
rungs = [10, 20, 40]
metric = "evaluate.loss"
direction = "min"
keep = 0.5
continue = "train"

[steps.train]
op = "exec"
cmd = ["sh", "train.sh"]
code = ["train.sh"]
params = { lr = "${lr}", steps = "${steps}" }

[steps.evaluate]
op = "exec"
cmd = ["sh", "evaluate.sh"]
code = ["evaluate.sh"]
inputs = { model = "train" }
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("train.sh", TRAIN);
    p.write("evaluate.sh", EVALUATE);
    p.write("recipe.toml", RECIPE);
    p
}

/// The `lr` of every `name` step at `steps` with this status.
fn arms(run: &Value, name: &str, steps: u64, status: &str) -> BTreeSet<String> {
    steps_named(run, name)
        .into_iter()
        .filter(|s| s["bindings"]["steps"] == steps && s["status"] == status)
        .map(|s| s["bindings"]["lr"].to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// What the uninterrupted search does: 8 arms at 10 steps, the best 4 at 20, the best 2 at
/// 40; every step of the other arms' later rungs stopped.
fn assert_the_search(run: &Value) {
    let ran = |status| move |steps| arms(run, "train", steps, status);
    assert_eq!(
        ran("succeeded")(10).len() + ran("cached")(10).len(),
        8,
        "{run}"
    );
    let went_on = |steps| {
        let mut s = arms(run, "train", steps, "succeeded");
        s.extend(arms(run, "train", steps, "cached"));
        s
    };
    assert_eq!(went_on(20), set(&["0.2", "0.3", "0.4", "0.5"]), "{run}");
    assert_eq!(went_on(40), set(&["0.3", "0.4"]), "{run}");
    assert_eq!(
        ran("stopped")(20),
        set(&["0.1", "0.6", "0.7", "0.8"]),
        "{run}"
    );
    assert_eq!(ran("stopped")(40).len(), 6, "{run}");
    assert_eq!(run["stopped"], 20, "{run}");
    assert_eq!(run["failed"], 0, "{run}");
}

#[test]
fn halving_keeps_the_best_arms_and_continues_them_and_a_rerun_executes_nothing() {
    let p = project();
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_the_search(&run);
    // 8 + 4 + 2 trainings, 8 + 4 + 2 evaluations, 3 decisions.
    assert_eq!(run["executed"], 31, "{run}");

    let trained = p.lines("trained");
    let scratch = trained.iter().filter(|l| l.starts_with("scratch")).count();
    assert_eq!(
        scratch, 8,
        "only the first rung starts from scratch: {trained:?}"
    );
    let continued: Vec<Vec<&str>> = (trained.iter())
        .filter(|l| l.starts_with("continued"))
        .map(|l| l.split(' ').collect())
        .collect();
    assert_eq!(continued.len(), 6, "{trained:?}");
    for c in &continued {
        assert_eq!(
            c[1], c[2],
            "an arm continues from its own output: {trained:?}"
        );
    }
    let from: BTreeSet<&str> = continued.iter().map(|c| c[3]).collect();
    assert_eq!(from, BTreeSet::from(["10", "20"]), "{trained:?}");

    // The final rung's decision ranks the two survivors.
    let show = p.json(&["show", "last:search[steps=40]"], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    let decision: Value =
        serde_json::from_slice(&std::fs::read(view.join("decision.json")).unwrap()).unwrap();
    assert_eq!(decision["rung"], 2);
    assert_eq!(
        decision["arms"][0]["label"], "lr=0.3,steps=40",
        "{decision}"
    );
    assert_eq!(decision["arms"][0]["kept"], true);
    // And `status` says why an arm stopped.
    let status = stdout(&p.needle(&["status", "last"]));
    assert!(
        status.contains("stopped at rung 1 of 3 (steps = 10): loss"),
        "{status}"
    );
    // One line per reason (an arm's later rungs), not one per stopped step.
    let json = p.json(&["status", "last"], 0);
    let reasons: BTreeSet<&str> = (json["steps"].as_array().unwrap().iter())
        .filter(|s| s["status"] == "stopped")
        .map(|s| s["detail"].as_str().unwrap())
        .collect();
    let lines = (status.lines())
        .filter(|l| l.trim_start().starts_with("stopped"))
        .count();
    assert_eq!(lines, reasons.len(), "{status}");
    assert!(reasons.len() < 20 && status.contains(" more "), "{status}");

    // `results` gives each evaluation its rung and what the rung decided; the report plots
    // and tables the rungs.
    let results = p.json(&["results", "last"], 0);
    let verdicts: Vec<(String, u64, String)> = (results["rows"].as_array().unwrap().iter())
        .map(|r| {
            (
                format!("{}@{}", r["bindings"]["lr"], r["bindings"]["steps"]),
                r["rung"].as_u64().unwrap(),
                r["search"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(verdicts.len(), 14, "{results}");
    assert!(
        verdicts.contains(&("0.3@40".into(), 3, "best".into())),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&("0.4@40".into(), 3, "stopped".into())),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&("0.5@20".into(), 2, "stopped".into())),
        "{verdicts:?}"
    );
    assert!(
        verdicts.contains(&("0.8@10".into(), 1, "stopped".into())),
        "{verdicts:?}"
    );
    assert_code(&p.needle(&["report", "last", "-o", "report.html"]), 0);
    let report = std::fs::read_to_string(p.path("report.html")).unwrap();
    assert!(
        report.contains("8 → 4 → 2 arms over 3 of 3 rungs"),
        "no search section"
    );
    assert!(report.contains("Best at steps = 40: <b>lr=0.3</b>"));

    let again = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(again["executed"], 0, "{again}");
    assert_the_search(&again);
    assert_eq!(p.lines("trained").len(), 14, "the rerun trained again");
    let text = stdout(&p.needle(&["run", "recipe.toml"]));
    assert!(
        text.contains("search: 8 → 4 → 2 arms over 3 of 3 rungs; best at steps = 40: lr=0.3"),
        "{text}"
    );
}

#[test]
fn a_killed_search_resumes_from_what_it_committed() {
    let p = project();
    let mut child = p
        .background(&["run", "recipe.toml", "-j", "2"])
        .env("HOLD_AT", "40")
        .spawn()
        .unwrap();
    // The last rung has started: the first two are decided and committed.
    let t0 = Instant::now();
    while p.lines("held").is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the last rung never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: SIGKILL to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    let before = p.lines("trained");
    assert_code(&p.needle(&["verify"]), 0);

    let run = p.json(&["run", "recipe.toml", "-j", "2"], 0);
    assert_the_search(&run);
    // Only the last rung's steps that had not been committed executed: its two trainings
    // at most, their evaluations and its decision.
    let executed = run["executed"].as_u64().unwrap();
    assert!((3..=5).contains(&executed), "{run}");
    let after = p.lines("trained");
    let new: Vec<&String> = after[before.len()..].iter().collect();
    assert!(
        new.iter()
            .all(|l| l.starts_with("continued") && l.ends_with(" 20")),
        "only trainings of the last rung ran again: {new:?}"
    );
}

#[test]
fn a_metric_that_is_missing_or_not_a_number_fails_the_rung_naming_the_arm() {
    let p = project();
    // The arm lr=0.2 writes its loss as a string, lr=0.3 writes none.
    p.write(
        "evaluate.sh",
        r#"set -e
case "$(cat "$NEEDLE_IN_MODEL/lr")" in
  0.2) echo '{"loss": "low"}' > "$NEEDLE_OUT/metrics.json" ;;
  0.3) echo '{"acc": 1}' > "$NEEDLE_OUT/metrics.json" ;;
  *) echo '{"loss": 1}' > "$NEEDLE_OUT/metrics.json" ;;
esac
"#,
    );
    let out = p.needle(&["run", "recipe.toml", "--json"]);
    assert_code(&out, 1);
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let search: Vec<&Value> = steps_named(&run, "search");
    assert_eq!(search[0]["status"], "failed", "{run}");
    // Nothing of a later rung ran: the decision it waits for failed.
    assert!(arms(&run, "train", 20, "succeeded").is_empty(), "{run}");
    assert_eq!(run["skipped"], 34, "{run}");
    // The run's own report of the failure says it, with the arms' problems below.
    let err = stderr(&out);
    assert!(
        err.contains("the metric `loss` cannot rank 2 of the 8 arms at rung 1"),
        "{err}"
    );
    let log = stdout(&p.needle(&["logs", "last:search[steps=10]"]));
    assert!(
        log.contains(
            "arm `lr=0.2,steps=10`: `metrics.json` field `loss` is \"low\", not a finite number"
        ),
        "{log}"
    );
    assert!(
        log.contains("arm `lr=0.3,steps=10`: `metrics.json` has no field `loss` (its fields: acc)"),
        "{log}"
    );
}
