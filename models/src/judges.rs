//! `judges`: the evaluation panel, trained once and read by every `evaluate`.
//!
//! The paper judged by human raters; needle by two panels of automatic judges, each judge
//! trained on its own disjoint slice of a rated sample — the judges' own, drawn from a pool that
//! neither the filter nor its scorers ever saw, so that the experiment does not grade itself:
//!
//! - **appeal** (default 5): aesthetic scorers, regressing the hidden quality, as raters who
//!   were shown many rated pictures;
//! - **faithfulness** (default 3): concept classifiers, naming an image's shape and colour from
//!   its true concept, as raters who know what a red circle looks like.
//!
//! Output: `appeal-<k>/` and `faithfulness-<k>/` (weights, config, validation metrics each),
//! `panel.json`, `summary.md`.

use std::collections::BTreeMap;
use std::path::Path;

use needle_core::ops::OpSchema;
use needle_ops::dataset::{Dataset, Pixels};
use needle_ops::{Op, OpContext, OpError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::scorer::{self, Scorer, ScorerKind, Training, encoder, sample_indices, to_tensor};

pub struct JudgesOp;

/// What a concept classifier needs to be rebuilt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub size: i64,
    pub width: i64,
    /// Label names, index = class id.
    pub shapes: Vec<String>,
    pub colours: Vec<String>,
}

/// A concept classifier: the shared encoder, a head for the shape and one for the colour.
pub struct Classifier {
    encoder: nn::Sequential,
    shape: nn::Linear,
    colour: nn::Linear,
}

impl Classifier {
    pub fn new(p: &nn::Path, c: &ClassifierConfig) -> Classifier {
        let (encoder, features) = encoder(p, c.width);
        Classifier {
            encoder,
            shape: nn::linear(
                p / "shape",
                features,
                c.shapes.len() as i64,
                Default::default(),
            ),
            colour: nn::linear(
                p / "colour",
                features,
                c.colours.len() as i64,
                Default::default(),
            ),
        }
    }

    /// (shape logits, colour logits) for `images` [n, 3, h, w] in [-1, 1].
    pub fn forward(&self, images: &Tensor) -> (Tensor, Tensor) {
        let f = self.encoder.forward(images);
        (self.shape.forward(&f), self.colour.forward(&f))
    }

    /// Predicted (shape, colour) ids of every image, in batches.
    pub fn predict(&self, images: &Tensor) -> Result<Vec<(usize, usize)>, OpError> {
        let (s, c) = tch::no_grad(|| {
            let parts: Vec<(Tensor, Tensor)> = images
                .split(512, 0)
                .iter()
                .map(|x| {
                    let (s, c) = self.forward(x);
                    (s.argmax(-1, false), c.argmax(-1, false))
                })
                .collect();
            let (s, c): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().unzip();
            (Tensor::cat(&s, 0), Tensor::cat(&c, 0))
        });
        let s = ids(&s)?;
        let c = ids(&c)?;
        Ok(s.into_iter().zip(c).collect())
    }
}

