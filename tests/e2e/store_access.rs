//! Stores that cannot be used as they are: on a read-only filesystem (readable, not
//! writable), missing, not a store at all, or damaged where the lock lives. Each is "the store
//! is unavailable" (exit 3) for what it cannot do, never a step failure (exit 1) or success.

use crate::common::*;

fn recipe(p: &Project) {
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "ro"

[steps.make]
op = "exec"
cmd = ["sh", "-c", "echo made > \"$NEEDLE_OUT/v\"; echo said it"]
"#,
    );
}

#[test]
fn a_store_on_a_read_only_filesystem_can_be_read_not_written() {
    let p = Project::new();
    recipe(&p);
    p.json(&["run", "recipe.toml"], 0);
    let ro = p.path("ro");
    let Some(_mount) = ReadOnlyMount::of(p.dir.path(), &ro) else {
        return;
    };
    let store = ro.join(".needle");
    let store = store.to_str().unwrap();
    let read = |args: &[&str]| {
        let mut all = vec!["--store", store];
        all.extend_from_slice(args);
        p.needle(&all)
    };
    for args in [
        &["runs"][..],
        &["status", "last"],
        &["show", "last:make"],
        &["lineage", "last:make"],
        &["logs", "last:make"],
        &["results", "last"],
    ] {
        let out = read(args);
        assert_code(&out, 0);
    }
    assert!(stdout(&read(&["logs", "last:make"])).contains("said it"));
    let exported = p.path("exported");
    let out = read(&["export", "last:make", exported.to_str().unwrap()]);
    assert_code(&out, 0);
    assert_eq!(
        std::fs::read_to_string(exported.join("v")).unwrap(),
        "made\n"
    );
    for args in [&["run", "recipe.toml"][..], &["gc"], &["verify"]] {
        let out = read(args);
        assert_code(&out, 3);
        assert!(
            stderr(&out).contains("is on a read-only filesystem: it can be read"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn no_store_at_all_is_unavailable() {
    let p = Project::new();
    p.write("elsewhere/notes.txt", "mine");
    let cases = [
        ("missing", "no store at"),
        ("elsewhere", "is not empty and is not a needle store"),
        (
            "elsewhere/notes.txt",
            "is not empty and is not a needle store",
        ),
    ];
    for (path, says) in cases {
        let store = p.path(path);
        for cmd in [&["runs"][..], &["status", "last"]] {
            let mut args = vec!["--store", store.to_str().unwrap()];
            args.extend_from_slice(cmd);
            let out = p.needle(&args);
            assert_code(&out, 3);
            assert!(stderr(&out).contains(says), "{path}: {}", stderr(&out));
        }
    }
    assert_eq!(
        std::fs::read_to_string(p.path("elsewhere/notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn a_store_whose_lock_cannot_be_opened_is_unavailable() {
    let p = Project::new();
    recipe(&p);
    p.json(&["run", "recipe.toml"], 0);
    let lock = p.store().join("lock");
    std::fs::remove_file(&lock).unwrap();
    std::fs::create_dir(&lock).unwrap();
    for args in [&["run", "recipe.toml"][..], &["status", "last"], &["gc"]] {
        let out = p.needle(args);
        assert_code(&out, 3);
        assert!(stderr(&out).contains("lock"), "{}", stderr(&out));
    }
}
