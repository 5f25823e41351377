//! `needle verify --rebuild`: a store whose `meta/` is deleted or damaged answers every
//! question as before once rebuilt from its journal, and a store whose runner was killed at
//! any point of a run rebuilds, verifies, and finishes as an uninterrupted run would.

use std::fs;

use serde_json::Value;

use crate::common::*;

const RECIPE: &str = r#"
[recipe]
name = "rebuild"

[sweep]
i = [1, 2, 3]

[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo a${i} > \"$NEEDLE_OUT/v\""]

[steps.b]
op = "exec"
inputs = { a = "a" }
cmd = ["sh", "-c", "cat \"$NEEDLE_IN_A/v\" > \"$NEEDLE_OUT/v\"; echo b >> \"$NEEDLE_OUT/v\""]

[steps.all]
op = "exec"
inputs = { bs = "b[*]" }
cmd = ["sh", "-c", "cat \"$NEEDLE_IN_BS\"/*/v > \"$NEEDLE_OUT/all\""]
"#;

/// A second recipe sharing `a`, with a step that fails.
const FAILING: &str = r#"
[recipe]
name = "failing"

[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo a2 > \"$NEEDLE_OUT/v\""]

[steps.bad]
op = "exec"
inputs = { a = "a" }
cmd = ["sh", "-c", "exit 3"]
"#;

/// Two runs and a pin; the answers of the read-only commands about them.
fn history(p: &Project) -> Vec<(String, Value)> {
    p.write("recipe.toml", RECIPE);
    p.write("failing.toml", FAILING);
    p.json(&["run", "recipe.toml"], 0);
    p.json(&["run", "failing.toml"], 1);
    assert_code(&p.needle(&["pin", "1:all"]), 0);
    answers(p)
}

fn answers(p: &Project) -> Vec<(String, Value)> {
    let questions: [&[&str]; 8] = [
        &["runs"],
        &["status", "1"],
        &["status", "2"],
        &["show", "1:all"],
        &["show", "1:b[i=2]"],
        &["lineage", "1:all"],
        &["lineage", "2:a"],
        &["pin"],
    ];
    questions
        .iter()
        .map(|q| (q.join(" "), p.json(q, 0)))
        .collect()
}

/// `verify --rebuild` succeeds, saying what it restored; its output.
fn rebuild(p: &Project) -> String {
    let out = p.needle(&["verify", "--rebuild"]);
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains("rebuilt the store's metadata from its journal"),
        "{text}"
    );
    assert!(text.contains("the store is consistent"), "{text}");
    text
}

