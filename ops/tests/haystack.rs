//! The haystack op: determinism, the rates it promises, what is hidden, and that the hidden
//! ratings show in the pixels.

mod common;

use std::collections::BTreeSet;

use needle_core::ops::ParamsSchema;
use needle_ops::dataset::Dataset;
use needle_ops::haystack::{Haystack, HaystackParams, ImageSpec, render, sample_spec};
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

#[test]
fn the_needles_are_about_one_percent() {
    // Beta(2, 3): P(q > 0.85) = 0.0120, mean 0.4; over 20,000 draws the standard error of
    // the share is 0.0008.
    let s = specs(20_000, 11);
    let needles = share(&s, |s| s.quality > 0.85);
    assert!((0.009..0.015).contains(&needles), "{needles}");
    let mean = s.iter().map(|s| s.quality).sum::<f64>() / s.len() as f64;
    assert!((0.39..0.41).contains(&mean), "{mean}");
    assert!(s.iter().all(|s| (0.0..=1.0).contains(&s.quality)));
    // The sub-qualities follow q.
    let high: Vec<_> = s.iter().filter(|s| s.quality > 0.85).collect();
    let mean_sub = high.iter().map(|s| s.sub.composition).sum::<f64>() / high.len() as f64;
    assert!(mean_sub > 0.8, "{mean_sub}");
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
    // A wrong caption is wrong in the shape, the colour, or both.
    let shape_only = share(&s, |s| {
        s.caption_shape != s.shape && s.caption_colour == s.colour
    });
    let both = share(&s, |s| {
        s.caption_shape != s.shape && s.caption_colour != s.colour
    });
    assert!((0.08..0.12).contains(&shape_only), "{shape_only}");
    assert!((0.08..0.12).contains(&both), "{both}");
    // Flaws gather on poor images, as on the web.
    let poor: Vec<_> = s.iter().filter(|s| s.quality < 0.3).collect();
    let good: Vec<_> = s.iter().filter(|s| s.quality > 0.6).collect();
    let wrong_share = |set: &[&ImageSpec]| {
        set.iter().filter(|s| !s.caption_correct()).count() as f64 / set.len() as f64
    };
    assert!(wrong_share(&poor) > wrong_share(&good) + 0.1);

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
    ]
    .into();
    assert_eq!(hidden, expected);
    for r in ds.records() {
        assert_eq!(r.extra.len(), expected.len(), "{}", r.file_name);
        let caption_correct = r.text
            == format!(
                "a {} {}",
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
    assert_eq!(per_concept.len(), 16);
    assert_eq!(
        per_concept
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        300
    );
    let q = ds.ratings("quality").unwrap();
    let needles = q.iter().filter(|&&q| q > 0.85).count() as f64 / 300.0;
    let mean = q.iter().sum::<f64>() / 300.0;
    assert!((summary["share_quality_above_0.85"].as_f64().unwrap() - needles).abs() < 1e-4);
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
    assert_eq!((schema.name, schema.version), ("haystack", 2));
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
            "unsafe"
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
