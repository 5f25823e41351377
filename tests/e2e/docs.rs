//! The docs are tested, so that they cannot break again (issue 23): every fenced `toml` and
//! `sh` block of README.md, BENCHMARKS.md and docs/ does what the page says it does.
//!
//! A block's info string is its language, then attributes:
//!
//! | info string          | what the test does with the block                                   |
//! |----------------------|---------------------------------------------------------------------|
//! | `toml`               | a whole recipe: `needle plan` accepts it, and `needle run` succeeds  |
//! |                      | when it is cheap (every step an `exec` of python3, sh or bash)       |
//! | `toml fragment`      | part of a recipe: it must still parse as TOML                        |
//! | `toml config`        | a `needle.toml`: `needle run --config` must accept it                |
//! | `toml no-run`        | a whole recipe that is planned only (built-in ops, long, a GPU)      |
//! | `sh`                 | commands, run in the page's session (below); they must exit 0        |
//! | `sh exit=N`          | the same, expected to exit N (a step that fails on purpose: 1)       |
//! | `sh no-run`          | not run (a build, a GPU, Slurm, minutes): its `needle` and `make`    |
//! |                      | commands and their flags are checked against the real ones           |
//! | `LANG file=PATH`     | "save this as PATH": written at PATH in the session when reached;    |
//! |                      | a `toml file=` recipe is then planned, and run as a `toml` block is  |
//! |                      | unless a later `sh` block of the page runs it (the page says how)    |
//!
//! A page is read as a reader follows it: its blocks run in order in one session, a fresh
//! directory holding a copy of the repository's `recipes/` and `examples/` (the pages speak
//! from the repository's root). The working directory carries over from one `sh` block to the
//! next, as in a terminal; variables do not. `needle` on PATH is the binary under test, and
//! the store is the default `.needle/` of wherever the block stands. Recipe checks use a
//! store of their own, so they never change what a page's own commands then see.
//!
//! Nothing here sleeps or measures time: a block is done when its process exits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::common::*;

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every page whose blocks are tested, relative to the repository's root.
fn pages() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from("README.md"), PathBuf::from("BENCHMARKS.md")];
    let mut stack = vec![PathBuf::from("docs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(repo().join(&dir)).expect("docs/ exists") {
            let entry = entry.unwrap();
            let rel = dir.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                stack.push(rel);
            } else if rel.extension().is_some_and(|e| e == "md") {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

fn read(rel: &Path) -> String {
    std::fs::read_to_string(repo().join(rel))
        .unwrap_or_else(|e| panic!("could not read {}: {e}", rel.display()))
}

/// One fenced block of a page.
#[derive(Debug, Clone)]
struct Block {
    /// `page:line` of its opening fence, for messages.
    at: String,
    lang: String,
    fragment: bool,
    config: bool,
    no_run: bool,
    exit: i32,
    file: Option<String>,
    text: String,
}

/// The fenced blocks of a Markdown page, in order. A fence may be indented (inside a list
/// item); its indentation is taken off its lines. Unknown attributes are an error, so that
/// a misspelt `no-rnu` cannot quietly change what is tested.
fn blocks(page: &str, md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = md.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let trimmed = line.trim_start();
        let Some(info) = trimmed.strip_prefix("```") else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let mut words = info.split_whitespace();
        let lang = words.next().unwrap_or("").to_string();
        let mut block = Block {
            at: format!("{page}:{}", n + 1),
            lang,
            fragment: false,
            config: false,
            no_run: false,
            exit: 0,
            file: None,
            text: String::new(),
        };
        for word in words {
            match word.split_once('=') {
                None if word == "fragment" => block.fragment = true,
                None if word == "config" => block.config = true,
                None if word == "no-run" => block.no_run = true,
                Some(("exit", n)) => block.exit = n.parse().expect("exit=N takes a number"),
                Some(("file", path)) => block.file = Some(path.to_string()),
                _ => panic!("{}: unknown block attribute `{word}`", block.at),
            }
        }
        for (_, line) in lines.by_ref() {
            if line.trim_start().starts_with("```") {
                break;
            }
            let body = line.get(indent..).unwrap_or(line.trim_start());
            block.text.push_str(body);
            block.text.push('\n');
        }
        out.push(block);
    }
    out
}

/// A scratch directory standing in for the repository's root, as a reader's clone.
fn session_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["recipes", "examples"] {
        copy_tree(&repo().join(sub), &dir.path().join(sub));
    }
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// PATH with the binary under test first.
fn path_with_needle() -> std::ffi::OsString {
    let mut dirs = vec![bin().parent().unwrap().to_path_buf()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).unwrap()
}

/// What a reader's shell would have: needle on PATH, and none of the variables that would
/// point needle elsewhere than the page says.
fn reader_command(program: &str) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    c.env("PATH", path_with_needle())
        .env_remove("NEEDLE_STORE")
        .env_remove("NEEDLE_CONFIG")
        .env_remove("NEEDLE_GPU_USAGE")
        .env_remove("CUDA_VISIBLE_DEVICES");
    c
}