/// Every command refuses the store, pointing at the rebuild.
fn refused(p: &Project) {
    for q in [&["runs"][..], &["status", "last"], &["run", "recipe.toml"]] {
        let out = p.needle(q);
        assert_code(&out, 3);
        assert!(
            stderr(&out).contains("needle verify --rebuild"),
            "{q:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn a_deleted_meta_is_rebuilt_and_every_answer_is_as_before() {
    let p = Project::new();
    let before = history(&p);
    fs::remove_dir_all(p.store().join("meta")).unwrap();
    refused(&p);

    let text = rebuild(&p);
    assert!(
        text.contains("restored 7 steps, 7 artifacts, 2 runs, 1 pins"),
        "{text}"
    );
    assert!(text.contains("there was no old metadata to keep"), "{text}");
    assert_eq!(answers(&p), before);
    let again = p.json(&["run", "recipe.toml"], 0);
    assert_eq!(again["executed"], 0, "{again}");
    assert_eq!(again["cached"], 7, "{again}");
    assert_code(&p.needle(&["verify", "--hash"]), 0);
}

#[test]
fn damaged_meta_files_are_rebuilt_and_kept_aside() {
    let p = Project::new();
    let before = history(&p);
    let meta = p.store().join("meta");
    for entry in fs::read_dir(&meta).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            let len = entry.metadata().unwrap().len().max(1) as usize;
            fs::write(entry.path(), vec![0x5a; len]).unwrap();
        }
    }
    refused(&p);
    let out = p.needle(&["runs"]);
    assert!(stderr(&out).contains("cannot be read"), "{}", stderr(&out));

    let text = rebuild(&p);
    assert!(text.contains("the old metadata is kept in"), "{text}");
    let aside: Vec<_> = fs::read_dir(p.store())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("meta.broken-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(answers(&p), before);
    assert_eq!(p.json(&["run", "recipe.toml"], 0)["executed"], 0);
    assert_code(&p.needle(&["verify", "--hash"]), 0);
    let before = answers(&p);
    // A store whose journal is gone and whose metadata is whole gets a journal again.
    fs::remove_dir_all(p.store().join("journal")).unwrap();
    let out = p.needle(&["verify", "--rebuild"]);
    assert_code(&out, 3);
    assert!(stderr(&out).contains("has no journal"), "{}", stderr(&out));
    assert_code(&p.needle(&["verify"]), 0);
    fs::remove_dir_all(p.store().join("meta")).unwrap();
    rebuild(&p);
    assert_eq!(answers(&p), before);
}

#[test]
fn a_store_from_before_the_journal_is_upgraded_by_its_first_command() {
    let p = Project::new();
    let before = history(&p);
    // What a format-1 needle leaves: no journal, `needle-store 1`. (Its sled also holds no
    // journal position: an upgrade does not need one to be absent.)
    fs::remove_dir_all(p.store().join("journal")).unwrap();
    fs::write(p.store().join("FORMAT"), "needle-store 1\n").unwrap();
    let out = p.needle(&["verify", "--rebuild"]);
    assert_code(&out, 3);
    assert!(stderr(&out).contains("kept none"), "{}", stderr(&out));
    assert_eq!(answers(&p), before);
    assert_eq!(
        fs::read_to_string(p.store().join("FORMAT")).unwrap(),
        "needle-store 2\n"
    );
    fs::remove_dir_all(p.store().join("meta")).unwrap();
    rebuild(&p);
    assert_eq!(answers(&p), before);
}

/// Each step waits, once started, for the test's go-ahead, numbered by the order steps start
/// in (`-j 1`: one at a time): the test can stop the runner with exactly so many steps done.
const GATED: &str = r#"
[recipe]
name = "gated"

[sweep]
i = [1, 2, 3, 4, 5, 6, 7, 8]

[steps.work]
op = "exec"
cmd = ["sh", "-c", "cd \"$NEEDLE_RECIPE_DIR\"; n=$(cat started 2>/dev/null | wc -l); echo ${i} >> started; while [ ! -e go-$n ]; do sleep 0.005; done; seq 1 ${i}00 > \"$NEEDLE_OUT/data\""]

[steps.total]
op = "exec"
inputs = { parts = "work[*]" }
cmd = ["sh", "-c", "cd \"$NEEDLE_RECIPE_DIR\"; echo total >> started; while [ ! -e go-8 ]; do sleep 0.005; done; cat \"$NEEDLE_IN_PARTS\"/*/data | wc -l > \"$NEEDLE_OUT/total\""]
"#;

/// The runner SIGKILLed at every point of a gated run: with k steps let through and step k
/// waiting (the kill lands in the step), or at once after letting step k through (it lands in
/// the step's exit, its commit, or, after the last, the run's end). Each time `meta/` is
/// deleted and rebuilt from the journal; the store verifies, and the next run reaches the
/// digests of an uninterrupted one.
#[test]
fn a_runner_killed_anywhere_leaves_a_journal_that_rebuilds_a_whole_store() {
    let reference = Project::new();
    reference.write("recipe.toml", GATED);
    for n in 0..9 {
        reference.write(&format!("go-{n}"), "");
    }
    let want = outputs(&reference.json(&["run", "recipe.toml", "-j", "1"], 0));
    assert_eq!(want.len(), 9);

    // Steps the rebuilt stores had from the killed runs, in all.
    let mut cached = 0;
    for point in 0..=17 {
        let (let_through, wait_for_next) = (point / 2, point % 2 == 0);
        let p = Project::new();
        p.write("recipe.toml", GATED);
        let mut child = p
            .background(&["run", "recipe.toml", "-j", "1"])
            .spawn()
            .unwrap();
        for n in 0..let_through {
            wait_for(
                "a step to start",
                std::time::Duration::from_secs(60),
                || p.lines("started").len() > n,
            );
            p.write(&format!("go-{n}"), "");
        }
        if wait_for_next {
            wait_for(
                "the next step to start",
                std::time::Duration::from_secs(60),
                || p.lines("started").len() > let_through,
            );
        }
        // SAFETY: SIGKILL to the child we spawned.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let status = child.wait().unwrap();
        if wait_for_next {
            assert_eq!(
                status.code(),
                None,
                "point {point}: the run was waiting on a step"
            );
        }

        // Killed before the store's journal was made (the first point), there is nothing to
        // rebuild: the next run makes the store.
        if p.store().join("journal").join("log").exists() {
            fsutil_remove(&p.store().join("meta"));
            let out = p.needle(&["verify", "--rebuild", "--hash"]);
            assert_code(&out, 0);
            assert!(
                stdout(&out).contains("the store is consistent"),
                "point {point}: {}",
                stdout(&out)
            );
        }
        // The next run's steps count from 0 again, and go at once.
        fsutil_remove_file(&p.path("started"));
        for n in 0..9 {
            p.write(&format!("go-{n}"), "");
        }
        let run = p.json(&["run", "recipe.toml", "-j", "1"], 0);
        cached += run["cached"].as_u64().unwrap();
        assert_eq!(outputs(&run), want, "point {point}");
        assert_code(&p.needle(&["verify", "--hash"]), 0);
    }
    assert!(cached > 0, "no committed step came back from a journal");
}

/// Remove a directory if it is there.
fn fsutil_remove(dir: &std::path::Path) {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
        _ => {}
    }
}

fn fsutil_remove_file(file: &std::path::Path) {
    match fs::remove_file(file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
        _ => {}
    }
}
