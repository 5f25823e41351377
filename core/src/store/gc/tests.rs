use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::lineage::{Direction, walk};
use crate::store::testutil::{Done, Lab, key};
use crate::store::{
    Execution, GatherMember, GcOptions, InputDigests, PinRecord, StepSpec, StepStatus,
};

/// Three runs over two haystacks. Run 1: haystack h1 → filter f1 (shares h1's image `zero`)
/// → train t1. Run 2: h1 cached → filter f2 → train t2. Run 3: haystack h2 (shares `zero`
/// with h1) → filter f3. Plus an absorbed tree no step committed (an interrupted commit).
struct History {
    h1: Done,
    f1: Done,
    t1: Done,
    f2: Done,
    t2: Done,
    h2: Done,
    f3: Done,
}

fn history(lab: &Lab) -> History {
    let h1 = lab.exec(
        1,
        "haystack",
        "v1",
        &[
            ("images/0.png", b"zero"),
            ("images/1.png", b"one"),
            ("meta", b"m1"),
        ],
        &[],
    );
    let f1 = lab.exec(
        1,
        "filter",
        "1",
        &[("images/0.png", b"zero"), ("meta", b"f1")],
        &[("data", h1.output)],
    );
    let t1 = lab.exec(
        1,
        "train",
        "1",
        &[("model", b"model-1")],
        &[("data", f1.output)],
    );
    lab.run(1, &[h1, f1, t1]);
    let f2 = lab.exec(
        2,
        "filter",
        "2",
        &[("images/1.png", b"one"), ("meta", b"f2")],
        &[("data", h1.output)],
    );
    let t2 = lab.exec(
        2,
        "train",
        "2",
        &[("model", b"model-2")],
        &[("data", f2.output)],
    );
    lab.run(2, &[Done { cached: true, ..h1 }, f2, t2]);
    let h2 = lab.exec(
        3,
        "haystack",
        "v2",
        &[
            ("images/0.png", b"zero"),
            ("images/2.png", b"two"),
            ("meta", b"m2"),
        ],
        &[],
    );
    let f3 = lab.exec(
        3,
        "filter",
        "3",
        &[("images/2.png", b"two"), ("meta", b"f3")],
        &[("data", h2.output)],
    );
    lab.run(3, &[h2, f3]);
    let store = lab.store();
    let dir = store.new_staging().unwrap();
    fs::write(dir.join("orphan"), b"orphan bytes").unwrap();
    store.absorb_dir(&dir).unwrap();
    History {
        h1,
        f1,
        t1,
        f2,
        t2,
        h2,
        f3,
    }
}

fn gc(lab: &Lab, keep_last: Option<usize>) -> GcSummary {
    let plan = lab.store().gc_plan(GcOptions { keep_last }).unwrap();
    lab.store().gc_apply(&plan).unwrap();
    plan.summary
}

fn has_step(lab: &Lab, d: &Done) -> bool {
    lab.store().step(&d.key).unwrap().is_some()
}

fn has_artifact(lab: &Lab, d: &Done) -> bool {
    lab.store().manifest(&d.output).unwrap().is_some()
}

fn blob_exists(lab: &Lab, bytes: &[u8]) -> bool {
    lab.store()
        .blob_path(&BlobDigest::from_hasher(
            blake3::Hasher::new().update(bytes),
        ))
        .exists()
}

#[test]
fn without_keep_last_only_leftovers_go() {
    let lab = Lab::new();
    let h = history(&lab);
    let before = lab.store().counts().unwrap();
    let freed = gc(&lab, None);
    assert_eq!(
        lab.store().counts().unwrap(),
        before,
        "every run keeps all it reached"
    );
    assert_eq!((freed.runs, freed.steps, freed.artifacts), (0, 0, 0));
    // The interrupted commit's blob and the view its absorb made.
    assert_eq!(freed.blobs.count, 1);
    assert_eq!(freed.blobs.bytes, b"orphan bytes".len() as u64);
    assert_eq!(freed.views.count, 1);
    assert!(!blob_exists(&lab, b"orphan bytes"));
    assert!(blob_exists(&lab, b"model-1"));
    assert!(has_step(&lab, &h.t1));
    lab.assert_verifies();
    // Nothing left to collect.
    let again = gc(&lab, None);
    assert_eq!(
        (again.blobs.count, again.views.count, again.logs.count),
        (0, 0, 0)
    );
}

