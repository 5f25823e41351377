//! The judges and `evaluate` without a generative model: two "sample sets" made of haystack
//! images of the same prompts, the candidate's photogenic and the baseline's ordinary. The
//! panel must prefer the candidate on appeal, and the statistics must say so with confidence.

use std::path::Path;

use needle_models::evaluate::EvaluateOp;
use needle_models::judges::JudgesOp;
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

/// For each true concept, `seeds` images: the best ones (candidate) or the middling ones
/// (baseline), captioned with the concept as the prompt.
fn samples(pool: &Dataset, best: bool, seeds: usize, out: &Path) {
    let q = pool.ratings("quality").unwrap();
    let mut by_concept: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (i, r) in pool.records().iter().enumerate() {
        let concept = format!(
            "a {} {}",
            r.extra["rating_true_color"].as_str().unwrap(),
            r.extra["rating_true_shape"].as_str().unwrap()
        );
        by_concept.entry(concept).or_default().push(i);
    }
    let w = DatasetWriter::create(out).unwrap();
    for (prompt, mut idx) in by_concept {
        idx.sort_by(|&a, &b| q[b].total_cmp(&q[a]));
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
        json!({"images": 2000, "seed": 11}),
        &[],
        &dir("rated"),
    );
    run(
        &JudgesOp,
        json!({"appeal": 5, "faithfulness": 3, "sample": 250, "steps": 80, "batch": 32}),
        &[("data", &dir("rated"))],
        &dir("judges"),
    );
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
    assert_eq!(m["pairs"], 96);
    assert_eq!(m["prompts"], 16);
    let appeal = &m["appeal"];
    let win = appeal["win"].as_f64().unwrap();
    let sum = win + appeal["tie"].as_f64().unwrap() + appeal["lose"].as_f64().unwrap();
    assert!((sum - 1.0).abs() < 1e-9);
    assert!(win > 0.7, "{m}");
    assert!(appeal["wilson95"][0].as_f64().unwrap() > 0.5, "{m}");
    assert!(appeal["sign_test_p"].as_f64().unwrap() < 1e-6, "{m}");
    // The candidate's images are its own tuning set here: all memorised.
    assert_eq!(m["memorisation"]["candidate"], 1.0);
    assert!(dir("eval").join("grid.png").exists());
    let summary = std::fs::read_to_string(dir("eval").join(needle_ops::SUMMARY)).unwrap();
    assert!(summary.contains("| visual appeal |"), "{summary}");
}
