//! `needle doctor`: what the installation has, without a GPU.

use crate::common::*;

#[test]
fn doctor_reports_libtorch_no_cuda_and_the_store() {
    let p = Project::new();
    // CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    let out = p
        .cmd(&["doctor"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("libtorch    2.11.0"), "{text}");
    assert!(text.contains("cuda        no"), "{text}");
    assert!(text.contains("none yet"), "no store yet: {text}");
    assert!(!p.store().exists(), "doctor creates no store");

    p.write(
        "recipe.toml",
        "[recipe]\nname = \"r\"\n[steps.s]\nop = \"exec\"\ncmd = [\"true\"]\n",
    );
    p.json(&["run", "recipe.toml"], 0);
    let v = p.json(&["doctor"], 0);
    assert!(
        v["libtorch"]["version"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0")
    );
    assert_eq!(v["store"]["counts"]["steps"], 1);
    assert_eq!(v["store"]["counts"]["runs"], 1);
    assert!(v["store"]["size_bytes"].as_u64().unwrap() > 0);
    assert!(v["cpus"].as_u64().unwrap() >= 1);
}

#[test]
fn doctor_says_when_a_run_holds_the_store() {
    let p = Project::new();
    p.write(
        "recipe.toml",
        r#"
[recipe]
name = "r"
[steps.s]
op = "exec"
cmd = ["sh", "-c", "while [ ! -e \"$NEEDLE_RECIPE_DIR/go\" ]; do sleep 0.05; done"]
"#,
    );
    let mut run = p.background(&["run", "recipe.toml"]).spawn().unwrap();
    // Wait for the run to hold the lock (its lock file names it).
    let lock = p.store().join("lock");
    for _ in 0..100 {
        if std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("needle run")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The step holds the run open until doctor has answered, however slow that is.
    let out = p.needle(&["doctor"]);
    p.write("go", "");
    run.wait().unwrap();
    assert_code(&out, 0);
    let text = stdout(&out);
    // The run counts for doctor through its socket.
    assert!(text.contains("in use by run 1"), "{text}");
    assert!(text.contains(" steps, "), "{text}");
}