fn ids(t: &Tensor) -> Result<Vec<usize>, OpError> {
    Ok(Vec::<i64>::try_from(t.to_device(Device::Cpu))
        .map_err(|e| OpError::Failed(format!("reading predictions: {e}")))?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}

impl Op for JudgesOp {
    fn schema(&self) -> OpSchema {
        needle_ops::schemas::judges()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let appeal: usize = ctx.param("appeal")?;
        let faithfulness: usize = ctx.param("faithfulness")?;
        let sample: usize = ctx.param("sample")?;
        let seed: i64 = ctx.param("seed")?;
        let training = Training::from_ctx(ctx)?;
        let device = crate::device(ctx);
        let threads = ctx.cpus as usize;
        let data = Dataset::open(ctx.input("data")?)?;
        let needed = (appeal + faithfulness) * sample;
        if data.len() < needed {
            return Err(OpError::Failed(format!(
                "{appeal} + {faithfulness} judges of {sample} images each need {needed} rated \
                 images; the dataset has {}",
                data.len()
            )));
        }
        // One shuffle, then consecutive slices: no two judges share an image.
        let order = sample_indices(data.len(), 0, needed, seed as u64);
        let slice = |k: usize| data.select(&order[k * sample..(k + 1) * sample]);

        let mut panel = Vec::new();
        for k in 0..appeal {
            tch::manual_seed(seed + k as i64);
            let (vs, config, metrics) =
                scorer::train(ScorerKind::Aesthetic, &slice(k), &training, threads, device)?;
            let dir = ctx.out.join(format!("appeal-{k}"));
            std::fs::create_dir_all(&dir).map_err(OpError::io("create", &dir))?;
            scorer::save(&dir, &vs, &config, &metrics)?;
            panel.push(json!({"judge": format!("appeal-{k}"), "metrics": metrics}));
            progress(ctx, panel.len(), appeal + faithfulness);
        }
        for k in 0..faithfulness {
            tch::manual_seed(seed + 1000 + k as i64);
            let (vs, config, metrics) =
                train_classifier(&slice(appeal + k), &training, threads, device)?;
            let dir = ctx.out.join(format!("faithfulness-{k}"));
            std::fs::create_dir_all(&dir).map_err(OpError::io("create", &dir))?;
            save_classifier(&dir, &vs, &config, &metrics)?;
            panel.push(json!({"judge": format!("faithfulness-{k}"), "metrics": metrics}));
            progress(ctx, panel.len(), appeal + faithfulness);
        }

        let path = ctx.out.join("panel.json");
        let text = serde_json::to_string_pretty(&json!({
            "appeal": appeal,
            "faithfulness": faithfulness,
            "sample": sample,
            "judges": panel,
        }))
        .expect("json");
        std::fs::write(&path, text + "\n").map_err(OpError::io("write", &path))?;
        let mut md = format!(
            "{appeal} appeal judges and {faithfulness} faithfulness judges, {sample} rated images each:\n\n"
        );
        for j in &panel {
            md.push_str(&format!(
                "- {}: {}\n",
                j["judge"].as_str().unwrap_or("?"),
                j["metrics"]
            ));
        }
        let path = ctx.out.join(needle_ops::SUMMARY);
        std::fs::write(&path, md).map_err(OpError::io("write", &path))
    }
}

fn progress(ctx: &OpContext, done: usize, total: usize) {
    ctx.report(&needle_ops::Progress {
        done: done as u64,
        total: Some(total as u64),
        unit: "judge".into(),
        ..Default::default()
    });
}

/// Train a concept classifier on `subset`'s true concepts (its last fifth held out).
fn train_classifier(
    subset: &Dataset,
    t: &Training,
    threads: usize,
    device: Device,
) -> Result<(nn::VarStore, ClassifierConfig, serde_json::Value), OpError> {
    let label = |column: &str| -> Result<Vec<String>, OpError> {
        subset
            .records()
            .iter()
            .map(|r| {
                r.extra
                    .get(column)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| OpError::Input {
                        name: "data".into(),
                        why: format!("has no `{column}` column; faithfulness judges need it"),
                    })
            })
            .collect()
    };
    let shapes = label("rating_true_shape")?;
    let colours = label("rating_true_color")?;
    let classes = |v: &[String]| {
        let mut c: Vec<String> = v.to_vec();
        c.sort();
        c.dedup();
        c
    };
    let pixels = subset.load_pixels(threads)?;
    let config = ClassifierConfig {
        size: pixels.height as i64,
        width: t.width,
        shapes: classes(&shapes),
        colours: classes(&colours),
    };
    let index = |names: &[String], v: &[String]| -> Tensor {
        let pos: BTreeMap<&str, i64> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as i64))
            .collect();
        let ids: Vec<i64> = v.iter().map(|x| pos[x.as_str()]).collect();
        Tensor::from_slice(&ids).to_device(device)
    };
    let shape_y = index(&config.shapes, &shapes);
    let colour_y = index(&config.colours, &colours);
    let images = to_tensor(&pixels, device);
    let n = subset.len() as i64;
    let n_val = (n / 5).max(2);
    let train_idx = Tensor::arange_start(n_val, n, (Kind::Int64, device));
    let val_idx = Tensor::arange(n_val, (Kind::Int64, device));

    let vs = nn::VarStore::new(device);
    let model = Classifier::new(&vs.root(), &config);
    let mut opt = nn::Adam::default()
        .build(&vs, t.lr)
        .map_err(|e| OpError::Failed(format!("optimizer: {e}")))?;
    for _ in 0..t.steps {
        let perm =
            Tensor::randperm(n - n_val, (Kind::Int64, device)).narrow(0, 0, t.batch.min(n - n_val));
        let b = train_idx.index_select(0, &perm);
        let (s, c) = model.forward(&images.index_select(0, &b));
        let loss = s.cross_entropy_for_logits(&shape_y.index_select(0, &b))
            + c.cross_entropy_for_logits(&colour_y.index_select(0, &b));
        opt.backward_step(&loss);
    }
    let predicted = model.predict(&images.index_select(0, &val_idx))?;
    let truth_s = ids(&shape_y.index_select(0, &val_idx))?;
    let truth_c = ids(&colour_y.index_select(0, &val_idx))?;
    let both = predicted
        .iter()
        .zip(truth_s.iter().zip(&truth_c))
        .filter(|((ps, pc), (ts, tc))| ps == *ts && pc == *tc)
        .count();
    let metrics = json!({
        "validation_images": n_val,
        "concept_accuracy": both as f64 / predicted.len().max(1) as f64,
    });
    Ok((vs, config, metrics))
}

