//! How long loading a dataset into a training tensor takes: `load_tensor DATASET_DIR`.
//! (The yardstick: 20,000 16×16 images well under two seconds.)

use std::time::Instant;

use needle_ops::dataset::Dataset;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: load_tensor DATASET_DIR");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t0 = Instant::now();
    let data = Dataset::open(&dir).expect("a dataset");
    let t1 = Instant::now();
    let pixels = data.load_pixels(threads).expect("images");
    let t2 = Instant::now();
    let tensor = needle_models::scorer::to_tensor(&pixels, tch::Device::Cpu);
    let t3 = Instant::now();
    println!(
        "{} images {:?}: open {:.3}s, decode {:.3}s, to tensor {:.3}s, total {:.3}s",
        data.len(),
        tensor.size(),
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64(),
        (t3 - t0).as_secs_f64()
    );
}
