//! Render a contact sheet of the haystack: the 8 lowest-quality images of a sample on the
//! top row, the 8 highest below, each upscaled ×4 (nearest neighbour), plus rows of images
//! with one sub-quality pushed low and a row with overlays and unsafe markers.
//!
//! `cargo run -p needle-ops --release --example contact_sheet -- OUT.png [SIZE] [SEED]`

use image::{RgbImage, imageops};
use needle_ops::haystack::{HaystackParams, ImageSpec, render, sample_spec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("contact_sheet.png");
    let size: u32 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let seed: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let p = HaystackParams {
        images: 4000,
        size,
        seed,
        ..HaystackParams::default()
    };
    let mut specs: Vec<ImageSpec> = (0..p.images).map(|i| sample_spec(&p, i)).collect();
    specs.sort_by(|a, b| a.quality.total_cmp(&b.quality));
    let clean = |s: &&ImageSpec| !s.overlay && !s.unsafe_marker;
    let mut rows: Vec<Vec<ImageSpec>> = vec![
        specs.iter().filter(clean).take(8).cloned().collect(),
        specs
            .iter()
            .filter(clean)
            .filter(|s| (0.38..0.42).contains(&s.quality))
            .take(8)
            .cloned()
            .collect(),
        specs.iter().rev().filter(clean).take(8).cloned().collect(),
    ];
    // Top images with one sub-quality forced low, to see what each does on its own.
    let best: Vec<ImageSpec> = specs.iter().rev().filter(clean).take(8).cloned().collect();
    for field in 0..7 {
        rows.push(
            best.iter()
                .map(|s| {
                    let mut s = s.clone();
                    let q = &mut s.sub;
                    let v = [
                        &mut q.color,
                        &mut q.background,
                        &mut q.lighting,
                        &mut q.focus,
                        &mut q.noise,
                        &mut q.clutter,
                        &mut q.composition,
                    ];
                    *v.into_iter().nth(field).unwrap() = 0.1;
                    s
                })
                .collect(),
        );
    }
    rows.push(
        specs
            .iter()
            .filter(|s| s.overlay)
            .take(4)
            .chain(specs.iter().filter(|s| s.unsafe_marker).take(4))
            .cloned()
            .collect(),
    );
    let scale = (64 / size).max(1); // ×4 at 16 px
    let cell = size * scale + 4;
    let mut sheet = RgbImage::from_pixel(
        cell * 8 + 4,
        cell * rows.len() as u32 + 4,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, spec) in row.iter().enumerate() {
            let img = render(spec, size);
            let big = imageops::resize(
                &img,
                size * scale,
                size * scale,
                imageops::FilterType::Nearest,
            );
            imageops::replace(
                &mut sheet,
                &big,
                (4 + c as u32 * cell) as i64,
                (4 + r as u32 * cell) as i64,
            );
        }
    }
    sheet.save(out)?;
    println!(
        "rows: 8 lowest q | q≈0.4 | 8 highest q | highest with color, background, lighting, focus, noise, clutter, composition low | overlays, unsafe"
    );
    for row in &rows[..3] {
        println!("{:?}", row.iter().map(|s| s.quality).collect::<Vec<_>>());
    }
    Ok(())
}
