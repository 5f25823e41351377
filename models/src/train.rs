//! The training loop `pretrain` and `quality-tune` share: v-prediction loss on the cosine
//! schedule, caption dropout for classifier-free guidance, offset noise, AdamW, EMA weights,
//! progress lines for the runner, and checkpoints that let an interrupted run resume or a
//! longer run continue a shorter one.
//!
//! Resuming gives the same weights as an uninterrupted run: every step draws its randomness
//! from a generator seeded by (seed, step), and a checkpoint holds everything else (weights,
//! EMA weights, AdamW's moments, every step's loss so far). Checkpoints go to the op's resume
//! directory (`NEEDLE_RESUME`), which the runner keeps across failed attempts and drops once
//! the step succeeds; nothing of them is part of the step's key or its output.
//!
//! Continuing (`continue_from`): the same kind of checkpoint, taken at the last step that does
//! not depend on the run's length ([`Settings::horizon_free`]), goes into the output as
//! `state/`. A run of the same settings to more steps starts from it and reaches the very
//! weights of a run trained to its length directly: up to that step both ran the same
//! arithmetic on the same draws. With `constant` that step is the last one; with `wsd` the start
//! of the decay, so the output keeps the undecayed state; pretraining's offset noise on the final
//! share of steps moves it to where that share starts; `cosine` decays towards a horizon from
//! the first step after warm-up and cannot be continued.
//!
//! Keeping a GPU busy: the model's trainable weights live in one flat float32 buffer, each
//! parameter a view into it ([`Flat`]), and so do their gradients, AdamW's moments and the EMA
//! weights; the optimiser and the EMA are then a dozen operations on whole buffers per step
//! instead of a dozen per parameter (on a GPU each is a kernel launch, and with ~150
//! parameters launching them took longer than the forward and backward passes). The losses stay
//! on the device until a progress line, a checkpoint or the end reads them: reading one makes
//! the host wait for the device, which then idles while the host prepares the next step.
//!
//! Precision (`Settings::precision`): `fp32` computes in float32 throughout, and a step
//! executed twice on one CPU gives the same bytes. `bf16` runs the forward pass under bfloat16
//! autocast ([`crate::precision`]); the weights, gradients, moments and EMA stay float32. On a
//! CPU it is as reproducible as `fp32` (the same bytes on the same kind of CPU); on a GPU
//! neither precision is bit for bit (cuDNN picks its algorithms by timing them, and some of its
//! backward kernels add in a varying order).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use needle_ops::{OpContext, OpError, Progress};
use serde_json::Value;
use tch::nn;
use tch::{Device, Kind, Tensor};

use crate::generator::Generator;
use crate::precision::Precision;

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
    /// Offset noise: one extra Gaussian per image and channel, times this, on the final
    /// `offset_share` of the steps (Emu: 0.02 at the end of pre-training, 0.1 throughout
    /// quality-tuning, share 1).
    pub offset_noise: f64,
    pub offset_share: f64,
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
    /// The forward pass's arithmetic (see the module doc).
    pub precision: Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    /// Cosine decay to a tenth of `lr` at the last step.
    Cosine,
    /// Warm-up, stable, decay: constant, then a linear decay towards zero over the final
    /// [`WSD_DECAY`] of the steps (Hu et al. 2024, Hägele et al. 2024).
    Wsd,
}

/// The share of the steps `wsd` decays over. Fixed rather than a param: a new param with a
/// default enters the key of every training step, and would re-run every cached one.
pub const WSD_DECAY: f64 = 0.2;

/// Params a continued run may have other than its `continue_from`: the length, and how often
/// the resumable checkpoints that never reach the output are written.
pub const MAY_DIFFER: [&str; 2] = ["steps", "save_every"];

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
            LrSchedule::Wsd => {
                let from = self.decay_from();
                // Over the decay's d steps: d/(d+1), …, 1/(d+1) of `lr`.
                let d = (self.steps - from) as f64;
                if k < from {
                    1.0
                } else {
                    1.0 - (k - from + 1) as f64 / (d + 1.0)
                }
            }
        };
        self.lr * warm * decay
    }

    /// The first step of `wsd`'s decay.
    pub fn decay_from(&self) -> i64 {
        self.steps - final_share(self.steps, WSD_DECAY)
    }

    /// The first step with offset noise.
    pub fn offset_from(&self) -> i64 {
        self.steps - final_share(self.steps, self.offset_share)
    }

    /// How many steps from the start depend on nothing but the settings other than `steps`,
    /// so that every run of these settings to as many steps or more passes through the same
    /// state there: the state a longer run may continue from. `None` for `cosine`, whose
    /// learning rate depends on `steps` from the end of warm-up on.
    pub fn horizon_free(&self) -> Option<i64> {
        let mut end = match self.schedule {
            LrSchedule::Cosine => return None,
            LrSchedule::Constant => self.steps,
            LrSchedule::Wsd => self.decay_from(),
        };
        // Offset noise from a step that moves with `steps` (a share strictly inside (0, 1)).
        if self.offset_noise > 0.0 && self.offset_from() > 0 {
            end = end.min(self.offset_from());
        }
        Some(end)
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
        if !(0.0..=1.0).contains(&self.offset_share) {
            return bad(
                "offset_share",
                format!("{} must be in [0, 1]", self.offset_share),
            );
        }
        Ok(())
    }
}

