//! Sweep expansion: from a [`Recipe`] to its arms and step instances.
//!
//! - The arms are the cartesian product of the sweep's axes (first axis slowest), minus the
//!   arms an `exclude` matches, plus the `include` arms, without duplicates.
//! - A step depends on the swept vars it references and, through each non-gather input, on
//!   those its upstream depends on: `D(s) = (swept ∩ vars_used(s)) ∪ ⋃ D(u)`. Its instances are
//!   the distinct restrictions of the arms to `D(s)`, in order of first appearance; so a step
//!   no swept var reaches has one instance shared by every arm.
//! - A non-gather input reads the one upstream instance that agrees on `D(u) ⊆ D(s)`; a gather
//!   input reads every upstream instance that agrees on `D(s) ∩ D(u)`.
//!
//! Restrictions are compared through the canonical encoding of their values, in hash maps, so
//! expansion is linear in arms × steps.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use super::*;
use crate::ops::{
    CONTINUE_INPUT, OpCatalog, ParamType, ParamsSchema, SEARCH_OP, SEARCH_STEP, TypeMismatch,
};
use crate::store::human_bytes;
use crate::value::render_plain;

/// Expand the sweep of a parsed recipe. Errors: too many arms or instances, no arm left, and
/// param type errors that show only once vars are substituted.
pub fn expand(recipe: &Recipe, catalog: &dyn OpCatalog) -> Result<Expansion, RecipeErrors> {
    let fail = |errors: Vec<RecipeDiagnostic>| RecipeErrors::new(&recipe.source, errors);
    let table = ArmTable::build(recipe).map_err(|d| fail(vec![d]))?;
    let order = topological_order(&recipe.steps).map_err(|d| fail(vec![d]))?;

    let search_op = crate::ops::search_schema();
    let n_steps = recipe.steps.len();
    let by_name: HashMap<&str, usize> = recipe
        .steps
        .iter()
        .enumerate()
        .map(|(i, st)| (st.name.as_str(), i))
        .collect();
    let by_name = |name: &str| by_name.get(name).copied();

    // First the shape: each step's vars D(s) and its arms grouped by their restriction to
    // them, one grouping per distinct D. The instance limit is checked here, before any
    // instance is built, so an oversized sweep is refused in a fraction of the work.
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); n_steps];
    let mut grouping_of = vec![0usize; n_steps];
    let mut groupings: Vec<Grouping> = Vec::new();
    let mut grouping_index: HashMap<Vec<usize>, usize> = HashMap::new();
    let mut total = 0usize;
    for &s in &order {
        let step = &recipe.steps[s];
        let mut d: BTreeSet<usize> = step
            .vars_used
            .iter()
            .filter_map(|v| table.var_index.get(v.as_str()).copied())
            .collect();
        for input in step.inputs.values().filter(|i| !i.gather) {
            if let Some(u) = by_name(&input.step) {
                d.extend(deps[u].iter().copied());
            }
        }
        let d: Vec<usize> = d.into_iter().collect();
        let g = match grouping_index.get(&d) {
            Some(&g) => g,
            None => {
                groupings.push(table.grouping(&d));
                grouping_index.insert(d.clone(), groupings.len() - 1);
                groupings.len() - 1
            }
        };
        total += groupings[g].arms_of.len();
        if total > MAX_INSTANCES {
            return Err(fail(vec![
                RecipeDiagnostic::at(
                    step.span.clone(),
                    format!(
                        "the sweep makes at least {total} step instances, more than the limit of {MAX_INSTANCES}"
                    ),
                )
                .with_help(format!(
                    "step `{}` alone has {} instances",
                    step.name,
                    groupings[g].arms_of.len()
                )),
            ]));
        }
        deps[s] = d;
        grouping_of[s] = g;
    }

    // Per step: the global index of its first instance.
    let mut base = vec![0usize; n_steps];
    let mut instances: Vec<Instance> = Vec::with_capacity(total);
    let mut errors: Vec<RecipeDiagnostic> = Vec::new();
    // `path` params already looked up: the path → why it cannot be read, if it cannot.
    let mut paths_seen: HashMap<std::path::PathBuf, Option<String>> = HashMap::new();

    for &s in &order {
        let step = &recipe.steps[s];
        let d = &deps[s];
        let grouping = &groupings[grouping_of[s]];

        // Inputs: for a gather, the upstream's instances grouped by the shared vars.
        let mut gathers: BTreeMap<&str, (Vec<usize>, Groups)> = BTreeMap::new();
        for (name, input) in step.inputs.iter().filter(|(_, i)| i.gather) {
            let Some(u) = by_name(&input.step) else {
                continue;
            };
            let shared: Vec<usize> = d
                .iter()
                .copied()
                .filter(|v| deps[u].binary_search(v).is_ok())
                .collect();
            let mut groups = Groups::new();
            let mut key = Vec::new();
            let upstream = &groupings[grouping_of[u]];
            let mut seen_local = vec![false; upstream.arms_of.len()];
            for (a, &local) in upstream.local_of_arm.iter().enumerate() {
                if std::mem::replace(&mut seen_local[local as usize], true) {
                    continue;
                }
                table.restriction_key(a, &shared, &mut key);
                groups
                    .entry(key.clone())
                    .or_default()
                    .push(base[u] + local as usize);
            }
            gathers.insert(name.as_str(), (shared, groups));
        }

        let schema = catalog
            .get(&step.op)
            .or((step.op == SEARCH_OP).then_some(&search_op));
        if schema.is_none() {
            errors.push(RecipeDiagnostic::at(
                step.span.clone(),
                format!("unknown op `{}`", step.op),
            ));
        }
        base[s] = instances.len();
        let mut key = Vec::new();
        for arms in &grouping.arms_of {
            let first = arms[0] as usize;
            let values = table.arm_values(first);
            let bindings: BTreeMap<String, Value> = d
                .iter()
                .map(|&v| (table.vars[v].clone(), values[v].clone()))
                .collect();
            let lookup = |name: &str| -> Option<Value> {
                match table.var_index.get(name) {
                    Some(&v) => Some(values[v].clone()),
                    None => recipe.vars.get(name).cloned(),
                }
            };

            let mut params = BTreeMap::new();
            for (pname, template) in &step.params {
                let mut value = render_template(template, &lookup);
                if let Some(spec) = schema.and_then(|op| match &op.params {
                    ParamsSchema::Fixed(_) => op.param(pname),
                    ParamsSchema::Free => None,
                }) {
                    match spec.ty.check(&value) {
                        Ok(v) => value = v,
                        Err(m) => errors.push(type_error(
                            step,
                            pname,
                            template,
                            &m,
                            &bindings,
                            &recipe.vars,
                        )),
                    }
                    if let (ParamType::Path, Value::String(p)) = (&spec.ty, &value) {
                        let path = recipe.source.dir.join(p);
                        let problem = paths_seen
                            .entry(path)
                            .or_insert_with_key(|path| unreadable_path(p, path));
                        if let Some(problem) = problem {
                            errors.push(
                                param_error(
                                    step,
                                    pname,
                                    format!("param `{pname}` of step `{}` {problem}", step.name),
                                )
                                .with_help(
                                    "a relative path is read from the directory holding the recipe",
                                ),
                            );
                        }
                    }
                }
                if matches!(&value, Value::String(v) if v.contains('\0')) {
                    errors.push(param_error(
                        step,
                        pname,
                        format!(
                            "param `{pname}` of step `{}` holds a NUL character, which cannot reach a command",
                            step.name
                        ),
                    ));
                }
                let var = format!("NEEDLE_PARAM_{}", crate::ops::env_name(pname));
                let bytes = env_bytes(&var, &render_plain(&value));
                if bytes > MAX_ENV_STRING {
                    errors.push(
                        param_error(
                            step,
                            pname,
                            format!(
                                "param `{pname}` of step `{}` is {} as `{var}`: one environment \
                                 variable holds at most {} (Linux's MAX_ARG_STRLEN)",
                                step.name,
                                human_bytes(bytes as u64),
                                human_bytes(MAX_ENV_STRING as u64)
                            ),
                        )
                        .with_help("keep large values in a file, and pass its path"),
                    );
                }
                params.insert(pname.clone(), value);
            }
            let all = crate::canonical::to_string(&Value::Object(
                params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ));
            let each: usize = (params.iter())
                .map(|(k, v)| {
                    let var = format!("NEEDLE_PARAM_{}", crate::ops::env_name(k));
                    env_bytes(&var, &render_plain(v))
                })
                .sum();
            let together = env_bytes("NEEDLE_PARAMS", &all);
            if together > MAX_ENV_STRING || each + together > MAX_PARAMS_ENV {
                errors.push(
                    RecipeDiagnostic::at(
                        step.span.clone(),
                        format!(
                            "the params of step `{}` take {} of its environment ({} as \
                             `NEEDLE_PARAMS`): at most {} fit, and {} in one variable",
                            step.name,
                            human_bytes((each + together) as u64),
                            human_bytes(together as u64),
                            human_bytes(MAX_PARAMS_ENV as u64),
                            human_bytes(MAX_ENV_STRING as u64)
                        ),
                    )
                    .with_help("keep large values in a file, and pass its path"),
                );
            }
            let cmd: Option<Vec<String>> = step.cmd.as_ref().map(|argv| {
                argv.iter()
                    .map(|arg| match render_template(arg, &lookup) {
                        Value::String(s) => s,
                        other => render_plain(&other),
                    })
                    .collect()
            });
            if cmd.iter().flatten().any(|arg| arg.contains('\0')) {
                errors.push(RecipeDiagnostic::at(
                    step.span.clone(),
                    format!(
                        "`cmd` of step `{}` holds a NUL character, which no command can receive",
                        step.name
                    ),
                ));
            }

            let mut inputs = BTreeMap::new();
            for (name, input) in &step.inputs {
                let Some(u) = by_name(&input.step) else {
                    continue;
                };
                let resolved = if input.gather {
                    let (shared, groups) = &gathers[name.as_str()];
                    table.restriction_key(first, shared, &mut key);
                    InstanceInput::Gather(groups.get(&key).cloned().unwrap_or_default())
                } else {
                    InstanceInput::One(
                        base[u] + groupings[grouping_of[u]].local_of_arm[first] as usize,
                    )
                };
                inputs.insert(name.clone(), resolved);
            }

            instances.push(Instance {
                step: s,
                bindings,
                params,
                cmd,
                inputs,
                arms: arms.clone(),
                gate: None,
            });
        }
    }

    if let Some(search) = &recipe.search {
        let step_of = |name: &str| by_name(name).expect("the parser checked the search's steps");
        let budget = table.var_index[search.budget.as_str()];
        let depends = |s: usize| deps[s].binary_search(&budget).is_ok();
        let metric = step_of(&search.metric_step);
        if !depends(metric) {
            errors.push(
                RecipeDiagnostic::at(
                    search.metric_span.clone(),
                    format!(
                        "the metric step `{}` does not depend on the budget `{}`: every rung would rank the same outputs",
                        search.metric_step, search.budget
                    ),
                )
                .with_help(format!(
                    "read the output of a step that uses `${{{}}}`",
                    search.budget
                )),
            );
        }
        if let Some(name) = &search.continue_step
            && !depends(step_of(name))
        {
            errors.push(RecipeDiagnostic::at(
                search.continue_span.clone().unwrap_or(search.span.clone()),
                format!(
                    "the step `{name}` does not depend on the budget `{}`, so it has nothing to continue",
                    search.budget
                ),
            ));
        }
        if errors.is_empty() {
            let continue_step = search.continue_step.as_deref().map(step_of);
            link_rungs(search, &mut instances, step_of(SEARCH_STEP), continue_step);
            instances = in_rung_order(search, instances);
        }
    }

    if !errors.is_empty() {
        return Err(fail(super::errors::tidy(errors)));
    }
    Ok(Expansion {
        arms: table.arms,
        instances,
    })
}

