//! Schemas of the ops whose bodies live in `needle-models` (they need tch): here, so that the
//! catalog, and with it `needle`, links no libtorch. Each body's `Op::schema` returns these.

use needle_core::ops::{
    InputSpec, InputsSchema, OpKind, OpSchema, ParamSpec, ParamType, ParamsSchema,
};
use serde_json::{Value, json};

/// A param with a default.
fn p(name: &'static str, ty: ParamType, default: Value, doc: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        ty,
        default: Some(default),
        doc,
    }
}

/// A param the recipe must give.
fn required(name: &'static str, ty: ParamType, doc: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        ty,
        default: None,
        doc,
    }
}

/// `scorer`: see `needle_models::scorer`.
pub fn scorer() -> OpSchema {
    OpSchema {
        name: "scorer",
        version: 1,
        summary: "train an aesthetic scorer (on a rated sample) or a caption-image agreement classifier",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(vec![
            required(
                "kind",
                ParamType::Choice(&["aesthetic", "agreement"]),
                "which scorer",
            ),
            p(
                "sample",
                ParamType::Int,
                json!(2000),
                "images drawn from the pool (20% held out for validation)",
            ),
            p(
                "skip",
                ParamType::Int,
                json!(0),
                "images skipped first, so that scorers and judges use disjoint samples",
            ),
            p("steps", ParamType::Int, json!(800), "optimizer steps"),
            p("batch", ParamType::Int, json!(64), "batch size"),
            p("lr", ParamType::Float, json!(0.002), "Adam learning rate"),
            p(
                "width",
                ParamType::Int,
                json!(16),
                "channels of the first convolution",
            ),
            p(
                "seed",
                ParamType::Int,
                json!(0),
                "seed of the sample, the split and the initialisation",
            ),
        ]),
        inputs: InputsSchema::Fixed(vec![InputSpec {
            name: "data",
            required: true,
            doc: "a dataset (for `aesthetic`, with the `rating_quality` column of its rated sample)",
        }]),
    }
}

/// `filter`: see `needle_models::filter`.
pub fn filter() -> OpSchema {
    OpSchema {
        name: "filter",
        version: 2,
        summary: "the Emu curation funnel: automatic filters, then simulated generalist and specialist raters",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(vec![
            p(
                "unsafe",
                ParamType::Bool,
                json!(true),
                "drop images carrying the unsafe marker",
            ),
            p(
                "aesthetic_top",
                ParamType::Float,
                json!(0.3),
                "keep this top fraction by aesthetic score (needs input `aesthetic`; 1 keeps all)",
            ),
            p(
                "overlay",
                ParamType::Bool,
                json!(true),
                "drop images with a text overlay band",
            ),
            p(
                "agreement_min",
                ParamType::Float,
                json!(0.5),
                "keep captions the agreement scorer rates above this (needs input `agreement`)",
            ),
            p(
                "cut",
                ParamType::Bool,
                json!(true),
                "drop images whose subject the frame cuts",
            ),
            p(
                "per_concept",
                ParamType::Int,
                json!(0),
                "keep at most this many images per captioned concept, best aesthetic first (0: no cap)",
            ),
            p(
                "generalists",
                ParamType::Int,
                json!(2000),
                "how many images the generalist raters keep (0: skip the stage)",
            ),
            p(
                "generalist_noise",
                ParamType::Float,
                json!(0.12),
                "standard deviation of a generalist's rating error",
            ),
            p(
                "specialists",
                ParamType::Int,
                json!(200),
                "how many images the specialists keep: the tuning set (0: skip the stage)",
            ),
            p(
                "specialist_noise",
                ParamType::Float,
                json!(0.03),
                "standard deviation of a specialist's rating error",
            ),
            p(
                "recaption",
                ParamType::Bool,
                json!(true),
                "specialists write a true caption for every image they keep, as the paper's did",
            ),
            p(
                "pick",
                ParamType::Choice(&["best", "worst"]),
                json!("best"),
                "which end of their ratings the human stages keep (`worst`: the control that tunes on the worst set)",
            ),
            p(
                "random",
                ParamType::Int,
                json!(0),
                "then keep a random sample of this many (0: keep all): a random control set, or a random subset of a curated set",
            ),
            p(
                "seed",
                ParamType::Int,
                json!(0),
                "seed of the raters' errors and of the random sample",
            ),
        ]),
        inputs: InputsSchema::Fixed(vec![
            InputSpec {
                name: "data",
                required: true,
                doc: "the pool: a dataset",
            },
            InputSpec {
                name: "aesthetic",
                required: false,
                doc: "a `scorer` of kind aesthetic",
            },
            InputSpec {
                name: "agreement",
                required: false,
                doc: "a `scorer` of kind agreement",
            },
        ]),
    }
}

