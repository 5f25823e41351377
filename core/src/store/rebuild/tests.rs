//! Rebuilding `meta/` from the journal, and the journal kept in step with sled at every open:
//! a lost, emptied or unreadable `meta/`; a kill between the journal and sled; torn and
//! damaged journals; a format-1 store upgraded; compaction.

use std::fs;

use super::super::journal::{self, Body, Frames, HEAD_FRAME_LEN};
use super::super::meta::STOP_AFTER_JOURNAL;
use super::super::testutil::{Lab, run_record};
use super::*;
use crate::store::{
    GcOptions, GpuIdentity, GpuSample, GpuUsage, PinRecord, RunState, StepProgress, StepStatus,
};

/// A store with a bit of everything the metadata holds: steps reading each other, finished
/// runs, an unfinished one with its progress, a pin, GPU usage, a dropped artifact, and a
/// run id handed out but not used.
fn history(lab: &Lab) {
    let a = lab.exec(1, "a", "", &[("x", b"x"), ("d/y", b"y")], &[]);
    let b = lab.exec(1, "b", "", &[("z", b"z")], &[("in", a.output)]);
    lab.run(1, &[a, b]);
    let c = lab.exec(2, "c", "", &[("c", b"only c")], &[("in", b.output)]);
    let mut unfinished = run_record(2, &[a, c]);
    unfinished.ended = None;
    unfinished.state = RunState::Running;
    lab.store().put_run(&unfinished).unwrap();
    lab.store()
        .put_run_progress(
            2,
            &[StepProgress {
                node: 1,
                key: Some(c.key),
                status: StepStatus::Succeeded { output: c.output },
                attempts: vec![],
            }],
        )
        .unwrap();
    let pin = PinRecord {
        pinned: 5,
        reference: "last:a".into(),
        step: Some("a".into()),
    };
    assert!(lab.store().pin(&a.output, &pin).unwrap());
    let mut usage = GpuUsage::new(1, "nvml", 500, 0);
    let g = usage.add_gpu(
        "0",
        &GpuIdentity {
            index: 0,
            uuid: "GPU-0".into(),
            name: "test".into(),
        },
    );
    usage.record(
        g,
        10,
        GpuSample {
            util: Some(50),
            memory_used_mib: 1,
            memory_total_mib: 2,
        },
    );
    lab.store().put_gpu_usage(&usage).unwrap();
    let d = lab.exec(2, "d", "d", &[("damaged", b"soon damaged")], &[]);
    let blob = lab.blob_of(&d.output, "damaged");
    lab.flip(&blob);
    lab.store()
        .drop_blob(&blob, "has bytes that hash otherwise")
        .unwrap();
    assert_eq!(lab.store().next_run_id().unwrap(), 3);
}

fn meta(lab: &Lab) -> std::path::PathBuf {
    lab.root().join("meta")
}

fn journal_path(lab: &Lab) -> std::path::PathBuf {
    lab.root().join("journal").join("log")
}

fn open_err(lab: &Lab) -> StoreError {
    match Store::open(&lab.root(), LockMode::Fail) {
        Ok(_) => panic!("the store opened"),
        Err(e) => e,
    }
}

#[test]
fn a_deleted_meta_is_refused_then_rebuilt_record_for_record() {
    let mut lab = Lab::new();
    history(&lab);
    let before = lab.records();
    lab.store = None;
    fs::remove_dir_all(meta(&lab)).unwrap();

    let e = open_err(&lab);
    assert!(matches!(e, StoreError::MetaLost { .. }), "{e}");
    assert!(e.to_string().contains("needle verify --rebuild"), "{e}");
    assert!(!meta(&lab).exists(), "the refusal made no empty metadata");

    let rebuilt = lab.rebuild();
    assert_eq!(lab.records(), before);
    assert_eq!(rebuilt.old_meta, None);
    assert_eq!(rebuilt.stopped, None);
    assert!(
        rebuilt.verify.problems.is_empty(),
        "{:#?}",
        rebuilt.verify.problems
    );
    assert_eq!(
        rebuilt.restored,
        Restored {
            steps: 3,
            artifacts: 3,
            runs: 2,
            pins: 1,
            dropped: 1,
            gpu_usage: 1,
            run_progress: 1,
            index_entries: lab.store().trees.producers.len() + lab.store().trees.consumers.len(),
        }
    );
    lab.assert_verifies();
    // It goes on as before: the next id, and writes that land in both.
    assert_eq!(lab.store().next_run_id().unwrap(), 4);
    lab.exec(4, "e", "", &[("e", b"e")], &[]);
    let after = lab.records();
    lab.reopen();
    assert_eq!(lab.records(), after);
    fs::remove_dir_all(meta(&lab)).unwrap_or(());
    lab.rebuild();
    assert_eq!(lab.records(), after);
}