/// Wire the rungs of a `[search]`: every instance of a rung after the first is gated by the
/// search step's instance of the rung before, and the `continue` step's instance reads its
/// own arm's instance of the rung before as [`CONTINUE_INPUT`].
fn link_rungs(
    search: &Search,
    instances: &mut [Instance],
    search_step: usize,
    continue_step: Option<usize>,
) {
    let rung_of = |inst: &Instance| {
        inst.bindings
            .get(&search.budget)
            .and_then(|b| search.rung_of(b))
    };
    let mut decider: HashMap<usize, usize> = HashMap::new();
    // (step, its bindings but the budget, rung) → instance, for the continue step.
    let mut by_arm: HashMap<(usize, String, usize), usize> = HashMap::new();
    let without_budget = |inst: &Instance| search.arm_key(&inst.bindings);
    for (i, inst) in instances.iter().enumerate() {
        let Some(rung) = rung_of(inst) else { continue };
        if inst.step == search_step {
            decider.insert(rung, i);
        }
        if Some(inst.step) == continue_step {
            by_arm.insert((inst.step, without_budget(inst), rung), i);
        }
    }
    for inst in instances.iter_mut() {
        let Some(rung) = rung_of(inst).filter(|&r| r > 0) else {
            continue;
        };
        inst.gate = decider.get(&(rung - 1)).copied();
        if Some(inst.step) == continue_step {
            let arm = without_budget(inst);
            if let Some(&before) = by_arm.get(&(inst.step, arm, rung - 1)) {
                (inst.inputs).insert(CONTINUE_INPUT.to_string(), InstanceInput::One(before));
            }
        }
    }
}

