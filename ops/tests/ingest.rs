//! The ingest op: both source layouts, the skip accounting of broken files, fitting.

mod common;

use std::fs;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use needle_ops::dataset::Dataset;
use needle_ops::ingest::Ingest;
use needle_ops::{Op, OpError};
use serde_json::{Value, json};

fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 37 % 256) as u8,
            (y * 53 % 256) as u8,
            ((x ^ y) * 11 % 256) as u8,
        ])
    })
}

fn encoded(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn put(dir: &Path, rel: &str, bytes: impl AsRef<[u8]>) {
    let path = dir.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

fn utf16(text: &str) -> Vec<u8> {
    let mut out = vec![0xff, 0xfe];
    out.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    out
}

/// Runs ingest with `path` relative to `recipe_dir`.
fn run(recipe_dir: &Path, params: Value, out: &Path, cpus: u32) -> Result<Value, OpError> {
    let mut ctx = common::context(&Ingest, params, out, cpus);
    ctx.recipe_dir = recipe_dir.to_path_buf();
    Ingest.run(&ctx)?;
    Ok(serde_json::from_slice(&fs::read(out.join("ingest.json")).unwrap()).unwrap())
}

/// A sidecar tree with two good images and one of every kind of broken file.
fn sidecar_tree(dir: &Path) {
    let png = encoded(&pattern(40, 30), ImageFormat::Png);
    put(dir, "good.png", &png);
    put(dir, "good.txt", "  a patterned\nsquare \n");
    put(
        dir,
        "sub/photo.JPG",
        encoded(&pattern(24, 48), ImageFormat::Jpeg),
    );
    put(dir, "sub/photo.txt", "\u{feff}a photo");
    put(dir, "truncated.png", &png[..png.len() / 2]);
    put(dir, "truncated.txt", "half an image");
    put(dir, "empty.png", b"");
    put(dir, "empty.txt", "nothing");
    put(dir, "notapng.png", b"this is text, not an image");
    put(dir, "notapng.txt", "text");
    put(dir, "uncaptioned.png", &png);
    put(dir, "wide16.png", &png);
    put(dir, "wide16.txt", utf16("a caption in UTF-16"));
    put(dir, "latin1.png", &png);
    put(dir, "latin1.txt", b"caf\xe9 au lait");
    put(dir, "blank.png", &png);
    put(dir, "blank.txt", " \n\t");
    // Not candidates: other files, hidden files and folders.
    put(dir, "README.md", "# images");
    put(dir, ".hidden.png", &png);
    put(dir, ".cache/x.png", &png);
}

#[test]
fn sidecar_layout_imports_the_good_and_counts_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    sidecar_tree(&tmp.path().join("src"));
    let out = tmp.path().join("out");
    let summary = run(tmp.path(), json!({"path": "src", "size": 16}), &out, 3).unwrap();

    assert_eq!(summary["layout"], json!("sidecar"));
    assert_eq!(summary["found"], json!(9));
    assert_eq!(summary["imported"], json!(2));
    assert_eq!(summary["skipped"], json!(7));
    assert_eq!(
        summary["skipped_by_kind"],
        json!({
            "empty_file": 1,
            "unreadable_image": 2,
            "no_caption": 1,
            "caption_not_utf8": 2,
            "empty_caption": 1,
        })
    );
    let skipped: Vec<(&str, &str)> = summary["skipped_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["file"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        skipped,
        [
            ("blank.png", "empty_caption"),
            ("empty.png", "empty_file"),
            ("latin1.png", "caption_not_utf8"),
            ("notapng.png", "unreadable_image"),
            ("truncated.png", "unreadable_image"),
            ("uncaptioned.png", "no_caption"),
            ("wide16.png", "caption_not_utf8"),
        ]
    );

    let ds = Dataset::open(&out).unwrap();
    let texts: Vec<(&str, &str)> = ds
        .records()
        .iter()
        .map(|r| (r.text.as_str(), r.extra["source"].as_str().unwrap()))
        .collect();
    assert_eq!(
        texts,
        [
            ("a patterned square", "good.png"),
            ("a photo", "sub/photo.JPG")
        ]
    );
    let px = ds.load_pixels(2).unwrap();
    assert_eq!((px.n, px.height, px.width), (2, 16, 16));
}

#[test]
fn image_folder_layout_carries_columns_and_skips_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("hf");
    put(
        &src,
        "train/a.png",
        encoded(&pattern(20, 20), ImageFormat::Png),
    );
    put(
        &src,
        "train/b.webp",
        encoded(&pattern(30, 20), ImageFormat::WebP),
    );
    put(
        &src,
        "train/c.bmp",
        encoded(&pattern(8, 8), ImageFormat::Bmp),
    );
    put(
        &src,
        "train/d.gif",
        encoded(&pattern(9, 12), ImageFormat::Gif),
    );
    let lines = [
        r#"{"file_name":"train/a.png","text":"first","license":"cc0"}"#,
        r#"{"file_name":"train/b.webp","text":"second","license":"cc-by"}"#,
        "not json at all",
        r#"{"file_name":"train/missing.png","text":"gone"}"#,
        r#"{"file_name":"../outside.png","text":"escape"}"#,
        r#"{"file_name":"train/c.bmp","caption":"not called text"}"#,
        r#"{"file_name":"train/d.gif","text":"fourth"}"#,
    ];
    put(&src, "metadata.jsonl", lines.join("\n") + "\n");
    let out = tmp.path().join("out");
    let summary = run(
        Path::new("/nowhere"),
        json!({"path": src, "size": 8}),
        &out,
        2,
    )
    .unwrap();

    assert_eq!(summary["layout"], json!("image_folder"));
    assert_eq!(summary["found"], json!(7));
    assert_eq!(summary["imported"], json!(3));
    assert_eq!(
        summary["skipped_by_kind"],
        json!({"bad_metadata_line": 2, "missing_image": 1, "no_caption": 1})
    );
    let files: Vec<&str> = summary["skipped_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        [
            "metadata.jsonl:3",
            "metadata.jsonl:5",
            "train/missing.png",
            "train/c.bmp"
        ]
    );

    let ds = Dataset::open(&out).unwrap();
    let recs = ds.records();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0].text, "first");
    assert_eq!(recs[0].extra["license"], json!("cc0"));
    assert_eq!(recs[2].text, "fourth");
    assert_eq!(ds.columns(), ["file_name", "text", "license", "source"]);
    assert_eq!(ds.load_pixels(1).unwrap().height, 8);
}