/// `judges`: see `needle_models::judges`.
pub fn judges() -> OpSchema {
    OpSchema {
        name: "judges",
        version: 2,
        summary: "train the evaluation panel: appeal judges (aesthetic scorers) and faithfulness judges (concept classifiers), each on its own slice of a rated sample",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(vec![
            p("appeal", ParamType::Int, json!(5), "appeal judges"),
            p(
                "faithfulness",
                ParamType::Int,
                json!(3),
                "faithfulness judges",
            ),
            p(
                "sample",
                ParamType::Int,
                json!(1500),
                "rated images per judge (disjoint)",
            ),
            p(
                "rater_noise",
                ParamType::Float,
                json!(0.05),
                "standard deviation of the rating error in each appeal judge's training labels",
            ),
            p(
                "check",
                ParamType::Int,
                json!(1000),
                "further rated images, no judge's own, on which each judge's agreement with the hidden truth is reported",
            ),
            p(
                "steps",
                ParamType::Int,
                json!(600),
                "optimizer steps per judge",
            ),
            p("batch", ParamType::Int, json!(64), "batch size"),
            p("lr", ParamType::Float, json!(0.002), "Adam learning rate"),
            p(
                "width",
                ParamType::Int,
                json!(16),
                "channels of the first convolution",
            ),
            p(
                "seed",
                ParamType::Int,
                json!(0),
                "seed of the slices and the initialisations",
            ),
        ]),
        inputs: InputsSchema::Fixed(vec![InputSpec {
            name: "data",
            required: true,
            doc: "the judges' rated sample: a dataset with hidden ratings no filter or scorer saw",
        }]),
    }
}

/// `evaluate`: see `needle_models::evaluate`.
pub fn evaluate() -> OpSchema {
    OpSchema {
        name: "evaluate",
        version: 2,
        summary: "candidate vs baseline, pair by pair: panel votes on visual appeal and text faithfulness, with intervals and a sign test; memorisation and diversity",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(vec![
            p(
                "margin",
                ParamType::Float,
                json!(0.02),
                "an appeal judge calls a tie when the two scores are this close",
            ),
            p(
                "bootstrap",
                ParamType::Int,
                json!(2000),
                "bootstrap resamples (over prompts)",
            ),
            p(
                "memorised_below",
                ParamType::Float,
                json!(0.05),
                "a sample whose nearest tuning image is within this RMSE counts as memorised",
            ),
            p("seed", ParamType::Int, json!(0), "seed of the bootstrap"),
            p(
                "unseen",
                ParamType::List(Box::new(ParamType::String)),
                json!([]),
                "prompts no training caption holds: both axes are also reported on these and on the rest separately",
            ),
        ]),
        inputs: InputsSchema::Fixed(vec![
            InputSpec {
                name: "candidate",
                required: true,
                doc: "samples of the model under test (A)",
            },
            InputSpec {
                name: "baseline",
                required: true,
                doc: "samples of the model it is compared with (B), from the same prompts and seeds",
            },
            InputSpec {
                name: "judges",
                required: true,
                doc: "the panel: a `judges` output",
            },
            InputSpec {
                name: "tuning",
                required: false,
                doc: "the candidate's tuning set, for memorisation",
            },
        ]),
    }
}

