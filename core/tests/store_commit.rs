//! The store's invariant at commit: no record ever points at a blob that is not whole.

use std::fs;

use needle_core::digest::{ArtifactDigest, StepId, StepKey};
use needle_core::store::{
    EntryKind, InputDigests, LockMode, Manifest, StepCommit, StepRecord, StepSpec, Store,
    StoreError,
};

fn record(name: &str, output: ArtifactDigest, input: Option<ArtifactDigest>) -> StepRecord {
    let inputs = input
        .map(|a| ("data".to_string(), InputDigests::One(a)))
        .into_iter()
        .collect();
    StepRecord::new(
        StepKey::of_parts(&[name.as_bytes()]),
        StepId::of_parts(&[name.as_bytes()]),
        name,
        StepSpec::bare("exec", 1, inputs),
        output,
    )
}

fn absorb(store: &Store, files: &[(&str, &str)]) -> Manifest {
    let dir = store.new_staging().unwrap();
    for (path, text) in files {
        let p = dir.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    store.absorb_dir(&dir).unwrap()
}

#[test]
fn commit_refuses_a_missing_blob_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&root, LockMode::Fail).unwrap();

    let base = absorb(&store, &[("data.txt", "base")]);
    let base_digest = base.digest();
    store
        .commit(&[StepCommit {
            record: record("base", base_digest, None),
            manifest: base.clone(),
        }])
        .unwrap();

    // A good step and one whose blob vanished before the commit, in one batch.
    let good = absorb(&store, &[("good.txt", "good")]);
    let bad = absorb(&store, &[("a.txt", "a"), ("b.txt", "b")]);
    let EntryKind::File { blob: lost, .. } = &bad.entries[1].kind else {
        panic!("b.txt is a file")
    };
    let lost_path = store.blob_path(lost);
    fs::remove_file(&lost_path).unwrap();
    let commits = [
        StepCommit {
            record: record("good", good.digest(), Some(base_digest)),
            manifest: good.clone(),
        },
        StepCommit {
            record: record("bad", bad.digest(), Some(base_digest)),
            manifest: bad.clone(),
        },
    ];
    let err = store.commit(&commits).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains(&lost.hex()), "{err}");

    let unchanged = |store: &Store| {
        for name in ["good", "bad"] {
            assert_eq!(
                store.step(&StepKey::of_parts(&[name.as_bytes()])).unwrap(),
                None
            );
        }
        assert_eq!(store.manifest(&good.digest()).unwrap(), None);
        assert_eq!(store.manifest(&bad.digest()).unwrap(), None);
        assert_eq!(store.consumers(&base_digest).unwrap(), []);
        assert_eq!(store.producers(&good.digest()).unwrap(), []);
        assert_eq!(store.manifest(&base_digest).unwrap(), Some(base.clone()));
        assert!(
            store
                .find_prefix(&good.digest().hex()[..8])
                .unwrap()
                .is_empty()
        );
    };
    unchanged(&store);
    drop(store);
    let store = Store::open(&root, LockMode::Fail).unwrap();
    unchanged(&store);

    // Once the bytes are back, the same batch goes through whole.
    let again = absorb(&store, &[("a.txt", "a"), ("b.txt", "b")]);
    assert_eq!(again, bad);
    assert!(lost_path.is_file());
    store.commit(&commits).unwrap();
    assert_eq!(store.consumers(&base_digest).unwrap().len(), 2);
}
