//! The report's pictures, drawn as inline SVG: a run's timeline, a line plot with error bars,
//! and the run's DAG. Plain strings, no dependencies: the report must open offline.

use std::fmt::Write;

/// `<`, `>`, `&` and quotes escaped, for text and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Colours by step status (also the legend's).
pub fn status_colour(status: &str) -> &'static str {
    match status {
        "succeeded" => "#2e7d32",
        "cached" => "#90a4ae",
        "failed" => "#c62828",
        "skipped" => "#ffb300",
        "interrupted" => "#8e24aa",
        _ => "#bdbdbd",
    }
}

/// One bar of the timeline.
pub struct Span {
    pub label: String,
    /// Milliseconds from the run's start.
    pub start: u64,
    pub end: u64,
    pub status: String,
    /// The GPU ids it held; empty for a CPU step.
    pub gpus: Vec<String>,
}

/// A GPU's sampled usage, drawn under its lane: utilisation and memory as area charts.
pub struct GpuChart {
    /// The GPU id, as the spans name it.
    pub id: String,
    /// Buckets with samples, in time order.
    pub buckets: Vec<UsageBucket>,
    pub memory_total_mib: u64,
    /// Mean utilisation over the run (%), when the GPU reports one.
    pub busy_percent: Option<f64>,
    /// What a pointer over the charts says (busy share, peak memory).
    pub summary: String,
}

/// One stretch of a [`GpuChart`].
pub struct UsageBucket {
    /// Milliseconds from the run's start.
    pub start: u64,
    pub end: u64,
    /// Mean utilisation (%), when the GPU reports one.
    pub util: Option<f32>,
    /// Peak memory used (MiB).
    pub memory_mib: u64,
}

/// A row of the timeline.
enum Row<'a> {
    /// Bars that never overlap. `label` names the lane on its first row only.
    Bars {
        label: String,
        spans: Vec<&'a Span>,
    },
    Chart(AreaChart),
}

/// One of a GPU's charts: stretches `(start, end, value)`, the row's height standing for `top`.
struct AreaChart {
    class: &'static str,
    colour: &'static str,
    /// In the label column: what it shows, and its figure over the run.
    label: String,
    /// What a pointer over it says.
    title: String,
    top: f64,
    values: Vec<(u64, u64, Option<f64>)>,
}

const BAR_ROW: f64 = 22.0;
const CHART_ROW: f64 = 30.0;

/// Bars that overlap in time on rows of their own, first free row first: each row's spans
/// in start order.
fn rows_for(mut spans: Vec<&Span>) -> Vec<Vec<&Span>> {
    spans.sort_by_key(|s| (s.start, s.end));
    let mut rows: Vec<Vec<&Span>> = Vec::new();
    for s in spans {
        match rows
            .iter_mut()
            .find(|r| r.last().is_some_and(|last| last.end <= s.start))
        {
            Some(row) => row.push(s),
            None => rows.push(vec![s]),
        }
    }
    rows
}

/// GPU ids in a sensible order: numbers by value, then the others (UUIDs) by name.
fn gpu_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// A GPU's utilisation and memory charts.
fn chart_rows(chart: &GpuChart) -> [AreaChart; 2] {
    let title = format!("gpu {}: {}", chart.id, chart.summary);
    let peak = chart
        .buckets
        .iter()
        .map(|b| b.memory_mib)
        .max()
        .unwrap_or(0);
    let memory_top = if chart.memory_total_mib > 0 {
        chart.memory_total_mib
    } else {
        peak.max(1)
    };
    [
        AreaChart {
            class: "gpu-util",
            colour: "#1565c0",
            label: match chart.busy_percent {
                Some(b) => format!("util {b:.0}%"),
                None => "util n/a".into(),
            },
            title: title.clone(),
            top: 100.0,
            values: chart
                .buckets
                .iter()
                .map(|b| (b.start, b.end, b.util.map(f64::from)))
                .collect(),
        },
        AreaChart {
            class: "gpu-memory",
            colour: "#6a1b9a",
            label: format!("mem {:.1} GiB", peak as f64 / 1024.0),
            title,
            top: memory_top as f64,
            values: chart
                .buckets
                .iter()
                .map(|b| (b.start, b.end, Some(b.memory_mib as f64)))
                .collect(),
        },
    ]
}