/// The instances reordered so that every input and gate comes before its reader: stably by
/// the last rung each depends on (its own budget, its inputs' and its gate's). Within one step
/// the order is topological; across rungs, a rung's steps wait for the decision of the rung
/// before, which reads that rung's steps of every arm.
fn in_rung_order(search: &Search, instances: Vec<Instance>) -> Vec<Instance> {
    let n = instances.len();
    // Each instance's rung, raised to its inputs' and gate's, in a topological pass: the
    // instances are in step order, an input before its reader except across rungs, so repeat
    // until nothing rises (as many passes as rungs at most).
    let mut level: Vec<usize> = (instances.iter())
        .map(|inst| {
            (inst.bindings.get(&search.budget))
                .and_then(|b| search.rung_of(b))
                .unwrap_or(0)
        })
        .collect();
    loop {
        let mut changed = false;
        for (i, inst) in instances.iter().enumerate() {
            let from_inputs = (inst.inputs.values())
                .flat_map(|input| input.indices().iter().copied())
                .chain(inst.gate)
                .map(|u| level[u])
                .max()
                .unwrap_or(0);
            if from_inputs > level[i] {
                level[i] = from_inputs;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| level[i]);
    let mut new_index = vec![0usize; n];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new;
    }
    let mut slots: Vec<Option<Instance>> = instances.into_iter().map(Some).collect();
    order
        .iter()
        .map(|&old| {
            let mut inst = slots[old].take().expect("each instance is moved once");
            for input in inst.inputs.values_mut() {
                match input {
                    InstanceInput::One(u) => *u = new_index[*u],
                    InstanceInput::Gather(members) => {
                        members.iter_mut().for_each(|u| *u = new_index[*u])
                    }
                }
            }
            inst.gate = inst.gate.map(|g| new_index[g]);
            inst
        })
        .collect()
}

/// The longest string Linux passes in an environment (`NAME=value` and its NUL):
/// MAX_ARG_STRLEN, 32 pages.
const MAX_ENV_STRING: usize = 32 * 4096;

/// The most a step's params may take of its environment: exec refuses an argument list and
/// environment over ARG_MAX (2 MiB with the usual 8 MiB stack), which the runner's own
/// environment, the inputs and the command line share.
const MAX_PARAMS_ENV: usize = 1 << 20;

/// Bytes of `NAME=value` in an environment block.
fn env_bytes(name: &str, value: &str) -> usize {
    name.len() + 1 + value.len() + 1
}

/// A param whose value, once vars are substituted, does not fit its type. The help names the
/// swept values that produced it, or else the defaults it came from.
fn type_error(
    step: &StepDef,
    pname: &str,
    template: &Value,
    m: &TypeMismatch,
    bindings: &BTreeMap<String, Value>,
    defaults: &BTreeMap<String, Value>,
) -> RecipeDiagnostic {
    let span = step.param_spans.get(pname).unwrap_or(&step.span);
    let diag = RecipeDiagnostic::at(
        span.clone(),
        format!(
            "param `{pname}` of op `{}` expects {}, found {}",
            step.op, m.expected, m.found
        ),
    );
    let mut used = Vec::new();
    super::template::value_vars(template, &mut used);
    let swept: BTreeMap<String, Value> = bindings
        .iter()
        .filter(|(k, _)| used.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !swept.is_empty() {
        return diag.with_help(format!("when {}", bindings_label(&swept)));
    }
    match used.first().and_then(|v| Some((v, defaults.get(v)?))) {
        Some((var, value)) => diag.with_help(format!(
            "`{var}` is `{}` (from `[vars]` or `--set`)",
            crate::value::render_short(value)
        )),
        None => diag,
    }
}

/// A diagnostic at a param's value (or at its step, for a param the step did not write).
fn param_error(step: &StepDef, pname: &str, message: String) -> RecipeDiagnostic {
    let span = step.param_spans.get(pname).unwrap_or(&step.span);
    RecipeDiagnostic::at(span.clone(), message)
}

/// Why the file or directory a `path` param names cannot be read, if it cannot: `does not
/// exist`, or the error. Only its metadata is read here; planning fingerprints it.
fn unreadable_path(written: &str, path: &std::path::Path) -> Option<String> {
    match std::fs::metadata(path) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("names `{written}`, which does not exist"))
        }
        Err(e) => Some(format!("names `{written}`, which cannot be read: {e}")),
    }
}