/// The number of steps in the final `share` of `steps`.
fn final_share(steps: i64, share: f64) -> i64 {
    (share * steps as f64).round() as i64
}

/// What a training state must match to be continued: the op, every param, and a fingerprint of
/// each input the weights depend on (the data, and the model a tuning started from).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub op: String,
    pub params: BTreeMap<String, Value>,
    /// Input name → BLAKE3 (hex) of what the op read from it.
    pub inputs: BTreeMap<String, String>,
}

impl Identity {
    /// Refuse to continue `theirs` (a saved state's) into this run unless only the params of
    /// [`MAY_DIFFER`] differ and it trained no more steps; the error names what differs, with
    /// both values.
    fn check_continues(&self, theirs: &Identity) -> Result<(), OpError> {
        let refuse = |why: String| {
            Err(OpError::Input {
                name: CONTINUE_FROM.into(),
                why,
            })
        };
        if theirs.op != self.op {
            return refuse(format!(
                "is a `{}` output; this step is `{}`",
                theirs.op, self.op
            ));
        }
        let names: std::collections::BTreeSet<&String> =
            theirs.params.keys().chain(self.params.keys()).collect();
        let shown = |v: Option<&Value>| v.map_or("nothing".to_string(), |v| format!("`{v}`"));
        for name in names {
            let (a, b) = (theirs.params.get(name), self.params.get(name));
            if a != b && !MAY_DIFFER.contains(&name.as_str()) {
                return refuse(format!(
                    "was trained with `{name}` = {}, this step has {} (only `steps` and \
                     `save_every` may differ)",
                    shown(a),
                    shown(b)
                ));
            }
        }
        let steps = |i: &Identity| i.params.get("steps").and_then(Value::as_i64).unwrap_or(0);
        if steps(theirs) > steps(self) {
            return refuse(format!(
                "was trained for {} steps, more than this step's {}: a run continues into a \
                 longer one, never a shorter",
                steps(theirs),
                steps(self)
            ));
        }
        for (name, digest) in &self.inputs {
            if theirs.inputs.get(name) != Some(digest) {
                return refuse(format!(
                    "was trained from another input `{name}` than this step's"
                ));
            }
        }
        Ok(())
    }
}

/// The input naming the shorter run to continue.
pub const CONTINUE_FROM: &str = needle_core::ops::CONTINUE_INPUT;

/// Where an output keeps the training state a longer run continues from.
pub const STATE: &str = "state";

/// Where a run continued from a shorter one's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continued {
    /// The step of the state it started from.
    pub step: i64,
    /// The steps of the run that saved it.
    pub of: i64,
}

/// What a finished training run measured.
#[derive(Debug, Clone)]
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
    /// The shorter run this one continued, if it did.
    pub continued: Option<Continued>,
    /// Steps whose EMA weights were kept in `checkpoints/`.
    pub kept: Vec<i64>,
    /// The state a longer run may continue from (in `work`), if these settings allow one.
    pub state: Option<PathBuf>,
}

/// The data a model trains on, on its device: images in [-1, 1] and caption tokens.
pub struct Examples {
    pub images: Tensor,
    pub tokens: Tensor,
}

/// A model to train: its weights in `vs`, a store of the same model `ema_vs` holding the
/// starting weights for the EMA.
pub struct Trainee<'a> {
    pub model: &'a dyn Generator,
    pub vs: &'a nn::VarStore,
    pub ema_vs: &'a nn::VarStore,
}

/// Where a run starts: from scratch (the trainee's weights), or from the training state of a
/// shorter run of the same settings (an output's `state/`, with `checkpoints/` beside it).
/// Either way, a resumable checkpoint in `work` from an earlier attempt of this very run wins.
pub struct Start<'a> {
    pub identity: &'a Identity,
    pub continue_from: Option<&'a Path>,
}

