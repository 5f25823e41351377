//! The denoiser of `pixel-diffusion`: a convolutional U-Net in pixel space. Residual blocks at
//! each resolution, a strided convolution down and nearest-neighbour upsampling back, skip
//! connections across, and the conditioning (noise level plus caption) added per channel in
//! every block. Convolutions, not an MLP: at this size only they remove per-pixel noise.

use tch::Tensor;
use tch::nn::{self, Module};

/// The U-Net's shape, as the recipe sets it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UNetShape {
    /// Channels at full resolution.
    pub channels: i64,
    /// Channel multiplier per level; each level after the first halves the resolution.
    pub mult: Vec<i64>,
    /// Residual blocks per level on the way down (one more on the way up).
    pub blocks: i64,
}

impl UNetShape {
    /// Width of the conditioning vector the blocks read.
    pub fn cond_width(&self) -> i64 {
        4 * self.channels
    }

    /// Why this shape cannot denoise `size`×`size` images, if it cannot.
    pub fn check(&self, size: i64) -> Result<(), String> {
        if self.channels < 4 || self.channels % 4 != 0 {
            return Err(format!(
                "channels = {} must be a multiple of 4, at least 4 (group normalisation uses groups of channels)",
                self.channels
            ));
        }
        if self.mult.is_empty() || self.mult.iter().any(|&m| m < 1) {
            return Err(format!(
                "mult = {:?} needs at least one level, each multiplier at least 1",
                self.mult
            ));
        }
        if self.blocks < 1 {
            return Err(format!("blocks = {} must be at least 1", self.blocks));
        }
        let halvings = self.mult.len() as u32 - 1;
        if size % (1 << halvings) != 0 {
            return Err(format!(
                "{} levels halve the image {halvings} times, but its size {size} is not divisible by {}",
                self.mult.len(),
                1 << halvings
            ));
        }
        Ok(())
    }
}

fn groups(channels: i64) -> i64 {
    [8, 4, 2, 1]
        .into_iter()
        .find(|g| channels % g == 0)
        .unwrap_or(1)
}

fn conv3(p: nn::Path, i: i64, o: i64, stride: i64) -> nn::Conv2D {
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
}

/// GroupNorm → SiLU → conv → + conditioning → GroupNorm → SiLU → conv, plus the input
/// (through a 1×1 convolution when the width changes).
#[derive(Debug)]
struct ResBlock {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    cond: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    skip: Option<nn::Conv2D>,
}

impl ResBlock {
    fn new(p: nn::Path, i: i64, o: i64, cond: i64) -> ResBlock {
        ResBlock {
            norm1: nn::group_norm(&p / "norm1", groups(i), i, Default::default()),
            conv1: conv3(&p / "conv1", i, o, 1),
            cond: nn::linear(&p / "cond", cond, o, Default::default()),
            norm2: nn::group_norm(&p / "norm2", groups(o), o, Default::default()),
            // Starting the residual branch at zero makes each block the identity at first,
            // which keeps a deep stack trainable from the first step.
            conv2: nn::conv2d(
                &p / "conv2",
                o,
                o,
                3,
                nn::ConvConfig {
                    padding: 1,
                    ws_init: nn::Init::Const(0.0),
                    ..Default::default()
                },
            ),
            skip: (i != o).then(|| nn::conv2d(&p / "skip", i, o, 1, Default::default())),
        }
    }

    fn forward(&self, x: &Tensor, cond: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = h + self.cond.forward(cond).unsqueeze(-1).unsqueeze(-1);
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.skip {
            Some(skip) => skip.forward(x) + h,
            None => x + h,
        }
    }
}

#[derive(Debug)]
struct Level {
    blocks: Vec<ResBlock>,
    /// Down: a strided convolution after the blocks; up: upsampling then a convolution.
    resample: Option<nn::Conv2D>,
}

#[derive(Debug)]
pub struct UNet {
    input: nn::Conv2D,
    down: Vec<Level>,
    middle: [ResBlock; 2],
    up: Vec<Level>,
    out_norm: nn::GroupNorm,
    output: nn::Conv2D,
}

