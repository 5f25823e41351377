use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use super::*;
use crate::digest::StepId;

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
}

fn open(root: &Path) -> Store {
    Store::open(root, LockMode::Fail).unwrap()
}

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with nested dirs, an empty dir, an executable and a symlink to a file.
fn sample_tree(dir: &Path) {
    write(&dir.join("a.txt"), b"alpha");
    write(&dir.join("sub/b.txt"), b"beta");
    write(&dir.join("sub/deeper/c.bin"), &[0u8; 3000]);
    write(&dir.join("run.sh"), b"#!/bin/sh\necho hi\n");
    set_mode(&dir.join("run.sh"), 0o755);
    fs::create_dir_all(dir.join("empty/inner")).unwrap();
    symlink("a.txt", dir.join("link")).unwrap();
    // `a-b` sorts before `a/…` as a string but after `a` as a name: checks path order.
    write(&dir.join("sub-x"), b"beta");
}

fn record(key: StepKey, output: ArtifactDigest, inputs: &[ArtifactDigest]) -> StepRecord {
    let inputs = inputs
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("in{i}"), InputDigests::One(*a)))
        .collect();
    StepRecord::new(
        key,
        StepId::of_parts(&[key.as_bytes()]),
        "s",
        StepSpec::bare("exec", 1, inputs),
        output,
    )
}

/// Absorb a tree of `files` and commit it as the output of step `key`.
fn commit_files(
    store: &Store,
    key: StepKey,
    files: &[(&str, &[u8])],
    inputs: &[ArtifactDigest],
) -> ArtifactDigest {
    let dir = store.new_staging().unwrap();
    for (p, bytes) in files {
        write(&dir.join(p), bytes);
    }
    let manifest = store.absorb_dir(&dir).unwrap();
    let output = manifest.digest();
    store
        .commit(&[StepCommit {
            record: record(key, output, inputs),
            manifest,
        }])
        .unwrap();
    output
}

#[test]
fn absorb_a_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let dir = store.new_staging().unwrap();
    sample_tree(&dir);
    let m = store.absorb_dir(&dir).unwrap();
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "the absorbed dir is left empty"
    );

    let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "a.txt",
            "empty/inner",
            "link",
            "run.sh",
            "sub-x",
            "sub/b.txt",
            "sub/deeper/c.bin"
        ]
    );
    let kind = |p: &str| m.entries.iter().find(|e| e.path == p).unwrap().kind.clone();
    assert_eq!(kind("empty/inner"), EntryKind::Dir);
    let EntryKind::File {
        blob,
        size,
        executable,
    } = kind("run.sh")
    else {
        panic!()
    };
    assert!(executable);
    assert_eq!(size, 18);
    // Named as b3sum names it, read-only.
    let path = store.blob_path(&blob);
    assert_eq!(
        blake3::hash(&fs::read(&path).unwrap()).to_hex().as_str(),
        blob.hex()
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o444
    );
    // The symlink holds the file's bytes.
    assert_eq!(kind("link"), kind("a.txt"));
    let EntryKind::File { executable, .. } = kind("a.txt") else {
        panic!()
    };
    assert!(!executable);
    // Identical bytes are one blob.
    let blob_of = |p: &str| match kind(p) {
        EntryKind::File { blob, .. } => blob,
        EntryKind::Dir => panic!(),
    };
    assert_eq!(blob_of("sub-x"), blob_of("sub/b.txt"));
    assert_eq!(m.file_count(), 6);
    assert_eq!(m.total_size(), 5 + 4 + 3000 + 18 + 4 + 5);
}

