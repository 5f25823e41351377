//! `scorer`: trains the small models the filtering funnel uses.
//!
//! - `aesthetic`: regression of the hidden quality on a *rated sample* of a pool, the stand-in
//!   for an aesthetic predictor trained on human ratings (as LAION's was on AVA).
//! - `agreement`: a caption–image agreement classifier, the stand-in for a CLIP score. It never
//!   sees a rating: it learns from the pool itself, contrasting each image's own caption with a
//!   caption drawn from another image, as CLIP learns from web pairs, noise included.
//!
//! Output: `model.safetensors` (loadable from Python), `config.json` (architecture, vocabulary,
//! image size), `metrics.json` (validation metrics on a held-out part of the sample).

use std::collections::BTreeMap;
use std::path::Path;

use needle_core::ops::OpSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use needle_ops::Op;
use needle_ops::OpContext;
use needle_ops::OpError;
use needle_ops::dataset::{Dataset, Pixels};

pub struct ScorerOp;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScorerKind {
    Aesthetic,
    Agreement,
}

/// What a trained scorer needs to be rebuilt: saved as `config.json` beside the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScorerConfig {
    pub kind: ScorerKind,
    pub size: i64,
    pub width: i64,
    /// Caption words, index = token id (`agreement` only); unknown words map to id 0.
    #[serde(default)]
    pub vocab: Vec<String>,
}

impl Op for ScorerOp {
    fn schema(&self) -> OpSchema {
        needle_ops::schemas::scorer()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let kind: ScorerKind = ctx.param("kind")?;
        let sample: usize = ctx.param("sample")?;
        let skip: usize = ctx.param("skip")?;
        let seed: i64 = ctx.param("seed")?;
        let training = Training::from_ctx(ctx)?;
        let device = crate::device(ctx);
        tch::manual_seed(seed);

        let data = Dataset::open(ctx.input("data")?)?;
        let chosen = sample_indices(data.len(), skip, sample, seed as u64);
        if chosen.len() < 10 {
            return Err(OpError::Failed(format!(
                "the dataset has {} images after skipping {skip}; a scorer needs at least 10",
                data.len()
            )));
        }
        let subset = data.select(&chosen);
        let (vs, config, metrics) =
            train(kind, &subset, None, &training, ctx.cpus as usize, device)?;
        save(&ctx.out, &vs, &config, &metrics)
    }
}

/// How a scorer is trained.
#[derive(Debug, Clone, Copy)]
pub struct Training {
    pub steps: i64,
    pub batch: i64,
    pub lr: f64,
    pub width: i64,
}

impl Training {
    /// The `steps`, `batch`, `lr` and `width` params every scorer-training op has.
    pub fn from_ctx(ctx: &OpContext) -> Result<Training, OpError> {
        Ok(Training {
            steps: ctx.param("steps")?,
            batch: ctx.param("batch")?,
            lr: ctx.param("lr")?,
            width: ctx.param("width")?,
        })
    }
}