impl UNet {
    /// A U-Net for 3-channel images, conditioned on vectors of `shape.cond_width()`.
    pub fn new(p: &nn::Path, shape: &UNetShape) -> UNet {
        let c = shape.channels;
        let cond = shape.cond_width();
        let widths: Vec<i64> = shape.mult.iter().map(|m| m * c).collect();
        let levels = widths.len();

        let mut down = Vec::new();
        let mut skip_widths = vec![c];
        let mut width = c;
        for (l, &w) in widths.iter().enumerate() {
            let p = p / "down" / l;
            let mut blocks = Vec::new();
            for b in 0..shape.blocks {
                blocks.push(ResBlock::new(&p / "block" / b, width, w, cond));
                width = w;
                skip_widths.push(width);
            }
            let resample = (l + 1 < levels).then(|| conv3(&p / "downsample", width, width, 2));
            if resample.is_some() {
                skip_widths.push(width);
            }
            down.push(Level { blocks, resample });
        }
        let middle = [
            ResBlock::new(p / "middle" / 0, width, width, cond),
            ResBlock::new(p / "middle" / 1, width, width, cond),
        ];
        let mut up = Vec::new();
        for (l, &w) in widths.iter().enumerate().rev() {
            let p = p / "up" / l;
            let mut blocks = Vec::new();
            for b in 0..=shape.blocks {
                let skip = skip_widths.pop().expect("one skip per block on the way up");
                blocks.push(ResBlock::new(&p / "block" / b, width + skip, w, cond));
                width = w;
            }
            let resample = (l > 0).then(|| conv3(&p / "upsample", width, width, 1));
            up.push(Level { blocks, resample });
        }
        UNet {
            input: conv3(p / "input", 3, c, 1),
            down,
            middle,
            up,
            out_norm: nn::group_norm(p / "out_norm", groups(width), width, Default::default()),
            output: nn::conv2d(
                p / "output",
                width,
                3,
                3,
                nn::ConvConfig {
                    padding: 1,
                    ws_init: nn::Init::Const(0.0),
                    ..Default::default()
                },
            ),
        }
    }

    /// The prediction for noisy images `x` (`[n, 3, h, w]`) under conditioning `cond`
    /// (`[n, cond_width]`).
    pub fn forward(&self, x: &Tensor, cond: &Tensor) -> Tensor {
        let cond = cond.silu();
        let mut h = self.input.forward(x);
        let mut skips = vec![h.shallow_clone()];
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(&h, &cond);
                skips.push(h.shallow_clone());
            }
            if let Some(down) = &level.resample {
                h = down.forward(&h);
                skips.push(h.shallow_clone());
            }
        }
        for block in &self.middle {
            h = block.forward(&h, &cond);
        }
        for level in &self.up {
            for block in &level.blocks {
                let skip = skips.pop().expect("a skip per block");
                h = block.forward(&Tensor::cat(&[&h, &skip], 1), &cond);
            }
            if let Some(up) = &level.resample {
                let (hh, ww) = (h.size()[2], h.size()[3]);
                h = up.forward(&h.upsample_nearest2d([2 * hh, 2 * ww], None, None));
            }
        }
        self.output.forward(&self.out_norm.forward(&h).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_has_the_input_shape_at_every_depth() {
        for mult in [vec![1], vec![1, 2], vec![1, 2, 2]] {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let shape = UNetShape {
                channels: 8,
                mult,
                blocks: 2,
            };
            shape.check(16).unwrap();
            let net = UNet::new(&vs.root(), &shape);
            let x = Tensor::randn([2, 3, 16, 16], tch::kind::FLOAT_CPU);
            let c = Tensor::randn([2, shape.cond_width()], tch::kind::FLOAT_CPU);
            assert_eq!(net.forward(&x, &c).size(), [2, 3, 16, 16]);
        }
    }

    #[test]
    fn shapes_that_cannot_work_say_why() {
        let shape = UNetShape {
            channels: 8,
            mult: vec![1, 2, 2, 2, 2],
            blocks: 1,
        };
        let err = shape.check(24).unwrap_err();
        assert!(err.contains("not divisible by 16"), "{err}");
        let odd = UNetShape {
            channels: 6,
            mult: vec![1],
            blocks: 1,
        };
        assert!(odd.check(16).unwrap_err().contains("multiple of 4"));
    }
}