#[test]
fn manifest_digest_is_stable_across_absorbs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let mut digests = vec![];
    for _ in 0..3 {
        let dir = store.new_staging().unwrap();
        sample_tree(&dir);
        digests.push(store.absorb_dir(&dir).unwrap().digest());
    }
    // A tree outside the store (copied, not renamed) gives the same digest too.
    let outside = tmp.path().join("outside");
    sample_tree(&outside);
    digests.push(store.absorb_dir(&outside).unwrap().digest());
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn absorb_many_files_in_parallel() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let dir = store.new_staging().unwrap();
    for i in 0..300 {
        write(
            &dir.join(format!("d{}/f{i}", i % 7)),
            format!("file {}", i % 150).as_bytes(),
        );
    }
    let m = store.absorb_dir(&dir).unwrap();
    assert_eq!(m.entries.len(), 300);
    assert!(m.entries.windows(2).all(|w| w[0].path < w[1].path));
    let blobs: std::collections::BTreeSet<_> = m
        .entries
        .iter()
        .map(|e| match &e.kind {
            EntryKind::File { blob, .. } => *blob,
            EntryKind::Dir => panic!(),
        })
        .collect();
    assert_eq!(blobs.len(), 150);
    for b in blobs {
        assert!(store.blob_path(&b).is_file());
    }
}

#[test]
fn absorb_refuses_special_files_and_leaves_the_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    type Make = fn(&Path);
    let cases: [(&str, Make); 3] = [
        ("dangling symlink", |d| {
            symlink("nowhere", d.join("x")).unwrap()
        }),
        ("symlink to a directory", |d| {
            fs::create_dir(d.join("sub")).unwrap();
            symlink("sub", d.join("x")).unwrap()
        }),
        ("fifo", |d| {
            crate::testutil::mkfifo(&d.join("x"));
        }),
    ];
    for (want, make) in cases {
        let dir = store.new_staging().unwrap();
        write(&dir.join("a"), b"a");
        make(&dir);
        match store.absorb_dir(&dir) {
            Err(StoreError::Unsupported { path, kind }) => {
                assert_eq!(kind, want);
                assert_eq!(path, dir.join("x"));
            }
            other => panic!("{want}: {other:?}"),
        }
        assert!(dir.join("a").is_file(), "nothing moved");
    }
}

#[test]
fn absorb_refuses_non_utf8_names() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let dir = store.new_staging().unwrap();
    write(&dir.join(std::ffi::OsStr::from_bytes(b"bad\xff")), b"x");
    assert!(matches!(
        store.absorb_dir(&dir),
        Err(StoreError::NonUtf8Path { .. })
    ));
}

#[test]
fn hardlinked_outputs_are_copied_not_moved() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let dir = store.new_staging().unwrap();
    let elsewhere = store.path("staging/elsewhere");
    write(&elsewhere, b"shared inode");
    fs::hard_link(&elsewhere, dir.join("f")).unwrap();
    let m = store.absorb_dir(&dir).unwrap();
    let EntryKind::File { blob, .. } = &m.entries[0].kind else {
        panic!()
    };
    let blob_ino = fs::metadata(store.blob_path(blob)).unwrap().ino();
    assert_ne!(blob_ino, fs::metadata(&elsewhere).unwrap().ino());
    assert_eq!(
        fs::metadata(&elsewhere).unwrap().permissions().mode() & 0o777,
        0o644
    );
}

#[test]
fn absorb_file_copy_keeps_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let src = tmp.path().join("code.py");
    write(&src, b"print('hi')\n");
    let blob = store.absorb_file_copy(&src).unwrap();
    assert_eq!(fs::read(&src).unwrap(), b"print('hi')\n");
    assert_eq!(fs::read(store.blob_path(&blob)).unwrap(), b"print('hi')\n");
    assert_eq!(blob.hex(), blake3::hash(b"print('hi')\n").to_hex().as_str());
    // Again: nothing new, same digest.
    assert_eq!(store.absorb_file_copy(&src).unwrap(), blob);
    assert_eq!(fs::read_dir(store.path("staging")).unwrap().count(), 0);
}

/// Compare two trees: names, file bytes, x bits; empty dirs included.
fn assert_same_tree(a: &Path, b: &Path) {
    let mut names_a: Vec<_> = fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut names_b: Vec<_> = fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names_a.sort();
    names_b.sort();
    assert_eq!(names_a, names_b, "in {a:?} vs {b:?}");
    for n in names_a {
        let (pa, pb) = (a.join(&n), b.join(&n));
        let (ma, mb) = (fs::metadata(&pa).unwrap(), fs::metadata(&pb).unwrap());
        assert_eq!(ma.is_dir(), mb.is_dir());
        if ma.is_dir() {
            assert_same_tree(&pa, &pb);
        } else {
            assert_eq!(fs::read(&pa).unwrap(), fs::read(&pb).unwrap());
            assert_eq!(ma.mode() & 0o111 != 0, mb.mode() & 0o111 != 0, "{pa:?}");
        }
    }
}

