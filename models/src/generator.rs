//! What `pretrain`, `quality-tune` and `sample` ask of a model, whatever its architecture:
//! a training loss and a deterministic generator. `arch` in a model's `config.json` says which
//! one loads it.

use std::path::Path;

use needle_ops::OpError;
use tch::{Device, Tensor, nn};

use crate::text::Vocabulary;

pub trait Generator {
    /// The `arch` its config names.
    fn arch(&self) -> &'static str;
    /// Images are `size`×`size` RGB.
    fn size(&self) -> i64;
    fn vocabulary(&self) -> &Vocabulary;
    /// The training loss of a batch: images `x0` in [-1, 1], caption token ids, `drop` true
    /// for rows trained without their caption; `offset` the offset noise (diffusion only).
    /// Draws from torch's generator, which the training loop seeds per step.
    fn loss(&self, x0: &Tensor, tokens: &Tensor, drop: &Tensor, offset: f64) -> Tensor;
    /// Images `[n, 3, size, size]` in [-1, 1] for (prompt, seed index) pairs. Deterministic:
    /// the randomness of pair (prompt, seed) depends on the pair and `noise_seed` only, so two
    /// models of an architecture sampled alike pair up image by image. `on_step` is told each
    /// finished step.
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        noise_seed: u64,
        steps: i64,
        guidance: f64,
        device: Device,
        on_step: &mut dyn FnMut(i64),
    ) -> Tensor;
    /// Write `config.json` into `dir`.
    fn write_config(&self, dir: &Path) -> Result<(), OpError>;
}

/// The `config.json` of the model saved in `dir`, as `T`.
pub fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, OpError> {
    let path = dir.join(crate::diffusion::CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| OpError::Input {
        name: "model".into(),
        why: format!(
            "`{}` has no model config ({e}); is it a `pretrain` or `quality-tune` output?",
            path.display()
        ),
    })?;
    serde_json::from_str(&text).map_err(|e| OpError::Input {
        name: "model".into(),
        why: format!(
            "`{}` is not a model config this build reads: {e}",
            path.display()
        ),
    })
}

/// The `arch` of the model saved in `dir`.
pub fn read_arch(dir: &Path) -> Result<String, OpError> {
    #[derive(serde::Deserialize)]
    struct Arch {
        arch: String,
    }
    Ok(read_config::<Arch>(dir)?.arch)
}

/// Load the model saved in `dir` (its weights file `weights`), whatever its architecture.
pub fn load(
    dir: &Path,
    weights: &Path,
    device: Device,
) -> Result<(Box<dyn Generator>, nn::VarStore), OpError> {
    let arch = read_arch(dir)?;
    let mut vs = nn::VarStore::new(device);
    let model: Box<dyn Generator> = match arch.as_str() {
        crate::diffusion::ARCH => Box::new(crate::diffusion::Model::new(
            &vs.root(),
            crate::diffusion::read_config(dir)?,
        )),
        crate::masked::ARCH => Box::new(crate::masked::MaskedModel::new(
            &vs.root(),
            crate::masked::read_config(dir)?,
        )),
        other => {
            return Err(OpError::Input {
                name: "model".into(),
                why: format!(
                    "`{}` describes a `{other}` model; this build knows `{}` and `{}`",
                    dir.display(),
                    crate::diffusion::ARCH,
                    crate::masked::ARCH
                ),
            });
        }
    };
    vs.load(weights).map_err(|e| {
        OpError::Failed(format!(
            "loading the model's weights `{}`: {e}",
            weights.display()
        ))
    })?;
    Ok((model, vs))
}
