//! The store under fault: steps that write into their inputs, blobs changed behind its back,
//! a full disk, stores of other formats.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::*;
use crate::digest::StepId;

fn open(root: &Path) -> Store {
    Store::open(root, LockMode::Fail).unwrap()
}

/// Commit `files` as the output of a step named `name`; its key is made from the name.
fn commit(store: &Store, name: &str, files: &[(&str, &[u8])]) -> (StepKey, ArtifactDigest) {
    let dir = store.new_staging().unwrap();
    for (p, bytes) in files {
        let path = dir.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }
    let manifest = store.absorb_dir(&dir).unwrap();
    let output = manifest.digest();
    let spec = StepSpec::bare(name, 1, Default::default());
    let key = spec.key();
    let record = StepRecord::new(
        key,
        StepId::of_parts(&[name.as_bytes()]),
        name,
        spec,
        output,
    );
    store.commit(&[StepCommit { record, manifest }]).unwrap();
    (key, output)
}

fn writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn kinds(check: ViewCheck) -> Vec<(String, ViewDamageKind)> {
    match check {
        ViewCheck::Damaged(d) => d.into_iter().map(|d| (d.path, d.kind)).collect(),
        other => panic!("expected damage, got {other:?}"),
    }
}

#[test]
fn what_the_store_makes_carries_its_time() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let (_, a) = commit(&store, "a", &[("x", b"x"), ("sub/y", b"y")]);
    let view = store.view(&a).unwrap();
    for p in ["", "sub", "x", "sub/y"] {
        let m = fs::symlink_metadata(view.join(p)).unwrap();
        assert_eq!(m.mtime(), STORE_TIME_SECS as i64, "{p}");
    }
    assert_eq!(
        store.check_views(&[a], usize::MAX).unwrap(),
        ViewCheck::Intact
    );
}

#[test]
fn a_write_into_a_view_is_found_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let (_, a) = commit(
        &store,
        "a",
        &[("keep", b"keep"), ("edit", b"edit"), ("sub/gone", b"gone")],
    );
    let view = store.view(&a).unwrap();
    writable(&view);
    writable(&view.join("sub"));
    // As root would: append to a file (the blob itself), add one, remove one.
    fs::OpenOptions::new()
        .append(true)
        .open(view.join("edit"))
        .map(|mut f| std::io::Write::write_all(&mut f, b"!"))
        .unwrap()
        .unwrap();
    fs::write(view.join("new"), b"new").unwrap();
    fs::remove_file(view.join("sub/gone")).unwrap();

    let found = kinds(store.check_views(&[a], usize::MAX).unwrap());
    assert!(
        found.contains(&("edit".into(), ViewDamageKind::Changed { blob: true })),
        "{found:?}"
    );
    assert!(
        found.contains(&("new".into(), ViewDamageKind::Added)),
        "{found:?}"
    );
    assert!(
        found.contains(&("sub/gone".into(), ViewDamageKind::Removed)),
        "{found:?}"
    );
    assert!(!found.iter().any(|(p, _)| p == "keep"), "{found:?}");
}

#[test]
fn a_small_budget_defers_a_large_view_without_judging_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| (format!("f{i}"), i.to_string().into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let (_, a) = commit(&store, "a", &refs);
    store.view(&a).unwrap();
    assert_eq!(store.check_views(&[a], 10).unwrap(), ViewCheck::OverBudget);
    assert_eq!(store.check_views(&[a], 41).unwrap(), ViewCheck::Intact);
}

