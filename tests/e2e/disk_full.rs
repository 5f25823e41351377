//! A disk that fills up while a step's output is being stored: the step fails with a message
//! saying what to free, the store stays as it was before that step (no record, no blob of it,
//! no temporary file), the other steps go on, and the next run after space is freed executes
//! it. On a real filesystem: a small tmpfs holds the store (root only; CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;

/// A tmpfs mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `None`, saying why on stderr, where this process may not mount one (a failure
    /// instead under `NEEDLE_TEST_PRIVILEGED=require`, which `make test` sets).
    fn mount(dir: PathBuf, size: &str) -> Option<Tmpfs> {
        if !may_mount("mounting a small tmpfs") {
            return None;
        }
        std::fs::create_dir_all(&dir).unwrap();
        let size = format!("size={size}");
        mount_or_skip(&["-t", "tmpfs", "-o", &size, "tmpfs"], &dir)?;
        Some(Tmpfs { dir })
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.dir.display());
    }

    /// Bytes an unprivileged user may still write there.
    fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
        // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs fills the struct we pass and reads the NUL-terminated path.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

fn needle(p: &Project, store: &Path, args: &[&str]) -> Output {
    p.cmd(args)
        .env("NEEDLE_STORE", store)
        .output()
        .expect("needle runs")
}

fn json(p: &Project, store: &Path, args: &[&str], code: i32) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = needle(p, store, &all);
    assert_code(&out, code);
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Every file under `dir` (relative path, size), sorted, leaving out what a run writes besides
/// the store's contents: logs, the lock, sled's files, staging slots' own files.
fn contents(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let m = std::fs::symlink_metadata(&path).unwrap();
            if m.is_dir() {
                stack.push(path);
            } else if ["blobs/", "views/"].iter().any(|p| rel.starts_with(p)) {
                out.push((rel, m.len()));
            }
        }
    }
    out.sort();
    out
}

/// Names anywhere under `dir` that are a store's temporary files.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                out.push(e.path().display().to_string());
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

/// A 3 MB output does not fit a 2 MB disk: its copy into the store fails half way.
#[test]
fn a_full_disk_while_copying_an_output_in_fails_that_step_only() {
    let p = Project::new();
    let Some(disk) = Tmpfs::mount(p.path("disk"), "2m") else {
        return;
    };
    let store = disk.dir.join("store");
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "disk-full"

[steps.small]
op = "exec"
cmd = ["sh", "-c", "echo small > \"$NEEDLE_OUT/s\""]

[steps.big]
op = "exec"
# The bytes are made outside the store and linked: storing the output copies them in.
cmd = ["sh", "-c", "head -c 3000000 /dev/urandom > \"$NEEDLE_RECIPE_DIR/big.bin\"; ln -s \"$NEEDLE_RECIPE_DIR/big.bin\" \"$NEEDLE_OUT/big.bin\""]
inputs = { after = "small" }

[steps.after_big]
op = "exec"
cmd = ["sh", "-c", "wc -c < \"$NEEDLE_IN_BIG/big.bin\" > \"$NEEDLE_OUT/n\""]
inputs = { big = "big" }

[steps.other]
op = "exec"
cmd = ["sh", "-c", "echo other > \"$NEEDLE_OUT/o\""]
inputs = { after = "small" }
"#,
    );
    // What the store holds before `big` is stored: `small`'s output alone.
    let recipe = std::fs::read_to_string(p.path("recipe.toml")).unwrap();
    let first = p.write("first.toml", recipe.split("[steps.big]").next().unwrap());
    json(&p, &store, &["run", first.to_str().unwrap()], 0);
    let before = contents(&store);

    let out = needle(&p, &store, &["run", "recipe.toml"]);
    assert_code(&out, 1);
    let err = stderr(&out);
    let expected = format!(
        "no space left on device while storing the output of step `big` (2.9 MiB): free space \
         on `{}`",
        canonical(&disk.dir)
    );
    assert!(err.contains(&expected), "{expected}\nnot in:\n{err}");

    let status = json(&p, &store, &["status", "last"], 0);
    let big = steps_named(&status, "big")[0];
    assert_eq!(big["status"], "failed");
    assert!(big["detail"].as_str().unwrap().contains(&expected), "{big}");
    assert_eq!(steps_named(&status, "other")[0]["status"], "succeeded");
    assert_eq!(steps_named(&status, "after_big")[0]["status"], "skipped");

    // The store as it was, plus `other`'s output: no blob of `big`, no temporary file.
    let after = contents(&store);
    let other = json(&p, &store, &["show", "last:other"], 0);
    let added: Vec<&(String, u64)> = after.iter().filter(|f| !before.contains(f)).collect();
    assert!(
        added
            .iter()
            .all(|(_, size)| *size == "other\n".len() as u64),
        "only `other`'s file is new: {added:?}\n({other})"
    );
    assert_eq!(temporaries(&store), Vec::<String>::new());
    assert_code(&needle(&p, &store, &["verify", "--hash"]), 0);

    disk.resize("16m");
    let rerun = json(&p, &store, &["rerun", "last"], 0);
    assert_eq!(rerun["executed"], 2, "big and after_big: {rerun}");
    assert_code(&needle(&p, &store, &["verify", "--hash"]), 0);
}