/// The run's attempts as bars, on an axis at least `total` ms long. Each GPU has a lane (a bar
/// holding several GPUs is drawn in each of theirs); bars that overlap on one GPU (steps
/// sharing it) get rows of their own in its lane, and under it come its utilisation and
/// memory, where `charts` has them. CPU steps share lanes, first free first.
pub fn timeline(spans: &[Span], charts: &[GpuChart], total: u64) -> String {
    if spans.is_empty() && charts.is_empty() {
        return "<p>No step executed in this run.</p>".into();
    }
    let total = spans.iter().map(|s| s.end).fold(total, u64::max).max(1);
    let mut gpus: Vec<&str> = spans
        .iter()
        .flat_map(|s| s.gpus.iter().map(String::as_str))
        .chain(charts.iter().map(|c| c.id.as_str()))
        .collect();
    gpus.sort_by(|a, b| gpu_order(a, b));
    gpus.dedup();
    let mut rows: Vec<Row> = Vec::new();
    for gpu in gpus {
        let on_gpu = spans
            .iter()
            .filter(|s| s.gpus.iter().any(|g| g == gpu))
            .collect();
        let mut bars = rows_for(on_gpu);
        if bars.is_empty() {
            bars.push(Vec::new());
        }
        for (k, spans) in bars.into_iter().enumerate() {
            let label = if k == 0 {
                format!("gpu {gpu}")
            } else {
                String::new()
            };
            rows.push(Row::Bars { label, spans });
        }
        if let Some(chart) = charts.iter().find(|c| c.id == gpu) {
            rows.extend(chart_rows(chart).map(Row::Chart));
        }
    }
    let cpu = spans.iter().filter(|s| s.gpus.is_empty()).collect();
    for (k, spans) in rows_for(cpu).into_iter().enumerate() {
        rows.push(Row::Bars {
            label: format!("cpu {k}"),
            spans,
        });
    }

    let (left, width) = (90.0, 900.0);
    let x = |t: u64| left + width * t.min(total) as f64 / total as f64;
    let height: f64 = rows
        .iter()
        .map(|r| match r {
            Row::Bars { .. } => BAR_ROW,
            Row::Chart(_) => CHART_ROW,
        })
        .sum::<f64>()
        + 30.0;
    let mut out = format!(
        r#"<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-size="11" font-family="sans-serif">"#,
        left + width + 10.0
    );
    let mut y = 0.0;
    for row in &rows {
        match row {
            Row::Bars { label, spans } => {
                if !label.is_empty() {
                    // A lane begins: a rule above it, unless it is the first.
                    if y > 0.0 {
                        let _ = write!(
                            out,
                            r##"<line x1="0" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e0e0e0"/>"##,
                            x(total)
                        );
                    }
                    let _ = write!(out, r#"<text x="4" y="{}">{}</text>"#, y + 15.0, esc(label));
                }
                for s in spans {
                    let (x0, x1) = (x(s.start), x(s.end).max(x(s.start) + 1.5));
                    let _ = write!(
                        out,
                        r#"<rect x="{x0:.1}" y="{}" width="{:.1}" height="{}" fill="{}"><title>{} — {} ({:.1} s)</title></rect>"#,
                        y + 3.0,
                        x1 - x0,
                        BAR_ROW - 6.0,
                        status_colour(&s.status),
                        esc(&s.label),
                        esc(&s.status),
                        (s.end - s.start) as f64 / 1000.0
                    );
                }
                y += BAR_ROW;
            }
            Row::Chart(chart) => {
                area(&mut out, chart, y, &x);
                y += CHART_ROW;
            }
        }
    }
    let axis_y = y + 14.0;
    for k in 0..=4 {
        let t = total * k / 4;
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{axis_y}" text-anchor="middle">{:.1} s</text>"#,
            x(t),
            t as f64 / 1000.0
        );
    }
    out.push_str("</svg>");
    out
}

