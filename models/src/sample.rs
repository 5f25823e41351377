//! `sample`: a model's images for a prompt set × seeds, with a deterministic DDIM sampler.
//!
//! Prompts come from the recipe (`prompts = [...]`) or from a dataset's captions (input
//! `prompts`, each distinct caption once, sorted). Image (prompt p, seed s) starts from noise
//! that depends only on the prompt, s and `noise_seed` ([`crate::diffusion::initial_noise`]),
//! so two models sampled with the same params pair up image by image; `evaluate` relies on it.
//!
//! Output: a dataset (`images/pPPP-sSSS.png`, captioned with the prompt, with `prompt_index`
//! and `seed_index` columns), `grid.png` (a row per prompt, a column per seed, each image
//! enlarged `grid_scale` times), `summary.md`.

use image::{Rgb, RgbImage};
use needle_core::ops::OpSchema;
use needle_ops::dataset::{Dataset, DatasetWriter};
use needle_ops::{Op, OpContext, OpError, Progress};
use serde_json::{Map, json};
use tch::Device;

use crate::diffusion::{self, WEIGHTS};
use crate::generator;
use crate::precision::Precision;
use crate::train::kept_path;

pub struct SampleOp;

impl Op for SampleOp {
    fn schema(&self) -> OpSchema {
        needle_ops::schemas::sample()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let seeds: i64 = ctx.param("seeds")?;
        let steps: i64 = ctx.param("steps")?;
        let guidance: f64 = ctx.param("guidance")?;
        let checkpoint: i64 = ctx.param("checkpoint")?;
        let noise_seed: u64 = ctx.param("noise_seed")?;
        let batch: i64 = ctx.param("batch")?;
        let scale: u32 = ctx.param("grid_scale")?;
        let precision: Precision = ctx.param("precision")?;
        for (name, v) in [("seeds", seeds), ("steps", steps), ("batch", batch)] {
            if v < 1 {
                return Err(OpError::Param {
                    name: name.into(),
                    why: format!("{v} must be at least 1"),
                });
            }
        }
        if !(1..=32).contains(&scale) {
            return Err(OpError::Param {
                name: "grid_scale".into(),
                why: format!("{scale} must be between 1 and 32"),
            });
        }
        let prompts = prompts(ctx)?;

        let device = crate::device(ctx);
        crate::benchmark_convolutions(device);
        let dir = ctx.input("model")?;
        let weights = if checkpoint == 0 {
            dir.join(WEIGHTS)
        } else {
            let path = kept_path(dir, checkpoint);
            if !path.exists() {
                return Err(OpError::Param {
                    name: "checkpoint".into(),
                    why: format!(
                        "the model kept no checkpoint at step {checkpoint} (`{}`); see its summary.md",
                        path.display()
                    ),
                });
            }
            path
        };
        let (model, _vs) = generator::load(dir, &weights, device)?;
        let size = model.size();

        // Every (prompt, seed) in order: prompt-major.
        let jobs: Vec<(usize, u64)> = (0..prompts.len())
            .flat_map(|p| (0..seeds as u64).map(move |s| (p, s)))
            .collect();
        let total = jobs.len() as u64 * steps as u64;
        let mut images: Vec<u8> = Vec::with_capacity(jobs.len() * (3 * size * size) as usize);
        let started = std::time::Instant::now();
        for (b, chunk) in jobs.chunks(batch as usize).enumerate() {
            let captions: Vec<&str> = chunk.iter().map(|&(p, _)| prompts[p].as_str()).collect();
            let seeds_of: Vec<u64> = chunk.iter().map(|&(_, s)| s).collect();
            let before = (b * batch as usize) as u64 * steps as u64;
            let out = precision.run(device, || {
                model.generate(
                    &captions,
                    &seeds_of,
                    noise_seed,
                    steps,
                    guidance,
                    device,
                    &mut |i| {
                        let done = before + chunk.len() as u64 * i as u64;
                        ctx.report(&Progress {
                            done: done / steps as u64,
                            total: Some(total / steps as u64),
                            unit: "image".into(),
                            loss: None,
                            rate: Some(
                                done as f64 / steps as f64 / started.elapsed().as_secs_f64(),
                            ),
                        });
                    },
                )
            });
            images.extend(diffusion::to_rgb_bytes(&out));
        }
        // A fact of this execution, not of the images: the log's, not the artifact's.
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "sample: {} images in {seconds:.1} s ({:.2} images/s), {}",
            jobs.len(),
            jobs.len() as f64 / seconds.max(1e-9),
            precision.name()
        );

