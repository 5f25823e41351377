use std::fs;

use super::*;
use crate::store::testutil::{Done, Lab};
use crate::store::{StepCommit, StepSpec};

/// h (two images) → f (one of them, sharing its blob) → t, all in run 1.
fn chain(lab: &Lab) -> (Done, Done, Done) {
    let h = lab.exec(
        1,
        "haystack",
        "",
        &[("images/0.png", b"zero"), ("images/1.png", b"one")],
        &[],
    );
    let f = lab.exec(
        1,
        "filter",
        "",
        &[("images/0.png", b"zero"), ("meta", b"f")],
        &[("data", h.output)],
    );
    let t = lab.exec(
        1,
        "train",
        "",
        &[("model", b"weights")],
        &[("data", f.output)],
    );
    lab.run(1, &[h, f, t]);
    (h, f, t)
}

fn ids<'a>(items: impl IntoIterator<Item = &'a DroppedItem>) -> Vec<String> {
    let mut v: Vec<String> = items.into_iter().map(|i| i.id.clone()).collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn repair_drops_a_damaged_blob_the_manifests_using_it_and_their_producers() {
    let mut lab = Lab::new();
    let (h, f, t) = chain(&lab);
    let zero = lab.blob_of(&h.output, "images/0.png");
    let view = lab.store().view(&f.output).unwrap();
    lab.flip(&zero);
    assert_ne!(
        fs::read(view.join("images/0.png")).unwrap(),
        b"zero",
        "views share the inode"
    );

    let repaired = lab.store().repair().unwrap();
    let before = &repaired.before;
    assert_eq!(before.problems.len(), 1, "{:#?}", before.problems);
    assert!(
        before.problems[0].contains("hash otherwise; used by"),
        "{}",
        before.problems[0]
    );
    let d = &repaired.dropped;
    assert_eq!(ids(&d.blobs), [zero.hex()]);
    assert_eq!(
        ids(&d.artifacts),
        sorted(vec![h.output.hex(), f.output.hex()])
    );
    assert_eq!(ids(&d.steps), sorted(vec![h.key.hex(), f.key.hex()]));
    let reasons: Vec<&str> = d.steps.iter().map(|s| s.reason.as_str()).collect();
    assert!(
        reasons.iter().all(|r| r.contains("was dropped")),
        "{reasons:?}"
    );
    assert!(
        repaired.after.problems.is_empty(),
        "{:#?}",
        repaired.after.problems
    );
    // The run that recorded them is history: its outputs are known dropped, not missing.
    assert_eq!(repaired.after.dropped_outputs, 2);
    assert!(lab.store().dropped(&h.output).unwrap().is_some());

    // The reader of a dropped artifact keeps its record; damaged bytes and views are gone.
    assert!(lab.store().step(&t.key).unwrap().is_some());
    assert!(lab.store().step(&f.key).unwrap().is_none());
    assert!(!lab.store().blob_path(&zero).exists());
    assert!(!view.exists());
    assert!(lab.store().producers(&f.output).unwrap().is_empty());
    assert_eq!(
        lab.store().consumers(&f.output).unwrap(),
        [t.key],
        "t still read it"
    );
    lab.reopen();
    lab.assert_verifies();

    // Executed again, the producers yield the same bytes: the same artifacts, whole.
    let h2 = lab.exec(
        2,
        "haystack",
        "",
        &[("images/0.png", b"zero"), ("images/1.png", b"one")],
        &[],
    );
    let f2 = lab.exec(
        2,
        "filter",
        "",
        &[("images/0.png", b"zero"), ("meta", b"f")],
        &[("data", h2.output)],
    );
    assert_eq!((h2.output, f2.output), (h.output, f.output));
    assert_eq!(
        fs::read(lab.store().view(&f.output).unwrap().join("images/0.png")).unwrap(),
        b"zero"
    );
    let report = lab.store().verify(true).unwrap();
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.dropped_outputs, 0);
}

