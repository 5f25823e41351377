//! `${var}` templates in param and `cmd` strings.
//!
//! - `"${name}"`, the whole string, is replaced by the var's value with its TOML type: an int
//!   stays an int, an array an array.
//! - Anywhere else in a string, `${name}` is replaced by the value's plain rendering
//!   ([`render_plain`]): `"--lr=${lr}"` becomes `"--lr=0.001"`.
//! - `$${` is a literal `${`.
//!
//! Names are `[A-Za-z_][A-Za-z0-9_-]*`. Substitution is one pass: a var's value is never
//! itself read as a template, so values in `[vars]`, `[sweep]` and `--set` are taken as they
//! are written. Table keys are never templates.

use std::ops::Range;

use crate::value::{Value, render_plain};

/// A `${var}` reference inside a string, with its byte range in that string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarRef {
    pub name: String,
    /// The range of the whole `${name}`.
    pub range: Range<usize>,
}

/// Whether `name` may name a var (and so appear in a template).
pub fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A piece of a parsed template string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

/// Why a template string is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TemplateError {
    pub message: String,
    pub help: Option<&'static str>,
}

/// Split `s` into literal text and var references, or say why it is malformed.
fn pieces(s: &str) -> Result<(Vec<Piece<'_>>, Vec<VarRef>), TemplateError> {
    let mut pieces = Vec::new();
    let mut refs = Vec::new();
    let bytes = s.as_bytes();
    let mut text_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"$${") {
            // `$${` is a literal `${`: emit the text up to and including the first `$`, and
            // skip the second.
            pieces.push(Piece::Text(&s[text_start..i + 1]));
            text_start = i + 2;
            i += 3;
        } else if bytes[i..].starts_with(b"${") {
            let Some(close) = s[i + 2..].find('}') else {
                return Err(TemplateError {
                    message: format!("unclosed `${{` in `{s}`"),
                    help: Some("close it with `}`, or write `$${` for a literal `${`"),
                });
            };
            let name = &s[i + 2..i + 2 + close];
            if name.is_empty() {
                return Err(TemplateError {
                    message: format!("empty `${{}}` in `{s}`"),
                    help: Some("name a var inside it, or write `$${` for a literal `${`"),
                });
            }
            if !is_var_name(name) {
                return Err(TemplateError {
                    message: format!("invalid var name `{name}` in `{s}`"),
                    help: Some(
                        "var names are ASCII letters, digits, `_` and `-`, not starting with a digit",
                    ),
                });
            }
            if text_start < i {
                pieces.push(Piece::Text(&s[text_start..i]));
            }
            let end = i + 2 + close + 1;
            pieces.push(Piece::Var(name));
            refs.push(VarRef {
                name: name.to_string(),
                range: i..end,
            });
            i = end;
            text_start = end;
        } else {
            i += 1;
        }
    }
    if text_start < s.len() {
        pieces.push(Piece::Text(&s[text_start..]));
    }
    Ok((pieces, refs))
}

/// The vars a template string references, in order, or why it is malformed.
pub fn template_vars(s: &str) -> Result<Vec<VarRef>, String> {
    check(s).map_err(|e| e.message)
}

/// [`template_vars`], with a hint on how to fix a malformed string.
pub(crate) fn check(s: &str) -> Result<Vec<VarRef>, TemplateError> {
    pieces(s).map(|(_, refs)| refs)
}

/// Substitute vars into one template string. A string that is exactly one `${name}` yields
/// the value itself; anything else yields a string.
///
/// Templates are validated when the recipe is parsed; a malformed string, or a reference
/// `lookup` does not know, is left as it was written.
pub fn render_str(s: &str, lookup: &dyn Fn(&str) -> Option<Value>) -> Value {
    let Ok((pieces, _)) = pieces(s) else {
        return Value::String(s.to_string());
    };
    if let [Piece::Var(name)] = pieces.as_slice()
        && let Some(v) = lookup(name)
    {
        return v;
    }
    let mut out = String::with_capacity(s.len());
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Var(name) => match lookup(name) {
                Some(v) => out.push_str(&render_plain(&v)),
                None => {
                    out.push_str("${");
                    out.push_str(name);
                    out.push('}');
                }
            },
        }
    }
    Value::String(out)
}

