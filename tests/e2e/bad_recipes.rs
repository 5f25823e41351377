//! The corpus of malformed recipes in `tests/bad-recipes/`: every file, through `needle plan`
//! and `needle run`, exits 2 with the error its first line expects, at the position it names,
//! with its hint, and leaves the store as it was: absent when there was none, byte for byte
//! what it was when there was one.
//!
//! The first line of a corpus file is a comment of fields separated by ` | `: what is wrong,
//! then
//! - `expect: TEXT`: an error message holds TEXT (the first `expect` is the one `at` places);
//! - `at: LINE:COL`: where that error points, or `at: -` for an error about the whole file;
//! - `hint: TEXT` (optional): a `help:` line holds TEXT;
//! - `set: VAR=VALUE` (optional, repeatable): passed as `--set VAR=VALUE`.
//!
//! Every file runs in the same project, whose layout the corpus relies on: `gen.py`,
//! `lib/util.py`, `data/a.txt`, `tools/run.py`; `escape`, a symlink to a file outside the
//! project; `tools/outside`, another; `etc`, a symlink to `/etc`; `loop/self`, a symlink to its
//! own directory; `fifo`, a FIFO.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::*;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/bad-recipes")
}

/// What a corpus file's first line asks of its error.
#[derive(Debug)]
struct Expected {
    what: String,
    expect: Vec<String>,
    /// `None` for an error about the whole file.
    at: Option<(usize, usize)>,
    hint: Option<String>,
    sets: Vec<String>,
}

impl Expected {
    fn parse(file: &str, bytes: &[u8]) -> Expected {
        let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = std::str::from_utf8(first)
            .unwrap_or_else(|_| panic!("{file}: the first line is not UTF-8"));
        let line = line
            .strip_prefix("# ")
            .unwrap_or_else(|| panic!("{file}: the first line is not a `# ` comment"));
        let mut fields = line.split(" | ");
        let mut e = Expected {
            what: fields.next().unwrap_or_default().to_string(),
            expect: Vec::new(),
            at: None,
            hint: None,
            sets: Vec::new(),
        };
        let mut has_at = false;
        for field in fields {
            let (key, value) = field
                .split_once(": ")
                .unwrap_or_else(|| panic!("{file}: field `{field}` is not `key: value`"));
            match key {
                "expect" => e.expect.push(value.to_string()),
                "at" => {
                    has_at = true;
                    if value != "-" {
                        let (l, c) = value.split_once(':').expect("at: LINE:COL");
                        e.at = Some((l.parse().expect("a line"), c.parse().expect("a column")));
                    }
                }
                "hint" => e.hint = Some(value.to_string()),
                "set" => e.sets.push(value.to_string()),
                other => panic!("{file}: unknown field `{other}`"),
            }
        }
        assert!(!e.what.is_empty(), "{file}: says nothing of what is wrong");
        assert!(!e.expect.is_empty(), "{file}: has no `expect:`");
        assert!(has_at, "{file}: has no `at:`");
        e
    }

    /// What is wrong with `stderr` for this file, if anything.
    fn problems(&self, file: &str, stderr: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let prefix = match self.at {
            Some((line, col)) => format!("{file}:{line}:{col}: error: "),
            None => format!("{file}: error: "),
        };
        let first = &self.expect[0];
        if !stderr
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains(first.as_str()))
        {
            problems.push(format!("no line `{prefix}…{first}…`"));
        }
        for e in &self.expect[1..] {
            if !stderr.contains(e.as_str()) {
                problems.push(format!("no `{e}`"));
            }
        }
        if let Some(hint) = &self.hint
            && !stderr
                .lines()
                .any(|l| l.starts_with("  help: ") && l.contains(hint.as_str()))
        {
            problems.push(format!("no hint `{hint}`"));
        }
        problems
    }
}

/// The project every corpus file runs in (see the module doc), under `root`.
fn project(root: &Path) -> PathBuf {
    let dir = root.join("project");
    for sub in ["lib", "data", "tools", "loop"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("gen.py"), "print('gen')\n").unwrap();
    std::fs::write(dir.join("lib/util.py"), "X = 1\n").unwrap();
    std::fs::write(dir.join("data/a.txt"), "a\n").unwrap();
    std::fs::write(dir.join("tools/run.py"), "print('run')\n").unwrap();
    std::fs::write(root.join("secret.txt"), "outside the project\n").unwrap();
    symlink("../secret.txt", dir.join("escape")).unwrap();
    symlink("../../secret.txt", dir.join("tools/outside")).unwrap();
    symlink("/etc", dir.join("etc")).unwrap();
    symlink(".", dir.join("loop/self")).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo");
    dir
}

/// `needle ARGS` in `dir` with the store at `store`.
fn needle_in(dir: &Path, store: &Path, args: &[&str]) -> Output {
    assert_cmd::Command::new(bin())
        .current_dir(dir)
        .env("NEEDLE_STORE", store)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .args(args)
        .timeout(Duration::from_secs(120))
        .output()
        .expect("needle runs")
}

/// Every file under `dir` with its bytes (directories as empty entries), to compare a store
/// before and after.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().to_path_buf();
            if path.is_dir() {
                out.insert(rel, None);
                stack.push(path);
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// A store holding one run of a small recipe, in its own directory.
fn existing_store(root: &Path) -> PathBuf {
    let dir = root.join("other");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ok.toml"),
        "[recipe]\nname = \"ok\"\n[steps.a]\nop = \"exec\"\ncmd = [\"sh\", \"-c\", \"echo hi > $NEEDLE_OUT/hi\"]\n",
    )
    .unwrap();
    let store = dir.join("store");
    assert_code(&needle_in(&dir, &store, &["run", "ok.toml"]), 0);
    store
}