#[test]
fn view_equals_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let original = tmp.path().join("original");
    sample_tree(&original);
    let dir = store.new_staging().unwrap();
    sample_tree(&dir);
    let manifest = store.absorb_dir(&dir).unwrap();
    let artifact = manifest.digest();
    let key = StepKey::of_parts(&[b"view"]);
    store
        .commit(&[StepCommit {
            record: record(key, artifact, &[]),
            manifest,
        }])
        .unwrap();

    let view = store.view(&artifact).unwrap();
    assert_eq!(view, store.path(&format!("views/{}", artifact.hex())));
    assert_same_tree(&original, &view);
    assert_eq!(fs::metadata(&view).unwrap().mode() & 0o777, 0o555);
    assert_eq!(
        fs::metadata(view.join("sub/deeper")).unwrap().mode() & 0o777,
        0o555
    );
    // Plain files are the blobs themselves.
    assert_eq!(fs::metadata(view.join("a.txt")).unwrap().nlink(), 3);
    assert_eq!(store.view(&artifact).unwrap(), view);
    assert!(matches!(
        store.view(&ArtifactDigest::of_parts(&[b"nope"])),
        Err(StoreError::UnknownArtifact { .. })
    ));
}

#[test]
fn second_open_names_the_holder_and_wait_gets_in_later() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let first = open(&root);
    match Store::open(&root, LockMode::Fail) {
        Err(StoreError::Locked { holder, .. }) => {
            assert!(
                holder.starts_with(&format!("pid {} (", std::process::id())),
                "{holder}"
            );
            assert!(holder.contains(" since "), "{holder}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let waiter = {
        let root = root.clone();
        std::thread::spawn(move || Store::open(&root, LockMode::Wait).map(|s| s.runs().unwrap()))
    };
    wait_until_waiting(&root);
    assert!(!waiter.is_finished(), "waits while the store is held");
    drop(first);
    assert!(waiter.join().unwrap().is_ok());
}

#[test]
fn a_reader_is_waited_for_and_a_writer_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    drop(open(&root));

    let reader = Store::open_to_read(&root, LockMode::Fail).unwrap();
    let writer = {
        let root = root.clone();
        std::thread::spawn(move || Store::open(&root, LockMode::Fail).map(|s| s.runs().unwrap()))
    };
    wait_until_waiting(&root);
    assert!(
        !writer.is_finished(),
        "a writer waits for a reader's moment"
    );
    drop(reader);
    assert!(writer.join().unwrap().is_ok());

    let writer = open(&root);
    let waits = waits_for(&root);
    match Store::open_to_read(&root, LockMode::Fail) {
        Err(StoreError::Locked { holder, .. }) => assert!(!holder.ends_with("reading"), "{holder}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(waits_for(&root), waits, "no wait for a writer");
    drop(writer);
}

/// How many times a thread of this process began to wait for the lock of `root`.
fn waits_for(root: &std::path::Path) -> usize {
    (super::lock::WAITED_FOR.lock().unwrap().iter())
        .filter(|r| r.as_path() == root)
        .count()
}

/// Until a thread of this process waits for the lock of `root` (the handshake).
fn wait_until_waiting(root: &std::path::Path) {
    let t0 = std::time::Instant::now();
    while waits_for(root) == 0 {
        assert!(
            t0.elapsed().as_secs() < 60,
            "nothing waited for `{}`",
            root.display()
        );
        std::thread::yield_now();
    }
}

#[test]
fn refuses_unknown_formats_and_foreign_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    assert!(matches!(
        Store::open_existing(&root, LockMode::Fail),
        Err(StoreError::Missing { .. })
    ));
    drop(open(&root));
    assert!(Store::open_existing(&root, LockMode::Fail).is_ok());

    fs::write(root.join("FORMAT"), "needle-store 99\n").unwrap();
    match Store::open(&root, LockMode::Fail) {
        Err(StoreError::Format { found, .. }) => assert_eq!(found, "needle-store 99"),
        other => panic!("{:?}", other.map(|_| ())),
    }

    let home = tmp.path().join("home");
    write(&home.join(".bashrc"), b"# mine");
    assert!(matches!(
        Store::open(&home, LockMode::Fail),
        Err(StoreError::NotAStore { .. })
    ));
    assert_eq!(fs::read_dir(&home).unwrap().count(), 1, "nothing written");
    // Also for a command that would not create a store: it is no store, not a missing one.
    assert!(matches!(
        Store::open_existing(&home, LockMode::Fail),
        Err(StoreError::NotAStore { .. })
    ));

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    drop(open(&empty));
    assert_eq!(
        fs::read_to_string(empty.join("FORMAT")).unwrap().trim(),
        FORMAT
    );
}

#[test]
fn reopen_clears_staging_but_keeps_clean_dirs_for_reuse() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let store = open(&root);
    let a = store.new_staging().unwrap();
    let b = store.new_staging().unwrap();
    let clean = store.new_staging().unwrap();
    assert_ne!(a, b);
    write(&a.join("x/y"), b"left over");
    set_mode(&a.join("x"), 0o555);
    write(&b.join("log"), b"a line");
    fs::create_dir(clean.join("out")).unwrap();
    fs::create_dir(clean.join("work")).unwrap();
    write(&clean.join("log"), b"");
    assert_eq!(
        store.reuse_staging(),
        None,
        "none left by a process that has gone"
    );
    drop(store);

    let store = open(&root);
    let left: Vec<_> = fs::read_dir(store.path("staging"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        left,
        std::slice::from_ref(&clean),
        "only the clean one stays"
    );
    assert_eq!(store.reuse_staging(), Some(clean));
    assert_eq!(store.reuse_staging(), None, "handed out once");
    let fresh = store.new_staging().unwrap();
    assert_eq!(
        fs::read_dir(&fresh).unwrap().count(),
        0,
        "a new one is empty"
    );
}

#[test]
fn commit_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let store = open(&root);
    let k1 = StepKey::of_parts(&[b"one"]);
    let k2 = StepKey::of_parts(&[b"two"]);
    let a1 = commit_files(&store, k1, &[("out", b"1")], &[]);
    let a2 = commit_files(&store, k2, &[("out", b"2")], &[a1]);
    drop(store);

    let store = open(&root);
    assert_eq!(store.step(&k1).unwrap().unwrap().output, a1);
    assert_eq!(store.step(&k2).unwrap().unwrap().output, a2);
    assert_eq!(store.producers(&a1).unwrap(), [k1]);
    assert_eq!(store.consumers(&a1).unwrap(), [k2]);
    assert!(store.consumers(&a2).unwrap().is_empty());
    assert_eq!(store.manifest(&a2).unwrap().unwrap().digest(), a2);
    assert_eq!(store.step(&StepKey::of_parts(&[b"none"])).unwrap(), None);

    let found = store.find_prefix(&k1.hex()[..6]).unwrap();
    assert!(found.contains(&Found::Step(k1)));
    assert_eq!(store.find_prefix(&a2.hex()).unwrap(), [Found::Artifact(a2)]);
    assert!(store.find_prefix("XYZ").unwrap().is_empty());
    assert_eq!(store.find_prefix("").unwrap(), []);
}

