//! `needle report RUN`: one self-contained HTML file — the run's summary and timeline, the
//! results across the sweep as a table and as plots with their intervals, the ops' summaries
//! (the curation funnel…), the sample grids, and the DAG. Pictures are inline SVG or PNGs as
//! data URIs, so the file opens anywhere, offline.

pub mod markdown;
pub mod search;
pub mod svg;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use base64::Engine;
use needle_core::digest::ArtifactDigest;
use needle_core::recipe::bindings_label;
use needle_core::store::{
    EntryKind, GpuUsage, Millis, RunRecord, RunStep, StepStatus, StoreRead, fmt_ms, now_millis,
};
use needle_core::value::{Value, render_short};

use crate::error::CliError;
use crate::gpu_usage;
use svg::{GpuChart, Series, Span, UsageBucket, esc};

/// Pictures larger than this are linked by path, not embedded, to keep the file quick to open.
const MAX_EMBEDDED_IMAGE: u64 = 4 * 1024 * 1024;
/// Embedded pictures in all.
const MAX_IMAGES: usize = 48;

fn output_of(step: &RunStep) -> Option<ArtifactDigest> {
    match &step.status {
        StepStatus::Cached { output } | StepStatus::Succeeded { output } => Some(*output),
        _ => None,
    }
}

fn label(step: &RunStep) -> String {
    if step.bindings.is_empty() {
        step.name.clone()
    } else {
        format!("{}[{}]", step.name, bindings_label(&step.bindings))
    }
}

/// A file at the top of an artifact: its bytes, if present and not larger than `max`.
fn read_file(
    store: &dyn StoreRead,
    artifact: &ArtifactDigest,
    path: &str,
    max: u64,
) -> Result<Option<Vec<u8>>, CliError> {
    let Some(manifest) = store.manifest(artifact)? else {
        return Ok(None);
    };
    for e in &manifest.entries {
        if e.path == path
            && let EntryKind::File { blob, size, .. } = &e.kind
        {
            if *size > max {
                return Ok(None);
            }
            return Ok(std::fs::read(store.blob_path(blob)).ok());
        }
    }
    Ok(None)
}

pub fn build(store: &dyn StoreRead, run: &RunRecord) -> Result<String, CliError> {
    let mut body = String::new();
    header(run, &mut body);
    shared(store, run, &mut body)?;
    let usage = store.gpu_usage(run.id)?;
    let live = store.is_live(run.id);
    timeline(run, usage.as_ref(), live, &mut body);
    results(store, run, &mut body)?;
    search::section(store, run, &mut body)?;
    summaries(store, run, &mut body)?;
    images(store, run, &mut body)?;
    dag(run, &mut body);
    Ok(page(
        &format!("needle run {} — {}", run.id, run.recipe_name),
        &body,
    ))
}

fn header(run: &RunRecord, out: &mut String) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &run.steps {
        *counts.entry(s.status.label()).or_default() += 1;
    }
    let duration = run
        .ended
        .map(|e| fmt_ms(e.saturating_sub(run.started)))
        .unwrap_or_else(|| "(still running or stopped)".into());
    let _ = write!(
        out,
        "<h1>{}</h1><p class=\"meta\">run {} · {} · started {} · took {} · {} steps in {} arm(s)</p>",
        esc(&run.recipe_name),
        run.id,
        esc(&format!("{:?}", run.state).to_lowercase()),
        esc(&crate::commands::fmt_time(run.started)),
        esc(&duration),
        run.steps.len(),
        run.arms.len()
    );
    out.push_str("<p class=\"counts\">");
    for (status, n) in &counts {
        let _ = write!(
            out,
            "<span class=\"pill\" style=\"background:{}\">{n} {status}</span> ",
            svg::status_colour(status)
        );
    }
    out.push_str("</p>");
    if !run.sets.is_empty() {
        let sets: Vec<String> = run
            .sets
            .iter()
            .map(|(k, v)| format!("{k}={}", render_short(v)))
            .collect();
        let _ = write!(out, "<p>--set {}</p>", esc(&sets.join(" ")));
    }
}

/// Steps another run executed while this one ran (a run that joined a runner, or that a run
/// joined): this run waited for them and took their outputs. Told from the step records: an
/// execution by another run that ended after this run started.
fn shared(store: &dyn StoreRead, run: &RunRecord, out: &mut String) -> Result<(), CliError> {
    let mut by_run: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for s in &run.steps {
        let (StepStatus::Cached { output }, Some(key)) = (&s.status, s.key) else {
            continue;
        };
        let Some(record) = store.step(&key)? else {
            continue;
        };
        if let Some(e) = record
            .executions
            .iter()
            .find(|e| e.run != run.id && e.output == *output && e.ended >= run.started)
        {
            by_run.entry(e.run).or_default().push(label(s));
        }
    }
    for (other, steps) in by_run {
        let names: Vec<String> = steps
            .iter()
            .map(|s| format!("<code>{}</code>", esc(s)))
            .collect();
        let _ = write!(
            out,
            "<p class=\"shared\">shared with run {other}, which executed them while this run ran: {}</p>",
            names.join(", ")
        );
    }
    Ok(())
}

