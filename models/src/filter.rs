//! `filter`: the paper's funnel, from a pool of images to a few "photogenic needles".
//!
//! Stages, in the paper's order (§1.3 of the notes), each optional and each recording how many
//! images went in and came out, and the mean hidden quality of what passed:
//!
//! | stage | paper | needle's stand-in |
//! |---|---|---|
//! | `unsafe` | offensive-content removal | the unsafe marker, found in the pixels |
//! | `aesthetic` | aesthetic score filter | the `aesthetic` scorer: top fraction |
//! | `overlay` | OCR word-count filter | text-band energy in the pixels |
//! | `agreement` | CLIP score filter | the `agreement` scorer: probability above a threshold |
//! | `cut` | image size and aspect ratio | subject cut by the frame, from the pixels |
//! | `balance` | domain balancing | a cap per concept named by the caption |
//! | `generalists` | trained generalist annotators (recall) | hidden quality + large rater noise: keep many |
//! | `specialists` | photography specialists (precision) | hidden quality + small rater noise: keep few, and write true captions |
//! | `random` | — (a control) | a seeded random sample of what is left |
//!
//! The hidden quality the raters read is `rating_quality`, the haystack's photography rubric
//! (composition, lighting, colour, background, clutter); the judges that grade the tuned model
//! learn another signal (`needle_models::judges`). Only the two human stages read hidden ratings
//! (as human raters would look at the image); the automatic stages see pixels, captions and
//! scorer outputs only. The funnel table reads `rating_quality` to report what each stage
//! achieved, never to decide.
//!
//! Controls: `pick = "worst"` makes the human stages keep the worst they rate; `random = n`
//! keeps a random `n` of what the other stages left: with every stage off, a random set of
//! the pool; on a curated set, a random subset of it (the paper's size ablation).

use std::collections::BTreeMap;

use needle_core::ops::OpSchema;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::scorer::Scorer;
use needle_ops::Op;
use needle_ops::OpContext;
use needle_ops::OpError;
use needle_ops::SUMMARY;
use needle_ops::dataset::{Dataset, DatasetWriter};
use needle_ops::detect;

pub struct FilterOp;

/// One row of the funnel table.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub stage: String,
    pub r#in: usize,
    pub out: usize,
    /// Mean hidden quality (the rubric) of what passed (report only).
    pub mean_quality: f64,
    /// Mean hidden preference (what the appeal judges learn) of what passed (report only).
    pub mean_preference: f64,
}

