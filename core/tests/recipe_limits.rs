//! Bad input that must not hurt: what the corpus of malformed recipes (`tests/bad-recipes/`)
//! and the fuzz target (`fuzz/`) found, each kept here as a regression test.

use std::path::PathBuf;
use std::time::Duration;

mod common;

use common::catalog;
use needle_core::recipe::{
    MAX_INSTANCES, MAX_RECIPE_BYTES, MAX_SHOWN, RecipeSource, RetryPolicy, expand, parse,
};

fn source(text: &str) -> RecipeSource {
    RecipeSource {
        path: PathBuf::from("r.toml"),
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        text: text.to_string(),
    }
}

fn from_bytes(bytes: &[u8]) -> Result<RecipeSource, String> {
    RecipeSource::from_bytes("r.toml".into(), "/".into(), bytes.to_vec())
        .map_err(|e| e.render_plain())
}

/// Five vars of ten values each: 100,000 arms.
fn five_vars() -> String {
    let ten = (0..10)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    (0..5).map(|i| format!("v{i} = [{ten}]\n")).collect()
}

#[test]
fn bytes_that_are_not_utf8_are_pointed_at() {
    let err = from_bytes(b"[recipe]\nname = \"caf\xe9\"\n").unwrap_err();
    assert_eq!(
        err,
        "r.toml:2:12: error: recipe is not UTF-8: byte `0xe9` starts no character\n  help: recipes are UTF-8 text: save the file as UTF-8\n"
    );
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain("[recipe]".encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    let err = from_bytes(&utf16).unwrap_err();
    assert!(err.starts_with("r.toml:1:1: error:"), "{err}");
    assert!(err.contains("UTF-16 byte-order mark"), "{err}");
    assert!(from_bytes(b"[recipe]\n").is_ok());
}

#[test]
fn a_file_past_the_size_limit_is_refused() {
    let mut bytes = vec![b'#'; MAX_RECIPE_BYTES];
    assert!(from_bytes(&bytes).is_ok());
    bytes.push(b'#');
    let err = from_bytes(&bytes).unwrap_err();
    assert!(
        err.starts_with("r.toml: error: recipe is larger than the limit of 16 MiB"),
        "{err}"
    );
}

/// A generated recipe with one mistake in each of 5,000 steps: every error is counted, the
/// first [`MAX_SHOWN`] shown (rendering them all took minutes: each line:col was found by
/// scanning the file from its start).
#[test]
fn errors_past_the_limit_are_counted_not_shown() {
    let mut text = String::from("[recipe]\nname = \"t\"\n");
    for i in 0..5000 {
        text.push_str(&format!("[steps.s{i}]\nop = \"exce\"\ncmd = [\"x\"]\n"));
    }
    let errors = parse(source(&text), &[], &catalog()).unwrap_err();
    assert_eq!(errors.total, 5000);
    assert_eq!(errors.errors.len(), MAX_SHOWN + 1);
    let plain = errors.render_plain();
    assert!(
        plain.starts_with("r.toml:4:6: error: unknown op `exce`"),
        "{plain}"
    );
    assert!(
        plain.contains("r.toml: error: 4900 more errors not shown"),
        "{plain}"
    );
}

/// 20,000 excludes over 100,000 arms: compared one by one, that took minutes; grouped by the
/// vars they bind, one lookup per arm.
#[test]
fn many_excludes_over_many_arms() {
    let mut text = format!("[recipe]\nname = \"t\"\n[sweep]\n{}", five_vars());
    text.push_str("[steps.a]\nop = \"exec\"\ncmd = [\"x\", \"${v0}${v1}${v2}${v3}${v4}\"]\n");
    for j in 0..20_000 {
        let [a, b, c, d, e] = [j % 10, j / 10 % 10, j / 100 % 10, j / 1000 % 10, j / 10000];
        text.push_str(&format!(
            "[[sweep.exclude]]\nv0 = {a}\nv1 = {b}\nv2 = {c}\nv3 = {d}\nv4 = {e}\n"
        ));
    }
    let recipe = parse(source(&text), &[], &catalog()).unwrap();
    let expansion = expand(&recipe, &catalog()).unwrap();
    assert_eq!(expansion.arms.len(), 80_000);
    assert!(
        expansion
            .arms
            .iter()
            .all(|arm| arm.bindings["v4"].as_i64().unwrap() >= 2)
    );
}

/// Past the instance limit, the sweep is refused from its shape alone: no instance is built.
#[test]
fn too_many_instances_are_refused_before_any_is_built() {
    let mut text = format!("[recipe]\nname = \"t\"\n[sweep]\n{}", five_vars());
    let steps = MAX_INSTANCES / 100_000 + 1;
    for k in 0..steps {
        text.push_str(&format!(
            "[steps.s{k}]\nop = \"exec\"\ncmd = [\"x\", \"{k}\", \"${{v0}}${{v1}}${{v2}}${{v3}}${{v4}}\"]\n"
        ));
    }
    let recipe = parse(source(&text), &[], &catalog()).unwrap();
    let plain = expand(&recipe, &catalog()).unwrap_err().render_plain();
    assert!(
        plain.contains(&format!(
            "error: the sweep makes at least {} step instances, more than the limit of {MAX_INSTANCES}",
            steps * 100_000
        )),
        "{plain}"
    );
}

/// A backoff of a million years doubled: it saturated into a panic (`Duration * u32`
/// overflows) when a step reached its third attempt.
#[test]
fn a_huge_backoff_saturates_at_the_cap() {
    let policy = RetryPolicy {
        count: 40,
        backoff: Duration::from_secs(u64::MAX / 2),
    };
    for attempt in 2..=40 {
        assert_eq!(policy.delay_before(attempt), Duration::from_secs(600));
    }
    assert_eq!(policy.delay_before(1), Duration::ZERO);
}