#[test]
fn repairing_a_damaged_blob_drops_it_with_what_needs_it() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    // `a` and `b` share the blob of "shared"; `c` does not.
    let (ka, a) = commit(&store, "a", &[("shared", b"shared"), ("own", b"own")]);
    let (kb, b) = commit(&store, "b", &[("copy", b"shared")]);
    let (kc, c) = commit(&store, "c", &[("other", b"other")]);
    let view = store.view(&a).unwrap();
    fs::write(view.join("shared"), b"SHARED").unwrap();

    let ViewCheck::Damaged(damage) = store.check_views(&[a], usize::MAX).unwrap() else {
        panic!("the write is found");
    };
    let repaired = store.repair_views(&damage).unwrap();
    assert_eq!(repaired.blobs.len(), 1);
    let mut dropped = repaired.artifacts.clone();
    dropped.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(dropped, want);
    let mut steps = repaired.steps.clone();
    steps.sort();
    assert_eq!(steps, ["a", "b"]);

    assert!(store.step(&ka).unwrap().is_none());
    assert!(store.step(&kb).unwrap().is_none());
    assert!(store.step(&kc).unwrap().is_some());
    assert!(store.manifest(&a).unwrap().is_none());
    assert!(store.manifest(&c).unwrap().is_some());
    assert!(!view.exists(), "the view went too");
    match store.view(&a) {
        Err(StoreError::Dropped { reason, .. }) => assert!(reason.contains("damaged"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(store.dropped(&a).unwrap().is_some());
    let report = store.verify(true).unwrap();
    assert_eq!(report.problems, Vec::<String>::new());

    // Made again with the same bytes: the same digest, recorded, no longer dropped.
    let (_, again) = commit(&store, "a", &[("shared", b"shared"), ("own", b"own")]);
    assert_eq!(again, a);
    assert!(store.dropped(&a).unwrap().is_none());
    assert_eq!(
        fs::read(store.view(&a).unwrap().join("shared")).unwrap(),
        b"shared"
    );
    assert_eq!(store.verify(true).unwrap().problems, Vec::<String>::new());
}

#[test]
fn a_changed_view_copy_costs_the_view_only() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let dir = store.new_staging().unwrap();
    fs::write(dir.join("run.sh"), b"#!/bin/sh\n").unwrap();
    writable(&dir.join("run.sh"));
    let manifest = store.absorb_dir(&dir).unwrap();
    let a = manifest.digest();
    let spec = StepSpec::bare("x", 1, Default::default());
    let key = spec.key();
    let record = StepRecord::new(key, StepId::of_parts(&[b"x"]), "x", spec, a);
    store.commit(&[StepCommit { record, manifest }]).unwrap();
    // Executable files are copies in a view: writing one leaves the blob whole.
    let view = store.view(&a).unwrap();
    fs::write(view.join("run.sh"), b"#!/bin/sh\nrm -rf /\n").unwrap();
    let ViewCheck::Damaged(damage) = store.check_views(&[a], usize::MAX).unwrap() else {
        panic!("found");
    };
    assert_eq!(damage[0].kind, ViewDamageKind::Changed { blob: false });
    let repaired = store.repair_views(&damage).unwrap();
    assert!(repaired.blobs.is_empty());
    assert_eq!(repaired.views, [a]);
    assert!(store.step(&key).unwrap().is_some());
    assert_eq!(
        fs::read(store.view(&a).unwrap().join("run.sh")).unwrap(),
        b"#!/bin/sh\n"
    );
}

#[test]
fn blobs_from_before_the_fixed_times_pass_once_hashed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let (_, a) = commit(&store, "a", &[("x", b"x")]);
    let view = store.view(&a).unwrap();
    // What an older needle left: a blob and a view with ordinary times.
    let now = std::time::SystemTime::now();
    for p in [view.join("x"), view.clone()] {
        fs::File::open(&p).unwrap().set_modified(now).unwrap();
    }
    assert_eq!(
        store.check_views(&[a], usize::MAX).unwrap(),
        ViewCheck::Intact
    );
    // Hashed once, then known by its time again.
    assert_eq!(
        fs::metadata(view.join("x")).unwrap().mtime(),
        STORE_TIME_SECS as i64
    );
    assert_eq!(fs::metadata(&view).unwrap().mtime(), STORE_TIME_SECS as i64);
}

#[test]
fn a_file_under_a_blobs_name_is_trusted_only_with_its_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let (_, a) = commit(&store, "a", &[("x", b"hello")]);
    let view = store.view(&a).unwrap();
    let blob = fs::read_dir(store.root().join("blobs"))
        .unwrap()
        .flatten()
        .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| fs::metadata(p).unwrap().ino() == fs::metadata(view.join("x")).unwrap().ino())
        .unwrap();
    writable(&blob);
    fs::write(&blob, b"jello").unwrap();
    // The next output with those bytes puts them back, and the view that linked the bad
    // file is gone.
    commit(&store, "b", &[("y", b"hello")]);
    assert_eq!(fs::read(&blob).unwrap(), b"hello");
    assert_eq!(
        fs::read(store.view(&a).unwrap().join("x")).unwrap(),
        b"hello"
    );
    assert_eq!(store.verify(true).unwrap().problems, Vec::<String>::new());
}

#[test]
fn stores_of_other_formats_are_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    drop(open(&root));
    let refusal = |format: &str| {
        fs::write(root.join("FORMAT"), format).unwrap();
        match Store::open(&root, LockMode::Fail) {
            Err(e @ StoreError::Format { .. }) => e.to_string(),
            other => panic!("{:?}", other.map(|_| ())),
        }
    };
    let newer = refusal("needle-store 3\n");
    assert!(
        newer.contains("was written by a newer needle (store format 3; this needle reads format 2): use that needle, or `needle export` the artifacts you need with it"),
        "{newer}"
    );
    let older = refusal("needle-store 0\n");
    assert!(
        older.contains("written by an older needle (store format 0"),
        "{older}"
    );
    let garbage = refusal("hello\n");
    assert!(
        garbage.contains("says `hello`, which is no needle store format"),
        "{garbage}"
    );
    // Nothing was changed by the refusals.
    assert_eq!(fs::read_to_string(root.join("FORMAT")).unwrap(), "hello\n");
    fs::write(root.join("FORMAT"), format!("{FORMAT}\n")).unwrap();
    drop(open(&root));
}