#[test]
fn unreadable_or_emptied_meta_is_rebuilt_and_kept_aside() {
    // Every file garbage: sled says "Read corrupted data". A zeroed `db`: sled opens it
    // as an empty database, which the journal position tells from a new one. Emptied: the
    // directory is there, and nothing in it.
    for damage in ["garbage", "zeroed db", "emptied"] {
        let mut lab = Lab::new();
        history(&lab);
        let before = lab.records();
        lab.store = None;
        for entry in fs::read_dir(meta(&lab)).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if damage == "emptied" {
                crate::store::fsutil::remove_tree(&path).unwrap();
            } else if entry.file_type().unwrap().is_file() && (damage == "garbage" || name == "db")
            {
                let len = fs::metadata(&path).unwrap().len().max(1) as usize;
                let byte = if damage == "garbage" { 0x5a } else { 0 };
                fs::write(&path, vec![byte; len]).unwrap();
            }
        }
        let e = open_err(&lab);
        assert!(
            matches!(
                e,
                StoreError::MetaUnreadable { journal: true, .. } | StoreError::MetaLost { .. }
            ),
            "{damage}: {e}"
        );
        assert!(
            e.to_string().contains("needle verify --rebuild"),
            "{damage}: {e}"
        );

        let rebuilt = lab.rebuild();
        assert_eq!(lab.records(), before, "{damage}");
        if damage == "emptied" {
            assert_eq!(rebuilt.old_meta, None, "nothing to keep");
            continue;
        }
        let aside = rebuilt.old_meta.expect("the old metadata is kept");
        assert!(
            aside
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("meta.broken-")
        );
        assert!(aside.join("db").exists(), "{damage}");
        lab.assert_verifies();
    }
}

#[test]
fn a_kill_between_the_journal_and_sled_is_finished_by_the_next_open() {
    let mut lab = Lab::new();
    history(&lab);
    let mut run = run_record(3, &[]);
    run.recipe_name = "in flight".into();
    STOP_AFTER_JOURNAL.with(|s| s.set(true));
    let stopped = lab.store().put_run(&run);
    STOP_AFTER_JOURNAL.with(|s| s.set(false));
    assert!(stopped.is_err());
    assert_eq!(lab.store().run(3).unwrap(), None, "sled never saw it");
    // This process writes no more: sled and the journal would disagree.
    let e = lab
        .store()
        .unpin(&lab.store().pins().unwrap()[0].0)
        .unwrap_err();
    assert!(matches!(e, StoreError::JournalPoisoned { .. }), "{e}");

    lab.reopen();
    assert_eq!(lab.store().run(3).unwrap(), Some(run));
    let after = lab.records();
    lab.rebuild();
    assert_eq!(lab.records(), after);
    lab.assert_verifies();
}

/// The offsets of the journal's change frames, and its length.
fn change_offsets(lab: &Lab) -> (Vec<u64>, u64) {
    let mut frames = Frames::from_start(&journal_path(lab)).unwrap();
    let mut out = Vec::new();
    while let Some(f) = frames.next_frame().unwrap() {
        if matches!(f.body, Body::Change(_)) {
            out.push(f.offset);
        }
    }
    (out, frames.end())
}

