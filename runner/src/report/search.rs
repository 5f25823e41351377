//! A `[search]` run's decisions, read from its search steps' outputs: for `results` (a rung
//! and a verdict per row) and the report (each rung's ranking, and the metric of every arm
//! across rungs).

use std::collections::BTreeMap;
use std::fmt::Write;

use needle_core::ops::SEARCH_OP;
use needle_core::recipe::bindings_label;
use needle_core::search::{DECISION_FILE, Decision};
use needle_core::store::{RunRecord, StoreRead};
use needle_core::value::render_short;

use super::svg::{self, Series, esc};
use super::{output_of, read_file};
use crate::error::CliError;

/// The decisions of a run, by rung; empty for a run without `[search]` (or before its first
/// rung is decided). The budget var is the one var the search steps depend on.
pub struct Decisions {
    pub budget: String,
    pub rungs: Vec<Decision>,
}

impl Decisions {
    pub fn read(store: &dyn StoreRead, run: &RunRecord) -> Result<Decisions, CliError> {
        let mut rungs = Vec::new();
        let mut budget = String::new();
        for step in run.steps.iter().filter(|s| s.op == SEARCH_OP) {
            let Some(output) = output_of(step) else {
                continue;
            };
            let Some(bytes) = read_file(store, &output, DECISION_FILE, 64 << 20)? else {
                continue;
            };
            if let Ok(d) = serde_json::from_slice::<Decision>(&bytes) {
                if let Some(var) = step.bindings.keys().next() {
                    budget = var.clone();
                }
                rungs.push(d);
            }
        }
        rungs.sort_by_key(|d| d.rung);
        Ok(Decisions { budget, rungs })
    }

    /// The rung (1-based) of the step instance labelled `label`, and what its rung decided:
    /// `kept`, `stopped`, or `best` for the first of the last rung.
    pub fn verdict(&self, label: &str) -> Option<(usize, &'static str)> {
        self.rungs.iter().find_map(|d| {
            let a = d.arm(label)?;
            let last = d.rung + 1 == d.rungs;
            let word = match (a.kept, last && a.rank == 1) {
                (_, true) => "best",
                (true, false) => "kept",
                (false, false) => "stopped",
            };
            Some((d.rung + 1, word))
        })
    }

    /// One line on how the search went: the arms of each rung, and the best arm of the last
    /// rung decided with its metric.
    pub fn line(&self, run: &RunRecord) -> Option<String> {
        let first = self.rungs.first()?;
        let last = self.rungs.last()?;
        let counts: Vec<String> = self
            .rungs
            .iter()
            .map(|d| d.arms.len().to_string())
            .collect();
        let best = last.arms.first()?;
        Some(format!(
            "search: {} arms over {} of {} rungs; best at {} = {}: {} ({} {})",
            counts.join(" → "),
            self.rungs.len(),
            first.rungs,
            self.budget,
            render_short(&last.budget),
            self.arm_of(run, &best.label),
            first.metric,
            best.value
        ))
    }

    /// The arm of a label, the budget left out: `lr=0.1,steps=20` → `lr=0.1`.
    fn arm_of(&self, run: &RunRecord, label: &str) -> String {
        (run.steps.iter())
            .find(|s| bindings_label(&s.bindings) == label)
            .map(|s| {
                let mut b = s.bindings.clone();
                b.remove(&self.budget);
                bindings_label(&b)
            })
            .unwrap_or_else(|| label.to_string())
    }
}

/// The report's section: how many arms each rung kept, the winner, each rung's ranking, and
/// the metric of every arm across the rungs it reached.
pub fn section(store: &dyn StoreRead, run: &RunRecord, out: &mut String) -> Result<(), CliError> {
    let decisions = Decisions::read(store, run)?;
    let Some(first) = decisions.rungs.first() else {
        return Ok(());
    };
    let last = decisions.rungs.last().expect("one rung at least");
    let counts: Vec<String> = (decisions.rungs.iter())
        .map(|d| d.arms.len().to_string())
        .collect();
    let _ = write!(
        out,
        "<h2>Search</h2><p>Successive halving by <code>{}</code> ({} is better): {} arms over {} of {} rungs.",
        esc(&first.metric),
        if first.maximize { "higher" } else { "lower" },
        counts.join(" → "),
        decisions.rungs.len(),
        first.rungs
    );
    if let Some(best) = last.arms.first() {
        let _ = write!(
            out,
            " Best at {} = {}: <b>{}</b> ({} {}).",
            esc(&decisions.budget),
            esc(&render_short(&last.budget)),
            esc(&decisions.arm_of(run, &best.label)),
            esc(&first.metric),
            best.value
        );
    }
    out.push_str("</p>");

    let mut series: BTreeMap<String, Vec<svg::Point>> = BTreeMap::new();
    for d in &decisions.rungs {
        let Some(x) = d.budget.as_f64() else { continue };
        for a in &d.arms {
            (series.entry(decisions.arm_of(run, &a.label)).or_default()).push((x, a.value, None));
        }
    }
    let series: Vec<Series> = series
        .into_iter()
        .map(|(label, points)| Series { label, points })
        .collect();
    out.push_str(&svg::plot(
        &format!("{} of each arm at the rungs it reached", first.metric),
        &decisions.budget,
        &first.metric,
        &series,
        svg::YScale::Values,
    ));

    for d in &decisions.rungs {
        let _ = write!(
            out,
            "<h3>Rung {} ({} = {}): {} of {} went on</h3><table class=\"results\"><tr><th>rank</th><th>arm</th><th>{}</th><th></th></tr>",
            d.rung + 1,
            esc(&decisions.budget),
            esc(&render_short(&d.budget)),
            d.kept(),
            d.arms.len(),
            esc(&d.metric)
        );
        for a in &d.arms {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                a.rank,
                esc(&decisions.arm_of(run, &a.label)),
                a.value,
                if a.kept { "kept" } else { "stopped" }
            );
        }
        out.push_str("</table>");
    }
    Ok(())
}
