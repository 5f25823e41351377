//! Canonical encoding of parameter values, the input to every content key.
//!
//! Two recipes that mean the same thing must hash the same: table keys are sorted whatever
//! order the TOML wrote them in, and floats are written in their shortest round-trip form
//! (`0.10` and `0.1` are one value). Integers and floats stay distinct types: `1` and `1.0`
//! reach a script as different text, so they are different params.

use serde_json::Value;

/// Append the canonical encoding of `v` to `out`. Compact JSON with sorted object keys.
pub fn encode_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => out.extend_from_slice(canonical_number(n).as_bytes()),
        Value::String(s) => encode_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encode_into(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                encode_str(k, out);
                out.push(b':');
                encode_into(&map[k], out);
            }
            out.push(b'}');
        }
    }
}

/// The canonical encoding of `v` as bytes.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(v, &mut out);
    out
}

/// The canonical encoding of `v` as a string.
pub fn to_string(v: &Value) -> String {
    String::from_utf8(encode(v)).expect("canonical JSON is UTF-8")
}

fn encode_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's string escaping is deterministic; reuse it rather than rewrite it.
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

fn canonical_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().expect("a JSON number is i64, u64 or f64");
    // Keep a float recognisably a float (`1.0`, not `1`) so that type survives the encoding.
    let s = format!("{f:?}");
    if s.contains(['.', 'e', 'E']) {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn object_keys_are_sorted() {
        let a = json!({"b": 1, "a": [1, 2.5, "x"]});
        assert_eq!(to_string(&a), r#"{"a":[1,2.5,"x"],"b":1}"#);
    }

    #[test]
    fn floats_are_shortest_and_stay_floats() {
        assert_eq!(to_string(&json!(0.10)), "0.1");
        assert_eq!(to_string(&json!(1.0)), "1.0");
        assert_eq!(to_string(&json!(1)), "1");
        assert_eq!(to_string(&json!(1e-7)), "1e-7");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(to_string(&json!("a\"b\n")), r#""a\"b\n""#);
    }
}
