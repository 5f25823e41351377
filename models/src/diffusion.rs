//! `pixel-diffusion`: a text-conditioned diffusion model in pixel space.
//!
//! - Noise schedule: cosine (Nichol & Dhariwal 2021) in continuous time `t ∈ [0, 1]`, with
//!   ᾱ(1) = 0, so the last step starts from pure noise.
//! - The network predicts v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022), which stays well defined
//!   at both ends of the schedule.
//! - Conditioning: the noise level (sinusoidal features, then an MLP) plus the caption (see
//!   [`crate::text`]), summed; a learned "no caption" vector replaces the caption for a share of
//!   training examples, which gives classifier-free guidance at sampling time.
//! - Sampling: deterministic DDIM (η = 0). The initial noise of an image depends only on
//!   (prompt, seed index, noise seed), never on the model or the batch, so two models' samples
//!   pair up image by image.
//!
//! A model is saved as `model.safetensors` (tensor names are the `VarStore` paths) with
//! `config.json` beside it; both load from Python (`safetensors.torch.load_file`).

use std::f64::consts::PI;
use std::path::Path;

use needle_ops::OpError;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::text::{TextEncoder, Vocabulary};
use crate::unet::{UNet, UNetShape};

pub const ARCH: &str = "pixel-diffusion";
pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";

/// Everything needed to rebuild a model: saved as `config.json` beside its weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub arch: String,
    /// Images are `size`×`size` RGB.
    pub size: i64,
    pub unet: UNetShape,
    pub text_width: i64,
    pub vocabulary: Vocabulary,
    /// Always `v`: what the network predicts (see the module docs).
    pub prediction: String,
    /// Always `cosine`.
    pub schedule: String,
}

/// The schedule's ᾱ(t), cosine with offset s = 0.008; `t` is clamped to [0, 1].
pub fn alpha_bar(t: &Tensor) -> Tensor {
    const S: f64 = 0.008;
    let f = |t: &Tensor| ((t + S) / (1.0 + S) * (PI / 2.0)).cos().square();
    let start = (S / (1.0 + S) * (PI / 2.0)).cos().powi(2);
    (f(&t.clamp(0.0, 1.0)) / start).clamp(0.0, 1.0)
}

/// The network and its conditioning.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    unet: UNet,
    text: TextEncoder,
    /// The conditioning of "no caption" (classifier-free guidance).
    null_caption: Tensor,
    time: nn::Sequential,
}

impl Model {
    pub fn new(p: &nn::Path, config: ModelConfig) -> Model {
        let cond = config.unet.cond_width();
        let c = config.unet.channels;
        Model {
            unet: UNet::new(&(p / "unet"), &config.unet),
            text: TextEncoder::new(&(p / "text"), &config.vocabulary, config.text_width, cond),
            null_caption: p.var("null_caption", &[cond], nn::Init::Const(0.0)),
            time: nn::seq()
                .add(nn::linear(p / "time1", c, cond, Default::default()))
                .add_fn(|x| x.silu())
                .add(nn::linear(p / "time2", cond, cond, Default::default())),
            config,
        }
    }

    /// Sinusoidal features of the noise level (`t` scaled to [0, 1000], as DDPM's steps).
    fn time_features(&self, t: &Tensor) -> Tensor {
        let half = self.config.unet.channels / 2;
        let freqs = (Tensor::arange(half, (Kind::Float, t.device()))
            * (-(10_000f64.ln()) / half as f64))
            .exp();
        let args = (t * 1000.0).unsqueeze(-1) * freqs.unsqueeze(0);
        Tensor::cat(&[args.sin(), args.cos()], -1)
    }

    /// The caption vectors of `tokens`; rows where `drop` is true get the "no caption" vector.
    pub fn captions(&self, tokens: &Tensor, drop: Option<&Tensor>) -> Tensor {
        let cap = self.text.forward(tokens);
        match drop {
            Some(drop) => cap.where_self(
                &drop.logical_not().unsqueeze(-1),
                &self.null_caption.unsqueeze(0),
            ),
            None => cap,
        }
    }

    /// The "no caption" vector, `n` times.
    pub fn no_captions(&self, n: i64) -> Tensor {
        self.null_caption.unsqueeze(0).expand([n, -1], false)
    }

