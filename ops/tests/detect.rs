//! The funnel's pixel detectors against the haystack's hidden truth.

use needle_ops::detect::{overlay_energy, subject_cut, unsafe_marker};
use needle_ops::haystack::{HaystackParams, ImageSpec, render, sample_spec};

fn images(size: u32, count: usize) -> Vec<(ImageSpec, Vec<u8>)> {
    let p = HaystackParams {
        overlay: 0.3,
        unsafe_share: 0.3,
        ..HaystackParams::default()
    };
    (0..count)
        .map(|i| {
            let spec = sample_spec(&p, i);
            let img = render(&spec, size).into_raw();
            (spec, img)
        })
        .collect()
}

/// (hits / positives, false alarms / negatives).
fn rates(
    set: &[(ImageSpec, Vec<u8>)],
    truth: impl Fn(&ImageSpec) -> bool,
    found: impl Fn(&[u8]) -> bool,
) -> (f64, f64) {
    let (mut hits, mut pos, mut fa, mut neg) = (0, 0, 0, 0);
    for (spec, img) in set {
        let f = found(img);
        if truth(spec) {
            pos += 1;
            hits += usize::from(f);
        } else {
            neg += 1;
            fa += usize::from(f);
        }
    }
    (hits as f64 / pos as f64, fa as f64 / neg as f64)
}

#[test]
fn unsafe_markers_are_found_at_every_size() {
    for size in [8u32, 16, 32, 64] {
        let set = images(size, 300);
        let s = size as usize;
        let (recall, false_alarms) = rates(&set, |s| s.unsafe_marker, |img| unsafe_marker(img, s));
        assert!(recall > 0.95, "size {size}: recall {recall}");
        assert!(
            false_alarms < 0.01,
            "size {size}: false alarms {false_alarms}"
        );
    }
}

#[test]
fn overlays_are_found() {
    for size in [16u32, 32] {
        let set = images(size, 400);
        let s = size as usize;
        let (recall, false_alarms) = rates(
            &set,
            |s| s.overlay,
            |img| overlay_energy(img, s) > needle_ops::detect::OVERLAY_THRESHOLD,
        );
        assert!(recall > 0.9, "size {size}: recall {recall}");
        assert!(
            false_alarms < 0.05,
            "size {size}: false alarms {false_alarms}"
        );
    }
}

#[test]
fn cut_subjects_score_higher() {
    let set: Vec<_> = images(16, 600)
        .into_iter()
        .filter(|(s, _)| !s.overlay && !s.unsafe_marker)
        .collect();
    let flagged: Vec<bool> = set
        .iter()
        .map(|(_, img)| subject_cut(img, 16) > needle_ops::detect::CUT_THRESHOLD)
        .collect();
    let mean = |keep: bool| {
        let v: Vec<f64> = set
            .iter()
            .zip(&flagged)
            .filter(|(_, f)| **f == keep)
            .map(|((s, _), _)| s.sub.composition)
            .collect();
        (v.iter().sum::<f64>() / v.len() as f64, v.len())
    };
    let (cut, n_cut) = mean(true);
    let (kept, n_kept) = mean(false);
    eprintln!("flagged {n_cut}: composition {cut:.3}; kept {n_kept}: {kept:.3}");
    assert!(kept - cut > 0.1, "flagged {cut:.3} vs kept {kept:.3}");
    assert!(n_cut > set.len() / 10 && n_kept > set.len() / 3);
}
