//! `[sweep]`: lists, zip groups, `exclude` and `include` entries, and `--set` pinning a swept
//! var. Its sampled tables are [`super::sampled`]'s.

use super::*;
use crate::recipe::sample::Method;

impl Parser<'_> {
    pub(super) fn sweep_table(&mut self, v: &Node<'_>) -> SweepDraft {
        let mut draft = SweepDraft::default();
        let Some(t) = self.table(v, "`sweep`") else {
            return draft;
        };
        let mut zip_axes = Vec::new();
        let mut sampled = None;
        for (k, val) in t.iter() {
            let key = key_str(k);
            match key {
                // A table under these names is sampled; a list stays a grid var named so.
                "random" | "sobol" if val.get_ref().is_table() => {
                    let method = if key == "random" {
                        Method::Random
                    } else {
                        Method::Sobol
                    };
                    if let Some(first) = &draft.sampled_key {
                        draft.broken.extend(table_vars(val));
                        let line = line_col(&self.source.text, first.start).line;
                        self.error_help(
                            k.span(),
                            format!("a second sampled sweep, `[sweep.{key}]`"),
                            Some(format!("a recipe samples in one table, here the one at line {line}: move these vars there")),
                        );
                        continue;
                    }
                    draft.sampled_key = Some(k.span());
                    sampled = self.sampled_table(method, val, &mut draft);
                }
                "zip" => {
                    for group in self.array_of_tables(k, val) {
                        match self.zip_group(group, &mut draft.keys) {
                            Some(axis) => zip_axes.push(axis),
                            None => {
                                if let DeValue::Table(t) = group.get_ref() {
                                    draft
                                        .broken
                                        .extend(t.keys().map(|k| key_str(k).to_string()));
                                }
                            }
                        }
                    }
                }
                "exclude" | "include" => {
                    let which = if key == "exclude" {
                        "exclude"
                    } else {
                        "include"
                    };
                    for entry in self.array_of_tables(k, val) {
                        self.sweep_entry(which, entry, &mut draft);
                    }
                }
                _ => {
                    if !self.var_name_ok(key, k.span()) {
                        continue;
                    }
                    let Some(values) = self.sweep_list(key, val) else {
                        draft.broken.insert(key.to_string());
                        // A misspelt `[sweep.random]`: its vars are defined, not undefined.
                        draft.broken.extend(table_vars(val));
                        continue;
                    };
                    if self.first_sweep(key, k.span(), &mut draft.keys) {
                        draft.sweep.axes.push(Axis {
                            vars: vec![key.to_string()],
                            rows: values.into_iter().map(|v| vec![v]).collect(),
                        });
                    }
                }
            }
        }
        draft.sweep.axes.extend(zip_axes);
        if let Some(axis) = sampled {
            draft.sampled_axis = Some(draft.sweep.axes.len());
            draft.sweep.axes.push(axis);
        }
        draft
    }

    /// The tables of `[[sweep.zip]]` (and friends), or an error if it was written otherwise.
    pub(super) fn array_of_tables<'v, 'i>(
        &mut self,
        k: &Key<'_>,
        v: &'v Node<'i>,
    ) -> Vec<&'v Node<'i>> {
        let key = key_str(k);
        let bad = |p: &mut Self| {
            p.error_help(
                v.span(),
                format!("`sweep.{key}` must be an array of tables"),
                Some(format!(
                    "write each entry as `[[sweep.{key}]]`; `zip`, `exclude` and `include` are reserved and cannot name a swept var"
                )),
            );
            Vec::new()
        };
        match v.get_ref() {
            DeValue::Array(items) if items.iter().all(|i| i.get_ref().is_table()) => {
                items.iter().collect()
            }
            _ => bad(self),
        }
    }

    /// Record that `name` is swept; report it if it already was.
    pub(super) fn first_sweep(
        &mut self,
        name: &str,
        span: Range<usize>,
        keys: &mut BTreeMap<String, Range<usize>>,
    ) -> bool {
        if let Some(first) = keys.get(name) {
            let lc = line_col(&self.source.text, first.start);
            self.error_help(
                span,
                format!("`{name}` is swept twice"),
                Some(format!("it is first swept at line {}", lc.line)),
            );
            false
        } else {
            keys.insert(name.to_string(), span);
            true
        }
    }

    /// A non-empty list of literal values.
    pub(super) fn sweep_list(&mut self, name: &str, v: &Node<'_>) -> Option<Vec<Value>> {
        match v.get_ref() {
            DeValue::Array(items) if items.is_empty() => {
                self.error(v.span(), format!("sweep over `{name}` has no values"));
                None
            }
            DeValue::Array(items) => {
                let values: Vec<Option<Value>> = items.iter().map(|i| self.value(i)).collect();
                values.into_iter().collect()
            }
            other => {
                let help = if other.is_table() {
                    did_you_mean(name, ["random", "sobol"]).unwrap_or_else(|| {
                        format!("write `{name} = [...]`; sampled vars go in `[sweep.random]` or `[sweep.sobol]`")
                    })
                } else {
                    format!("write `{name} = [...]`; a single value belongs in `[vars]`")
                };
                self.error_help(
                    v.span(),
                    format!("sweep over `{name}` must be a list, found {}", describe(v)),
                    Some(help),
                );
                None
            }
        }
    }

    pub(super) fn zip_group(
        &mut self,
        group: &Node<'_>,
        keys: &mut BTreeMap<String, Range<usize>>,
    ) -> Option<Axis> {
        let DeValue::Table(t) = group.get_ref() else {
            return None;
        };
        if t.is_empty() {
            self.error(group.span(), "empty `[[sweep.zip]]` group");
            return None;
        }
        let mut columns: Vec<(String, Vec<Value>)> = Vec::new();
        let mut first_len: Option<(String, usize)> = None;
        let mut ok = true;
        for (k, val) in t.iter() {
            let name = key_str(k);
            if !self.var_name_ok(name, k.span()) {
                ok = false;
                continue;
            }
            let Some(values) = self.sweep_list(name, val) else {
                ok = false;
                continue;
            };
            match &first_len {
                None => first_len = Some((name.to_string(), values.len())),
                Some((first, n)) if *n != values.len() => {
                    self.error_help(
                        val.span(),
                        format!(
                            "zipped list `{name}` has {} values, but `{first}` has {n}",
                            values.len()
                        ),
                        Some("the lists of one `[[sweep.zip]]` group advance together and must be of one length".into()),
                    );
                    ok = false;
                    continue;
                }
                Some(_) => {}
            }
            if !self.first_sweep(name, k.span(), keys) {
                ok = false;
                continue;
            }
            columns.push((name.to_string(), values));
        }
        if !ok {
            return None;
        }
        let len = columns[0].1.len();
        let rows = (0..len)
            .map(|i| columns.iter().map(|(_, col)| col[i].clone()).collect())
            .collect();
        Some(Axis {
            vars: columns.into_iter().map(|(name, _)| name).collect(),
            rows,
        })
    }

    pub(super) fn sweep_entry(
        &mut self,
        which: &'static str,
        entry: &Node<'_>,
        draft: &mut SweepDraft,
    ) {
        let DeValue::Table(t) = entry.get_ref() else {
            return;
        };
        if which == "exclude" && t.is_empty() {
            self.error(
                entry.span(),
                "an empty `[[sweep.exclude]]` would drop every arm",
            );
            return;
        }
        let mut bindings = BTreeMap::new();
        let mut spans = Vec::new();
        let mut ok = true;
        for (k, val) in t.iter() {
            match self.value(val) {
                Some(x) => {
                    bindings.insert(key_str(k).to_string(), x);
                    spans.push((key_str(k).to_string(), k.span()));
                }
                None => ok = false,
            }
        }
        if !ok {
            return;
        }
        draft.bindings.push((which, spans));
        if which == "exclude" {
            draft.sweep.exclude.push(bindings);
        } else {
            draft.sweep.include.push(bindings);
        }
    }

    /// An exclude that binds a var to a value it is never swept over drops nothing: a typo,
    /// or a value written with another type (`1` for `1.0`). Checked before `--set` pins the
    /// sweep, against every value of the var's axis.
    pub(super) fn check_exclude_values(&mut self, sweep: &SweepDraft) {
        let mut excludes = sweep.sweep.exclude.iter();
        for (which, spans) in &sweep.bindings {
            if *which != "exclude" {
                continue;
            }
            let Some(exclude) = excludes.next() else {
                break;
            };
            for (name, span) in spans {
                let Some((axis, j)) = sweep.sweep.axes.iter().find_map(|a| {
                    let j = a.vars.iter().position(|v| v == name)?;
                    Some((a, j))
                }) else {
                    // Not swept: `check_vars` says so.
                    continue;
                };
                let value = &exclude[name];
                let encoded = crate::canonical::encode(value);
                if axis
                    .rows
                    .iter()
                    .any(|row| crate::canonical::encode(&row[j]) == encoded)
                {
                    continue;
                }
                const SHOWN: usize = 10;
                let mut values = backticked(
                    axis.rows
                        .iter()
                        .take(SHOWN)
                        .map(|row| crate::value::render_short(&row[j]))
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                );
                if axis.rows.len() > SHOWN {
                    values.push_str(&format!(" and {} more", axis.rows.len() - SHOWN));
                }
                self.error_help(
                    span.clone(),
                    format!(
                        "`[[sweep.exclude]]` binds `{name}` to `{}`, a value it is not swept over",
                        crate::value::render_short(value)
                    ),
                    Some(format!("`{name}` is swept over {values}")),
                );
            }
        }
    }

    /// Apply `--set`: override `[vars]` defaults, pin swept vars.
    pub(super) fn apply_sets(
        &mut self,
        vars: &mut BTreeMap<String, Value>,
        sweep: &mut SweepDraft,
        drafts: &[Draft],
    ) {
        // Every swept var gets a default: `[vars]`, else the first value of its list.
        for axis in &sweep.sweep.axes {
            for (j, var) in axis.vars.iter().enumerate() {
                if !vars.contains_key(var)
                    && let Some(row) = axis.rows.first()
                {
                    vars.insert(var.clone(), row[j].clone());
                }
            }
        }
        let referenced: BTreeSet<&str> = drafts
            .iter()
            .flat_map(|d| d.refs.iter().map(|(n, _)| n.as_str()))
            .collect();
        for set in sets_last_wins(self.sets) {
            let swept = sweep.keys.contains_key(&set.var);
            if !swept && !vars.contains_key(&set.var) && !referenced.contains(set.var.as_str()) {
                let known: BTreeSet<&str> = vars
                    .keys()
                    .map(String::as_str)
                    .chain(referenced.iter().copied())
                    .collect();
                let help = did_you_mean(&set.var, known.iter().copied()).or_else(|| {
                    (!known.is_empty()).then(|| {
                        format!(
                            "the recipe's vars are {}",
                            backticked(known.iter().copied())
                        )
                    })
                });
                let mut d = RecipeDiagnostic::whole(format!(
                    "`--set {}={}`: the recipe has no var `{}`",
                    set.var,
                    crate::value::render_short(&set.value),
                    set.var
                ));
                d.help = help;
                self.errors.push(d);
                continue;
            }
            vars.insert(set.var.clone(), set.value.clone());
            if swept {
                self.pin(sweep, set);
            }
        }
    }

    /// Keep only the sweep's rows where `set.var` has `set.value`. On the sampled axis, set
    /// it in every row instead: the other sampled vars keep their draws, and rows that become
    /// equal are one.
    pub(super) fn pin(&mut self, sweep: &mut SweepDraft, set: &SetArg) {
        let sampled = sweep.sampled_axis;
        let sweep = &mut sweep.sweep;
        if let Some((i, axis)) = sweep
            .axes
            .iter_mut()
            .enumerate()
            .find(|(_, a)| a.vars.contains(&set.var))
        {
            let j = axis
                .vars
                .iter()
                .position(|v| *v == set.var)
                .expect("found above");
            if sampled == Some(i) {
                let mut seen = HashSet::new();
                axis.rows.retain_mut(|row| {
                    row[j] = set.value.clone();
                    seen.insert(crate::canonical::encode(&Value::Array(row.clone())))
                });
            }
            let before = axis.rows.len();
            axis.rows.retain(|row| row[j] == set.value);
            if axis.rows.is_empty() {
                if axis.vars.len() == 1 {
                    axis.rows = vec![vec![set.value.clone()]];
                } else {
                    let shown = crate::value::render_short(&set.value);
                    self.errors.push(
                        RecipeDiagnostic::whole(format!(
                            "`--set {}={shown}` matches none of the {before} rows of the zipped sweep over {}",
                            set.var,
                            backticked(axis.vars.iter().map(String::as_str))
                        ))
                        .with_help("a zipped var can only be pinned to one of its values"),
                    );
                }
            }
        }
        sweep
            .include
            .retain(|inc| inc.get(&set.var).is_none_or(|v| *v == set.value));
    }
}

/// The keys of a table value (none for another value).
fn table_vars(v: &Node<'_>) -> Vec<String> {
    match v.get_ref() {
        DeValue::Table(t) => t.keys().map(|k| key_str(k).to_string()).collect(),
        _ => Vec::new(),
    }
}

/// The last `--set` of each var, in the order of their last occurrence.
pub(super) fn sets_last_wins(sets: &[SetArg]) -> Vec<&SetArg> {
    let mut out: Vec<&SetArg> = Vec::new();
    for set in sets {
        out.retain(|s| s.var != set.var);
        out.push(set);
    }
    out
}
