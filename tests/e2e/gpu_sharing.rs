//! Steps share a GPU by share and by memory, and never over-commit one; whole-GPU steps hold
//! theirs alone; a step sees exactly one device of the run's list, as the list names it.
//!
//! Concurrency is shown by handshakes, not timing: every step runs `gate.sh`, which holds a
//! `running.NAME` marker while it runs (created after it starts, removed before it exits, so
//! the runner still holds its grant), fails if more markers than its limit exist when it
//! starts, and waits until a given number of steps have started. Steps that must run side by
//! side can only pass the wait together; a scheduler that ran them one after another would
//! make the first fail after 60 s.

use std::path::Path;

use serde_json::Value;

use crate::common::*;

const GATE: &str = r#"#!/bin/sh
# gate.sh NAME MAX WAIT
set -eu
d="$NEEDLE_RECIPE_DIR/gate"
mkdir -p "$d"
echo "${CUDA_VISIBLE_DEVICES-unset}" > "$NEEDLE_OUT/gpu"
echo "${NEEDLE_GPU_SHARE-} ${NEEDLE_GPU_MEM_GB-}" > "$NEEDLE_OUT/share"
touch "$d/running.$1" "$d/started.$1"
running=$(ls "$d" | grep -c '^running\.' || true)
ls "$d" | grep '^running\.' > "$NEEDLE_OUT/beside" || true
if [ "$running" -gt "$2" ]; then
  echo "$1: $running steps at once (at most $2): $(ls "$d" | tr '\n' ' ')"
  exit 1
fi
tries=0
while [ "$(ls "$d" | grep -c '^started\.')" -lt "$3" ]; do
  tries=$((tries + 1))
  if [ "$tries" -gt 1200 ]; then
    echo "$1: waited 60 s for $3 steps to start together: $(ls "$d" | tr '\n' ' ')"
    exit 1
  fi
  sleep 0.05
done
rm "$d/running.$1"
"#;

/// A step running `gate.sh NAME MAX WAIT` with `resources`.
fn gated(name: &str, max: u32, wait: u32, resources: &str) -> String {
    format!(
        "[steps.{name}]\nop = \"exec\"\ncmd = [\"sh\", \"-c\", \"sh \\\"$NEEDLE_RECIPE_DIR/gate.sh\\\" {name} {max} {wait}\"]\nresources = {resources}\n\n"
    )
}

fn project(steps: &str) -> Project {
    let p = Project::new();
    p.write("gate.sh", GATE);
    p.write(
        "recipe.toml",
        &format!("[recipe]\nname = \"sharing\"\n\n{steps}"),
    );
    p
}

fn read(view: &Path, file: &str) -> String {
    std::fs::read_to_string(view.join(file))
        .unwrap()
        .trim()
        .to_string()
}

/// What step `name` saw: its devices, its share and memory, the steps running beside it.
fn seen(p: &Project, run: &Value, name: &str) -> (String, String, String) {
    let view = output_view(p, run, name);
    (
        read(&view, "gpu"),
        read(&view, "share"),
        read(&view, "beside"),
    )
}

#[test]
fn four_quarter_shares_run_at_once_on_one_gpu() {
    let steps: String = (1..=4)
        .map(|i| gated(&format!("q{i}"), 4, 4, "{ gpus = 0.25 }"))
        .collect();
    let p = project(&steps);
    let run = p.json(&["run", "recipe.toml", "--gpus", "1", "-j", "8"], 0);
    assert_eq!(run["executed"], 4);
    for i in 1..=4 {
        let (gpu, share, _) = seen(&p, &run, &format!("q{i}"));
        assert_eq!(gpu, "0");
        assert_eq!(share, "0.25");
    }
    let status = stdout(&p.needle(&["status", "last"]));
    assert!(status.contains("  gpu  "), "{status}");
    assert!(status.contains("0 ×0.25"), "{status}");
}