/// `chart` as a step-shaped area in the row at `y`: a flat top per stretch, at its value's
/// share of `top`; where there is no value the outline drops to the baseline.
fn area(out: &mut String, chart: &AreaChart, y: f64, x: &impl Fn(u64) -> f64) {
    let base = y + CHART_ROW - 3.0;
    let h = CHART_ROW - 6.0;
    let mut path = String::new();
    let mut at: Option<u64> = None; // where the outline is, when it is off the baseline
    for &(start, end, value) in &chart.values {
        let Some(v) = value else { continue };
        let top_y = base - h * (v / chart.top).clamp(0.0, 1.0);
        if at != Some(start) {
            if let Some(prev) = at {
                let _ = write!(path, "L{:.1},{base:.1}", x(prev));
            }
            let _ = write!(path, "M{:.1},{base:.1}", x(start));
        }
        let _ = write!(path, "L{:.1},{top_y:.1}L{:.1},{top_y:.1}", x(start), x(end));
        at = Some(end);
    }
    if let Some(prev) = at {
        let _ = write!(path, "L{:.1},{base:.1}Z", x(prev));
    }
    let _ = write!(
        out,
        r##"<g class="{}"><title>{}</title><text x="10" y="{:.1}" fill="#666">{}</text><line x1="{:.1}" x2="{:.1}" y1="{base:.1}" y2="{base:.1}" stroke="#ddd"/><path d="{path}" fill="{colour}" fill-opacity="0.35" stroke="{colour}" stroke-width="0.8"/></g>"##,
        chart.class,
        esc(&chart.title),
        y + 18.0,
        esc(&chart.label),
        x(0),
        x(u64::MAX),
        colour = chart.colour,
    );
}

/// A plotted point: x, y, and y's interval when there is one.
pub type Point = (f64, f64, Option<(f64, f64)>);

/// One series of a plot, its points sorted by x.
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

const PALETTE: [&str; 6] = [
    "#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f",
];

/// How a plot's y axis reads.
#[derive(Debug, Clone, Copy)]
pub enum YScale {
    /// Shares in [0, 1], shown as percent.
    Percent,
    /// Any values: the axis spans their range.
    Values,
}

/// A line plot with error bars, x on a log scale when its values span more than a factor of
/// 20 (tuning-set sizes do).
pub fn plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_scale: YScale,
) -> String {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let (min, max) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let log = min > 0.0 && max / min > 20.0;
    let tx = |x: f64| if log { x.ln() } else { x };
    let (lo, hi) = (tx(min), tx(max));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let (left, top, w, h) = (60.0, 30.0, 420.0, 220.0);
    let px = |x: f64| left + 10.0 + (w - 20.0) * (tx(x) - lo) / span;
    let (y_lo, y_hi) = match y_scale {
        YScale::Percent => (0.0, 1.0),
        YScale::Values => {
            let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
            let (a, b) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
                (a.min(y), b.max(y))
            });
            if a < b {
                (a - 0.05 * (b - a), b + 0.05 * (b - a))
            } else {
                (a - 1.0, a + 1.0)
            }
        }
    };
    let py = |y: f64| top + h - h * ((y - y_lo) / (y_hi - y_lo)).clamp(0.0, 1.0);
    let y_text = |y: f64| match y_scale {
        YScale::Percent => format!("{:.0}%", y * 100.0),
        YScale::Values => format!("{y:.4}"),
    };
    let mut out = format!(
        r##"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-size="11" font-family="sans-serif"><text x="{left}" y="16" font-size="13" font-weight="bold">{}</text><rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##,
        left + w + 170.0,
        top + h + 40.0,
        esc(title)
    );
    for k in 0..=4 {
        let y = y_lo + (y_hi - y_lo) * k as f64 / 4.0;
        let _ = write!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + w,
            left - 4.0,
            py(y) + 4.0,
            y_text(y),
            py = py(y)
        );
    }
    let mut ticks: Vec<f64> = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for t in &ticks {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            px(*t),
            top + h + 14.0,
            trim_float(*t)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>"#,
        left + w / 2.0,
        top + h + 32.0,
        esc(x_label),
        top + h / 2.0,
        top + h / 2.0,
        esc(y_label)
    );
    for (k, s) in series.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|(x, y, _)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y, interval) in &s.points {
            if let Some((a, b)) = interval {
                let _ = write!(
                    out,
                    r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{colour}"/>"#,
                    py(*a),
                    py(*b),
                    x = px(*x)
                );
            }
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}: {} → {}</title></circle>"#,
                px(*x),
                py(*y),
                esc(&s.label),
                trim_float(*x),
                y_text(*y)
            );
        }
        let ly = top + 12.0 + 16.0 * k as f64;
        let _ = write!(
            out,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            left + w + 12.0,
            ly - 9.0,
            left + w + 26.0,
            ly,
            esc(&s.label)
        );
    }
    out.push_str("</svg>");
    out
}

