use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::digest::{StepId, StepKey};
use crate::store::{
    Found, LockMode, RunRecord, RunState, RunStep, StepCommit, StepRecord, StepSpec, StepStatus,
    Store, StoreError, StoreRead,
};

/// A store holding one committed step (`out/a.txt`) and one run record, as a run leaves it.
fn store_with_a_step(root: &Path) -> (Store, StepKey, ArtifactDigest) {
    let store = Store::open(root, LockMode::Fail).unwrap();
    let dir = store.new_staging().unwrap();
    std::fs::write(dir.join("a.txt"), b"alpha").unwrap();
    let manifest = store.absorb_dir(&dir).unwrap();
    let output = manifest.digest();
    let key = StepKey::of_parts(&[b"k"]);
    let record = StepRecord::new(
        key,
        StepId::of_parts(&[b"i"]),
        "make",
        StepSpec::bare("exec", 1, BTreeMap::new()),
        output,
    );
    store.commit(&[StepCommit { record, manifest }]).unwrap();
    store.put_run(&run_record(1, StepStatus::Pending)).unwrap();
    (store, key, output)
}

fn run_record(id: u64, status: StepStatus) -> RunRecord {
    RunRecord {
        id,
        recipe_name: "r".into(),
        recipe_path: "r.toml".into(),
        recipe_dir: "/tmp".into(),
        recipe_text: String::new(),
        sets: vec![],
        rerun_of: None,
        started: 1,
        ended: None,
        state: RunState::Running,
        arms: vec![],
        steps: vec![RunStep {
            id: StepId::of_parts(&[b"i"]),
            name: "make".into(),
            op: "exec".into(),
            bindings: BTreeMap::new(),
            arms: vec![],
            inputs: BTreeMap::new(),
            key: None,
            status,
            attempts: vec![],
        }],
    }
}

/// The store held and served, as `needle run` holds it.
fn serve(root: &Path) -> (Arc<Store>, Arc<LiveRun>, Server, StepKey, ArtifactDigest) {
    let (store, key, output) = store_with_a_step(root);
    let store = Arc::new(store);
    let live = Arc::new(LiveRun::new(1));
    let server = Server::start(store.clone(), live.clone()).unwrap();
    (store, live, server, key, output)
}

#[test]
fn a_free_store_is_read_by_the_reader_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (store, key, _) = store_with_a_step(&root);
    drop(store);
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(!reader.is_remote());
    assert_eq!(reader.step(&key).unwrap().unwrap().name, "make");
    assert_eq!(reader.live_run(), None);
}

