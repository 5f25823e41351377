//! `pretrain` and `quality-tune`: the two training stages of the paper.
//!
//! - `pretrain` trains a `pixel-diffusion` model from scratch on a dataset (the haystack); its
//!   vocabulary is built from that dataset's captions. Offset noise (Emu: 0.02) applies to the
//!   final share of steps only.
//! - `quality-tune` continues a trained model on a small dataset (the needles) with a small
//!   batch and stronger offset noise (Emu: 64 and 0.1), keeping the EMA weights every K steps
//!   in `checkpoints/` for an early-stopping curve.
//!
//! Output: `model.safetensors` (the EMA weights: what `sample` uses), `config.json`,
//! `checkpoints/step-NNNNNN.safetensors` (quality-tune), `metrics.json` (loss curve,
//! parameters, device), `summary.md`, and for a `constant` or `wsd` schedule `state/`: the
//! training state a longer run of the same settings continues from (input `continue_from`; see
//! [`crate::train`]). A continued run's output is a direct run's, bytes included, but for the
//! `continued_from` its `metrics.json` and `summary.md` record. How fast the training went, and whether it resumed, are
//! facts of one execution, not of the model: they go to the step's log (`needle logs`), so that
//! training the same model again gives the same artifact and its dependents stay cached.

use std::path::{Path, PathBuf};

use needle_core::ops::OpSchema;
use needle_ops::dataset::Dataset;
use needle_ops::{Op, OpContext, OpError};
use serde_json::json;
use tch::nn;

use crate::diffusion::{ARCH, Model, ModelConfig, WEIGHTS};
use crate::generator::{self, Generator};
use crate::masked::{self, MaskedConfig, MaskedModel};
use crate::precision::Precision;
use crate::text::Vocabulary;
use crate::train::{self, Examples, Identity, LrSchedule, Record, Settings, Start, Trainee};
use crate::unet::UNetShape;

pub struct PretrainOp;
pub struct QualityTuneOp;

impl Op for PretrainOp {
    fn schema(&self) -> OpSchema {
        needle_ops::schemas::pretrain()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let arch: String = ctx.param("arch")?;
        let settings = Settings {
            offset_share: ctx.param("offset_share")?,
            keep_every: 0,
            ..settings(ctx)?
        };
        settings.check()?;
        let device = crate::device(ctx);
        let data = Dataset::open(ctx.input("data")?)?;
        let pixels = load_square(&data, ctx)?;
        let size = pixels.height as i64;
        let captions: Vec<&str> = data.records().iter().map(|r| r.text.as_str()).collect();
        let vocabulary = Vocabulary::build(captions.iter().copied(), ctx.param("max_tokens")?);
        let text_width: i64 = ctx.param("text_width")?;
        let bad_shape = |name: &str, why: String| OpError::Param {
            name: name.into(),
            why,
        };
        tch::manual_seed(settings.seed as i64);
        let vs = nn::VarStore::new(device);
        let mut ema_vs = nn::VarStore::new(device);
        let examples = train::examples(&pixels, vocabulary.tokenize(&captions), device);
        let model: Box<dyn Generator> = match arch.as_str() {
            ARCH => {
                let unet = UNetShape {
                    channels: ctx.param("channels")?,
                    mult: ctx.param("mult")?,
                    blocks: ctx.param("blocks")?,
                };
                unet.check(size).map_err(|why| bad_shape("mult", why))?;
                let config = ModelConfig {
                    arch,
                    size,
                    unet,
                    text_width,
                    vocabulary,
                    prediction: "v".into(),
                    schedule: "cosine".into(),
                };
                let model = Model::new(&vs.root(), config.clone());
                let _ema = Model::new(&ema_vs.root(), config);
                Box::new(model)
            }
            masked::ARCH => {
                let config = MaskedConfig {
                    arch,
                    size,
                    patch: ctx.param("patch")?,
                    codebook: ctx.param("codebook")?,
                    width: ctx.param("width")?,
                    layers: ctx.param("layers")?,
                    text_width,
                    vocabulary,
                };
                config.check().map_err(|why| bad_shape("patch", why))?;
                let model = MaskedModel::new(&vs.root(), config.clone());
                let _ema = MaskedModel::new(&ema_vs.root(), config.clone());
                // The tokenizer: k-means over the patches of up to 4,096 training images.
                let n = examples.images.size()[0].min(4096);
                let patches = model
                    .patches(&examples.images.narrow(0, 0, n))
                    .reshape([-1, 3 * config.patch * config.patch]);
                model.set_codebook(&masked::kmeans(&patches, config.codebook, 15));
                Box::new(model)
            }
            other => {
                return Err(bad_shape(
                    "arch",
                    format!("`{other}` is not an architecture this build has"),
                ));
            }
        };
        ema_vs
            .copy(&vs)
            .map_err(|e| OpError::Failed(format!("copying the initial weights: {e}")))?;
        let identity = identity(ctx, [("data", data_fingerprint(&pixels, &captions))]);
        let trainee = Trainee {
            model: model.as_ref(),
            vs: &vs,
            ema_vs: &ema_vs,
        };
        fit(ctx, &trainee, &examples, &settings, &identity, &[])
    }
}