#[test]
fn keep_last_drops_older_runs_but_keeps_shared_blobs() {
    let lab = Lab::new();
    let h = history(&lab);
    let dry = lab
        .store()
        .gc_plan(GcOptions { keep_last: Some(1) })
        .unwrap();
    let counts = lab.store().counts().unwrap();
    let files = lab.files("blobs");
    // Planning removes nothing.
    assert_eq!(lab.store().counts().unwrap(), counts);
    assert_eq!(lab.files("blobs"), files);

    lab.store().gc_apply(&dry).unwrap();
    let freed = dry.summary;
    assert_eq!(freed.runs, 2);
    assert_eq!(freed.steps, 5, "h1 f1 t1 f2 t2");
    assert_eq!(freed.artifacts, 5);
    assert_eq!(freed.kept.runs, 1);
    assert_eq!(freed.kept.steps, 2);
    for gone in [&h.h1, &h.f1, &h.t1, &h.f2, &h.t2] {
        assert!(!has_step(&lab, gone) && !has_artifact(&lab, gone));
    }
    for kept in [&h.h2, &h.f3] {
        assert!(has_step(&lab, kept) && has_artifact(&lab, kept));
    }
    // `zero` is h2's too; the rest of run 1 and 2's bytes go.
    assert!(blob_exists(&lab, b"zero") && blob_exists(&lab, b"two"));
    for gone in [
        &b"one"[..],
        b"m1",
        b"f1",
        b"model-1",
        b"f2",
        b"model-2",
        b"orphan bytes",
    ] {
        assert!(
            !blob_exists(&lab, gone),
            "{}",
            String::from_utf8_lossy(gone)
        );
    }
    assert_eq!(freed.blobs.count, 7);
    // Only run 3's logs remain, and only its run is listed.
    let logs = lab.files("logs");
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert!(logs.iter().all(|l| l.ends_with(".3-1.log")), "{logs:?}");
    assert_eq!(
        lab.store()
            .runs()
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        [3]
    );
    // No index entry names a dropped step.
    assert!(lab.store().consumers(&h.h1.output).unwrap().is_empty());
    assert_eq!(lab.store().producers(&h.h2.output).unwrap(), [h.h2.key]);
    lab.assert_verifies();

    // Everything, with no run kept: the store is empty but for its counter.
    let freed = gc(&lab, Some(0));
    assert_eq!((freed.runs, freed.steps, freed.artifacts), (1, 2, 2));
    assert!(lab.files("blobs").is_empty());
    assert!(lab.files("logs").is_empty());
    assert_eq!(
        lab.store().next_run_id().unwrap(),
        4,
        "run ids are never reused"
    );
    lab.assert_verifies();
}

#[test]
fn a_pin_keeps_its_whole_ancestry() {
    let lab = Lab::new();
    let h = history(&lab);
    let store = lab.store();
    let pin = PinRecord {
        pinned: 1,
        reference: "1:train".into(),
        step: Some("train".into()),
    };
    assert!(store.pin(&h.t1.output, &pin).unwrap());
    assert!(!store.pin(&h.t1.output, &pin).unwrap(), "pinned already");
    let lineage_before = walk(store, &h.t1.key, Direction::Up).unwrap();

    let freed = gc(&lab, Some(0));
    for kept in [&h.h1, &h.f1, &h.t1] {
        assert!(has_step(&lab, kept) && has_artifact(&lab, kept));
    }
    for gone in [&h.f2, &h.t2, &h.h2, &h.f3] {
        assert!(!has_step(&lab, gone) && !has_artifact(&lab, gone));
    }
    assert_eq!(freed.runs, 3);
    assert_eq!(freed.kept.pins, 1);
    assert!(blob_exists(&lab, b"one"), "h1's own blob stays with it");
    let lineage_after = walk(lab.store(), &h.t1.key, Direction::Up).unwrap();
    let keys = |g: &crate::lineage::LineageGraph| g.steps.iter().map(|s| s.key).collect::<Vec<_>>();
    assert_eq!(keys(&lineage_after), keys(&lineage_before));
    assert_eq!(keys(&lineage_after).len(), 3);
    // Logs of the steps a pin keeps stay: `needle logs` still shows them.
    assert_eq!(lab.files("logs").len(), 3);
    lab.assert_verifies();

    // Unpinned, it goes at the next gc.
    assert!(lab.store().unpin(&h.t1.output).unwrap());
    assert!(!lab.store().unpin(&h.t1.output).unwrap());
    gc(&lab, Some(0));
    assert_eq!(lab.store().counts().unwrap().steps, 0);
    assert!(lab.files("blobs").is_empty());
    lab.assert_verifies();
}