fn save_classifier(
    dir: &Path,
    vs: &nn::VarStore,
    config: &ClassifierConfig,
    metrics: &serde_json::Value,
) -> Result<(), OpError> {
    vs.save(dir.join("model.safetensors"))
        .map_err(|e| OpError::Failed(format!("saving a judge: {e}")))?;
    for (name, v) in [
        ("config.json", serde_json::to_value(config).expect("json")),
        ("metrics.json", metrics.clone()),
    ] {
        let path = dir.join(name);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&v).expect("json") + "\n",
        )
        .map_err(OpError::io("write", path))?;
    }
    Ok(())
}

/// A trained panel, loaded for judging.
pub struct Panel {
    pub appeal: Vec<(Scorer, nn::VarStore)>,
    pub faithfulness: Vec<(Classifier, ClassifierConfig, nn::VarStore)>,
}

impl Panel {
    pub fn load(dir: &Path, device: Device) -> Result<Panel, OpError> {
        let mut appeal = Vec::new();
        let mut faithfulness = Vec::new();
        for k in 0.. {
            let d = dir.join(format!("appeal-{k}"));
            if !d.is_dir() {
                break;
            }
            let (model, _config, vs) = Scorer::load(&d, device)?;
            appeal.push((model, vs));
        }
        for k in 0.. {
            let d = dir.join(format!("faithfulness-{k}"));
            if !d.is_dir() {
                break;
            }
            let text = std::fs::read_to_string(d.join("config.json"))
                .map_err(OpError::io("read", d.join("config.json")))?;
            let config: ClassifierConfig = serde_json::from_str(&text)
                .map_err(|e| OpError::Failed(format!("judge config in `{}`: {e}", d.display())))?;
            let mut vs = nn::VarStore::new(device);
            let model = Classifier::new(&vs.root(), &config);
            vs.load(d.join("model.safetensors"))
                .map_err(|e| OpError::Failed(format!("judge weights in `{}`: {e}", d.display())))?;
            faithfulness.push((model, config, vs));
        }
        if appeal.is_empty() || faithfulness.is_empty() {
            return Err(OpError::Input {
                name: "judges".into(),
                why: "holds no appeal or no faithfulness judge (is it a `judges` output?)".into(),
            });
        }
        Ok(Panel {
            appeal,
            faithfulness,
        })
    }

    /// Each appeal judge's score of every image.
    pub fn appeal_scores(&self, pixels: &Pixels, device: Device) -> Result<Vec<Vec<f32>>, OpError> {
        self.appeal
            .iter()
            .map(|(m, _)| m.score_images(pixels, device))
            .collect()
    }

    /// For each faithfulness judge, whether each image shows its prompt's concept.
    pub fn matches(
        &self,
        pixels: &Pixels,
        prompts: &[&str],
        device: Device,
    ) -> Result<Vec<Vec<bool>>, OpError> {
        let images = to_tensor(pixels, device);
        self.faithfulness
            .iter()
            .map(|(m, c, _)| {
                let predicted = m.predict(&images)?;
                Ok(predicted
                    .iter()
                    .zip(prompts)
                    .map(|((s, col), prompt)| {
                        let words: Vec<String> =
                            prompt.split_whitespace().map(str::to_lowercase).collect();
                        words.contains(&c.shapes[*s]) && words.contains(&c.colours[*col])
                    })
                    .collect())
            })
            .collect()
    }
}
