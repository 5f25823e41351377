//! The generative ops through the binaries: a tiny pretrain → quality-tune → sample recipe
//! written for a GPU runs on the CPU, its pictures are where `show` says, a second run executes
//! nothing, a training step stopped by Ctrl-C resumes from its checkpoint under its key, and a
//! tuning wired to a shorter one by `continue_from` makes the weights of a direct one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;

const RECIPE: &str = r#"
[recipe]
name = "tiny-models"

[vars]
steps = 40

[steps.data]
op = "haystack"
params = { images = 200, seed = 1 }

[steps.pretrained]
op = "pretrain"
inputs = { data = "data" }
params = { steps = "${steps}", batch = 8, channels = 8, mult = [1, 2], text_width = 16, warmup = 2, save_every = 10 }
resources = { cpus = 1, gpus = 1 }

[steps.tuned]
op = "quality-tune"
inputs = { model = "pretrained", data = "data" }
params = { steps = 10, batch = 8, checkpoint_every = 5 }
resources = { gpus = 1 }

[steps.samples]
op = "sample"
inputs = { model = "tuned" }
params = { prompts = ["a red circle", "a blue star"], seeds = 2, steps = 3 }
"#;

#[test]
fn a_gpu_recipe_trains_and_samples_on_the_cpu_and_shows_its_pictures() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let run = p.json(&["run", "recipe.toml", "--gpus", "none"], 0);
    assert_eq!(run["executed"], 4, "{run}");

    let show = p.needle(&["show", "last:samples"]);
    assert_code(&show, 0);
    let text = stdout(&show);
    let grid = text
        .lines()
        .map(str::trim)
        .find(|l| l.ends_with("/grid.png"))
        .unwrap_or_else(|| panic!("no grid.png in:\n{text}"));
    let bytes = std::fs::read(grid).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");

    let tuned = p.json(&["show", "last:tuned"], 0);
    let view = PathBuf::from(tuned["view"].as_str().unwrap());
    for f in [
        "model.safetensors",
        "config.json",
        "checkpoints/step-000005.safetensors",
    ] {
        assert!(view.join(f).exists(), "{f}");
    }

    // The checkpoint loads in PyTorch, strictly, into the module `bench/train_bench.py`
    // writes out: the same parameter names and shapes.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    let out = std::process::Command::new(&python)
        .arg(root.join("bench/train_bench.py"))
        .arg("--load")
        .arg(&view)
        .output()
        .expect("the venv's python runs (make sets it up)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"loaded\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let again = p.json(&["run", "recipe.toml", "--gpus", "none"], 0);
    assert_eq!(again["executed"], 0, "{again}");

    // Training again makes the same bytes (CPU training is deterministic, and how fast it went
    // is in the log, not in the artifact): what reads the model stays cached.
    let forced = p.json(
        &[
            "run",
            "recipe.toml",
            "--gpus",
            "none",
            "--force",
            "pretrained",
        ],
        0,
    );
    assert_eq!(forced["executed"], 1, "{forced}");
    assert_eq!(forced["cached"], 3, "{forced}");
    let logs = p.needle(&["logs", "last:pretrained"]);
    assert_code(&logs, 0);
    assert!(stdout(&logs).contains("images/s"), "{}", stdout(&logs));
}

#[test]
fn an_interrupted_pretrain_resumes_from_its_checkpoint_under_the_same_key() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    let child = p
        .background(&["run", "recipe.toml", "--set", "steps=400", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint of `pretrained`, then press Ctrl-C.
    let t0 = Instant::now();
    let state = loop {
        let found = std::fs::read_dir(p.store().join("resume"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("state/state.json"))
            .find(|s| s.exists());
        if let Some(s) = found {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: sending SIGINT to the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_code(&out, 130);
    let key = state
        .parent()
        .and_then(|s| s.parent())
        .and_then(|k| k.file_name())
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let run = p.json(&["run", "recipe.toml", "--set", "steps=400"], 0);
    let pretrained = &steps_named(&run, "pretrained")[0];
    assert_eq!(pretrained["key"], key.as_str());
    // Where it resumed from is the execution's, said in its log.
    let logs = p.needle(&["logs", "last:pretrained"]);
    assert_code(&logs, 0);
    let log = stdout(&logs);
    let resumed: i64 = log
        .split("(resumed from step ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume in the log:\n{log}"));
    assert!(resumed >= 10 && resumed % 10 == 0 && resumed < 400, "{log}");
    // Once the step succeeded, its resume directory is gone.
    assert!(!p.store().join("resume").join(&key).exists());
}

#[test]
fn a_tuning_continued_from_a_shorter_one_makes_the_direct_runs_weights() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "continued"

[steps.data]
op = "haystack"
params = { images = 64, seed = 1 }

[steps.pretrained]
op = "pretrain"
inputs = { data = "data" }
params = { steps = 3, batch = 8, channels = 8, mult = [1, 2], text_width = 16 }

[steps.short]
op = "quality-tune"
inputs = { model = "pretrained", data = "data" }
params = { steps = 4, batch = 8, schedule = "wsd", checkpoint_every = 2 }

[steps.direct]
op = "quality-tune"
inputs = { model = "pretrained", data = "data" }
params = { steps = 8, batch = 8, schedule = "wsd", checkpoint_every = 2 }

[steps.continued]
op = "quality-tune"
inputs = { model = "pretrained", data = "data", continue_from = "short" }
params = { steps = 8, batch = 8, schedule = "wsd", checkpoint_every = 2 }
"#,
    );
    let run = p.json(&["run", "recipe.toml", "--gpus", "none"], 0);
    assert_eq!(run["executed"], 5, "{run}");
    let (direct, continued) = (
        output_view(&p, &run, "direct"),
        output_view(&p, &run, "continued"),
    );
    for f in [
        "model.safetensors",
        "checkpoints/step-000002.safetensors",
        "checkpoints/step-000008.safetensors",
        "state/state.safetensors",
        "state/state.json",
    ] {
        let read = |dir: &PathBuf| std::fs::read(dir.join(f)).unwrap();
        assert!(read(&direct) == read(&continued), "{f} differs");
    }
    // `show` says where it continued from: wsd's decay starts at step 3 of 4.
    let show = p.needle(&["show", "last:continued"]);
    assert_code(&show, 0);
    let text = stdout(&show);
    assert!(
        text.contains("training state at step 3 of a 4-step run"),
        "{text}"
    );
}