impl Op for FilterOp {
    fn schema(&self) -> OpSchema {
        needle_ops::schemas::filter()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let device = crate::device(ctx);
        let pool = Dataset::open(ctx.input("data")?)?;
        let pixels = pool.load_pixels(ctx.cpus as usize)?;
        let size = pixels.height;
        let quality = pool.ratings("quality").ok();
        let preference = pool.ratings("preference").ok();
        let mut funnel = Funnel::new(pool.len(), quality.as_deref(), preference.as_deref());

        if ctx.param::<bool>("unsafe")? {
            funnel.keep("unsafe", |i| !detect::unsafe_marker(pixels.image(i), size));
        }
        let aesthetic: Option<Vec<f32>> = match ctx.optional_input("aesthetic")? {
            Some(dir) => {
                let (model, _, _vs) = Scorer::load(dir, device)?;
                Some(model.score_images(&pixels, device)?)
            }
            None => None,
        };
        if let Some(scores) = &aesthetic {
            let top: f64 = ctx.param("aesthetic_top")?;
            funnel.keep_top("aesthetic", top, |i| f64::from(scores[i]));
        }
        if ctx.param::<bool>("overlay")? {
            funnel.keep("overlay", |i| {
                detect::overlay_energy(pixels.image(i), size) <= detect::OVERLAY_THRESHOLD
            });
        }
        if let Some(dir) = ctx.optional_input("agreement")? {
            let (model, config, _vs) = Scorer::load(dir, device)?;
            let captions: Vec<&str> = pool.records().iter().map(|r| r.text.as_str()).collect();
            let scores = model.score_pairs(&config, &pixels, &captions, device)?;
            let min: f64 = ctx.param("agreement_min")?;
            funnel.keep("agreement", |i| f64::from(scores[i]) > min);
        }
        if ctx.param::<bool>("cut")? {
            funnel.keep("cut", |i| {
                detect::subject_cut(pixels.image(i), size) <= detect::CUT_THRESHOLD
            });
        }
        let per_concept: usize = ctx.param("per_concept")?;
        if per_concept > 0 {
            let concept = |i: usize| pool.records()[i].text.trim().to_lowercase();
            let score = |i: usize| aesthetic.as_ref().map_or(0.0, |s| f64::from(s[i]));
            funnel.cap_per_group("balance", per_concept, concept, score);
        }

        // The human stages: raters look at the images, i.e. at the hidden quality, with error.
        let seed: u64 = ctx.param("seed")?;
        let generalists: usize = ctx.param("generalists")?;
        let specialists: usize = ctx.param("specialists")?;
        let sign = match ctx.param::<String>("pick")?.as_str() {
            "worst" => -1.0,
            _ => 1.0,
        };
        if generalists > 0 || specialists > 0 {
            let q = quality.as_ref().ok_or_else(|| OpError::Input {
                name: "data".into(),
                why: "has no `rating_quality` column, which the simulated raters need".into(),
            })?;
            if generalists > 0 {
                let noise: f64 = ctx.param("generalist_noise")?;
                let rated = rate(q, noise, seed ^ 0x6E6E);
                funnel.keep_count("generalists", generalists, |i| sign * rated[i]);
            }
            if specialists > 0 {
                let noise: f64 = ctx.param("specialist_noise")?;
                let rated = rate(q, noise, seed ^ 0x5353);
                funnel.keep_count("specialists", specialists, |i| sign * rated[i]);
            }
        }
        let random: usize = ctx.param("random")?;
        if random > 0 {
            // An independent draw per image, then the `random` highest: a seeded random sample.
            let draw = rate(&vec![0.0; pool.len()], 1.0, seed ^ 0x5241_4E44);
            funnel.keep_count("random", random, |i| draw[i]);
        }

        // The tuning set: the pool's images, linked (no new bytes), with true captions where
        // the specialists wrote them.
        let recaption = specialists > 0 && ctx.param::<bool>("recaption")?;
        let truth = true_captions(&pool);
        let writer = DatasetWriter::create(&ctx.out)?;
        let mut recaptioned = 0usize;
        for &i in &funnel.kept {
            let rec = &pool.records()[i];
            let mut overrides = Map::new();
            if recaption && let Some(true_caption) = truth.get(i).and_then(Option::as_ref) {
                if *true_caption != rec.text {
                    recaptioned += 1;
                }
                overrides.insert("text".into(), Value::String(true_caption.clone()));
            }
            writer.add_linked(&pool, rec, overrides)?;
        }
        writer.finish()?;
        write_report(ctx, &funnel.stages, pool.len(), recaptioned)
    }
}

/// The kept indices of the pool, stage by stage.
struct Funnel<'a> {
    kept: Vec<usize>,
    quality: Option<&'a [f64]>,
    preference: Option<&'a [f64]>,
    stages: Vec<Stage>,
}

