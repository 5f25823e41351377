//! From recipe text to a validated [`Recipe`].
//!
//! The TOML is read into a spanned tree (`toml::de::DeTable`), so every key and value keeps
//! the byte range it came from. Validation walks that tree once, pushing a
//! [`RecipeDiagnostic`] for each problem and carrying on, so that one run reports every error
//! of the file. Only TOML syntax errors stop it early: past those the tree is a guess.
//!
//! Order of the checks:
//! 1. TOML syntax (all of it, then stop if any);
//! 2. top-level tables, `[recipe]`, `[vars]`, `[sweep]`;
//! 3. each step on its own: keys, op, params against the op's schema, templates, code paths,
//!    resources, retries, timeout;
//! 4. across steps: inputs name existing steps, no cycles;
//! 5. `--set`, then vars: every referenced var defined, every swept var used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::errors::{backticked, did_you_mean, line_col};
use super::template::{has_refs, is_var_name, template_vars};
use super::*;
use crate::ops::{InputsSchema, OpCatalog, OpKind, OpSchema, ParamsSchema};

type Node<'i> = Spanned<DeValue<'i>>;
type Key<'i> = Spanned<toml::de::DeString<'i>>;
/// Names with the span each was found at.
type Spans = Vec<(String, Range<usize>)>;

const TOP_KEYS: &[&str] = &["recipe", "vars", "sweep", "steps"];
const RECIPE_KEYS: &[&str] = &["name", "description"];
const STEP_KEYS: &[&str] = &[
    "op",
    "cmd",
    "code",
    "environment",
    "params",
    "inputs",
    "resources",
    "retries",
    "timeout",
];
const RESOURCE_KEYS: &[&str] = &["gpus", "gpu_mem_gb", "cpus", "mem_gb"];
/// The most bytes one `code` entry may hold.
const CODE_LIMIT: u64 = 1 << 30;

/// The bytes of `files` (a file that cannot be read counts nothing: hashing reports it).
fn code_bytes(files: &[(String, std::path::PathBuf)]) -> u64 {
    files
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// `resources.gpus` as written, before `gpu_mem_gb` is taken into account.
enum Gpus {
    Whole(u32),
    Share(f64),
}

const RETRY_KEYS: &[&str] = &["count", "backoff"];
/// Keys of `[sweep]` that are not vars.
const SWEEP_RESERVED: &[&str] = &["zip", "exclude", "include"];

/// Parse and validate a recipe, applying `--set` values. Every problem of the file is
/// reported, not only the first.
pub fn parse(
    source: RecipeSource,
    sets: &[SetArg],
    catalog: &dyn OpCatalog,
) -> Result<Recipe, RecipeErrors> {
    let mut p = Parser {
        catalog,
        sets,
        source: &source,
        errors: Vec::new(),
    };
    let parsed = p.document();
    let errors = super::errors::tidy(p.errors);
    match parsed {
        Some(parts) if errors.is_empty() => Ok(Recipe {
            name: parts.name,
            description: parts.description,
            vars: parts.vars,
            sweep: parts.sweep,
            steps: parts.steps,
            source,
        }),
        _ => Err(RecipeErrors::new(&source, errors)),
    }
}

/// Read a `--set` value: a TOML value (`3`, `0.5`, `true`, `"x"`, `[1, 2]`) where it is one,
/// else the raw text as a string (`pixel-diffusion`).
pub(crate) fn value_from_cli(raw: &str) -> Value {
    DeValue::parse(raw)
        .ok()
        .and_then(|v| to_value(&v, &mut Vec::new()))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

/// What a valid file yields, before it is joined with its source.
struct Parts {
    name: String,
    description: Option<String>,
    vars: BTreeMap<String, Value>,
    sweep: Sweep,
    steps: Vec<StepDef>,
}

struct Parser<'a> {
    catalog: &'a dyn OpCatalog,
    sets: &'a [SetArg],
    source: &'a RecipeSource,
    errors: Vec<RecipeDiagnostic>,
}

/// A step as read, with what the cross-step checks need.
struct Draft {
    def: StepDef,
    /// Every `${var}` of params and cmd, with the span of the string holding it.
    refs: Vec<(String, Range<usize>)>,
    /// Input name → span of its value (`"haystack"`).
    input_spans: BTreeMap<String, Range<usize>>,
}

/// The sweep as read, with spans for the checks that need the steps.
#[derive(Default)]
struct SweepDraft {
    sweep: Sweep,
    /// Swept var → span of its key (in `[sweep]` or its zip group).
    keys: BTreeMap<String, Range<usize>>,
    /// Var → span of its key in an `exclude` or `include` entry, for each entry.
    bindings: Vec<(&'static str, Spans)>,
    /// Vars swept by a list already reported as malformed: defined, but not checked further.
    broken: BTreeSet<String>,
}

fn key_str<'k>(k: &'k Key<'_>) -> &'k str {
    k.get_ref().as_ref()
}

fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "string",
        DeValue::Integer(_) => "int",
        DeValue::Float(_) => "float",
        DeValue::Boolean(_) => "bool",
        DeValue::Datetime(_) => "datetime",
        DeValue::Array(_) => "array",
        DeValue::Table(_) => "table",
    }
}

/// `int 3`, `string "x"`, `array`: how a value is named in a type error.
fn describe(v: &Node<'_>) -> String {
    match v.get_ref() {
        DeValue::String(s) => format!("string \"{s}\""),
        DeValue::Integer(i) => format!("int {i}"),
        DeValue::Float(f) => format!("float {f}"),
        DeValue::Boolean(b) => format!("bool {b}"),
        DeValue::Datetime(d) => format!("datetime {d}"),
        other => kind(other).to_string(),
    }
}

/// Convert a TOML value to a [`Value`], reporting what JSON cannot hold.
fn to_value(v: &Node<'_>, errors: &mut Vec<RecipeDiagnostic>) -> Option<Value> {
    Some(match v.get_ref() {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => {
            if let Ok(n) = i64::from_str_radix(i.as_str(), i.radix()) {
                Value::from(n)
            } else if let Ok(n) = u64::from_str_radix(i.as_str(), i.radix()) {
                Value::from(n)
            } else {
                errors.push(RecipeDiagnostic::at(
                    v.span(),
                    format!("integer `{i}` is out of range"),
                ));
                return None;
            }
        }
        DeValue::Float(f) => {
            let x: f64 = f.as_str().parse().unwrap_or(f64::NAN);
            match serde_json::Number::from_f64(x) {
                Some(n) if x.is_finite() => Value::Number(n),
                _ => {
                    errors.push(RecipeDiagnostic::at(
                        v.span(),
                        format!("non-finite float `{f}` is not allowed"),
                    ));
                    return None;
                }
            }
        }
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            let mut ok = true;
            for item in items.iter() {
                match to_value(item, errors) {
                    Some(x) => out.push(x),
                    None => ok = false,
                }
            }
            if !ok {
                return None;
            }
            Value::Array(out)
        }
        DeValue::Table(t) => {
            let mut out = serde_json::Map::new();
            let mut ok = true;
            for (k, item) in t.iter() {
                match to_value(item, errors) {
                    Some(x) => {
                        out.insert(key_str(k).to_string(), x);
                    }
                    None => ok = false,
                }
            }
            if !ok {
                return None;
            }
            Value::Object(out)
        }
    })
}