impl Op for QualityTuneOp {
    fn schema(&self) -> OpSchema {
        needle_ops::schemas::quality_tune()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let settings = Settings {
            offset_share: 1.0,
            keep_every: ctx.param("checkpoint_every")?,
            ..settings(ctx)?
        };
        settings.check()?;
        let device = crate::device(ctx);
        let base = ctx.input("model")?;
        let (model, vs) = generator::load(base, &base.join(WEIGHTS), device)?;
        let (_ema_model, ema_vs) = generator::load(base, &base.join(WEIGHTS), device)?;
        let data = Dataset::open(ctx.input("data")?)?;
        let pixels = load_square(&data, ctx)?;
        if pixels.height as i64 != model.size() {
            return Err(OpError::Input {
                name: "data".into(),
                why: format!(
                    "its images are {0}×{0}, the model makes {1}×{1}",
                    pixels.height,
                    model.size()
                ),
            });
        }
        let captions: Vec<&str> = data.records().iter().map(|r| r.text.as_str()).collect();
        let unknown = model.vocabulary().unknown(&captions);
        let identity = identity(
            ctx,
            [
                ("model", file_fingerprint(&base.join(WEIGHTS))?),
                ("data", data_fingerprint(&pixels, &captions)),
            ],
        );
        let data = train::examples(&pixels, model.vocabulary().tokenize(&captions), device);
        let trainee = Trainee {
            model: model.as_ref(),
            vs: &vs,
            ema_vs: &ema_vs,
        };
        fit(ctx, &trainee, &data, &settings, &identity, &unknown)
    }
}

/// The settings both ops read the same way.
fn settings(ctx: &OpContext) -> Result<Settings, OpError> {
    Ok(Settings {
        steps: ctx.param("steps")?,
        batch: ctx.param("batch")?,
        lr: ctx.param("lr")?,
        schedule: ctx.param::<LrSchedule>("schedule")?,
        warmup: ctx.param("warmup")?,
        weight_decay: ctx.param("weight_decay")?,
        ema: ctx.param("ema")?,
        caption_dropout: ctx.param("caption_dropout")?,
        offset_noise: ctx.param("offset_noise")?,
        offset_share: 0.0,
        flip: ctx.param("flip")?,
        save_every: ctx.param("save_every")?,
        keep_every: 0,
        seed: ctx.param("seed")?,
        interrupt_after: None,
        precision: ctx.param("precision")?,
    })
}