/// Train on `data`. `work` holds resumable checkpoints, the kept EMA snapshots
/// (`work/checkpoints/`) and the state a longer run may continue from (`work/handoff/`).
pub fn train(
    ctx: &OpContext,
    trainee: &Trainee<'_>,
    data: &Examples,
    s: &Settings,
    start: &Start<'_>,
    work: &Path,
) -> Result<Record, OpError> {
    s.check()?;
    let horizon_free = s.horizon_free();
    if start.continue_from.is_some() && horizon_free.is_none() {
        return Err(OpError::Param {
            name: "schedule".into(),
            why: "`cosine` decays towards the last step, so a shorter run never passes \
                  through this run's states: `continue_from` needs `constant` or `wsd`"
                .into(),
        });
    }
    let Trainee { model, vs, ema_vs } = *trainee;
    let device = vs.device();
    crate::benchmark_convolutions(device);
    let vars = named(vs);
    let ema_vars = named(ema_vs);
    if vars.keys().ne(ema_vars.keys()) {
        return Err(OpError::Failed(
            "the EMA copy does not match the model".into(),
        ));
    }
    let mut flat = Flat::new(&vars, &ema_vars)?;
    let mut record = Record {
        loss_curve: Vec::new(),
        images_per_second: 0.0,
        train_seconds: 0.0,
        resumed_from: 0,
        continued: None,
        kept: Vec::new(),
        state: None,
    };
    let mut losses = Losses::default();
    let state_dir = work.join("state");
    let handoff_dir = work.join("handoff");
    let kept_dir = work.join("checkpoints");
    std::fs::create_dir_all(&kept_dir).map_err(OpError::io("create", &kept_dir))?;
    let resumed = Checkpoint::load(&state_dir).unwrap_or_else(|e| {
        println!("ignoring the resume state ({e}): starting over");
        None
    });
    let mut first = 0;
    if let Some(saved) = resumed {
        saved.restore(&vars, &ema_vars, &mut flat)?;
        first = saved.step;
        record.resumed_from = first;
        record.train_seconds = saved.meta.train_seconds;
        record.continued = saved
            .meta
            .continued
            .map(|(step, of)| Continued { step, of });
        record.kept = saved.meta.kept.clone();
        losses.values = saved.losses();
    } else if let Some(from) = start.continue_from {
        let saved = continuation(from, start.identity, s, horizon_free)?;
        saved
            .restore(&vars, &ema_vars, &mut flat)
            .map_err(|e| OpError::Input {
                name: CONTINUE_FROM.into(),
                why: format!("holds a state of another model: {e}"),
            })?;
        first = saved.step;
        let of = steps_of(&saved.meta.identity);
        record.continued = Some(Continued { step: first, of });
        // The EMA snapshots a direct run keeps up to here: every `keep_every` steps.
        for &k in &saved.meta.kept {
            if k <= first && s.keep_every > 0 && (k % s.keep_every == 0 || k == s.steps) {
                let (src, dst) = (kept_path(from, k), kept_path(work, k));
                std::fs::copy(&src, &dst).map_err(OpError::io("copy", &src))?;
                record.kept.push(k);
            }
        }
        losses.values = saved.losses();
    }

    let n = data.images.size()[0];
    let loop_start = Instant::now();
    let mut last_report = Instant::now();
    let mut reported_step = first;
    let mut paused = std::time::Duration::ZERO;
    if horizon_free == Some(first) {
        // Continued (or resumed) exactly where the state a longer run needs was taken.
        Checkpoint::of(first, &losses, &record, 0.0, start.identity)
            .for_output()
            .save(&handoff_dir, &vars, &ema_vars, &flat)?;
    }

    for k in first..s.steps {
        tch::manual_seed(step_seed(s.seed, k));
        let idx = Tensor::randint(n, [s.batch], (Kind::Int64, device));
        let mut x0 = data.images.index_select(0, &idx);
        if s.flip {
            let mirror = Tensor::rand([s.batch, 1, 1, 1], (Kind::Float, device)).lt(0.5);
            x0 = x0.flip([3]).where_self(&mirror, &x0);
        }
        let tokens = data.tokens.index_select(0, &idx);
        let drop = Tensor::rand([s.batch], (Kind::Float, device)).lt(s.caption_dropout);
        let offset = if k >= s.offset_from() {
            s.offset_noise
        } else {
            0.0
        };
        let loss = s
            .precision
            .run(device, || model.loss(&x0, &tokens, &drop, offset));

        let grads = flat.gradients(&loss);
        flat.adamw(&grads, s.lr_at(k), s.weight_decay);
        flat.ema(s.ema.min((1.0 + k as f64) / (10.0 + k as f64)));
        losses.push(k, &loss);

        let done = k + 1;
        if last_report.elapsed().as_millis() >= 500 || done == s.steps {
            losses.read()?;
            let secs = last_report.elapsed().as_secs_f64();
            ctx.report(&Progress {
                done: done as u64,
                total: Some(s.steps as u64),
                unit: "step".into(),
                loss: losses.curve(s.steps).last().map(|p| p.1).or(losses.last()),
                rate: Some((done - reported_step) as f64 * s.batch as f64 / secs.max(1e-9)),
            });
            last_report = Instant::now();
            reported_step = done;
        }
        let keep = s.keep_every > 0 && (done % s.keep_every == 0 || done == s.steps);
        let handoff = horizon_free == Some(done);
        let save = s.save_every > 0 && done % s.save_every == 0 && done < s.steps;
        if keep || handoff || save {
            let pause = Instant::now();
            if keep {
                let path = kept_path(work, done);
                ema_vs
                    .save(&path)
                    .map_err(|e| OpError::Failed(format!("saving `{}`: {e}", path.display())))?;
                record.kept.push(done);
            }
            losses.read()?;
            // Before the resume checkpoint: a run resumed past this step finds it written.
            if handoff {
                Checkpoint::of(done, &losses, &record, 0.0, start.identity)
                    .for_output()
                    .save(&handoff_dir, &vars, &ema_vars, &flat)?;
            }
            if save {
                let elapsed = (loop_start.elapsed() - paused).as_secs_f64();
                Checkpoint::of(
                    done,
                    &losses,
                    &record,
                    record.train_seconds + elapsed,
                    start.identity,
                )
                .save(&state_dir, &vars, &ema_vars, &flat)?;
            }
            paused += pause.elapsed();
        }
        if s.interrupt_after == Some(done) {
            return Err(OpError::Failed(format!("interrupted after step {done}")));
        }
    }
    losses.read()?;
    record.loss_curve = losses.curve(s.steps);
    // The host runs ahead of a GPU: the loop is over when the device has done its work.
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    let elapsed = (loop_start.elapsed() - paused).as_secs_f64();
    record.train_seconds += elapsed;
    record.images_per_second = (s.steps - first) as f64 * s.batch as f64 / elapsed.max(1e-9);
    record.state = horizon_free.map(|_| handoff_dir);
    Ok(record)
}

