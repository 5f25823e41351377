//! Times the haystack's generation and `Dataset::load_pixels` at the default scale (20,000
//! images of 16×16). Speed is measured here, never asserted in a test.
//!
//! `cargo run -p needle-ops --release --example bench_dataset -- [IMAGES] [THREADS]`

use std::time::Instant;

use needle_ops::dataset::Dataset;
use needle_ops::haystack::{HaystackParams, generate};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let images: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let threads: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("haystack");
    let p = HaystackParams {
        images,
        ..HaystackParams::default()
    };

    let t = Instant::now();
    let summary = generate(&p, &out, threads)?;
    println!(
        "haystack: {} images of {}×{} on {threads} threads in {:.2} s",
        summary.images,
        p.size,
        p.size,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let ds = Dataset::open(&out)?;
    println!(
        "open: {} records in {:.3} s",
        ds.len(),
        t.elapsed().as_secs_f64()
    );
    for run in ["first", "second"] {
        let t = Instant::now();
        let px = ds.load_pixels(threads)?;
        println!(
            "load_pixels ({run}): {} images, {} bytes on {threads} threads in {:.3} s",
            px.n,
            px.data.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
