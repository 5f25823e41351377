//! Successive halving's decisions: what the search step of a rung writes (`decision.json`),
//! and the ranking that makes it. The step (`needle_ops::search`) reads each live arm's
//! metric and calls [`decide`]; the runner reads the decision to start or stop the next
//! rung's steps of each arm.

use serde::{Deserialize, Serialize};

use crate::recipe::keep_count;
use crate::value::Value;

/// The file a search step's output holds.
pub const DECISION_FILE: &str = "decision.json";

/// One rung's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// 0-based.
    pub rung: usize,
    pub rungs: usize,
    /// The budget var's value at this rung.
    pub budget: Value,
    pub metric: String,
    pub maximize: bool,
    /// Every live arm, best first.
    pub arms: Vec<Ranked>,
}

/// An arm's place in a rung.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    /// The label of the metric step's instance (its bindings, `lr=0.1,steps=100`).
    pub label: String,
    pub value: f64,
    /// 1-based.
    pub rank: usize,
    pub kept: bool,
}

impl Decision {
    /// How many arms went on.
    pub fn kept(&self) -> usize {
        self.arms.iter().filter(|a| a.kept).count()
    }

    /// The arm labelled `label`.
    pub fn arm(&self, label: &str) -> Option<&Ranked> {
        self.arms.iter().find(|a| a.label == label)
    }
}

/// Rank `(label, value)` pairs, best first (ties keep their given order), and keep
/// `ceil(n × keep)` of them, at least one.
pub fn decide(values: Vec<(String, f64)>, maximize: bool, keep: f64) -> Vec<Ranked> {
    let kept = keep_count(values.len(), keep);
    let mut order: Vec<(String, f64)> = values;
    order.sort_by(|a, b| {
        let c = a.1.total_cmp(&b.1);
        if maximize { c.reverse() } else { c }
    });
    order
        .into_iter()
        .enumerate()
        .map(|(i, (label, value))| Ranked {
            label,
            value,
            rank: i + 1,
            kept: i < kept,
        })
        .collect()
}

/// Why a metric could not be read from a `metrics.json`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("has no field `{field}` (its fields: {})", if .fields.is_empty() { "none".to_string() } else { .fields.join(", ") })]
    NoField { field: String, fields: Vec<String> },
    #[error("has no field `{field}`: `{path}` reaches {found} first")]
    NotAnObject {
        field: String,
        path: String,
        found: String,
    },
    #[error("field `{path}` is {found}, not a finite number")]
    NotANumber { path: String, found: String },
}

/// The number at `path` (`loss`, or `appeal.win` into nested objects) of a metrics object.
pub fn metric_at(metrics: &Value, path: &str) -> Result<f64, MetricError> {
    let mut at = metrics;
    for part in path.split('.') {
        at = match at {
            Value::Object(map) => map.get(part).ok_or_else(|| MetricError::NoField {
                field: part.to_string(),
                fields: map.keys().cloned().collect(),
            })?,
            other => {
                return Err(MetricError::NotAnObject {
                    field: part.to_string(),
                    path: path.to_string(),
                    found: crate::value::render_short(other),
                });
            }
        };
    }
    match at.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        // As JSON: a string shows its quotes, so `"0.5"` reads as the text it is.
        _ => Err(MetricError::NotANumber {
            path: path.to_string(),
            found: crate::canonical::to_string(at),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(r: &[Ranked]) -> Vec<(&str, bool)> {
        r.iter().map(|a| (a.label.as_str(), a.kept)).collect()
    }

    #[test]
    fn keeps_the_best_share_either_way() {
        let values = vec![
            ("a".to_string(), 0.3),
            ("b".to_string(), 0.1),
            ("c".to_string(), 0.2),
            ("d".to_string(), 0.4),
        ];
        let min = decide(values.clone(), false, 0.5);
        assert_eq!(
            labels(&min),
            [("b", true), ("c", true), ("a", false), ("d", false)]
        );
        assert_eq!(min[0].rank, 1);
        let max = decide(values, true, 0.25);
        assert_eq!(
            labels(&max),
            [("d", true), ("a", false), ("c", false), ("b", false)]
        );
    }

    #[test]
    fn ties_keep_the_given_order_and_one_arm_always_goes_on() {
        let values = vec![("x".to_string(), 1.0), ("y".to_string(), 1.0)];
        assert_eq!(
            labels(&decide(values, false, 0.1)),
            [("x", true), ("y", false)]
        );
        assert_eq!(keep_count(27, 0.3333), 9);
        assert_eq!(keep_count(9, 0.3333), 3);
        assert_eq!(keep_count(3, 0.3333), 1);
        assert_eq!(keep_count(5, 0.5), 3);
        assert_eq!(keep_count(0, 0.5), 0);
    }

    #[test]
    fn metrics_are_read_by_path_and_must_be_numbers() {
        let m = json!({"loss": 0.25, "appeal": {"win": 0.6}, "name": "x"});
        assert_eq!(metric_at(&m, "loss").unwrap(), 0.25);
        assert_eq!(metric_at(&m, "appeal.win").unwrap(), 0.6);
        let err = |path| metric_at(&m, path).unwrap_err().to_string();
        assert!(
            err("acc").contains("fields: appeal, loss, name"),
            "{}",
            err("acc")
        );
        assert!(
            err("name").contains("not a finite number"),
            "{}",
            err("name")
        );
        assert!(err("loss.x").contains("reaches"), "{}", err("loss.x"));
    }
}