fn timeline(run: &RunRecord, usage: Option<&GpuUsage>, live: bool, out: &mut String) {
    let spans: Vec<Span> = run
        .steps
        .iter()
        .flat_map(|s| {
            s.attempts.iter().map(move |a| Span {
                label: format!("{} (attempt {})", label(s), a.n),
                start: a.started.saturating_sub(run.started),
                end: a.ended.saturating_sub(run.started),
                status: if a.result.describe() == "succeeded" {
                    "succeeded".into()
                } else {
                    "failed".into()
                },
                gpus: gpu_usage::attempt_gpus(a),
            })
        })
        .collect();
    let end = gpu_usage::run_end(run, usage, live, now_millis());
    let charts = usage.map_or_else(Vec::new, |u| gpu_charts(run, u, end));
    let cached = run
        .steps
        .iter()
        .filter(|s| matches!(s.status, StepStatus::Cached { .. }))
        .count();
    let _ = write!(
        out,
        "<h2>Timeline</h2><p>Each executed attempt on its GPU or CPU lane (steps sharing a GPU at once on rows of their own in its lane); {cached} step(s) were cached and took no time.",
    );
    if let Some(u) = usage.filter(|u| !u.gpus.is_empty()) {
        let _ = write!(
            out,
            " Under each GPU, its utilisation (mean) and memory used (peak) per {}, sampled every {} through {}.",
            fmt_ms(u.bucket_ms),
            fmt_ms(u.interval_ms),
            esc(&u.source)
        );
    }
    let _ = write!(
        out,
        "</p>{}",
        svg::timeline(&spans, &charts, end.saturating_sub(run.started))
    );
}

/// Each sampled GPU's buckets, placed on the run's time axis, with its summary.
fn gpu_charts(run: &RunRecord, usage: &GpuUsage, end: Millis) -> Vec<GpuChart> {
    let offset = usage.start.saturating_sub(run.started);
    gpu_usage::summarise(run, usage, end)
        .into_iter()
        .zip(&usage.gpus)
        .map(|(summary, series)| {
            let buckets = (0..series.n.len())
                .filter(|&i| series.n[i] > 0)
                .map(|i| UsageBucket {
                    start: offset + i as u64 * usage.bucket_ms,
                    end: offset + (i as u64 + 1) * usage.bucket_ms,
                    util: series.util[i],
                    memory_mib: series.memory_mib[i],
                })
                .collect();
            let busy = summary
                .busy_percent
                .map_or_else(|| "no utilisation reported".into(), |b| format!("busy {b:.0}%"));
            GpuChart {
                id: series.id.clone(),
                buckets,
                memory_total_mib: series.memory_total_mib,
                busy_percent: summary.busy_percent,
                summary: format!(
                    "{} ({}): {busy}, peak memory {:.1} of {:.1} GiB, held by steps {:.0}% of the run",
                    series.name,
                    series.uuid,
                    series.memory_peak_mib() as f64 / 1024.0,
                    series.memory_total_mib as f64 / 1024.0,
                    summary.held_percent
                ),
            }
        })
        .collect()
}

/// What a metrics file says, flattened to the columns the table shows.
pub struct Row {
    /// Index into the run's steps.
    pub step: usize,
    /// The whole `metrics.json`.
    pub metrics: serde_json::Value,
    /// (column, cell), in the order the metrics give them.
    pub columns: Vec<(String, String)>,
    /// For the plots.
    axes: Vec<AxisResult>,
}

/// An evaluation axis (appeal, faithfulness): the win rate and its Wilson interval.
struct AxisResult {
    axis: String,
    win: f64,
    interval: Option<(f64, f64)>,
}

