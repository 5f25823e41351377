//! The generative ops at tiny sizes, on the CPU: pretraining lowers the loss, quality-tuning
//! keeps checkpoints, sampling is deterministic and pairs images across models, an interrupted
//! training run resumes to the very weights an uninterrupted one reaches, and a run continued
//! from a shorter one (`continue_from`) makes the bytes of a run trained to its length directly.

use std::path::{Path, PathBuf};

use needle_models::diffusion::{Model, ModelConfig};
use needle_models::precision::Precision;
use needle_models::pretrain::{PretrainOp, QualityTuneOp};
use needle_models::sample::SampleOp;
use needle_models::text::Vocabulary;
use needle_models::train::{self, Identity, LrSchedule, Settings, Start, Trainee};
use needle_models::unet::UNetShape;
use needle_ops::dataset::Dataset;
use needle_ops::haystack::Haystack;
use needle_ops::{Input, Op, OpContext, OpError};
use serde_json::{Value, json};
use tch::nn;

/// Training and sampling seed torch's one global generator, as a worker process (one op per
/// process) may; tests running in parallel threads would draw from each other's stream, so
/// each test holds this lock.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn context(op: &dyn Op, params: Value, inputs: &[(&str, &Path)], out: &Path) -> OpContext {
    std::fs::create_dir_all(out).unwrap();
    let mut ctx = OpContext::standalone(&op.schema(), params, out);
    for (name, dir) in inputs {
        ctx.inputs
            .insert(name.to_string(), Input::One(dir.to_path_buf()));
    }
    ctx
}

fn run(op: &dyn Op, params: Value, inputs: &[(&str, &Path)], out: &Path) {
    let ctx = context(op, params, inputs, out);
    op.run(&ctx)
        .unwrap_or_else(|e| panic!("{} failed: {e}", op.schema().name));
}