impl<'a> Funnel<'a> {
    fn new(n: usize, quality: Option<&'a [f64]>, preference: Option<&'a [f64]>) -> Funnel<'a> {
        let kept: Vec<usize> = (0..n).collect();
        let mut f = Funnel {
            kept,
            quality,
            preference,
            stages: Vec::new(),
        };
        f.record("pool", n);
        f
    }

    fn mean_of(&self, column: Option<&[f64]>) -> f64 {
        match column {
            Some(q) if !self.kept.is_empty() => {
                self.kept.iter().map(|&i| q[i]).sum::<f64>() / self.kept.len() as f64
            }
            _ => f64::NAN,
        }
    }

    fn record(&mut self, stage: &str, before: usize) {
        let (mean_quality, mean_preference) =
            (self.mean_of(self.quality), self.mean_of(self.preference));
        self.stages.push(Stage {
            stage: stage.to_string(),
            r#in: before,
            out: self.kept.len(),
            mean_quality,
            mean_preference,
        });
    }

    fn keep(&mut self, stage: &str, pass: impl Fn(usize) -> bool) {
        let before = self.kept.len();
        self.kept.retain(|&i| pass(i));
        self.record(stage, before);
    }

    /// Keep the best `count` by `score` (ties by index), in pool order.
    fn keep_count(&mut self, stage: &str, count: usize, score: impl Fn(usize) -> f64) {
        let before = self.kept.len();
        let mut ranked = self.kept.clone();
        ranked.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
        ranked.truncate(count);
        ranked.sort_unstable();
        self.kept = ranked;
        self.record(stage, before);
    }

    fn keep_top(&mut self, stage: &str, fraction: f64, score: impl Fn(usize) -> f64) {
        let count = ((self.kept.len() as f64) * fraction.clamp(0.0, 1.0)).ceil() as usize;
        self.keep_count(stage, count, score);
    }

    fn cap_per_group(
        &mut self,
        stage: &str,
        cap: usize,
        group: impl Fn(usize) -> String,
        score: impl Fn(usize) -> f64,
    ) {
        let before = self.kept.len();
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for &i in &self.kept {
            groups.entry(group(i)).or_default().push(i);
        }
        let mut kept: Vec<usize> = groups
            .into_values()
            .flat_map(|mut members| {
                members.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
                members.truncate(cap);
                members
            })
            .collect();
        kept.sort_unstable();
        self.kept = kept;
        self.record(stage, before);
    }
}

/// A rater's view of each image: its hidden quality plus Gaussian error (Box-Muller over a
/// SplitMix64 stream, so the same seed gives the same ratings everywhere).
pub fn rate(quality: &[f64], noise: f64, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut uniform = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    quality
        .iter()
        .map(|q| {
            let (u1, u2) = (uniform().max(1e-12), uniform());
            let gauss = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            q + noise * gauss
        })
        .collect()
}

/// "a small red circle" from the hidden true concept, where the pool records it.
fn true_captions(pool: &Dataset) -> Vec<Option<String>> {
    pool.records()
        .iter()
        .map(|r| {
            let size = r.extra.get("rating_true_size")?.as_str()?;
            let colour = r.extra.get("rating_true_color")?.as_str()?;
            let shape = r.extra.get("rating_true_shape")?.as_str()?;
            Some(format!("a {size} {colour} {shape}"))
        })
        .collect()
}

fn write_report(
    ctx: &OpContext,
    stages: &[Stage],
    pool: usize,
    recaptioned: usize,
) -> Result<(), OpError> {
    let kept = stages.last().map_or(0, |s| s.out);
    let report = json!({
        "pool": pool,
        "kept": kept,
        "recaptioned": recaptioned,
        "stages": stages,
    });
    let path = ctx.out.join("funnel.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).expect("json") + "\n",
    )
    .map_err(OpError::io("write", &path))?;
    let mut md = format!(
        "Kept {kept} of {pool} images ({recaptioned} recaptioned by the specialists).\n\n\
         | stage | in | out | mean hidden quality (rubric) | mean hidden preference |\n|---|---:|---:|---:|---:|\n"
    );
    for s in stages {
        md.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} |\n",
            s.stage, s.r#in, s.out, s.mean_quality, s.mean_preference
        ));
    }
    let path = ctx.out.join(SUMMARY);
    std::fs::write(&path, md).map_err(OpError::io("write", &path))
}