/// The state in output `from` this run continues from, checked to be one of a shorter run of
/// the same settings, taken no later than this run's own horizon-free steps.
fn continuation(
    from: &Path,
    ours: &Identity,
    s: &Settings,
    horizon_free: Option<i64>,
) -> Result<Loaded, OpError> {
    let dir = from.join(STATE);
    let saved = Checkpoint::load(&dir)
        .map_err(|e| OpError::Input {
            name: CONTINUE_FROM.into(),
            why: format!("holds a training state this build cannot read: {e}"),
        })?
        .ok_or_else(|| OpError::Input {
            name: CONTINUE_FROM.into(),
            why: format!(
                "holds no training state (`{STATE}/`): only a `constant` or `wsd` run keeps \
                 one, and only since needle kept them (run that step again with `--force`)"
            ),
        })?;
    ours.check_continues(&saved.meta.identity)?;
    let until = horizon_free.unwrap_or(0);
    if saved.step > until || saved.step > s.steps {
        return Err(OpError::Input {
            name: CONTINUE_FROM.into(),
            why: format!(
                "holds the state at step {}, past this run's step {until}, after which its \
                 schedule depends on `steps`",
                saved.step
            ),
        });
    }
    Ok(saved)
}

/// The `steps` param of a saved run.
fn steps_of(identity: &Identity) -> i64 {
    identity
        .params
        .get("steps")
        .and_then(Value::as_i64)
        .unwrap_or(0)
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

/// Every step's loss: those read from the device, from step 0 on, and those still on it.
#[derive(Default)]
struct Losses {
    /// (0-based step, loss) not yet read.
    pending: Vec<(i64, Tensor)>,
    values: Vec<f32>,
}

impl Losses {
    fn push(&mut self, k: i64, loss: &Tensor) {
        self.pending.push((k, loss.detach()));
    }

    fn last(&self) -> Option<f64> {
        self.values.last().map(|&l| f64::from(l))
    }

    /// Read the pending losses (one transfer, which waits for the device). A loss that is not
    /// finite fails the run, naming its step.
    fn read(&mut self) -> Result<(), OpError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let all: Vec<&Tensor> = self.pending.iter().map(|(_, l)| l).collect();
        let values = Vec::<f32>::try_from(
            Tensor::stack(&all, 0)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        )
        .map_err(|e| OpError::Failed(format!("reading the losses: {e}")))?;
        for (&(k, _), value) in self.pending.iter().zip(values) {
            if !value.is_finite() {
                return Err(OpError::Failed(format!(
                    "the loss is {value} at step {}: training diverged (lower lr?)",
                    k + 1
                )));
            }
            self.values.push(value);
        }
        self.pending.clear();
        Ok(())
    }

    /// The loss curve of a run of `steps`: a point per window of `steps / 50` steps (and one at
    /// the last step), the mean loss over the window; only windows already complete. From the
    /// losses alone, so that a run continued into a longer one draws the longer one's curve.
    fn curve(&self, steps: i64) -> Vec<(i64, f64)> {
        let window = (steps / 50).max(1);
        let mut curve = Vec::new();
        let (mut sum, mut count) = (0.0, 0);
        for (k, &l) in self.values.iter().enumerate() {
            sum += f64::from(l);
            count += 1;
            let done = k as i64 + 1;
            if done % window == 0 || done == steps {
                curve.push((done, sum / count as f64));
                (sum, count) = (0.0, 0);
            }
        }
        curve
    }
}

