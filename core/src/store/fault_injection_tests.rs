//! EIO and ENOSPC at every write of a commit (`faults.rs`): the commit fails with the error,
//! nothing recorded before is lost, the store verifies, and the same commit made again (in the
//! same process where it can go on, else after reopening) records the very digests.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::digest::StepId;

/// The points a commit of [`new_outputs`] passes; each one is tried below.
const POINTS: [&str; 9] = [
    "absorb.make-read-only",
    "absorb.copy",
    "absorb.sync-read-only",
    "absorb.fan-out-dir",
    "absorb.link",
    "absorb.rename",
    "absorb.sync-placed",
    "journal.append",
    "sled.transaction",
];

fn step(name: &str, manifest: Manifest) -> StepCommit {
    let spec = StepSpec::bare(name, 1, Default::default());
    let record = StepRecord::new(
        spec.key(),
        StepId::of_parts(&[name.as_bytes()]),
        name,
        spec,
        manifest.digest(),
    );
    StepCommit { record, manifest }
}

/// A store with one step recorded already: what no later failure may touch.
fn store_with_history(root: &Path) -> (Store, ArtifactDigest) {
    let store = Store::open(root, LockMode::Fail).unwrap();
    let dir = store.new_staging().unwrap();
    fs::write(dir.join("old"), b"recorded before any fault").unwrap();
    let manifest = store.absorb_dir(&dir).unwrap();
    let old = manifest.digest();
    store.commit(&[step("old", manifest)]).unwrap();
    (store, old)
}

/// Two steps' outputs, made to pass every kind of write: a flat tree of new files (which
/// becomes its view by hard links), a nested one with several files (hashed by threads), a
/// symlinked file (copied in), and a file the store holds already.
fn new_outputs(store: &Store, outside: &Path) -> Result<Vec<ArtifactDigest>, StoreError> {
    let flat = store.new_staging().unwrap();
    fs::write(flat.join("a"), b"flat a").unwrap();
    fs::write(flat.join("b"), b"flat b").unwrap();
    let nested = store.new_staging().unwrap();
    fs::create_dir_all(nested.join("sub")).unwrap();
    for i in 0..4 {
        fs::write(nested.join(format!("sub/{i}")), format!("nested {i}")).unwrap();
    }
    fs::write(nested.join("again"), b"recorded before any fault").unwrap();
    let target = outside.join("linked");
    fs::write(&target, b"reached through a symlink").unwrap();
    symlink(&target, nested.join("link")).unwrap();

    let manifests = store.absorb_dirs(&[&flat, &nested]);
    let mut commits = Vec::new();
    for (name, m) in ["flat", "nested"].into_iter().zip(manifests) {
        commits.push(step(name, m?));
    }
    let digests = commits.iter().map(|c| c.record.output).collect();
    store.commit_for_run(&commits, 0, &[])?;
    Ok(digests)
}

fn assert_whole(store: &Store, old: &ArtifactDigest, context: &str) {
    let report = store.verify(true).unwrap();
    assert!(
        report.problems.is_empty(),
        "{context}: {:?}",
        report.problems
    );
    let recorded = store
        .step(&StepSpec::bare("old", 1, Default::default()).key())
        .unwrap()
        .unwrap_or_else(|| panic!("{context}: the earlier record is gone"));
    assert_eq!(recorded.output, *old, "{context}");
}

#[test]
fn a_failed_write_anywhere_in_a_commit_loses_nothing_and_the_commit_can_be_made_again() {
    // Which points a commit passes, in order, and what it records when nothing fails.
    let tmp = tempfile::tempdir().unwrap();
    let (mut store, _) = store_with_history(&tmp.path().join("s"));
    store.arm_faults(FaultPlan::new(FaultTrigger::Never, FaultAction::Abort));
    let want = new_outputs(&store, tmp.path()).unwrap();
    let passed = store.faults().unwrap().passed();
    for point in POINTS {
        assert!(passed.contains(&point), "{point} not passed: {passed:?}");
    }
    drop(store);

    for errno in [libc::EIO, libc::ENOSPC] {
        for at in 1..=passed.len() {
            let context = format!("errno {errno} at write {at} ({})", passed[at - 1]);
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("s");
            let (mut store, old) = store_with_history(&root);
            store.arm_faults(FaultPlan::new(
                FaultTrigger::Nth(at),
                FaultAction::Fail(errno),
            ));
            match new_outputs(&store, tmp.path()) {
                // A hard link that fails is not an error: the blob goes in by a rename.
                Ok(_) => assert_eq!(passed[at - 1], "absorb.link", "{context}"),
                Err(e) => {
                    let shown = format!("{e:?}");
                    assert!(
                        shown.contains(&format!("code: {errno}")),
                        "{context}: another error: {e}"
                    );
                }
            }
            // The same process goes on, unless sled may have missed a change the journal has.
            let (store, again) = match new_outputs(&store, tmp.path()) {
                Ok(got) => (store, got),
                Err(StoreError::JournalPoisoned { .. }) => {
                    drop(store);
                    let store = Store::open(&root, LockMode::Fail).unwrap();
                    assert_whole(&store, &old, &context);
                    let got = new_outputs(&store, tmp.path()).unwrap();
                    (store, got)
                }
                Err(e) => panic!("{context}: the commit again: {e}"),
            };
            assert_eq!(again, want, "{context}");
            drop(store);
            let store = Store::open(&root, LockMode::Fail).unwrap();
            assert_whole(&store, &old, &context);
        }
    }
}

#[test]
fn a_fault_plan_that_cannot_be_read_is_refused_with_the_forms_it_takes() {
    for good in [
        "trace:/tmp/t",
        "abort@3",
        "abort@sled.flush",
        "eio@1,trace:/t",
    ] {
        assert!(FaultPlan::parse(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "abort",
        "abort@0",
        "abort@",
        "kill@3",
        "abort@1,eio@2",
        "trace:a,trace:b",
    ] {
        let e = FaultPlan::parse(bad).unwrap_err().to_string();
        assert!(e.contains("abort@N") && e.contains(bad), "{bad}: {e}");
    }
}
