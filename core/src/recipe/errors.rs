//! Recipe diagnostics (placeholder; implemented by the recipe work).
use std::ops::Range;

/// One problem in a recipe, with the span it points at.
#[derive(Debug, Clone, thiserror::Error, miette::Diagnostic)]
#[error("{message}")]
pub struct RecipeDiagnostic {
    pub message: String,
    #[label("{label}")]
    pub span: Option<miette::SourceSpan>,
    pub label: String,
    #[help]
    pub help: Option<String>,
}

/// Every problem found in one recipe file.
#[derive(Debug, Clone, thiserror::Error, miette::Diagnostic)]
#[error("recipe `{path}` has {} error(s)", errors.len())]
pub struct RecipeErrors {
    pub path: String,
    #[source_code]
    pub source_code: miette::NamedSource<String>,
    #[related]
    pub errors: Vec<RecipeDiagnostic>,
}

#[allow(dead_code)]
pub(crate) fn span(r: Range<usize>) -> miette::SourceSpan {
    (r.start, r.end - r.start).into()
}

impl RecipeErrors {
    pub fn render_plain(&self) -> String {
        self.errors.iter().map(|e| format!("{}: error: {}\n", self.path, e.message)).collect()
    }
}
