//! `needle report`: one self-contained HTML file for a run. Opened in headless Chromium, it
//! renders without errors and shows the results table, a plot and the images; the screenshot
//! is kept in `target/test-artifacts/report.png`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// An "evaluation" per arm: metrics shaped like `evaluate`'s, a PNG grid, a summary table.
const EVAL: &str = r#"
import json, os, struct, sys, zlib
size, arch = int(sys.argv[1]), sys.argv[2]
win = min(0.95, 0.5 + 0.1 * len(str(size)) + (0.05 if arch == "b" else 0))
out = os.environ["NEEDLE_OUT"]
json.dump({"appeal": {"win": win, "tie": 0.02, "lose": 0.98 - win, "wilson95": [win - 0.05, win + 0.04]},
           "faithfulness": {"win": 0.3, "tie": 0.5, "lose": 0.2, "wilson95": [0.25, 0.35]}},
          open(f"{out}/metrics.json", "w"))
w, h = 24, 12
rows = b"".join(b"\x00" + bytes(v for x in range(w) for v in ((x * 10) % 256, (size // 10) % 256, 200)) for _ in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
open(f"{out}/grid.png", "wb").write(png)
open(f"{out}/summary.md", "w").write(f"| axis | win |\n|---|---:|\n| visual appeal | {win:.3f} |\n")
"#;

const RECIPE: &str = r#"
[recipe]
name = "report-sweep"

[sweep]
size = [10, 100, 1000]
arch = ["a", "b"]

[steps.data]
op = "exec"
cmd = ["sh", "-c", "echo data > \"$NEEDLE_OUT/d\""]

[steps.evaluate]
op = "exec"
inputs = { data = "data" }
cmd = ["python3", "eval.py", "${size}", "${arch}"]
code = ["eval.py"]
params = { size = "${size}", arch = "${arch}" }
"#;

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            && out.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    panic!(
        "no chromium: `make test` installs it (scripts/setup.sh --test), or apt-get install chromium"
    );
}

fn headless(browser: &Path, args: &[&str]) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
        ])
        .args(args)
        .output()
        .expect("chromium runs")
}

#[test]
fn the_report_of_a_sweep_renders_its_table_plot_and_images() {
    let p = Project::new();
    p.write("eval.py", EVAL);
    p.write("recipe.toml", RECIPE);
    p.json(&["run", "recipe.toml"], 0);
    let html_path = p.path("report.html");
    let out = p.needle(&["report", "last", "-o", html_path.to_str().unwrap()]);
    assert_code(&out, 0);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(!html.contains("src=\"http"), "nothing to fetch: {html}");
    assert_eq!(html.matches("<table class=\"results\"").count(), 1);
    assert_eq!(
        html.matches("<svg class=\"plot\"").count(),
        2,
        "appeal and faithfulness"
    );
    assert_eq!(html.matches("data:image/png;base64,").count(), 6);

    let browser = chromium();
    let url = format!("file://{}", html_path.display());
    let dom = headless(&browser, &["--dump-dom", &url]);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("data-rendered=\"yes\""),
        "the page did not finish loading"
    );
    assert!(!dom.contains("data-errors"), "script errors: {dom}");
    assert!(dom.contains("data-images=\"6\""), "six grids");
    assert!(
        dom.contains("data-images-loaded=\"6\""),
        "every image decodes"
    );
    assert!(dom.contains("<table class=\"results\""));
    assert!(dom.contains("<svg class=\"plot\""));

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("report.png");
    let _ = std::fs::remove_file(&shot);
    let out = headless(
        &browser,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1300,2600",
            &url,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn results_prints_the_sweep_table_as_text_csv_and_json() {
    let p = Project::new();
    p.write("eval.py", EVAL);
    p.write("recipe.toml", RECIPE);
    p.json(&["run", "recipe.toml"], 0);

    let text = stdout(&p.needle(&["results", "last"]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("step") && lines[0].contains("appeal win"),
        "{text}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("evaluate")).count(),
        6,
        "{text}"
    );
    assert!(
        text.contains("95.0% [90.0–99.0]"),
        "arch b, size 1000:\n{text}"
    );

    let csv = stdout(&p.needle(&["results", "last", "--csv"]));
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 7, "{csv}");
    assert_eq!(
        rows[0],
        "step,arch,size,appeal win,appeal lose,faithfulness win,faithfulness lose"
    );

    let json = p.json(&["results", "last"], 0);
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert!(
        rows.iter()
            .all(|r| r["metrics"]["appeal"]["win"].is_number())
    );

    let none = stdout(&p.needle(&["results", "last", "--step", "data"]));
    assert!(none.contains("no step wrote a metrics.json"), "{none}");
}
