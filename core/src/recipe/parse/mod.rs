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
//!
//! This module reads the document and its `[recipe]` and `[vars]`, and checks vars last; the
//! rest is split by concern, each an `impl Parser` of its own: [`sweep`] (`[sweep]` and
//! `--set`), [`sampled`] (`[sweep.random]`, `[sweep.sobol]`), [`step`] (each step on its own), [`resources`] (resources, retries, timeout) and
//! [`graph`] (across steps).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::errors::{backticked, did_you_mean, line_col};
use super::template::{has_refs, is_var_name, template_vars};
use super::*;
use crate::ops::{InputsSchema, OpCatalog, OpKind, OpSchema, ParamsSchema};

mod graph;
mod resources;
mod sampled;
mod search;
mod step;
mod sweep;

type Node<'i> = Spanned<DeValue<'i>>;
type Key<'i> = Spanned<toml::de::DeString<'i>>;
/// Names with the span each was found at.
type Spans = Vec<(String, Range<usize>)>;

const TOP_KEYS: &[&str] = &["recipe", "vars", "sweep", "search", "steps"];
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
            search: parts.search,
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
    search: Option<Search>,
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
    /// The span of the key of `[sweep.random]` or `[sweep.sobol]` (one a recipe).
    sampled_key: Option<Range<usize>>,
    /// Which of `sweep.axes` the sampled table made: `--set` overrides its rows, not picks.
    sampled_axis: Option<usize>,
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

    /// The entries of `t` whose keys are among `keys`; every other key is reported as unknown
    /// in `place` (`step \`x\``, `` `[search]` ``), with the closest known key or the list.
    fn known_keys<'t, 'i>(
        &mut self,
        t: &'t DeTable<'i>,
        keys: &[&str],
        place: &str,
        has: &str,
    ) -> HashMap<&'t str, (&'t Key<'i>, &'t Node<'i>)> {
        let mut fields = HashMap::new();
        for (k, v) in t.iter() {
            let key = key_str(k);
            if keys.contains(&key) {
                fields.insert(key, (k, v));
            } else {
                let help = did_you_mean(key, keys.iter().copied()).unwrap_or_else(|| {
                    format!("{has} the keys {}", backticked(keys.iter().copied()))
                });
                self.error_help(
                    k.span(),
                    format!("unknown key `{key}` in {place}"),
                    Some(help),
                );
            }
        }
        fields
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
        let mut search = None;
        let mut steps = None;
        for (k, v) in root.iter() {
            match key_str(k) {
                "recipe" => recipe = Some(v),
                "vars" => vars = Some(v),
                "sweep" => sweep = Some(v),
                "search" => search = Some(v),
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
                            "a recipe has the tables `[recipe]`, `[vars]`, `[sweep]`, `[search]` and `[steps.NAME]`"
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
        let mut drafts = self.steps_table(steps);
        let search = search.and_then(|s| self.search_table(s, &mut sweep, &mut drafts));
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
            search,
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

#[cfg(test)]
mod tests {
    use super::graph::find_cycles;
    use super::step::normalise_code_path;
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