#[test]
fn every_malformed_recipe_is_refused_with_its_error_and_touches_no_store() {
    let root = tempfile::tempdir().unwrap();
    let dir = project(root.path());
    let fresh = dir.join(".needle");
    let existing = existing_store(root.path());
    let before = snapshot(&existing);

    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "the corpus has {} files", files.len());

    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let bytes = std::fs::read(path).unwrap();
        let expected = Expected::parse(&name, &bytes);
        std::fs::write(dir.join(&name), &bytes).unwrap();
        for verb in ["plan", "run"] {
            let mut args = vec![verb, name.as_str()];
            for set in &expected.sets {
                args.extend(["--set", set.as_str()]);
            }
            for (store, which) in [(&fresh, "no store"), (&existing, "a store")] {
                let started = Instant::now();
                let out = needle_in(&dir, store, &args);
                let took = started.elapsed();
                let stderr = stderr(&out);
                let mut problems = expected.problems(&name, &stderr);
                if out.status.code() != Some(2) {
                    problems.push(format!("exit {:?}, not 2", out.status.code()));
                }
                if stderr.contains("panicked") {
                    problems.push("a panic".into());
                }
                if fresh.exists() {
                    problems.push("a store was created".into());
                    std::fs::remove_dir_all(&fresh).unwrap();
                }
                if snapshot(&existing) != before {
                    problems.push("the existing store changed".into());
                }
                // Generous for a loaded machine: the slowest file (a sweep past the instance
                // limit) takes well under a second in a release build.
                if took > Duration::from_secs(60) {
                    problems.push(format!("took {took:?}"));
                }
                if !problems.is_empty() {
                    failures.push(format!(
                        "{name} ({}) with `needle {}` and {which}: {}\n{stderr}",
                        expected.what,
                        args.join(" "),
                        problems.join("; ")
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} corpus files failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// Files that do not belong in the corpus as they are: an empty one, one over the size limit,
/// and a device that never ends.
#[test]
fn empty_huge_and_endless_files_are_refused() {
    let p = Project::new();
    p.write("empty.toml", "");
    let out = p.needle(&["plan", "empty.toml"]);
    assert_code(&out, 2);
    assert!(
        stderr(&out).contains("empty.toml: error: missing `[recipe]` table"),
        "{}",
        stderr(&out)
    );

    // A valid recipe, padded past the limit with a comment.
    let mut huge =
        String::from("[recipe]\nname = \"huge\"\n[steps.a]\nop = \"exec\"\ncmd = [\"true\"]\n# ");
    huge.push_str(&"x".repeat(17 << 20));
    p.write("huge.toml", &huge);
    for file in ["huge.toml", "/dev/zero"] {
        for verb in ["plan", "run"] {
            let started = Instant::now();
            let out = p.needle(&[verb, file]);
            assert_code(&out, 2);
            assert!(
                stderr(&out).contains(&format!(
                    "{file}: error: recipe is larger than the limit of 16 MiB"
                )),
                "{}",
                stderr(&out)
            );
            assert!(started.elapsed() < Duration::from_secs(60));
        }
    }
    assert!(!p.store().exists());
}

/// A param or var that tries to reach a shell reaches the command as one literal argument and
/// one literal environment value: `exec` runs its argv directly. Each payload would create a
/// marker file in the project if a shell ran it (and harms nothing else).
#[test]
fn shell_metacharacters_reach_the_command_as_literal_text() {
    let p = Project::new();
    let marker = |name: &str| p.path(name).display().to_string();
    let evil = format!("\"; touch {}; echo \"", marker("pwned-quote"));
    let payloads = [
        evil.clone(),
        format!("$(touch {})", marker("pwned-subst")),
        format!("`touch {}`", marker("pwned-backtick")),
        format!("; touch {}", marker("pwned-semicolon")),
        "a b".to_string(),
        "*".to_string(),
    ];
    let param = format!("{evil} && touch {} | cat", marker("pwned-param"));
    let toml_str = |s: &str| serde_json::to_string(s).unwrap();
    let args: Vec<String> = payloads[1..].iter().map(|s| toml_str(s)).collect();
    p.write(
        "inject.toml",
        &format!(
            r#"
[recipe]
name = "inject"

[vars]
evil = {evil}

[steps.a]
op = "exec"
cmd = [
    "python3", "-c",
    "import json, os, sys; json.dump({{'argv': sys.argv[1:], 'env': os.environ['NEEDLE_PARAM_P']}}, open(os.environ['NEEDLE_OUT'] + '/seen.json', 'w'))",
    "${{evil}}", {args}, "--x=${{evil}}",
]
params = {{ p = {param} }}
"#,
            evil = toml_str(&evil),
            args = args.join(", "),
            param = toml_str(&param.replace(&evil, "${evil}")),
        ),
    );
    let out = p.needle(&["run", "inject.toml"]);
    assert_code(&out, 0);
    assert_code(&p.needle(&["export", "last:a", "out"]), 0);
    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.path("out/seen.json")).unwrap()).unwrap();
    let mut argv: Vec<String> = payloads.to_vec();
    argv.push(format!("--x={evil}"));
    assert_eq!(seen["argv"], serde_json::json!(argv));
    assert_eq!(seen["env"], param);
    let pwned: Vec<PathBuf> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.to_string_lossy().contains("pwned"))
        .collect();
    assert!(pwned.is_empty(), "a shell ran: {pwned:?}");
}