/// Where each trainable parameter lives in the flat buffers.
struct Slot {
    name: String,
    offset: i64,
    shape: Vec<i64>,
    numel: i64,
    /// Unused elements after it, up to the next parameter's aligned start.
    gap: i64,
}

/// The trainable weights of a model, their EMA and AdamW's moments of them (decoupled weight
/// decay, written out so that the moments can be saved and restored: resuming must continue the
/// very same optimisation), each one flat float32 buffer in one layout. The model's and the EMA
/// store's variables are views into `weights` and `ema`, so the model reads what the optimiser
/// writes, and saving either store saves the current values.
///
/// Every parameter starts at a multiple of [`Flat::ALIGN`] elements, as a tensor allocated on its
/// own would (libtorch aligns CPU memory to 64 bytes, CUDA's to 512): convolution and matrix
/// kernels then take the same paths as for separate tensors (MKL's results may depend on
/// alignment). The gaps are zero and stay zero: their gradient is zero, so AdamW and the EMA
/// leave them at zero.
///
/// Variables that do not train (the masked transformer's codebook) are not in the buffers:
/// neither AdamW nor the EMA touches them, and the EMA copy keeps the value it started with,
/// which is the model's.
struct Flat {
    slots: Vec<Slot>,
    /// The model's trainable variables, in slot order.
    params: Vec<Tensor>,
    weights: Tensor,
    ema: Tensor,
    m: Tensor,
    v: Tensor,
    adam_steps: i64,
    /// Zeros, as long as the longest gap.
    zeros: Tensor,
}

impl Flat {
    const ALIGN: i64 = 128;
    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(
        vars: &BTreeMap<String, Tensor>,
        ema_vars: &BTreeMap<String, Tensor>,
    ) -> Result<Flat, OpError> {
        let mut slots = Vec::new();
        let mut params = Vec::new();
        let mut end = 0;
        for (name, t) in vars.iter().filter(|(_, t)| t.requires_grad()) {
            if t.kind() != Kind::Float {
                return Err(OpError::Failed(format!(
                    "parameter `{name}` is {:?}; training keeps float32 weights",
                    t.kind()
                )));
            }
            let offset = end;
            let numel = t.numel() as i64;
            end = (offset + numel + Self::ALIGN - 1) / Self::ALIGN * Self::ALIGN;
            slots.push(Slot {
                name: name.clone(),
                offset,
                shape: t.size(),
                numel,
                gap: end - offset - numel,
            });
            params.push(t.shallow_clone());
        }
        let device = params.first().map_or(Device::Cpu, |t| t.device());
        let ema: Vec<Tensor> = slots
            .iter()
            .map(|slot| ema_vars[&slot.name].shallow_clone())
            .collect();
        let zeros = |len: i64| Tensor::zeros([len], (Kind::Float, device));
        let weights = adopt(&slots, &params, zeros(end));
        let ema = adopt(&slots, &ema, zeros(end));
        Ok(Flat {
            m: weights.zeros_like(),
            v: weights.zeros_like(),
            zeros: zeros(Self::ALIGN),
            slots,
            params,
            weights,
            ema,
            adam_steps: 0,
        })
    }

    /// The gradient of `loss` with respect to every trainable parameter, in the flat layout.
    /// Autograd hands them back without accumulating into (and so without first zeroing) each
    /// parameter's `.grad`. A parameter the loss does not reach gets zeros.
    fn gradients(&self, loss: &Tensor) -> Tensor {
        let grads = Tensor::run_backward(&[loss], &self.params, false, false);
        let mut pieces = Vec::with_capacity(2 * grads.len());
        for (slot, g) in self.slots.iter().zip(&grads) {
            pieces.push(if g.defined() {
                g.reshape([-1])
            } else {
                self.weights.narrow(0, slot.offset, slot.numel).zeros_like()
            });
            if slot.gap > 0 {
                pieces.push(self.zeros.narrow(0, 0, slot.gap));
            }
        }
        Tensor::cat(&pieces, 0)
    }