#[test]
fn commit_refuses_a_record_that_is_not_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let key = StepKey::of_parts(&[b"k"]);
    let err = store
        .commit(&[StepCommit {
            record: record(key, ArtifactDigest::of_parts(&[b"other"]), &[]),
            manifest: Manifest::default(),
        }])
        .unwrap_err();
    assert!(matches!(err, StoreError::OutputMismatch { .. }), "{err}");

    let bad = Manifest {
        entries: vec![ManifestEntry {
            path: "../escape".into(),
            kind: EntryKind::Dir,
        }],
    };
    let err = store
        .commit(&[StepCommit {
            record: record(key, bad.digest(), &[]),
            manifest: bad,
        }])
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::BadManifest { problem: ManifestProblem::NotClean(p), .. } if p == "../escape"
        ),
        "{err}"
    );
    assert_eq!(store.step(&key).unwrap(), None);
}

#[test]
fn unreadable_records_are_corrupt_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    let key = StepKey::of_parts(&[b"k"]);
    store
        .trees
        .steps
        .insert(key.hex(), &b"{not json"[..])
        .unwrap();
    let err = store.step(&key).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }));
    let msg = err.to_string();
    assert!(msg.contains("steps") && msg.contains(&key.hex()), "{msg}");
    store
        .trees
        .run_index
        .insert(7u64.to_be_bytes(), &b"[]"[..])
        .unwrap();
    let msg = store.runs().unwrap_err().to_string();
    assert!(msg.contains("run_index") && msg.contains("`7`"), "{msg}");
}

