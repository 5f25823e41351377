//! GPU usage sampled during a run, through a fake `nvidia-smi` first on `PATH`: it lists two
//! GPUs for `--gpus auto` (`-L`) and answers the sampler's query with canned samples in the
//! real format. `NEEDLE_GPU_USAGE=nvidia-smi` keeps NVML out of it on a machine with GPUs.
//!
//! The step of each run waits until the fake has printed its samples (a file it writes), so
//! every sample is in the pipe before the run ends; the sampler reads the pipe to its end when
//! it stops. The busy shares are the canned samples' means whatever the timing.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const UUID_0: &str = "GPU-0a0a0a0a-1111-2222-3333-444455556666";
const UUID_1: &str = "GPU-1b1b1b1b-1111-2222-3333-444455556666";

/// Two H100s. GPU 0: utilisation 10, 30, 50, 70 % (mean 40), memory up to 4,000 MiB; GPU 1:
/// 0, 0, 100, 100 % (mean 50), up to 8,192 MiB; both of 81,559 MiB.
const FAKE: &str = r#"#!/bin/sh
QUERY="--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total"
round() {
  echo "0, UUID_0, NVIDIA H100 80GB HBM3, $1, $2, 81559"
  echo "1, UUID_1, NVIDIA H100 80GB HBM3, $3, $4, 81559"
}
if [ "$*" = "-L" ]; then
  echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: UUID_0)"
  echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: UUID_1)"
  exit 0
fi
if [ "$1" != "$QUERY" ] || [ "$2" != "--format=csv,noheader,nounits" ]; then
  echo "fake nvidia-smi: unexpected arguments: $*"
  exit 2
fi
round 10 1000 0 512
if [ "$3" != "-lms" ]; then exit 0; fi
round 30 2000 0 512
round 50 4000 100 8192
round 70 3000 100 8192
: > "HANDSHAKE"
# Between samples nvidia-smi waits; this one waits until the runner stops it, or is gone.
while kill -0 $PPID 2>/dev/null; do sleep 0.1; done
"#;

/// Broken: says what nvidia-smi says without a driver, and fails, whatever it is asked.
const BROKEN: &str = r#"#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
exit 1
"#;

/// A step on one GPU that ends once the fake has printed its samples (or fails after a minute).
const RECIPE: &str = r#"
[recipe]
name = "gpu-usage"

[steps.train]
op = "exec"
cmd = ["sh", "-c", "while [ ! -e \"$NEEDLE_RECIPE_DIR/printed\" ]; do sleep 0.02; done; echo done > \"$NEEDLE_OUT/log\""]
resources = { gpus = 1 }
timeout = 60
"#;