/// Params `pretrain` and `quality-tune` share, with the defaults of each.
fn training_params(
    steps: i64,
    lr: f64,
    schedule: &'static str,
    warmup: i64,
    ema: f64,
    offset_noise: f64,
    save_every: i64,
) -> Vec<ParamSpec> {
    vec![
        p("steps", ParamType::Int, json!(steps), "optimizer steps"),
        p("batch", ParamType::Int, json!(64), "images per step"),
        p("lr", ParamType::Float, json!(lr), "AdamW learning rate"),
        p(
            "schedule",
            ParamType::Choice(&["constant", "cosine", "wsd"]),
            json!(schedule),
            "learning-rate schedule after warm-up: constant; cosine decays to a tenth at the last step; wsd (warm-up, stable, decay) is constant, then decays linearly towards zero over the final 20% of the steps. constant and wsd can be continued to more steps (`continue_from`), cosine cannot",
        ),
        p(
            "warmup",
            ParamType::Int,
            json!(warmup),
            "steps of linear learning-rate warm-up",
        ),
        p(
            "weight_decay",
            ParamType::Float,
            json!(0.0),
            "AdamW's decoupled weight decay",
        ),
        p(
            "ema",
            ParamType::Float,
            json!(ema),
            "decay of the EMA weights, which are what the output holds",
        ),
        p(
            "caption_dropout",
            ParamType::Float,
            json!(0.1),
            "share of examples trained without caption (classifier-free guidance)",
        ),
        p(
            "offset_noise",
            ParamType::Float,
            json!(offset_noise),
            "offset noise: an extra Gaussian per image and channel, times this",
        ),
        p(
            "flip",
            ParamType::Bool,
            json!(true),
            "mirror training images left-right at random",
        ),
        p(
            "save_every",
            ParamType::Int,
            json!(save_every),
            "steps between resumable checkpoints (an interrupted step resumes from the last)",
        ),
        p(
            "seed",
            ParamType::Int,
            json!(0),
            "seed of the initialisation and of every step's draws",
        ),
        precision(),
    ]
}

/// The arithmetic of a generative op's network (`needle_models::precision`).
fn precision() -> ParamSpec {
    p(
        "precision",
        ParamType::Choice(&["fp32", "bf16"]),
        json!("fp32"),
        "fp32, or bf16: the forward and backward passes under bfloat16 autocast, weights, optimizer and EMA kept in float32 (mostly for GPUs; the same bytes run after run on one kind of CPU, on a GPU in neither precision)",
    )
}

/// The optional input of a training op that continues a shorter run instead of starting over.
fn continue_from() -> InputSpec {
    InputSpec {
        name: needle_core::ops::CONTINUE_INPUT,
        required: false,
        doc: "an output of this op with the same params, inputs and schedule (constant or wsd) to no more `steps`: training continues from its state to the same bytes as a direct run",
    }
}