/// A page's session: where it stands, and what each block printed.
struct Session {
    cwd: PathBuf,
    /// Throwaway stores for recipe checks, one per block.
    checks: tempfile::TempDir,
    outputs: Vec<(Block, Output)>,
}

impl Session {
    /// A session starting in `dir`, which the caller keeps for as long as the session.
    fn new(dir: &Path) -> Session {
        Session {
            cwd: dir.to_path_buf(),
            checks: tempfile::tempdir().unwrap(),
            outputs: Vec::new(),
        }
    }

    /// Follow `blocks` in order, as the page says.
    fn follow(&mut self, blocks: &[Block]) {
        for (i, block) in blocks.iter().enumerate() {
            match (block.lang.as_str(), &block.file) {
                (_, Some(file)) => {
                    let path = self.cwd.join(file);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, &block.text).unwrap();
                    if block.lang == "toml" {
                        let run_later = blocks[i + 1..].iter().any(|b| runs_recipe(b, file));
                        self.check_recipe(block, &path, !run_later);
                    }
                }
                ("toml", None) => self.check_toml(block),
                ("sh", None) => {
                    check_commands(block);
                    if !block.no_run {
                        self.run_sh(block);
                    }
                }
                _ => {}
            }
        }
    }

    fn check_toml(&mut self, block: &Block) {
        if let Err(e) = block.text.parse::<toml::Table>() {
            panic!("{}: not TOML: {e}\n{}", block.at, block.text);
        }
        if block.fragment {
            return;
        }
        let dir = self.checks.path().join(block.at.replace(['/', ':'], "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(if block.config {
            "needle.toml"
        } else {
            "recipe.toml"
        });
        std::fs::write(&path, &block.text).unwrap();
        if block.config {
            check_config(block, &path);
        } else {
            self.check_recipe(block, &path, true);
        }
    }

    /// `needle plan`, and (with `run`) `needle run` where it is cheap, on a store of the
    /// check's own.
    fn check_recipe(&mut self, block: &Block, recipe: &Path, run: bool) {
        let store = self
            .checks
            .path()
            .join(format!("store-{}", block.at.replace(['/', ':', '.'], "_")));
        let needle = |args: &[&str]| {
            reader_command(bin().to_str().unwrap())
                .current_dir(&self.cwd)
                .env("NEEDLE_STORE", &store)
                .args(args)
                .output()
                .unwrap()
        };
        let recipe = recipe.to_str().unwrap();
        let plan = needle(&["plan", recipe]);
        assert!(
            plan.status.success(),
            "{}: `needle plan` refuses the recipe\n{}\n--- stderr\n{}",
            block.at,
            block.text,
            stderr(&plan)
        );
        if run && !block.no_run && cheap(&block.text) {
            let run = needle(&["run", recipe]);
            assert!(
                run.status.success(),
                "{}: `needle run` fails on the recipe\n{}\n--- stderr\n{}",
                block.at,
                block.text,
                stderr(&run)
            );
        }
    }

    /// Run one `sh` block where the session stands; it must exit as the block says.
    fn run_sh(&mut self, block: &Block) {
        // The trap records where the block ended, whatever its exit, for the next block; the
        // file is kept out of the session, where a page's `ls` or `code = ["."]` would see it.
        let cwd_file = self.checks.path().join("cwd");
        let script = format!(
            "trap 'pwd > \"{}\"' EXIT\nset -e -o pipefail\n{}",
            cwd_file.display(),
            block.text
        );
        let out = reader_command("bash")
            .current_dir(&self.cwd)
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(block.exit),
            "{}: expected exit {}\n{}--- stdout\n{}\n--- stderr\n{}",
            block.at,
            block.exit,
            block.text,
            stdout(&out),
            stderr(&out)
        );
        self.cwd = PathBuf::from(std::fs::read_to_string(&cwd_file).unwrap().trim_end());
        self.outputs.push((block.clone(), out));
    }
}