#[test]
fn a_half_and_three_quarters_never_share_a_gpu() {
    let steps = gated("half", 1, 1, "{ gpus = 0.5 }") + &gated("most", 1, 1, "{ gpus = 0.75 }");
    let p = project(&steps);
    let run = p.json(&["run", "recipe.toml", "--gpus", "1", "-j", "8"], 0);
    for name in ["half", "most"] {
        let (gpu, _, beside) = seen(&p, &run, name);
        assert_eq!(gpu, "0");
        assert_eq!(beside, format!("running.{name}"), "{name} had company");
    }
    // On two GPUs they run side by side, one on each.
    let steps = gated("half", 2, 2, "{ gpus = 0.5 }") + &gated("most", 2, 2, "{ gpus = 0.75 }");
    let p = project(&steps);
    let run = p.json(&["run", "recipe.toml", "--gpus", "2", "-j", "8"], 0);
    let (a, _, _) = seen(&p, &run, "half");
    let (b, _, _) = seen(&p, &run, "most");
    assert_ne!(a, b);
    assert!(["0", "1"].contains(&a.as_str()) && ["0", "1"].contains(&b.as_str()));
}

#[test]
fn a_whole_gpu_step_waits_for_a_gpu_with_nothing_on_it() {
    // `small` has the longer remaining path (through `after`), so it starts first; `whole`
    // cannot start beside it and waits until the GPU is empty.
    let steps = gated("small", 1, 1, "{ gpus = 0.25 }")
        + &gated("whole", 1, 2, "{ gpus = 1 }")
        + "[steps.after]\nop = \"exec\"\ninputs = { s = \"small\" }\ncmd = [\"true\"]\n";
    let p = project(&steps);
    let run = p.json(&["run", "recipe.toml", "--gpus", "1", "-j", "8"], 0);
    let (gpu, share, beside) = seen(&p, &run, "whole");
    assert_eq!(gpu, "0");
    assert_eq!(share, "1");
    assert_eq!(beside, "running.whole");
    let (_, _, beside) = seen(&p, &run, "small");
    assert_eq!(beside, "running.small");
}

#[test]
fn gpu_memory_packs_against_the_stated_capacity() {
    let steps: String = (1..=3)
        .map(|i| gated(&format!("m{i}"), 2, 2, "{ gpu_mem_gb = 6 }"))
        .collect();
    let p = project(&steps);
    let run = p.json(
        &[
            "run",
            "recipe.toml",
            "--gpus",
            "1",
            "--gpu-mem",
            "16",
            "-j",
            "8",
        ],
        0,
    );
    assert_eq!(run["executed"], 3);
    for i in 1..=3 {
        let (gpu, share, _) = seen(&p, &run, &format!("m{i}"));
        assert_eq!(gpu, "0");
        // Memory alone: the step holds no share of the compute, and knows its memory.
        assert_eq!(share, "6");
    }
    let plan = stdout(&p.needle(&["plan", "recipe.toml", "--gpus", "1", "--gpu-mem", "16"]));
    assert!(plan.contains("1 GPU(s): 0 (16 GB)"), "{plan}");
    assert!(
        plan.contains("m1   6 GB  2 at once on each GPU, 2 in all"),
        "{plan}"
    );
    let json = p.json(
        &["plan", "recipe.toml", "--gpus", "1", "--gpu-mem", "16"],
        0,
    );
    assert_eq!(json["gpus"]["steps"][0]["per_gpu"], 2);
    assert_eq!(json["gpus"]["devices"][0]["mem_mb"], 16 * 1024);
}

#[test]
fn a_share_sees_its_memory_as_part_of_a_known_gpu() {
    let p = project(&gated("q", 1, 1, "{ gpus = 0.25 }"));
    let run = p.json(&["run", "recipe.toml", "--gpus", "1", "--gpu-mem", "80"], 0);
    let (_, share, _) = seen(&p, &run, "q");
    assert_eq!(share, "0.25 20");
}

