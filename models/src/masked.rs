//! `masked-transformer`: a Muse/MaskGIT-style text-to-image model.
//!
//! - Tokenizer: k-means over `patch`×`patch` RGB patches, fitted once on the pretraining data
//!   (`codebook` entries); an image is its grid of nearest-entry ids, decoded by pasting the
//!   entries back. The codebook is a non-trainable variable of the checkpoint.
//! - Predictor: token and position embeddings, the caption vector (see [`crate::text`]) added
//!   at every position, `layers` transformer blocks, logits over the codebook.
//! - Training: MaskGIT's cosine schedule — a share cos(πr/2), r ~ U(0, 1), of the positions is
//!   masked — and cross-entropy on the masked positions; captions dropped for a share of rows.
//! - Sampling: start fully masked; at each step predict every masked token (classifier-free
//!   guidance on the logits), sample it with Gumbel noise, and keep the most confident so that
//!   cos(π/2·(i+1)/steps) of the positions stay masked. The Gumbel noise of image
//!   (prompt, seed) comes from that pair alone, so two models pair up image by image.

use std::f64::consts::PI;
use std::path::Path;

use needle_ops::OpError;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::text::{Block, TextEncoder, Vocabulary};

pub const ARCH: &str = "masked-transformer";

/// Everything needed to rebuild a model: saved as `config.json` beside its weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaskedConfig {
    pub arch: String,
    pub size: i64,
    /// Side of a token's patch, in pixels.
    pub patch: i64,
    /// Entries of the k-means codebook.
    pub codebook: i64,
    /// Transformer width and depth.
    pub width: i64,
    pub layers: i64,
    pub text_width: i64,
    pub vocabulary: Vocabulary,
}

impl MaskedConfig {
    /// Tokens per image.
    pub fn tokens(&self) -> i64 {
        (self.size / self.patch).pow(2)
    }

    /// Why this shape cannot work, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.patch < 1 || self.size % self.patch != 0 {
            return Err(format!(
                "patch = {} must divide the image size {}",
                self.patch, self.size
            ));
        }
        if self.codebook < 2 {
            return Err(format!("codebook = {} must be at least 2", self.codebook));
        }
        if self.width < 4 || self.width % 4 != 0 || self.layers < 1 {
            return Err(format!(
                "width = {} must be a multiple of 4 and layers = {} at least 1",
                self.width, self.layers
            ));
        }
        Ok(())
    }
}

pub fn read_config(dir: &Path) -> Result<MaskedConfig, OpError> {
    crate::generator::read_config(dir)
}

#[derive(Debug)]
pub struct MaskedModel {
    pub config: MaskedConfig,
    /// `[codebook, 3·patch²]`, not trained by the optimizer.
    codebook: Tensor,
    tokens: nn::Embedding,
    positions: Tensor,
    text: TextEncoder,
    null_caption: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    head: nn::Linear,
}