    /// The v prediction for noisy images `x` at times `t` (`[n]`) given caption vectors.
    pub fn predict(&self, x: &Tensor, t: &Tensor, captions: &Tensor) -> Tensor {
        let cond = self.time.forward(&self.time_features(t)) + captions;
        self.unet.forward(x, &cond)
    }
}

impl crate::generator::Generator for Model {
    fn arch(&self) -> &'static str {
        ARCH
    }

    fn size(&self) -> i64 {
        self.config.size
    }

    fn vocabulary(&self) -> &Vocabulary {
        &self.config.vocabulary
    }

    /// v-prediction MSE at a uniform noise level, with offset noise when `offset` > 0.
    fn loss(&self, x0: &Tensor, tokens: &Tensor, drop: &Tensor, offset: f64) -> Tensor {
        let (n, device) = (x0.size()[0], x0.device());
        let t = Tensor::rand([n], (Kind::Float, device));
        let mut noise = x0.randn_like();
        if offset > 0.0 {
            noise += Tensor::randn([n, 3, 1, 1], (Kind::Float, device)) * offset;
        }
        let ab = alpha_bar(&t).view([n, 1, 1, 1]);
        let (a, b) = (ab.sqrt(), (-&ab + 1.0).sqrt());
        let xt = &a * x0 + &b * &noise;
        let target = &a * &noise - &b * x0;
        let pred = self.predict(&xt, &t, &self.captions(tokens, Some(drop)));
        pred.mse_loss(&target, tch::Reduction::Mean)
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
        let size = self.config.size;
        let noise: Vec<Tensor> = prompts
            .iter()
            .zip(seeds)
            .map(|(p, &s)| initial_noise(p, s, noise_seed, size))
            .collect();
        let noise = Tensor::stack(&noise, 0).to_device(device);
        let tokens = self.config.vocabulary.tokenize(prompts).to_device(device);
        ddim(self, &tokens, &noise, steps, guidance, on_step)
    }

    fn write_config(&self, dir: &Path) -> Result<(), OpError> {
        write_config(dir, &self.config)
    }
}

/// The config of the model saved in `dir`, checked to be one this build knows.
pub fn read_config(dir: &Path) -> Result<ModelConfig, OpError> {
    let config: ModelConfig = crate::generator::read_config(dir)?;
    if config.arch != ARCH || config.prediction != "v" || config.schedule != "cosine" {
        return Err(OpError::Input {
            name: "model".into(),
            why: format!(
                "`{}` describes a model this build cannot run (arch {}, prediction {}, schedule {})",
                dir.join(CONFIG).display(),
                config.arch,
                config.prediction,
                config.schedule
            ),
        });
    }
    Ok(config)
}

/// Write `config.json` into `dir`.
pub fn write_config(dir: &Path, config: &ModelConfig) -> Result<(), OpError> {
    let path = dir.join(CONFIG);
    let text = serde_json::to_string_pretty(config).expect("config serialises") + "\n";
    std::fs::write(&path, text).map_err(OpError::io("write", &path))
}