#[test]
fn a_served_store_answers_as_the_store_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (store, _live, _server, key, output) = serve(&root);
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(reader.is_remote());
    assert_eq!(reader.live_run(), Some(1));

    assert_eq!(reader.step(&key).unwrap(), store.step(&key).unwrap());
    assert_eq!(reader.step(&StepKey::of_parts(&[b"no"])).unwrap(), None);
    assert_eq!(
        reader.steps_named("make").unwrap(),
        store.steps_named("make").unwrap()
    );
    assert_eq!(
        reader.manifest(&output).unwrap(),
        store.manifest(&output).unwrap()
    );
    assert_eq!(reader.producers(&output).unwrap(), vec![key]);
    assert_eq!(reader.consumers(&output).unwrap(), vec![]);
    assert_eq!(
        reader.find_prefix(&key.hex()[..6]).unwrap(),
        vec![Found::Step(key)]
    );
    assert_eq!(reader.counts().unwrap(), store.counts().unwrap());
    assert_eq!(reader.runs().unwrap(), store.runs().unwrap());
    assert_eq!(reader.gpu_usage(1).unwrap(), None);
    let mut usage = crate::store::GpuUsage::new(1, "nvidia-smi", 500, 0);
    usage.add_gpu(
        "0",
        &crate::store::GpuIdentity {
            index: 0,
            uuid: "GPU-0".into(),
            name: "Test GPU".into(),
        },
    );
    store.put_gpu_usage(&usage).unwrap();
    assert_eq!(reader.gpu_usage(1).unwrap(), Some(usage));
    // The runner builds the view; the reader reads its files.
    let view = reader.view(&output).unwrap();
    assert_eq!(std::fs::read(view.join("a.txt")).unwrap(), b"alpha");
    // An error the store gives comes back as its message.
    let missing = ArtifactDigest::of_parts(&[b"missing"]);
    match reader.view(&missing) {
        Err(StoreError::RunnerAnswer { message }) => {
            assert!(message.contains(&missing.hex()), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_store_whose_socket_path_is_too_long_for_an_address_is_served_too() {
    let tmp = tempfile::tempdir().unwrap();
    let long = "a-directory-name-of-sixty-characters-to-push-the-path-along--";
    let root = tmp.path().join(long).join(long).join("s");
    assert!(socket_path(&root).as_os_str().len() > MAX_SOCKET_PATH);
    let (store, _live, server, key, _) = serve(&root);
    assert!(socket_path(&root).exists(), "the socket is in the store");
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(reader.is_remote());
    assert_eq!(reader.step(&key).unwrap(), store.step(&key).unwrap());
    drop(reader);
    drop(server);
    assert!(
        !socket_path(&root).exists(),
        "the socket goes with its server"
    );
}

#[test]
fn the_live_run_is_answered_as_far_as_the_loop_has_got() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (store, live, _server, _key, output) = serve(&root);
    // The loop copies its record on its ticks, when a reader has asked.
    let ticking = {
        let live = live.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while live.is_going() && t0.elapsed() < Duration::from_secs(20) {
                live.offer(|| LiveSnapshot {
                    record: run_record(1, StepStatus::Succeeded { output }),
                    logs: BTreeMap::from([(0, "/somewhere/log".into())]),
                });
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    let run = reader.run(1).unwrap().unwrap();
    assert_eq!(run.steps[0].status, StepStatus::Succeeded { output });
    assert_eq!(reader.runs().unwrap()[0].executed, 1);
    assert_eq!(
        reader.live_log(1, 0).unwrap(),
        Some("/somewhere/log".into())
    );
    assert_eq!(reader.live_log(1, 1).unwrap(), None);
    assert_eq!(reader.live_log(2, 0).unwrap(), None);

    // Once the run has ended, its stored record answers.
    live.end();
    ticking.join().unwrap();
    assert_eq!(reader.run(1).unwrap(), store.run(1).unwrap());
    assert_eq!(reader.runs().unwrap()[0].executed, 0);
}

#[test]
fn a_busy_loop_leaves_the_stored_record_to_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (store, _live, _server, _key, _output) = serve(&root);
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    let t0 = Instant::now();
    assert_eq!(reader.run(1).unwrap(), store.run(1).unwrap());
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// A raw connection to the socket, and one line read back.
fn raw(root: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(socket_path(root)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn line(r: &mut BufReader<UnixStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

#[test]
fn garbage_gets_an_error_and_the_connection_closes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (_store, _live, _server, key, _) = serve(&root);

    let (mut s, mut r) = raw(&root);
    s.write_all(b"\x00\xffnot json at all\n").unwrap();
    assert!(line(&mut r).starts_with("{\"error\":\"not a request"));
    assert_eq!(line(&mut r), "", "closed after it");

    let (mut s, mut r) = raw(&root);
    s.write_all(b"{\"op\":\"drop_everything\"}\n").unwrap();
    assert!(line(&mut r).contains("unknown variant"));

    // A line without end: cut off at the limit.
    let (mut s, mut r) = raw(&root);
    let _ = s.write_all(&vec![b'x'; MAX_REQUEST + 10]);
    assert!(line(&mut r).contains("at most"));

    // Others are served all along.
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(reader.step(&key).unwrap().is_some());
}

#[test]
fn clients_that_hang_or_vanish_cost_only_their_own_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (_store, _live, _server, key, output) = serve(&root);
    // Asking and leaving before the answer.
    for _ in 0..20 {
        let mut s = UnixStream::connect(socket_path(&root)).unwrap();
        let _ =
            s.write_all(format!("{{\"op\":\"manifest\",\"artifact\":\"{output}\"}}\n").as_bytes());
        drop(s);
    }
    // Connections that never send, more than the server serves at once: each holds a thread
    // until it idles out, and the ones over the limit are closed at once.
    let hanging: Vec<UnixStream> = (0..server::MAX_CLIENTS + 2)
        .map(|_| UnixStream::connect(socket_path(&root)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(hanging);
    // The server is still there for the next reader.
    let t0 = Instant::now();
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(reader.is_remote());
    assert!(reader.step(&key).unwrap().is_some());
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_half_line_then_silence_is_not_an_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (_store, _live, _server, _key, _) = serve(&root);
    let (mut s, mut r) = raw(&root);
    s.write_all(b"{\"op\":\"hel").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "no answer to half a request");
}

#[test]
fn a_stale_socket_is_ignored_and_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (store, key, _) = store_with_a_step(&root);
    // A killed runner's socket: the file stays, nobody listens.
    drop(UnixListener::bind(socket_path(&root)).unwrap());
    assert!(socket_path(&root).exists());

    // Held by a process that does not serve: the lock's holder is named, after the grace.
    let t0 = Instant::now();
    match Reader::open(&root, LockMode::Fail) {
        Err(StoreError::Locked { holder, .. }) => {
            assert!(holder.contains(&format!("pid {}", std::process::id())))
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a held store"),
    }
    assert!(t0.elapsed() >= client::GRACE);

    // Free: read directly.
    drop(store);
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(!reader.is_remote());
    drop(reader);

    // A new runner replaces the stale socket with its own, and removes it when done.
    let (store, _, _) = store_with_a_step(&root);
    let server = Server::start(Arc::new(store), Arc::new(LiveRun::new(9))).unwrap();
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(reader.step(&key).unwrap().is_some());
    drop(server);
    assert!(!socket_path(&root).exists());
}

#[test]
fn a_reader_whose_runner_ends_goes_on_with_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("s");
    let (store, live, server, key, _) = serve(&root);
    let reader = Reader::open(&root, LockMode::Fail).unwrap();
    assert!(reader.is_remote());
    assert!(reader.step(&key).unwrap().is_some());
    // The run ends as `needle run` ends it: the server stops (ending the reader's
    // connection), then the store is let go.
    live.end();
    drop(server);
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "the server's threads let go of the store"
    );
    drop(store);
    assert_eq!(reader.step(&key).unwrap().unwrap().name, "make");
    assert!(!reader.is_remote(), "it read the store itself");
}

#[test]
fn the_loop_copies_its_record_only_when_a_reader_asked() {
    let live = Arc::new(LiveRun::new(3));
    live.offer(|| panic!("nobody asked for a copy"));
    let reader = {
        let live = live.clone();
        std::thread::spawn(move || live.current().map(|c| c.record.id))
    };
    // The loop's ticks, until the reader has its copy.
    let t0 = Instant::now();
    while !reader.is_finished() {
        live.offer(|| LiveSnapshot {
            record: run_record(3, StepStatus::Pending),
            logs: BTreeMap::new(),
        });
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(reader.join().unwrap(), Some(3));
    // Served: no more copies until someone asks again.
    live.offer(|| panic!("nobody asked again"));
    live.end();
    assert!(
        live.current().is_none(),
        "an ended run is read from the store"
    );
}
