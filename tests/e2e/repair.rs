//! Damaged blobs: `needle verify --repair` drops them and what they make untrue; a run checks
//! the inputs of every step it executes and executes the producer of a damaged one again.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::*;
use crate::gc::CHAIN;

/// Flip a byte of the blob holding `file` of `reference`'s output, behind the store's back
/// (blobs are 0444: chmod, write in place, so every hard link to it sees the change).
pub(crate) fn damage(p: &Project, reference: &str, file: &str) -> PathBuf {
    let show = p.json(&["show", reference], 0);
    let view = PathBuf::from(show["view"].as_str().unwrap());
    let blob = find_blob(&p.store().join("blobs"), &view.join(file));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 0x01;
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, bytes).unwrap();
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o444)).unwrap();
    blob
}

fn find_blob(blobs: &Path, file: &Path) -> PathBuf {
    let ino = std::fs::metadata(file).unwrap().ino();
    for fanout in std::fs::read_dir(blobs).unwrap().flatten() {
        for e in std::fs::read_dir(fanout.path()).unwrap().flatten() {
            if e.metadata().unwrap().ino() == ino {
                return e.path();
            }
        }
    }
    panic!("no blob shares {}'s inode", file.display());
}

fn output(run: &Value, step: &str) -> String {
    steps_named(run, step)[0]["output"]
        .as_str()
        .unwrap()
        .to_string()
}

fn status(run: &Value, step: &str) -> String {
    steps_named(run, step)[0]["status"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn verify_repair_drops_a_damaged_blob_and_the_next_run_executes_its_producers() {
    let p = Project::new();
    p.write("chain.toml", CHAIN);
    let first = p.json(&["run", "chain.toml"], 0);
    let blob = damage(&p, "last:hay", "images/1.png");
    assert_code(&p.needle(&["verify", "--hash"]), 1);

    let out = p.needle(&["verify", "--repair"]);
    assert_code(&out, 0);
    let text = stdout(&out);
    let name = blob.file_name().unwrap().to_str().unwrap();
    assert!(
        text.contains("problem: blob") && text.contains("hash otherwise"),
        "{text}"
    );
    assert!(
        text.contains("dropped blob") && text.contains(name),
        "{text}"
    );
    // The haystack and the subset sharing that image; the reader of the subset stays.
    assert_eq!(text.matches("dropped artifact").count(), 2, "{text}");
    assert!(
        text.contains("(hay): its output") && text.contains("(sub): its output"),
        "{text}"
    );
    assert!(!text.contains("(use)"), "{text}");
    assert!(text.contains("repaired: the store is consistent"), "{text}");
    assert!(!blob.exists());
    let out = p.needle(&["verify", "--hash"]);
    assert_code(&out, 0);
    assert!(
        stdout(&out).contains("2 output(s) of recorded runs were dropped"),
        "{}",
        stdout(&out)
    );
    let again = p.needle(&["verify", "--repair"]);
    assert_code(&again, 0);
    assert!(
        stdout(&again).contains("nothing to repair"),
        "{}",
        stdout(&again)
    );

    // The next run executes hay and sub again; their bytes are as before, so use is cached.
    std::fs::remove_file(p.path("ran")).unwrap();
    let next = p.json(&["run", "chain.toml"], 0);
    assert_eq!(p.lines("ran"), ["hay", "sub"]);
    assert_eq!(status(&next, "use"), "cached");
    for step in ["hay", "sub", "use"] {
        assert_eq!(output(&next, step), output(&first, step));
    }
    let out = p.needle(&["verify", "--hash"]);
    assert_code(&out, 0);
    assert!(!stdout(&out).contains("dropped"), "{}", stdout(&out));
}

#[test]
fn a_run_executes_the_producer_of_a_damaged_input_again() {
    // The digests an undamaged store reaches.
    let clean = Project::new();
    clean.write("chain.toml", CHAIN);
    clean.json(&["run", "chain.toml"], 0);
    let reference = clean.json(&["run", "chain.toml", "--set", "v=2"], 0);

    let p = Project::new();
    p.write("chain.toml", CHAIN);
    p.json(&["run", "chain.toml"], 0);
    damage(&p, "last:hay", "images/1.png");
    std::fs::remove_file(p.path("ran")).unwrap();
    // v=2: sub executes, reading hay, which is cached and damaged.
    let out = p
        .cmd(&["run", "chain.toml", "--set", "v=2", "--json"])
        .output()
        .unwrap();
    assert_code(&out, 0);
    let err = stderr(&out);
    assert!(err.contains("input `data` of `sub` is damaged"), "{err}");
    assert!(err.contains("executing `hay` again"), "{err}");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        p.lines("ran"),
        ["hay", "sub", "use"],
        "hay executed before sub read it"
    );
    assert_eq!(status(&run, "hay"), "succeeded");
    assert_eq!(run["executed"], 3);
    for step in ["hay", "sub", "use"] {
        assert_eq!(output(&run, step), output(&reference, step), "{step}");
    }
    let status_json = p.json(&["status", "last"], 0);
    assert_eq!(status_json["state"], "succeeded");
    let out = p.needle(&["verify", "--hash"]);
    assert_code(&out, 0);
    // Run 1's subset shared the damaged image: dropped too, known as such.
    assert!(
        stdout(&out).contains("1 output(s) of recorded runs were dropped"),
        "{}",
        stdout(&out)
    );
}