impl MaskedModel {
    pub fn new(p: &nn::Path, config: MaskedConfig) -> MaskedModel {
        let (w, k) = (config.width, config.codebook);
        let dim = 3 * config.patch * config.patch;
        MaskedModel {
            codebook: p.zeros_no_train("codebook", &[k, dim]),
            // Ids 0..k are codebook entries; k is the mask token.
            tokens: nn::embedding(p / "tokens", k + 1, w, Default::default()),
            positions: p.var(
                "positions",
                &[config.tokens(), w],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            text: TextEncoder::new(&(p / "text"), &config.vocabulary, config.text_width, w),
            null_caption: p.var("null_caption", &[w], nn::Init::Const(0.0)),
            blocks: (0..config.layers)
                .map(|i| Block::new(&(p / "blocks" / i), w))
                .collect(),
            norm: nn::layer_norm(p / "norm", vec![w], Default::default()),
            head: nn::linear(p / "head", w, k, Default::default()),
            config,
        }
    }

    /// Set the codebook (after fitting it).
    pub fn set_codebook(&self, entries: &Tensor) {
        tch::no_grad(|| {
            self.codebook
                .shallow_clone()
                .copy_(&entries.to_device(self.codebook.device()))
        });
    }

    /// Images `[n, 3, s, s]` as patches `[n, tokens, 3·patch²]`.
    pub fn patches(&self, images: &Tensor) -> Tensor {
        let (n, s, p) = (images.size()[0], self.config.size, self.config.patch);
        let g = s / p;
        images
            .reshape([n, 3, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([n, g * g, 3 * p * p])
    }

    /// The nearest codebook entry of every patch: ids `[n, tokens]`.
    pub fn encode(&self, images: &Tensor) -> Tensor {
        // The tokens are the targets: the same in every precision.
        tch::no_grad(|| {
            crate::precision::float32(|| nearest(&self.patches(images), &self.codebook))
        })
    }

    /// Ids `[n, tokens]` back to images `[n, 3, s, s]`.
    pub fn decode(&self, ids: &Tensor) -> Tensor {
        let (n, s, p) = (ids.size()[0], self.config.size, self.config.patch);
        let g = s / p;
        self.codebook
            .index_select(0, &ids.flatten(0, -1))
            .reshape([n, g, g, 3, p, p])
            .permute([0, 3, 1, 4, 2, 5])
            .reshape([n, 3, s, s])
    }

    /// Logits `[n, tokens, codebook]` of ids `[n, tokens]` (mask = `codebook`) given caption
    /// vectors `[n, width]`.
    fn logits(&self, ids: &Tensor, captions: &Tensor) -> Tensor {
        let mut x = self.tokens.forward(ids) + &self.positions + captions.unsqueeze(1);
        for block in &self.blocks {
            x = block.forward(&x, None);
        }
        self.head.forward(&self.norm.forward(&x))
    }

    fn captions(&self, tokens: &Tensor, drop: Option<&Tensor>) -> Tensor {
        let cap = self.text.forward(tokens);
        match drop {
            Some(drop) => cap.where_self(
                &drop.logical_not().unsqueeze(-1),
                &self.null_caption.unsqueeze(0),
            ),
            None => cap,
        }
    }
}

/// Index of the nearest row of `entries` (`[k, d]`) for every vector of `x` (`[n, l, d]`).
fn nearest(x: &Tensor, entries: &Tensor) -> Tensor {
    let (n, l, d) = (x.size()[0], x.size()[1], x.size()[2]);
    let flat = x.reshape([n * l, d]);
    // |x − e|² = |x|² − 2 x·e + |e|²; |x|² does not change the argmin.
    let dist = entries
        .square()
        .sum_dim_intlist(1, false, Kind::Float)
        .unsqueeze(0)
        - flat.matmul(&entries.transpose(0, 1)) * 2.0;
    dist.argmin(1, false).reshape([n, l])
}

/// K-means (Lloyd's, `iterations` rounds) of the rows of `x` (`[n, d]`), seeded by torch's
/// generator: the `k` entries `[k, d]`. An entry left without members keeps its place.
pub fn kmeans(x: &Tensor, k: i64, iterations: i64) -> Tensor {
    tch::no_grad(|| {
        let n = x.size()[0];
        let pick = Tensor::randperm(n, (Kind::Int64, x.device())).narrow(0, 0, k.min(n));
        let mut entries = x.index_select(0, &pick);
        for _ in 0..iterations {
            let ids = nearest(&x.unsqueeze(0), &entries).squeeze_dim(0);
            let d = x.size()[1];
            let sums = Tensor::zeros([k, d], (Kind::Float, x.device())).index_add(0, &ids, x);
            let counts = Tensor::zeros([k], (Kind::Float, x.device())).index_add(
                0,
                &ids,
                &Tensor::ones([n], (Kind::Float, x.device())),
            );
            let has = counts.gt(0.0).unsqueeze(1);
            let means = sums / counts.clamp_min(1.0).unsqueeze(1);
            entries = means.where_self(&has, &entries);
        }
        entries
    })
}

/// Uniform numbers in (0, 1) for one image's sampling: a function of (prompt, seed index,
/// noise seed) alone, like the diffusion model's initial noise.
fn pair_uniforms(prompt: &str, seed_index: u64, noise_seed: u64, count: usize) -> Vec<f32> {
    let mut uniform =
        crate::diffusion::pair_stream("needle maskgit draws v1", prompt, seed_index, noise_seed);
    (0..count)
        .map(|_| (uniform() as f32).clamp(1e-7, 1.0 - 1e-7))
        .collect()
}

impl crate::generator::Generator for MaskedModel {
    fn arch(&self) -> &'static str {
        ARCH
    }

    fn size(&self) -> i64 {
        self.config.size
    }

    fn vocabulary(&self) -> &Vocabulary {
        &self.config.vocabulary
    }

    /// Cross-entropy on the masked positions under MaskGIT's cosine schedule.
    fn loss(&self, x0: &Tensor, tokens: &Tensor, drop: &Tensor, _offset: f64) -> Tensor {
        let (n, device) = (x0.size()[0], x0.device());
        let l = self.config.tokens();
        let ids = self.encode(x0);
        let r = Tensor::rand([n], (Kind::Float, device));
        let masked_count = ((r * (PI / 2.0)).cos() * l as f64)
            .ceil()
            .clamp(1.0, l as f64)
            .unsqueeze(1);
        // A random order per row; the first `masked_count` positions of it are masked.
        let rank = Tensor::rand([n, l], (Kind::Float, device))
            .argsort(1, false)
            .argsort(1, false)
            .to_kind(Kind::Float);
        let masked = rank.lt_tensor(&masked_count);
        let input = ids.where_self(&masked.logical_not(), &Tensor::from(self.config.codebook));
        let logits = self.logits(&input, &self.captions(tokens, Some(drop)));
        let ce = logits
            .view([n * l, self.config.codebook])
            .cross_entropy_loss::<Tensor>(&ids.view([n * l]), None, tch::Reduction::None, -100, 0.0)
            .view([n, l]);
        let weight = masked.to_kind(Kind::Float);
        (ce * &weight).sum(Kind::Float) / weight.sum(Kind::Float)
    }

    fn generate(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        noise_seed: u64,
        steps: i64,
        guidance: f64,
        device: Device,
        on_step: &mut dyn FnMut(i64),
    ) -> Tensor {
        tch::no_grad(|| {
            let n = prompts.len() as i64;
            let (l, k) = (self.config.tokens(), self.config.codebook);
            let tokens = self.config.vocabulary.tokenize(prompts).to_device(device);
            let cond = self.captions(&tokens, None);
            let uncond = self.null_caption.unsqueeze(0).expand([n, -1], false);
            let both = Tensor::cat(&[&cond, &uncond], 0);
            // Per image and step: a Gumbel draw per (position, entry) and one per position.
            let per_step = (l * k + l) as usize;
            let uniforms: Vec<f32> = prompts
                .iter()
                .zip(seeds)
                .flat_map(|(p, &s)| pair_uniforms(p, s, noise_seed, per_step * steps as usize))
                .collect();
            let u = Tensor::from_slice(&uniforms)
                .view([n, steps, l * k + l])
                .to_device(device);
            let gumbel = |t: &Tensor| -(-(t.log())).log();
            let mut ids = Tensor::full([n, l], k, (Kind::Int64, device));
            for i in 0..steps {
                let still = ids.eq(k);
                // float32 whatever the precision of the network (a no-op in fp32).
                let logits = self
                    .logits(&Tensor::cat(&[&ids, &ids], 0), &both)
                    .to_kind(Kind::Float);
                let (c, un) = (logits.narrow(0, 0, n), logits.narrow(0, n, n));
                let logits = &un + (c - &un) * guidance;
                let step_u = u.select(1, i);
                let g_tokens = gumbel(&step_u.narrow(1, 0, l * k).view([n, l, k]));
                let sampled = (&logits + g_tokens).argmax(-1, false);
                let probs = logits.softmax(-1, Kind::Float);
                let confidence = probs
                    .gather(-1, &sampled.unsqueeze(-1), false)
                    .squeeze_dim(-1)
                    .log();
                // Annealed noise on the confidence, as MaskGIT: bolder early, greedy at the end.
                let anneal = 4.5 * (1.0 - (i + 1) as f64 / steps as f64);
                let confidence = confidence + gumbel(&step_u.narrow(1, l * k, l)) * anneal;
                // Positions already fixed are never re-masked.
                let confidence = confidence.masked_fill(&still.logical_not(), f64::INFINITY);
                let keep_masked =
                    ((PI / 2.0 * (i + 1) as f64 / steps as f64).cos() * l as f64).floor() as i64;
                let rank = confidence.argsort(1, false).argsort(1, false);
                let stay = rank.lt(keep_masked);
                let proposal = sampled.where_self(&still, &ids);
                ids = Tensor::full([n, l], k, (Kind::Int64, device)).where_self(&stay, &proposal);
                on_step(i + 1);
            }
            self.decode(&ids).clamp(-1.0, 1.0)
        })
    }

    fn write_config(&self, dir: &Path) -> Result<(), OpError> {
        let path = dir.join(crate::diffusion::CONFIG);
        let text = serde_json::to_string_pretty(&self.config).expect("config serialises") + "\n";
        std::fs::write(&path, text).map_err(OpError::io("write", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Generator;

    fn tiny() -> (nn::VarStore, MaskedModel) {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = MaskedConfig {
            arch: ARCH.into(),
            size: 8,
            patch: 4,
            codebook: 6,
            width: 16,
            layers: 1,
            text_width: 16,
            vocabulary: Vocabulary::build(["a red circle"].into_iter(), 6),
        };
        let m = MaskedModel::new(&vs.root(), config);
        (vs, m)
    }

    #[test]
    fn patches_round_trip_through_an_exact_codebook() {
        let (_vs, m) = tiny();
        tch::manual_seed(0);
        let images = Tensor::rand([2, 3, 8, 8], tch::kind::FLOAT_CPU);
        let patches = m.patches(&images).reshape([8, 48]);
        // A codebook holding six of the eight patches reproduces those exactly.
        m.set_codebook(&patches.narrow(0, 0, 6));
        let ids = m.encode(&images);
        let back = m.decode(&ids);
        let first = back.get(0);
        assert!(first.allclose(&images.get(0), 1e-6, 1e-6, false));
        let ids: Vec<i64> = Vec::try_from(ids.get(0)).unwrap();
        assert_eq!(ids, [0, 1, 2, 3]);
    }

    #[test]
    fn kmeans_finds_separated_clusters() {
        tch::manual_seed(1);
        let a = Tensor::randn([50, 2], tch::kind::FLOAT_CPU) * 0.1;
        let b = Tensor::randn([50, 2], tch::kind::FLOAT_CPU) * 0.1 + 10.0;
        let entries = kmeans(&Tensor::cat(&[a, b], 0), 2, 10);
        let mut xs: Vec<f32> = Vec::try_from(entries.select(1, 0)).unwrap();
        xs.sort_by(f32::total_cmp);
        assert!(xs[0].abs() < 0.5 && (xs[1] - 10.0).abs() < 0.5, "{xs:?}");
    }

    #[test]
    fn loss_is_finite_and_generation_is_deterministic() {
        let (_vs, m) = tiny();
        tch::manual_seed(2);
        m.set_codebook(&Tensor::rand([6, 48], tch::kind::FLOAT_CPU));
        let x0 = Tensor::rand([3, 3, 8, 8], tch::kind::FLOAT_CPU) * 2.0 - 1.0;
        let tokens = m.config.vocabulary.tokenize(&["a red circle"; 3]);
        let drop = Tensor::from_slice(&[false, true, false]);
        let loss = m.loss(&x0, &tokens, &drop, 0.0).double_value(&[]);
        assert!(loss.is_finite() && loss > 0.0, "{loss}");
        let run = || {
            m.generate(
                &["a red circle", "a red circle"],
                &[0, 1],
                0,
                4,
                2.0,
                Device::Cpu,
                &mut |_| {},
            )
        };
        let (a, b) = (run(), run());
        assert_eq!(a.size(), [2, 3, 8, 8]);
        assert!(a.equal(&b));
    }
}