/// Uniform numbers in (0, 1] that depend on (`purpose`, prompt, seed index, noise seed) alone:
/// BLAKE3 of those seeds a SplitMix64 stream, in Rust, independent of torch's generator, its
/// version and whatever else the process drew.
pub fn pair_stream(
    purpose: &str,
    prompt: &str,
    seed_index: u64,
    noise_seed: u64,
) -> impl FnMut() -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(purpose.as_bytes());
    h.update(b"\0");
    h.update(prompt.as_bytes());
    h.update(b"\0");
    h.update(&seed_index.to_le_bytes());
    h.update(&noise_seed.to_le_bytes());
    let bytes: [u8; 8] = h.finalize().as_bytes()[..8].try_into().expect("8 bytes");
    let mut state = u64::from_le_bytes(bytes);
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // (0, 1]: never 0, so a logarithm of it is finite.
        ((z >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// The initial noise `[3, size, size]` of image (`prompt`, `seed_index`) under `noise_seed`:
/// a function of these alone (Box–Muller on [`pair_stream`]), so every model, batch and device
/// starts from it.
pub fn initial_noise(prompt: &str, seed_index: u64, noise_seed: u64, size: i64) -> Tensor {
    let mut uniform = pair_stream("needle initial noise v1", prompt, seed_index, noise_seed);
    let count = (3 * size * size) as usize;
    let mut values = Vec::with_capacity(count + 1);
    while values.len() < count {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        values.push((r * (2.0 * PI * u2).cos()) as f32);
        values.push((r * (2.0 * PI * u2).sin()) as f32);
    }
    values.truncate(count);
    Tensor::from_slice(&values).view([3, size, size])
}

/// Deterministic DDIM with classifier-free guidance: `noise` (`[n, 3, s, s]`) → images in
/// [-1, 1]. `guidance` 1 samples the conditional model alone; above 1 pushes away from the
/// unconditional prediction. `on_step` is called after each of the `steps`.
pub fn ddim(
    model: &Model,
    tokens: &Tensor,
    noise: &Tensor,
    steps: i64,
    guidance: f64,
    on_step: &mut dyn FnMut(i64),
) -> Tensor {
    tch::no_grad(|| {
        let n = noise.size()[0];
        let device = noise.device();
        let cond = model.captions(tokens, None);
        let uncond = model.no_captions(n);
        let both = Tensor::cat(&[&cond, &uncond], 0);
        let mut x = noise.shallow_clone();
        for i in 0..steps {
            let t = 1.0 - i as f64 / steps as f64;
            let t_next = 1.0 - (i + 1) as f64 / steps as f64;
            let tt = Tensor::full([2 * n], t, (Kind::Float, device));
            // float32 from here on whatever the precision of the network (a no-op in fp32).
            let v = model
                .predict(&Tensor::cat(&[&x, &x], 0), &tt, &both)
                .to_kind(Kind::Float);
            let (v_c, v_u) = (v.narrow(0, 0, n), v.narrow(0, n, n));
            let v = &v_u + (v_c - &v_u) * guidance;
            let ab = alpha_bar(&Tensor::from(t)).double_value(&[]);
            let ab_next = alpha_bar(&Tensor::from(t_next)).double_value(&[]);
            let x0 = (&x * ab.sqrt() - &v * (1.0 - ab).sqrt()).clamp(-1.0, 1.0);
            let eps = (&x - &x0 * ab.sqrt()) / (1.0 - ab).sqrt().max(1e-8);
            x = x0 * ab_next.sqrt() + eps * (1.0 - ab_next).sqrt();
            on_step(i + 1);
        }
        x.clamp(-1.0, 1.0)
    })
}

/// Images in [-1, 1] (`[n, 3, s, s]`) as RGB bytes, image after image, rows top to bottom.
pub fn to_rgb_bytes(images: &Tensor) -> Vec<u8> {
    let bytes = ((images.to_device(Device::Cpu) + 1.0) * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    Vec::<u8>::try_from(bytes.flatten(0, -1)).expect("uint8 tensor to bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_runs_from_clean_to_pure_noise() {
        let ab = alpha_bar(&Tensor::from_slice(&[0.0f32, 0.5, 1.0]));
        let v: Vec<f32> = Vec::try_from(ab).unwrap();
        assert!((v[0] - 1.0).abs() < 1e-6);
        assert!(v[1] > 0.4 && v[1] < 0.6, "{v:?}");
        assert!(v[2].abs() < 1e-6);
    }

    #[test]
    fn initial_noise_depends_on_prompt_seed_and_noise_seed_only() {
        let a = initial_noise("a red circle", 3, 0, 8);
        assert!(a.equal(&initial_noise("a red circle", 3, 0, 8)));
        assert!(!a.equal(&initial_noise("a red circle", 4, 0, 8)));
        assert!(!a.equal(&initial_noise("a blue circle", 3, 0, 8)));
        assert!(!a.equal(&initial_noise("a red circle", 3, 1, 8)));
        // Drawing other tensors in between does not change it (its own generator).
        let _ = Tensor::randn([100], tch::kind::FLOAT_CPU);
        assert!(a.equal(&initial_noise("a red circle", 3, 0, 8)));
        let std = a.std(true).double_value(&[]);
        assert!((0.7..1.3).contains(&std), "{std}");
    }
}