/// Train a scorer of `kind` on `subset` (its last fifth held out for validation): the weights,
/// the config to rebuild it, and the validation metrics. An aesthetic scorer regresses
/// `target`, one value per image of `subset`, or the subset's `rating_quality` (the curators'
/// rubric) where `target` is `None`. Seed torch's generator first.
pub fn train(
    kind: ScorerKind,
    subset: &Dataset,
    target: Option<&[f64]>,
    t: &Training,
    threads: usize,
    device: Device,
) -> Result<(nn::VarStore, ScorerConfig, serde_json::Value), OpError> {
    let (steps, batch, lr, width) = (t.steps, t.batch, t.lr, t.width);
    let pixels = subset.load_pixels(threads)?;
    let images = to_tensor(&pixels, device);
    let n = subset.len() as i64;
    let n_val = (n / 5).max(2);
    let (val_idx, train_idx) = split(n, n_val, device);

    let vs = nn::VarStore::new(device);
    let config = match kind {
        ScorerKind::Aesthetic => ScorerConfig {
            kind,
            size: pixels.height as i64,
            width,
            vocab: Vec::new(),
        },
        ScorerKind::Agreement => ScorerConfig {
            kind,
            size: pixels.height as i64,
            width,
            vocab: vocabulary(subset.records().iter().map(|r| r.text.as_str())),
        },
    };
    let model = Scorer::new(&vs.root(), &config);
    let mut opt = nn::Adam::default()
        .build(&vs, lr)
        .map_err(|e| OpError::Failed(format!("optimizer: {e}")))?;

    let metrics = match kind {
        ScorerKind::Aesthetic => {
            let q = match target {
                Some(t) => t.to_vec(),
                None => subset.ratings("quality")?,
            };
            let q = Tensor::from_slice(&q)
                .to_kind(Kind::Float)
                .to_device(device);
            for _ in 0..steps {
                let b = batch_of(&train_idx, batch, device);
                let pred = model.aesthetic(&images.index_select(0, &b), true);
                let loss = pred.mse_loss(&q.index_select(0, &b), tch::Reduction::Mean);
                opt.backward_step(&loss);
            }
            let pred = tch::no_grad(|| model.aesthetic(&images.index_select(0, &val_idx), false));
            let truth = q.index_select(0, &val_idx);
            let pred: Vec<f64> = Vec::<f32>::try_from(pred.to_device(Device::Cpu))
                .map_err(|e| OpError::Failed(e.to_string()))?
                .into_iter()
                .map(f64::from)
                .collect();
            let truth: Vec<f64> = Vec::<f32>::try_from(truth.to_device(Device::Cpu))
                .map_err(|e| OpError::Failed(e.to_string()))?
                .into_iter()
                .map(f64::from)
                .collect();
            json!({
                "validation_images": n_val,
                "pearson": pearson(&pred, &truth),
                "spearman": spearman(&pred, &truth),
            })
        }
        ScorerKind::Agreement => {
            let tokens = tokenize_all(
                &config.vocab,
                subset.records().iter().map(|r| r.text.as_str()),
            )
            .to_device(device);
            for _ in 0..steps {
                let b = batch_of(&train_idx, batch, device);
                let loss = model
                    .contrastive_loss(&images.index_select(0, &b), &tokens.index_select(0, &b));
                opt.backward_step(&loss);
            }
            let val_images = images.index_select(0, &val_idx);
            let val_tokens = tokens.index_select(0, &val_idx);
            let (pos, neg) = tch::no_grad(|| {
                let shuffled = val_tokens.roll(1, 0);
                (
                    model.agreement(&val_images, &val_tokens, false).sigmoid(),
                    model.agreement(&val_images, &shuffled, false).sigmoid(),
                )
            });
            let pos = to_vec(&pos)?;
            let neg = to_vec(&neg)?;
            // Report only: how well the score finds the captions the data got right.
            let correct = subset.ratings("caption_correct").ok().map(|c| {
                let val: Vec<usize> = to_indices(&val_idx);
                let labels: Vec<bool> = val.iter().map(|&i| c[i] > 0.5).collect();
                auc(&pos, &labels)
            });
            json!({
                "validation_images": n_val,
                "pair_accuracy": pos.iter().zip(&neg).filter(|(p, n)| p > n).count() as f64 / pos.len() as f64,
                "mean_score_own_caption": mean(&pos),
                "mean_score_other_caption": mean(&neg),
                "auc_caption_correct": correct,
            })
        }
    };

    Ok((vs, config, metrics))
}

/// The scorers' network: a small convolutional encoder, then a regression head (`aesthetic`)
/// or a joint image-caption head (`agreement`). Parameter names are stable checkpoint keys.
pub struct Scorer {
    encoder: nn::Sequential,
    head: nn::Linear,
    words: Option<nn::Embedding>,
    joint: Option<nn::Sequential>,
}

impl Scorer {
    pub fn new(p: &nn::Path, c: &ScorerConfig) -> Scorer {
        let (encoder, features) = encoder(p, c.width);
        match c.kind {
            ScorerKind::Aesthetic => Scorer {
                encoder,
                head: nn::linear(p / "head", features, 1, Default::default()),
                words: None,
                joint: None,
            },
            ScorerKind::Agreement => {
                let words = nn::embedding(
                    p / "words",
                    c.vocab.len().max(1) as i64 + 1,
                    features,
                    Default::default(),
                );
                let joint = nn::seq()
                    .add(nn::linear(
                        p / "joint1",
                        3 * features,
                        features,
                        Default::default(),
                    ))
                    .add_fn(|x| x.relu());
                Scorer {
                    encoder,
                    head: nn::linear(p / "head", features, 1, Default::default()),
                    words: Some(words),
                    joint: Some(joint),
                }
            }
        }
    }

    /// Predicted quality per image (`images`: [n, 3, h, w] in [-1, 1]).
    pub fn aesthetic(&self, images: &Tensor, _train: bool) -> Tensor {
        self.head
            .forward(&self.encoder.forward(images))
            .squeeze_dim(-1)
    }