fn json_file(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const TINY: &str = r#"{"channels": 8, "mult": [1, 2], "text_width": 16, "batch": 16, "warmup": 5}"#;

/// `base` with the keys of `extra` laid over it.
fn merged(base: &Value, extra: Value) -> Value {
    let mut p = base.clone();
    p.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    p
}

fn tiny(extra: Value) -> Value {
    merged(&serde_json::from_str(TINY).unwrap(), extra)
}

#[test]
fn pretrain_lowers_the_loss_and_sampling_pairs_models_image_by_image() {
    let _torch = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    run(
        &Haystack,
        json!({"images": 400, "seed": 1}),
        &[],
        &dir("data"),
    );

    run(
        &PretrainOp,
        tiny(json!({"steps": 120, "lr": 0.003})),
        &[("data", &dir("data"))],
        &dir("pretrained"),
    );
    let m = json_file(dir("pretrained").join("metrics.json"));
    let (first, last) = (
        m["first_loss"].as_f64().unwrap(),
        m["last_loss"].as_f64().unwrap(),
    );
    assert!(last < 0.8 * first, "the loss should fall: {m}");
    // Figures of one execution (speed, time) are not part of the artifact.
    for timing in ["images_per_second", "train_seconds", "resumed_from"] {
        assert!(m.get(timing).is_none(), "{timing} in {m}");
    }
    for f in ["model.safetensors", "config.json", "summary.md"] {
        assert!(dir("pretrained").join(f).exists(), "{f}");
    }
    assert!(!dir("pretrained").join(".train").exists());
    let config: ModelConfig =
        serde_json::from_value(json_file(dir("pretrained").join("config.json"))).unwrap();
    assert_eq!(config.size, 16);
    assert!(config.vocabulary.words.contains(&"circle".to_string()));

    run(
        &QualityTuneOp,
        tiny(json!({"steps": 20, "checkpoint_every": 10, "lr": 0.001})),
        &[("model", &dir("pretrained")), ("data", &dir("data"))],
        &dir("tuned"),
    );
    for step in ["step-000010", "step-000020"] {
        assert!(
            dir("tuned")
                .join(format!("checkpoints/{step}.safetensors"))
                .exists()
        );
    }

    let prompts = json!({"prompts": ["a red circle", "a blue square"], "seeds": 3, "steps": 5});
    run(
        &SampleOp,
        prompts.clone(),
        &[("model", &dir("pretrained"))],
        &dir("a"),
    );
    run(
        &SampleOp,
        prompts.clone(),
        &[("model", &dir("pretrained"))],
        &dir("a2"),
    );
    run(
        &SampleOp,
        prompts.clone(),
        &[("model", &dir("tuned"))],
        &dir("b"),
    );
    let a = Dataset::open(dir("a")).unwrap();
    assert_eq!(a.len(), 6);
    let first = &a.records()[0];
    assert_eq!(first.text, "a red circle");
    assert_eq!(first.extra["seed_index"], json!(0));
    assert_eq!(first.extra["prompt_index"], json!(0));
    let px = a.load_pixels(1).unwrap();
    assert_eq!((px.n, px.height, px.width), (6, 16, 16));
    let grid = image::open(dir("a").join("grid.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (3 * 65 + 1, 2 * 65 + 1));

    // bf16 too.
    let bf16 = merged(&prompts, json!({"precision": "bf16"}));
    for out in ["h", "h2"] {
        run(
            &SampleOp,
            bf16.clone(),
            &[("model", &dir("pretrained"))],
            &dir(out),
        );
    }
    // Deterministic: the same model and params give the same bytes.
    for rec in a.records() {
        let read = |d: &str| std::fs::read(dir(d).join(&rec.file_name)).unwrap();
        assert_eq!(read("a"), read("a2"), "{}", rec.file_name);
        assert_eq!(read("h"), read("h2"), "bf16 {}", rec.file_name);
    }
    // Another model, the same (prompt, seed) pairs: same names, other images.
    let b = Dataset::open(dir("b")).unwrap();
    let names = |d: &Dataset| {
        d.records()
            .iter()
            .map(|r| r.file_name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), names(&b));
    assert_ne!(px, b.load_pixels(1).unwrap());

    // A kept checkpoint samples; one never kept is refused, saying so.
    run(
        &SampleOp,
        json!({"prompts": ["a red circle"], "seeds": 1, "steps": 2, "checkpoint": 10}),
        &[("model", &dir("tuned"))],
        &dir("c"),
    );
    let ctx = context(
        &SampleOp,
        json!({"prompts": ["a red circle"], "seeds": 1, "steps": 2, "checkpoint": 15}),
        &[("model", &dir("tuned"))],
        &dir("d"),
    );
    let err = SampleOp.run(&ctx).unwrap_err().to_string();
    assert!(err.contains("no checkpoint at step 15"), "{err}");
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let _torch = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    run(
        &Haystack,
        json!({"images": 20, "seed": 1, "size": 12}),
        &[],
        &dir("data"),
    );
    // 12 is not divisible by 8: four levels cannot halve it three times.
    let ctx = context(
        &PretrainOp,
        json!({"mult": [1, 2, 2, 2], "steps": 1}),
        &[("data", &dir("data"))],
        &dir("out"),
    );
    let err = PretrainOp.run(&ctx).unwrap_err();
    assert!(matches!(err, OpError::Param { .. }), "{err}");
    assert!(err.to_string().contains("not divisible by 8"), "{err}");

    // `sample` needs prompts, from exactly one place.
    let ctx = context(&SampleOp, json!({}), &[("model", &dir("data"))], &dir("s"));
    assert!(
        SampleOp
            .run(&ctx)
            .unwrap_err()
            .to_string()
            .contains("no prompts")
    );
    let ctx = context(
        &SampleOp,
        json!({"prompts": ["a red circle"]}),
        &[("model", &dir("data"))],
        &dir("s"),
    );
    let err = SampleOp.run(&ctx).unwrap_err().to_string();
    assert!(err.contains("no model config"), "{err}");
}

/// A tiny model and its data for calling `train::train` directly.
fn tiny_model(vs: &nn::VarStore, data: &Dataset) -> Model {
    let captions: Vec<&str> = data.records().iter().map(|r| r.text.as_str()).collect();
    let config = ModelConfig {
        arch: "pixel-diffusion".into(),
        size: 16,
        unet: UNetShape {
            channels: 8,
            mult: vec![1, 2],
            blocks: 1,
        },
        text_width: 16,
        vocabulary: Vocabulary::build(captions.into_iter(), 6),
        prediction: "v".into(),
        schedule: "cosine".into(),
    };
    Model::new(&vs.root(), config)
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let _torch = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    run(
        &Haystack,
        json!({"images": 64, "seed": 3}),
        &[],
        &dir("data"),
    );
    let data = Dataset::open(dir("data")).unwrap();
    let pixels = data.load_pixels(1).unwrap();
    let captions: Vec<&str> = data.records().iter().map(|r| r.text.as_str()).collect();
    let settings = Settings {
        // 100 steps: a point of the loss curve every 2, so the checkpoint at 21 falls inside a
        // window, which the resumed run must close with the uninterrupted run's mean.
        steps: 100,
        batch: 8,
        lr: 0.002,
        schedule: LrSchedule::Cosine,
        warmup: 3,
        weight_decay: 0.01,
        ema: 0.9,
        caption_dropout: 0.2,
        offset_noise: 0.1,
        offset_share: 0.5,
        flip: true,
        save_every: 7,
        keep_every: 0,
        seed: 5,
        interrupt_after: None,
        precision: Precision::Fp32,
    };
    // Train from the same initial weights: once straight through, once cut after step 25 (its
    // last checkpoint at 21) and run again; in either precision, the same bytes.
    let train_in = |work: &Path, s: &Settings| {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let model = tiny_model(&vs, &data);
        let mut ema = nn::VarStore::new(tch::Device::Cpu);
        let _ = tiny_model(&ema, &data);
        ema.copy(&vs).unwrap();
        let examples = train::examples(
            &pixels,
            model.config.vocabulary.tokenize(&captions),
            tch::Device::Cpu,
        );
        let ctx = context(&PretrainOp, json!({}), &[], &dir("out"));
        let trainee = Trainee {
            model: &model,
            vs: &vs,
            ema_vs: &ema,
        };
        let start = Start {
            identity: &Identity {
                op: "pretrain".into(),
                params: Default::default(),
                inputs: Default::default(),
            },
            continue_from: None,
        };
        let result = train::train(&ctx, &trainee, &examples, s, &start, work);
        (result, vs, ema)
    };
    let mut finals = Vec::new();
    for precision in [Precision::Fp32, Precision::Bf16] {
        let settings = Settings {
            precision,
            ..settings.clone()
        };
        let name = |what: &str| dir(&format!("{what}-{}", precision.name()));
        let (whole, vs_whole, ema_whole) = train_in(&name("whole"), &settings);
        let whole = whole.unwrap();
        assert_eq!(whole.resumed_from, 0);

        let cut = Settings {
            interrupt_after: Some(25),
            ..settings.clone()
        };
        let (err, ..) = train_in(&name("cut"), &cut);
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("interrupted after step 25")
        );
        let (resumed, vs_resumed, ema_resumed) = train_in(&name("cut"), &settings);
        let resumed = resumed.unwrap();
        assert_eq!(resumed.resumed_from, 21, "{precision:?}");
        assert_eq!(resumed.loss_curve.len(), 50);
        assert_eq!(resumed.loss_curve, whole.loss_curve, "{precision:?}");
        for (a, b) in [(&vs_whole, &vs_resumed), (&ema_whole, &ema_resumed)] {
            let (a, b) = (a.variables(), b.variables());
            for (name, t) in &a {
                assert!(
                    t.equal(&b[name]),
                    "{name} differs after resuming ({precision:?})"
                );
            }
        }
        finals.push(ema_whole.variables());
    }
    // bf16 is another computation: it must not have run as fp32.
    let differ = finals[0]
        .iter()
        .filter(|(name, t)| !t.equal(&finals[1][*name]))
        .count();
    assert!(differ > 0, "bf16 trained exactly as fp32");
}

#[test]
fn the_masked_transformer_trains_tunes_and_samples_through_the_same_ops() {
    let _torch = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    run(
        &Haystack,
        json!({"images": 400, "seed": 1}),
        &[],
        &dir("data"),
    );
    let arch = json!({"arch": "masked-transformer", "width": 32, "layers": 1, "codebook": 32,
                      "text_width": 16, "batch": 16, "warmup": 5});
    let with = |extra: Value| {
        let mut p = arch.clone();
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        p
    };
    run(
        &PretrainOp,
        with(json!({"steps": 150, "lr": 0.003})),
        &[("data", &dir("data"))],
        &dir("pretrained"),
    );
    let m = json_file(dir("pretrained").join("metrics.json"));
    assert_eq!(m["arch"], "masked-transformer");
    let (first, last) = (
        m["first_loss"].as_f64().unwrap(),
        m["last_loss"].as_f64().unwrap(),
    );
    assert!(last < 0.9 * first, "the loss should fall: {m}");
    let config = json_file(dir("pretrained").join("config.json"));
    assert_eq!(config["codebook"], 32);

    run(
        &QualityTuneOp,
        json!({"steps": 10, "batch": 8, "checkpoint_every": 5}),
        &[("model", &dir("pretrained")), ("data", &dir("data"))],
        &dir("tuned"),
    );
    let prompts = json!({"prompts": ["a red circle", "a blue square"], "seeds": 2, "steps": 6});
    run(
        &SampleOp,
        prompts.clone(),
        &[("model", &dir("tuned"))],
        &dir("a"),
    );
    run(&SampleOp, prompts, &[("model", &dir("tuned"))], &dir("b"));
    let (a, b) = (
        Dataset::open(dir("a")).unwrap(),
        Dataset::open(dir("b")).unwrap(),
    );
    assert_eq!(a.len(), 4);
    assert_eq!(a.load_pixels(1).unwrap(), b.load_pixels(1).unwrap());
    let summary = std::fs::read_to_string(dir("a").join("summary.md")).unwrap();
    assert!(summary.contains("masked-transformer"), "{summary}");
}

/// Every file under `dir` (relative path → BLAKE3 of its bytes), but those named in `except`.
fn files(dir: &Path, except: &[&str]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let name = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if path.is_dir() {
                stack.push(path);
            } else if !except.contains(&name.as_str()) {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(name, blake3::hash(&bytes).to_hex().to_string());
            }
        }
    }
    out
}

