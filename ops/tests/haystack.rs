//! The haystack op: determinism, the rates it promises, what is hidden, and that the hidden
//! ratings show in the pixels.

mod common;

use std::collections::BTreeSet;

use needle_core::ops::ParamsSchema;
use needle_ops::dataset::Dataset;
use needle_ops::haystack::{
    Concept, HELD_OUT, Haystack, HaystackParams, ImageSpec, PREFERENCE, RUBRIC, render, sample_spec,
};
use needle_ops::{Op, OpError, Registry};
use serde_json::{Value, json};

fn run(params: Value, out: &std::path::Path, cpus: u32) -> Result<(), OpError> {
    Haystack.run(&common::context(&Haystack, params, out, cpus))
}

fn specs(n: usize, seed: u64) -> Vec<ImageSpec> {
    let p = HaystackParams {
        seed,
        ..HaystackParams::default()
    };
    (0..n).map(|i| sample_spec(&p, i)).collect()
}

fn share(specs: &[ImageSpec], f: impl Fn(&ImageSpec) -> bool) -> f64 {
    specs.iter().filter(|s| f(s)).count() as f64 / specs.len() as f64
}

#[test]
fn same_params_same_bytes_whatever_the_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    run(json!({"images": 200, "seed": 3}), &a, 1).unwrap();
    run(json!({"images": 200, "seed": 3}), &b, 4).unwrap();
    let (a, b) = (common::snapshot(&a), common::snapshot(&b));
    assert_eq!(
        a.len(),
        200 + 3,
        "images, metadata.jsonl, haystack.json, summary.md"
    );
    assert!(a == b, "two runs of the same params differ");

    run(json!({"images": 200, "seed": 4}), &c, 2).unwrap();
    let c = common::snapshot(&c);
    assert_ne!(a["metadata.jsonl"], c["metadata.jsonl"]);
    let same = a
        .iter()
        .filter(|(k, v)| k.ends_with(".png") && c.get(*k) == Some(*v))
        .count();
    assert_eq!(same, 0, "images repeat across seeds");
}

/// Pearson correlation of two samples.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn the_factors_are_independent_and_the_two_truths_differ() {
    // The module doc promises: any two factors |r| < 0.05 on 5,000 images (the standard error
    // of r is 0.014 there), rubric and preference r in 0.30..0.50 (0.40 by construction).
    let s = specs(5000, 11);
    let factors: Vec<Vec<f64>> = (0..7)
        .map(|k| s.iter().map(|s| s.sub.values()[k]).collect())
        .collect();
    for a in 0..7 {
        for b in a + 1..7 {
            let r = correlation(&factors[a], &factors[b]);
            assert!(r.abs() < 0.05, "factors {a} and {b}: r = {r}");
        }
        let mean = factors[a].iter().sum::<f64>() / 5000.0;
        assert!((0.41..0.45).contains(&mean), "factor {a}: mean {mean}");
    }
    let rubric: Vec<f64> = s.iter().map(|s| s.quality).collect();
    let preference: Vec<f64> = s.iter().map(|s| s.preference).collect();
    let r = correlation(&rubric, &preference);
    assert!((0.30..0.50).contains(&r), "rubric vs preference: r = {r}");
    // Each truth is its documented weighting, and nothing else.
    for spec in &s {
        let w = |weights: &[f64; 7]| -> f64 {
            spec.sub
                .values()
                .iter()
                .zip(weights)
                .map(|(v, w)| v * w)
                .sum()
        };
        assert!((spec.quality - w(&RUBRIC)).abs() < 1e-4);
        assert!((spec.preference - w(&PREFERENCE)).abs() < 1e-4);
    }
    // Some factors only the judges weigh, some only the curators.
    let only = |a: &[f64; 7], b: &[f64; 7]| (0..7).filter(|&k| a[k] > 0.0 && b[k] == 0.0).count();
    assert!(only(&PREFERENCE, &RUBRIC) >= 2 && only(&RUBRIC, &PREFERENCE) >= 2);
    let needles = share(&s, |s| s.quality > 0.7);
    assert!((0.002..0.015).contains(&needles), "{needles}");
}

#[test]
fn held_out_concepts_are_never_shown_or_named() {
    let s = specs(20_000, 5);
    for spec in &s {
        assert!(
            !spec.concept.is_held_out(),
            "image {} shows {:?}",
            spec.index,
            spec.concept
        );
        assert!(
            !spec.captioned.is_held_out(),
            "image {} is captioned {}",
            spec.index,
            spec.caption()
        );
        for held in HELD_OUT {
            assert!(!spec.caption().contains(&held.name()));
        }
    }
    // Every other concept is there, and every word of a held-out one.
    let shown: BTreeSet<Concept> = s.iter().map(|s| s.concept).collect();
    assert_eq!(shown.len(), 28);
    // The judges' sample holds them all.
    let p = HaystackParams {
        hold_out: false,
        ..HaystackParams::default()
    };
    let all: BTreeSet<Concept> = (0..2000).map(|i| sample_spec(&p, i).concept).collect();
    assert_eq!(all.len(), 32);
    assert!(HELD_OUT.iter().all(|c| all.contains(c)));
}