#[test]
fn a_killed_runs_committed_steps_and_resume_dirs_are_its_own() {
    let lab = Lab::new();
    let h = history(&lab);
    // Run 4's runner was killed: its record still says every step is pending, with no key;
    // one step had committed, another had written a checkpoint to resume from.
    let x = lab.exec(4, "x", "1", &[("out", b"x")], &[("data", h.f3.output)]);
    let mut run4 = lab.store().run(3).unwrap().unwrap();
    run4.id = 4;
    run4.state = crate::store::RunState::Running;
    run4.ended = None;
    for s in &mut run4.steps {
        s.key = None;
        s.status = StepStatus::Pending;
        s.attempts.clear();
    }
    lab.store().put_run(&run4).unwrap();
    let resume = |k: &StepKey| lab.store().resume_path(k);
    let interrupted = key("interrupted in run 4");
    fs::create_dir_all(resume(&interrupted)).unwrap();
    fs::write(resume(&interrupted).join("ckpt"), b"step 300").unwrap();
    // Left behind by steps of dropped runs (not named by a kept run, untouched since long
    // before), and by a step that succeeded (its resume dir is of no use).
    let old = key("failed in run 1");
    fs::create_dir_all(resume(&old)).unwrap();
    fs::write(resume(&old).join("ckpt"), b"step 100").unwrap();
    let long_ago = UNIX_EPOCH + Duration::from_secs(1000);
    for p in [resume(&old).join("ckpt"), resume(&old)] {
        fs::File::open(&p).unwrap().set_modified(long_ago).unwrap();
    }
    fs::create_dir_all(resume(&h.f3.key)).unwrap();
    fs::write(resume(&h.f3.key).join("ckpt"), b"done").unwrap();

    let freed = gc(&lab, Some(1));
    assert_eq!(freed.kept.runs, 1);
    assert!(has_step(&lab, &x), "written by the kept (killed) run");
    assert!(
        has_step(&lab, &h.f3) && has_step(&lab, &h.h2),
        "x's ancestry"
    );
    assert!(!has_step(&lab, &h.t1));
    assert_eq!(freed.resume.count, 2);
    assert!(resume(&interrupted).exists());
    assert!(!resume(&old).exists() && !resume(&h.f3.key).exists());
    // x's log, from the kept run, stays; h2 and f3's (run 3, dropped) stay as their records'.
    assert_eq!(lab.files("logs").len(), 3);
    lab.assert_verifies();
}

/// The deletions of one gc, interrupted after each of them in turn (what a SIGKILL at that
/// moment leaves): every store verifies, and a second gc finishes the job, reaching the store
/// an uninterrupted gc leaves; and its metadata, rebuilt from the journal, is the same.
#[test]
fn gc_interrupted_at_every_deletion_leaves_a_store_that_verifies() {
    let finished = |lab: &Lab| {
        (
            lab.store().counts().unwrap(),
            lab.files("blobs"),
            lab.files("logs"),
        )
    };
    let reference = {
        let lab = Lab::new();
        history(&lab);
        gc(&lab, Some(1));
        finished(&lab)
    };
    let operations = {
        let lab = Lab::new();
        history(&lab);
        lab.store()
            .gc_plan(GcOptions { keep_last: Some(1) })
            .unwrap()
            .operations()
    };
    assert!(operations > 10, "{operations}");
    for limit in 0..=operations {
        let mut lab = Lab::new();
        let h = history(&lab);
        let plan = lab
            .store()
            .gc_plan(GcOptions { keep_last: Some(1) })
            .unwrap();
        lab.store().gc_apply_until(&plan, limit).unwrap();
        lab.reopen();
        let report = lab.store().verify(true).unwrap();
        assert!(
            report.problems.is_empty(),
            "stopped after {limit}: {:#?}",
            report.problems
        );
        // The journal gives the same records back at every point.
        let records = lab.records();
        fs::remove_dir_all(lab.root().join("meta")).unwrap();
        let rebuilt = lab.rebuild();
        assert!(rebuilt.verify.problems.is_empty(), "stopped after {limit}");
        assert_eq!(lab.records(), records, "stopped after {limit}");
        // What the kept run needs is whole at every point.
        assert!(
            lab.store()
                .view(&h.f3.output)
                .unwrap()
                .join("images/2.png")
                .exists()
        );
        gc(&lab, Some(1));
        assert_eq!(finished(&lab), reference, "stopped after {limit}");
        for view in fs::read_dir(lab.root().join("views")).unwrap().flatten() {
            let a: ArtifactDigest = view.file_name().to_str().unwrap().parse().unwrap();
            assert!(
                lab.store().manifest(&a).unwrap().is_some(),
                "a stale view stayed"
            );
        }
    }
}