/// Every string inside a value, with its span.
fn strings<'v, 'i>(v: &'v Node<'i>, out: &mut Vec<(&'v str, Range<usize>)>) {
    match v.get_ref() {
        DeValue::String(s) => out.push((s.as_ref(), v.span())),
        DeValue::Array(items) => items.iter().for_each(|i| strings(i, out)),
        DeValue::Table(t) => t.values().for_each(|i| strings(i, out)),
        _ => {}
    }
}

/// A TOML syntax error, with the key or value it is about and a hint for the common ones.
fn syntax_error(text: &str, span: Range<usize>, message: &str) -> RecipeDiagnostic {
    let at = text.get(span.clone()).unwrap_or("");
    let rest = text.get(span.start..).unwrap_or("");
    let word: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && !",]}#".contains(*c))
        .collect();
    let (message, help) = if message == "duplicate key" && !at.is_empty() {
        (
            format!("duplicate key `{at}`"),
            Some("a key is written once in its table, and each step name once in a recipe".into()),
        )
    } else if message.starts_with("string values must be quoted") {
        if word.is_empty() {
            (
                "missing value after `=`".to_string(),
                Some("write a value: a number, `true`, `\"text\"`, `[...]` or `{ ... }`".into()),
            )
        } else {
            (message.to_string(), Some(format!("quote it: `\"{word}\"`")))
        }
    } else if message.starts_with("invalid unquoted key")
        && !rest.starts_with(|c: char| c.is_ascii())
    {
        (
            message.to_string(),
            Some("a key that is not ASCII must be quoted; needle's own names (steps, vars) are ASCII".into()),
        )
    } else if message.starts_with("cannot recurse further") {
        (
            message.to_string(),
            Some("arrays and tables nest deeper here than a recipe may".into()),
        )
    } else {
        (message.to_string(), None)
    };
    let mut d = RecipeDiagnostic::at(span, message);
    d.help = help;
    d
}