    /// Agreement logit per (image, caption tokens [n, words]) pair.
    pub fn agreement(&self, images: &Tensor, tokens: &Tensor, _train: bool) -> Tensor {
        let img = self.encoder.forward(images);
        let words = self
            .words
            .as_ref()
            .expect("an agreement scorer has word embeddings");
        let joint = self
            .joint
            .as_ref()
            .expect("an agreement scorer has a joint head");
        // Mean of the word embeddings, padding (id 0 after the last word) included as a word.
        let cap = words.forward(tokens).mean_dim(1, false, Kind::Float);
        let x = Tensor::cat(&[&img, &cap, &(&img * &cap)], 1);
        self.head.forward(&joint.forward(&x)).squeeze_dim(-1)
    }

    /// Own captions are positives; the batch's captions rolled by one are negatives.
    fn contrastive_loss(&self, images: &Tensor, tokens: &Tensor) -> Tensor {
        let n = images.size()[0];
        let pos = self.agreement(images, tokens, true);
        let neg = self.agreement(images, &tokens.roll(1, 0), true);
        let logits = Tensor::cat(&[pos, neg], 0);
        let labels = Tensor::cat(
            &[
                Tensor::ones([n], (Kind::Float, images.device())),
                Tensor::zeros([n], (Kind::Float, images.device())),
            ],
            0,
        );
        logits.binary_cross_entropy_with_logits::<Tensor>(&labels, None, None, tch::Reduction::Mean)
    }

    /// Load a trained scorer from its artifact directory.
    pub fn load(
        dir: &Path,
        device: Device,
    ) -> Result<(Scorer, ScorerConfig, nn::VarStore), OpError> {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(OpError::io("read", dir.join("config.json")))?;
        let config: ScorerConfig = serde_json::from_str(&text)
            .map_err(|e| OpError::Failed(format!("scorer config in `{}`: {e}", dir.display())))?;
        let mut vs = nn::VarStore::new(device);
        let model = Scorer::new(&vs.root(), &config);
        vs.load(dir.join("model.safetensors"))
            .map_err(|e| OpError::Failed(format!("scorer weights in `{}`: {e}", dir.display())))?;
        Ok((model, config, vs))
    }

    /// Scores of every image of `pixels` (aesthetic: predicted quality), in batches.
    pub fn score_images(&self, pixels: &Pixels, device: Device) -> Result<Vec<f32>, OpError> {
        let images = to_tensor(pixels, device);
        let out = tch::no_grad(|| {
            let chunks: Vec<Tensor> = images
                .split(512, 0)
                .iter()
                .map(|chunk| self.aesthetic(chunk, false))
                .collect();
            Tensor::cat(&chunks, 0)
        });
        to_vec(&out)
    }

    /// Agreement probabilities of every (image, caption) pair.
    pub fn score_pairs(
        &self,
        config: &ScorerConfig,
        pixels: &Pixels,
        captions: &[&str],
        device: Device,
    ) -> Result<Vec<f32>, OpError> {
        let images = to_tensor(pixels, device);
        let tokens = tokenize_all(&config.vocab, captions.iter().copied()).to_device(device);
        let out = tch::no_grad(|| {
            let img = images.split(512, 0);
            let tok = tokens.split(512, 0);
            let chunks: Vec<Tensor> = img
                .iter()
                .zip(&tok)
                .map(|(i, t)| self.agreement(i, t, false).sigmoid())
                .collect();
            Tensor::cat(&chunks, 0)
        });
        to_vec(&out)
    }
}

