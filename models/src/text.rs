//! Caption encoding for the generative models: a vocabulary built from the training captions,
//! token ids, and a small transformer that turns a caption into one conditioning vector.

use std::collections::BTreeMap;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Token id of padding after a caption's last word.
pub const PAD: i64 = 0;
/// Token id of a word the vocabulary does not hold.
pub const UNKNOWN: i64 = 1;
/// Token id that starts every caption, so that no caption is empty (an empty one still has a
/// token for attention to rest on).
pub const START: i64 = 2;
/// Id of the vocabulary's first word.
const FIRST_WORD: i64 = 3;

/// The words of a model's captions, sorted: word `i` has token id `i + 3`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Vocabulary {
    pub words: Vec<String>,
    /// Tokens per caption, the start token included; longer captions are cut.
    pub max_tokens: i64,
}

impl Vocabulary {
    /// Every distinct word of `captions`, lowercased.
    pub fn build<'a>(captions: impl Iterator<Item = &'a str>, max_tokens: i64) -> Vocabulary {
        let mut words: Vec<String> = captions.flat_map(words_of).collect();
        words.sort();
        words.dedup();
        Vocabulary { words, max_tokens }
    }

    /// Ids to feed the embedding: padding, unknown, start, then the words.
    pub fn size(&self) -> i64 {
        self.words.len() as i64 + FIRST_WORD
    }

    /// Token ids `[n, max_tokens]` of `captions`.
    pub fn tokenize<S: AsRef<str>>(&self, captions: &[S]) -> Tensor {
        let ids: BTreeMap<&str, i64> = self
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.as_str(), i as i64 + FIRST_WORD))
            .collect();
        let len = self.max_tokens.max(1) as usize;
        let mut flat = Vec::with_capacity(captions.len() * len);
        for caption in captions {
            let mut row = vec![START];
            row.extend(
                words_of(caption.as_ref()).map(|w| *ids.get(w.as_str()).unwrap_or(&UNKNOWN)),
            );
            row.resize(len, PAD);
            flat.extend(row);
        }
        Tensor::from_slice(&flat).view([captions.len() as i64, len as i64])
    }

    /// Words of `captions` the vocabulary does not hold, sorted, each once.
    pub fn unknown<S: AsRef<str>>(&self, captions: &[S]) -> Vec<String> {
        let mut out: Vec<String> = captions
            .iter()
            .flat_map(|c| words_of(c.as_ref()))
            .filter(|w| self.words.binary_search(w).is_err())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn words_of(caption: &str) -> impl Iterator<Item = String> + '_ {
    caption
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// A pre-norm transformer layer: multi-head self-attention (optionally ignoring padded
/// positions), then an MLP, each added to its input. Parameter names (`norm1`, `qkv`,
/// `attn_out`, `norm2`, `mlp1`, `mlp2`) are checkpoint keys.
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    attn_out: nn::Linear,
    norm2: nn::LayerNorm,
    mlp1: nn::Linear,
    mlp2: nn::Linear,
    width: i64,
    heads: i64,
}

impl Block {
    pub fn new(p: &nn::Path, width: i64) -> Block {
        Block {
            norm1: nn::layer_norm(p / "norm1", vec![width], Default::default()),
            qkv: nn::linear(p / "qkv", width, 3 * width, Default::default()),
            attn_out: nn::linear(p / "attn_out", width, width, Default::default()),
            norm2: nn::layer_norm(p / "norm2", vec![width], Default::default()),
            mlp1: nn::linear(p / "mlp1", width, 4 * width, Default::default()),
            mlp2: nn::linear(p / "mlp2", 4 * width, width, Default::default()),
            width,
            heads: if width % 4 == 0 { 4 } else { 1 },
        }
    }

