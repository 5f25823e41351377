//! Arbitrary bytes as a recipe file: reading, parsing, validation, sweep expansion, planning
//! and the rendering of every error must never panic, whatever the bytes; libFuzzer's
//! `-timeout` and `-rss_limit_mb` (see `scripts/fuzz.sh`) bound the time and memory of one
//! input. No store and no process: planning only hashes `code` files.
//!
//! Leading lines `#set var=value` (TOML comments, so the rest of the file is unchanged) become
//! `--set` arguments, so the fuzzer reaches the `--set` checks too.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use needle_core::digest::ArtifactDigest;
use needle_core::plan::{self, HashOnly};
use needle_core::recipe::{self, RecipeErrors, RecipeSource, SetArg};
use needle_core::value::Value;
use needle_ops::Registry;

fuzz_target!(|data: &[u8]| check(data));

fn check(data: &[u8]) {
    let registry = registry();
    let source =
        match RecipeSource::from_bytes(PathBuf::from("fuzz.toml"), dir().into(), data.to_vec()) {
            Ok(s) => s,
            Err(errors) => return render(&errors),
        };
    let sets = sets(&source.text);
    let recipe = match recipe::parse(source, &sets, registry) {
        Ok(r) => r,
        Err(errors) => return render(&errors),
    };
    let expansion = match recipe::expand(&recipe, registry) {
        Ok(e) => e,
        Err(errors) => return render(&errors),
    };
    for step in &recipe.steps {
        for attempt in 1..=step.retries.count.saturating_add(1).min(40) {
            let _ = step.retries.delay_before(attempt);
        }
    }
    // Planning fingerprints what a `path` param names, following it: on `/` that walks the
    // whole filesystem, slow by design. Only paths inside the fixture directory are planned.
    let outside = expansion.instances.iter().any(|inst| {
        recipe.steps[inst.step].path_params.iter().any(|p| {
            matches!(inst.params.get(p), Some(Value::String(s))
                if s.starts_with('/') || s.split('/').any(|c| c == ".."))
        })
    });
    if outside {
        return;
    }
    // Code files may vanish or be unreadable: an error, never a panic.
    let Ok(plan) = plan::build(recipe, expansion, &mut HashOnly) else {
        return;
    };
    let _ = plan.graph();
    for (i, node) in plan.nodes.iter().enumerate() {
        assert!(
            node.inputs
                .values()
                .all(|input| input.nodes().iter().all(|&u| u < i))
        );
        let spec = node
            .spec(|u| Some(ArtifactDigest::of_parts(&[&u.to_le_bytes()])))
            .expect("every input has an output");
        let _ = spec.key();
        let _ = node.display_name();
    }
}

/// Every rendering of the errors a user or a script may see.
fn render(errors: &RecipeErrors) {
    assert!(!errors.errors.is_empty(), "an error value holds an error");
    let _ = errors.render_plain();
    let _ = errors.to_json();
    // The terminal's rendering, of the first few errors only: every label is drawn by
    // scanning the source from its start, which would take most of the fuzzer's time; a few
    // are enough to check that each span is one the renderer accepts.
    let mut few = errors.clone();
    few.errors.truncate(5);
    let mut out = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut out, &few)
        .expect("renders into a string");
}

/// `#set var=value` lines at the top of the text.
fn sets(text: &str) -> Vec<SetArg> {
    text.lines()
        .map_while(|l| l.strip_prefix("#set "))
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

/// A recipe directory with a few files for `code` and `path` params to name: `gen.py`,
/// `lib/util.py`, `data/a.txt`, a symlink leading outside (`escape`) and a symlink loop
/// (`loop/self`). One per process.
fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("needle-fuzz-{}", std::process::id()));
        let dir = root.join("project");
        for sub in ["lib", "data", "loop"] {
            std::fs::create_dir_all(dir.join(sub)).expect("a fuzz fixture dir");
        }
        std::fs::write(dir.join("gen.py"), "print(1)\n").expect("fixture");
        std::fs::write(dir.join("lib/util.py"), "x = 1\n").expect("fixture");
        std::fs::write(dir.join("data/a.txt"), "a\n").expect("fixture");
        std::fs::write(root.join("secret.txt"), "outside\n").expect("fixture");
        let _ = std::os::unix::fs::symlink("../secret.txt", dir.join("escape"));
        let _ = std::os::unix::fs::symlink(".", dir.join("loop/self"));
        dir
    })
}
