//! A step's process that crashes — a segfault, a SIGKILL (the OOM killer's signal), a non-zero
//! exit, a time-out, a write into its own inputs — fails that step with the reason in words
//! and the tail of its log; the other branches finish, and `rerun` after a fix completes the
//! run. A write into the store never leaves it silently corrupt.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::common::*;

/// `root` feeds `crash` (the step under test, `crash.sh`), which feeds `after`; `other` and
/// `after_other` are an independent branch. Every step that runs appends its name to `ran.txt`.
const RECIPE: &str = r#"
[recipe]
name = "worker-failures"

[steps.root]
op = "exec"
cmd = ["sh", "-c", "echo root > \"$NEEDLE_OUT/v\"; echo root >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]

[steps.crash]
op = "exec"
cmd = ["sh", "crash.sh"]
code = ["crash.sh"]
inputs = { up = "root" }
timeout = "2s"

[steps.after]
op = "exec"
cmd = ["sh", "-c", "cp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"; echo after >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]
inputs = { up = "crash" }

[steps.other]
op = "exec"
cmd = ["sh", "-c", "echo other > \"$NEEDLE_OUT/w\"; echo other >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]

[steps.after_other]
op = "exec"
cmd = ["sh", "-c", "cp \"$NEEDLE_IN_UP/w\" \"$NEEDLE_OUT/w\"; echo after_other >> \"$NEEDLE_RECIPE_DIR/ran.txt\""]
inputs = { up = "other" }
"#;

/// What a working `crash.sh` does.
const FIXED: &str = "cp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"\necho crash-fixed >> \"$NEEDLE_RECIPE_DIR/ran.txt\"\n";

/// Run the recipe with `script` as `crash.sh`; check that `crash` failed with a reason
/// containing every one of `reason`, that the run's output showed the log's last line `tail`,
/// that the other branch succeeded and `after` was skipped; then fix the script and check
/// that `rerun` finishes the run. Returns the project and the recorded reason.
fn crash_and_rerun(script: &str, reason: &[&str], tail: &str) -> (Project, String) {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    p.write("crash.sh", script);

    let out = p.needle(&["run", "recipe.toml"]);
    assert_code(&out, 1);
    let err = stderr(&out);
    let failed_line = err
        .lines()
        .find(|l| l.starts_with("failed  crash: "))
        .unwrap_or_else(|| panic!("no failure line for `crash`:\n{err}"));
    for r in reason {
        assert!(
            failed_line.contains(r),
            "`{r}` not in: {failed_line}\n{err}"
        );
    }
    assert!(
        err.contains(&format!("| {tail}")),
        "the log tail `{tail}` is shown:\n{err}"
    );

    let status = p.json(&["status", "1"], 0);
    let crash = steps_named(&status, "crash")[0];
    assert_eq!(crash["status"], "failed", "{status}");
    let recorded = crash["detail"].as_str().unwrap().to_string();
    for r in reason {
        assert!(
            recorded.contains(r),
            "`{r}` not in the recorded reason: {recorded}"
        );
    }
    for ok in ["root", "other", "after_other"] {
        assert_eq!(
            steps_named(&status, ok)[0]["status"],
            "succeeded",
            "{ok}: {status}"
        );
    }
    assert_eq!(steps_named(&status, "after")[0]["status"], "skipped");

    let show = p.needle(&["show", "1:crash"]);
    assert_code(&show, 0);
    let text = stdout(&show);
    assert!(text.contains(&format!("reason   {recorded}")), "{text}");
    assert!(
        text.contains(&format!("1: {recorded}")),
        "the attempt says why too: {text}"
    );
    let logs = p.needle(&["logs", "1:crash"]);
    assert!(stdout(&logs).contains(tail), "{}", stdout(&logs));

    p.write("crash.sh", FIXED);
    let rerun = p.json(&["rerun", "1"], 0);
    assert_eq!(rerun["state"], "succeeded", "{rerun}");
    assert!(
        p.lines("ran.txt")
            .ends_with(&["crash-fixed".into(), "after".into()])
    );
    assert_code(&p.needle(&["verify", "--hash"]), 0);
    (p, recorded)
}

#[test]
fn a_segfault_is_named_in_words() {
    // A real segmentation fault: the step's own process reads address 0.
    let (_, reason) = crash_and_rerun(
        "echo 'reading address 0' >&2\nexec python3 -c 'import ctypes; ctypes.string_at(0)'\n",
        &["killed by signal SIGSEGV (segmentation fault)"],
        "reading address 0",
    );
    assert!(!reason.contains("code"), "{reason}");
}

#[test]
fn a_segfault_under_a_shell_is_named_too() {
    // The shell survives its child's crash and exits 128 + 11.
    crash_and_rerun(
        "echo 'starting the tool' >&2\npython3 -c 'import ctypes; ctypes.string_at(0)'\n",
        &[
            "exited with code 139",
            "killed by SIGSEGV (segmentation fault)",
        ],
        "starting the tool",
    );
}

#[test]
fn a_sigkill_needle_did_not_send_points_at_the_oom_killer() {
    crash_and_rerun(
        "echo 'allocating' >&2\nkill -KILL $$\n",
        &["killed by SIGKILL (not by needle", "OOM killer"],
        "allocating",
    );
}

#[test]
fn a_non_zero_exit_and_a_missing_command_say_so() {
    crash_and_rerun(
        "echo 'bad input row 17' >&2\nexit 3\n",
        &["exited with code 3"],
        "bad input row 17",
    );
    crash_and_rerun(
        "echo 'calling the tool' >&2\nno-such-tool-anywhere --help\n",
        &["exited with code 127 (the command was not found)"],
        "calling the tool",
    );
}

#[test]
fn a_time_out_stops_the_step_and_says_after_how_long() {
    let (p, _) = crash_and_rerun(
        "echo 'waiting forever' >&2\nexec sleep 60\n",
        &["timed out after"],
        "needle: timed out after 2s",
    );
    let log = stdout(&p.needle(&["logs", "1:crash"]));
    assert!(log.contains("waiting forever"), "{log}");
}

/// Where the recipe's process memory cgroup can hold a child cgroup with a memory limit (root
/// on cgroup v1 or v2 with the memory controller), a step over the limit meets the real OOM
/// killer; the reason then says so for certain when the kernel log is readable.
#[test]
fn the_real_oom_killer_is_recognised_where_a_memory_limit_can_be_set() {
    let Some(cgroup) = MemoryCgroup::new(64 << 20) else {
        return;
    };
    let script = format!(
        "echo 'filling memory' >&2\necho $$ > {procs}\nexec python3 -c \"b = b'x' * (1 << 30)\"\n",
        procs = cgroup.procs().display()
    );
    let kmsg = std::fs::File::open("/dev/kmsg").is_ok();
    let expected: &[&str] = if kmsg {
        &[
            "killed by SIGKILL from the kernel's OOM killer",
            "out of memory",
        ]
    } else {
        skip_or_fail("/dev/kmsg is not readable: only the general SIGKILL reason is checked");
        &["killed by SIGKILL"]
    };
    crash_and_rerun(&script, expected, "filling memory");
}

/// A child of this process's memory cgroup with a memory limit, removed on drop.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    fn new(limit: u64) -> Option<MemoryCgroup> {
        let skip = |why: String| {
            skip_or_fail(&format!("the real OOM kill: {why}"));
            None
        };
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let name = format!("needle-e2e-oom-{}", std::process::id());
        for line in cgroups.lines() {
            let parts: Vec<&str> = line.splitn(3, ':').collect();
            let [id, controllers, path] = parts[..] else {
                continue;
            };
            let (dir, limit_file) = if controllers.split(',').any(|c| c == "memory") {
                (
                    Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
                    "memory.limit_in_bytes",
                )
            } else if id == "0" && controllers.is_empty() {
                (
                    Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')),
                    "memory.max",
                )
            } else {
                continue;
            };
            let dir = dir.join(&name);
            if let Err(e) = std::fs::create_dir(&dir) {
                return skip(format!("cannot create `{}`: {e}", dir.display()));
            }
            let cgroup = MemoryCgroup { dir };
            if let Err(e) = std::fs::write(cgroup.dir.join(limit_file), limit.to_string()) {
                return skip(format!("cannot set {limit_file}: {e}"));
            }
            return Some(cgroup);
        }
        skip("no memory cgroup in /proc/self/cgroup".into())
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The blob that a view's file is a hardlink of.
fn blob_of(store: &Path, file: &Path) -> PathBuf {
    let ino = std::fs::metadata(file).unwrap().ino();
    let mut stack = vec![store.join("blobs")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.ino() == ino {
                return e.path();
            }
        }
    }
    panic!("no blob shares {}'s inode", file.display());
}

#[test]
fn a_step_that_changes_its_input_fails_and_the_damaged_blob_leaves_the_store() {
    // Appending to an input: as root nothing stops it, and the file is the blob itself.
    let (p, reason) = crash_and_rerun(
        "echo 'updating in place' >&2\necho extra >> \"$NEEDLE_IN_UP/v\"\ncp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"\n",
        &[
            "wrote outside its output directory",
            "changed `v` in its input `up`",
            "the blob was dropped",
            "the record of `root`, which the next run runs again",
        ],
        "updating in place",
    );
    // root was dropped with its blob, so the rerun made it again: the same bytes as before.
    let ran = p.lines("ran.txt");
    assert_eq!(ran.iter().filter(|l| *l == "root").count(), 2, "{ran:?}");
    let rerun = p.json(&["status", "2"], 0);
    assert_eq!(steps_named(&rerun, "root")[0]["status"], "succeeded");
    assert_eq!(steps_named(&rerun, "other")[0]["status"], "cached");
    let run1 = p.json(&["status", "1"], 0);
    assert_eq!(
        steps_named(&run1, "root")[0]["output"],
        steps_named(&rerun, "root")[0]["output"]
    );
    let view = p.json(&["show", "2:root"], 0)["view"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        std::fs::read_to_string(Path::new(&view).join("v")).unwrap(),
        "root\n"
    );
    assert!(!reason.contains("before it started"), "{reason}");
}

#[test]
fn a_step_that_adds_to_its_input_view_fails_and_the_view_is_rebuilt() {
    let (p, _) = crash_and_rerun(
        "echo 'caching beside the data' >&2\necho cache > \"$NEEDLE_IN_UP/cache\"\ncp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"\n",
        &[
            "wrote outside its output directory",
            "added `cache` in its input `up`",
            "the store's bytes are intact",
        ],
        "caching beside the data",
    );
    // The blobs were intact: root stayed cached.
    assert_eq!(
        p.lines("ran.txt").iter().filter(|l| *l == "root").count(),
        1
    );
}

#[test]
fn a_step_that_replaces_an_input_file_fails() {
    // `sed -i` writes a new file and renames it over the old name: the blob is untouched.
    crash_and_rerun(
        "echo 'editing' >&2\nsed -i s/root/ROOT/ \"$NEEDLE_IN_UP/v\"\ncp \"$NEEDLE_IN_UP/v\" \"$NEEDLE_OUT/v\"\n",
        &[
            "changed `v` in its input `up`",
            "the store's bytes are intact",
        ],
        "editing",
    );
}

#[test]
fn a_file_written_into_blobs_is_never_trusted_as_the_blob() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "planted"
[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo hello > \"$NEEDLE_OUT/greeting\""]
"#,
    );
    p.json(&["run", "recipe.toml"], 0);
    let view = p.json(&["show", "last:a"], 0)["view"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = blob_of(&p.store(), &Path::new(&view).join("greeting"));

    // A step writes other bytes of the same size over that blob, by its path in the store;
    // a later step then outputs the blob's true bytes.
    p.write(
        "recipe.toml",
        &format!(
            r#"
[recipe]
name = "planted"
[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo hello > \"$NEEDLE_OUT/greeting\""]
[steps.tamper]
op = "exec"
cmd = ["sh", "-c", "chmod u+w {blob}; printf 'jello\n' > {blob}; echo done > \"$NEEDLE_OUT/t\""]
[steps.b]
op = "exec"
cmd = ["sh", "-c", "echo hello > \"$NEEDLE_OUT/same\""]
inputs = {{ after = "tamper" }}
"#,
            blob = blob.display()
        ),
    );
    let run = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(run["executed"], 2, "{run}");
    // The absorb of b's output found the file under the blob's name not as the store left
    // it, hashed it, and put the true bytes back; a's view, which linked the bad file, went.
    assert_eq!(std::fs::read_to_string(&blob).unwrap(), "hello\n");
    assert_code(&p.needle(&["verify", "--hash"]), 0);
    let view = p.json(&["show", "last:a"], 0)["view"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        std::fs::read_to_string(Path::new(&view).join("greeting")).unwrap(),
        "hello\n"
    );
}