/// Whether `block` is a `sh` block that runs (`needle run`) the recipe saved as `file`: then
/// the page itself shows that recipe running, and running it beforehand as well would only
/// cost time.
fn runs_recipe(block: &Block, file: &str) -> bool {
    block.lang == "sh"
        && !block.no_run
        && block
            .text
            .lines()
            .any(|l| l.contains("needle run") && l.contains(file))
}

/// Cheap to run here: every step an `exec` of python3, sh or bash.
fn cheap(recipe: &str) -> bool {
    let t: toml::Table = recipe.parse().unwrap();
    let Some(steps) = t.get("steps").and_then(|s| s.as_table()) else {
        return false;
    };
    steps.values().all(|s| {
        s.get("op").and_then(|o| o.as_str()) == Some("exec")
            && s.get("cmd")
                .and_then(|c| c.as_array())
                .and_then(|c| c.first())
                .and_then(|p| p.as_str())
                .is_some_and(|p| ["python3", "sh", "bash"].contains(&p))
    })
}

/// A `needle.toml` block: the runner reads it whole (unknown keys are refused) even when the
/// command line then chooses the local executor.
fn check_config(block: &Block, config: &Path) {
    let dir = config.parent().unwrap();
    std::fs::write(
        dir.join("tiny.toml"),
        "[recipe]\nname = \"tiny\"\n[steps.a]\nop = \"exec\"\ncmd = [\"true\"]\n",
    )
    .unwrap();
    let out = reader_command(bin().to_str().unwrap())
        .current_dir(dir)
        .env("NEEDLE_STORE", dir.join("store"))
        .args(["run", "tiny.toml", "--executor", "local", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: the config is refused\n{}\n--- stderr\n{}",
        block.at,
        block.text,
        stderr(&out)
    );
}

/// The subcommands of `needle`, and the long flags of each (global ones under "").
fn cli() -> &'static BTreeMap<String, BTreeSet<String>> {
    static CLI: std::sync::OnceLock<BTreeMap<String, BTreeSet<String>>> =
        std::sync::OnceLock::new();
    CLI.get_or_init(|| {
        let help = |args: &[&str]| {
            let out = std::process::Command::new(bin())
                .args(args)
                .arg("--help")
                .output()
                .unwrap();
            assert!(out.status.success());
            stdout(&out)
        };
        let top = help(&[]);
        let mut cli = BTreeMap::new();
        cli.insert(String::new(), long_flags(&top));
        let commands = top
            .split("Commands:")
            .nth(1)
            .and_then(|rest| rest.split("Options:").next())
            .expect("needle --help lists its commands");
        for line in commands.lines() {
            // "  run          Run a recipe…"; continuation lines are indented further.
            if line.starts_with("  ") && !line.starts_with("   ") {
                let name = line.split_whitespace().next().unwrap();
                if name != "help" {
                    cli.insert(name.to_string(), long_flags(&help(&[name])));
                }
            }
        }
        cli
    })
}

/// The long flags a `--help` text lists in its options.
fn long_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix('-')
                .filter(|l| !l.starts_with('-'))
                .map_or(line, |l| l.get(3..).unwrap_or(""));
            let flag = line.strip_prefix("--")?;
            let end = flag
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(flag.len());
            Some(format!("--{}", &flag[..end]))
        })
        .collect()
}

fn make_targets() -> BTreeSet<String> {
    read(Path::new("Makefile"))
        .lines()
        .filter_map(|l| {
            let (target, _) = l.split_once(':')?;
            let ok = !target.is_empty()
                && target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            ok.then(|| target.to_string())
        })
        .collect()
}