/// What a crash between removing a damaged blob and dropping its records leaves: records
/// pointing at a missing blob. Plain `verify` reports it; repair drops them.
#[test]
fn records_pointing_at_a_missing_blob_are_dropped_likewise() {
    let lab = Lab::new();
    let (h, f, _) = chain(&lab);
    let one = lab.blob_of(&h.output, "images/1.png");
    fs::remove_file(lab.store().blob_path(&one)).unwrap();
    let report = lab.store().verify(false).unwrap();
    assert!(
        report.problems[0].contains("is missing"),
        "{:#?}",
        report.problems
    );
    let repaired = lab.store().repair().unwrap();
    assert_eq!(ids(&repaired.dropped.artifacts), [h.output.hex()]);
    assert_eq!(ids(&repaired.dropped.steps), [h.key.hex()]);
    assert!(
        repaired.after.problems.is_empty(),
        "{:#?}",
        repaired.after.problems
    );
    assert!(
        lab.store().step(&f.key).unwrap().is_some(),
        "f does not use that blob"
    );
    lab.assert_verifies();
    // Nothing more to do.
    assert!(lab.store().repair().unwrap().dropped.is_empty());
}

#[test]
fn a_damaged_code_file_drops_the_steps_that_ran_it() {
    let lab = Lab::new();
    let store = lab.store();
    let script = lab.tmp.path().join("train.py");
    fs::write(&script, "print('hi')\n").unwrap();
    let code = store.absorb_file_copy(&script).unwrap();
    let dir = store.new_staging().unwrap();
    fs::write(dir.join("out"), b"trained").unwrap();
    let manifest = store.absorb_dir(&dir).unwrap();
    let mut spec = StepSpec::bare("exec", 1, Default::default());
    spec.code.insert("train.py".into(), code);
    let record = StepRecord::new(
        spec.key(),
        crate::digest::StepId::of_parts(&[]),
        "train",
        spec,
        manifest.digest(),
    );
    let k = record.key;
    store.commit(&[StepCommit { record, manifest }]).unwrap();
    lab.assert_verifies();

    lab.flip(&code);
    let repaired = store.repair().unwrap();
    assert!(
        repaired.before.problems[0].contains("code file `train.py`"),
        "{:#?}",
        repaired.before.problems
    );
    assert_eq!(ids(&repaired.dropped.steps), [k.hex()]);
    assert!(
        repaired.dropped.steps[0]
            .reason
            .contains("code file `train.py`")
    );
    assert!(
        repaired.after.problems.is_empty(),
        "{:#?}",
        repaired.after.problems
    );
}

#[test]
fn a_run_hashes_each_blob_once_and_finds_damage() {
    let lab = Lab::new();
    let (h, f, _) = chain(&lab);
    let store = lab.store();
    let mut memo = InputCheck::default();
    assert!(matches!(
        store.check_artifact(&h.output, &mut memo).unwrap(),
        Health::Whole
    ));
    assert_eq!((memo.artifacts, memo.blobs_hashed), (1, 2));
    // f shares `zero` with h: only its own `meta` is hashed.
    assert!(matches!(
        store.check_artifact(&f.output, &mut memo).unwrap(),
        Health::Whole
    ));
    assert_eq!((memo.artifacts, memo.blobs_hashed), (2, 3));
    assert!(matches!(
        store.check_artifact(&h.output, &mut memo).unwrap(),
        Health::Whole
    ));
    assert_eq!((memo.artifacts, memo.blobs_hashed, memo.bytes), (2, 3, 8));

    let one = lab.blob_of(&h.output, "images/1.png");
    lab.flip(&one);
    let mut memo = InputCheck::default();
    let Health::Damaged(damage) = store.check_artifact(&h.output, &mut memo).unwrap() else {
        panic!("the flipped byte is found");
    };
    assert_eq!(damage.blobs.keys().collect::<Vec<_>>(), [&one]);
    assert!(
        damage.blobs[&one].contains("`images/1.png` of artifact"),
        "{:?}",
        damage.blobs
    );
    let dropped = store.drop_damaged(&damage).unwrap();
    assert_eq!(
        dropped.artifact_digests.iter().collect::<Vec<_>>(),
        [&h.output]
    );
    // Gone now: the steps naming it as output are to be dropped too (none left).
    let Health::Damaged(damage) = store.check_artifact(&h.output, &mut memo).unwrap() else {
        panic!("a dropped artifact is not whole");
    };
    assert!(damage.artifacts.contains_key(h.output.hex().as_bytes()));
    assert!(matches!(
        store.check_artifact(&f.output, &mut memo).unwrap(),
        Health::Whole
    ));
    lab.assert_verifies();
}