fn is_step_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl<'a> Parser<'a> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.errors.push(RecipeDiagnostic::at(span, message));
    }

    fn error_help(&mut self, span: Range<usize>, message: impl Into<String>, help: Option<String>) {
        let mut d = RecipeDiagnostic::at(span, message);
        d.help = help;
        self.errors.push(d);
    }

    fn value(&mut self, v: &Node<'_>) -> Option<Value> {
        to_value(v, &mut self.errors)
    }

    fn document(&mut self) -> Option<Parts> {
        let text = self.source.text.as_str();
        let (root, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            for e in syntax {
                let d = match e.span() {
                    Some(span) => syntax_error(text, span, e.message()),
                    None => RecipeDiagnostic::whole(e.message()),
                };
                self.errors.push(d);
            }
            return None;
        }
        let root = root.get_ref();

        let mut recipe = None;
        let mut vars = None;
        let mut sweep = None;
        let mut steps = None;
        for (k, v) in root.iter() {
            match key_str(k) {
                "recipe" => recipe = Some(v),
                "vars" => vars = Some(v),
                "sweep" => sweep = Some(v),
                "steps" => steps = Some(v),
                other => {
                    let what = if v.get_ref().is_table() {
                        format!("unknown table `[{other}]`")
                    } else {
                        format!("unknown top-level key `{other}`")
                    };
                    let under_recipe = RECIPE_KEYS.contains(&other) && !v.get_ref().is_table();
                    let help = did_you_mean(other, TOP_KEYS.iter().copied())
                        .or_else(|| under_recipe.then(|| format!("put `{other}` under `[recipe]`")))
                        .or_else(|| {
                        Some(
                            "a recipe has the tables `[recipe]`, `[vars]`, `[sweep]` and `[steps.NAME]`"
                                .to_string(),
                        )
                    });
                    self.error_help(k.span(), what, help);
                }
            }
        }

        let (name, description) = self.recipe_table(recipe);
        let mut vars = self.vars_table(vars);
        let mut sweep = match sweep {
            Some(s) => self.sweep_table(s),
            None => SweepDraft::default(),
        };
        let drafts = self.steps_table(steps);
        self.check_inputs(&drafts);
        self.check_exclude_values(&sweep);
        self.apply_sets(&mut vars, &mut sweep, &drafts);
        self.check_vars(&vars, &sweep, &drafts);

        Some(Parts {
            name: name?,
            description,
            vars,
            sweep: sweep.sweep,
            steps: drafts.into_iter().map(|d| d.def).collect(),
        })
    }

    fn table<'v, 'i>(&mut self, v: &'v Node<'i>, what: &str) -> Option<&'v DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                let help = match what {
                    "`recipe`" => Some("write a `[recipe]` table holding `name = \"...\"`".into()),
                    "`vars`" => Some("write a `[vars]` table, one `name = value` a line".into()),
                    "`sweep`" => {
                        Some("write a `[sweep]` table, one `var = [values...]` a line".into())
                    }
                    "`steps`" => {
                        Some("write each step as a table of its own: `[steps.NAME]`".into())
                    }
                    "`params`" | "`inputs`" | "`resources`" => Some(format!(
                        "write {what} as a table: `{} = {{ name = ... }}`",
                        what.trim_matches('`')
                    )),
                    _ => what.strip_prefix("step `").map(|name| {
                        format!(
                            "write the step as a table: `[steps.{}]` with an `op`",
                            name.trim_end_matches('`')
                        )
                    }),
                };
                self.error_help(
                    v.span(),
                    format!("{what} must be a table, found {}", kind(other)),
                    help,
                );
                None
            }
        }
    }

    fn recipe_table(&mut self, v: Option<&Node<'_>>) -> (Option<String>, Option<String>) {
        let Some(v) = v else {
            self.errors.push(
                RecipeDiagnostic::whole("missing `[recipe]` table")
                    .with_help("start the file with `[recipe]` and a `name = \"...\"`"),
            );
            return (None, None);
        };
        let Some(t) = self.table(v, "`recipe`") else {
            return (None, None);
        };
        let mut name = None;
        let mut description = None;
        for (k, val) in t.iter() {
            match key_str(k) {
                key @ ("name" | "description") => match val.get_ref() {
                    DeValue::String(s) if key == "name" && s.trim().is_empty() => {
                        self.error(val.span(), "recipe `name` is empty");
                    }
                    DeValue::String(s) if key == "name" => name = Some(s.to_string()),
                    DeValue::String(s) => description = Some(s.to_string()),
                    _ => self.error(
                        val.span(),
                        format!("recipe `{key}` must be a string, found {}", describe(val)),
                    ),
                },
                other => {
                    let help = did_you_mean(other, RECIPE_KEYS.iter().copied());
                    self.error_help(
                        k.span(),
                        format!("unknown key `{other}` in `[recipe]`"),
                        help.or_else(|| Some("`[recipe]` has `name` and `description`".into())),
                    );
                }
            }
        }
        if name.is_none() && !t.iter().any(|(k, _)| key_str(k) == "name") {
            self.error(v.span(), "`[recipe]` has no `name`");
            // A placeholder keeps the other checks going; the error stops the recipe.
            name = Some(String::new());
        }
        (name, description)
    }

    fn vars_table(&mut self, v: Option<&Node<'_>>) -> BTreeMap<String, Value> {
        let mut vars = BTreeMap::new();
        let Some(t) = v.and_then(|v| self.table(v, "`vars`")) else {
            return vars;
        };
        for (k, val) in t.iter() {
            let name = key_str(k);
            if !self.var_name_ok(name, k.span()) {
                continue;
            }
            // A value that failed to convert is reported; the var still counts as defined.
            let x = self.value(val).unwrap_or(Value::Null);
            vars.insert(name.to_string(), x);
        }
        vars
    }

    /// Report a key that cannot name a var.
    fn var_name_ok(&mut self, name: &str, span: Range<usize>) -> bool {
        if SWEEP_RESERVED.contains(&name) {
            self.error_help(
                span,
                format!("`{name}` cannot name a var"),
                Some("`zip`, `exclude` and `include` are reserved by `[sweep]`".into()),
            );
            false
        } else if !is_var_name(name) {
            self.error_help(
                span,
                format!("invalid var name `{name}`"),
                Some(
                    "var names are ASCII letters, digits, `_` and `-`, not starting with a digit"
                        .into(),
                ),
            );
            false
        } else {
            true
        }
    }

    fn sweep_table(&mut self, v: &Node<'_>) -> SweepDraft {
        let mut draft = SweepDraft::default();
        let Some(t) = self.table(v, "`sweep`") else {
            return draft;
        };
        let mut zip_axes = Vec::new();
        for (k, val) in t.iter() {
            let key = key_str(k);
            match key {
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
        draft
    }

    /// The tables of `[[sweep.zip]]` (and friends), or an error if it was written otherwise.
    fn array_of_tables<'v, 'i>(&mut self, k: &Key<'_>, v: &'v Node<'i>) -> Vec<&'v Node<'i>> {
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
    fn first_sweep(
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
    fn sweep_list(&mut self, name: &str, v: &Node<'_>) -> Option<Vec<Value>> {
        match v.get_ref() {
            DeValue::Array(items) if items.is_empty() => {
                self.error(v.span(), format!("sweep over `{name}` has no values"));
                None
            }
            DeValue::Array(items) => {
                let values: Vec<Option<Value>> = items.iter().map(|i| self.value(i)).collect();
                values.into_iter().collect()
            }
            _ => {
                self.error_help(
                    v.span(),
                    format!("sweep over `{name}` must be a list, found {}", describe(v)),
                    Some(format!(
                        "write `{name} = [...]`; a single value belongs in `[vars]`"
                    )),
                );
                None
            }
        }
    }

    fn zip_group(
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

    fn sweep_entry(&mut self, which: &'static str, entry: &Node<'_>, draft: &mut SweepDraft) {
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

    fn steps_table(&mut self, v: Option<&Node<'_>>) -> Vec<Draft> {
        let Some(v) = v else {
            self.errors.push(
                RecipeDiagnostic::whole("recipe has no steps")
                    .with_help("add a step: a `[steps.NAME]` table with an `op`"),
            );
            return Vec::new();
        };
        let Some(t) = self.table(v, "`steps`") else {
            return Vec::new();
        };
        if t.is_empty() {
            self.error_help(
                v.span(),
                "recipe has no steps",
                Some("add a step: a `[steps.NAME]` table with an `op`".into()),
            );
        }
        let mut drafts = Vec::new();
        for (k, val) in t.iter() {
            if let Some(d) = self.step(k, val) {
                drafts.push(d);
            }
        }
        drafts
    }

    fn step(&mut self, k: &Key<'_>, v: &Node<'_>) -> Option<Draft> {
        let name = key_str(k);
        if !is_step_name(name) {
            let message = if name.is_empty() {
                "empty step name".to_string()
            } else {
                format!("invalid step name `{name}`")
            };
            self.error_help(
                k.span(),
                message,
                Some("step names are ASCII letters, digits, `_` and `-`".into()),
            );
        }
        let t = self.table(v, &format!("step `{name}`"))?;
        // `[steps.x]` spans its header; an inline `x = { ... }` is pointed at by its key.
        let (vs, ks) = (v.span(), k.span());
        let span = if vs.start <= ks.start && ks.end <= vs.end {
            vs
        } else {
            ks
        };

        let mut fields: HashMap<&str, (&Key<'_>, &Node<'_>)> = HashMap::new();
        for (fk, fv) in t.iter() {
            let key = key_str(fk);
            if STEP_KEYS.contains(&key) {
                fields.insert(key, (fk, fv));
            } else {
                let help = did_you_mean(key, STEP_KEYS.iter().copied()).unwrap_or_else(|| {
                    format!(
                        "a step has the keys {}",
                        backticked(STEP_KEYS.iter().copied())
                    )
                });
                self.error_help(
                    fk.span(),
                    format!("unknown key `{key}` in step `{name}`"),
                    Some(help),
                );
            }
        }

        let mut draft = Draft {
            def: StepDef {
                name: name.to_string(),
                op: String::new(),
                op_version: 0,
                kind: OpKind::Exec,
                path_params: Vec::new(),
                inputs: BTreeMap::new(),
                params: BTreeMap::new(),
                cmd: None,
                code: Vec::new(),
                environment: Vec::new(),
                resources: Resources::default(),
                retries: RetryPolicy::default(),
                timeout: None,
                vars_used: BTreeSet::new(),
                span: span.clone(),
                param_spans: BTreeMap::new(),
                resource_spans: BTreeMap::new(),
            },
            refs: Vec::new(),
            input_spans: BTreeMap::new(),
        };

        let schema = self.op(name, &span, fields.get("op").copied());
        if let Some(schema) = schema {
            draft.def.op = schema.name.to_string();
            draft.def.op_version = schema.version;
            draft.def.kind = schema.kind;
            draft.def.path_params = schema.path_params().into_iter().map(String::from).collect();
        }
        let is_exec = schema.map(|s| s.kind == OpKind::Exec);

        // cmd and code: exec only.
        for field in ["cmd", "code"] {
            if let (Some((fk, _)), Some(false)) = (fields.get(field), is_exec) {
                let op = &draft.def.op;
                self.error_help(
                    fk.span(),
                    format!("`{field}` is only for `exec` steps, and step `{name}` has op `{op}`"),
                    Some(format!("op `{op}` takes its settings as `params`")),
                );
            }
        }
        if let Some((_, cv)) = fields.get("cmd") {
            draft.def.cmd = self.cmd(cv, &mut draft.refs);
        } else if is_exec == Some(true) {
            self.error_help(
                span.clone(),
                format!("step `{name}` runs `exec` but has no `cmd`"),
                Some("give the command as a list: `cmd = [\"python3\", \"run.py\"]`".into()),
            );
        }
        if let Some((_, cv)) = fields.get("code") {
            draft.def.code = self.code(cv);
        }
        if let Some((_, ev)) = fields.get("environment") {
            draft.def.environment = self.environment(ev);
        }

        if let Some((_, pv)) = fields.get("params") {
            self.params(name, &span, schema, pv, &mut draft);
        } else {
            self.params_missing(&span, schema, &mut draft.def);
        }
        if let Some((_, iv)) = fields.get("inputs") {
            self.inputs(name, iv, &mut draft);
        }
        if let Some(schema) = schema {
            self.required_inputs(&span, schema, &draft.def);
        }
        if is_exec == Some(true) {
            self.env_collisions(name, "params", "NEEDLE_PARAM_", &draft.def.param_spans);
            self.env_collisions(name, "inputs", "NEEDLE_IN_", &draft.input_spans);
        }
        if let Some((_, rv)) = fields.get("resources") {
            draft.def.resources = self.resources(rv, &mut draft.def.resource_spans);
        }
        if let Some((_, rv)) = fields.get("retries") {
            draft.def.retries = self.retries(rv);
        }
        if let Some((_, tv)) = fields.get("timeout") {
            draft.def.timeout = self.duration("timeout", tv);
        }
        draft.def.vars_used = draft.refs.iter().map(|(n, _)| n.clone()).collect();
        Some(draft)
    }

    /// Two names of an `exec` step's params (or inputs) that reach its command as one
    /// environment variable: one would silently hide the other.
    fn env_collisions(
        &mut self,
        step: &str,
        what: &str,
        prefix: &str,
        spans: &BTreeMap<String, Range<usize>>,
    ) {
        let mut by_env: HashMap<String, &str> = HashMap::new();
        let mut named: Vec<(&String, &Range<usize>)> = spans.iter().collect();
        named.sort_by_key(|(_, span)| span.start);
        for (name, span) in named {
            let env = format!("{prefix}{}", crate::ops::env_name(name));
            if let Some(first) = by_env.get(env.as_str()) {
                self.error_help(
                    span.clone(),
                    format!(
                        "{what} `{first}` and `{name}` of step `{step}` both reach the command as `{env}`"
                    ),
                    Some("rename one of them".into()),
                );
            } else {
                by_env.insert(env, name);
            }
        }
    }

    /// Report any var reference in a field that takes none. True when the value is clean.
    fn no_vars(&mut self, field: &str, v: &Node<'_>) -> bool {
        let mut all = Vec::new();
        strings(v, &mut all);
        let mut clean = true;
        for (s, span) in all {
            if template_vars(s).map(|r| !r.is_empty()).unwrap_or(true) {
                self.error(span, format!("vars are not allowed in `{field}`"));
                clean = false;
            }
        }
        clean
    }

    /// The span of a `${var}` inside the string `s` written at `span`: exact when the string
    /// is written as it reads (no escapes, one line), else the whole string.
    fn ref_span(&self, s: &str, span: &Range<usize>, within: &Range<usize>) -> Range<usize> {
        match self.source.text.get(span.clone()) {
            Some(raw) if raw.len() == s.len() + 2 && &raw[1..raw.len() - 1] == s => {
                span.start + 1 + within.start..span.start + 1 + within.end
            }
            _ => span.clone(),
        }
    }

    /// Check the templates of every string in `v`, collecting their references.
    fn templates(&mut self, v: &Node<'_>, refs: &mut Vec<(String, Range<usize>)>) -> bool {
        let mut all = Vec::new();
        strings(v, &mut all);
        let mut ok = true;
        for (s, span) in all {
            match super::template::check(s) {
                Ok(found) => {
                    for r in found {
                        let at = self.ref_span(s, &span, &r.range);
                        refs.push((r.name, at));
                    }
                }
                Err(e) => {
                    self.error_help(span, e.message, e.help.map(str::to_string));
                    ok = false;
                }
            }
        }
        ok
    }

    fn op(
        &mut self,
        step: &str,
        step_span: &Range<usize>,
        field: Option<(&Key<'_>, &Node<'_>)>,
    ) -> Option<&'a OpSchema> {
        let catalog = self.catalog;
        let mut known: Vec<&str> = catalog.all().iter().map(|op| op.name).collect();
        known.sort_unstable();
        let Some((_, v)) = field else {
            self.error_help(
                step_span.clone(),
                format!("step `{step}` has no `op`"),
                Some(format!("known ops: {}", backticked(known.iter().copied()))),
            );
            return None;
        };
        if !self.no_vars("op", v) {
            return None;
        }
        let DeValue::String(op) = v.get_ref() else {
            self.error(
                v.span(),
                format!("`op` must be a string, found {}", describe(v)),
            );
            return None;
        };
        match catalog.get(op) {
            Some(schema) => Some(schema),
            None => {
                let list = format!("known ops: {}", backticked(known.iter().copied()));
                let help = match did_you_mean(op, known.iter().copied()) {
                    Some(hint) => format!("{hint} {list}"),
                    None => list,
                };
                self.error_help(v.span(), format!("unknown op `{op}`"), Some(help));
                None
            }
        }
    }

    fn cmd(&mut self, v: &Node<'_>, refs: &mut Vec<(String, Range<usize>)>) -> Option<Vec<Value>> {
        let help = Some(
            "write the argv as a list of strings, e.g. `cmd = [\"python3\", \"gen.py\"]`; no shell runs it"
                .to_string(),
        );
        let items = match v.get_ref() {
            DeValue::Array(items) if items.is_empty() => {
                self.error_help(v.span(), "`cmd` is empty", help);
                return None;
            }
            DeValue::Array(items) => items,
            _ => {
                self.error_help(
                    v.span(),
                    format!("`cmd` must be a list of strings, found {}", describe(v)),
                    help,
                );
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) if s.contains('\0') => {
                    self.error(
                        item.span(),
                        "`cmd` argument holds a NUL character, which no command can receive",
                    );
                    ok = false;
                }
                DeValue::String(s) => {
                    ok &= self.templates(item, refs);
                    out.push(Value::String(s.to_string()));
                }
                _ => {
                    self.error_help(
                        item.span(),
                        format!("`cmd` items must be strings, found {}", describe(item)),
                        Some("quote it: every argument reaches the command as text".into()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    /// `environment = ["python3 -V", "python3 -m pip freeze"]`: commands, each a string split
    /// at whitespace into an argv (no shell), run when the recipe is planned.
    fn environment(&mut self, v: &Node<'_>) -> Vec<String> {
        if !self.no_vars("environment", v) {
            return Vec::new();
        }
        let DeValue::Array(items) = v.get_ref() else {
            self.error_help(
                v.span(),
                format!(
                    "`environment` must be a list of commands, found {}",
                    describe(v)
                ),
                Some("e.g. `environment = [\"python3 -V\", \"python3 -m pip freeze\"]`".into()),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(c) if !c.trim().is_empty() && !c.contains('\0') => {
                    let command = c.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !out.contains(&command) {
                        out.push(command);
                    }
                }
                _ => self.error(
                    item.span(),
                    format!(
                        "`environment` commands must be non-empty strings, found {}",
                        describe(item)
                    ),
                ),
            }
        }
        out
    }

    fn code(&mut self, v: &Node<'_>) -> Vec<String> {
        if !self.no_vars("code", v) {
            return Vec::new();
        }
        let DeValue::Array(items) = v.get_ref() else {
            self.error(
                v.span(),
                format!("`code` must be a list of paths, found {}", describe(v)),
            );
            return Vec::new();
        };
        let mut out: Vec<String> = Vec::new();
        for item in items.iter() {
            let DeValue::String(raw) = item.get_ref() else {
                self.error(
                    item.span(),
                    format!("`code` paths must be strings, found {}", describe(item)),
                );
                continue;
            };
            let path = match normalise_code_path(raw) {
                Err(message) => {
                    self.error(item.span(), message);
                    continue;
                }
                Ok(path) => path,
            };
            // Walked here, so that what planning would trip on is reported at this line.
            match code_files(&self.source.dir, &path) {
                Ok(files) if code_bytes(&files) > CODE_LIMIT => self.error_help(
                    item.span(),
                    format!(
                        "code path `{raw}` holds {} in {} files: code is hashed at every plan \
                         and copied into every attempt's working directory",
                        crate::store::human_bytes(code_bytes(&files)),
                        files.len()
                    ),
                    Some(
                        "leave data out of `code` (a `.needleignore`, gitignore syntax, leaves \
                         files out of a directory): import it with a `files` step, whose output \
                         is an input like any other, or hand a built-in op its `path`"
                            .into(),
                    ),
                ),
                Ok(_) if !out.contains(&path) => out.push(path),
                Ok(_) => {}
                Err(CodeError::Missing { path: missing }) if missing == path => self.error_help(
                    item.span(),
                    format!("code path `{raw}` does not exist"),
                    Some("code paths are relative to the directory holding the recipe".into()),
                ),
                Err(e @ (CodeError::Outside { .. } | CodeError::Missing { .. })) => self
                    .error_help(
                        item.span(),
                        format!("code path `{raw}`: {e}"),
                        Some("a step's code must lie inside the directory holding the recipe; copy it there".into()),
                    ),
                Err(e @ CodeError::Loop { .. }) => self.error_help(
                    item.span(),
                    format!("code path `{raw}`: {e}"),
                    Some("remove the link, or name the files inside it".into()),
                ),
                Err(e @ CodeError::Special { .. }) => self.error_help(
                    item.span(),
                    format!("code path `{raw}`: {e}"),
                    Some("code is regular files and directories: a FIFO or a device could block the hashing".into()),
                ),
                Err(e @ CodeError::NotUtf8 { .. }) => {
                    self.error(item.span(), format!("code path `{raw}`: {e}"))
                }
                Err(e @ CodeError::Io { .. }) => {
                    let cause = std::error::Error::source(&e).map(|c| c.to_string());
                    let mut message = format!("code path `{raw}`: {e}");
                    if let Some(cause) = cause {
                        message.push_str(&format!(": {cause}"));
                    }
                    self.error(item.span(), message)
                }
            }
        }
        out
    }

    fn params(
        &mut self,
        step: &str,
        step_span: &Range<usize>,
        schema: Option<&OpSchema>,
        v: &Node<'_>,
        draft: &mut Draft,
    ) {
        let Some(t) = self.table(v, "`params`") else {
            return;
        };
        for (k, pv) in t.iter() {
            let pname = key_str(k);
            draft.def.param_spans.insert(pname.to_string(), pv.span());
            let templates_ok = self.templates(pv, &mut draft.refs);
            let Some(value) = self.value(pv) else {
                continue;
            };
            if let Some(OpSchema {
                name: op,
                params: ParamsSchema::Fixed(specs),
                ..
            }) = schema
            {
                let Some(spec) = specs.iter().find(|s| s.name == pname) else {
                    let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
                    let list = if names.is_empty() {
                        format!("op `{op}` takes no params")
                    } else {
                        format!("op `{op}` takes {}", backticked(names.iter().copied()))
                    };
                    let help = match did_you_mean(pname, names.iter().copied()) {
                        Some(hint) => format!("{hint} {list}"),
                        None => list,
                    };
                    self.error_help(
                        k.span(),
                        format!("unknown param `{pname}` for op `{op}` in step `{step}`"),
                        Some(help),
                    );
                    continue;
                };
                if templates_ok
                    && !has_refs(&value)
                    && let Err(m) = spec.ty.check(&value)
                {
                    self.error(
                        pv.span(),
                        format!(
                            "param `{pname}` of op `{op}` expects {}, found {}",
                            m.expected, m.found
                        ),
                    );
                }
            }
            draft.def.params.insert(pname.to_string(), value);
        }
        self.params_missing(step_span, schema, &mut draft.def);
    }

    /// Fill in the defaults of absent params; report absent params that have none.
    fn params_missing(
        &mut self,
        step_span: &Range<usize>,
        schema: Option<&OpSchema>,
        def: &mut StepDef,
    ) {
        let Some(OpSchema {
            name: op,
            params: ParamsSchema::Fixed(specs),
            ..
        }) = schema
        else {
            return;
        };
        for spec in specs {
            if def.params.contains_key(spec.name) || def.param_spans.contains_key(spec.name) {
                continue;
            }
            match &spec.default {
                Some(d) => {
                    def.params.insert(spec.name.to_string(), d.clone());
                }
                None => self.error_help(
                    step_span.clone(),
                    format!("missing param `{}` ({}) for op `{op}`", spec.name, spec.ty),
                    (!spec.doc.is_empty()).then(|| format!("`{}`: {}", spec.name, spec.doc)),
                ),
            }
        }
    }

    fn inputs(&mut self, step: &str, v: &Node<'_>, draft: &mut Draft) {
        if !self.no_vars("inputs", v) {
            return;
        }
        let Some(t) = self.table(v, "`inputs`") else {
            return;
        };
        let schema = self.catalog.get(&draft.def.op);
        for (k, iv) in t.iter() {
            let iname = key_str(k);
            if let Some(OpSchema {
                name: op,
                inputs: InputsSchema::Fixed(specs),
                ..
            }) = schema
                && !specs.iter().any(|s| s.name == iname)
            {
                let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
                let list = if names.is_empty() {
                    format!("op `{op}` takes no inputs")
                } else {
                    format!("op `{op}` takes {}", backticked(names.iter().copied()))
                };
                let help = match did_you_mean(iname, names.iter().copied()) {
                    Some(hint) => format!("{hint} {list}"),
                    None => list,
                };
                self.error_help(
                    k.span(),
                    format!("unknown input `{iname}` for op `{op}` in step `{step}`"),
                    Some(help),
                );
                continue;
            }
            let DeValue::String(target) = iv.get_ref() else {
                self.error_help(
                    iv.span(),
                    format!("input `{iname}` must name a step, found {}", describe(iv)),
                    Some(
                        "write `\"step\"`, or `\"step[*]\"` to gather every instance of a step"
                            .into(),
                    ),
                );
                continue;
            };
            let (target_step, gather) = match target.strip_suffix("[*]") {
                Some(s) => (s, true),
                None => (target.as_ref(), false),
            };
            if !is_step_name(target_step) {
                self.error_help(
                    iv.span(),
                    format!("input `{iname}` must name a step, found `{target}`"),
                    Some(
                        "write `\"step\"`, or `\"step[*]\"` to gather every instance of a step"
                            .into(),
                    ),
                );
                continue;
            }
            draft.input_spans.insert(iname.to_string(), iv.span());
            draft.def.inputs.insert(
                iname.to_string(),
                InputRef {
                    step: target_step.to_string(),
                    gather,
                },
            );
        }
    }

    fn required_inputs(&mut self, step_span: &Range<usize>, schema: &OpSchema, def: &StepDef) {
        let InputsSchema::Fixed(specs) = &schema.inputs else {
            return;
        };
        for spec in specs {
            if spec.required && !def.inputs.contains_key(spec.name) {
                self.error_help(
                    step_span.clone(),
                    format!("missing input `{}` for op `{}`", spec.name, schema.name),
                    (!spec.doc.is_empty()).then(|| format!("`{}`: {}", spec.name, spec.doc)),
                );
            }
        }
    }

    fn resources(&mut self, v: &Node<'_>, spans: &mut BTreeMap<String, Range<usize>>) -> Resources {
        let mut res = Resources::default();
        if !self.no_vars("resources", v) {
            return res;
        }
        let Some(t) = self.table(v, "`resources`") else {
            return res;
        };
        // Read apart, then combined: `gpus` and `gpu_mem_gb` mean something together.
        let mut gpus = None;
        let mut gpu_mem_gb = None;
        for (k, rv) in t.iter() {
            let key = key_str(k);
            if RESOURCE_KEYS.contains(&key) {
                spans.insert(key.to_string(), rv.span());
            }
            match key {
                "gpus" => gpus = self.gpus(rv),
                "gpu_mem_gb" => {
                    gpu_mem_gb = self.number(
                        "resources.gpu_mem_gb",
                        rv,
                        |x| x > 0.0,
                        "a positive number of GB",
                    )
                }
                "cpus" => res.cpus = self.count(&format!("resources.{key}"), rv).unwrap_or(1),
                "mem_gb" => {
                    if let Some(gb) = self.number(
                        "resources.mem_gb",
                        rv,
                        |x| x >= 0.0,
                        "a non-negative number",
                    ) {
                        res.mem_gb = gb;
                    }
                }
                _ => {
                    let help =
                        did_you_mean(key, RESOURCE_KEYS.iter().copied()).unwrap_or_else(|| {
                            format!(
                                "resources are {}",
                                backticked(RESOURCE_KEYS.iter().copied())
                            )
                        });
                    self.error_help(k.span(), format!("unknown resource `{key}`"), Some(help));
                }
            }
        }
        res.gpus = match (gpus, gpu_mem_gb) {
            (None | Some(Gpus::Whole(0)), None) => GpuRequest::None,
            (Some(Gpus::Whole(0)), Some(_)) => {
                self.error_help(
                    spans["gpu_mem_gb"].clone(),
                    "`resources.gpu_mem_gb` asks for GPU memory, but this step asks for no GPU (`gpus = 0`)".to_string(),
                    Some("leave `gpus` out, or ask for a share such as `gpus = 0.5`".to_string()),
                );
                GpuRequest::None
            }
            (Some(Gpus::Whole(count)), mem_gb) => GpuRequest::Whole { count, mem_gb },
            (Some(Gpus::Share(share)), mem_gb) => GpuRequest::Part {
                share: Some(share),
                mem_gb,
            },
            (None, Some(mem_gb)) => GpuRequest::Part {
                share: None,
                mem_gb: Some(mem_gb),
            },
        };
        res
    }

    /// `resources.gpus`: a whole count (0, 1, 2…) or a share of one GPU in (0, 1).
    fn gpus(&mut self, v: &Node<'_>) -> Option<Gpus> {
        let x = match v.get_ref() {
            DeValue::Integer(_) | DeValue::Float(_) => self.value(v).and_then(|x| x.as_f64()),
            _ => None,
        };
        let help = "a step holds whole GPUs alone (`gpus = 2`) or shares one GPU (`gpus = 0.25`: \
                    up to four such steps on a GPU at once); a share never spans two GPUs";
        match x {
            Some(x) if x > 0.0 && x < 1.0 => Some(Gpus::Share(x)),
            Some(x) if x >= 1.0 && x.fract() == 0.0 && x <= u32::MAX as f64 => {
                Some(Gpus::Whole(x as u32))
            }
            // An integer 0 is "no GPU"; a share of nothing is a mistake.
            Some(x) if x == 0.0 && matches!(v.get_ref(), DeValue::Integer(_)) => {
                Some(Gpus::Whole(0))
            }
            Some(0.0) => {
                self.error_help(
                    v.span(),
                    format!(
                        "`resources.gpus` = {}: a share of a GPU must be above 0",
                        describe(v)
                    ),
                    Some("leave `gpus` out (or write `gpus = 0`) for a step without GPU".into()),
                );
                None
            }
            _ => {
                self.error_help(
                    v.span(),
                    format!(
                        "`resources.gpus` must be a whole count (0, 1, 2…) or a share of one GPU in (0, 1), found {}",
                        describe(v)
                    ),
                    Some(help.into()),
                );
                None
            }
        }
    }

    /// A finite number (integer or float) that passes `ok`.
    fn number(
        &mut self,
        what: &str,
        v: &Node<'_>,
        ok: impl Fn(f64) -> bool,
        expected: &str,
    ) -> Option<f64> {
        let x = match v.get_ref() {
            DeValue::Integer(_) | DeValue::Float(_) => self
                .value(v)
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite() && ok(*x)),
            _ => None,
        };
        if x.is_none() {
            self.error(
                v.span(),
                format!("`{what}` must be {expected}, found {}", describe(v)),
            );
        }
        x
    }

    /// A non-negative integer that fits a `u32`.
    fn count(&mut self, what: &str, v: &Node<'_>) -> Option<u32> {
        let n = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .and_then(|n| u32::try_from(n).ok()),
            _ => None,
        };
        if n.is_none() {
            self.error(
                v.span(),
                format!(
                    "`{what}` must be a non-negative integer, found {}",
                    describe(v)
                ),
            );
        }
        n
    }

    fn retries(&mut self, v: &Node<'_>) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        if !self.no_vars("retries", v) {
            return policy;
        }
        match v.get_ref() {
            DeValue::Integer(_) => policy.count = self.count("retries", v).unwrap_or(0),
            DeValue::Table(t) => {
                let mut has_count = false;
                for (k, rv) in t.iter() {
                    match key_str(k) {
                        "count" => {
                            has_count = true;
                            policy.count = self.count("retries.count", rv).unwrap_or(0);
                        }
                        "backoff" => {
                            if let Some(d) = self.duration("retries.backoff", rv) {
                                policy.backoff = d;
                            }
                        }
                        other => {
                            let help = did_you_mean(other, RETRY_KEYS.iter().copied())
                                .unwrap_or_else(|| "`retries` has `count` and `backoff`".into());
                            self.error_help(
                                k.span(),
                                format!("unknown key `{other}` in `retries`"),
                                Some(help),
                            );
                        }
                    }
                }
                if !has_count {
                    self.error(v.span(), "`retries` has no `count`");
                }
            }
            _ => self.error_help(
                v.span(),
                format!(
                    "`retries` must be an integer or a table, found {}",
                    describe(v)
                ),
                Some("write `retries = 2` or `retries = { count = 2, backoff = \"30s\" }`".into()),
            ),
        }
        policy
    }

    /// A duration as a humantime string (`"10m"`, `"1h 30m"`) or whole seconds; positive.
    fn duration(&mut self, what: &str, v: &Node<'_>) -> Option<Duration> {
        if !self.no_vars(what.split('.').next().unwrap_or(what), v) {
            return None;
        }
        let help = Some(
            "write a duration such as `\"90s\"`, `\"10m\"` or `\"1h 30m\"`, or whole seconds"
                .to_string(),
        );
        let d = match v.get_ref() {
            DeValue::String(s) => match humantime::parse_duration(s) {
                Ok(d) => d,
                Err(e) => {
                    self.error_help(
                        v.span(),
                        format!("`{what}` is not a duration: `{s}` ({e})"),
                        help,
                    );
                    return None;
                }
            },
            DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => {
                    self.error(
                        v.span(),
                        format!("`{what}` must not be negative, found `{i}`"),
                    );
                    return None;
                }
            },
            _ => {
                self.error_help(
                    v.span(),
                    format!("`{what}` must be a duration, found {}", describe(v)),
                    help,
                );
                return None;
            }
        };
        if what == "timeout" && d.is_zero() {
            self.error(v.span(), "`timeout` must be positive");
            return None;
        }
        Some(d)
    }

    /// Inputs name existing steps, and the steps form no cycle.
    fn check_inputs(&mut self, drafts: &[Draft]) {
        let index: HashMap<&str, usize> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| (d.def.name.as_str(), i))
            .collect();
        let names: Vec<&str> = drafts.iter().map(|d| d.def.name.as_str()).collect();
        // Edges: step → (upstream, span of the input naming it).
        let mut edges: Vec<Vec<(usize, Range<usize>)>> = vec![Vec::new(); drafts.len()];
        for (i, d) in drafts.iter().enumerate() {
            for (iname, input) in &d.def.inputs {
                let span = d.input_spans[iname].clone();
                match index.get(input.step.as_str()) {
                    Some(&j) => edges[i].push((j, span)),
                    None => {
                        let help = did_you_mean(&input.step, names.iter().copied()).or_else(|| {
                            Some(format!(
                                "the steps are {}",
                                backticked(names.iter().copied())
                            ))
                        });
                        self.error_help(
                            span,
                            format!(
                                "input `{iname}` of step `{}` reads unknown step `{}`",
                                d.def.name, input.step
                            ),
                            help,
                        );
                    }
                }
            }
        }
        for (names, span) in find_cycles(&edges) {
            let path: Vec<&str> = names.iter().map(|&i| drafts[i].def.name.as_str()).collect();
            self.error_help(
                span,
                format!("cycle: {}", path.join(" → ")),
                Some(
                    "each step reads the output of the step before it; a recipe must be a DAG"
                        .into(),
                ),
            );
        }
    }

    /// An exclude that binds a var to a value it is never swept over drops nothing: a typo,
    /// or a value written with another type (`1` for `1.0`). Checked before `--set` pins the
    /// sweep, against every value of the var's axis.
    fn check_exclude_values(&mut self, sweep: &SweepDraft) {
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
    fn apply_sets(
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

    /// Keep only the sweep's rows where `set.var` has `set.value`.
    fn pin(&mut self, sweep: &mut SweepDraft, set: &SetArg) {
        let sweep = &mut sweep.sweep;
        if let Some(axis) = sweep.axes.iter_mut().find(|a| a.vars.contains(&set.var)) {
            let j = axis
                .vars
                .iter()
                .position(|v| *v == set.var)
                .expect("found above");
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

    /// Every referenced var is defined; every swept var is used; `exclude`/`include` name
    /// swept vars.
    fn check_vars(&mut self, vars: &BTreeMap<String, Value>, sweep: &SweepDraft, drafts: &[Draft]) {
        let defined: BTreeSet<&str> = vars
            .keys()
            .chain(sweep.keys.keys())
            .chain(sweep.broken.iter())
            .map(String::as_str)
            .collect();
        for d in drafts {
            for (name, span) in &d.refs {
                if !defined.contains(name.as_str()) {
                    let help = did_you_mean(name, defined.iter().copied()).or_else(|| {
                        Some("define it in `[vars]` or sweep it in `[sweep]`".to_string())
                    });
                    self.error_help(span.clone(), format!("undefined var `{name}`"), help);
                }
            }
        }
        let used: BTreeSet<&str> = drafts
            .iter()
            .flat_map(|d| d.def.vars_used.iter().map(String::as_str))
            .collect();
        for (name, span) in &sweep.keys {
            if !used.contains(name.as_str()) {
                self.error_help(
                    span.clone(),
                    format!("sweep over `{name}`, which no step uses"),
                    Some(format!(
                        "reference it as `${{{name}}}` in a step's `params` or `cmd`, or remove it"
                    )),
                );
            }
        }
        for (which, bindings) in &sweep.bindings {
            for (name, span) in bindings {
                if !sweep.keys.contains_key(name) && !sweep.broken.contains(name) {
                    let help = did_you_mean(name, sweep.keys.keys().map(String::as_str));
                    self.error_help(
                        span.clone(),
                        format!("`[[sweep.{which}]]` binds `{name}`, which is not swept"),
                        help,
                    );
                }
            }
        }
    }
}

/// The last `--set` of each var, in the order of their last occurrence.
fn sets_last_wins(sets: &[SetArg]) -> Vec<&SetArg> {
    let mut out: Vec<&SetArg> = Vec::new();
    for set in sets {
        out.retain(|s| s.var != set.var);
        out.push(set);
    }
    out
}

/// `a/./b/../c` → `a/c`; reject absolute paths and paths that leave the recipe directory.
fn normalise_code_path(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("empty code path".to_string());
    }
    if raw.starts_with('/') || raw.starts_with('\\') || Path::new(raw).is_absolute() {
        return Err(format!(
            "code path `{raw}` is absolute; code paths are relative to the recipe directory"
        ));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in raw.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("code path `{raw}` leaves the recipe directory"));
                }
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        Ok(".".to_string())
    } else {
        Ok(parts.join("/"))
    }
}

/// Every cycle found by a depth-first search over `edges` (step → upstreams), each as the
/// steps in data-flow order (first step repeated at the end) with the span of the edge that
/// closes it.
fn find_cycles(edges: &[Vec<(usize, Range<usize>)>]) -> Vec<(Vec<usize>, Range<usize>)> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; edges.len()];
    let mut cycles = Vec::new();
    for start in 0..edges.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Iterative DFS: (node, next edge to follow).
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some((up, span)) = edges[node].get(*next) {
                *next += 1;
                match marks[*up] {
                    Mark::New => {
                        marks[*up] = Mark::Open;
                        stack.push((*up, 0));
                    }
                    Mark::Open => {
                        // `node` reads `up`, which is on the stack: the stack from `up` to
                        // `node` is a chain of readers; data flows the other way.
                        let from = stack.iter().position(|(n, _)| n == up).expect("open");
                        let mut cycle: Vec<usize> = vec![*up];
                        cycle.extend(stack[from..].iter().rev().map(|(n, _)| *n));
                        cycles.push((cycle, span.clone()));
                    }
                    Mark::Done => {}
                }
            } else {
                marks[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    cycles
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cli_values_are_toml_or_strings() {
        assert_eq!(value_from_cli("3"), json!(3));
        assert_eq!(value_from_cli("0.5"), json!(0.5));
        assert_eq!(value_from_cli("true"), json!(true));
        assert_eq!(value_from_cli("\"x y\""), json!("x y"));
        assert_eq!(value_from_cli("[1, 2]"), json!([1, 2]));
        assert_eq!(value_from_cli("pixel-diffusion"), json!("pixel-diffusion"));
        assert_eq!(value_from_cli("1.2.3"), json!("1.2.3"));
        assert_eq!(value_from_cli("nan"), json!("nan"));
        assert_eq!(value_from_cli(""), json!(""));
    }

    #[test]
    fn code_paths_normalise() {
        assert_eq!(normalise_code_path("a/./b/../c").unwrap(), "a/c");
        assert_eq!(normalise_code_path("lib/").unwrap(), "lib");
        assert_eq!(normalise_code_path("./").unwrap(), ".");
        assert!(normalise_code_path("../x").unwrap_err().contains("leaves"));
        assert!(
            normalise_code_path("a/../../x")
                .unwrap_err()
                .contains("leaves")
        );
        assert!(
            normalise_code_path("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
    }

    #[test]
    fn cycles_in_data_flow_order() {
        // 0 reads 1, 1 reads 2, 2 reads 0.
        let edges = vec![vec![(1, 0..1)], vec![(2, 1..2)], vec![(0, 2..3)]];
        let cycles = find_cycles(&edges);
        assert_eq!(cycles, vec![(vec![0, 2, 1, 0], 2..3)]);
        // A self-loop.
        assert_eq!(find_cycles(&[vec![(0, 5..6)]]), vec![(vec![0, 0], 5..6)]);
        // A diamond has none.
        let edges = vec![
            vec![],
            vec![(0, 0..1)],
            vec![(0, 0..1)],
            vec![(1, 0..1), (2, 0..1)],
        ];
        assert!(find_cycles(&edges).is_empty());
    }
}
