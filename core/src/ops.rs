//! What core needs to know of an op to validate a recipe and key its steps: its name, version,
//! params with types and defaults, and inputs. The ops themselves live in `needle-ops`, which
//! hands core a catalog of these schemas.

use crate::value::{Value, type_name};

/// How a step of this op is executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// The user's own command (`cmd`), with `code` files hashed into the key.
    Exec,
    /// A built-in op run by `needle-worker`.
    Builtin,
}

#[derive(Debug, Clone)]
pub struct OpSchema {
    pub name: &'static str,
    /// Bumped whenever the op's output for the same params and inputs may change: it is part
    /// of every key, so a bump invalidates exactly this op's cached steps and their dependents.
    pub version: u32,
    pub summary: &'static str,
    pub kind: OpKind,
    pub params: ParamsSchema,
    pub inputs: InputsSchema,
}

#[derive(Debug, Clone)]
pub enum ParamsSchema {
    /// Any names, any values (the `exec` op: they reach the command as environment).
    Free,
    Fixed(Vec<ParamSpec>),
}

#[derive(Debug, Clone)]
pub enum InputsSchema {
    /// Any input names (the `exec` op).
    Free,
    Fixed(Vec<InputSpec>),
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `None`: the recipe must give it.
    pub default: Option<Value>,
    pub doc: &'static str,
}

#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: &'static str,
    pub required: bool,
    pub doc: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ParamType {
    Int,
    /// Accepts an int too and stores it as a float, so `lr = 1` and `lr = 1.0` are one key.
    Float,
    Bool,
    String,
    /// A file or directory, as a string: relative to the recipe's directory, or absolute.
    /// The planner folds a fingerprint of what is there into the step's key (see
    /// [`crate::plan::fingerprint_path`]), so changing the data re-runs the step.
    Path,
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
    List(Box<ParamType>),
    /// Any TOML value.
    Any,
}

impl std::fmt::Display for ParamType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamType::Int => f.write_str("int"),
            ParamType::Float => f.write_str("float"),
            ParamType::Bool => f.write_str("bool"),
            ParamType::String => f.write_str("string"),
            ParamType::Path => f.write_str("path"),
            ParamType::Choice(options) => {
                let quoted: Vec<String> = options.iter().map(|o| format!("\"{o}\"")).collect();
                write!(f, "one of {}", quoted.join(", "))
            }
            ParamType::List(inner) => write!(f, "list of {inner}"),
            ParamType::Any => f.write_str("any value"),
        }
    }
}

/// Why a value does not fit a [`ParamType`]; rendered into a recipe diagnostic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMismatch {
    pub expected: String,
    pub found: String,
}

impl ParamType {
    /// Check `v` against this type, returning the value as it enters the key (ints widened to
    /// floats where a float is expected).
    pub fn check(&self, v: &Value) -> Result<Value, TypeMismatch> {
        let mismatch = || TypeMismatch {
            expected: self.to_string(),
            found: describe(v),
        };
        match (self, v) {
            (ParamType::Any, _) => Ok(v.clone()),
            (ParamType::Int, Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(v.clone()),
            (ParamType::Float, Value::Number(n)) => {
                let f = n.as_f64().ok_or_else(mismatch)?;
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(mismatch)
            }
            (ParamType::Bool, Value::Bool(_)) => Ok(v.clone()),
            (ParamType::String | ParamType::Path, Value::String(_)) => Ok(v.clone()),
            (ParamType::Choice(options), Value::String(s)) if options.contains(&s.as_str()) => {
                Ok(v.clone())
            }
            (ParamType::List(inner), Value::Array(items)) => items
                .iter()
                .map(|item| inner.check(item))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
                .map_err(|_| mismatch()),
            _ => Err(mismatch()),
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(_) | Value::Object(_) => type_name(v).to_string(),
        other => format!(
            "{} {}",
            type_name(other),
            crate::canonical::to_string(other)
        ),
    }
}

impl OpSchema {
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        match &self.params {
            ParamsSchema::Free => None,
            ParamsSchema::Fixed(specs) => specs.iter().find(|p| p.name == name),
        }
    }

    /// Names of the params typed [`ParamType::Path`], in schema order.
    pub fn path_params(&self) -> Vec<&'static str> {
        match &self.params {
            ParamsSchema::Free => Vec::new(),
            ParamsSchema::Fixed(specs) => specs
                .iter()
                .filter(|p| p.ty == ParamType::Path)
                .map(|p| p.name)
                .collect(),
        }
    }

    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        match &self.inputs {
            InputsSchema::Free => None,
            InputsSchema::Fixed(specs) => specs.iter().find(|p| p.name == name),
        }
    }
}