#[test]
fn web_flaws_come_at_the_asked_rates() {
    let s = specs(20_000, 5);
    let wrong = share(&s, |s| !s.caption_correct());
    let overlay = share(&s, |s| s.overlay);
    let unsafe_ = share(&s, |s| s.unsafe_marker);
    assert!((0.285..0.315).contains(&wrong), "{wrong}");
    assert!((0.07..0.09).contains(&overlay), "{overlay}");
    assert!((0.016..0.024).contains(&unsafe_), "{unsafe_}");
    // Flaws gather on poor images (by the rubric), as on the web.
    let poor: Vec<_> = s.iter().filter(|s| s.quality < 0.33).collect();
    let good: Vec<_> = s.iter().filter(|s| s.quality > 0.53).collect();
    let wrong_share = |set: &[&ImageSpec]| {
        set.iter().filter(|s| !s.caption_correct()).count() as f64 / set.len() as f64
    };
    assert!(wrong_share(&poor) > wrong_share(&good) + 0.05);

    let p = HaystackParams {
        wrong_captions: 0.0,
        overlay: 1.0,
        unsafe_share: 0.0,
        ..HaystackParams::default()
    };
    let s: Vec<_> = (0..500).map(|i| sample_spec(&p, i)).collect();
    assert!(
        s.iter()
            .all(|s| s.caption_correct() && s.overlay && !s.unsafe_marker)
    );
}

#[test]
fn only_file_name_and_text_are_observable() {
    let tmp = tempfile::tempdir().unwrap();
    run(json!({"images": 200, "size": 12}), tmp.path(), 2).unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    assert_eq!(ds.len(), 200);
    assert_eq!(ds.columns(), ["file_name", "text"]);
    let hidden: BTreeSet<&str> = ds
        .records()
        .iter()
        .flat_map(|r| r.extra.keys().map(String::as_str))
        .collect();
    let expected: BTreeSet<&str> = [
        "rating_quality",
        "rating_preference",
        "rating_color_contrast",
        "rating_background",
        "rating_lighting",
        "rating_focus",
        "rating_noise",
        "rating_clutter",
        "rating_composition",
        "rating_caption_correct",
        "rating_overlay",
        "rating_unsafe",
        "rating_true_shape",
        "rating_true_color",
        "rating_true_size",
    ]
    .into();
    assert_eq!(hidden, expected);
    for r in ds.records() {
        assert_eq!(r.extra.len(), expected.len(), "{}", r.file_name);
        let caption_correct = r.text
            == format!(
                "a {} {} {}",
                r.extra["rating_true_size"].as_str().unwrap(),
                r.extra["rating_true_color"].as_str().unwrap(),
                r.extra["rating_true_shape"].as_str().unwrap()
            );
        assert_eq!(json!(caption_correct), r.extra["rating_caption_correct"]);
    }
    let px = ds.load_pixels(2).unwrap();
    assert_eq!((px.n, px.height, px.width), (200, 12, 12));
}

#[test]
fn summary_counts_agree_with_the_ratings() {
    let tmp = tempfile::tempdir().unwrap();
    run(
        json!({"images": 300, "overlay": 0.2, "unsafe": 0.1}),
        tmp.path(),
        2,
    )
    .unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    let summary: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("haystack.json")).unwrap()).unwrap();
    let count = |name: &str| ds.ratings(name).unwrap().iter().sum::<f64>() as u64;
    assert_eq!(summary["images"], json!(300));
    assert_eq!(summary["size"], json!(16));
    assert_eq!(summary["overlays"], json!(count("overlay")));
    assert_eq!(summary["unsafe"], json!(count("unsafe")));
    assert_eq!(
        summary["wrong_captions"],
        json!(300 - count("caption_correct"))
    );
    let per_concept = summary["per_concept"].as_object().unwrap();
    assert!(per_concept.len() <= 28, "{per_concept:?}");
    assert_eq!(summary["held_out"].as_array().unwrap().len(), 4);
    assert_eq!(
        per_concept
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        300
    );
    let q = ds.ratings("quality").unwrap();
    let needles = q.iter().filter(|&&q| q > 0.7).count() as f64 / 300.0;
    let mean = q.iter().sum::<f64>() / 300.0;
    assert!((summary["share_quality_above_0.7"].as_f64().unwrap() - needles).abs() < 1e-4);
    assert!((summary["mean_quality"].as_f64().unwrap() - mean).abs() < 1e-4);
}

#[test]
fn size_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    for size in [0, 7, 65, 1024] {
        let err = run(json!({"images": 2, "size": size}), &tmp.path().join("x"), 1).unwrap_err();
        match err {
            OpError::Param { name, why } => {
                assert_eq!(name, "size");
                assert!(why.contains("8..=64"), "{why}");
            }
            other => panic!("{other}"),
        }
    }
    for size in [8, 64] {
        let out = tmp.path().join(size.to_string());
        run(json!({"images": 3, "size": size}), &out, 1).unwrap();
        let px = Dataset::open(&out).unwrap().load_pixels(1).unwrap();
        assert_eq!((px.height, px.width), (size, size));
    }
}