/// `pretrain`: see `needle_models::pretrain`.
pub fn pretrain() -> OpSchema {
    let mut params = vec![
        p(
            "arch",
            ParamType::Choice(&["pixel-diffusion", "masked-transformer"]),
            json!("pixel-diffusion"),
            "the model: a convolutional U-Net denoiser in pixel space, or a MaskGIT-style transformer over k-means patch tokens",
        ),
        p(
            "channels",
            ParamType::Int,
            json!(32),
            "pixel-diffusion: U-Net channels at full resolution (a multiple of 4)",
        ),
        p(
            "mult",
            ParamType::List(Box::new(ParamType::Int)),
            json!([1, 2, 2]),
            "pixel-diffusion: channel multiplier per U-Net level; each level after the first halves the resolution",
        ),
        p(
            "blocks",
            ParamType::Int,
            json!(1),
            "pixel-diffusion: residual blocks per level (one more on the way up)",
        ),
        p(
            "patch",
            ParamType::Int,
            json!(4),
            "masked-transformer: side of a token's patch, in pixels",
        ),
        p(
            "codebook",
            ParamType::Int,
            json!(128),
            "masked-transformer: entries of the k-means patch codebook",
        ),
        p(
            "width",
            ParamType::Int,
            json!(128),
            "masked-transformer: transformer width (a multiple of 4)",
        ),
        p(
            "layers",
            ParamType::Int,
            json!(4),
            "masked-transformer: transformer blocks",
        ),
        p(
            "text_width",
            ParamType::Int,
            json!(64),
            "width of the caption transformer",
        ),
        p(
            "max_tokens",
            ParamType::Int,
            json!(8),
            "caption tokens read (longer captions are cut)",
        ),
    ];
    params.extend(training_params(
        3000, 0.001, "cosine", 100, 0.999, 0.02, 250,
    ));
    params.push(p(
        "offset_share",
        ParamType::Float,
        json!(0.2),
        "offset noise applies to this final share of the steps (Emu: the final stage)",
    ));
    OpSchema {
        name: "pretrain",
        version: 1,
        summary: "pretrain a text-to-image model (pixel diffusion or masked transformer) from scratch on a dataset",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(params),
        inputs: InputsSchema::Fixed(vec![
            InputSpec {
                name: "data",
                required: true,
                doc: "the training set: a dataset of square images and captions",
            },
            continue_from(),
        ]),
    }
}

/// `quality-tune`: see `needle_models::pretrain`.
pub fn quality_tune() -> OpSchema {
    let mut params = training_params(400, 0.0001, "constant", 0, 0.99, 0.1, 100);
    params.push(p(
        "checkpoint_every",
        ParamType::Int,
        json!(100),
        "keep the EMA weights every this many steps in `checkpoints/` (0: only the final)",
    ));
    OpSchema {
        name: "quality-tune",
        version: 1,
        summary: "fine-tune a pretrained model on a small, very high quality dataset (the needles)",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(params),
        inputs: InputsSchema::Fixed(vec![
            InputSpec {
                name: "model",
                required: true,
                doc: "the model to tune: a `pretrain` (or `quality-tune`) output",
            },
            InputSpec {
                name: "data",
                required: true,
                doc: "the tuning set: a dataset, of the model's image size",
            },
            continue_from(),
        ]),
    }
}

/// `sample`: see `needle_models::sample`.
pub fn sample() -> OpSchema {
    OpSchema {
        name: "sample",
        version: 1,
        summary: "sample a model on prompts × seeds with deterministic DDIM; the same (prompt, seed) starts from the same noise in every model",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(vec![
            p(
                "prompts",
                ParamType::List(Box::new(ParamType::String)),
                json!([]),
                "the prompt set (or give a dataset as input `prompts`)",
            ),
            p("seeds", ParamType::Int, json!(15), "images per prompt"),
            p(
                "steps",
                ParamType::Int,
                json!(25),
                "sampler steps (DDIM; decoding rounds for a masked transformer)",
            ),
            p(
                "guidance",
                ParamType::Float,
                json!(3.0),
                "classifier-free guidance scale (1: none)",
            ),
            p(
                "checkpoint",
                ParamType::Int,
                json!(0),
                "sample the EMA weights kept at this step (0: the final weights)",
            ),
            p(
                "noise_seed",
                ParamType::Int,
                json!(0),
                "seed of the initial noise (keep it equal across models you compare)",
            ),
            p(
                "batch",
                ParamType::Int,
                json!(256),
                "images denoised at once",
            ),
            p(
                "grid_scale",
                ParamType::Int,
                json!(4),
                "each image's enlargement in grid.png",
            ),
            precision(),
        ]),
        inputs: InputsSchema::Fixed(vec![
            InputSpec {
                name: "model",
                required: true,
                doc: "a `pretrain` or `quality-tune` output",
            },
            InputSpec {
                name: "prompts",
                required: false,
                doc: "a dataset whose distinct captions are the prompts",
            },
        ]),
    }
}