/// An output written by renaming needs no space to store, but recording it does: with the
/// disk full, the commit is refused before the metadata database writes a byte, so sled
/// (which, once one of its writes fails, fails every later one) stays usable and the run is
/// recorded.
#[test]
fn a_full_disk_when_recording_an_output_fails_that_step_and_the_store_goes_on() {
    let p = Project::new();
    let Some(disk) = Tmpfs::mount(p.path("disk"), "8m") else {
        return;
    };
    let store = disk.dir.join("store");
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "disk-full-meta"

[steps.small]
op = "exec"
cmd = ["sh", "-c", "echo small > \"$NEEDLE_OUT/s\""]

[steps.fill]
op = "exec"
cmd = ["sh", "-c", "head -c 1048576 /dev/zero > \"$NEEDLE_OUT/data\""]
inputs = { after = "small" }
"#,
    );
    p.write(
        "first.toml",
        r#"
[recipe]
name = "disk-full-meta"
[steps.small]
op = "exec"
cmd = ["sh", "-c", "echo small > \"$NEEDLE_OUT/s\""]
"#,
    );
    json(&p, &store, &["run", "first.toml"], 0);
    // Opened again, sled takes its first 512 KiB segment: let it, before measuring.
    json(&p, &store, &["run", "first.toml"], 0);
    // Fill the disk but for `fill`'s 1 MiB and less than a commit's reserve (1 MiB).
    let filler = disk.dir.join("filler");
    let keep = (1 << 20) + (512 << 10);
    std::fs::write(&filler, vec![0u8; (disk.free() - keep) as usize]).unwrap();
    let before = contents(&store);

    let out = needle(&p, &store, &["run", "recipe.toml"]);
    assert_code(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains("no space left on device while storing the output of step `fill`"),
        "{err}"
    );
    let status = json(&p, &store, &["status", "last"], 0);
    assert_eq!(status["state"], "failed", "the run was recorded: {status}");
    assert_eq!(steps_named(&status, "fill")[0]["status"], "failed");
    assert_eq!(contents(&store), before, "nothing of `fill` was stored");
    assert_eq!(temporaries(&store), Vec::<String>::new());
    assert_code(&needle(&p, &store, &["verify", "--hash"]), 0);

    std::fs::remove_file(&filler).unwrap();
    let rerun = json(&p, &store, &["rerun", "last"], 0);
    assert_eq!(rerun["executed"], 1, "{rerun}");
    assert_code(&needle(&p, &store, &["verify", "--hash"]), 0);
}

/// A disk filled to the last byte under a store with runs: what needs to write fails cleanly,
/// sled's unfinished snapshot is not left to poison the store, and once space is freed every
/// command works and the store verifies.
#[test]
fn a_store_filled_to_the_last_byte_opens_again_once_space_is_freed() {
    let p = Project::new();
    let Some(disk) = Tmpfs::mount(p.path("disk"), "8m") else {
        return;
    };
    let store = disk.dir.join("store");
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "filled"

[vars]
salt = 0

[sweep]
i = [1, 2, 3, 4]

[steps.a]
op = "exec"
cmd = ["sh", "-c", "seq 1 2000 > \"$NEEDLE_OUT/v\"; echo ${i} ${salt} >> \"$NEEDLE_OUT/v\""]
"#,
    );
    for salt in ["1", "2", "3"] {
        json(
            &p,
            &store,
            &["run", "recipe.toml", "--set", &format!("salt={salt}")],
            0,
        );
    }
    let filler = disk.dir.join("filler");
    std::fs::write(&filler, vec![0u8; disk.free() as usize]).unwrap_or_default();
    assert_eq!(disk.free(), 0);
    // Commands that write fail, each saying why; none may break the store for later.
    let run = needle(&p, &store, &["run", "recipe.toml", "--set", "salt=4"]);
    assert_ne!(run.status.code(), Some(0));
    let gc = needle(&p, &store, &["gc"]);
    assert_ne!(gc.status.code(), Some(0));
    assert!(
        stderr(&gc).contains("No space left on device"),
        "{}",
        stderr(&gc)
    );

    std::fs::remove_file(&filler).unwrap();
    let runs = needle(&p, &store, &["runs"]);
    assert_code(&runs, 0);
    assert!(stdout(&runs).contains("filled"), "{}", stdout(&runs));
    assert_code(&needle(&p, &store, &["verify", "--hash"]), 0);
    let again = json(&p, &store, &["run", "recipe.toml", "--set", "salt=4"], 0);
    assert_eq!(again["executed"], 4, "{again}");
    assert_code(&needle(&p, &store, &["verify", "--hash"]), 0);
}
