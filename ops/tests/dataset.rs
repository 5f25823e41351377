//! The image-folder dataset format: writing, reading, hidden ratings, linked subsets.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use image::{Rgb, RgbImage};
use needle_ops::OpError;
use needle_ops::dataset::{Dataset, DatasetWriter, METADATA, Record};
use serde_json::{Map, Value, json};

fn solid(w: u32, h: u32, v: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([v, x as u8, y as u8]))
}

fn cols(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// Three 4×4 images with an observable column and two hidden ones.
fn sample(dir: &std::path::Path) -> Dataset {
    let w = DatasetWriter::create(dir).unwrap();
    for (i, stem) in ["a", "b", "c"].iter().enumerate() {
        let extra = cols(json!({
            "source": format!("web/{stem}"),
            "rating_quality": i as f64 / 2.0,
            "rating_unsafe": i == 1,
        }));
        w.add_png(
            stem,
            &solid(4, 4, i as u8 * 100),
            &format!("image {stem}"),
            extra,
        )
        .unwrap();
    }
    assert_eq!(w.finish().unwrap(), 3);
    Dataset::open(dir).unwrap()
}

#[test]
fn round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = sample(tmp.path());
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.root(), tmp.path());
    let rec = &ds.records()[1];
    assert_eq!(rec.file_name, "images/b.png");
    assert_eq!(rec.text, "image b");
    assert_eq!(rec.extra["source"], json!("web/b"));
    assert!(ds.image_path(rec).is_file());
    assert_eq!(ds.columns(), ["file_name", "text", "source"]);
    assert_eq!(ds.ratings("quality").unwrap(), [0.0, 0.5, 1.0]);
    assert_eq!(ds.ratings("unsafe").unwrap(), [0.0, 1.0, 0.0]);
    let err = ds.ratings("missing").unwrap_err().to_string();
    assert!(err.contains("has no `rating_missing`"), "{err}");

    let px = ds.load_pixels(2).unwrap();
    assert_eq!((px.n, px.height, px.width), (3, 4, 4));
    assert_eq!(px.data.len(), 3 * 4 * 4 * 3);
    for i in 0..3 {
        assert_eq!(px.image(i), solid(4, 4, i as u8 * 100).as_raw().as_slice());
    }
}

#[test]
fn metadata_lines_have_a_fixed_column_order() {
    let tmp = tempfile::tempdir().unwrap();
    sample(tmp.path());
    let text = fs::read_to_string(tmp.path().join(METADATA)).unwrap();
    let first = text.lines().next().unwrap();
    assert_eq!(
        first,
        r#"{"file_name":"images/a.png","text":"image a","rating_quality":0.0,"rating_unsafe":false,"source":"web/a"}"#
    );
}

#[test]
fn output_does_not_depend_on_the_order_of_adding() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = DatasetWriter::create(one.path()).unwrap();
    w.add_png("x", &solid(2, 2, 1), "x", cols(json!({"b": 1, "a": 2})))
        .unwrap();
    w.add_png("y", &solid(2, 2, 2), "y", Map::new()).unwrap();
    w.finish().unwrap();
    let w = DatasetWriter::create(two.path()).unwrap();
    w.add_png("y", &solid(2, 2, 2), "y", Map::new()).unwrap();
    w.add_png("x", &solid(2, 2, 1), "x", cols(json!({"a": 2, "b": 1})))
        .unwrap();
    w.finish().unwrap();
    assert_eq!(common::snapshot(one.path()), common::snapshot(two.path()));
}

#[test]
fn no_metadata_until_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let w = DatasetWriter::create(tmp.path()).unwrap();
    w.add_png("a", &solid(2, 2, 0), "a", Map::new()).unwrap();
    assert!(!tmp.path().join(METADATA).exists());
    drop(w);
    assert!(Dataset::open(tmp.path()).is_err());
    let w = DatasetWriter::create(tmp.path()).unwrap();
    w.finish().unwrap();
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    // A finished dataset is not written over.
    assert!(DatasetWriter::create(tmp.path()).is_err());
}

#[test]
fn add_png_refuses_paths_duplicates_and_reserved_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let w = DatasetWriter::create(tmp.path()).unwrap();
    let img = solid(2, 2, 0);
    for stem in ["", "a/b", "a\\b", "..", ".hidden"] {
        let err = w.add_png(stem, &img, "t", Map::new()).unwrap_err();
        assert!(matches!(err, OpError::Dataset { .. }), "{stem}: {err}");
    }
    w.add_png("a", &img, "t", Map::new()).unwrap();
    let err = w.add_png("a", &img, "t", Map::new()).unwrap_err();
    assert!(err.to_string().contains("already added"), "{err}");
    let err = w
        .add_png("b", &img, "t", cols(json!({"text": "x"})))
        .unwrap_err();
    assert!(err.to_string().contains("`text`"), "{err}");
    // A refused record leaves nothing behind in the metadata.
    assert_eq!(w.finish().unwrap(), 1);
}