/// A program that cannot start at all — not on `PATH`, or a script without the execute bit —
/// fails its step with the reason; the other branches finish.
#[test]
fn a_program_that_cannot_start_fails_its_step_with_the_reason() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "cannot-start"

[steps.missing]
op = "exec"
cmd = ["no-such-program-anywhere", "--help"]

[steps.denied]
op = "exec"
cmd = ["./tool.sh"]
code = ["tool.sh"]

[steps.fine]
op = "exec"
cmd = ["sh", "-c", "echo ok > \"$NEEDLE_OUT/v\""]
"#,
    );
    // Not executable: copied into the working directory with the user's mode.
    p.write("tool.sh", "#!/bin/sh\necho never\n");
    let out = p.needle(&["run", "recipe.toml", "--json"]);
    assert_code(&out, 1);
    let err = stderr(&out);
    for said in [
        "could not start: `no-such-program-anywhere`: No such file or directory",
        "could not start: `./tool.sh`: Permission denied",
    ] {
        assert!(err.contains(said), "`{said}` not in:\n{err}");
    }
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run["executed"], 1, "{run}");
    assert_eq!(run["failed"], 2, "{run}");
    let log = stdout(&p.needle(&["logs", "1:missing"]));
    assert!(
        log.contains("needle: could not start `no-such-program-anywhere`"),
        "{log}"
    );
}

