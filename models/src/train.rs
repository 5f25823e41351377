//! The training loop `pretrain` and `quality-tune` share: v-prediction loss on the cosine
//! schedule, caption dropout for classifier-free guidance, offset noise, AdamW, EMA weights,
//! progress lines for the runner, and checkpoints that let an interrupted run resume.
//!
//! Resuming gives the same weights as an uninterrupted run: every step draws its randomness
//! from a generator seeded by (seed, step), and a checkpoint holds everything else (weights,
//! EMA weights, AdamW's moments, the loss curve so far). Checkpoints go to the op's resume
//! directory (`NEEDLE_RESUME`), which the runner keeps across failed attempts and drops once
//! the step succeeds; nothing of them is part of the step's key or its output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use needle_ops::{OpContext, OpError, Progress};
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::generator::Generator;

/// How a model is trained; every value comes from the recipe.
#[derive(Debug, Clone)]
pub struct Settings {
    pub steps: i64,
    pub batch: i64,
    pub lr: f64,
    pub schedule: LrSchedule,
    /// Steps of linear learning-rate warm-up.
    pub warmup: i64,
    pub weight_decay: f64,
    /// EMA decay (warmed up as min(decay, (1+k)/(10+k))).
    pub ema: f64,
    /// Share of examples trained without their caption.
    pub caption_dropout: f64,
    /// Offset noise: one extra Gaussian per image and channel, times this, from step
    /// `offset_from` on (Emu: 0.02 at the end of pre-training, 0.1 when quality-tuning).
    pub offset_noise: f64,
    pub offset_from: i64,
    /// Mirror images left-right at random.
    pub flip: bool,
    /// Save a resumable checkpoint every this many steps (0: never).
    pub save_every: i64,
    /// Keep the EMA weights every this many steps in the output's `checkpoints/` (0: never),
    /// for an early-stopping curve.
    pub keep_every: i64,
    pub seed: u64,
    /// Stop after this step as if the process had been killed there (tests of resuming).
    pub interrupt_after: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    /// Cosine decay to a tenth of `lr` at the last step.
    Cosine,
}

impl Settings {
    /// The learning rate of step `k` (0-based).
    pub fn lr_at(&self, k: i64) -> f64 {
        let warm = if self.warmup > 0 && k < self.warmup {
            (k + 1) as f64 / self.warmup as f64
        } else {
            1.0
        };
        let decay = match self.schedule {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => {
                let span = (self.steps - self.warmup).max(1) as f64;
                let progress = ((k - self.warmup).max(0) as f64 / span).min(1.0);
                0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        };
        self.lr * warm * decay
    }

    /// Check what the recipe's validator cannot: ranges.
    pub fn check(&self) -> Result<(), OpError> {
        let bad = |name: &str, why: String| {
            Err(OpError::Param {
                name: name.into(),
                why,
            })
        };
        if self.steps < 1 {
            return bad("steps", format!("{} must be at least 1", self.steps));
        }
        if self.batch < 1 {
            return bad("batch", format!("{} must be at least 1", self.batch));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} must be positive", self.lr));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return bad("ema", format!("{} must be in [0, 1)", self.ema));
        }
        if !(0.0..1.0).contains(&self.caption_dropout) {
            return bad(
                "caption_dropout",
                format!("{} must be in [0, 1)", self.caption_dropout),
            );
        }
        if self.offset_noise < 0.0 {
            return bad(
                "offset_noise",
                format!("{} must not be negative", self.offset_noise),
            );
        }
        Ok(())
    }
}

/// What a finished training run measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// (step, mean loss over the steps since the previous point).
    pub loss_curve: Vec<(i64, f64)>,
    /// Training images per second of the last attempt (the loop alone: no data loading, no
    /// checkpoint writing).
    pub images_per_second: f64,
    /// Seconds in the training loop, over every attempt.
    pub train_seconds: f64,
    /// Steps this attempt started from (0 unless it resumed).
    pub resumed_from: i64,
    /// Steps whose EMA weights were kept in `checkpoints/`.
    pub kept: Vec<i64>,
}

/// The data a model trains on, on its device: images in [-1, 1] and caption tokens.
pub struct Examples {
    pub images: Tensor,
    pub tokens: Tensor,
}

