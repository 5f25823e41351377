//! `needle results RUN`: the sweep's result table — one row per step instance whose output
//! holds a `metrics.json` (every `evaluate`), its arm's bindings and the metrics with their
//! intervals. `--csv` and `--json` for notebooks.

use needle_core::recipe::bindings_label;
use needle_core::value::render_short;

use crate::cli::{Cli, ResultsArgs};
use crate::commands::{find_run, open_reader, print_json};
use crate::error::{CliError, Exit};
use crate::report::search::Decisions;
use crate::report::{metric_rows, table_columns};

pub fn results(cli: &Cli, args: &ResultsArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let run = find_run(&store, &args.run)?;
    let mut by_name = metric_rows(&store, &run)?;
    if let Some(step) = &args.step {
        by_name.retain(|name, _| name == step);
    }
    // Under `[search]`: each row's rung and what its rung decided.
    let decisions = Decisions::read(&store, &run)?;
    let verdict = |step: usize| decisions.verdict(&bindings_label(&run.steps[step].bindings));
    if args.json {
        let rows: Vec<serde_json::Value> = by_name
            .values()
            .flatten()
            .map(|r| {
                let s = &run.steps[r.step];
                let mut row = serde_json::json!({
                    "step": s.name, "bindings": s.bindings, "key": s.key, "metrics": r.metrics,
                });
                if let Some((rung, decided)) = verdict(r.step) {
                    row["rung"] = rung.into();
                    row["search"] = decided.into();
                }
                row
            })
            .collect();
        print_json(&serde_json::json!({"run": run.id, "rows": rows}));
        return Ok(Exit::Success);
    }
    if by_name.is_empty() {
        println!("run {}: no step wrote a metrics.json", run.id);
        return Ok(Exit::Success);
    }
    for (name, rows) in &by_name {
        let (vars, cols) = table_columns(&run, rows);
        let searched = rows.iter().any(|r| verdict(r.step).is_some());
        let header: Vec<String> = std::iter::once("step".to_string())
            .chain(vars.iter().map(|v| v.to_string()))
            .chain(cols.iter().map(|c| c.to_string()))
            .chain(
                searched
                    .then(|| ["rung".to_string(), "search".to_string()])
                    .into_iter()
                    .flatten(),
            )
            .collect();
        let body: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let b = &run.steps[r.step].bindings;
                std::iter::once(name.clone())
                    .chain(
                        vars.iter()
                            .map(|v| b.get(*v).map(render_short).unwrap_or_default()),
                    )
                    .chain(cols.iter().map(|c| r.cell(c).to_string()))
                    .chain(
                        searched
                            .then(|| match verdict(r.step) {
                                Some((rung, decided)) => [rung.to_string(), decided.to_string()],
                                None => [String::new(), String::new()],
                            })
                            .into_iter()
                            .flatten(),
                    )
                    .collect()
            })
            .collect();
        if args.csv {
            println!("{}", csv_line(&header));
            for row in &body {
                println!("{}", csv_line(row));
            }
            continue;
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                body.iter()
                    .map(|r| r[i].chars().count())
                    .chain([header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{}", line(&header));
        for row in &body {
            println!("{}", line(row));
        }
        println!();
    }
    if !args.csv {
        let arms = run.arms.len();
        println!(
            "run {} ({}), {arms} arm(s){}",
            run.id,
            run.recipe_name,
            if run.sets.is_empty() {
                String::new()
            } else {
                let sets: std::collections::BTreeMap<String, _> =
                    run.sets.iter().cloned().collect();
                format!(", --set {}", bindings_label(&sets))
            }
        );
    }
    Ok(Exit::Success)
}

/// RFC 4180: quote a field holding a comma, a quote or a line break.
fn csv_line(cells: &[String]) -> String {
    cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}