/// Upstream instances (global indices, in order) by the key of their shared bindings.
type Groups = HashMap<Vec<u8>, Vec<usize>>;

/// The arms grouped by their restriction to a set of vars: one group per instance of a step
/// that depends on exactly those vars.
struct Grouping {
    /// Arm → its group.
    local_of_arm: Vec<u32>,
    /// Group → its arms, ascending; groups in order of their first arm.
    arms_of: Vec<Vec<u32>>,
}

/// The arms, with each binding's canonical encoding kept for grouping.
struct ArmTable {
    /// Swept vars, sorted (the order of [`Arm::bindings`]).
    vars: Vec<String>,
    var_index: HashMap<String, usize>,
    arms: Vec<Arm>,
    /// `values[a * vars.len() + v]`: the value of var `v` in arm `a`.
    values: Vec<Value>,
    /// The canonical encoding of each of `values`.
    encoded: Vec<Vec<u8>>,
}

impl ArmTable {
    fn build(recipe: &Recipe) -> Result<ArmTable, RecipeDiagnostic> {
        let sweep = &recipe.sweep;
        let vars: Vec<String> = sweep.vars().into_iter().collect();
        let var_index: HashMap<String, usize> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone(), i))
            .collect();

        let product = sweep
            .axes
            .iter()
            .try_fold(1usize, |acc, axis| acc.checked_mul(axis.rows.len()));
        let total = product.and_then(|p| p.checked_add(sweep.include.len()));
        match total {
            Some(t) if t <= MAX_ARMS => {}
            _ => {
                let count = match product {
                    Some(p) => p.to_string(),
                    None => "too many".to_string(),
                };
                return Err(RecipeDiagnostic::whole(format!(
                    "the sweep has {count} arms, more than the limit of {MAX_ARMS}"
                ))
                .with_help("zip vars that advance together, or exclude arms you do not need"));
            }
        }

        // Defaults for vars an arm leaves unbound (include arms, vars only an include names).
        let defaults: Vec<Value> = vars
            .iter()
            .map(|var| {
                recipe.vars.get(var).cloned().unwrap_or_else(|| {
                    sweep
                        .axes
                        .iter()
                        .find_map(|axis| {
                            let j = axis.vars.iter().position(|v| v == var)?;
                            axis.rows.first().map(|row| row[j].clone())
                        })
                        .unwrap_or(Value::Null)
                })
            })
            .collect();
        let axis_vars: Vec<Vec<usize>> = sweep
            .axes
            .iter()
            .map(|axis| axis.vars.iter().map(|v| var_index[v]).collect())
            .collect();
        // Excludes grouped by the vars they bind: an arm is dropped when its restriction to
        // a group's vars is one of that group's bindings. One hash lookup per group and arm,
        // where comparing every exclude with every arm could take minutes.
        let mut exclude_groups: Vec<(Vec<usize>, HashSet<Vec<u8>>)> = Vec::new();
        let mut group_of: HashMap<Vec<usize>, usize> = HashMap::new();
        for ex in &sweep.exclude {
            let mut bound: Vec<(usize, Vec<u8>)> = ex
                .iter()
                .filter_map(|(k, v)| var_index.get(k).map(|&i| (i, crate::canonical::encode(v))))
                .collect();
            bound.sort_unstable();
            let vars: Vec<usize> = bound.iter().map(|(i, _)| *i).collect();
            let mut key = Vec::new();
            for (_, e) in &bound {
                key.extend_from_slice(e);
                key.push(SEP);
            }
            let g = *group_of.entry(vars.clone()).or_insert_with(|| {
                exclude_groups.push((vars, HashSet::new()));
                exclude_groups.len() - 1
            });
            exclude_groups[g].1.insert(key);
        }

        let mut table = ArmTable {
            vars,
            var_index,
            arms: Vec::new(),
            values: Vec::new(),
            encoded: Vec::new(),
        };
        let mut seen: HashSet<Vec<u8>> = HashSet::new();

        let mut push = |table: &mut ArmTable, row: Vec<Value>, encoded: Vec<Vec<u8>>| {
            let mut key = Vec::new();
            for e in &encoded {
                key.extend_from_slice(e);
                key.push(SEP);
            }
            if !seen.insert(key) {
                return;
            }
            let bindings: BTreeMap<String, Value> = table
                .vars
                .iter()
                .cloned()
                .zip(row.iter().cloned())
                .collect();
            table.arms.push(Arm {
                id: arm_id(&bindings),
                bindings,
            });
            table.values.extend(row);
            table.encoded.extend(encoded);
        };

        if let Some(count) = product.filter(|p| *p > 0) {
            let mut pos = vec![0usize; sweep.axes.len()];
            let mut key = Vec::new();
            for _ in 0..count {
                let mut row = defaults.clone();
                for (axis_i, axis) in sweep.axes.iter().enumerate() {
                    for (j, &v) in axis_vars[axis_i].iter().enumerate() {
                        row[v] = axis.rows[pos[axis_i]][j].clone();
                    }
                }
                let encoded: Vec<Vec<u8>> = row.iter().map(crate::canonical::encode).collect();
                let excluded = exclude_groups.iter().any(|(vars, bindings)| {
                    key.clear();
                    for &v in vars {
                        key.extend_from_slice(&encoded[v]);
                        key.push(SEP);
                    }
                    bindings.contains(&key)
                });
                if !excluded {
                    push(&mut table, row, encoded);
                }
                // Advance the odometer: the last axis moves fastest.
                for axis_i in (0..pos.len()).rev() {
                    pos[axis_i] += 1;
                    if pos[axis_i] < sweep.axes[axis_i].rows.len() {
                        break;
                    }
                    pos[axis_i] = 0;
                }
            }
        }
        for inc in &sweep.include {
            let mut row = defaults.clone();
            for (k, v) in inc {
                if let Some(&i) = table.var_index.get(k) {
                    row[i] = v.clone();
                }
            }
            let encoded = row.iter().map(crate::canonical::encode).collect();
            push(&mut table, row, encoded);
        }

        if table.arms.is_empty() {
            return Err(RecipeDiagnostic::whole(
                "the sweep has no arms: `exclude` drops every one",
            )
            .with_help("loosen an `[[sweep.exclude]]`, or add an `[[sweep.include]]`"));
        }
        Ok(table)
    }

    /// Group the arms by their restriction to `vars` (sorted var indices).
    fn grouping(&self, vars: &[usize]) -> Grouping {
        let n = self.arms.len();
        if vars.is_empty() {
            return Grouping {
                local_of_arm: vec![0; n],
                arms_of: vec![(0..n as u32).collect()],
            };
        }
        let mut local_of_arm = Vec::with_capacity(n);
        let mut arms_of: Vec<Vec<u32>> = Vec::new();
        let mut index: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut key = Vec::new();
        for a in 0..n {
            self.restriction_key(a, vars, &mut key);
            let local = match index.get(&key) {
                Some(&l) => l,
                None => {
                    let l = arms_of.len() as u32;
                    index.insert(key.clone(), l);
                    arms_of.push(Vec::new());
                    l
                }
            };
            arms_of[local as usize].push(a as u32);
            local_of_arm.push(local);
        }
        Grouping {
            local_of_arm,
            arms_of,
        }
    }

    fn arm_values(&self, a: usize) -> &[Value] {
        let n = self.vars.len();
        &self.values[a * n..(a + 1) * n]
    }

    /// The key of arm `a` restricted to `vars`, written into `key`.
    fn restriction_key(&self, a: usize, vars: &[usize], key: &mut Vec<u8>) {
        let n = self.vars.len();
        key.clear();
        for &v in vars {
            key.extend_from_slice(&self.encoded[a * n + v]);
            key.push(SEP);
        }
    }
}