    /// `x`: `[n, len, width]`; `keep`: `[n, len]`, false where a position is padding.
    pub fn forward(&self, x: &Tensor, keep: Option<&Tensor>) -> Tensor {
        let (n, len) = (x.size()[0], x.size()[1]);
        let head = self.width / self.heads;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x))
            .view([n, len, 3, self.heads, head])
            .permute([2, 0, 3, 1, 4]); // [3, n, heads, len, head]
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let mut scores = q.matmul(&k.transpose(-2, -1)) / (head as f64).sqrt();
        if let Some(keep) = keep {
            scores =
                scores.masked_fill(&keep.logical_not().view([n, 1, 1, len]), f64::NEG_INFINITY);
        }
        let attended = scores
            .softmax(-1, Kind::Float)
            .matmul(&v)
            .transpose(1, 2)
            .reshape([n, len, self.width]);
        // Not `+=`: that adds in place, into a tensor autograd still needs.
        let x = x + self.attn_out.forward(&attended);
        let mlp = self
            .mlp2
            .forward(&self.mlp1.forward(&self.norm2.forward(&x)).gelu("none"));
        &x + mlp
    }
}

/// Token embeddings plus learned positions, one transformer [`Block`] that ignores padding,
/// the mean over the caption's tokens, and a projection to the width of the denoiser's
/// conditioning.
#[derive(Debug)]
pub struct TextEncoder {
    tokens: nn::Embedding,
    positions: Tensor,
    block: Block,
    project: nn::Linear,
}

impl TextEncoder {
    pub fn new(p: &nn::Path, vocab: &Vocabulary, width: i64, out: i64) -> TextEncoder {
        TextEncoder {
            tokens: nn::embedding(p / "tokens", vocab.size(), width, Default::default()),
            positions: p.var(
                "positions",
                &[vocab.max_tokens.max(1), width],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            // The block's parameters sit directly under the encoder's path (`text.qkv`…).
            block: Block::new(p, width),
            project: nn::linear(p / "project", width, out, Default::default()),
        }
    }

    /// One vector `[n, out]` per caption of `tokens` (`[n, max_tokens]`).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let len = tokens.size()[1];
        let keep = tokens.ne(PAD); // [n, len]
        let x = self.tokens.forward(tokens) + self.positions.narrow(0, 0, len);
        let x = self.block.forward(&x, Some(&keep));
        let weights = keep.to_kind(Kind::Float).unsqueeze(-1);
        let pooled = (x * &weights).sum_dim_intlist(1, false, Kind::Float)
            / weights.sum_dim_intlist(1, false, Kind::Float);
        self.project.forward(&pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_start_and_pad_and_unknown_words_share_an_id() {
        let v = Vocabulary::build(["a red circle", "A blue square"].into_iter(), 5);
        assert_eq!(v.words, ["a", "blue", "circle", "red", "square"]);
        let t = v.tokenize(&["a red circle", "a green, square and more words"]);
        let rows: Vec<i64> = Vec::try_from(t.flatten(0, -1)).unwrap();
        assert_eq!(rows, [START, 3, 6, 5, PAD, START, 3, UNKNOWN, 7, UNKNOWN]);
        assert_eq!(
            v.unknown(&["a green square", "the green"]),
            ["green", "the"]
        );
    }

    #[test]
    fn encoder_gives_one_vector_per_caption_and_ignores_padding() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let v = Vocabulary::build(["a red circle"].into_iter(), 6);
        let v8 = Vocabulary {
            max_tokens: 8,
            ..v.clone()
        };
        let enc = TextEncoder::new(&vs.root(), &v8, 16, 24);
        let out = enc.forward(&v.tokenize(&["a red circle", "red", ""]));
        assert_eq!(out.size(), [3, 24]);
        assert!(bool::try_from(out.isfinite().all()).unwrap());
        // A longer padding changes nothing.
        let a = enc.forward(&v.tokenize(&["a red circle"]));
        let b = enc.forward(&v8.tokenize(&["a red circle"]));
        assert!(a.allclose(&b, 1e-5, 1e-5, false));
    }
}