        let writer = DatasetWriter::create(&ctx.out)?;
        let per = (3 * size * size) as usize;
        for (i, &(p, s)) in jobs.iter().enumerate() {
            let img = RgbImage::from_raw(
                size as u32,
                size as u32,
                images[i * per..(i + 1) * per].to_vec(),
            )
            .expect("an image's bytes");
            let mut extra = Map::new();
            extra.insert("prompt_index".into(), json!(p));
            extra.insert("seed_index".into(), json!(s));
            writer.add_png(&format!("p{p:03}-s{s:03}"), &img, &prompts[p], extra)?;
        }
        writer.finish()?;
        write_grid(
            ctx,
            &images,
            prompts.len(),
            seeds as usize,
            size as u32,
            scale,
        )?;

        let unknown = model.vocabulary().unknown(&prompts);
        let mut md = format!(
            "{} images of a {} model: {} prompts × {seeds} seeds, {steps} steps, guidance {guidance}, {} weights, on {}.\n\n`grid.png`: a row per prompt, a column per seed.\n\n| # | prompt |\n|---:|---|\n",
            jobs.len(),
            model.arch(),
            prompts.len(),
            if checkpoint == 0 {
                "final".to_string()
            } else {
                format!("step-{checkpoint}")
            },
            match (device, precision) {
                (Device::Cpu, Precision::Fp32) => "cpu",
                (_, Precision::Fp32) => "cuda",
                (Device::Cpu, Precision::Bf16) => "cpu, bf16",
                (_, Precision::Bf16) => "cuda, bf16",
            },
        );
        for (i, p) in prompts.iter().enumerate() {
            md.push_str(&format!("| {i} | {p} |\n"));
        }
        if !unknown.is_empty() {
            md.push_str(&format!(
                "\nPrompt words the model never saw in training (read as unknown): {}.\n",
                unknown.join(", ")
            ));
        }
        let path = ctx.out.join(needle_ops::SUMMARY);
        std::fs::write(&path, md).map_err(OpError::io("write", &path))
    }
}

/// The prompt set: the `prompts` param or the captions of the `prompts` input, not both.
fn prompts(ctx: &OpContext) -> Result<Vec<String>, OpError> {
    let listed: Vec<String> = ctx.param("prompts")?;
    let prompts = match (ctx.optional_input("prompts")?, listed.is_empty()) {
        (Some(_), false) => {
            return Err(OpError::Param {
                name: "prompts".into(),
                why: "prompts are given both as a list and as an input; give one".into(),
            });
        }
        (None, true) => {
            return Err(OpError::Param {
                name: "prompts".into(),
                why: "no prompts: list them (`prompts = [\"a red circle\", …]`) or give a dataset as input `prompts`".into(),
            });
        }
        (None, false) => listed,
        (Some(dir), true) => {
            let data = Dataset::open(dir)?;
            let mut captions: Vec<String> = data.records().iter().map(|r| r.text.clone()).collect();
            captions.sort();
            captions.dedup();
            captions
        }
    };
    if let Some(empty) = prompts.iter().position(|p| p.trim().is_empty()) {
        return Err(OpError::Param {
            name: "prompts".into(),
            why: format!("prompt {empty} is empty"),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = prompts.iter().find(|p| !seen.insert(p.as_str())) {
        return Err(OpError::Param {
            name: "prompts".into(),
            why: format!("`{dup}` is listed twice; its samples would share their noise"),
        });
    }
    Ok(prompts)
}

/// `grid.png`: prompts down, seeds across, one pixel of gap, each image `scale`× larger.
fn write_grid(
    ctx: &OpContext,
    images: &[u8],
    rows: usize,
    cols: usize,
    size: u32,
    scale: u32,
) -> Result<(), OpError> {
    let cell = size * scale + 1;
    let mut grid = RgbImage::from_pixel(
        cols as u32 * cell + 1,
        rows as u32 * cell + 1,
        Rgb([255, 255, 255]),
    );
    let per = (3 * size * size) as usize;
    for r in 0..rows {
        for c in 0..cols {
            let img = &images[(r * cols + c) * per..][..per];
            for y in 0..size * scale {
                for x in 0..size * scale {
                    let i = (((y / scale) * size + x / scale) * 3) as usize;
                    grid.put_pixel(
                        1 + c as u32 * cell + x,
                        1 + r as u32 * cell + y,
                        Rgb([img[i], img[i + 1], img[i + 2]]),
                    );
                }
            }
        }
    }
    let bytes =
        needle_ops::dataset::encode_png(&grid).map_err(OpError::io("encode", "grid.png"))?;
    let path = ctx.out.join("grid.png");
    std::fs::write(&path, bytes).map_err(OpError::io("write", &path))
}
