//! A contact sheet of the haystack, to look at what the hidden ratings do to the pixels. Rows,
//! top to bottom, each image upscaled to 64 px (nearest neighbour):
//!
//! 1. the 8 lowest-quality images of a 4,000-image sample;
//! 2. 8 images of about the mean quality (0.4);
//! 3. the 8 highest-quality ones, the "needles";
//! 4. to 10. those same 8 with one sub-quality forced low, in the order color, background,
//!    lighting, focus, noise, clutter, composition;
//! 11. 4 images with a text overlay, 4 with the unsafe marker.
//!
//! `cargo run -p needle-ops --release --example contact_sheet -- OUT.png [SIZE] [SEED]`

use image::{Rgb, RgbImage, imageops};
use needle_ops::haystack::{HaystackParams, ImageSpec, SubQualities, render, sample_spec};

const PER_ROW: usize = 8;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).map_or("contact_sheet.png", String::as_str);
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
    let plain: Vec<&ImageSpec> = specs
        .iter()
        .filter(|s| !s.overlay && !s.unsafe_marker)
        .collect();
    let take = |it: &mut dyn Iterator<Item = &&ImageSpec>| -> Vec<ImageSpec> {
        it.take(PER_ROW).map(|s| (*s).clone()).collect()
    };

    let best = take(&mut plain.iter().rev());
    let mut rows = vec![
        take(&mut plain.iter()),
        take(&mut plain.iter().filter(|s| (0.39..0.41).contains(&s.quality))),
        best.clone(),
    ];
    let knobs: [fn(&mut SubQualities) -> &mut f64; 7] = [
        |q| &mut q.color,
        |q| &mut q.background,
        |q| &mut q.lighting,
        |q| &mut q.focus,
        |q| &mut q.noise,
        |q| &mut q.clutter,
        |q| &mut q.composition,
    ];
    for knob in knobs {
        rows.push(
            best.iter()
                .map(|s| {
                    let mut s = s.clone();
                    *knob(&mut s.sub) = 0.1;
                    s
                })
                .collect(),
        );
    }
    let overlays = specs.iter().filter(|s| s.overlay).take(PER_ROW / 2);
    let marked = specs.iter().filter(|s| s.unsafe_marker).take(PER_ROW / 2);
    rows.push(overlays.chain(marked).cloned().collect());

    let scale = (64 / size).max(1);
    let cell = size * scale + 4;
    let mut sheet = RgbImage::from_pixel(
        cell * PER_ROW as u32 + 4,
        cell * rows.len() as u32 + 4,
        Rgb([255, 255, 255]),
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
            let (x, y) = (4 + c as u32 * cell, 4 + r as u32 * cell);
            imageops::replace(&mut sheet, &big, i64::from(x), i64::from(y));
        }
    }
    sheet.save(out)?;
    for (name, row) in ["lowest", "mean", "highest"].iter().zip(&rows) {
        let q: Vec<f64> = row.iter().map(|s| s.quality).collect();
        println!("{name:>8} q: {q:?}");
    }
    println!("wrote {out}");
    Ok(())
}
