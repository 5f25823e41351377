//! Parameter values. A recipe's values are TOML; needle carries them as JSON values, which keep
//! the distinction between integers and floats and serialise to what scripts read
//! (`NEEDLE_PARAMS`). TOML datetimes become strings.

pub use serde_json::Value;

/// The TOML-flavoured name of a value's type, as used in error messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "table",
    }
}

/// How a value reaches a command line or an environment variable: strings as they are,
/// numbers and booleans as TOML writes them, arrays and tables as JSON.
pub fn render_plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(_) | Value::Object(_) => crate::canonical::to_string(v),
        Value::Null => String::new(),
        other => crate::canonical::to_string(other),
    }
}

/// A short, single-line rendering for tables and labels (`arch=pixel`, `lr=0.001`).
pub fn render_short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => crate::canonical::to_string(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_rendering() {
        assert_eq!(render_plain(&json!("a b")), "a b");
        assert_eq!(render_plain(&json!(3)), "3");
        assert_eq!(render_plain(&json!(0.5)), "0.5");
        assert_eq!(render_plain(&json!(true)), "true");
        assert_eq!(render_plain(&json!([1, "x"])), r#"[1,"x"]"#);
    }
}
