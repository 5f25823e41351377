//! needle's ops built on tch: the funnel's scorers and filter, the generative models
//! (`pretrain`, `quality-tune`, `sample`) and the evaluation panel. Everything here runs inside `needle-worker`, the one binary that links
//! libtorch; the orchestrator knows these ops only by their schemas (`needle_ops::schemas`).

// Only where libtorch or glibc offer no safe call: `precision` (autocast) and
// `torch::keep_freed_memory` (mallopt), each block with its SAFETY argument.
#![deny(unsafe_code)]

pub mod diffusion;
pub mod evaluate;
pub mod filter;
pub mod generator;
pub mod judges;
pub mod masked;
#[allow(unsafe_code)]
pub mod precision;
pub mod pretrain;
pub mod sample;
pub mod scorer;
pub mod text;
pub mod torch;
pub mod train;
pub mod unet;

use needle_ops::{Op, OpContext};

/// The built-in op called `name`, to run: every built-in, with or without torch.
pub fn builtin(name: &str) -> Option<Box<dyn Op>> {
    let ops: Vec<Box<dyn Op>> = vec![
        Box::new(scorer::ScorerOp),
        Box::new(filter::FilterOp),
        Box::new(judges::JudgesOp),
        Box::new(evaluate::EvaluateOp),
        Box::new(pretrain::PretrainOp),
        Box::new(pretrain::QualityTuneOp),
        Box::new(sample::SampleOp),
    ];
    ops.into_iter()
        .find(|op| op.schema().name == name)
        .or_else(|| needle_ops::builtin(name))
}

/// The device a step runs on: the first GPU the runner gave it when torch can use it, else the
/// CPU. The runner sets `CUDA_VISIBLE_DEVICES` to the step's GPUs, so that GPU is CUDA device 0.
pub fn device(ctx: &OpContext) -> tch::Device {
    if !ctx.gpus.is_empty() && tch::Cuda::is_available() {
        tch::Device::Cuda(0)
    } else {
        tch::Device::Cpu
    }
}

/// On a GPU, let cuDNN time its convolution algorithms for each new shape and keep the fastest
/// (`torch.backends.cudnn.benchmark`): training and sampling run the same few shapes thousands of
/// times. The choice may differ from run to run, so GPU results are not reproducible bit for bit
/// (they were not before either: some of cuDNN's backward kernels add in a varying order).
pub fn benchmark_convolutions(device: tch::Device) {
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
}

#[cfg(test)]
mod tests {
    use needle_core::ops::{OpCatalog, OpKind};

    use super::*;

    #[test]
    fn every_builtin_in_the_catalog_has_a_body() {
        let catalog = needle_ops::Registry::new();
        for schema in catalog.all() {
            if schema.kind == OpKind::Builtin {
                let op = builtin(schema.name).expect("a body for every built-in schema");
                assert_eq!(op.schema().name, schema.name);
                assert_eq!(op.schema().version, schema.version);
            }
        }
    }
}
