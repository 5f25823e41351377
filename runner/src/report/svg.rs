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
    /// "gpu 0,1", or empty for a CPU step.
    pub gpus: String,
}

/// Bars on lanes: a step's GPUs name its lane; CPU steps share lanes, first free first.
pub fn timeline(spans: &[Span]) -> String {
    if spans.is_empty() {
        return "<p>No step executed in this run.</p>".into();
    }
    let total = spans.iter().map(|s| s.end).max().unwrap_or(1).max(1);
    let mut lanes: Vec<(String, u64)> = Vec::new(); // (label, busy until)
    let mut placed = Vec::new();
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| (spans[i].start, spans[i].end));
    for i in order {
        let s = &spans[i];
        let lane = if !s.gpus.is_empty() {
            match lanes.iter().position(|(l, _)| *l == s.gpus) {
                Some(l) => l,
                None => {
                    lanes.push((s.gpus.clone(), 0));
                    lanes.len() - 1
                }
            }
        } else {
            match lanes
                .iter()
                .position(|(l, until)| l.starts_with("cpu") && *until <= s.start)
            {
                Some(l) => l,
                None => {
                    let n = lanes.iter().filter(|(l, _)| l.starts_with("cpu")).count();
                    lanes.push((format!("cpu {n}"), 0));
                    lanes.len() - 1
                }
            }
        };
        lanes[lane].1 = lanes[lane].1.max(s.end);
        placed.push((i, lane));
    }
    let (left, width, row) = (90.0, 900.0, 22.0);
    let height = lanes.len() as f64 * row + 30.0;
    let x = |t: u64| left + width * t as f64 / total as f64;
    let mut out = format!(
        r#"<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-size="11" font-family="sans-serif">"#,
        left + width + 10.0
    );
    for (l, (label, _)) in lanes.iter().enumerate() {
        let y = l as f64 * row;
        let _ = write!(out, r#"<text x="4" y="{}">{}</text>"#, y + 15.0, esc(label));
    }
    for (i, lane) in placed {
        let s = &spans[i];
        let (x0, x1) = (x(s.start), x(s.end).max(x(s.start) + 1.5));
        let y = lane as f64 * row + 3.0;
        let _ = write!(
            out,
            r#"<rect x="{x0:.1}" y="{y}" width="{:.1}" height="{}" fill="{}"><title>{} — {} ({:.1} s)</title></rect>"#,
            x1 - x0,
            row - 6.0,
            status_colour(&s.status),
            esc(&s.label),
            esc(&s.status),
            (s.end - s.start) as f64 / 1000.0
        );
    }
    let axis_y = lanes.len() as f64 * row + 14.0;
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

/// A line plot with error bars, y in [0, 1] shown as percent, x on a log scale when its values
/// span more than a factor of 20 (tuning-set sizes do).
pub fn plot(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
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
    let py = |y: f64| top + h - h * y.clamp(0.0, 1.0);
    let mut out = format!(
        r##"<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-size="11" font-family="sans-serif"><text x="{left}" y="16" font-size="13" font-weight="bold">{}</text><rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##,
        left + w + 170.0,
        top + h + 40.0,
        esc(title)
    );
    for k in 0..=4 {
        let y = k as f64 / 4.0;
        let _ = write!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
            left + w,
            left - 4.0,
            py(y) + 4.0,
            y * 100.0,
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
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}: {} → {:.1}%</title></circle>"#,
                px(*x),
                py(*y),
                esc(&s.label),
                trim_float(*x),
                y * 100.0
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

    #[test]
    fn cpu_steps_share_lanes_when_they_do_not_overlap() {
        let span = |start, end, gpus: &str| Span {
            label: "s".into(),
            start,
            end,
            status: "succeeded".into(),
            gpus: gpus.into(),
        };
        let svg = timeline(&[
            span(0, 10, ""),
            span(10, 20, ""),
            span(5, 15, ""),
            span(0, 30, "gpu 0"),
        ]);
        assert_eq!(svg.matches("<rect").count(), 4);
        assert!(svg.contains(">cpu 0<") && svg.contains(">cpu 1<") && svg.contains(">gpu 0<"));
        assert!(!svg.contains(">cpu 2<"), "{svg}");
    }

    #[test]
    fn plots_use_a_log_axis_for_wide_ranges() {
        let s = Series {
            label: "a".into(),
            points: vec![(10.0, 0.5, Some((0.4, 0.6))), (1000.0, 0.8, None)],
        };
        let svg = plot("t", "x", "y", &[s]);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains(">1000<"));
    }
}