/// Separates encodings in a key; never part of UTF-8 text, so never of canonical JSON.
const SEP: u8 = 0xff;

/// First 8 hex digits of the BLAKE3 of the canonical encoding of the bindings object.
pub(crate) fn arm_id(bindings: &BTreeMap<String, Value>) -> String {
    let object = Value::Object(
        bindings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    let hash = blake3::hash(&crate::canonical::encode(&object));
    hash.to_hex()[..8].to_string()
}

/// Steps ordered so that every step comes after the steps it reads; among steps that are
/// ready together, file order.
fn topological_order(steps: &[StepDef]) -> Result<Vec<usize>, RecipeDiagnostic> {
    let index: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut waiting = vec![0usize; steps.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        let ups: BTreeSet<usize> = step
            .inputs
            .values()
            .filter_map(|input| index.get(input.step.as_str()).copied())
            .collect();
        waiting[i] = ups.len();
        for u in ups {
            readers[u].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..steps.len())
        .filter(|&i| waiting[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(steps.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &r in &readers[i] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.push(Reverse(r));
            }
        }
    }
    if order.len() < steps.len() {
        let stuck: Vec<&str> = (0..steps.len())
            .filter(|&i| waiting[i] > 0)
            .map(|i| steps[i].name.as_str())
            .collect();
        return Err(RecipeDiagnostic::whole(format!(
            "the steps {} form a cycle",
            super::errors::backticked(stuck)
        )));
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arm_id_is_stable_and_order_free() {
        let a: BTreeMap<String, Value> = [
            ("arch".to_string(), json!("a")),
            ("n".to_string(), json!(1)),
        ]
        .into();
        assert_eq!(arm_id(&a), arm_id(&a.clone()));
        assert_eq!(arm_id(&a).len(), 8);
        // Pinned: changing the encoding or the hash breaks every stored arm id.
        assert_eq!(arm_id(&BTreeMap::new()), &blake3::hash(b"{}").to_hex()[..8]);
    }
}