#[test]
fn gpu_memory_no_gpu_has_is_refused_at_its_line() {
    let p = project(&gated("big", 1, 1, "{ gpus = 0.5, gpu_mem_gb = 40 }"));
    for cmd in ["run", "plan"] {
        let out = p.needle(&[cmd, "recipe.toml", "--gpus", "2", "--gpu-mem", "24"]);
        assert_code(&out, 2);
        let err = stderr(&out);
        assert!(
            err.contains("recipe.toml:7:40: error: step `big` asks for 40 GB of GPU memory, but the largest GPU of this run has 24 GB"),
            "{err}"
        );
    }
    // Fake ids have no memory until it is stated.
    let out = p.needle(&["run", "recipe.toml", "--gpus", "2"]);
    assert_code(&out, 2);
    assert!(
        stderr(&out).contains("the memory of this run's GPUs (0, 1) is not known"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--gpu-mem GB"), "{}", stderr(&out));
    assert!(!p.store().exists());
    // Without any GPU the step runs on the CPU, whatever it asks of a GPU.
    let run = p.json(&["run", "recipe.toml", "--gpus", "none"], 0);
    assert_eq!(seen(&p, &run, "big").0, "");
}

/// `needle run --json` with `CUDA_VISIBLE_DEVICES` set as given (the harness removes it).
fn run_visible(p: &Project, visible: &str) -> (Value, String) {
    let out = p
        .cmd(&["run", "recipe.toml", "-j", "8", "--json"])
        .env("CUDA_VISIBLE_DEVICES", visible)
        .output()
        .unwrap();
    assert_code(&out, 0);
    (serde_json::from_slice(&out.stdout).unwrap(), stderr(&out))
}

#[test]
fn auto_keeps_the_ids_cuda_visible_devices_gives() {
    let steps = gated("a", 2, 2, "{ gpus = 1 }") + &gated("b", 2, 2, "{ gpus = 0.5 }");
    for visible in [
        "GPU-8f1c2d3e-1111-2222-3333-444455556666,GPU-0a0b0c0d-1111-2222-3333-444455556666",
        "MIG-5f6e7d8c-aaaa-bbbb-cccc-ddddeeeeffff,MIG-1a2b3c4d-aaaa-bbbb-cccc-ddddeeeeffff",
        "2,3",
    ] {
        let p = project(&steps);
        let (run, _) = run_visible(&p, visible);
        let allowed: Vec<&str> = visible.split(',').collect();
        let a = seen(&p, &run, "a").0;
        let b = seen(&p, &run, "b").0;
        assert!(allowed.contains(&a.as_str()), "{a} not in {visible}");
        assert!(allowed.contains(&b.as_str()), "{b} not in {visible}");
        assert_ne!(a, b, "a whole GPU is never shared");
        let status = p.json(&["status", "last"], 0);
        let recorded: Vec<String> = status["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s["attempts"][0]["gpus"][0]
                    .to_string()
                    .trim_matches('"')
                    .to_string()
            })
            .collect();
        for r in &recorded {
            assert!(
                allowed.contains(&r.as_str()),
                "recorded {r}, not in {visible}"
            );
        }
    }
    // `-1` hides every GPU, as CUDA reads it: the steps run on the CPU.
    let p = project(&steps);
    let (run, err) = run_visible(&p, "-1");
    assert!(err.contains("no GPU in this run"), "{err}");
    assert_eq!(seen(&p, &run, "a").0, "");
    // CUDA stops at the first entry that is not a device.
    let p = project(&gated("a", 1, 1, "{ gpus = 1 }"));
    let (run, _) = run_visible(&p, "3,-1,0");
    assert_eq!(seen(&p, &run, "a").0, "3");
}

/// A stand-in for `nvidia-cuda-mps-control`: `-d` records its environment and returns (as
/// the real one does once its daemon runs); without arguments it records what it reads on
/// stdin (`quit`).
const FAKE_MPS: &str = r#"#!/bin/sh
if [ "${1-}" = "-d" ]; then
  {
    echo "start"
    echo "pipe=${CUDA_MPS_PIPE_DIRECTORY-}"
    echo "visible=${CUDA_VISIBLE_DEVICES-unset}"
    echo "order=${CUDA_DEVICE_ORDER-}"
    echo "reaper=${NEEDLE_REAPER:+set}"
  } >> "$FAKE_MPS_LOG"
  exit 0
fi
echo "command $(cat) pipe=${CUDA_MPS_PIPE_DIRECTORY-}" >> "$FAKE_MPS_LOG"
"#;

#[test]
fn mps_serves_the_gpu_steps_of_a_run_and_quits_with_it() {
    use std::os::unix::fs::PermissionsExt;
    let steps = "[steps.gpu]\nop = \"exec\"\ncmd = [\"sh\", \"-c\", \"echo \\\"pipe:$CUDA_MPS_PIPE_DIRECTORY\\\" > \\\"$NEEDLE_OUT/pipe\\\"\"]\nresources = { gpus = 0.5 }\n\n[steps.cpu]\nop = \"exec\"\ncmd = [\"sh\", \"-c\", \"echo \\\"pipe:$CUDA_MPS_PIPE_DIRECTORY\\\" > \\\"$NEEDLE_OUT/pipe\\\"; true\"]\n";
    let p = project(steps);
    let bin = p.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = p.write("bin/nvidia-cuda-mps-control", FAKE_MPS);
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let log = p.path("mps.log");

    let out = p
        .cmd(&["run", "recipe.toml", "--gpus", "1", "--mps", "--json"])
        .env("PATH", &path)
        .env("FAKE_MPS_LOG", &log)
        .env("CUDA_VISIBLE_DEVICES", "0")
        .output()
        .unwrap();
    assert_code(&out, 0);
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpu_pipe = read(&output_view(&p, &run, "gpu"), "pipe");
    let gpu_pipe = gpu_pipe.strip_prefix("pipe:").unwrap().to_string();
    assert_eq!(read(&output_view(&p, &run, "cpu"), "pipe"), "pipe:");
    let said = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines,
        [
            "start",
            &format!("pipe={gpu_pipe}"),
            "visible=unset",
            "order=PCI_BUS_ID",
            "reaper=set",
            &format!("command quit pipe={gpu_pipe}"),
        ],
        "{said}"
    );
    assert!(gpu_pipe.contains("needle-mps-"), "{gpu_pipe}");

    // Without the program, or without a GPU, --mps is refused before anything runs.
    let out = p
        .cmd(&["run", "recipe.toml", "--gpus", "1", "--mps"])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert_code(&out, 2);
    assert!(
        stderr(&out).contains("--mps needs `nvidia-cuda-mps-control`, which is not on PATH"),
        "{}",
        stderr(&out)
    );
    let out = p
        .cmd(&["run", "recipe.toml", "--gpus", "none", "--mps"])
        .output()
        .unwrap();
    assert_code(&out, 2);
    assert!(
        stderr(&out).contains("--mps: this run has no GPU"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_shipped_recipe_plans_and_packs_onto_a_gpu() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let mut planned = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let p = Project::new();
        let recipe = path.to_str().unwrap();
        for gpus in ["none", "1"] {
            let out = p.needle(&["plan", recipe, "--gpus", gpus, "--gpu-mem", "80"]);
            assert_code(&out, 0);
        }
        planned += 1;
    }
    assert!(planned >= 5, "only {planned} recipes in {}", dir.display());
    // The demo's GPU steps share a GPU four at a time.
    let p = Project::new();
    let recipe = dir.join("emu-mini.toml");
    let plan = stdout(&p.needle(&["plan", recipe.to_str().unwrap(), "--gpus", "1"]));
    assert!(
        plan.contains("0.25  4 at once on each GPU, 4 in all"),
        "{plan}"
    );
}

#[test]
fn doctor_says_what_gpus_auto_hands_out() {
    let p = Project::new();
    let doctor = |visible: &str| -> Value {
        let out = p
            .cmd(&["doctor", "--json"])
            .env("CUDA_VISIBLE_DEVICES", visible)
            .output()
            .unwrap();
        assert_code(&out, 0);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let ids = |v: &Value| -> Vec<String> {
        (v["gpus"]["auto"].as_array().unwrap().iter())
            .map(|g| g["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&doctor("GPU-8f1c,3")), ["GPU-8f1c", "3"]);
    assert!(ids(&doctor("-1")).is_empty());
}
