//! `needle verify`: a healthy store passes; a blob damaged behind the store's back is found and
//! named (by size, or with `--hash` by content).

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

#[test]
fn verify_passes_a_healthy_store_and_names_a_damaged_blob() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "verify"
[steps.a]
op = "exec"
cmd = ["sh", "-c", "echo hello > \"$NEEDLE_OUT/greeting\"; echo world > \"$NEEDLE_OUT/other\""]
[steps.b]
op = "exec"
cmd = ["sh", "-c", "echo hello > \"$NEEDLE_OUT/same-bytes\""]
"#,
    );
    p.json(&["run", "recipe.toml"], 0);
    let ok = p.needle(&["verify", "--hash"]);
    assert_code(&ok, 0);
    assert!(
        stdout(&ok).contains("the store is consistent"),
        "{}",
        stdout(&ok)
    );

    // Flip one byte of a blob, keeping its size: only hashing can tell.
    let show = p.json(&["show", "last:a"], 0);
    let view = std::path::PathBuf::from(show["view"].as_str().unwrap());
    let blob = std::fs::canonicalize(view.join("greeting")).unwrap();
    let blob = if blob.starts_with(p.store().join("blobs")) {
        blob
    } else {
        // Views hold hard links: find the blob by its inode.
        find_blob(&p.store().join("blobs"), &view.join("greeting"))
    };
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, "jello\n").unwrap();
    assert_code(&p.needle(&["verify"]), 0);
    let bad = p.needle(&["verify", "--hash"]);
    assert_code(&bad, 1);
    let text = stdout(&bad);
    assert!(text.contains("hash otherwise; used by"), "{text}");
    // One blob, two artifacts: both are named.
    assert!(
        text.contains("`greeting` of artifact") && text.contains("`same-bytes` of artifact"),
        "{text}"
    );

    // Truncate it: the sizes alone tell.
    std::fs::write(&blob, "j").unwrap();
    let bad = p.needle(&["verify"]);
    assert_code(&bad, 1);
    assert!(
        stdout(&bad).contains("but 1 are on disk"),
        "{}",
        stdout(&bad)
    );
}

fn find_blob(blobs: &std::path::Path, file: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(file).unwrap().ino();
    let mut stack = vec![blobs.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            if m.is_dir() {
                stack.push(path);
            } else if m.ino() == ino {
                return path;
            }
        }
    }
    panic!("no blob shares {}'s inode", file.display());
}

/// A file put into `blobs/` by hand under the name of a step's future output, made to look as
/// the store leaves a blob (its size, read-only, the store's time), does not stand in for the
/// step's fresh bytes: the store hashes it once before trusting it, and replaces it.
#[test]
fn a_blob_planted_before_its_producer_runs_is_not_trusted() {
    use std::os::unix::fs::PermissionsExt;
    let recipe = r#"
[recipe]
name = "planted"

[steps.make]
op = "exec"
cmd = ["sh", "-c", "echo 'the real bytes' > \"$NEEDLE_OUT/v\""]
"#;
    // Where the output's blob goes, learnt in a store of its own.
    let scout = Project::new();
    scout.write("recipe.toml", recipe);
    let run = scout.json(&["run", "recipe.toml"], 0);
    let artifact = steps_named(&run, "make")[0]["output"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = scout.json(&["show", &artifact], 0)["files"][0]["blob"]
        .as_str()
        .unwrap()
        .to_string();

    let p = Project::new();
    p.write("recipe.toml", recipe);
    // Create the store (a run of nothing else), then plant.
    p.write(
        "empty.toml",
        "[recipe]\nname = \"empty\"\n[steps.x]\nop = \"exec\"\ncmd = [\"true\"]\n",
    );
    p.json(&["run", "empty.toml"], 0);
    let planted = p.store().join("blobs").join(&blob[..2]).join(&blob[2..]);
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    std::fs::write(&planted, "the fake bytes\n").unwrap();
    let file = std::fs::File::options().write(true).open(&planted).unwrap();
    file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(946_684_800))
        .unwrap();
    drop(file);
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o444)).unwrap();

    p.json(&["run", "recipe.toml"], 0);
    let out = p.path("exported");
    let export = p.needle(&["export", "last:make", out.to_str().unwrap()]);
    assert_code(&export, 0);
    assert_eq!(
        std::fs::read_to_string(out.join("v")).unwrap(),
        "the real bytes\n"
    );
    assert_code(&p.needle(&["verify", "--hash"]), 0);
}