/// The image encoder every scorer and judge shares: three convolutions (the last two halve the
/// resolution), ReLU, global average pooling. Returns it and its feature width.
pub fn encoder(p: &nn::Path, width: i64) -> (nn::Sequential, i64) {
    let conv = |p: nn::Path, i, o, stride| {
        nn::conv2d(
            p,
            i,
            o,
            3,
            nn::ConvConfig {
                stride,
                padding: 1,
                ..Default::default()
            },
        )
    };
    let w = width;
    let encoder = nn::seq()
        .add(conv(p / "conv1", 3, w, 1))
        .add_fn(|x| x.relu())
        .add(conv(p / "conv2", w, 2 * w, 2))
        .add_fn(|x| x.relu())
        .add(conv(p / "conv3", 2 * w, 4 * w, 2))
        .add_fn(|x| x.relu())
        .add_fn(|x| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
    (encoder, 4 * w)
}

/// Images as a float tensor [n, 3, h, w] in [-1, 1].
pub fn to_tensor(p: &Pixels, device: Device) -> Tensor {
    Tensor::from_slice(&p.data)
        .view([p.n as i64, p.height as i64, p.width as i64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        .to_device(device)
        / 127.5
        - 1.0
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, OpError> {
    Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float))
        .map_err(|e| OpError::Failed(format!("reading scores: {e}")))
}

fn to_indices(t: &Tensor) -> Vec<usize> {
    Vec::<i64>::try_from(t.to_device(Device::Cpu))
        .unwrap_or_default()
        .into_iter()
        .map(|i| i as usize)
        .collect()
}

/// `sample` indices after `skip`, in a seeded order, so scorers and judges can take disjoint
/// slices of one shuffled pool.
pub fn sample_indices(len: usize, skip: usize, sample: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..len).collect();
    shuffle(&mut all, seed);
    all.into_iter().skip(skip).take(sample).collect()
}

/// Fisher-Yates with a SplitMix64 stream: stable across platforms and crate versions.
fn shuffle(v: &mut [usize], seed: u64) {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Validation indices (the first `n_val`) and training indices, as tensors.
fn split(n: i64, n_val: i64, device: Device) -> (Tensor, Tensor) {
    let all = Tensor::arange(n, (Kind::Int64, device));
    (all.narrow(0, 0, n_val), all.narrow(0, n_val, n - n_val))
}

/// A random batch of `idx` (a fresh draw from torch's generator, seeded once by the op).
fn batch_of(idx: &Tensor, batch: i64, device: Device) -> Tensor {
    let n = idx.size()[0];
    let perm = Tensor::randperm(n, (Kind::Int64, device)).narrow(0, 0, batch.min(n));
    idx.index_select(0, &perm)
}

/// The words of the captions, sorted; id 0 is kept for unknown words.
pub fn vocabulary<'a>(captions: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut words: Vec<String> = captions
        .flat_map(|c| c.split_whitespace().map(str::to_lowercase))
        .collect();
    words.sort();
    words.dedup();
    words
}

/// Token ids [n, 4] (captions padded or cut to four words).
pub fn tokenize_all<'a>(vocab: &[String], captions: impl Iterator<Item = &'a str>) -> Tensor {
    const WORDS: usize = 4;
    let ids: BTreeMap<&str, i64> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.as_str(), i as i64 + 1))
        .collect();
    let mut flat = Vec::new();
    let mut n = 0i64;
    for c in captions {
        let mut row: Vec<i64> = c
            .split_whitespace()
            .map(|w| *ids.get(w.to_lowercase().as_str()).unwrap_or(&0))
            .take(WORDS)
            .collect();
        row.resize(WORDS, 0);
        flat.extend(row);
        n += 1;
    }
    Tensor::from_slice(&flat).view([n, WORDS as i64])
}

/// Write a trained scorer: weights, config, metrics and a summary.
pub fn save(
    out: &Path,
    vs: &nn::VarStore,
    config: &ScorerConfig,
    metrics: &serde_json::Value,
) -> Result<(), OpError> {
    vs.save(out.join("model.safetensors"))
        .map_err(|e| OpError::Failed(format!("saving the scorer: {e}")))?;
    let write = |name: &str, v: &serde_json::Value| {
        let path = out.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(v).expect("json") + "\n")
            .map_err(OpError::io("write", path))
    };
    write("config.json", &serde_json::to_value(config).expect("json"))?;
    write("metrics.json", metrics)?;
    let mut md = format!("{:?} scorer, validation metrics:\n\n", config.kind).to_lowercase();
    if let Some(m) = metrics.as_object() {
        for (k, v) in m {
            md.push_str(&format!("- {k}: {v}\n"));
        }
    }
    let path = out.join(needle_ops::SUMMARY);
    std::fs::write(&path, md).map_err(OpError::io("write", path))
}

pub fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64
}

pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        0.0
    } else {
        cov / (va * vb).sqrt()
    }
}

pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    for (rank, i) in order.into_iter().enumerate() {
        r[i] = rank as f64;
    }
    r
}

/// Area under the ROC curve of `scores` for the positives in `labels`.
pub fn auc(scores: &[f32], labels: &[bool]) -> f64 {
    let s: Vec<f64> = scores.iter().map(|&x| f64::from(x)).collect();
    let r = ranks(&s);
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    let rank_sum: f64 = r
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l)
        .map(|(r, _)| r + 1.0)
        .sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}
