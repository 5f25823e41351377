//! `needle diff` shows only what differs between two arms' ancestries; `needle export` copies
//! an artifact out as plain, writable files and will not write into a non-empty directory.

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

const RECIPE: &str = r#"
[recipe]
name = "inspect"

[sweep]
size = [100, 1000]

[steps.data]
op = "exec"
cmd = ["sh", "-c", "mkdir -p \"$NEEDLE_OUT/images/a\"; echo pixels > \"$NEEDLE_OUT/images/a/1.png\"; printf '#!/bin/sh\n' > \"$NEEDLE_OUT/run.sh\"; chmod +x \"$NEEDLE_OUT/run.sh\""]

[steps.tune]
op = "exec"
inputs = { data = "data" }
cmd = ["sh", "-c", "echo tuned on ${size} > \"$NEEDLE_OUT/model\""]
params = { size = "${size}" }

[steps.evaluate]
op = "exec"
inputs = { model = "tune" }
cmd = ["sh", "-c", "cat \"$NEEDLE_IN_MODEL/model\" > \"$NEEDLE_OUT/metrics\""]
"#;

#[test]
fn diff_shows_only_what_differs_between_two_arms() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    p.json(&["run", "recipe.toml"], 0);
    let out = p.needle(&[
        "diff",
        "last:evaluate[size=100]",
        "last:evaluate[size=1000]",
    ]);
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("param size changed: 100 → 1000"), "{text}");
    assert!(text.contains("same in both: data"), "{text}");
    assert!(
        !text.contains("input"),
        "input digests are implied, not listed:\n{text}"
    );
    assert!(
        !text.contains("command changed"),
        "the param explains the command:\n{text}"
    );

    let v = p.json(
        &[
            "diff",
            "last:evaluate[size=100]",
            "last:evaluate[size=1000]",
        ],
        0,
    );
    let steps: Vec<&str> = v["differ"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["evaluate", "tune"]);
}

#[test]
fn export_writes_plain_files_into_a_new_directory_only() {
    let p = Project::new();
    p.write("recipe.toml", RECIPE);
    p.json(&["run", "recipe.toml"], 0);
    let dest = p.path("out/data");
    let out = p.needle(&["export", "last:data", dest.to_str().unwrap()]);
    assert_code(&out, 0);
    assert_eq!(
        std::fs::read_to_string(dest.join("images/a/1.png")).unwrap(),
        "pixels\n"
    );
    let mode = |f: &str| {
        std::fs::metadata(dest.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(
        mode("images/a/1.png"),
        0o644,
        "exported files are writable copies"
    );
    // Editing the export leaves the store alone.
    std::fs::write(dest.join("images/a/1.png"), "edited").unwrap();
    let again = p.path("out/again");
    assert_code(
        &p.needle(&["export", "last:data", again.to_str().unwrap()]),
        0,
    );
    assert_eq!(
        std::fs::read_to_string(again.join("images/a/1.png")).unwrap(),
        "pixels\n"
    );

    let out = p.needle(&["export", "last:data", dest.to_str().unwrap()]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
}
