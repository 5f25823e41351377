//! GPUs are tokens: a step never sees another running step's GPU, and no more GPU steps run
//! at once than there are GPUs.

use crate::common::*;

#[test]
fn gpu_ids_are_exclusive_while_steps_run() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "gpus"

[sweep]
i = [1, 2, 3, 4, 5, 6]

[steps.two]
op = "exec"
cmd = ["sh", "-c", "echo \"$(date +%s.%N) $CUDA_VISIBLE_DEVICES\" > \"$NEEDLE_OUT/start\"; sleep 0.4; date +%s.%N > \"$NEEDLE_OUT/end\"; echo ${i} > \"$NEEDLE_OUT/i\""]
resources = { gpus = 2 }

[steps.one]
op = "exec"
cmd = ["sh", "-c", "echo \"$(date +%s.%N) $CUDA_VISIBLE_DEVICES\" > \"$NEEDLE_OUT/start\"; sleep 0.3; date +%s.%N > \"$NEEDLE_OUT/end\"; echo ${i} > \"$NEEDLE_OUT/i\""]
resources = { gpus = 1 }
"#,
    );
    let run = p.json(&["run", "recipe.toml", "--gpus", "4", "--jobs", "16"], 0);
    assert_eq!(run["executed"], 12);

    let mut spans: Vec<(f64, f64, Vec<String>)> = Vec::new();
    for s in run["steps"].as_array().unwrap() {
        let show = p.json(&["show", s["output"].as_str().unwrap()], 0);
        let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
        let start = std::fs::read_to_string(view.join("start")).unwrap();
        let mut parts = start.split_whitespace();
        let t0: f64 = parts.next().unwrap().parse().unwrap();
        let gpus: Vec<String> = parts
            .next()
            .unwrap()
            .split(',')
            .map(str::to_string)
            .collect();
        let t1: f64 = std::fs::read_to_string(view.join("end"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let want = if s["name"] == "two" { 2 } else { 1 };
        assert_eq!(gpus.len(), want, "{s}");
        for g in &gpus {
            assert!(["0", "1", "2", "3"].contains(&g.as_str()));
        }
        spans.push((t0, t1, gpus));
    }
    for (i, a) in spans.iter().enumerate() {
        let mut busy = a.2.len();
        for b in spans.iter().skip(i + 1) {
            let overlap = a.0 < b.1 && b.0 < a.1;
            if overlap {
                for g in &a.2 {
                    assert!(!b.2.contains(g), "GPU {g} was handed to two running steps");
                }
            }
        }
        for b in &spans {
            if !std::ptr::eq(a, b) && b.0 <= a.0 && a.0 < b.1 {
                busy += b.2.len();
            }
        }
        assert!(busy <= 4, "{busy} GPUs in use at once");
    }
}

#[test]
fn without_any_gpu_steps_asking_for_gpus_run_on_the_cpu() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "cpu-fallback"

[steps.train]
op = "exec"
cmd = ["sh", "-c", "echo \"[$CUDA_VISIBLE_DEVICES]\" > \"$NEEDLE_OUT/gpus\""]
resources = { gpus = 2 }
"#,
    );
    let out = p.needle(&["run", "recipe.toml", "--gpus", "none"]);
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains("no GPU in this run: `train` runs on the CPU"),
        "{}",
        stderr(&out)
    );
    let show = p.json(&["show", "last:train"], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(view.join("gpus")).unwrap(), "[]\n");
}