/// Every `needle …` and `make …` command of a `sh` block names a real subcommand, flag or
/// target, whether or not the block runs here.
fn check_commands(block: &Block) {
    let cli = cli();
    let targets = make_targets();
    for line in block.text.lines() {
        let line = line.split(" #").next().unwrap();
        if line.trim_start().starts_with('#') {
            continue;
        }
        for segment in line.split(['&', ';', '|', '(', ')']) {
            let mut words = segment
                .split_whitespace()
                .skip_while(|w| {
                    ["time", "nohup", "exec", "command"].contains(w)
                        || (w.contains('=') && !w.starts_with('-'))
                })
                .peekable();
            match words.next() {
                Some("make") => {
                    for target in words.take_while(|w| !w.starts_with('-') && !w.contains('=')) {
                        assert!(
                            targets.contains(target),
                            "{}: `make {target}`: the Makefile has no such target",
                            block.at
                        );
                    }
                }
                Some(w) if w == "needle" || w.ends_with("/needle") => {
                    let mut sub = None;
                    let mut flags = Vec::new();
                    while let Some(w) = words.next() {
                        if let Some(flag) = w.strip_prefix("--") {
                            let flag = format!("--{}", flag.split('=').next().unwrap());
                            if sub.is_none() && flag == "--store" && !w.contains('=') {
                                words.next();
                            }
                            flags.push(flag);
                        } else if sub.is_none() && !w.starts_with('-') {
                            sub = Some(w.to_string());
                        }
                    }
                    let Some(sub) = sub else { continue };
                    let Some(known) = cli.get(&sub) else {
                        panic!("{}: `needle {sub}`: no such command", block.at);
                    };
                    for flag in flags {
                        assert!(
                            known.contains(&flag) || cli[""].contains(&flag),
                            "{}: `needle {sub} {flag}`: no such flag",
                            block.at
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

#[test]
fn the_readme_opens_with_make_demo_and_make_test() {
    // A contract: the README's first lines are these two commands, and .ci/run runs the second.
    let readme = read(Path::new("README.md"));
    let first = &blocks("README.md", &readme)[0];
    let lines: Vec<&str> = first.text.lines().collect();
    assert_eq!(first.lang, "sh", "{}", first.at);
    assert!(lines[0].starts_with("make demo "), "{}", lines[0]);
    assert!(lines[1].starts_with("make test "), "{}", lines[1]);
    let before: Vec<&str> = readme
        .lines()
        .take_while(|l| !l.starts_with("```"))
        .collect();
    assert!(
        before.iter().all(|l| l.is_empty() || l.starts_with("# ")),
        "only the title comes before the two commands: {before:?}"
    );
    assert!(read(Path::new(".ci/run")).contains("make test"));
}

/// Follow every page whose path `belongs`, each in a session of its own, side by side: much
/// of a page's time is spent waiting (a retry's back-off), and a panic in one thread fails
/// the test with that page's message.
fn follow_pages(belongs: impl Fn(&Path) -> bool) {
    std::thread::scope(|scope| {
        for page in pages().into_iter().filter(|p| belongs(p)) {
            scope.spawn(move || {
                let md = read(&page);
                let page = page.display().to_string();
                let dir = session_dir();
                let mut session = Session::new(dir.path());
                session.follow(&blocks(&page, &md));
            });
        }
    });
}

// The pages in four groups, so that the test harness follows them side by side. Together
// they are every page: the top level, the tutorials, the how-tos, and the rest of docs/.

#[test]
fn the_blocks_of_the_top_level_pages_work() {
    follow_pages(|p| !p.starts_with("docs"));
}

#[test]
fn the_blocks_of_the_tutorials_work() {
    follow_pages(|p| p.starts_with("docs/tutorials"));
}

#[test]
fn the_blocks_of_the_how_tos_work() {
    follow_pages(|p| p.starts_with("docs/how-to"));
}

#[test]
fn the_blocks_of_the_other_docs_work() {
    follow_pages(|p| {
        p.starts_with("docs") && !p.starts_with("docs/tutorials") && !p.starts_with("docs/how-to")
    });
}

/// The README's "Your own script in five minutes", as its own blocks.
fn five_minute_tutorial() -> Vec<Block> {
    let readme = read(Path::new("README.md"));
    let start = readme
        .find("\n## Your own script in five minutes")
        .expect("the README has the five-minute tutorial");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    // Line numbers in messages count from the README's first line.
    let offset = readme[..start + 1].lines().count();
    blocks("README.md", &rest[..end])
        .into_iter()
        .map(|mut b| {
            let line: usize = b.at.rsplit(':').next().unwrap().parse().unwrap();
            b.at = format!("README.md:{}", line + offset);
            b
        })
        .collect()
}

#[test]
fn the_five_minute_tutorial_works_followed_literally_in_an_empty_directory() {
    let tutorial = five_minute_tutorial();
    let dir = tempfile::tempdir().unwrap();
    let mut session = Session::new(dir.path());
    session.follow(&tutorial);

    // Where the tutorial left the reader: its project directory, with its store.
    let project = session.cwd.clone();
    let needle = |args: &[&str]| {
        let out = reader_command(bin().to_str().unwrap())
            .current_dir(&project)
            .args(args)
            .output()
            .unwrap();
        assert_code(&out, 0);
        out
    };
    let runs: Value = serde_json::from_slice(&needle(&["runs", "--json"]).stdout).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(
        runs.len(),
        2,
        "the tutorial runs the recipe twice: {runs:?}"
    );
    assert_eq!(runs[0]["executed"], 6, "the first run trains every arm");
    assert_eq!(runs[1]["executed"], 0, "the second run executes nothing");
    assert_eq!(runs[1]["cached"], 6, "…every step is cached");

    // What it says each command shows.
    let printed = |command: &str| -> String {
        let (_, out) = session
            .outputs
            .iter()
            .find(|(b, _)| b.text.contains(command))
            .unwrap_or_else(|| panic!("the tutorial runs `{command}`"));
        stdout(out)
    };
    assert!(printed("needle plan").contains("6 to run"));
    let results = printed("needle results last");
    assert_eq!(
        results.lines().filter(|l| l.starts_with("train ")).count(),
        6,
        "a row per arm:\n{results}"
    );
    assert!(results.contains("loss"), "{results}");
    assert!(project.join("report-2.html").is_file());
    let exported: BTreeSet<String> = std::fs::read_dir(project.join("model"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        exported,
        BTreeSet::from(["metrics.json".to_string(), "model.json".to_string()])
    );
}

#[test]
fn the_tutorial_files_are_the_examples() {
    // The README shows the files whole; examples/own-script holds the same bytes, so the
    // tutorial can be followed with `cp` and the pages that build on it start from them.
    let files: Vec<Block> = five_minute_tutorial()
        .into_iter()
        .filter(|b| b.file.is_some())
        .collect();
    let names: Vec<&str> = files.iter().map(|b| b.file.as_deref().unwrap()).collect();
    assert_eq!(names, ["train.py", "recipe.toml"]);
    for block in &files {
        let example = Path::new("examples/own-script").join(block.file.as_ref().unwrap());
        assert_eq!(
            block.text,
            read(&example),
            "{} differs from {}",
            block.at,
            example.display()
        );
    }
}

/// `docs/reference/ops.md`, as `needle ops --json` describes the ops.
fn ops_reference(ops: &Value) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut md = String::from(
        "# Ops reference\n\n\
         <!-- Generated from `needle ops --json` by tests/e2e/docs.rs: do not edit by hand.\n     \
         Regenerate with `make docs` (UPDATE_DOCS=1 cargo test --test e2e docs::). -->\n\n\
         Every op a recipe can use, with its inputs and params. What the built-in ops compute,\n\
         the datasets they exchange and how they run: [built-in ops](builtin-ops.md). The\n\
         `exec` op's contract: [the exec environment](exec.md).\n\n",
    );
    let ops = ops.as_array().expect("needle ops --json is a list");
    md.push_str("| op | version | what it does |\n|---|---:|---|\n");
    for op in ops {
        let name = op["name"].as_str().unwrap();
        md.push_str(&format!(
            "| [`{name}`](#{name}) | {} | {} |\n",
            op["version"],
            cell(op["summary"].as_str().unwrap())
        ));
    }
    for op in ops {
        let name = op["name"].as_str().unwrap();
        md.push_str(&format!(
            "\n## {name}\n\nVersion {}: {}.\n\n",
            op["version"],
            op["summary"].as_str().unwrap()
        ));
        match &op["inputs"] {
            Value::Array(inputs) if inputs.is_empty() => md.push_str("Inputs: none.\n\n"),
            Value::Array(inputs) => {
                md.push_str("| input | required | what it is |\n|---|---|---|\n");
                for i in inputs {
                    md.push_str(&format!(
                        "| `{}` | {} | {} |\n",
                        i["name"].as_str().unwrap(),
                        if i["required"] == true { "yes" } else { "no" },
                        cell(i["doc"].as_str().unwrap())
                    ));
                }
                md.push('\n');
            }
            _ => md.push_str(
                "Inputs: any names (each reaches the command as `NEEDLE_IN_<NAME>`).\n\n",
            ),
        }
        match &op["params"] {
            Value::Array(params) if params.is_empty() => md.push_str("Params: none.\n"),
            Value::Array(params) => {
                md.push_str("| param | type | default | what it does |\n|---|---|---|---|\n");
                for p in params {
                    let default = if p["required"] == true {
                        "required".to_string()
                    } else {
                        format!("`{}`", p["default"])
                    };
                    md.push_str(&format!(
                        "| `{}` | {} | {default} | {} |\n",
                        p["name"].as_str().unwrap(),
                        cell(p["type"].as_str().unwrap()),
                        cell(p["doc"].as_str().unwrap())
                    ));
                }
            }
            _ => md.push_str(
                "Params: any names and values (each reaches the command as `NEEDLE_PARAM_<NAME>`).\n",
            ),
        }
    }
    md
}

#[test]
fn the_ops_reference_is_what_needle_ops_says() {
    let out = std::process::Command::new(bin())
        .args(["ops", "--json"])
        .output()
        .unwrap();
    assert_code(&out, 0);
    let want = ops_reference(&serde_json::from_slice(&out.stdout).unwrap());
    let path = repo().join("docs/reference/ops.md");
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/reference/ops.md is not what `needle ops --json` says (an op changed?): \
         regenerate it with `make docs`"
    );
}

/// The sections of a page by heading text (`## needle run` → its text up to the next
/// heading of the same or a higher level).
fn sections(md: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            current = Some(line.trim_start_matches('#').trim().replace('`', ""));
        }
        if let Some(c) = &current {
            let text = out.entry(c.clone()).or_default();
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}

#[test]
fn the_cli_reference_has_every_command_and_flag() {
    let md = read(Path::new("docs/reference/cli.md"));
    let sections = sections(&md);
    for (sub, flags) in cli() {
        let heading = if sub.is_empty() {
            "Global options".to_string()
        } else {
            format!("needle {sub}")
        };
        let Some(text) = sections.get(&heading) else {
            panic!("docs/reference/cli.md has no section `{heading}`");
        };
        for flag in flags {
            if sub.is_empty() || !cli()[""].contains(flag) {
                assert!(
                    text.contains(&format!("`{flag}")),
                    "docs/reference/cli.md: `{heading}` does not describe `{flag}`"
                );
            }
        }
    }
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(md: &str) -> BTreeSet<String> {
    sections(md).keys().map(|h| slug(h)).collect()
}

#[test]
fn every_link_between_pages_resolves() {
    for page in pages() {
        let md = read(&page);
        let mut fenced = false;
        for (n, line) in md.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
            }
            if fenced {
                continue;
            }
            // Code spans may hold brackets and parentheses that are no link.
            let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
            for target in prose.split("](").skip(1) {
                let target = target.split(')').next().unwrap();
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
                let linked = if file.is_empty() {
                    page.clone()
                } else {
                    page.parent().unwrap().join(file)
                };
                let at = format!("{}:{}", page.display(), n + 1);
                let path = repo().join(&linked);
                assert!(path.exists(), "{at}: `{target}` links to nothing");
                if !anchor.is_empty() {
                    assert!(
                        anchors(&read(&linked)).contains(anchor),
                        "{at}: `{target}`: no heading `#{anchor}` in {}",
                        linked.display()
                    );
                }
            }
        }
    }
}

#[test]
fn the_glossary_defines_its_words() {
    let glossary = read(Path::new("docs/glossary.md"));
    for word in [
        "arm", "instance", "gather", "key", "id", "digest", "view", "pin",
    ] {
        assert!(
            glossary.contains(&format!("**{word}**")),
            "docs/glossary.md does not define `{word}`"
        );
    }
}