/// Train `model` (its weights in `vs`) on `data`, keeping EMA weights in `ema_vs` (a store of
/// the same model, already holding the starting weights). `work` holds resumable checkpoints
/// and the kept EMA snapshots (`work/checkpoints/`).
pub fn train(
    ctx: &OpContext,
    model: &dyn Generator,
    vs: &nn::VarStore,
    ema_vs: &nn::VarStore,
    data: &Examples,
    s: &Settings,
    work: &Path,
) -> Result<Record, OpError> {
    s.check()?;
    let device = vs.device();
    let params = named(vs);
    let ema = named(ema_vs);
    if params.keys().ne(ema.keys()) {
        return Err(OpError::Failed(
            "the EMA copy does not match the model".into(),
        ));
    }
    let mut adam = Adam::new(&params);
    let mut record = Record {
        loss_curve: Vec::new(),
        images_per_second: 0.0,
        train_seconds: 0.0,
        resumed_from: 0,
        kept: Vec::new(),
    };
    let state_dir = work.join("state");
    let mut start = 0;
    if let Some(saved) = Checkpoint::load(&state_dir)? {
        saved.restore(&params, &ema, &mut adam)?;
        start = saved.step;
        record = saved.record;
        record.resumed_from = start;
    }
    std::fs::create_dir_all(work.join("checkpoints"))
        .map_err(OpError::io("create", work.join("checkpoints")))?;

    let n = data.images.size()[0];
    let window = (s.steps / 50).max(1);
    let (mut window_loss, mut window_steps) = (0.0, 0);
    let mut recent_loss = None;
    let loop_start = Instant::now();
    let mut last_report = Instant::now();
    let mut reported_step = start;
    let mut paused = std::time::Duration::ZERO;

    for k in start..s.steps {
        tch::manual_seed(step_seed(s.seed, k));
        let idx = Tensor::randint(n, [s.batch], (Kind::Int64, device));
        let mut x0 = data.images.index_select(0, &idx);
        if s.flip {
            let mirror = Tensor::rand([s.batch, 1, 1, 1], (Kind::Float, device)).lt(0.5);
            x0 = x0.flip([3]).where_self(&mirror, &x0);
        }
        let tokens = data.tokens.index_select(0, &idx);
        let drop = Tensor::rand([s.batch], (Kind::Float, device)).lt(s.caption_dropout);
        let offset = if k >= s.offset_from {
            s.offset_noise
        } else {
            0.0
        };
        let loss = model.loss(&x0, &tokens, &drop, offset);

        adam.zero_grad(&params);
        loss.backward();
        adam.step(&params, s.lr_at(k), s.weight_decay);
        let decay = s.ema.min((1.0 + k as f64) / (10.0 + k as f64));
        tch::no_grad(|| {
            for (name, p) in &params {
                let _ = ema[name].shallow_clone().lerp_(p, 1.0 - decay);
            }
        });

        let l = loss.double_value(&[]);
        if !l.is_finite() {
            return Err(OpError::Failed(format!(
                "the loss is {l} at step {}: training diverged (lower lr?)",
                k + 1
            )));
        }
        window_loss += l;
        window_steps += 1;
        let done = k + 1;
        if done % window == 0 || done == s.steps {
            let mean = window_loss / window_steps as f64;
            record.loss_curve.push((done, mean));
            recent_loss = Some(mean);
            (window_loss, window_steps) = (0.0, 0);
        }
        if last_report.elapsed().as_millis() >= 500 || done == s.steps {
            let secs = last_report.elapsed().as_secs_f64();
            ctx.report(&Progress {
                done: done as u64,
                total: Some(s.steps as u64),
                unit: "step".into(),
                loss: recent_loss.or(Some(l)),
                rate: Some((done - reported_step) as f64 * s.batch as f64 / secs.max(1e-9)),
            });
            last_report = Instant::now();
            reported_step = done;
        }
        let keep = s.keep_every > 0 && (done % s.keep_every == 0 || done == s.steps);
        let save = s.save_every > 0 && done % s.save_every == 0 && done < s.steps;
        if keep || save {
            let pause = Instant::now();
            if keep {
                let path = kept_path(work, done);
                ema_vs
                    .save(&path)
                    .map_err(|e| OpError::Failed(format!("saving `{}`: {e}", path.display())))?;
                record.kept.push(done);
            }
            let elapsed = (loop_start.elapsed() - paused).as_secs_f64();
            let mut snapshot = record.clone();
            snapshot.train_seconds += elapsed;
            Checkpoint {
                step: done,
                record: snapshot,
            }
            .save(&state_dir, &params, &ema, &adam)?;
            paused += pause.elapsed();
        }
        if s.interrupt_after == Some(done) {
            return Err(OpError::Failed(format!("interrupted after step {done}")));
        }
    }
    let elapsed = (loop_start.elapsed() - paused).as_secs_f64();
    record.train_seconds += elapsed;
    record.images_per_second = (s.steps - start) as f64 * s.batch as f64 / elapsed.max(1e-9);
    Ok(record)
}

/// Where the EMA weights of step `step` are kept.
pub fn kept_path(dir: &Path, step: i64) -> PathBuf {
    dir.join("checkpoints")
        .join(format!("step-{step:06}.safetensors"))
}

/// The seed of step `k`'s randomness: a function of the run's seed and the step alone.
fn step_seed(seed: u64, k: i64) -> i64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&k.to_le_bytes());
    let bytes: [u8; 8] = h.finalize().as_bytes()[..8].try_into().expect("8 bytes");
    (u64::from_le_bytes(bytes) >> 1) as i64
}