    /// One AdamW step with gradients `g` (flat): the same arithmetic, element by element, as
    /// when each parameter was updated on its own.
    fn adamw(&mut self, g: &Tensor, lr: f64, weight_decay: f64) {
        self.adam_steps += 1;
        let bc1 = 1.0 - Self::BETA1.powi(self.adam_steps as i32);
        let bc2 = 1.0 - Self::BETA2.powi(self.adam_steps as i32);
        tch::no_grad(|| {
            let _ = self.m.lerp_(g, 1.0 - Self::BETA1);
            let _ = self.v.lerp_(&g.square(), 1.0 - Self::BETA2);
            if weight_decay > 0.0 {
                let _ = self.weights.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let update = &self.m / ((&self.v / bc2).sqrt() + Self::EPS) * (lr / bc1);
            let _ = self.weights.g_sub_(&update);
        });
    }

    /// Move the EMA weights towards the weights: ema ← decay·ema + (1 − decay)·weights.
    fn ema(&mut self, decay: f64) {
        tch::no_grad(|| {
            let _ = self.ema.lerp_(&self.weights, 1.0 - decay);
        });
    }

    /// The moments `m` or `v` of each parameter, by name, as views of the flat buffer.
    fn moments<'a>(&'a self, flat: &'a Tensor) -> impl Iterator<Item = (&'a str, Tensor)> + 'a {
        self.slots.iter().map(move |slot| {
            let view = flat
                .narrow(0, slot.offset, slot.numel)
                .view(slot.shape.as_slice());
            (slot.name.as_str(), view)
        })
    }
}

/// A flat buffer `flat` holding the values of `vars`, which become views into it.
fn adopt(slots: &[Slot], vars: &[Tensor], flat: Tensor) -> Tensor {
    tch::no_grad(|| {
        for (slot, var) in slots.iter().zip(vars) {
            let mut view = flat
                .narrow(0, slot.offset, slot.numel)
                .view(slot.shape.as_slice());
            view.copy_(var);
            var.shallow_clone().set_data(&view);
        }
    });
    flat
}

/// A training state: `state.safetensors` (weights `w/…` and EMA `ema/…` of every variable,
/// AdamW's moments `m/…`, `v/…` of the trainable ones) and `state.json` ([`CheckpointMeta`]).
/// The same format serves a resumable checkpoint (in the resume directory) and the state an
/// output keeps for a longer run to continue from (`state/`).
struct Checkpoint<'a> {
    step: i64,
    losses: &'a [f32],
    kept: &'a [i64],
    /// Seconds in the training loop so far (0 in an output: a figure of one execution).
    train_seconds: f64,
    continued: Option<Continued>,
    identity: &'a Identity,
}

/// `state.json`. The losses go in as the bits of each f32: a resumed run must carry on with
/// the very numbers an uninterrupted one has (they end up in `metrics.json`).
#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointMeta {
    /// [`CheckpointMeta::FORMAT`]: states of another layout are not read.
    format: u32,
    identity: Identity,
    step: i64,
    adam_steps: i64,
    /// Every step's loss, from step 0, as f32 bits.
    losses: Vec<u32>,
    kept: Vec<i64>,
    train_seconds: f64,
    /// (step, steps) of the state this run continued from, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    continued: Option<(i64, i64)>,
}

impl CheckpointMeta {
    const FORMAT: u32 = 2;
}

