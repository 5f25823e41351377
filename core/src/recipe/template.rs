use crate::value::Value;

/// A `${var}` reference inside a string, with its byte range in that string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarRef {
    pub name: String,
    pub range: std::ops::Range<usize>,
}

/// The vars a template string references, or why it is malformed.
pub fn template_vars(_s: &str) -> Result<Vec<VarRef>, String> {
    todo!()
}

/// Substitute vars into a template value.
pub fn render_template(_v: &Value, _lookup: &dyn Fn(&str) -> Option<Value>) -> Value {
    todo!()
}
