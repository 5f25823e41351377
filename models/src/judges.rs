//! `judges`: the evaluation panel, trained once and read by every `evaluate`.
//!
//! The paper judged by human raters; needle by two panels of automatic judges, each judge
//! trained on its own disjoint slice of a rated sample — the judges' own, drawn from a pool that
//! neither the filter nor its scorers ever saw, so that the experiment does not grade itself:
//!
//! - **appeal** (default 5): regressors of the haystack's `rating_preference`, the human
//!   preference, never of `rating_quality`, the rubric the curators select by (the two are
//!   different weightings of partly different factors: `needle_ops::haystack`). Each judge's
//!   labels carry its own rater noise (`rater_noise`), as each human panel's would;
//! - **faithfulness** (default 3): concept classifiers, naming an image's shape, colour and size
//!   from its true concept, as raters who know what a small red circle looks like.
//!
//! Then each judge is checked on `check` further rated images, none of them any judge's own:
//! appeal judges by their rank correlation with the hidden preference (and, for contrast, with
//! the rubric), overall and within each third of the images by preference; faithfulness judges
//! by their concept accuracy within each third. A judge that only tells bad from good images, or
//! that reads only clean ones right, shows it there.
//!
//! Output: `appeal-<k>/` and `faithfulness-<k>/` (weights, config, validation metrics each),
//! `panel.json` (with `agreement`), `summary.md`.

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
    pub sizes: Vec<String>,
}

/// A concept classifier: the shared encoder, a head each for the shape, colour and size.
pub struct Classifier {
    encoder: nn::Sequential,
    shape: nn::Linear,
    colour: nn::Linear,
    size: nn::Linear,
}

/// A classifier's reading of one image: indices into its config's label lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub shape: usize,
    pub colour: usize,
    pub size: usize,
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
            size: nn::linear(
                p / "size",
                features,
                c.sizes.len() as i64,
                Default::default(),
            ),
        }
    }

    /// (shape, colour, size) logits for `images` [n, 3, h, w] in [-1, 1].
    pub fn forward(&self, images: &Tensor) -> [Tensor; 3] {
        let f = self.encoder.forward(images);
        [
            self.shape.forward(&f),
            self.colour.forward(&f),
            self.size.forward(&f),
        ]
    }

    /// The reading of every image, in batches.
    pub fn predict(&self, images: &Tensor) -> Result<Vec<Reading>, OpError> {
        let heads = tch::no_grad(|| {
            let parts: Vec<[Tensor; 3]> = images
                .split(512, 0)
                .iter()
                .map(|x| self.forward(x).map(|l| l.argmax(-1, false)))
                .collect();
            [0, 1, 2].map(|h| Tensor::cat(&parts.iter().map(|p| &p[h]).collect::<Vec<_>>(), 0))
        });
        let [s, c, z] = [ids(&heads[0])?, ids(&heads[1])?, ids(&heads[2])?];
        Ok((0..s.len())
            .map(|i| Reading {
                shape: s[i],
                colour: c[i],
                size: z[i],
            })
            .collect())
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
        let check: usize = ctx.param("check")?;
        let rater_noise: f64 = ctx.param("rater_noise")?;
        let seed: i64 = ctx.param("seed")?;
        let training = Training::from_ctx(ctx)?;
        let device = crate::device(ctx);
        let threads = ctx.cpus as usize;
        let data = Dataset::open(ctx.input("data")?)?;
        let needed = (appeal + faithfulness) * sample + check;
        if data.len() < needed {
            return Err(OpError::Failed(format!(
                "{appeal} + {faithfulness} judges of {sample} images each and {check} to check \
                 them on need {needed} rated images; the dataset has {}",
                data.len()
            )));
        }
        // One shuffle, then consecutive slices: no two judges share an image, and the check
        // images are no judge's.
        let order = sample_indices(data.len(), 0, needed, seed as u64);
        let slice = |k: usize| data.select(&order[k * sample..(k + 1) * sample]);
        let checked = data.select(&order[(appeal + faithfulness) * sample..]);
        let check_px = checked.load_pixels(threads)?;
        let strata = Strata::of(&checked)?;

        let mut panel = Vec::new();
        for k in 0..appeal {
            tch::manual_seed(seed + k as i64);
            let subset = slice(k);
            let target = appeal_target(&subset, rater_noise, seed as u64 + k as u64)?;
            let (vs, config, metrics) = scorer::train(
                ScorerKind::Aesthetic,
                &subset,
                Some(&target),
                &training,
                threads,
                device,
            )?;
            let dir = ctx.out.join(format!("appeal-{k}"));
            std::fs::create_dir_all(&dir).map_err(OpError::io("create", &dir))?;
            scorer::save(&dir, &vs, &config, &metrics)?;
            let (model, _, _vs) = Scorer::load(&dir, device)?;
            let scores = model.score_images(&check_px, device)?;
            let agreement = strata.appeal_agreement(&scores);
            panel.push(
                json!({"judge": format!("appeal-{k}"), "metrics": metrics, "agreement": agreement}),
            );
            progress(ctx, panel.len(), appeal + faithfulness);
        }
        for k in 0..faithfulness {
            tch::manual_seed(seed + 1000 + k as i64);
            let (vs, config, metrics) =
                train_classifier(&slice(appeal + k), &training, threads, device)?;
            let dir = ctx.out.join(format!("faithfulness-{k}"));
            std::fs::create_dir_all(&dir).map_err(OpError::io("create", &dir))?;
            save_classifier(&dir, &vs, &config, &metrics)?;
            let (model, config, _vs) = load_classifier(&dir, device)?;
            let readings = model.predict(&to_tensor(&check_px, device))?;
            let agreement = strata.faithfulness_agreement(&config, &readings)?;
            panel.push(json!({"judge": format!("faithfulness-{k}"), "metrics": metrics, "agreement": agreement}));
            progress(ctx, panel.len(), appeal + faithfulness);
        }

        let path = ctx.out.join("panel.json");
        let text = serde_json::to_string_pretty(&json!({
            "appeal": appeal,
            "faithfulness": faithfulness,
            "sample": sample,
            "rater_noise": rater_noise,
            "check": check,
            "strata": Strata::NAMES,
            "judges": panel,
        }))
        .expect("json");
        std::fs::write(&path, text + "\n").map_err(OpError::io("write", &path))?;
        let path = ctx.out.join(needle_ops::SUMMARY);
        std::fs::write(&path, panel_summary(&panel, sample, check))
            .map_err(OpError::io("write", &path))
    }
}