#[test]
fn a_store_without_its_format_file_is_refused_or_finished() {
    let tmp = tempfile::tempdir().unwrap();
    // With data: which needle wrote it is unknown; say how to restore the file.
    let root = tmp.path().join("s");
    let store = open(&root);
    commit(&store, "a", &[("x", b"x")]);
    drop(store);
    fs::remove_file(root.join("FORMAT")).unwrap();
    for result in [
        Store::open(&root, LockMode::Fail),
        Store::open_existing(&root, LockMode::Fail),
    ] {
        match result {
            Err(e @ StoreError::FormatMissing { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("no `FORMAT` file"), "{msg}");
                assert!(msg.contains("echo 'needle-store 2' >"), "{msg}");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
    assert!(!root.join("FORMAT").exists(), "the refusal wrote nothing");

    // A creation interrupted before anything was stored: finished.
    let fresh = tmp.path().join("fresh");
    for sub in ["meta", "blobs", "staging", "views", "logs"] {
        fs::create_dir_all(fresh.join(sub)).unwrap();
    }
    assert!(matches!(
        Store::open_existing(&fresh, LockMode::Fail),
        Err(StoreError::Missing { .. })
    ));
    drop(open(&fresh));
    assert_eq!(
        fs::read_to_string(fresh.join("FORMAT")).unwrap().trim(),
        FORMAT
    );
}

/// A tmpfs of `size` on `dir` for the test's life; `None` (saying why) when not root or when
/// mounting fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: mounting a tmpfs needs root");
            return None;
        }
        fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "skipping: mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_commit_on_a_full_disk_is_refused_before_sled_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&tmp.path().join("disk"), "4m") else {
        return;
    };
    let root = disk.0.join("s");
    let store = open(&root);
    commit(&store, "first", &[("x", b"x")]);
    // An output absorbed while there was room…
    let dir = store.new_staging().unwrap();
    fs::write(dir.join("y"), b"y").unwrap();
    let manifest = store.absorb_dir(&dir).unwrap();
    let spec = StepSpec::bare("second", 1, Default::default());
    let key = spec.key();
    let second = StepCommit {
        record: StepRecord::new(
            key,
            StepId::of_parts(&[b"second"]),
            "second",
            spec,
            manifest.digest(),
        ),
        manifest,
    };
    let third = store.new_staging().unwrap();
    fs::write(third.join("z"), b"z").unwrap();
    // …then the disk fills up.
    let filler = disk.0.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();

    match store.commit(std::slice::from_ref(&second)) {
        Err(e @ StoreError::NoSpace { .. }) => {
            assert!(e.is_no_space());
            let msg = e.to_string();
            assert!(
                msg.contains("no space left on device: free space on"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(store.step(&key).unwrap().is_none(), "not even in memory");
    assert!(matches!(
        store.absorb_dir(&third),
        Err(StoreError::NoSpace { .. })
    ));
    assert!(
        third.join("z").exists(),
        "a refused output is left as it was"
    );

    // Space freed: the same handle writes again (sled was never made to fail).
    fs::remove_file(&filler).unwrap();
    store.commit(std::slice::from_ref(&second)).unwrap();
    drop(store);
    let store = open(&root);
    assert!(store.step(&key).unwrap().is_some());
    assert_eq!(store.verify(true).unwrap().problems, Vec::<String>::new());
}

/// A journal append that meets a full disk is cut off again: nothing of it stays to stop a
/// rebuild before the changes written after it, and sled never sees it.
#[test]
fn a_journal_append_on_a_full_disk_leaves_no_torn_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&tmp.path().join("disk"), "4m") else {
        return;
    };
    let root = disk.0.join("s");
    let store = open(&root);
    let (_, a) = commit(&store, "first", &[("x", b"x")]);
    let journal = root.join("journal").join("log");
    let before = fs::metadata(&journal).unwrap().len();
    // Full to the last 4 KiB block, less than the pin's record (pins skip the room check, which
    // is for sled's sake, so the append itself meets the full disk, part-way through).
    let filler = disk.0.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=4k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let pin = PinRecord {
        pinned: 1,
        reference: "r".repeat(256 << 10),
        step: None,
    };
    let e = store.pin(&a, &pin).unwrap_err();
    assert!(e.is_no_space(), "{e}");
    assert_eq!(fs::metadata(&journal).unwrap().len(), before, "cut off");
    assert!(store.pins().unwrap().is_empty());

    // Space again: the same handle writes on, and a rebuild gives back every record.
    fs::remove_file(&filler).unwrap();
    assert!(store.pin(&a, &pin).unwrap());
    let records = store.raw_records().unwrap();
    drop(store);
    fs::remove_dir_all(root.join("meta")).unwrap();
    let (store, rebuilt) = Store::rebuild(&root, LockMode::Fail, true).unwrap();
    assert_eq!(rebuilt.stopped, None);
    assert_eq!(store.raw_records().unwrap(), records);
}