/// A tiny pretrained model and a dataset of 64 images, in `tmp`.
fn base(tmp: &Path) -> (PathBuf, PathBuf) {
    let (data, model) = (tmp.join("data"), tmp.join("base"));
    run(&Haystack, json!({"images": 64, "seed": 3}), &[], &data);
    run(
        &PretrainOp,
        tiny(json!({"steps": 3})),
        &[("data", &data)],
        &model,
    );
    (data, model)
}

#[test]
fn a_continued_run_makes_the_bytes_of_a_direct_one() {
    let _torch = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let (data, model) = base(tmp.path());
    let tune = tiny(json!({"batch": 8, "checkpoint_every": 4, "lr": 0.002}));
    // (op, params, the step a 4-step run's state is at): quality-tune with a constant rate,
    // with warm-up, in bf16, and with wsd (decay over the final 20 %: from step 3 of 4, 6 of
    // 8); pretraining with offset noise on its final half (from step 2 of 4, 4 of 8). The
    // continued runs copy the checkpoint of step 4 from the shorter run, or train it.
    let cases: [(&dyn Op, Value, i64); 5] = [
        (&QualityTuneOp, merged(&tune, json!({"warmup": 0})), 4),
        (&QualityTuneOp, merged(&tune, json!({"warmup": 3})), 4),
        (
            &QualityTuneOp,
            merged(&tune, json!({"precision": "bf16"})),
            4,
        ),
        (&QualityTuneOp, merged(&tune, json!({"schedule": "wsd"})), 3),
        (
            &PretrainOp,
            tiny(json!({"schedule": "constant", "batch": 8, "offset_share": 0.5})),
            2,
        ),
    ];
    for (i, (op, params, at)) in cases.into_iter().enumerate() {
        let name = |what: &str| dir(&format!("{what}-{i}"));
        let inputs: Vec<(&str, &Path)> = match op.schema().name {
            "quality-tune" => vec![("model", &model), ("data", &data)],
            _ => vec![("data", &data)],
        };
        let with_steps = |steps: i64| merged(&params, json!({ "steps": steps }));
        run(op, with_steps(4), &inputs, &name("short"));
        run(op, with_steps(8), &inputs, &name("direct"));
        let short = name("short");
        let mut continuing = inputs.clone();
        continuing.push(("continue_from", &short));
        run(op, with_steps(8), &continuing, &name("continued"));

        // Weights, kept checkpoints, the state a longer run would continue from, config: the
        // same bytes. metrics.json and summary.md say it was continued, with the same curve.
        let record = ["metrics.json", "summary.md"];
        let direct = files(&name("direct"), &record);
        assert!(direct.contains_key("state/state.safetensors"), "{i}");
        assert_eq!(direct, files(&name("continued"), &record), "case {i}");
        let (d, c) = (
            json_file(name("direct").join("metrics.json")),
            json_file(name("continued").join("metrics.json")),
        );
        assert_eq!(d["loss_curve"], c["loss_curve"], "case {i}");
        assert!(d.get("continued_from").is_none());
        assert_eq!(
            c["continued_from"],
            json!({"step": at, "of_steps": 4}),
            "case {i}"
        );
        let summary = std::fs::read_to_string(name("continued").join("summary.md")).unwrap();
        assert!(
            summary.contains(&format!("step {at} of a 4-step run")),
            "{summary}"
        );
    }
}