#[test]
fn a_torn_last_change_is_ignored_by_a_rebuild_and_cut_off_by_an_open() {
    let mut lab = Lab::new();
    history(&lab);
    let without_last = lab.records();
    lab.exec(3, "last", "", &[("l", b"last")], &[]);
    let with_last = lab.records();
    lab.store = None;
    let (offsets, end) = change_offsets(&lab);
    let last = *offsets.last().unwrap();
    let whole = fs::read(journal_path(&lab)).unwrap();
    let meta_copy = lab.tmp.path().join("meta-copy");
    crate::store::fsutil::copy_tree(&meta(&lab), &meta_copy).unwrap();

    for cut in [
        last + 1,
        last + 23,
        last + 24,
        last + 25,
        (last + end) / 2,
        end - 1,
    ] {
        fs::write(journal_path(&lab), &whole[..cut as usize]).unwrap();
        // Without sled: the rebuild stops before the torn change and says so.
        fs::remove_dir_all(meta(&lab)).unwrap();
        let rebuilt = lab.rebuild();
        assert_eq!(lab.records(), without_last, "cut at {cut}");
        let stop = rebuilt.stopped.expect("a stop");
        assert_eq!((stop.offset, stop.bytes), (last, cut - last));
        assert_eq!(rebuilt.frames_lost, 0);
        lab.assert_verifies();
        // The open cut the torn bytes off: what follows lands after a whole frame.
        assert_eq!(fs::metadata(journal_path(&lab)).unwrap().len(), last);
        lab.store = None;

        // With sled, which has the change the journal lost: the journal is written anew.
        fs::write(journal_path(&lab), &whole[..cut as usize]).unwrap();
        fs::remove_dir_all(meta(&lab)).unwrap();
        crate::store::fsutil::copy_tree(&meta_copy, &meta(&lab)).unwrap();
        lab.reopen();
        assert_eq!(lab.records(), with_last, "cut at {cut}");
        lab.store = None;
        fs::remove_dir_all(meta(&lab)).unwrap();
        lab.rebuild();
        assert_eq!(lab.records(), with_last, "cut at {cut}");
        lab.store = None;
    }
}

#[test]
fn a_journal_damaged_inside_is_rewritten_from_sled_or_rebuilt_up_to_the_damage() {
    let mut lab = Lab::new();
    history(&lab);
    let before = lab.records();
    lab.store = None;
    let (offsets, _) = change_offsets(&lab);
    let whole = fs::read(journal_path(&lab)).unwrap();
    let mut damaged = whole.clone();
    damaged[offsets[2] as usize + 30] ^= 0x10;

    // sled reads whole. An open reads only the journal's head and length, so `verify` is
    // what finds the damage; `--repair` keeps the journal aside and writes a new one.
    fs::write(journal_path(&lab), &damaged).unwrap();
    lab.reopen();
    assert_eq!(lab.records(), before);
    let report = lab.store().verify(false).unwrap();
    assert!(
        report.problems[0].contains("cannot be read past offset")
            && report.problems[0].contains("would be lost to a rebuild"),
        "{:#?}",
        report.problems
    );
    assert!(
        report.problems.iter().all(|p| p.contains("the journal")),
        "{:#?}",
        report.problems
    );
    let repaired = lab.store().repair().unwrap();
    assert!(
        repaired.after.problems.is_empty(),
        "{:#?}",
        repaired.after.problems
    );
    let kept = repaired
        .dropped
        .journal_kept_as
        .expect("the old journal is kept");
    assert_eq!(fs::read(&kept).unwrap(), damaged);
    assert_eq!(lab.records(), before, "nothing else was dropped");
    lab.store = None;
    fs::remove_dir_all(meta(&lab)).unwrap();
    lab.rebuild();
    assert_eq!(lab.records(), before);

    // sled lost too: the rebuild restores what came before the damage, and says how many
    // changes after it it could not apply.
    lab.store = None;
    fs::write(journal_path(&lab), &damaged).unwrap();
    fs::remove_dir_all(meta(&lab)).unwrap();
    let rebuilt = lab.rebuild();
    let stop = rebuilt.stopped.expect("a stop");
    assert_eq!(stop.offset, offsets[2]);
    assert_eq!(rebuilt.frames_lost, offsets.len() - 3);
    // Two changes: the first step's commit and the next one's.
    assert_eq!(rebuilt.restored.steps, 2);
}