#[test]
fn open_reports_the_line_of_a_bad_record() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |text: &str| fs::write(tmp.path().join(METADATA), text).unwrap();
    let ok = r#"{"file_name":"images/a.png","text":"a"}"#;

    write(&format!("{ok}\n\n{{\"file_name\":\"images/b.png\"}}\n"));
    let err = Dataset::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("metadata.jsonl:3:"), "{err}");
    assert!(err.contains("missing field `text`"), "{err}");

    write(&format!("{ok}\nnot json\n"));
    let err = Dataset::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("metadata.jsonl:2:"), "{err}");

    write(&format!("{ok}\n{ok}\n"));
    let err = Dataset::open(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("metadata.jsonl:2:") && err.contains("twice"),
        "{err}"
    );

    for escape in ["../x.png", "/etc/passwd", "a/../../x.png"] {
        write(&format!("{{\"file_name\":\"{escape}\",\"text\":\"a\"}}\n"));
        let err = Dataset::open(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("not a relative path inside"),
            "{escape}: {err}"
        );
    }

    let err = Dataset::open(tmp.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is this a dataset?"), "{err}");
}

#[test]
fn load_pixels_names_the_first_image_of_another_size() {
    let tmp = tempfile::tempdir().unwrap();
    let w = DatasetWriter::create(tmp.path()).unwrap();
    for i in 0..40 {
        let img = if i == 23 || i == 31 {
            solid(5, 4, 0)
        } else {
            solid(4, 4, 0)
        };
        w.add_png(&format!("{i:03}"), &img, "t", Map::new())
            .unwrap();
    }
    w.finish().unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    for threads in [1, 3, 8] {
        let err = ds.load_pixels(threads).unwrap_err().to_string();
        assert!(err.contains("`images/023.png` is 5×4"), "{err}");
        assert!(
            err.contains("`images/000.png` (the first image) is 4×4"),
            "{err}"
        );
    }
}

#[test]
fn load_pixels_of_an_empty_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    DatasetWriter::create(tmp.path()).unwrap().finish().unwrap();
    let px = Dataset::open(tmp.path()).unwrap().load_pixels(4).unwrap();
    assert_eq!(px.n, 0);
    assert!(px.data.is_empty());
}

#[test]
fn a_linked_subset_shares_the_image_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample(&tmp.path().join("all"));
    let sub_dir = tmp.path().join("subset");
    let w = DatasetWriter::create(&sub_dir).unwrap();
    let kept: Vec<&Record> = src.records().iter().step_by(2).collect();
    for rec in &kept {
        w.add_linked(&src, rec, cols(json!({"kept_by": "test"})))
            .unwrap();
    }
    let err = w.add_linked(&src, kept[0], Map::new()).unwrap_err();
    assert!(err.to_string().contains("already added"), "{err}");
    assert_eq!(w.finish().unwrap(), 2);

    let sub = Dataset::open(&sub_dir).unwrap();
    assert_eq!(sub.len(), 2);
    for (rec, orig) in sub.records().iter().zip(&kept) {
        assert_eq!(rec.file_name, orig.file_name);
        assert_eq!(rec.text, orig.text);
        assert_eq!(rec.extra["rating_quality"], orig.extra["rating_quality"]);
        assert_eq!(rec.extra["kept_by"], json!("test"));
        let (a, b) = (
            fs::metadata(sub.image_path(rec)).unwrap(),
            fs::metadata(src.image_path(orig)).unwrap(),
        );
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "not a hard link");
    }
    assert_eq!(sub.ratings("quality").unwrap(), [0.0, 1.0]);
}

#[test]
fn a_linked_record_may_get_a_new_caption() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample(&tmp.path().join("all"));
    let w = DatasetWriter::create(tmp.path().join("sub")).unwrap();
    let rec = &src.records()[0];
    w.add_linked(&src, rec, cols(json!({"text": "a better caption"})))
        .unwrap();
    let err = w
        .add_linked(&src, &src.records()[1], cols(json!({"text": 3})))
        .unwrap_err();
    assert!(err.to_string().contains("not a string"), "{err}");
    w.finish().unwrap();
    let sub = Dataset::open(tmp.path().join("sub")).unwrap();
    assert_eq!(sub.records()[0].text, "a better caption");
    assert!(!sub.records()[0].extra.contains_key("text"));
}