#[test]
fn continuing_refuses_what_a_direct_run_would_not_pass_through() {
    let _torch = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let (data, model) = base(tmp.path());
    let tune = tiny(json!({"batch": 8, "checkpoint_every": 2, "steps": 4}));
    let inputs = [("model", model.as_path()), ("data", data.as_path())];
    run(&QualityTuneOp, tune.clone(), &inputs, &dir("short"));
    let refusal = |params: Value, data: &Path| {
        let short = dir("short");
        let inputs = [
            ("model", model.as_path()),
            ("data", data),
            ("continue_from", short.as_path()),
        ];
        let ctx = context(&QualityTuneOp, params, &inputs, &dir("refused"));
        QualityTuneOp.run(&ctx).unwrap_err()
    };

    let err = refusal(
        merged(&tune, json!({"schedule": "cosine", "steps": 8})),
        &data,
    );
    assert!(
        matches!(&err, OpError::Param { name, .. } if name == "schedule"),
        "{err}"
    );
    assert!(err.to_string().contains("`cosine`"), "{err}");

    let err = refusal(merged(&tune, json!({"lr": 0.0002, "steps": 8})), &data);
    assert!(
        matches!(&err, OpError::Input { name, .. } if name == "continue_from"),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("`lr` = `0.0001`, this step has `0.0002`"),
        "{text}"
    );

    let err = refusal(merged(&tune, json!({"steps": 3})), &data).to_string();
    assert!(
        err.contains("trained for 4 steps, more than this step's 3"),
        "{err}"
    );

    run(
        &Haystack,
        json!({"images": 64, "seed": 4}),
        &[],
        &dir("other"),
    );
    let err = refusal(merged(&tune, json!({"steps": 8})), &dir("other")).to_string();
    assert!(err.contains("another input `data`"), "{err}");

    // A cosine run keeps no state to continue from.
    let cosine = merged(&tune, json!({"schedule": "cosine"}));
    run(&QualityTuneOp, cosine.clone(), &inputs, &dir("cosine"));
    assert!(!dir("cosine").join("state").exists());

    // As many steps again: a copy.
    let mut again = inputs.to_vec();
    let short = dir("short");
    again.push(("continue_from", &short));
    run(&QualityTuneOp, tune.clone(), &again, &dir("again"));
    let record = ["metrics.json", "summary.md"];
    assert_eq!(files(&dir("short"), &record), files(&dir("again"), &record));
}