fn run_record(id: u64, statuses: Vec<StepStatus>) -> RunRecord {
    let out = ArtifactDigest::of_parts(&[b"o"]);
    let _ = out;
    RunRecord {
        id,
        recipe_name: "r".into(),
        recipe_path: "recipes/r.toml".into(),
        recipe_dir: "/tmp".into(),
        recipe_text: "[recipe]\nname = \"r\"\n".into(),
        sets: vec![],
        rerun_of: None,
        started: 1,
        ended: Some(2),
        state: RunState::Failed,
        arms: vec![],
        steps: statuses
            .into_iter()
            .map(|status| RunStep {
                id: StepId::of_parts(&[b"i"]),
                name: "s".into(),
                op: "exec".into(),
                bindings: BTreeMap::new(),
                arms: vec![],
                inputs: BTreeMap::new(),
                key: None,
                status,
                attempts: vec![],
            })
            .collect(),
    }
}

#[test]
fn runs_count_and_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let store = open(&root);
    assert_eq!(store.next_run_id().unwrap(), 1);
    assert_eq!(store.next_run_id().unwrap(), 2);
    let o = ArtifactDigest::of_parts(&[b"o"]);
    let run = run_record(
        2,
        vec![
            StepStatus::Succeeded { output: o },
            StepStatus::Succeeded { output: o },
            StepStatus::Cached { output: o },
            StepStatus::Failed { reason: "x".into() },
            StepStatus::Skipped {
                upstream: "y".into(),
            },
            StepStatus::Pending,
        ],
    );
    store.put_run(&run).unwrap();
    store.put_run(&run_record(1, vec![])).unwrap();
    drop(store);

    let store = open(&root);
    assert_eq!(store.next_run_id().unwrap(), 3);
    assert_eq!(store.run(2).unwrap().unwrap(), run);
    assert_eq!(store.run(9).unwrap(), None);
    let runs = store.runs().unwrap();
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2]);
    let s = &runs[1];
    assert_eq!(
        (s.steps, s.executed, s.cached, s.failed, s.skipped),
        (6, 2, 1, 1, 1)
    );
    // An id recorded without `next_run_id` still moves the counter past it.
    store.put_run(&run_record(10, vec![])).unwrap();
    assert_eq!(store.next_run_id().unwrap(), 11);
}

#[test]
fn absorb_file_copy_refuses_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("s"));
    match store.absorb_file_copy(tmp.path()) {
        Err(StoreError::Unsupported { kind, .. }) => assert!(kind.starts_with("directory")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn counts_steps_artifacts_and_runs() {
    let t = tempfile::tempdir().unwrap();
    let store = open(t.path());
    let none = StoreCounts {
        steps: 0,
        artifacts: 0,
        runs: 0,
    };
    assert_eq!(store.counts().unwrap(), none);
    let a = commit_files(&store, StepKey::of_parts(&[b"a"]), &[("x", b"1")], &[]);
    // A second step with the same output: two steps, one artifact.
    commit_files(&store, StepKey::of_parts(&[b"b"]), &[("x", b"1")], &[a]);
    store.put_run(&run_record(1, vec![])).unwrap();
    let counts = store.counts().unwrap();
    assert_eq!(
        counts,
        StoreCounts {
            steps: 2,
            artifacts: 1,
            runs: 1
        }
    );
}