/// A store's variables by name, sorted (the store's own order is a hash map's).
fn named(vs: &nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

/// AdamW (decoupled weight decay), written out so that its moments can be saved and
/// restored: resuming must continue the very same optimisation.
struct Adam {
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    steps: i64,
}

impl Adam {
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(params: &BTreeMap<String, Tensor>) -> Adam {
        let zeros = || {
            params
                .iter()
                .map(|(k, p)| (k.clone(), p.zeros_like()))
                .collect()
        };
        Adam {
            m: zeros(),
            v: zeros(),
            steps: 0,
        }
    }

    fn zero_grad(&self, params: &BTreeMap<String, Tensor>) {
        for p in params.values() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    fn step(&mut self, params: &BTreeMap<String, Tensor>, lr: f64, weight_decay: f64) {
        self.steps += 1;
        let bc1 = 1.0 - Self::BETA1.powi(self.steps as i32);
        let bc2 = 1.0 - Self::BETA2.powi(self.steps as i32);
        tch::no_grad(|| {
            for (name, p) in params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let m = self.m[name].shallow_clone().lerp_(&g, 1.0 - Self::BETA1);
                let v = self.v[name]
                    .shallow_clone()
                    .lerp_(&g.square(), 1.0 - Self::BETA2);
                if weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
                }
                let update = m / ((v / bc2).sqrt() + Self::EPS) * (lr / bc1);
                let _ = p.g_sub_(&update);
            }
        });
    }
}

/// A resumable state: `state.safetensors` (weights `w/…`, EMA `ema/…`, moments `m/…`,
/// `v/…`) and `state.json` (step, the record so far).
struct Checkpoint {
    step: i64,
    record: Record,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointMeta {
    step: i64,
    adam_steps: i64,
    record: Record,
}

impl Checkpoint {
    /// Write into `dir` atomically: a complete new state replaces the old one, or nothing does.
    fn save(
        &self,
        dir: &Path,
        params: &BTreeMap<String, Tensor>,
        ema: &BTreeMap<String, Tensor>,
        adam: &Adam,
    ) -> Result<(), OpError> {
        let tmp = dir.with_extension("tmp");
        let old = dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(OpError::io("create", &tmp))?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (prefix, map) in [("w", params), ("ema", ema), ("m", &adam.m), ("v", &adam.v)] {
            for (name, t) in map {
                tensors.push((format!("{prefix}/{name}"), t.shallow_clone()));
            }
        }
        let weights = tmp.join("state.safetensors");
        Tensor::write_safetensors(&tensors, &weights)
            .map_err(|e| OpError::Failed(format!("writing `{}`: {e}", weights.display())))?;
        let meta = CheckpointMeta {
            step: self.step,
            adam_steps: adam.steps,
            record: self.record.clone(),
        };
        let json = tmp.join("state.json");
        std::fs::write(&json, serde_json::to_vec(&meta).expect("state serialises"))
            .map_err(OpError::io("write", &json))?;
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(OpError::io("rename", dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(OpError::io("rename", &tmp))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The latest complete state in `dir` (or in its `.old` twin, if a save was cut between
    /// its two renames), if any.
    fn load(dir: &Path) -> Result<Option<Loaded>, OpError> {
        for candidate in [dir.to_path_buf(), dir.with_extension("old")] {
            let json = candidate.join("state.json");
            let Ok(text) = std::fs::read(&json) else {
                continue;
            };
            let meta: CheckpointMeta = serde_json::from_slice(&text)
                .map_err(|e| OpError::Failed(format!("resume state `{}`: {e}", json.display())))?;
            let weights = candidate.join("state.safetensors");
            let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&weights)
                .map_err(|e| OpError::Failed(format!("reading `{}`: {e}", weights.display())))?
                .into_iter()
                .collect();
            return Ok(Some(Loaded {
                step: meta.step,
                adam_steps: meta.adam_steps,
                record: meta.record,
                tensors,
            }));
        }
        Ok(None)
    }
}

struct Loaded {
    step: i64,
    adam_steps: i64,
    record: Record,
    tensors: BTreeMap<String, Tensor>,
}

impl Loaded {
    fn restore(
        &self,
        params: &BTreeMap<String, Tensor>,
        ema: &BTreeMap<String, Tensor>,
        adam: &mut Adam,
    ) -> Result<(), OpError> {
        tch::no_grad(|| {
            for (prefix, map) in [("w", params), ("ema", ema), ("m", &adam.m), ("v", &adam.v)] {
                for (name, t) in map {
                    let key = format!("{prefix}/{name}");
                    let saved = self.tensors.get(&key).ok_or_else(|| {
                        OpError::Failed(format!(
                            "the resume state lacks `{key}`: it was saved by another model"
                        ))
                    })?;
                    t.shallow_clone()
                        .f_copy_(&saved.to_device(t.device()))
                        .map_err(|e| OpError::Failed(format!("restoring `{key}`: {e}")))?;
                }
            }
            Ok::<(), OpError>(())
        })?;
        adam.steps = self.adam_steps;
        Ok(())
    }
}

/// Images of `pixels` and token ids of `captions`, on `device`.
pub fn examples(pixels: &needle_ops::dataset::Pixels, tokens: Tensor, device: Device) -> Examples {
    Examples {
        images: crate::scorer::to_tensor(pixels, device),
        tokens: tokens.to_device(device),
    }
}

/// Count of trainable numbers in a store.
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}