impl<'a> Checkpoint<'a> {
    /// The state at step `step` of a run with these losses and record so far.
    fn of(
        step: i64,
        losses: &'a Losses,
        record: &'a Record,
        train_seconds: f64,
        identity: &'a Identity,
    ) -> Checkpoint<'a> {
        Checkpoint {
            step,
            losses: &losses.values,
            kept: &record.kept,
            train_seconds,
            continued: record.continued,
            identity,
        }
    }

    /// Write into `dir` atomically: a complete new state replaces the old one, or nothing does.
    fn save(
        &self,
        dir: &Path,
        vars: &BTreeMap<String, Tensor>,
        ema: &BTreeMap<String, Tensor>,
        flat: &Flat,
    ) -> Result<(), OpError> {
        let tmp = dir.with_extension("tmp");
        let old = dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(OpError::io("create", &tmp))?;
        let tensors = state_tensors(vars, ema, flat);
        let weights = tmp.join("state.safetensors");
        Tensor::write_safetensors(&tensors, &weights)
            .map_err(|e| OpError::Failed(format!("writing `{}`: {e}", weights.display())))?;
        let meta = CheckpointMeta {
            format: CheckpointMeta::FORMAT,
            identity: self.identity.clone(),
            step: self.step,
            adam_steps: flat.adam_steps,
            losses: self.losses.iter().map(|l| l.to_bits()).collect(),
            kept: self.kept.to_vec(),
            train_seconds: self.train_seconds,
            continued: self.continued.map(|c| (c.step, c.of)),
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

    /// This state with nothing of this execution in it (time, where it continued from): the
    /// state an output keeps is the same bytes however the run got there.
    fn for_output(self) -> Checkpoint<'a> {
        Checkpoint {
            train_seconds: 0.0,
            continued: None,
            ..self
        }
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
                .ok()
                .filter(|m: &CheckpointMeta| m.format == CheckpointMeta::FORMAT)
                .ok_or_else(|| {
                    OpError::Failed(format!(
                        "`{}` is not a training state of this build's format",
                        json.display()
                    ))
                })?;
            let weights = candidate.join("state.safetensors");
            let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&weights)
                .map_err(|e| OpError::Failed(format!("reading `{}`: {e}", weights.display())))?
                .into_iter()
                .collect();
            return Ok(Some(Loaded {
                step: meta.step,
                meta,
                tensors,
            }));
        }
        Ok(None)
    }
}

/// The tensors of a training state by their names in `state.safetensors`: views of the
/// variables and of the moments' flat buffers, so that saving reads them and restoring writes
/// them.
fn state_tensors(
    vars: &BTreeMap<String, Tensor>,
    ema: &BTreeMap<String, Tensor>,
    flat: &Flat,
) -> Vec<(String, Tensor)> {
    let mut tensors = Vec::new();
    for (prefix, map) in [("w", vars), ("ema", ema)] {
        for (name, t) in map {
            tensors.push((format!("{prefix}/{name}"), t.shallow_clone()));
        }
    }
    for (prefix, moment) in [("m", &flat.m), ("v", &flat.v)] {
        for (name, t) in flat.moments(moment) {
            tensors.push((format!("{prefix}/{name}"), t));
        }
    }
    tensors
}

struct Loaded {
    step: i64,
    meta: CheckpointMeta,
    tensors: BTreeMap<String, Tensor>,
}

impl Loaded {
    /// Every step's loss up to the state's.
    fn losses(&self) -> Vec<f32> {
        self.meta
            .losses
            .iter()
            .map(|&b| f32::from_bits(b))
            .collect()
    }

    /// Copy the saved values into the variables and the flat buffers (through their views).
    fn restore(
        &self,
        vars: &BTreeMap<String, Tensor>,
        ema: &BTreeMap<String, Tensor>,
        flat: &mut Flat,
    ) -> Result<(), OpError> {
        tch::no_grad(|| {
            for (key, mut t) in state_tensors(vars, ema, flat) {
                let saved = self.tensors.get(&key).ok_or_else(|| {
                    OpError::Failed(format!(
                        "the training state lacks `{key}`: it was saved by another model"
                    ))
                })?;
                if saved.size() != t.size() {
                    return Err(OpError::Failed(format!(
                        "the training state's `{key}` is {:?}, the model's {:?}",
                        saved.size(),
                        t.size()
                    )));
                }
                t.f_copy_(&saved.to_device(t.device()))
                    .map_err(|e| OpError::Failed(format!("restoring `{key}`: {e}")))?;
            }
            Ok::<(), OpError>(())
        })?;
        flat.adam_steps = self.meta.adam_steps;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW as it was written per parameter before the flat buffers: the reference the flat
    /// update must match bit for bit.
    fn adamw_per_parameter(
        p: &mut Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        g: &Tensor,
        step: i32,
        lr: f64,
        wd: f64,
    ) {
        let bc1 = 1.0 - Flat::BETA1.powi(step);
        let bc2 = 1.0 - Flat::BETA2.powi(step);
        let _ = m.lerp_(g, 1.0 - Flat::BETA1);
        let _ = v.lerp_(&g.square(), 1.0 - Flat::BETA2);
        let _ = p.g_mul_scalar_(1.0 - lr * wd);
        let update = &*m / ((&*v / bc2).sqrt() + Flat::EPS) * (lr / bc1);
        let _ = p.g_sub_(&update);
    }

    fn settings(schedule: LrSchedule, offset_share: f64) -> Settings {
        Settings {
            steps: 10,
            batch: 1,
            lr: 1.0,
            schedule,
            warmup: 2,
            weight_decay: 0.0,
            ema: 0.9,
            caption_dropout: 0.0,
            offset_noise: 0.1,
            offset_share,
            flip: false,
            save_every: 0,
            keep_every: 0,
            seed: 0,
            interrupt_after: None,
            precision: Precision::Fp32,
        }
    }

    #[test]
    fn wsd_warms_up_holds_then_decays_and_its_state_is_kept_where_the_decay_starts() {
        let wsd = settings(LrSchedule::Wsd, 1.0);
        let rates: Vec<f64> = (0..10).map(|k| wsd.lr_at(k)).collect();
        // Warm-up over 2 steps, 20 % of 10 steps of decay: 2/3 and 1/3 of `lr`.
        let third = 1.0 / 3.0;
        let expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0 - third, third];
        for (k, (r, e)) in rates.iter().zip(expected).enumerate() {
            assert!((r - e).abs() < 1e-12, "step {k}: {r} != {e}");
        }
        assert_eq!(wsd.horizon_free(), Some(8));
        // Offset noise throughout (quality-tune) or never is the same at any length; from a
        // share that moves with `steps` (pretrain), the state is kept where it starts.
        assert_eq!(settings(LrSchedule::Constant, 1.0).horizon_free(), Some(10));
        assert_eq!(settings(LrSchedule::Constant, 0.0).horizon_free(), Some(10));
        assert_eq!(settings(LrSchedule::Constant, 0.5).horizon_free(), Some(5));
        assert_eq!(settings(LrSchedule::Wsd, 0.1).horizon_free(), Some(8));
        assert_eq!(settings(LrSchedule::Cosine, 1.0).horizon_free(), None);
    }

