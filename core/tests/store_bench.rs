//! Timings of the store's hot paths. Ignored by default; speed is measured, never asserted:
//!
//! ```sh
//! cargo test -p needle-core --release --test store_bench -- --ignored --nocapture
//! ```
//! `NEEDLE_BENCH_STEPS` (default 10000) sets the number of steps.

use std::fs;
use std::time::Instant;

use needle_core::digest::{ArtifactDigest, StepId, StepKey};
use needle_core::store::{InputDigests, LockMode, StepCommit, StepRecord, StepSpec, Store};

fn steps() -> usize {
    std::env::var("NEEDLE_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

fn record(i: usize, output: ArtifactDigest, input: Option<ArtifactDigest>) -> StepRecord {
    let inputs = input
        .map(|a| ("data".to_string(), InputDigests::One(a)))
        .into_iter()
        .collect();
    let bytes = i.to_le_bytes();
    StepRecord::new(
        StepKey::of_parts(&[&bytes]),
        StepId::of_parts(&[&bytes]),
        &format!("step{i}"),
        StepSpec::bare("exec", 1, inputs),
        output,
    )
}

/// One commit call per step, each with one ~10-byte output file, in a chain (each step reads
/// the previous one's output).
#[test]
#[ignore]
fn tiny_steps_one_commit_each() {
    let n = steps();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store"), LockMode::Fail).unwrap();
    let (mut absorb, mut commit) = (0.0, 0.0);
    let start = Instant::now();
    let mut prev = None;
    for i in 0..n {
        let dir = store.new_staging().unwrap();
        fs::write(dir.join("out.txt"), format!("out {i:6}")).unwrap();
        let t = Instant::now();
        let manifest = store.absorb_dir(&dir).unwrap();
        absorb += t.elapsed().as_secs_f64();
        let output = manifest.digest();
        let t = Instant::now();
        store
            .commit(&[StepCommit {
                record: record(i, output, prev),
                manifest,
            }])
            .unwrap();
        commit += t.elapsed().as_secs_f64();
        prev = Some(output);
    }
    let total = start.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..n {
        assert!(
            store
                .step(&StepKey::of_parts(&[&i.to_le_bytes()]))
                .unwrap()
                .is_some()
        );
    }
    let lookups = t.elapsed().as_secs_f64();
    println!(
        "{n} tiny steps, one commit each: total {total:.2}s (absorb {absorb:.2}s, commit \
         {commit:.2}s; {:.2} ms/step); {n} step lookups {lookups:.3}s",
        total * 1000.0 / n as f64
    );
}

/// The same steps committed in batches of 16.
#[test]
#[ignore]
fn tiny_steps_batched() {
    let n = steps();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store"), LockMode::Fail).unwrap();
    let start = Instant::now();
    let mut batch = vec![];
    for i in 0..n {
        let dir = store.new_staging().unwrap();
        fs::write(dir.join("out.txt"), format!("out {i:6}")).unwrap();
        let manifest = store.absorb_dir(&dir).unwrap();
        batch.push(StepCommit {
            record: record(i, manifest.digest(), None),
            manifest,
        });
        if batch.len() == 16 {
            store.commit(&batch).unwrap();
            batch.clear();
        }
    }
    store.commit(&batch).unwrap();
    let total = start.elapsed().as_secs_f64();
    println!("{n} tiny steps, commits of 16: total {total:.2}s");
}

/// One artifact of many small files, and one of a few large ones.
#[test]
#[ignore]
fn wide_and_large_artifacts() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store"), LockMode::Fail).unwrap();

    let dir = store.new_staging().unwrap();
    for i in 0..20_000 {
        let sub = dir.join(format!("{:03}", i % 100));
        fs::create_dir_all(&sub).unwrap();
        fs::write(
            sub.join(format!("{i}.bin")),
            format!("image {i} {}", "x".repeat(i % 700)),
        )
        .unwrap();
    }
    let t = Instant::now();
    let m = store.absorb_dir(&dir).unwrap();
    let wide = t.elapsed().as_secs_f64();
    let t = Instant::now();
    store
        .commit(&[StepCommit {
            record: record(0, m.digest(), None),
            manifest: m.clone(),
        }])
        .unwrap();
    let wide_commit = t.elapsed().as_secs_f64();
    let t = Instant::now();
    store.view(&m.digest()).unwrap();
    let wide_view = t.elapsed().as_secs_f64();

    let dir = store.new_staging().unwrap();
    let mut bytes = vec![0u8; 256 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7];
    }
    for i in 0..4u8 {
        bytes[0] = i;
        fs::write(dir.join(format!("ckpt{i}.safetensors")), &bytes).unwrap();
    }
    let t = Instant::now();
    store.absorb_dir(&dir).unwrap();
    let large = t.elapsed().as_secs_f64();
    println!(
        "20000 small files: absorb {wide:.2}s, commit {wide_commit:.2}s, view {wide_view:.2}s; \
         4 x 256 MiB: absorb {large:.2}s ({:.0} MiB/s)",
        1024.0 / large
    );
}