fn metrics_row(step: usize, m: &serde_json::Value) -> Row {
    let mut columns = Vec::new();
    let mut axes = Vec::new();
    let pct = |v: &serde_json::Value| v.as_f64().map(|x| format!("{:.1}%", 100.0 * x));
    for axis in ["appeal", "faithfulness"] {
        let a = &m[axis];
        if let Some(win) = a["win"].as_f64() {
            let interval = a["wilson95"]
                .as_array()
                .and_then(|v| Some((v.first()?.as_f64()?, v.get(1)?.as_f64()?)));
            let mut cell = pct(&a["win"]).unwrap_or_default();
            if let Some((lo, hi)) = interval {
                cell.push_str(&format!(" [{:.1}–{:.1}]", 100.0 * lo, 100.0 * hi));
            }
            columns.push((format!("{axis} win"), cell));
            if let Some(l) = pct(&a["lose"]) {
                columns.push((format!("{axis} lose"), l));
            }
            axes.push(AxisResult {
                axis: axis.to_string(),
                win,
                interval,
            });
        }
    }
    if axes.is_empty()
        && let Some(obj) = m.as_object()
    {
        for (k, v) in obj.iter().filter(|(_, v)| v.is_number()).take(8) {
            let cell = match v.as_f64() {
                Some(x) if v.is_f64() => format!("{}", (x * 1e4).round() / 1e4),
                _ => render_short(v),
            };
            columns.push((k.clone(), cell));
        }
    }
    Row {
        step,
        metrics: m.clone(),
        columns,
        axes,
    }
}

/// Every step of the run whose output holds a `metrics.json`, by step name, in run order.
pub fn metric_rows(
    store: &dyn StoreRead,
    run: &RunRecord,
) -> Result<BTreeMap<String, Vec<Row>>, CliError> {
    let mut by_name: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for (i, s) in run.steps.iter().enumerate() {
        let Some(output) = output_of(s) else { continue };
        let Some(bytes) = read_file(store, &output, "metrics.json", 1 << 20)? else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        by_name
            .entry(s.name.clone())
            .or_default()
            .push(metrics_row(i, &m));
    }
    Ok(by_name)
}

/// The swept vars of `rows`' steps and their union of columns, in first-seen order.
pub fn table_columns<'a>(
    run: &'a RunRecord,
    rows: &'a [Row],
) -> (Vec<&'a String>, Vec<&'a String>) {
    let vars: BTreeSet<&String> = rows
        .iter()
        .flat_map(|r| run.steps[r.step].bindings.keys())
        .collect();
    let mut cols: Vec<&String> = Vec::new();
    for (c, _) in rows.iter().flat_map(|r| &r.columns) {
        if !cols.contains(&c) {
            cols.push(c);
        }
    }
    (vars.into_iter().collect(), cols)
}

impl Row {
    /// The cell of `column`, empty when this row has none.
    pub fn cell(&self, column: &str) -> &str {
        self.columns
            .iter()
            .find(|(k, _)| k == column)
            .map_or("", |(_, v)| v.as_str())
    }
}

fn results(store: &dyn StoreRead, run: &RunRecord, out: &mut String) -> Result<(), CliError> {
    let by_name = metric_rows(store, run)?;
    if by_name.is_empty() {
        return Ok(());
    }
    out.push_str("<h2>Results</h2>");
    for (name, rows) in &by_name {
        let (vars, cols) = table_columns(run, rows);
        let _ = write!(out, "<h3>{}</h3><table class=\"results\"><tr>", esc(name));
        for v in vars.iter().chain(cols.iter()) {
            let _ = write!(out, "<th>{}</th>", esc(v));
        }
        out.push_str("</tr>");
        for r in rows {
            out.push_str("<tr>");
            let b = &run.steps[r.step].bindings;
            for v in &vars {
                let _ = write!(
                    out,
                    "<td>{}</td>",
                    esc(&b.get(*v).map(render_short).unwrap_or_default())
                );
            }
            for c in &cols {
                let _ = write!(out, "<td>{}</td>", esc(r.cell(c)));
            }
            out.push_str("</tr>");
        }
        out.push_str("</table>");
        plots(run, name, rows, out);
    }
    Ok(())
}

/// Win rate against a numeric swept var, a series per value of the other swept vars.
fn plots(run: &RunRecord, name: &str, rows: &[Row], out: &mut String) {
    let bindings = |r: &Row| &run.steps[r.step].bindings;
    let vars: BTreeSet<&String> = rows.iter().flat_map(|r| bindings(r).keys()).collect();
    let x_var = vars.into_iter().find(|v| {
        let values: BTreeSet<String> = rows
            .iter()
            .filter_map(|r| bindings(r).get(*v).map(render_short))
            .collect();
        values.len() > 1
            && rows
                .iter()
                .all(|r| bindings(r).get(*v).and_then(Value::as_f64).is_some())
    });
    let Some(x_var) = x_var else { return };
    let axes: BTreeSet<&String> = rows
        .iter()
        .flat_map(|r| r.axes.iter().map(|a| &a.axis))
        .collect();
    for axis in axes {
        let mut series: BTreeMap<String, Vec<svg::Point>> = BTreeMap::new();
        for r in rows {
            let b = bindings(r);
            let Some(x) = b.get(x_var).and_then(Value::as_f64) else {
                continue;
            };
            let Some(a) = r.axes.iter().find(|a| &a.axis == axis) else {
                continue;
            };
            let mut others = b.clone();
            others.remove(x_var);
            let key = if others.is_empty() {
                name.to_string()
            } else {
                bindings_label(&others)
            };
            series.entry(key).or_default().push((x, a.win, a.interval));
        }
        let series: Vec<Series> = series
            .into_iter()
            .map(|(label, mut points)| {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series { label, points }
            })
            .collect();
        out.push_str(&svg::plot(
            &format!("{name}: {axis} win rate (Wilson 95%)"),
            x_var,
            "win rate",
            &series,
            svg::YScale::Percent,
        ));
    }
}