fn trim_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.3}")
    }
}

/// One node of the DAG picture.
pub struct Node {
    pub label: String,
    pub status: String,
    pub inputs: Vec<usize>,
}

/// Nodes in columns by depth (longest path from a source), edges as lines.
pub fn dag(nodes: &[Node]) -> String {
    let mut depth = vec![0usize; nodes.len()];
    // Nodes come in topological order (inputs first), so one pass suffices.
    for i in 0..nodes.len() {
        depth[i] = nodes[i]
            .inputs
            .iter()
            .map(|&u| depth.get(u).copied().unwrap_or(0) + 1)
            .max()
            .unwrap_or(0);
    }
    let columns = depth.iter().max().map_or(1, |d| d + 1);
    let mut row_in_col = vec![0usize; columns];
    let mut pos = Vec::with_capacity(nodes.len());
    for &d in &depth {
        pos.push((d, row_in_col[d]));
        row_in_col[d] += 1;
    }
    let rows = row_in_col.iter().max().copied().unwrap_or(1);
    let (cw, rh, bw, bh) = (190.0, 30.0, 170.0, 22.0);
    let xy = |i: usize| (10.0 + pos[i].0 as f64 * cw, 10.0 + pos[i].1 as f64 * rh);
    let mut out = format!(
        r#"<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-size="10" font-family="sans-serif">"#,
        20.0 + columns as f64 * cw,
        20.0 + rows as f64 * rh
    );
    for (i, n) in nodes.iter().enumerate() {
        for &u in &n.inputs {
            if u < nodes.len() {
                let (x0, y0) = xy(u);
                let (x1, y1) = xy(i);
                let _ = write!(
                    out,
                    r##"<line x1="{:.1}" y1="{:.1}" x2="{x1:.1}" y2="{:.1}" stroke="#999"/>"##,
                    x0 + bw,
                    y0 + bh / 2.0,
                    y1 + bh / 2.0
                );
            }
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let (x, y) = xy(i);
        let mut label = n.label.clone();
        if label.chars().count() > 28 {
            label = label.chars().take(27).collect::<String>() + "…";
        }
        let _ = write!(
            out,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{bw}" height="{bh}" rx="4" fill="{}" fill-opacity="0.25" stroke="{}"><title>{}</title></rect><text x="{:.1}" y="{:.1}">{}</text>"#,
            status_colour(&n.status),
            status_colour(&n.status),
            esc(&n.label),
            x + 5.0,
            y + 15.0,
            esc(&label)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc(r#"<a href="x">&</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }

    fn span(start: u64, end: u64, gpus: &[&str]) -> Span {
        Span {
            label: "s".into(),
            start,
            end,
            status: "succeeded".into(),
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// The y of each bar, in the order drawn.
    fn bar_ys(svg: &str) -> Vec<f64> {
        svg.split("<rect ")
            .skip(1)
            .map(|r| {
                let at = r.find(" y=\"").unwrap() + 4;
                r[at..at + r[at..].find('"').unwrap()].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn cpu_steps_share_lanes_when_they_do_not_overlap() {
        let svg = timeline(
            &[
                span(0, 10, &[]),
                span(10, 20, &[]),
                span(5, 15, &[]),
                span(0, 30, &["0"]),
            ],
            &[],
            0,
        );
        assert_eq!(svg.matches("<rect").count(), 4);
        assert!(svg.contains(">cpu 0<") && svg.contains(">cpu 1<") && svg.contains(">gpu 0<"));
        assert!(!svg.contains(">cpu 2<"), "{svg}");
    }

    #[test]
    fn steps_sharing_a_gpu_get_rows_of_their_own_in_its_lane() {
        // Four quarter-GPU steps at once on GPU 0, then one after them; a two-GPU step.
        let spans = [
            span(0, 10, &["0"]),
            span(0, 10, &["0"]),
            span(2, 12, &["0"]),
            span(3, 9, &["0"]),
            span(12, 20, &["0"]),
            span(0, 20, &["1", "0"]),
        ];
        let svg = timeline(&spans, &[], 0);
        let ys = bar_ys(&svg);
        // The two-GPU step is drawn in both lanes.
        assert_eq!(ys.len(), 7, "{svg}");
        let mut gpu0: Vec<f64> = ys[..6].to_vec();
        gpu0.sort_by(f64::total_cmp);
        gpu0.dedup();
        assert_eq!(gpu0.len(), 5, "five overlap at t = 3..9: {ys:?}");
        // The step after them reuses the first row.
        assert_eq!(ys.iter().filter(|&&y| y == ys[0]).count(), 2, "{ys:?}");
        assert_eq!(svg.matches(">gpu 0<").count(), 1);
        assert_eq!(svg.matches(">gpu 1<").count(), 1);
        // GPU 1's lane is below all of GPU 0's rows.
        let gpu1 = ys[6];
        assert!(gpu0.iter().all(|&y| y < gpu1), "{ys:?}");
    }

    #[test]
    fn a_sampled_gpu_has_its_charts_under_its_lane() {
        let chart = GpuChart {
            id: "0".into(),
            buckets: vec![
                UsageBucket {
                    start: 0,
                    end: 500,
                    util: Some(40.0),
                    memory_mib: 1000,
                },
                // A gap, then a sample without utilisation.
                UsageBucket {
                    start: 1000,
                    end: 1500,
                    util: None,
                    memory_mib: 2000,
                },
            ],
            memory_total_mib: 4000,
            busy_percent: Some(40.0),
            summary: "busy 40%".into(),
        };
        let svg = timeline(&[span(0, 1500, &["0"])], &[chart], 2000);
        assert_eq!(svg.matches("<g class=\"gpu-util\">").count(), 1, "{svg}");
        assert_eq!(svg.matches("<g class=\"gpu-memory\">").count(), 1);
        assert!(svg.contains("<title>gpu 0: busy 40%</title>"));
        assert!(
            svg.contains(">util 40%<") && svg.contains(">mem 2.0 GiB<"),
            "{svg}"
        );
        // The axis covers the run, not only its bars.
        assert!(svg.contains(">2.0 s<"), "{svg}");
        // Utilisation: one stretch; memory: two, the gap on the baseline.
        let util = &svg[svg.find("gpu-util").unwrap()..svg.find("gpu-memory").unwrap()];
        assert_eq!(util.matches('M').count(), 1, "{util}");
        let memory = &svg[svg.find("gpu-memory").unwrap()..];
        assert_eq!(memory.matches('M').count(), 2, "{memory}");
        // The bar sits above the charts.
        let ys = bar_ys(&svg);
        assert_eq!(ys, vec![3.0]);
    }

    #[test]
    fn plots_use_a_log_axis_for_wide_ranges() {
        let s = Series {
            label: "a".into(),
            points: vec![(10.0, 0.5, Some((0.4, 0.6))), (1000.0, 0.8, None)],
        };
        let svg = plot("t", "x", "y", &[s], YScale::Percent);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains(">1000<"));
        assert!(svg.contains(">50%<"));
    }

    #[test]
    fn a_plot_of_values_spans_their_range() {
        let s = Series {
            label: "a".into(),
            points: vec![(10.0, 2.0, None), (20.0, 4.0, None)],
        };
        let svg = plot("t", "x", "y", &[s], YScale::Values);
        // The axis runs from 5 % below the lowest value to 5 % above the highest.
        assert!(
            svg.contains(">1.9000<") && svg.contains(">4.1000<"),
            "{svg}"
        );
        assert!(!svg.contains('%'));
    }
}
