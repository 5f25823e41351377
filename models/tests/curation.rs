//! The funnel's models at tiny sizes, on the CPU: scorers learn something real, the filter's
//! stages each record what they did, the mean hidden quality rises, and nothing is stored twice.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use needle_models::filter::FilterOp;
use needle_models::scorer::ScorerOp;
use needle_ops::dataset::Dataset;
use needle_ops::haystack::Haystack;
use needle_ops::{Input, Op, OpContext};
use serde_json::{Value, json};

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

fn json_file(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

struct Fixture {
    tmp: tempfile::TempDir,
    pool: PathBuf,
    aesthetic: PathBuf,
    agreement: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let (rated, pool, aesthetic, agreement) = (
        dir("rated"),
        dir("pool"),
        dir("aesthetic"),
        dir("agreement"),
    );
    run(&Haystack, json!({"images": 1200, "seed": 1}), &[], &rated);
    run(&Haystack, json!({"images": 2000, "seed": 2}), &[], &pool);
    run(
        &ScorerOp,
        json!({"kind": "aesthetic", "sample": 1000, "steps": 250}),
        &[("data", &rated)],
        &aesthetic,
    );
    run(
        &ScorerOp,
        json!({"kind": "agreement", "sample": 1200, "steps": 250}),
        &[("data", &rated)],
        &agreement,
    );
    Fixture {
        tmp,
        pool,
        aesthetic,
        agreement,
    }
}

#[test]
fn scorers_learn_and_the_funnel_raises_quality() {
    let f = fixture();

    // The aesthetic scorer predicts the hidden quality of images it never saw.
    let m = json_file(f.aesthetic.join("metrics.json"));
    assert!(m["spearman"].as_f64().unwrap() > 0.45, "{m}");
    for file in ["model.safetensors", "config.json", "summary.md"] {
        assert!(f.aesthetic.join(file).exists(), "{file}");
    }
    // The agreement scorer prefers an image's own caption to another's.
    let m = json_file(f.agreement.join("metrics.json"));
    assert!(m["pair_accuracy"].as_f64().unwrap() > 0.6, "{m}");

    let out = f.tmp.path().join("needles");
    run(
        &FilterOp,
        json!({"generalists": 200, "specialists": 50}),
        &[
            ("data", &f.pool),
            ("aesthetic", &f.aesthetic),
            ("agreement", &f.agreement),
        ],
        &out,
    );
    let report = json_file(out.join("funnel.json"));
    let stages = report["stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "pool",
            "unsafe",
            "aesthetic",
            "overlay",
            "agreement",
            "cut",
            "generalists",
            "specialists"
        ]
    );
    for pair in stages.windows(2) {
        assert_eq!(pair[1]["in"], pair[0]["out"], "stages chain");
        assert!(pair[1]["out"].as_u64() <= pair[1]["in"].as_u64());
    }
    let first = stages[0]["mean_quality"].as_f64().unwrap();
    let last = stages.last().unwrap()["mean_quality"].as_f64().unwrap();
    // The rubric score has a standard deviation of 0.11 over the pool.
    assert!(last > first + 0.15, "quality {first} -> {last}");
    // The preference, which no stage reads, rises only through the factors it shares with the
    // rubric; the table reports it.
    let pref = |s: &Value| s["mean_preference"].as_f64().unwrap();
    assert!(pref(stages.last().unwrap()) > pref(&stages[0]), "{report}");
    assert_eq!(report["kept"], 50);

    // The tuning set: the pool's images, linked, with true captions.
    let kept = Dataset::open(&out).unwrap();
    assert_eq!(kept.len(), 50);
    let pool = Dataset::open(&f.pool).unwrap();
    for rec in kept.records() {
        let a = std::fs::metadata(kept.image_path(rec)).unwrap();
        let b = std::fs::metadata(pool.image_path(rec)).unwrap();
        assert_eq!(a.ino(), b.ino(), "no new image bytes for {}", rec.file_name);
        let truth = format!(
            "a {} {} {}",
            rec.extra["rating_true_size"].as_str().unwrap(),
            rec.extra["rating_true_color"].as_str().unwrap(),
            rec.extra["rating_true_shape"].as_str().unwrap()
        );
        assert_eq!(rec.text, truth, "specialists write true captions");
    }
    let summary = std::fs::read_to_string(out.join(needle_ops::SUMMARY)).unwrap();
    assert!(summary.contains("| specialists | 200 | 50 |"), "{summary}");
}

#[test]
fn stages_are_optional() {
    let f = fixture();
    let out = f.tmp.path().join("humans-only");
    run(
        &FilterOp,
        json!({"unsafe": false, "overlay": false, "cut": false, "generalists": 0, "specialists": 30, "recaption": false}),
        &[("data", &f.pool)],
        &out,
    );
    let report = json_file(out.join("funnel.json"));
    let names: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pool", "specialists"]);
    let kept = Dataset::open(&out).unwrap();
    let pool = Dataset::open(&f.pool).unwrap();
    let original: std::collections::HashMap<&str, &str> = pool
        .records()
        .iter()
        .map(|r| (r.file_name.as_str(), r.text.as_str()))
        .collect();
    assert!(
        kept.records()
            .iter()
            .all(|r| original[r.file_name.as_str()] == r.text)
    );
}

#[test]
fn controls_pick_the_worst_or_a_random_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    run(
        &Haystack,
        json!({"images": 600, "seed": 4}),
        &[],
        &dir("pool"),
    );
    let off = json!({"unsafe": false, "overlay": false, "cut": false, "generalists": 0, "specialists": 0});
    let with = |extra: Value| {
        let mut p = off.clone();
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        p
    };
    let mean_quality = |d: &Path| {
        let q = Dataset::open(d).unwrap().ratings("quality").unwrap();
        q.iter().sum::<f64>() / q.len() as f64
    };
    run(
        &FilterOp,
        with(json!({"specialists": 60})),
        &[("data", &dir("pool"))],
        &dir("best"),
    );
    run(
        &FilterOp,
        with(json!({"specialists": 60, "pick": "worst"})),
        &[("data", &dir("pool"))],
        &dir("worst"),
    );
    run(
        &FilterOp,
        with(json!({"random": 60, "seed": 1})),
        &[("data", &dir("pool"))],
        &dir("random"),
    );
    let (best, worst, random, pool) = (
        mean_quality(&dir("best")),
        mean_quality(&dir("worst")),
        mean_quality(&dir("random")),
        mean_quality(&dir("pool")),
    );
    assert!(
        best > random + 0.15 && random > worst + 0.15,
        "{best} {random} {worst}"
    );
    assert!(
        (random - pool).abs() < 0.05,
        "a random set is like the pool: {random} {pool}"
    );
    assert_eq!(Dataset::open(dir("random")).unwrap().len(), 60);

    // A random subset of a curated set: its images are the curated set's, a different seed
    // draws another subset.
    for seed in [1, 2] {
        run(
            &FilterOp,
            with(json!({"random": 20, "seed": seed, "recaption": false})),
            &[("data", &dir("best"))],
            &dir(&format!("subset-{seed}")),
        );
    }
    let names = |d: &Path| -> std::collections::BTreeSet<String> {
        Dataset::open(d)
            .unwrap()
            .records()
            .iter()
            .map(|r| r.file_name.clone())
            .collect()
    };
    let (curated, a, b) = (
        names(&dir("best")),
        names(&dir("subset-1")),
        names(&dir("subset-2")),
    );
    assert_eq!(a.len(), 20);
    assert!(a.is_subset(&curated) && b.is_subset(&curated));
    assert_ne!(a, b);
}
