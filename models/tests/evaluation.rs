//! The judges and `evaluate` without a generative model: two "sample sets" made of haystack
//! images of the same prompts, the candidate's those the hidden human preference likes best,
//! the baseline's middling ones. The panel must prefer the candidate on appeal, and the
//! statistics must say so with confidence. (That appeal judges learn the preference and not
//! the curators' rubric is the test at the end.)

use std::path::Path;

use needle_models::evaluate::EvaluateOp;
use needle_models::judges::{JudgesOp, appeal_target};
use needle_ops::dataset::{Dataset, DatasetWriter};
use needle_ops::haystack::Haystack;
use needle_ops::{Input, Op, OpContext};
use serde_json::{Map, Value, json};

fn run(op: &dyn Op, params: Value, inputs: &[(&str, &Path)], out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let mut ctx = OpContext::standalone(&op.schema(), params, out);
    ctx.cpus = 2;
    for (name, dir) in inputs {
        ctx.inputs
            .insert(name.to_string(), Input::One(dir.to_path_buf()));
    }
    op.run(&ctx)
        .unwrap_or_else(|e| panic!("{} failed: {e}", op.schema().name));
}

/// For each true concept, `seeds` images captioned with the concept as the prompt: those of
/// the highest preference (`best`), or the middling ones.
fn samples(pool: &Dataset, best: bool, seeds: usize, out: &Path) {
    let h = pool.ratings("preference").unwrap();
    let mut by_concept: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (i, r) in pool.records().iter().enumerate() {
        let concept = format!(
            "a {} {} {}",
            r.extra["rating_true_size"].as_str().unwrap(),
            r.extra["rating_true_color"].as_str().unwrap(),
            r.extra["rating_true_shape"].as_str().unwrap()
        );
        by_concept.entry(concept).or_default().push(i);
    }
    let w = DatasetWriter::create(out).unwrap();
    for (prompt, mut idx) in by_concept {
        idx.sort_by(|&a, &b| h[b].total_cmp(&h[a]));
        let chosen: Vec<usize> = if best {
            idx[..seeds].to_vec()
        } else {
            let mid = idx.len() / 2;
            idx[mid..mid + seeds].to_vec()
        };
        for (j, i) in chosen.into_iter().enumerate() {
            let mut extra = Map::new();
            extra.insert("text".into(), json!(prompt));
            extra.insert("seed_index".into(), json!(j));
            w.add_linked(pool, &pool.records()[i], extra).unwrap();
        }
    }
    w.finish().unwrap();
}