/// `bin/nvidia-smi` in the project, from `script`; its `PATH`, the fake first.
fn install(p: &Project, script: &str) -> String {
    let fake = p.write(
        "bin/nvidia-smi",
        &script
            .replace("UUID_0", UUID_0)
            .replace("UUID_1", UUID_1)
            .replace("HANDSHAKE", p.path("printed").to_str().unwrap()),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        p.path("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn needle_with(p: &Project, path: &str, args: &[&str]) -> Output {
    p.cmd(args)
        .env("PATH", path)
        .env("NEEDLE_GPU_USAGE", "nvidia-smi")
        .output()
        .expect("needle runs")
}

fn status_json(p: &Project) -> Value {
    p.json(&["status", "last"], 0)
}

/// The line of `status` text for GPU `id`.
fn gpu_line(text: &str, id: &str) -> String {
    text.lines()
        .find(|l| l.trim_start().starts_with(&format!("{id} ")) && l.contains("GiB"))
        .unwrap_or_else(|| panic!("no line for GPU {id}:\n{text}"))
        .to_string()
}

#[test]
fn status_report_and_json_show_what_the_gpus_did() {
    let p = Project::new();
    let path = install(&p, FAKE);
    p.write("recipe.toml", RECIPE);
    let out = needle_with(&p, &path, &["run", "recipe.toml", "--gpus", "auto"]);
    assert_code(&out, 0);
    assert!(!stderr(&out).contains("GPU usage"), "{}", stderr(&out));

    let text = stdout(&p.needle(&["status", "last"]));
    assert!(
        text.contains("sampled every 0.5s through nvidia-smi"),
        "{text}"
    );
    let gpu0 = gpu_line(&text, "0");
    assert!(gpu0.contains(" 40% "), "{gpu0}");
    assert!(gpu0.contains("3.9 of 79.6 GiB (5%)"), "{gpu0}");
    assert!(gpu0.contains("NVIDIA H100 80GB HBM3"), "{gpu0}");
    let gpu1 = gpu_line(&text, "1");
    assert!(gpu1.contains(" 50% "), "{gpu1}");
    assert!(gpu1.contains("8.0 of 79.6 GiB (10%)"), "{gpu1}");
    // The step table is still there, above.
    assert!(text.find("train").unwrap() < text.find("GiB").unwrap());

    let json = status_json(&p);
    let usage = &json["gpu_usage"];
    assert_eq!(usage["source"], "nvidia-smi");
    assert_eq!(usage["interval_ms"], 500);
    let gpus = usage["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{usage}");
    let held_by_step = json["steps"][0]["attempts"][0]["gpus"][0].to_string();
    for (g, id, uuid, busy, peak) in [
        (&gpus[0], "0", UUID_0, 40.0, 4000),
        (&gpus[1], "1", UUID_1, 50.0, 8192),
    ] {
        assert_eq!(g["id"], id);
        assert_eq!(g["uuid"], uuid);
        assert_eq!(g["memory_total_mib"], 81559);
        assert_eq!(g["memory_peak_mib"], peak);
        assert!(
            (g["busy_percent"].as_f64().unwrap() - busy).abs() <= 0.1,
            "{g}"
        );
        assert_eq!(g["samples"], 4);
        let series = &g["series"];
        let n: u64 = series["n"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(n, 4, "{series}");
        let most = series["memory_mib"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .max();
        assert_eq!(most, Some(peak));
        assert_eq!(
            series["util"].as_array().unwrap().len(),
            series["n"].as_array().unwrap().len()
        );
        // The step held one of the two for a share of the run; nothing held the other.
        let held = g["held_percent"].as_f64().unwrap();
        if format!("\"{id}\"") == held_by_step || id == held_by_step {
            assert!(held > 0.0 && held <= 100.0, "{g}");
        } else {
            assert_eq!(held, 0.0, "{g}");
        }
    }

    let html_path = p.path("report.html");
    assert_code(
        &p.needle(&["report", "last", "-o", html_path.to_str().unwrap()]),
        0,
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert_eq!(html.matches("<g class=\"gpu-util\">").count(), 2);
    assert_eq!(html.matches("<g class=\"gpu-memory\">").count(), 2);
    assert!(
        html.contains("<title>gpu 0: NVIDIA H100 80GB HBM3"),
        "{html}"
    );
    assert!(html.contains("busy 40%"));
    assert!(html.contains("busy 50%"));
}

#[test]
fn ids_the_machine_does_not_have_are_not_sampled() {
    let p = Project::new();
    let path = install(&p, FAKE);
    p.write("recipe.toml", RECIPE);
    // GPU 1, and a GPU 5 the fake does not list.
    let out = needle_with(&p, &path, &["run", "recipe.toml", "--gpus", "1,5"]);
    assert_code(&out, 0);
    let gpus = status_json(&p)["gpu_usage"]["gpus"].clone();
    let ids: Vec<&str> = gpus
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1"], "{gpus}");
    assert_eq!(gpus[0]["uuid"], UUID_1);
}

#[test]
fn without_nvidia_smi_there_is_no_gpu_section_and_no_warning() {
    let p = Project::new();
    // A PATH holding only a shell: no nvidia-smi, on any machine.
    std::fs::create_dir_all(p.path("bare")).unwrap();
    std::os::unix::fs::symlink("/bin/sh", p.path("bare/sh")).unwrap();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "no-gpu"
[steps.train]
op = "exec"
cmd = ["sh", "-c", "echo done > \"$NEEDLE_OUT/log\""]
resources = { gpus = 1 }
"#,
    );
    let path = p.path("bare").display().to_string();
    let out = needle_with(&p, &path, &["run", "recipe.toml", "--gpus", "2"]);
    assert_code(&out, 0);
    assert!(!stderr(&out).contains("GPU"), "{}", stderr(&out));
    let text = stdout(&p.needle(&["status", "last"]));
    assert!(!text.contains("GPUs, sampled"), "{text}");
    assert_eq!(status_json(&p)["gpu_usage"], Value::Null);
}

#[test]
fn a_broken_nvidia_smi_only_warns() {
    let p = Project::new();
    let path = install(&p, BROKEN);
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "broken"
[steps.train]
op = "exec"
cmd = ["sh", "-c", "echo done > \"$NEEDLE_OUT/log\""]
resources = { gpus = 1 }
"#,
    );
    let out = needle_with(&p, &path, &["run", "recipe.toml", "--gpus", "2"]);
    assert_code(&out, 0);
    let err = stderr(&out);
    assert!(err.contains("GPU usage"), "{err}");
    assert!(err.contains("NVIDIA-SMI has failed"), "{err}");
    assert!(
        !stdout(&p.needle(&["status", "last"])).contains("GPUs, sampled"),
        "nothing was sampled"
    );
    assert_eq!(status_json(&p)["gpu_usage"], Value::Null);
}

#[test]
fn a_killed_runner_leaves_what_it_had_sampled() {
    let p = Project::new();
    let path = install(&p, FAKE);
    // The step waits for a file that never comes; the runner is killed meanwhile.
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "killed"
[steps.train]
op = "exec"
cmd = ["sh", "-c", "while [ ! -e \"$NEEDLE_RECIPE_DIR/never\" ]; do sleep 0.05; done"]
resources = { gpus = 1 }
timeout = 120
"#,
    );
    // `--gpus 1`: one GPU, id 0.
    let runner = p
        .background(&["run", "recipe.toml", "--gpus", "1"])
        .env("PATH", &path)
        .env("NEEDLE_GPU_USAGE", "nvidia-smi")
        .spawn()
        .unwrap();
    let mut runner = KillOnDrop(runner);
    // The runner saves at its first sample: `status` (through its socket) then shows it.
    let saved = || {
        let out = p.needle(&["status", "last", "--json"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["gpu_usage"]["gpus"][0]["samples"].as_u64() > Some(0))
    };
    wait_for(
        "the first save of GPU usage",
        Duration::from_secs(60),
        saved,
    );
    runner.kill();

    let json = status_json(&p);
    assert_eq!(json["state"], "aborted", "its runner is gone: {json}");
    let gpu = &json["gpu_usage"]["gpus"][0];
    assert_eq!(gpu["id"], "0");
    assert!(gpu["samples"].as_u64().unwrap() >= 1, "{gpu}");
    let text = stdout(&p.needle(&["status", "last"]));
    gpu_line(&text, "0");
}

/// A runner killed with SIGKILL by [`KillOnDrop::kill`], or when the test fails before that.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn kill(&mut self) {
        // SAFETY: SIGKILL to the child we spawned, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.kill();
        }
    }
}