#[test]
fn nothing_importable_fails_with_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    put(&src, "empty.png", b"");
    put(&src, "empty.txt", "a");
    put(&src, "bad.png", b"garbage");
    put(&src, "bad.txt", "b");
    put(
        &src,
        "lonely.png",
        encoded(&pattern(8, 8), ImageFormat::Png),
    );
    let out = tmp.path().join("out");
    let err = run(tmp.path(), json!({"path": "src"}), &out, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing under"), "{err}");
    assert!(
        err.contains("1 empty_file, 1 unreadable_image, 1 no_caption"),
        "{err}"
    );
    assert!(!out.join("metadata.jsonl").exists());

    fs::create_dir_all(tmp.path().join("void")).unwrap();
    let err = run(
        tmp.path(),
        json!({"path": "void"}),
        &tmp.path().join("o2"),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no images found"), "{err}");

    let err = run(
        tmp.path(),
        json!({"path": "absent"}),
        &tmp.path().join("o3"),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("is not a directory"), "{err}");
}

#[test]
fn fit_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // A wide image: left half red, right half blue, a green band in the middle third.
    let wide = RgbImage::from_fn(90, 30, |x, _| match x {
        0..30 => Rgb([255, 0, 0]),
        30..60 => Rgb([0, 255, 0]),
        _ => Rgb([0, 0, 255]),
    });
    put(&src, "wide.png", encoded(&wide, ImageFormat::Png));
    put(&src, "wide.txt", "wide");
    let fitted = |fit: &str| {
        let out = tmp.path().join(fit);
        run(
            tmp.path(),
            json!({"path": "src", "size": 12, "fit": fit}),
            &out,
            1,
        )
        .unwrap();
        let ds = Dataset::open(&out).unwrap();
        let img = image::open(ds.image_path(&ds.records()[0]))
            .unwrap()
            .into_rgb8();
        assert_eq!(img.dimensions(), (12, 12));
        img
    };
    let (crop, stretch, pad) = (fitted("crop"), fitted("stretch"), fitted("pad"));
    let pixel = |img: &RgbImage, x: u32, y: u32| img.get_pixel(x, y).0;
    // crop keeps only the green middle.
    assert_eq!(pixel(&crop, 0, 6), [0, 255, 0]);
    // stretch keeps all three thirds.
    assert_eq!(pixel(&stretch, 0, 6), [255, 0, 0]);
    assert_eq!(pixel(&stretch, 11, 6), [0, 0, 255]);
    // pad: a 12×4 strip centred on black.
    assert_eq!(pixel(&pad, 6, 0), [0, 0, 0]);
    assert_eq!(pixel(&pad, 0, 6), [255, 0, 0]);
}

#[test]
fn transparency_is_composited_over_white() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let img = RgbaImage::from_pixel(16, 16, Rgba([0, 0, 0, 0]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png).unwrap();
    put(&src, "clear.png", bytes.into_inner());
    put(&src, "clear.txt", "nothing to see");
    let out = tmp.path().join("out");
    run(tmp.path(), json!({"path": "src"}), &out, 1).unwrap();
    let px = Dataset::open(&out).unwrap().load_pixels(1).unwrap();
    assert!(px.data.iter().all(|&b| b == 255));
}

#[test]
fn same_folder_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    sidecar_tree(&tmp.path().join("src"));
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    run(tmp.path(), json!({"path": "src"}), &a, 1).unwrap();
    run(tmp.path(), json!({"path": "src"}), &b, 4).unwrap();
    assert!(common::snapshot(&a) == common::snapshot(&b));
}

#[test]
fn size_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    sidecar_tree(&tmp.path().join("src"));
    let err = run(
        tmp.path(),
        json!({"path": "src", "size": 65}),
        &tmp.path().join("o"),
        1,
    )
    .unwrap_err();
    assert!(
        matches!(err, OpError::Param { ref name, .. } if name == "size"),
        "{err}"
    );
}
