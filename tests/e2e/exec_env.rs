//! What an `exec` step sees: its params, inputs, seed, GPUs and a fresh directory.

use crate::common::*;

#[test]
fn exec_steps_get_params_inputs_seed_and_a_fresh_dir() {
    let p = Project::new();
    p.write(
        "tools/emit.py",
        "import json, os\nprint('code copy present')\n",
    );
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "env"

[steps.up]
op = "exec"
cmd = ["sh", "-c", "echo hello > \"$NEEDLE_OUT/greeting\"; mkdir \"$NEEDLE_OUT/empty\""]

[steps.look]
op = "exec"
cmd = ["sh", "-c", "env | grep -E '^(NEEDLE_|CUDA_VISIBLE_DEVICES)' | sort > \"$NEEDLE_OUT/env\"; ls -A > \"$NEEDLE_OUT/workdir\"; ls -A tools > \"$NEEDLE_OUT/tools\"; cat \"$NEEDLE_IN_GREETING_DIR/greeting\" > \"$NEEDLE_OUT/read\";"]
code = ["tools"]
inputs = { greeting-dir = "up" }
params = { lr = 0.001, steps = 100, name = "a b", flags = [1, 2], on = true }
"#,
    );
    let run = p.json(&["run", "recipe.toml"], 0);
    let look = steps_named(&run, "look")[0];
    let show = p.json(&["show", look["output"].as_str().unwrap()], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    let read = |f: &str| std::fs::read_to_string(view.join(f)).unwrap();

    let env = read("env");
    assert!(env.contains("NEEDLE_PARAM_LR=0.001\n"), "{env}");
    assert!(env.contains("NEEDLE_PARAM_STEPS=100\n"), "{env}");
    assert!(env.contains("NEEDLE_PARAM_NAME=a b\n"), "{env}");
    assert!(env.contains("NEEDLE_PARAM_FLAGS=[1,2]\n"), "{env}");
    assert!(env.contains("NEEDLE_PARAM_ON=true\n"), "{env}");
    assert!(
        env.contains(
            r#"NEEDLE_PARAMS={"flags":[1,2],"lr":0.001,"name":"a b","on":true,"steps":100}"#
        ),
        "{env}"
    );
    assert!(env.contains("NEEDLE_SEED="), "{env}");
    assert!(env.contains("NEEDLE_IN_GREETING_DIR="), "{env}");
    assert!(
        env.contains("CUDA_VISIBLE_DEVICES=\n"),
        "no GPU asked, none visible: {env}"
    );
    assert_eq!(read("read"), "hello\n");
    assert_eq!(
        read("workdir"),
        "tools\n",
        "a fresh dir holding only the code copies"
    );
    assert_eq!(read("tools"), "emit.py\n");

    // The upstream's empty directory is part of its artifact.
    let up = steps_named(&run, "up")[0];
    let up_show = p.json(&["show", up["output"].as_str().unwrap()], 0);
    let files: Vec<&str> = up_show["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["empty", "greeting"]);
}

#[test]
fn the_seed_is_stable_per_key() {
    let p = Project::new();
    let recipe = r#"
[recipe]
name = "seed"
[steps.s]
op = "exec"
cmd = ["sh", "-c", "echo $NEEDLE_SEED > \"$NEEDLE_OUT/seed\""]
"#;
    p.write("recipe.toml", recipe);
    let a = p.json(&["run", "recipe.toml"], 0);
    let b = p.json(&["run", "recipe.toml", "--force", "s"], 0);
    assert_eq!(
        a["steps"][0]["output"], b["steps"][0]["output"],
        "same key, same seed, same bytes"
    );
}

#[test]
fn needle_inputs_describes_plain_and_gather_inputs() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "inputs"

[sweep]
x = [1, 2]

[steps.base]
op = "exec"
cmd = ["sh", "-c", "echo base > \"$NEEDLE_OUT/base\""]

[steps.gen]
op = "exec"
cmd = ["sh", "-c", "echo ${x} > \"$NEEDLE_OUT/x\""]

[steps.all]
op = "exec"
cmd = ["sh", "-c", "printf '%s' \"$NEEDLE_INPUTS\" > \"$NEEDLE_OUT/inputs.json\""]
inputs = { base = "base", gens = "gen[*]" }
"#,
    );
    let run = p.json(&["run", "recipe.toml"], 0);
    let all = steps_named(&run, "all")[0];
    let show = p.json(&["show", all["output"].as_str().unwrap()], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    let text = std::fs::read_to_string(view.join("inputs.json")).unwrap();
    let inputs: serde_json::Value = serde_json::from_str(&text).unwrap();

    let base = std::path::Path::new(inputs["base"]["dir"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(base.join("base")).unwrap(),
        "base\n"
    );
    assert!(inputs["base"].get("members").is_none(), "{inputs}");

    let members = inputs["gens"]["members"].as_array().expect("members[]");
    let labels: Vec<&str> = members
        .iter()
        .map(|m| m["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["x=1", "x=2"]);
    for (m, want) in members.iter().zip(["1\n", "2\n"]) {
        let dir = std::path::Path::new(m["dir"].as_str().unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("x")).unwrap(), want);
    }
    assert!(inputs["gens"]["dir"].is_string(), "{inputs}");
}

#[test]
fn the_next_run_reuses_a_clean_slot_even_one_a_step_left_read_only() {
    let p = Project::new();
    p.write(
        "first.toml",
        r#"
[recipe]
name = "first"
[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo a > \"$NEEDLE_OUT/a\"; chmod 555 ."]
"#,
    );
    p.write(
        "second.toml",
        r#"
[recipe]
name = "second"
[steps.b]
op = "exec"
cmd = ["sh", "-c", "echo b > scratch && cp scratch \"$NEEDLE_OUT/b\""]
"#,
    );
    let staging = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p.store().join("staging"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    };
    p.json(&["run", "first.toml"], 0);
    let slots = staging();
    assert_eq!(slots.len(), 1, "{slots:?}");
    // `status` opens the store too: it keeps the clean slot.
    p.json(&["status", "last"], 0);
    assert_eq!(staging(), slots);
    let run = p.json(&["run", "second.toml"], 0);
    assert_eq!(run["executed"], 1);
    assert_eq!(staging(), slots, "the slot was used again, not replaced");
}

/// A runner started with a signal blocked (its parent's doing) gives its steps an empty mask
/// and SIGPIPE at its default, whichever way it starts them (`NEEDLE_SPAWN`).
#[test]
fn steps_start_with_no_blocked_signal_whoever_started_the_runner() {
    use std::os::unix::process::CommandExt;
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "mask"

[steps.look]
op = "exec"
cmd = ["sh", "-c", "while read -r l; do case $l in SigBlk*|SigIgn*) echo \"$l\";; esac; done < /proc/self/status > \"$NEEDLE_OUT/sig\""]
"#,
    );
    for mode in ["command", "clone"] {
        let mut cmd = std::process::Command::new(bin());
        cmd.current_dir(p.dir.path())
            .env("NEEDLE_STORE", p.path(&format!("store-{mode}")))
            .env("NEEDLE_SPAWN", mode)
            .args(["run", "recipe.toml", "--json"]);
        // SAFETY: between fork and exec, only async-signal-safe calls on a sigset_t of our own.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert_code(&out, 0);
        let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let show = p
            .cmd(&[
                "show",
                steps_named(&run, "look")[0]["output"].as_str().unwrap(),
            ])
            .env("NEEDLE_STORE", p.path(&format!("store-{mode}")))
            .arg("--json")
            .output()
            .unwrap();
        let view = serde_json::from_slice::<serde_json::Value>(&show.stdout).unwrap()["view"]
            .as_str()
            .unwrap()
            .to_string();
        let sig = std::fs::read_to_string(std::path::Path::new(&view).join("sig")).unwrap();
        let field = |name: &str| {
            let line = sig.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(field("SigBlk:"), 0, "{mode}: {sig}");
        assert_eq!(
            field("SigIgn:") & (1 << (libc::SIGPIPE - 1)),
            0,
            "{mode}: {sig}"
        );
    }
}