/// A timed-out step whose leader exits at SIGTERM while a process it started ignores it: that
/// process is killed at once, not left running (holding a GPU) for as long as the run lasts.
#[test]
fn a_time_out_leaves_nothing_of_the_step_running() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "time-out-group"

[steps.slow]
op = "exec"
cmd = ["sh", "-c", "sh -c 'trap \"\" TERM; echo $$ > \"$NEEDLE_RECIPE_DIR/survivor\"; while :; do sleep 0.1; done' & exec sleep 60"]
timeout = "1s"

# Keeps the run going past the time-out, and looks at the survivor meanwhile.
[steps.watch]
op = "exec"
cmd = ["sh", "-c", "sleep 3; pid=$(cat \"$NEEDLE_RECIPE_DIR/survivor\"); if [ -e /proc/$pid ] && ! grep -q ') Z' /proc/$pid/stat; then echo running; else echo gone; fi > \"$NEEDLE_RECIPE_DIR/state\"; echo x > \"$NEEDLE_OUT/v\""]
"#,
    );
    let out = p.needle(&["run", "recipe.toml", "-j", "2"]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).contains("timed out after 1s"),
        "{}",
        stderr(&out)
    );
    let state = std::fs::read_to_string(p.path("state")).unwrap();
    assert_eq!(
        state.trim(),
        "gone",
        "the process that ignored SIGTERM still ran 2 s after its step timed out"
    );
}
