//! Schemas of the ops whose bodies live in `needle-models` (they need tch): here, so that the
//! catalog, and with it `needle`, links no libtorch. Each body's `Op::schema` returns these.

use needle_core::ops::{
    InputSpec, InputsSchema, OpKind, OpSchema, ParamSpec, ParamType, ParamsSchema,
};
use serde_json::{Value, json};

/// `scorer`: see `needle_models::scorer`.
pub fn scorer() -> OpSchema {
    let p = |name, ty, default: Option<serde_json::Value>, doc| ParamSpec {
        name,
        ty,
        default,
        doc,
    };
    OpSchema {
        name: "scorer",
        version: 1,
        summary: "train an aesthetic scorer (on a rated sample) or a caption-image agreement classifier",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(vec![
            p(
                "kind",
                ParamType::Choice(&["aesthetic", "agreement"]),
                None,
                "which scorer",
            ),
            p(
                "sample",
                ParamType::Int,
                Some(json!(2000)),
                "images drawn from the pool (20% held out for validation)",
            ),
            p(
                "skip",
                ParamType::Int,
                Some(json!(0)),
                "images skipped first, so that scorers and judges use disjoint samples",
            ),
            p("steps", ParamType::Int, Some(json!(800)), "optimizer steps"),
            p("batch", ParamType::Int, Some(json!(64)), "batch size"),
            p(
                "lr",
                ParamType::Float,
                Some(json!(0.002)),
                "Adam learning rate",
            ),
            p(
                "width",
                ParamType::Int,
                Some(json!(16)),
                "channels of the first convolution",
            ),
            p(
                "seed",
                ParamType::Int,
                Some(json!(0)),
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
    let p = |name, ty, default: Value, doc| ParamSpec {
        name,
        ty,
        default: Some(default),
        doc,
    };
    OpSchema {
        name: "filter",
        version: 1,
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
                "seed",
                ParamType::Int,
                json!(0),
                "seed of the raters' errors",
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
    let p = |name, ty, default: Value, doc| ParamSpec {
        name,
        ty,
        default: Some(default),
        doc,
    };
    OpSchema {
        name: "judges",
        version: 1,
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
    let p = |name, ty, default: Value, doc| ParamSpec {
        name,
        ty,
        default: Some(default),
        doc,
    };
    OpSchema {
        name: "evaluate",
        version: 1,
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
