//! Pixel detectors for the automatic stages of the funnel, the stand-ins for the paper's
//! offensive-content, OCR and size/aspect filters. They see only pixels: never a rating.
//!
//! Every function takes one RGB image as `size × size × 3` bytes and works at any size the
//! haystack allows (8 to 64): lengths are in "cells", `size / 16` pixels.

/// `overlay_energy` above this: a text band.
pub const OVERLAY_THRESHOLD: f32 = 0.12;
/// `subject_cut` above this: the subject is cut by the frame.
pub const CUT_THRESHOLD: f32 = 0.24;

/// Linear RGB in [0, 1] of pixel `i`.
fn px(img: &[u8], i: usize) -> [f32; 3] {
    [
        f32::from(img[3 * i]) / 255.0,
        f32::from(img[3 * i + 1]) / 255.0,
        f32::from(img[3 * i + 2]) / 255.0,
    ]
}

fn luma(p: [f32; 3]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

fn cell(size: usize) -> usize {
    (size / 16).max(1)
}

/// The "unsafe" marker: a checkerboard of magenta and black cells (at least 2×2 cells of it).
pub fn unsafe_marker(img: &[u8], size: usize) -> bool {
    let c = cell(size);
    let magenta = |p: [f32; 3]| p[0] > 0.7 && p[2] > 0.7 && p[1] < 0.3;
    let black = |p: [f32; 3]| p.iter().all(|&v| v < 0.3);
    // Sample the centre pixel of each cell of a 2×2-cell window.
    let at = |x: usize, y: usize| px(img, y * size + x);
    let half = c / 2;
    (0..size.saturating_sub(2 * c - 1)).any(|y| {
        (0..size.saturating_sub(2 * c - 1)).any(|x| {
            let (x0, y0, x1, y1) = (x + half, y + half, x + c + half, y + c + half);
            magenta(at(x0, y0)) && black(at(x1, y0)) && black(at(x0, y1)) && magenta(at(x1, y1))
        })
    })
}

/// How much a band at the top or the bottom of the image looks like burnt-in text: the
/// horizontal contrast energy in its middle rows, less that of the rest of the image. Around 0
/// for a plain image, well above 0.1 for an overlay band.
pub fn overlay_energy(img: &[u8], size: usize) -> f32 {
    let c = cell(size);
    let band = 5 * c;
    if size < band + 2 {
        return 0.0;
    }
    let row_energy = |y: usize| -> f32 {
        (0..size - 1)
            .map(|x| (luma(px(img, y * size + x + 1)) - luma(px(img, y * size + x))).abs())
            .sum::<f32>()
            / (size - 1) as f32
    };
    let energies: Vec<f32> = (0..size).map(row_energy).collect();
    let mean = |rows: std::ops::Range<usize>| {
        let n = rows.len().max(1) as f32;
        rows.map(|y| energies[y]).sum::<f32>() / n
    };
    // The glyph rows are the middle three cells of the band.
    let top = mean(c..4 * c) - mean(band..size);
    let bottom = mean(size - 4 * c..size - c) - mean(0..size - band);
    top.max(bottom)
}

/// The share of the subject that lies on the frame's outer ring of cells: small for a subject
/// placed inside the frame, large for one cut by it. The subject is taken to be the fifth of
/// the pixels that depart most from a smooth background: a quadratic colour surface fitted to
/// the whole image by least squares.
pub fn subject_cut(img: &[u8], size: usize) -> f32 {
    let n = size * size;
    let h = (size as f64 - 1.0) / 2.0;
    // Basis 1, x, y, x², xy, y² on centred, scaled coordinates.
    let basis: Vec<[f64; 6]> = (0..n)
        .map(|i| {
            let x = ((i % size) as f64 - h) / h.max(1.0);
            let y = ((i / size) as f64 - h) / h.max(1.0);
            [1.0, x, y, x * x, x * y, y * y]
        })
        .collect();
    let mut gram = [[0.0f64; 6]; 6];
    for b in &basis {
        for (row, br) in gram.iter_mut().zip(b) {
            for (g, bc) in row.iter_mut().zip(b) {
                *g += br * bc;
            }
        }
    }
    let mut residual = vec![0.0f64; n];
    for ch in 0..3 {
        let v: Vec<f64> = (0..n).map(|i| f64::from(px(img, i)[ch])).collect();
        let mut rhs = [0.0f64; 6];
        for (b, v) in basis.iter().zip(&v) {
            for (r, br) in rhs.iter_mut().zip(b) {
                *r += br * v;
            }
        }
        let coef = solve6(gram, rhs);
        for (i, r) in residual.iter_mut().enumerate() {
            let fit: f64 = (0..6).map(|k| coef[k] * basis[i][k]).sum();
            *r += (v[i] - fit).powi(2);
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| residual[b].total_cmp(&residual[a]));
    let subject = &order[..(n / 5).max(1)];
    let ring = cell(size);
    let on_ring = subject
        .iter()
        .filter(|&&i| {
            let (x, y) = (i % size, i / size);
            x < ring || y < ring || x >= size - ring || y >= size - ring
        })
        .count();
    on_ring as f32 / subject.len() as f32
}

/// Gaussian elimination with partial pivoting for the 6×6 normal equations.
fn solve6(mut a: [[f64; 6]; 6], mut b: [f64; 6]) -> [f64; 6] {
    for col in 0..6 {
        let pivot = (col..6)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("non-empty range");
        a.swap(col, pivot);
        b.swap(col, pivot);
        let d = a[col][col];
        if d.abs() < 1e-12 {
            continue;
        }
        let pivot_row = a[col];
        for row in col + 1..6 {
            let f = a[row][col] / d;
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0f64; 6];
    for row in (0..6).rev() {
        let s: f64 = (row + 1..6).map(|k| a[row][k] * x[k]).sum();
        x[row] = if a[row][row].abs() < 1e-12 {
            0.0
        } else {
            (b[row] - s) / a[row][row]
        };
    }
    x
}
