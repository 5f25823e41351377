//! `search-rung`: the step a recipe's `[search]` adds at every rung. It reads the metric of
//! each live arm (a field of the `metrics.json` of the metric step's output), ranks the arms
//! and writes the rung's [`Decision`] as `decision.json`, with a table in `summary.md`. The
//! runner reads the decision to start the kept arms' next rung and stop the others.

use needle_core::ops::{OpSchema, search_schema};
use needle_core::search::{DECISION_FILE, Decision, decide, metric_at};
use needle_core::value::Value;

use crate::context::{Input, OpContext};
use crate::errors::OpError;
use crate::op::Op;

pub struct SearchRung;

impl Op for SearchRung {
    fn schema(&self) -> OpSchema {
        search_schema()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let metric: String = ctx.param("metric")?;
        let direction: String = ctx.param("direction")?;
        let keep: f64 = ctx.param("keep")?;
        let budget: Value = ctx.param("budget")?;
        let rungs: Vec<Value> = ctx.param("rungs")?;
        let rung = (rungs.iter())
            .position(|r| {
                needle_core::canonical::to_string(r) == needle_core::canonical::to_string(&budget)
            })
            .ok_or_else(|| OpError::Param {
                name: "budget".into(),
                why: "is none of the rungs".into(),
            })?;
        let Some(Input::Gather(members)) = ctx.inputs.get("metrics") else {
            return Err(OpError::Input {
                name: "metrics".into(),
                why: "is missing or not a gather".into(),
            });
        };
        let mut values = Vec::with_capacity(members.len());
        let mut problems = Vec::new();
        for (label, dir) in members {
            let path = dir.join("metrics.json");
            let read = std::fs::read(&path)
                .map_err(|e| format!("has no readable `metrics.json` ({e})"))
                .and_then(|bytes| {
                    serde_json::from_slice::<Value>(&bytes)
                        .map_err(|e| format!("`metrics.json` is not JSON: {e}"))
                })
                .and_then(|m| metric_at(&m, &metric).map_err(|e| format!("`metrics.json` {e}")));
            match read {
                Ok(v) => values.push((label.clone(), v)),
                Err(e) => problems.push(format!("arm `{label}`: {e}")),
            }
        }
        if !problems.is_empty() {
            return Err(OpError::Failed(format!(
                "the metric `{metric}` cannot rank {} of the {} arms at rung {}:\n  {}",
                problems.len(),
                members.len(),
                rung + 1,
                problems.join("\n  ")
            )));
        }
        let decision = Decision {
            rung,
            rungs: rungs.len(),
            budget,
            metric: metric.clone(),
            maximize: direction == "max",
            arms: decide(values, direction == "max", keep),
        };
        let table = summary(&decision);
        print!("{table}");
        let json = serde_json::to_vec_pretty(&decision).expect("a decision serialises");
        let out = ctx.out.join(DECISION_FILE);
        std::fs::write(&out, json).map_err(OpError::io("write", &out))?;
        let out = ctx.out.join(crate::SUMMARY);
        std::fs::write(&out, table).map_err(OpError::io("write", &out))
    }
}

/// The rung as a Markdown table, best first.
fn summary(d: &Decision) -> String {
    let mut s = format!(
        "Rung {} of {} ({} = {}): {} of {} arms go on, by `{}` ({} is better).\n\n| rank | arm | {} | |\n|---:|---|---:|---|\n",
        d.rung + 1,
        d.rungs,
        "budget",
        needle_core::value::render_short(&d.budget),
        d.kept(),
        d.arms.len(),
        d.metric,
        if d.maximize { "higher" } else { "lower" },
        d.metric,
    );
    for a in &d.arms {
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            a.rank,
            a.label,
            a.value,
            if a.kept { "kept" } else { "stopped" }
        ));
    }
    s
}