/// What each appeal judge learns: the hidden human preference (`rating_preference`) of each
/// image of `subset`, plus Gaussian rater noise of `noise` (seeded by `seed`). Never the
/// curators' `rating_quality`: judges that learned the signal the needles were selected by would
/// grade the experiment by its own construction.
pub fn appeal_target(subset: &Dataset, noise: f64, seed: u64) -> Result<Vec<f64>, OpError> {
    let preference = subset.ratings("preference").map_err(|_| OpError::Input {
        name: "data".into(),
        why: "has no `rating_preference` column; appeal judges learn the human preference".into(),
    })?;
    Ok(crate::filter::rate(&preference, noise, seed ^ 0x4A55_4447))
}

/// The check images split into thirds by their hidden preference, for agreement reports.
struct Strata {
    preference: Vec<f64>,
    rubric: Vec<f64>,
    /// The third (0 low, 1 middle, 2 high) of each image.
    third: Vec<usize>,
    truth: Vec<[String; 3]>,
}

impl Strata {
    const NAMES: [&'static str; 3] = ["low", "middle", "high"];

    fn of(checked: &Dataset) -> Result<Strata, OpError> {
        let preference = checked.ratings("preference")?;
        let rubric = checked.ratings("quality")?;
        let mut order: Vec<usize> = (0..preference.len()).collect();
        order.sort_by(|&a, &b| preference[a].total_cmp(&preference[b]).then(a.cmp(&b)));
        let mut third = vec![0; preference.len()];
        for (rank, &i) in order.iter().enumerate() {
            third[i] = 3 * rank / preference.len().max(1);
        }
        let truth = checked
            .records()
            .iter()
            .map(|r| {
                let get = |c: &str| {
                    r.extra
                        .get(c)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                [
                    get("rating_true_shape"),
                    get("rating_true_color"),
                    get("rating_true_size"),
                ]
            })
            .collect();
        Ok(Strata {
            preference,
            rubric,
            third,
            truth,
        })
    }

    fn members(&self, t: usize) -> Vec<usize> {
        (0..self.third.len())
            .filter(|&i| self.third[i] == t)
            .collect()
    }

    /// Spearman correlation of `scores` with the preference, overall and per third, and with
    /// the rubric overall.
    fn appeal_agreement(&self, scores: &[f32]) -> serde_json::Value {
        let scores: Vec<f64> = scores.iter().map(|&s| f64::from(s)).collect();
        let within: Vec<f64> = (0..3)
            .map(|t| {
                let m = self.members(t);
                let pick = |v: &[f64]| m.iter().map(|&i| v[i]).collect::<Vec<f64>>();
                round3(scorer::spearman(&pick(&scores), &pick(&self.preference)))
            })
            .collect();
        json!({
            "spearman_preference": round3(scorer::spearman(&scores, &self.preference)),
            "spearman_preference_by_third": within,
            "spearman_rubric": round3(scorer::spearman(&scores, &self.rubric)),
        })
    }

    /// Concept accuracy overall and per third.
    fn faithfulness_agreement(
        &self,
        config: &ClassifierConfig,
        readings: &[Reading],
    ) -> Result<serde_json::Value, OpError> {
        let right: Vec<bool> = readings
            .iter()
            .zip(&self.truth)
            .map(|(r, t)| {
                config.shapes[r.shape] == t[0]
                    && config.colours[r.colour] == t[1]
                    && config.sizes[r.size] == t[2]
            })
            .collect();
        let share = |m: &[usize]| {
            round3(m.iter().filter(|&&i| right[i]).count() as f64 / m.len().max(1) as f64)
        };
        let all: Vec<usize> = (0..right.len()).collect();
        Ok(json!({
            "concept_accuracy": share(&all),
            "concept_accuracy_by_third": (0..3).map(|t| share(&self.members(t))).collect::<Vec<_>>(),
        }))
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn panel_summary(panel: &[serde_json::Value], sample: usize, check: usize) -> String {
    let mut md = format!(
        "Judges of {sample} rated images each, checked on {check} images no judge saw; thirds by \
         hidden preference.\n\n\
         | judge | trained to | agreement with the hidden truth | low third | middle third | high third |\n\
         |---|---|---|---:|---:|---:|\n"
    );
    for j in panel {
        let a = &j["agreement"];
        let name = j["judge"].as_str().unwrap_or("?");
        let (what, overall, thirds) = if name.starts_with("appeal") {
            (
                "preference + rater noise",
                format!(
                    "Spearman {} (with the curators' rubric: {})",
                    a["spearman_preference"], a["spearman_rubric"]
                ),
                &a["spearman_preference_by_third"],
            )
        } else {
            (
                "true concept",
                format!("concept accuracy {}", a["concept_accuracy"]),
                &a["concept_accuracy_by_third"],
            )
        };
        md.push_str(&format!(
            "| {name} | {what} | {overall} | {} | {} | {} |\n",
            thirds[0], thirds[1], thirds[2]
        ));
    }
    md
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
    let sizes = label("rating_true_size")?;
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
        sizes: classes(&sizes),
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
    let size_y = index(&config.sizes, &sizes);
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
        let [s, c, z] = model.forward(&images.index_select(0, &b));
        let loss = s.cross_entropy_for_logits(&shape_y.index_select(0, &b))
            + c.cross_entropy_for_logits(&colour_y.index_select(0, &b))
            + z.cross_entropy_for_logits(&size_y.index_select(0, &b));
        opt.backward_step(&loss);
    }
    let predicted = model.predict(&images.index_select(0, &val_idx))?;
    let truth_s = ids(&shape_y.index_select(0, &val_idx))?;
    let truth_c = ids(&colour_y.index_select(0, &val_idx))?;
    let truth_z = ids(&size_y.index_select(0, &val_idx))?;
    let both = predicted
        .iter()
        .enumerate()
        .filter(|(i, r)| (r.shape, r.colour, r.size) == (truth_s[*i], truth_c[*i], truth_z[*i]))
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

/// A faithfulness judge saved in `d`, its config and weights.
fn load_classifier(
    d: &Path,
    device: Device,
) -> Result<(Classifier, ClassifierConfig, nn::VarStore), OpError> {
    let text = std::fs::read_to_string(d.join("config.json"))
        .map_err(OpError::io("read", d.join("config.json")))?;
    let config: ClassifierConfig = serde_json::from_str(&text)
        .map_err(|e| OpError::Failed(format!("judge config in `{}`: {e}", d.display())))?;
    let mut vs = nn::VarStore::new(device);
    let model = Classifier::new(&vs.root(), &config);
    vs.load(d.join("model.safetensors"))
        .map_err(|e| OpError::Failed(format!("judge weights in `{}`: {e}", d.display())))?;
    Ok((model, config, vs))
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
            faithfulness.push(load_classifier(&d, device)?);
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
                    .map(|(r, prompt)| shows(c, r, prompt))
                    .collect())
            })
            .collect()
    }
}

/// Whether a reading shows `prompt`: its shape and colour are named, and its size too where
/// the prompt names a size (`"a red circle"` says nothing of it).
pub fn shows(c: &ClassifierConfig, r: &Reading, prompt: &str) -> bool {
    let words: Vec<String> = prompt.split_whitespace().map(str::to_lowercase).collect();
    let names_a_size = c.sizes.iter().any(|z| words.contains(z));
    words.contains(&c.shapes[r.shape])
        && words.contains(&c.colours[r.colour])
        && (!names_a_size || words.contains(&c.sizes[r.size]))
}