#[test]
fn reach_follows_lineage_not_only_runs() {
    // Two steps made the same bytes: lineage shows the later; gc keeps that one (and what
    // it read), not the earlier one from a dropped run.
    let out = ArtifactDigest::of_parts(&[b"o"]);
    let input_a = ArtifactDigest::of_parts(&[b"a"]);
    let input_b = ArtifactDigest::of_parts(&[b"b"]);
    let step = |tag: &str, input: ArtifactDigest, ended: u64, run: u64| {
        let mut spec = StepSpec::bare(
            "exec",
            1,
            BTreeMap::from([("in".to_string(), InputDigests::One(input))]),
        );
        spec.params
            .insert("tag".into(), crate::value::Value::String(tag.into()));
        let mut r = StepRecord::new(
            spec.key(),
            crate::digest::StepId::of_parts(&[]),
            tag,
            spec,
            out,
        );
        r.executions.push(Execution {
            run,
            attempt: 1,
            started: 0,
            ended,
            output: out,
            gpus: vec![],
            gpu_share: None,
            gpu_mem_gb: None,
            cpus: 1,
            log: String::new(),
            job: None,
        });
        r
    };
    let early = step("early", input_a, 10, 1);
    let late = step("late", input_b, 20, 2);
    let mut records = Records::default();
    records.producers.insert(out, vec![early.key, late.key]);
    records.steps.insert(early.key, early.clone());
    records.steps.insert(late.key, late.clone());
    records.pins.push(out);

    let reached = reach(&records, Some(0));
    assert!(reached.runs.is_empty());
    assert_eq!(reached.steps, HashSet::from([late.key]));
    assert_eq!(reached.artifacts, HashSet::from([out, input_b]));
}

#[test]
fn a_gather_goes_with_any_member_gc_removes() {
    let lab = Lab::new();
    let h = history(&lab);
    let store = lab.store();
    let members = |ds: &[&Done]| -> Vec<GatherMember> {
        ds.iter()
            .enumerate()
            .map(|(i, d)| GatherMember {
                label: format!("i={i}"),
                artifact: d.output,
            })
            .collect()
    };
    let (old, views) = store.gather(&members(&[&h.f1, &h.f3])).unwrap();
    let (kept, _) = store.gather(&members(&[&h.h2, &h.f3])).unwrap();
    assert_eq!(
        store.gather(&members(&[&h.f1, &h.f3])).unwrap().0,
        old,
        "the same members, the same gather"
    );
    assert_eq!(
        fs::read_to_string(old.join("i=0/meta")).unwrap(),
        "f1",
        "an entry resolves to its member's view"
    );
    assert_eq!(views[1], store.view(&h.f3.output).unwrap());
    assert!(store.gather_intact(&old) && store.gather_intact(&kept));

    let freed = gc(&lab, Some(1));
    assert_eq!(freed.steps, 5);
    assert!(!old.exists(), "f1 went, and the gather holding it");
    assert!(kept.exists(), "run 3's artifacts stay, and their gather");
    lab.assert_verifies();
}

#[test]
fn gpu_usage_goes_with_its_run() {
    use crate::store::{GpuIdentity, GpuSample, GpuUsage};
    let lab = Lab::new();
    history(&lab);
    let usage = |run| {
        let mut u = GpuUsage::new(run, "nvidia-smi", 500, 0);
        let g = u.add_gpu(
            "0",
            &GpuIdentity {
                index: 0,
                uuid: "GPU-0".into(),
                name: "Test GPU".into(),
            },
        );
        let sample = GpuSample {
            util: Some(50),
            memory_used_mib: 1,
            memory_total_mib: 2,
        };
        u.record(g, 0, sample);
        u
    };
    // Runs 1 and 3, and run 9, which was never recorded (its runner died first).
    for run in [1, 3, 9] {
        lab.store().put_gpu_usage(&usage(run)).unwrap();
    }
    gc(&lab, None);
    assert!(lab.store().gpu_usage(1).unwrap().is_some());
    assert!(lab.store().gpu_usage(9).unwrap().is_none());
    gc(&lab, Some(1));
    assert!(lab.store().gpu_usage(1).unwrap().is_none());
    assert_eq!(lab.store().gpu_usage(3).unwrap(), Some(usage(3)));
}