#[test]
fn a_continued_run_cut_short_resumes_to_the_direct_runs_bytes() {
    let _torch = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let (data, model) = base(tmp.path());
    let tune = tiny(json!({"batch": 8, "checkpoint_every": 4, "schedule": "wsd"}));
    let inputs = [("model", model.as_path()), ("data", data.as_path())];
    run(
        &QualityTuneOp,
        merged(&tune, json!({"steps": 4})),
        &inputs,
        &dir("short"),
    );
    run(
        &QualityTuneOp,
        merged(&tune, json!({"steps": 8})),
        &inputs,
        &dir("direct"),
    );

    // `save_every` may differ: a resumable checkpoint every 3 steps, the last at step 6 (where
    // wsd's decay starts in 8 steps).
    let short = dir("short");
    let mut continuing = inputs.to_vec();
    continuing.push(("continue_from", &short));
    let attempt = |out: &str| {
        let params = merged(&tune, json!({"steps": 8, "save_every": 3}));
        let mut ctx = context(&QualityTuneOp, params, &continuing, &dir(out));
        ctx.resume = Some(dir("resume"));
        QualityTuneOp.run(&ctx).unwrap();
    };
    attempt("first");
    // What an attempt cut after step 7 leaves in the resume directory: its checkpoint of step
    // 6, and the EMA snapshot of step 4 (the finished attempt moved it into its output).
    let kept = "checkpoints/step-000004.safetensors";
    std::fs::copy(dir("first").join(kept), dir("resume").join(kept)).unwrap();
    // The next attempt resumes there: it does not read `continue_from`'s state again.
    std::fs::remove_dir_all(short.join("state")).unwrap();
    attempt("second");

    let record = ["metrics.json", "summary.md"];
    assert_eq!(
        files(&dir("direct"), &record),
        files(&dir("second"), &record)
    );
    let m = json_file(dir("second").join("metrics.json"));
    assert_eq!(m["continued_from"], json!({"step": 3, "of_steps": 4}));
}
