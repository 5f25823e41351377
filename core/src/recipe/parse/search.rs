//! `[search]`: successive halving. The budget var becomes one more axis of the sweep (its
//! values the rungs), and the table adds a step, [`SEARCH_STEP`], that gathers the metric
//! step's outputs of each rung and decides which arms go on.

use super::*;
use crate::ops::{CONTINUE_INPUT, SEARCH_OP, SEARCH_STEP, search_schema};

const SEARCH_KEYS: &[&str] = &["budget", "rungs", "metric", "direction", "keep", "continue"];

impl Parser<'_> {
    /// Read `[search]`, add its budget axis to `sweep` and its step to `drafts`. When the
    /// table is wrong, its budget var still counts as defined, so that its uses are not
    /// reported as undefined on top.
    pub(super) fn search_table(
        &mut self,
        v: &Node<'_>,
        sweep: &mut SweepDraft,
        drafts: &mut Vec<Draft>,
    ) -> Option<Search> {
        let search = self.search_fields(v, sweep, drafts);
        if search.is_none()
            && let DeValue::Table(t) = v.get_ref()
            && let Some((_, budget)) = t.iter().find(|(k, _)| key_str(k) == "budget")
            && let DeValue::String(name) = budget.get_ref()
            && is_var_name(name)
        {
            sweep.broken.insert(name.to_string());
        }
        search
    }

    fn search_fields(
        &mut self,
        v: &Node<'_>,
        sweep: &mut SweepDraft,
        drafts: &mut Vec<Draft>,
    ) -> Option<Search> {
        let t = self.table(v, "`search`")?;
        let fields = self.known_keys(t, SEARCH_KEYS, "`[search]`", "`[search]` has");
        let mut ok = true;
        let mut required = |p: &mut Self, name: &str, help: &str| {
            let found = fields.get(name).map(|(_, v)| *v);
            if found.is_none() {
                p.error_help(
                    v.span(),
                    format!("`[search]` has no `{name}`"),
                    Some(help.to_string()),
                );
                ok = false;
            }
            found
        };
        let budget = required(
            self,
            "budget",
            "name the var that sets each rung's budget: `budget = \"steps\"`",
        );
        let rungs = required(
            self,
            "rungs",
            "list the budget of each rung, increasing: `rungs = [100, 300, 900]`",
        );
        let metric = required(
            self,
            "metric",
            "name the step and the field of its `metrics.json` that ranks the arms: `metric = \"evaluate.loss\"`",
        );
        let direction = required(
            self,
            "direction",
            "say whether lower or higher is better: `direction = \"min\"` or `\"max\"`",
        );
        let (budget, rungs, metric, direction) = (budget?, rungs?, metric?, direction?);
        if !ok {
            return None;
        }

        let budget_name = self.search_budget(budget, sweep)?;
        let rung_values = self.search_rungs(rungs)?;
        let (metric_step, metric_field) = self.search_metric(metric, drafts)?;
        let maximize = match direction.get_ref() {
            DeValue::String(s) if s.as_ref() == "max" => true,
            DeValue::String(s) if s.as_ref() == "min" => false,
            _ => {
                self.error_help(
                    direction.span(),
                    format!(
                        "`direction` must be \"min\" or \"max\", found {}",
                        describe(direction)
                    ),
                    None,
                );
                return None;
            }
        };
        let keep = match fields.get("keep").map(|(_, v)| *v) {
            None => 0.5,
            Some(k) => match k.get_ref() {
                DeValue::Float(_) | DeValue::Integer(_) => {
                    let x = self.value(k)?.as_f64().unwrap_or(f64::NAN);
                    if !(x > 0.0 && x < 1.0) {
                        self.error_help(
                            k.span(),
                            format!("`keep` must be a share between 0 and 1, found {x}"),
                            Some(
                                "`keep = 0.5` keeps the better half of the arms at each rung"
                                    .into(),
                            ),
                        );
                        return None;
                    }
                    x
                }
                _ => {
                    self.error(
                        k.span(),
                        format!("`keep` must be a number, found {}", describe(k)),
                    );
                    return None;
                }
            },
        };
        let (continue_step, continue_span) = match fields.get("continue").map(|(_, v)| *v) {
            None => (None, None),
            Some(c) => (Some(self.search_continue(c, drafts)?), Some(c.span())),
        };
        if let Some(existing) = drafts.iter().find(|d| d.def.name == SEARCH_STEP) {
            let span = existing.def.span.clone();
            self.error_help(
                span,
                format!("step `{SEARCH_STEP}` is the name of the step `[search]` adds"),
                Some("rename this step".into()),
            );
            return None;
        }
        for set in self.sets {
            if set.var == budget_name {
                self.errors.push(
                    RecipeDiagnostic::whole(format!(
                        "`--set {}`: `{}` is the budget of `[search]`, which sets it at each rung",
                        set.var, set.var
                    ))
                    .with_help("change `rungs` in the recipe instead"),
                );
                return None;
            }
        }

        let search = Search {
            budget: budget_name.clone(),
            rungs: rung_values.clone(),
            metric_step: metric_step.clone(),
            metric_field: metric_field.clone(),
            maximize,
            keep,
            continue_step,
            span: v.span(),
            continue_span,
            metric_span: metric.span(),
        };
        drafts.push(search_draft(&search, metric.span()));
        // The rungs are the last axis: an arm's rungs are neighbours in the arm order.
        sweep.keys.insert(budget_name.clone(), budget.span());
        sweep.sweep.axes.push(Axis {
            vars: vec![budget_name],
            rows: rung_values.into_iter().map(|r| vec![r]).collect(),
        });
        Some(search)
    }

    /// The budget var: a var name not swept elsewhere.
    fn search_budget(&mut self, v: &Node<'_>, sweep: &SweepDraft) -> Option<String> {
        let DeValue::String(name) = v.get_ref() else {
            self.error(
                v.span(),
                format!("`budget` must name a var, found {}", describe(v)),
            );
            return None;
        };
        let name = name.to_string();
        if !self.var_name_ok(&name, v.span()) {
            return None;
        }
        if let Some(first) = sweep.keys.get(&name) {
            let lc = line_col(&self.source.text, first.start);
            self.error_help(
                v.span(),
                format!("the budget `{name}` is also swept"),
                Some(format!(
                    "`[search]` sweeps it over `rungs`; remove its sweep at line {}",
                    lc.line
                )),
            );
            return None;
        }
        Some(name)
    }

    /// At least two rungs, numbers, strictly increasing.
    fn search_rungs(&mut self, v: &Node<'_>) -> Option<Vec<Value>> {
        let DeValue::Array(items) = v.get_ref() else {
            self.error_help(
                v.span(),
                format!("`rungs` must be a list of budgets, found {}", describe(v)),
                Some("`rungs = [100, 300, 900]`".into()),
            );
            return None;
        };
        let mut values = Vec::new();
        let mut last = f64::NEG_INFINITY;
        for item in items.iter() {
            let x = match item.get_ref() {
                DeValue::Integer(_) | DeValue::Float(_) => self.value(item)?,
                _ => {
                    self.error(
                        item.span(),
                        format!("a rung's budget must be a number, found {}", describe(item)),
                    );
                    return None;
                }
            };
            let f = x.as_f64().unwrap_or(f64::NAN);
            if f <= last || f <= 0.0 {
                self.error_help(
                    item.span(),
                    format!("rung budgets must be positive and increase, found {f} after {last}"),
                    None,
                );
                return None;
            }
            last = f;
            values.push(x);
        }
        if values.len() < 2 {
            self.error_help(
                v.span(),
                "`[search]` needs at least two rungs",
                Some("with one rung there is nothing to decide: sweep the var instead".into()),
            );
            return None;
        }
        Some(values)
    }

    /// `step.field`, the step a known one.
    fn search_metric(&mut self, v: &Node<'_>, drafts: &[Draft]) -> Option<(String, String)> {
        let help = Some(
            "write the step and the field of its `metrics.json`: `metric = \"evaluate.loss\"`"
                .to_string(),
        );
        let DeValue::String(text) = v.get_ref() else {
            self.error_help(
                v.span(),
                format!("`metric` must be a string, found {}", describe(v)),
                help,
            );
            return None;
        };
        let Some((step, field)) = text
            .split_once('.')
            .filter(|(s, f)| !s.is_empty() && !f.is_empty())
        else {
            self.error_help(
                v.span(),
                format!("`metric = \"{text}\"` names no field"),
                help,
            );
            return None;
        };
        if !drafts.iter().any(|d| d.def.name == step) {
            let names = drafts.iter().map(|d| d.def.name.as_str());
            let help = did_you_mean(step, names.clone())
                .or_else(|| Some(format!("the steps are {}", backticked(names))));
            self.error_help(
                v.span(),
                format!("`metric` reads unknown step `{step}`"),
                help,
            );
            return None;
        }
        Some((step.to_string(), field.to_string()))
    }

    /// The step that continues: known, and able to take [`CONTINUE_INPUT`].
    fn search_continue(&mut self, v: &Node<'_>, drafts: &mut [Draft]) -> Option<String> {
        let DeValue::String(name) = v.get_ref() else {
            self.error(
                v.span(),
                format!("`continue` must name a step, found {}", describe(v)),
            );
            return None;
        };
        let Some(d) = drafts.iter_mut().find(|d| d.def.name == name.as_ref()) else {
            let names: Vec<&str> = drafts.iter().map(|d| d.def.name.as_str()).collect();
            let help = did_you_mean(name, names.iter().copied()).or_else(|| {
                Some(format!(
                    "the steps are {}",
                    backticked(names.iter().copied())
                ))
            });
            self.error_help(
                v.span(),
                format!("`continue` names unknown step `{name}`"),
                help,
            );
            return None;
        };
        if d.def.inputs.contains_key(CONTINUE_INPUT) {
            let span = d.input_spans[CONTINUE_INPUT].clone();
            self.error_help(
                span,
                format!("step `{name}` has an input `{CONTINUE_INPUT}`, which `[search]` gives it"),
                Some("rename the input".into()),
            );
            return None;
        }
        let takes_it = match self.catalog.get(&d.def.op).map(|op| &op.inputs) {
            Some(InputsSchema::Fixed(specs)) => specs.iter().any(|s| s.name == CONTINUE_INPUT),
            _ => true,
        };
        if !takes_it {
            self.error_help(
                v.span(),
                format!(
                    "op `{}` of step `{name}` cannot continue from an earlier output: it has no input `{CONTINUE_INPUT}`",
                    d.def.op
                ),
                Some("leave `continue` out: each rung then trains from the start".into()),
            );
            return None;
        }
        Some(name.to_string())
    }
}