    #[test]
    fn the_flat_optimiser_and_ema_match_per_parameter_updates_bit_for_bit() {
        // Odd sizes, so that parameters straddle vector widths and leave gaps.
        let shapes: [&[i64]; 4] = [&[3], &[5, 7], &[130], &[2, 3, 3, 3]];
        let store = || {
            tch::manual_seed(1);
            let vs = nn::VarStore::new(Device::Cpu);
            for (i, shape) in shapes.iter().enumerate() {
                let _ = vs.root().randn(&format!("p{i}"), shape, 0.0, 1.0);
            }
            // A variable that does not train stays out of the buffers.
            let _ = vs.root().ones_no_train("fixed", &[4]);
            vs
        };
        let (vs, ema_vs, reference, reference_ema) = (store(), store(), store(), store());
        let mut flat = Flat::new(&named(&vs), &named(&ema_vs)).unwrap();
        assert_eq!(flat.slots.len(), shapes.len());
        assert!(flat.slots.iter().all(|s| s.offset % Flat::ALIGN == 0));

        let trained = |vs: &nn::VarStore| {
            let mut vars = named(vs);
            vars.remove("fixed");
            vars
        };
        let mut moments: BTreeMap<String, (Tensor, Tensor)> = trained(&reference)
            .into_iter()
            .map(|(k, t)| (k, (t.zeros_like(), t.zeros_like())))
            .collect();
        tch::manual_seed(2);
        for step in 1..=5 {
            let grads: BTreeMap<String, Tensor> = trained(&reference)
                .into_iter()
                .map(|(k, t)| (k, t.randn_like()))
                .collect();
            // The same gradients in the flat layout.
            let g = flat.weights.zeros_like();
            for slot in &flat.slots {
                g.narrow(0, slot.offset, slot.numel)
                    .copy_(&grads[&slot.name].reshape([-1]));
            }
            let (lr, wd, decay) = (0.01 * step as f64, 0.1, 0.9);
            flat.adamw(&g, lr, wd);
            flat.ema(decay);
            tch::no_grad(|| {
                let ema = trained(&reference_ema);
                for (name, mut p) in trained(&reference) {
                    let (m, v) = moments.get_mut(&name).unwrap();
                    adamw_per_parameter(&mut p, m, v, &grads[&name], step, lr, wd);
                    let _ = ema[&name].shallow_clone().lerp_(&p, 1.0 - decay);
                }
            });
        }
        for (mine, theirs) in [(&vs, &reference), (&ema_vs, &reference_ema)] {
            for (name, t) in named(mine) {
                assert!(t.equal(&named(theirs)[&name]), "{name}");
            }
        }
        // The model's variables are views of the buffer the optimiser wrote, and the gaps
        // between them are still zero.
        for slot in &flat.slots {
            let view = flat.weights.narrow(0, slot.offset, slot.numel);
            assert!(view.equal(&named(&vs)[&slot.name].reshape([-1])));
            let gap = flat.weights.narrow(0, slot.offset + slot.numel, slot.gap);
            assert_eq!(gap.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
}