#[test]
fn bad_params_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (params, name) in [
        (json!({"images": 0}), "images"),
        (json!({"wrong_captions": 1.5}), "wrong_captions"),
        (json!({"overlay": -0.1}), "overlay"),
        (json!({"unsafe": 2.0}), "unsafe"),
        (json!({"seed": -1}), "seed"),
    ] {
        let err = run(params, tmp.path(), 1).unwrap_err();
        assert!(
            matches!(&err, OpError::Param { name: n, .. } if n == name),
            "{name}: {err}"
        );
    }
}

#[test]
fn schema_defaults_are_the_params_defaults() {
    let schema = Haystack.schema();
    assert_eq!((schema.name, schema.version), ("haystack", 3));
    let ParamsSchema::Fixed(specs) = &schema.params else {
        panic!("fixed params")
    };
    let names: Vec<_> = specs.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "images",
            "size",
            "seed",
            "wrong_captions",
            "overlay",
            "unsafe",
            "hold_out"
        ]
    );
    let ctx = common::context(&Haystack, json!({}), std::path::Path::new("/x"), 1);
    assert_eq!(
        HaystackParams::from_ctx(&ctx).unwrap(),
        HaystackParams::default()
    );
    assert!(needle_core::ops::OpCatalog::get(&Registry::new(), "haystack").is_some());
    assert!(needle_ops::builtin("haystack").is_some());
    assert!(needle_ops::builtin("ingest").is_some());
}

// What the curators see: the hidden ratings must show in the pixels.

/// Mean saturation (max − min) of the most saturated quarter of the pixels.
fn vividness(img: &image::RgbImage) -> f32 {
    let mut sat: Vec<f32> = img
        .pixels()
        .map(|p| {
            let (hi, lo) = (p.0.iter().max().unwrap(), p.0.iter().min().unwrap());
            f32::from(hi - lo) / 255.0
        })
        .collect();
    sat.sort_by(|a, b| b.total_cmp(a));
    let top = &sat[..sat.len() / 4];
    top.iter().sum::<f32>() / top.len() as f32
}

/// Mean absolute difference between horizontal neighbours: noise raises it.
fn roughness(img: &image::RgbImage) -> f32 {
    let s = img.width() as usize;
    let px = img.as_raw();
    let mut total = 0.0;
    for y in 0..s {
        for x in 0..s - 1 {
            for c in 0..3 {
                let (a, b) = (px[(y * s + x) * 3 + c], px[(y * s + x + 1) * 3 + c]);
                total += f32::from(a.abs_diff(b));
            }
        }
    }
    total / (s * (s - 1) * 3) as f32
}

#[test]
fn the_unsafe_marker_is_found_from_pixels() {
    let p = HaystackParams {
        unsafe_share: 0.5,
        ..HaystackParams::default()
    };
    let (mut hits, mut false_alarms, mut marked) = (0, 0, 0);
    for i in 0..400 {
        let spec = sample_spec(&p, i);
        let found = needle_ops::detect::unsafe_marker(render(&spec, 16).as_raw(), 16);
        marked += usize::from(spec.unsafe_marker);
        hits += usize::from(found && spec.unsafe_marker);
        false_alarms += usize::from(found && !spec.unsafe_marker);
    }
    assert!(hits as f64 > 0.95 * marked as f64, "{hits} of {marked}");
    assert_eq!(false_alarms, 0);
}

#[test]
fn sub_qualities_show_in_the_pixels() {
    let p = HaystackParams {
        overlay: 0.0,
        unsafe_share: 0.0,
        ..HaystackParams::default()
    };
    let base: Vec<ImageSpec> = (0..200).map(|i| sample_spec(&p, i)).collect();
    let mean = |f: &dyn Fn(&image::RgbImage) -> f32, set: &dyn Fn(&mut ImageSpec)| {
        base.iter()
            .map(|s| {
                let mut s = s.clone();
                set(&mut s);
                f(&render(&s, 16))
            })
            .sum::<f32>()
            / base.len() as f32
    };
    let vivid = mean(&vividness, &|s| s.sub.color = 0.95);
    let dull = mean(&vividness, &|s| s.sub.color = 0.05);
    assert!(vivid > dull + 0.15, "vivid {vivid}, dull {dull}");
    let clean = mean(&roughness, &|s| s.sub.noise = 0.95);
    let noisy = mean(&roughness, &|s| s.sub.noise = 0.05);
    assert!(noisy > clean * 1.5, "noisy {noisy}, clean {clean}");
    let sharp = mean(&roughness, &|s| {
        s.sub.focus = 0.95;
        s.sub.noise = 1.0;
    });
    let blurred = mean(&roughness, &|s| {
        s.sub.focus = 0.05;
        s.sub.noise = 1.0;
    });
    assert!(sharp > blurred * 1.2, "sharp {sharp}, blurred {blurred}");
}