/// The step `[search]` adds: one instance per rung (it uses only the budget var), gathering
/// the metric step's instances of that rung.
fn search_draft(search: &Search, metric_span: Range<usize>) -> Draft {
    let schema = search_schema();
    let budget_ref = format!("${{{}}}", search.budget);
    let params: BTreeMap<String, Value> = [
        ("budget", Value::String(budget_ref)),
        ("rungs", Value::Array(search.rungs.clone())),
        ("metric", Value::String(search.metric_field.clone())),
        (
            "direction",
            Value::String(if search.maximize { "max" } else { "min" }.into()),
        ),
        ("keep", serde_json::json!(search.keep)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let param_spans = params
        .keys()
        .map(|k| (k.clone(), search.span.clone()))
        .collect();
    Draft {
        def: StepDef {
            name: SEARCH_STEP.to_string(),
            op: SEARCH_OP.to_string(),
            op_version: schema.version,
            kind: OpKind::Builtin,
            path_params: Vec::new(),
            inputs: [(
                "metrics".to_string(),
                InputRef {
                    step: search.metric_step.clone(),
                    gather: true,
                },
            )]
            .into_iter()
            .collect(),
            params,
            cmd: None,
            code: Vec::new(),
            environment: Vec::new(),
            resources: Resources::default(),
            retries: RetryPolicy::default(),
            timeout: None,
            vars_used: [search.budget.clone()].into_iter().collect(),
            span: search.span.clone(),
            param_spans,
            resource_spans: BTreeMap::new(),
        },
        refs: vec![(search.budget.clone(), search.span.clone())],
        input_spans: [("metrics".to_string(), metric_span)].into_iter().collect(),
    }
}