#[test]
fn a_format_1_store_is_upgraded_when_it_opens() {
    let mut lab = Lab::new();
    history(&lab);
    let before = lab.records();
    lab.store = None;
    // What a needle before the journal left: no journal, no position, format 1.
    fs::remove_dir_all(lab.root().join("journal")).unwrap();
    {
        let db = sled::open(meta(&lab)).unwrap();
        db.remove(journal::POS_KEY).unwrap();
        db.flush().unwrap();
    }
    fs::write(lab.root().join("FORMAT"), "needle-store 1\n").unwrap();

    // No journal, nothing to rebuild from: refused, changing nothing.
    let e = Store::rebuild(&lab.root(), LockMode::Fail, false)
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::NoJournal { .. }), "{e}");
    assert!(e.to_string().contains("needle-store 1"), "{e}");
    assert_eq!(
        fs::read_to_string(lab.root().join("FORMAT")).unwrap(),
        "needle-store 1\n"
    );

    lab.reopen();
    assert_eq!(lab.records(), before);
    assert_eq!(
        fs::read_to_string(lab.root().join("FORMAT"))
            .unwrap()
            .trim(),
        crate::store::FORMAT
    );
    lab.store = None;
    fs::remove_dir_all(meta(&lab)).unwrap();
    lab.rebuild();
    assert_eq!(lab.records(), before);
}

#[test]
fn a_lost_journal_is_written_again_from_sled() {
    let mut lab = Lab::new();
    history(&lab);
    let before = lab.records();
    lab.store = None;
    fs::remove_dir_all(lab.root().join("journal")).unwrap();
    let e = Store::rebuild(&lab.root(), LockMode::Fail, false)
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::NoJournal { .. }), "{e}");
    lab.reopen();
    lab.store = None;
    fs::remove_dir_all(meta(&lab)).unwrap();
    lab.rebuild();
    assert_eq!(lab.records(), before);
}

#[test]
fn gc_compacts_the_journal_and_a_compaction_killed_before_sled_knew_is_taken_up() {
    let mut lab = Lab::new();
    history(&lab);
    for run in 3..8 {
        let s = lab.exec(
            run,
            "s",
            &run.to_string(),
            &[("v", run.to_string().as_bytes())],
            &[],
        );
        lab.run(run, &[s]);
    }
    let len = |lab: &Lab| fs::metadata(journal_path(lab)).unwrap().len();
    let grown = len(&lab);
    let plan = lab
        .store()
        .gc_plan(GcOptions { keep_last: Some(1) })
        .unwrap();
    lab.store().gc_apply(&plan).unwrap();
    assert!(len(&lab) < grown, "{} >= {grown}", len(&lab));
    let (offsets, _) = change_offsets(&lab);
    assert!(offsets.is_empty(), "a snapshot alone");
    let after_gc = lab.records();

    // A compaction whose position sled never recorded (a kill just after the rename).
    let seq = journal::read_pos(&lab.store().trees).unwrap().unwrap().seq;
    journal::write_snapshot(&lab.root(), &lab.store().trees, seq).unwrap();
    lab.reopen();
    assert_eq!(lab.records(), after_gc);
    lab.exec(9, "t", "", &[("t", b"t")], &[]);
    let later = lab.records();
    lab.store = None;
    fs::remove_dir_all(meta(&lab)).unwrap();
    lab.rebuild();
    assert_eq!(lab.records(), later);
    lab.assert_verifies();
}

#[test]
fn a_new_store_has_an_empty_journal_and_a_healthy_meta_can_be_rebuilt_too() {
    let mut lab = Lab::new();
    assert_eq!(
        fs::metadata(journal_path(&lab)).unwrap().len(),
        HEAD_FRAME_LEN
    );
    lab.reopen();
    assert_eq!(
        fs::metadata(journal_path(&lab)).unwrap().len(),
        HEAD_FRAME_LEN
    );
    history(&lab);
    let before = lab.records();
    let rebuilt = lab.rebuild();
    assert_eq!(lab.records(), before);
    assert!(rebuilt.old_meta.unwrap().join("db").exists());
}

#[test]
fn a_meta_that_lost_records_the_journal_has_is_told_to_rebuild_not_repaired() {
    let mut lab = Lab::new();
    history(&lab);
    let before = lab.records();
    // A record sled lost behind the store's back (its position untouched).
    let pin = lab.store().pins().unwrap()[0].0;
    lab.store().trees.pins.remove(pin.hex().as_bytes()).unwrap();
    let report = lab.store().verify(false).unwrap();
    let problem = report.problems.last().unwrap();
    assert!(
        problem.contains("is in the journal only") && problem.contains("verify --rebuild"),
        "{problem}"
    );
    let repaired = lab.store().repair().unwrap();
    assert_eq!(
        repaired.dropped.journal_kept_as, None,
        "the journal is kept as it is"
    );
    assert!(!repaired.after.problems.is_empty());
    lab.rebuild();
    assert_eq!(lab.records(), before);
    lab.assert_verifies();
}