/// Substitute vars into a template value: every string inside it, recursively through arrays
/// and tables, is rendered with [`render_str`]. Table keys are not templates.
pub fn render_template(v: &Value, lookup: &dyn Fn(&str) -> Option<Value>) -> Value {
    match v {
        Value::String(s) => render_str(s, lookup),
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| render_template(i, lookup)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), render_template(v, lookup)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The names of the vars a template value references, in order, repeats included.
pub(crate) fn value_vars(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            if let Ok(refs) = template_vars(s) {
                out.extend(refs.into_iter().map(|r| r.name));
            }
        }
        Value::Array(items) => items.iter().for_each(|i| value_vars(i, out)),
        Value::Object(map) => map.values().for_each(|i| value_vars(i, out)),
        _ => {}
    }
}

/// Whether a value holds any var reference (so its type is known only after substitution).
pub(crate) fn has_refs(v: &Value) -> bool {
    match v {
        Value::String(s) => template_vars(s).map(|r| !r.is_empty()).unwrap_or(true),
        Value::Array(items) => items.iter().any(has_refs),
        Value::Object(map) => map.values().any(has_refs),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lookup(name: &str) -> Option<Value> {
        match name {
            "n" => Some(json!(3)),
            "lr" => Some(json!(0.001)),
            "arch" => Some(json!("pixel")),
            "sizes" => Some(json!([1, 2])),
            _ => None,
        }
    }

    #[test]
    fn finds_refs_with_ranges() {
        let refs = template_vars("--n=${n} ${arch}").unwrap();
        assert_eq!(
            refs,
            vec![
                VarRef {
                    name: "n".into(),
                    range: 4..8
                },
                VarRef {
                    name: "arch".into(),
                    range: 9..16
                },
            ]
        );
        assert!(template_vars("plain $ text {}").unwrap().is_empty());
        assert!(template_vars("$${n}").unwrap().is_empty());
    }

    #[test]
    fn rejects_malformed() {
        assert!(template_vars("${n").unwrap_err().contains("unclosed"));
        assert!(template_vars("${}").unwrap_err().contains("empty"));
        assert!(
            template_vars("${1x}")
                .unwrap_err()
                .contains("invalid var name")
        );
        assert!(
            template_vars("${a b}")
                .unwrap_err()
                .contains("invalid var name")
        );
    }

    #[test]
    fn whole_string_keeps_type() {
        assert_eq!(render_str("${n}", &lookup), json!(3));
        assert_eq!(render_str("${sizes}", &lookup), json!([1, 2]));
        assert_eq!(render_str("${lr}", &lookup), json!(0.001));
    }

    #[test]
    fn interpolation_renders_plain() {
        assert_eq!(
            render_str("--n=${n} --lr ${lr} ${arch}/${sizes}", &lookup),
            json!("--n=3 --lr 0.001 pixel/[1,2]")
        );
    }

    #[test]
    fn dollar_dollar_escapes() {
        assert_eq!(render_str("$${n}", &lookup), json!("${n}"));
        assert_eq!(render_str("a$${n}${n}", &lookup), json!("a${n}3"));
        assert_eq!(render_str("cost $5", &lookup), json!("cost $5"));
        assert_eq!(render_str("$$${n}", &lookup), json!("$${n}"));
    }

    #[test]
    fn recurses_into_arrays_and_tables() {
        let v = json!({"a": ["${n}", "x${n}"], "b": {"c": "${arch}"}, "d": 1});
        assert_eq!(
            render_template(&v, &lookup),
            json!({"a": [3, "x3"], "b": {"c": "pixel"}, "d": 1})
        );
        assert!(has_refs(&v));
        assert!(!has_refs(&json!({"a": ["$${n}"]})));
    }

    #[test]
    fn var_names() {
        assert!(is_var_name("qt_images"));
        assert!(is_var_name("_x-1"));
        assert!(!is_var_name("1x"));
        assert!(!is_var_name(""));
        assert!(!is_var_name("a.b"));
    }
}