/// The set of ops a recipe may use. Implemented by `needle-ops`; tests implement their own.
pub trait OpCatalog {
    fn get(&self, name: &str) -> Option<&OpSchema>;
    fn all(&self) -> Vec<&OpSchema>;
}

impl OpCatalog for Vec<OpSchema> {
    fn get(&self, name: &str) -> Option<&OpSchema> {
        self.iter().find(|op| op.name == name)
    }
    fn all(&self) -> Vec<&OpSchema> {
        self.iter().collect()
    }
}

/// The schema of `exec`, the op every catalog has: core's rules for `cmd` and `code` depend on it.
/// How a param or input name appears in the environment of a step's command
/// (`NEEDLE_PARAM_<NAME>`, `NEEDLE_IN_<NAME>`): ASCII letters and digits upper-cased, anything
/// else `_`, so any name makes a valid variable name.
pub fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

pub fn exec_schema() -> OpSchema {
    OpSchema {
        name: "exec",
        version: 1,
        summary: "run any command (argv, no shell); whatever it writes to $NEEDLE_OUT is the output",
        kind: OpKind::Exec,
        params: ParamsSchema::Free,
        inputs: InputsSchema::Free,
    }
}

/// The op of the step a `[search]` table adds (named [`SEARCH_STEP`]): at each rung it reads
/// the metric of every live arm and decides which go on. Run by `needle-worker`; its body is
/// `needle_ops::search`.
pub const SEARCH_OP: &str = "search-rung";

/// The name of the step a `[search]` table adds to its recipe.
pub const SEARCH_STEP: &str = "search";

/// The input of the continued step (`[search] continue`) holding the same arm's output at
/// the previous rung.
pub const CONTINUE_INPUT: &str = "continue_from";

pub fn search_schema() -> OpSchema {
    let p = |name, ty, doc| ParamSpec {
        name,
        ty,
        default: None,
        doc,
    };
    OpSchema {
        name: SEARCH_OP,
        version: 1,
        summary: "successive halving: rank a rung's arms by a metric, keep the best share (added by `[search]`)",
        kind: OpKind::Builtin,
        params: ParamsSchema::Fixed(vec![
            p(
                "budget",
                ParamType::Any,
                "this rung's budget (the value of the budget var)",
            ),
            p(
                "rungs",
                ParamType::List(Box::new(ParamType::Any)),
                "every rung's budget, in order",
            ),
            p(
                "metric",
                ParamType::String,
                "the field of each arm's `metrics.json` ranked (dots reach into objects)",
            ),
            p(
                "direction",
                ParamType::Choice(&["min", "max"]),
                "whether lower or higher is better",
            ),
            p(
                "keep",
                ParamType::Float,
                "the share of the arms kept at each rung (at least one)",
            ),
        ]),
        inputs: InputsSchema::Fixed(vec![InputSpec {
            name: "metrics",
            required: true,
            doc: "the metric step's outputs at this rung, one per live arm",
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn float_accepts_int_and_widens() {
        assert_eq!(ParamType::Float.check(&json!(1)).unwrap(), json!(1.0));
    }

    #[test]
    fn choice_rejects_unknown() {
        let t = ParamType::Choice(&["a", "b"]);
        let err = t.check(&json!("c")).unwrap_err();
        assert_eq!(err.expected, "one of \"a\", \"b\"");
        assert_eq!(err.found, "string \"c\"");
    }

    #[test]
    fn path_is_a_string() {
        assert_eq!(
            ParamType::Path.check(&json!("data/x")).unwrap(),
            json!("data/x")
        );
        assert!(ParamType::Path.check(&json!(3)).is_err());
        assert_eq!(ParamType::Path.to_string(), "path");
    }

    #[test]
    fn int_rejects_float() {
        assert!(ParamType::Int.check(&json!(1.5)).is_err());
    }
}