/// The dataset's pixels, refused unless its images are square.
fn load_square(data: &Dataset, ctx: &OpContext) -> Result<needle_ops::dataset::Pixels, OpError> {
    if data.is_empty() {
        return Err(OpError::Input {
            name: "data".into(),
            why: format!("`{}` holds no images", data.root().display()),
        });
    }
    let pixels = data.load_pixels(ctx.cpus as usize)?;
    if pixels.height != pixels.width {
        return Err(OpError::Input {
            name: "data".into(),
            why: format!(
                "its images are {}×{}; pixel-diffusion needs square images",
                pixels.width, pixels.height
            ),
        });
    }
    Ok(pixels)
}

/// What a run of this step must match to be continued: see [`train::Identity`]. Without
/// `save_every`, which changes nothing in the output: the state kept there is then the same
/// bytes whatever cadence of resumable checkpoints made it.
fn identity<const N: usize>(ctx: &OpContext, inputs: [(&str, String); N]) -> Identity {
    let mut params = ctx.params.clone();
    params.remove("save_every");
    Identity {
        op: ctx.op.clone(),
        params,
        inputs: inputs
            .into_iter()
            .map(|(name, digest)| (name.to_string(), digest))
            .collect(),
    }
}

/// BLAKE3 of the training images and captions, as the op read them.
fn data_fingerprint(pixels: &needle_ops::dataset::Pixels, captions: &[&str]) -> String {
    let mut h = blake3::Hasher::new();
    for dim in [pixels.n, pixels.height, pixels.width] {
        h.update(&(dim as u64).to_le_bytes());
    }
    h.update(&pixels.data);
    for caption in captions {
        h.update(caption.as_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex().to_string()
}

/// BLAKE3 of a file's bytes.
fn file_fingerprint(path: &Path) -> Result<String, OpError> {
    let bytes = std::fs::read(path).map_err(OpError::io("read", path))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Train, then write the output: EMA weights, config, kept checkpoints, the state a longer run
/// continues from, metrics, summary.
fn fit(
    ctx: &OpContext,
    trainee: &Trainee<'_>,
    data: &Examples,
    settings: &Settings,
    identity: &Identity,
    unknown_words: &[String],
) -> Result<(), OpError> {
    let stage = ctx.op.as_str();
    let (model, vs, ema_vs) = (trainee.model, trainee.vs, trainee.ema_vs);
    let work = Workdir::for_ctx(ctx)?;
    let start = Start {
        identity,
        continue_from: ctx.optional_input(train::CONTINUE_FROM)?,
    };
    let record = train::train(ctx, trainee, data, settings, &start, work.path())?;
    let out = &ctx.out;
    let weights = out.join(WEIGHTS);
    ema_vs
        .save(&weights)
        .map_err(|e| OpError::Failed(format!("saving `{}`: {e}", weights.display())))?;
    model.write_config(out)?;
    if !record.kept.is_empty() {
        let dir = out.join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(OpError::io("create", &dir))?;
        for &step in &record.kept {
            move_file(
                &train::kept_path(work.path(), step),
                &train::kept_path(out, step),
            )?;
        }
    }
    if let Some(state) = &record.state {
        let dir = out.join(train::STATE);
        std::fs::create_dir_all(&dir).map_err(OpError::io("create", &dir))?;
        for file in ["state.safetensors", "state.json"] {
            move_file(&state.join(file), &dir.join(file))?;
        }
    }
    let device = match vs.device() {
        tch::Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        d => format!("{d:?}").to_lowercase(),
    };
    let device = match settings.precision {
        Precision::Fp32 => device,
        p => format!("{device}, {}", p.name()),
    };
    let metrics = json!({
        "stage": stage,
        "arch": model.arch(),
        "images": data.images.size()[0],
        "steps": settings.steps,
        "batch": settings.batch,
        "parameters": train::parameter_count(vs),
        "device": device,
        "first_loss": record.loss_curve.first().map(|p| p.1),
        "last_loss": record.loss_curve.last().map(|p| p.1),
        "loss_curve": record.loss_curve,
        "checkpoints": record.kept,
        "unknown_words": unknown_words,
    });
    let mut metrics = metrics;
    if let Some(c) = record.continued {
        metrics["continued_from"] = json!({"step": c.step, "of_steps": c.of});
    }
    let path = out.join("metrics.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&metrics).expect("json") + "\n",
    )
    .map_err(OpError::io("write", &path))?;
    let path = out.join(needle_ops::SUMMARY);
    std::fs::write(
        &path,
        summary(stage, settings, &record, data, &device, unknown_words),
    )
    .map_err(OpError::io("write", &path))?;
    println!("{}", timing(stage, settings, &record, &device));
    work.finish()
}

/// The execution's own figures, for its log: throughput, time, where it resumed from.
fn timing(stage: &str, s: &Settings, r: &Record, device: &str) -> String {
    let mut line = format!(
        "{stage}: {} steps at batch {} on {device}: {:.1} images/s, {:.1} s in the training loop",
        s.steps, s.batch, r.images_per_second, r.train_seconds
    );
    if r.resumed_from > 0 {
        line.push_str(&format!(" (resumed from step {})", r.resumed_from));
    }
    if let Some(c) = r.continued {
        line.push_str(&format!(
            " (continued from the state at step {} of a {}-step run)",
            c.step, c.of
        ));
    }
    line
}

fn summary(
    stage: &str,
    s: &Settings,
    r: &Record,
    data: &Examples,
    device: &str,
    unknown_words: &[String],
) -> String {
    let mut md = format!(
        "{stage}: {} steps at batch {} on {} images, {device} (its speed is in the step's log: \
         `needle logs`).\n\n| step | loss |\n|---:|---:|\n",
        s.steps,
        s.batch,
        data.images.size()[0],
    );
    // About ten rows of the curve, always the last.
    let every = (r.loss_curve.len() / 10).max(1);
    for (i, (step, loss)) in r.loss_curve.iter().enumerate() {
        if i % every == 0 || i + 1 == r.loss_curve.len() {
            md.push_str(&format!("| {step} | {loss:.4} |\n"));
        }
    }
    if !r.kept.is_empty() {
        let steps: Vec<String> = r.kept.iter().map(|s| s.to_string()).collect();
        md.push_str(&format!(
            "\nEMA checkpoints kept at steps {} (`checkpoints/`; `sample` reads one with `checkpoint = STEP`).\n",
            steps.join(", ")
        ));
    }
    if let Some(c) = r.continued {
        md.push_str(&format!(
            "\nContinued from the training state at step {} of a {}-step run \
             (`continue_from`): the same weights as training {} steps directly.\n",
            c.step, c.of, s.steps
        ));
    }
    if !unknown_words.is_empty() {
        md.push_str(&format!(
            "\nCaption words the model's vocabulary lacks (read as unknown): {}.\n",
            unknown_words.join(", ")
        ));
    }
    md
}

/// Move `from` to `to`, copying where a rename cannot (another file system).
fn move_file(from: &Path, to: &Path) -> Result<(), OpError> {
    if std::fs::rename(from, to).is_err() {
        std::fs::copy(from, to).map_err(OpError::io("copy", from))?;
    }
    Ok(())
}

/// Where training keeps its resumable state: the runner's resume directory when there is one
/// (it survives a failed attempt), else a directory inside the output removed at the end.
struct Workdir {
    path: PathBuf,
    temporary: bool,
}

impl Workdir {
    fn for_ctx(ctx: &OpContext) -> Result<Workdir, OpError> {
        let (path, temporary) = match &ctx.resume {
            Some(dir) => (dir.clone(), false),
            None => (ctx.out.join(".train"), true),
        };
        std::fs::create_dir_all(&path).map_err(OpError::io("create", &path))?;
        Ok(Workdir { path, temporary })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn finish(self) -> Result<(), OpError> {
        if self.temporary {
            std::fs::remove_dir_all(&self.path).map_err(OpError::io("remove", &self.path))?;
        }
        Ok(())
    }
}