#[test]
fn the_panel_prefers_photogenic_samples_with_confidence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    run(
        &Haystack,
        json!({"images": 2000, "seed": 11, "hold_out": false}),
        &[],
        &dir("rated"),
    );
    run(
        &JudgesOp,
        json!({"appeal": 3, "faithfulness": 1, "sample": 400, "check": 400, "steps": 200, "batch": 32}),
        &[("data", &dir("rated"))],
        &dir("judges"),
    );
    // Each judge agrees with the hidden truth, if loosely at this size.
    let panel: Value =
        serde_json::from_str(&std::fs::read_to_string(dir("judges").join("panel.json")).unwrap())
            .unwrap();
    for j in panel["judges"].as_array().unwrap() {
        let a = &j["agreement"];
        if j["judge"].as_str().unwrap().starts_with("appeal") {
            assert!(a["spearman_preference"].as_f64().unwrap() > 0.25, "{j}");
            assert_eq!(
                a["spearman_preference_by_third"].as_array().unwrap().len(),
                3
            );
        } else {
            assert!(a["concept_accuracy"].as_f64().unwrap() > 0.1, "{j}");
        }
    }
    run(
        &Haystack,
        json!({"images": 1600, "seed": 12}),
        &[],
        &dir("pool"),
    );
    let pool = Dataset::open(dir("pool")).unwrap();
    samples(&pool, true, 6, &dir("candidate"));
    samples(&pool, false, 6, &dir("baseline"));

    run(
        &EvaluateOp,
        json!({"bootstrap": 500}),
        &[
            ("candidate", &dir("candidate")),
            ("baseline", &dir("baseline")),
            ("judges", &dir("judges")),
            ("tuning", &dir("candidate")),
        ],
        &dir("eval"),
    );
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir("eval").join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(m["pairs"], 168);
    assert_eq!(m["prompts"], 28);
    let per_prompt = m["per_prompt"]["appeal"].as_object().unwrap();
    assert_eq!(per_prompt.len(), 28);
    let wins: u64 = per_prompt.values().map(|t| t[0].as_u64().unwrap()).sum();
    assert!(((wins as f64 / 168.0) - m["appeal"]["win"].as_f64().unwrap()).abs() < 1e-9);
    let appeal = &m["appeal"];
    let win = appeal["win"].as_f64().unwrap();
    let sum = win + appeal["tie"].as_f64().unwrap() + appeal["lose"].as_f64().unwrap();
    assert!((sum - 1.0).abs() < 1e-9);
    assert!(win > 0.6, "{m}");
    assert!(appeal["wilson95"][0].as_f64().unwrap() > 0.5, "{m}");
    assert!(appeal["sign_test_p"].as_f64().unwrap() < 1e-6, "{m}");
    // The candidate's images are its own tuning set here: all memorised.
    assert_eq!(m["memorisation"]["candidate"], 1.0);
    assert!(dir("eval").join("grid.png").exists());
    let summary = std::fs::read_to_string(dir("eval").join(needle_ops::SUMMARY)).unwrap();
    assert!(summary.contains("| visual appeal |"), "{summary}");

    // Seen and unseen prompts apart; an "unseen" prompt the tuning set holds is refused.
    let unseen = json!(["a small red circle", "a large blue star"]);
    run(
        &EvaluateOp,
        json!({"bootstrap": 100, "unseen": unseen}),
        &[
            ("candidate", &dir("candidate")),
            ("baseline", &dir("baseline")),
            ("judges", &dir("judges")),
        ],
        &dir("eval-split"),
    );
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(dir("eval-split").join("metrics.json")).unwrap(),
    )
    .unwrap();
    let split = &m["by_prompts"];
    assert_eq!(
        (
            split["seen"]["pairs"].clone(),
            split["unseen"]["pairs"].clone()
        ),
        (json!(156), json!(12))
    );
    assert_eq!(split["unseen"]["prompts"], 2);
    let summary = std::fs::read_to_string(dir("eval-split").join(needle_ops::SUMMARY)).unwrap();
    assert!(
        summary.contains("| visual appeal, unseen prompts (12 pairs) |"),
        "{summary}"
    );
    let op = EvaluateOp;
    let mut ctx = OpContext::standalone(&op.schema(), json!({"unseen": unseen}), &dir("eval-bad"));
    for (name, d) in [
        ("candidate", "candidate"),
        ("baseline", "baseline"),
        ("judges", "judges"),
        ("tuning", "candidate"),
    ] {
        ctx.inputs.insert(name.to_string(), Input::One(dir(d)));
    }
    std::fs::create_dir_all(dir("eval-bad")).unwrap();
    let err = op.run(&ctx).unwrap_err().to_string();
    assert!(
        err.contains("`a small red circle` is a caption of the tuning set"),
        "{err}"
    );
}

#[test]
fn appeal_judges_learn_the_preference_never_the_rubric() {
    let tmp = tempfile::tempdir().unwrap();
    run(
        &Haystack,
        json!({"images": 600, "seed": 3}),
        &[],
        tmp.path(),
    );
    let data = Dataset::open(tmp.path()).unwrap();
    let target = appeal_target(&data, 0.05, 1).unwrap();
    let corr = |name: &str| {
        let v = data.ratings(name).unwrap();
        needle_models::scorer::pearson(&target, &v)
    };
    // Rubric and preference correlate about 0.4 by construction; labels of the rubric would
    // correlate 1 with it.
    assert!(corr("preference") > 0.85, "{}", corr("preference"));
    assert!(corr("quality") < 0.6, "{}", corr("quality"));
    // The rater noise is the asked one, and differs between judges.
    let h = data.ratings("preference").unwrap();
    let sd = (target
        .iter()
        .zip(&h)
        .map(|(t, h)| (t - h).powi(2))
        .sum::<f64>()
        / 600.0)
        .sqrt();
    assert!((0.04..0.06).contains(&sd), "{sd}");
    assert_ne!(target, appeal_target(&data, 0.05, 2).unwrap());
}