fn summaries(store: &dyn StoreRead, run: &RunRecord, out: &mut String) -> Result<(), CliError> {
    let mut any = false;
    for s in &run.steps {
        let Some(output) = output_of(s) else { continue };
        let Some(bytes) = read_file(store, &output, needle_ops::SUMMARY, 64 * 1024)? else {
            continue;
        };
        if !any {
            out.push_str("<h2>Step summaries</h2>");
            any = true;
        }
        // The funnel and the evaluations open; the rest fold.
        let open = if matches!(s.op.as_str(), "filter" | "evaluate") {
            " open"
        } else {
            ""
        };
        let _ = write!(
            out,
            "<details{open}><summary>{} <span class=\"op\">({})</span></summary>{}</details>",
            esc(&label(s)),
            esc(&s.op),
            markdown::to_html(&String::from_utf8_lossy(&bytes))
        );
    }
    Ok(())
}

fn images(store: &dyn StoreRead, run: &RunRecord, out: &mut String) -> Result<(), CliError> {
    let mut shown = 0;
    // Evaluations first (baseline | candidate per prompt), then every sample grid.
    let mut steps: Vec<&RunStep> = run.steps.iter().collect();
    steps.sort_by_key(|s| (s.op != "evaluate", s.name.clone(), label(s)));
    let mut figures = String::new();
    for s in steps {
        if shown >= MAX_IMAGES {
            break;
        }
        let Some(output) = output_of(s) else { continue };
        let Some(png) = read_file(store, &output, "grid.png", MAX_EMBEDDED_IMAGE)? else {
            continue;
        };
        let caption = if s.op == "evaluate" {
            format!("{}: baseline | candidate, a row per prompt", label(s))
        } else {
            format!("{}: a row per prompt, a column per seed", label(s))
        };
        let _ = write!(
            figures,
            "<figure><img alt=\"{}\" src=\"data:image/png;base64,{}\"><figcaption>{}</figcaption></figure>",
            esc(&label(s)),
            base64::engine::general_purpose::STANDARD.encode(&png),
            esc(&caption)
        );
        shown += 1;
    }
    if shown > 0 {
        let _ = write!(out, "<h2>Samples</h2><div class=\"grids\">{figures}</div>");
    }
    Ok(())
}

fn dag(run: &RunRecord, out: &mut String) {
    let nodes: Vec<svg::Node> = run
        .steps
        .iter()
        .map(|s| svg::Node {
            label: label(s),
            status: s.status.label().to_string(),
            inputs: s.inputs.values().flatten().copied().collect(),
        })
        .collect();
    let _ = write!(
        out,
        "<h2>Lineage</h2><p>The run's steps, inputs to the left; colour by status.</p><div class=\"scroll\">{}</div>",
        svg::dag(&nodes)
    );
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} .meta {{ color: #666; }}
.pill {{ color: white; padding: 2px 8px; border-radius: 10px; font-size: 0.9em; }}
table {{ border-collapse: collapse; margin: 0.8em 0; }}
td, th {{ border: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
th {{ background: #f4f4f4; }}
details {{ margin: 0.5em 0; }} summary {{ cursor: pointer; font-weight: bold; }}
.op {{ color: #888; font-weight: normal; }}
.grids {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
figure {{ margin: 0; }} figure img {{ image-rendering: pixelated; max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
.scroll {{ overflow-x: auto; }}
</style></head>
<body>
{body}
<script>
// Lets a headless browser (and a test) see that the page rendered: errors and images.
window.addEventListener('error', function (e) {{
  document.body.dataset.errors = (document.body.dataset.errors || '') + e.message + ';';
}});
window.addEventListener('load', function () {{
  var imgs = Array.prototype.slice.call(document.images);
  document.body.dataset.imagesLoaded = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.dataset.images = imgs.length;
  document.body.dataset.rendered = 'yes';
}});
</script>
</body></html>
"#,
        title = esc(title),
        body = body
    )
}
