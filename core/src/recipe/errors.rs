//! Recipe diagnostics: every problem of one file, each with the span of TOML it points at.
//!
//! [`RecipeErrors`] is a miette [`Diagnostic`](miette::Diagnostic) whose related diagnostics
//! share the file as source code, so the graphical handler draws each one as a labelled
//! snippet under a `path:line:col` header. [`RecipeErrors::render_plain`] and
//! [`RecipeErrors::to_json`] give the same errors for logs, scripts and tests.

use std::fmt::Write as _;
use std::ops::Range;

use super::RecipeSource;

/// One problem in a recipe, with the span it points at.
///
/// Messages are lowercase, with the user's values in backticks; `help` carries a hint such as
/// ``did you mean `params`?``. A diagnostic without a span (a bad `--set`) is about the recipe
/// as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RecipeDiagnostic {
    pub message: String,
    pub span: Option<miette::SourceSpan>,
    /// Short text drawn under the span; empty draws the underline alone.
    pub label: String,
    pub help: Option<String>,
}

impl miette::Diagnostic for RecipeDiagnostic {
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        let span = self.span?;
        let text = (!self.label.is_empty()).then(|| self.label.clone());
        Some(Box::new(std::iter::once(
            miette::LabeledSpan::new_with_span(text, span),
        )))
    }
}

impl RecipeDiagnostic {
    /// A diagnostic pointing at `range` (byte offsets into the recipe text).
    pub fn at(range: Range<usize>, message: impl Into<String>) -> Self {
        RecipeDiagnostic {
            message: message.into(),
            span: Some(span(range)),
            label: String::new(),
            help: None,
        }
    }

    /// A diagnostic about the recipe as a whole (no place in the file to point at).
    pub fn whole(message: impl Into<String>) -> Self {
        RecipeDiagnostic {
            message: message.into(),
            span: None,
            label: String::new(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// The span as a byte range, if the diagnostic has one.
    pub fn range(&self) -> Option<Range<usize>> {
        self.span.map(|s| s.offset()..s.offset() + s.len())
    }
}

/// At most this many errors of one file are shown, the rest counted: a generated recipe with
/// the same mistake in every one of its 100,000 steps gets a readable answer, at once.
pub const MAX_SHOWN: usize = 100;

/// Every problem found in one recipe file.
#[derive(Debug, Clone, thiserror::Error, miette::Diagnostic)]
#[error("recipe `{}` has {}", source_code.name(), plural(*total))]
pub struct RecipeErrors {
    /// The recipe's text, named by its path as the user gave it.
    #[source_code]
    pub source_code: miette::NamedSource<String>,
    /// The first [`MAX_SHOWN`] errors, then a note counting those left out.
    #[related]
    pub errors: Vec<RecipeDiagnostic>,
    /// How many errors were found, shown or not.
    pub total: usize,
}

fn plural(n: usize) -> String {
    if n == 1 {
        "1 error".to_string()
    } else {
        format!("{n} errors")
    }
}

/// Where a diagnostic points, in the terms people read: 1-based line and column (in chars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineCol {
    pub line: usize,
    pub col: usize,
}

impl RecipeErrors {
    /// Errors of the file `source`, in the order given.
    pub fn new(source: &RecipeSource, mut errors: Vec<RecipeDiagnostic>) -> Self {
        let path = source.path.display().to_string();
        let total = errors.len();
        if total > MAX_SHOWN {
            errors.truncate(MAX_SHOWN);
            errors.push(
                RecipeDiagnostic::whole(format!("{} more errors not shown", total - MAX_SHOWN))
                    .with_help(format!(
                        "only the first {MAX_SHOWN} are shown; fix them and run again"
                    )),
            );
        }
        RecipeErrors {
            source_code: miette::NamedSource::new(path, source.text.clone()),
            errors,
            total,
        }
    }

    /// The recipe's path as the user gave it.
    pub fn path(&self) -> &str {
        self.source_code.name()
    }

    fn text(&self) -> &str {
        self.source_code.inner()
    }

    /// Line and column of a diagnostic's span start, `None` for one without a span.
    pub fn line_col(&self, diag: &RecipeDiagnostic) -> Option<LineCol> {
        diag.range().map(|r| line_col(self.text(), r.start))
    }

    /// [`RecipeErrors::line_col`] of every error, in one pass over the text (one scan per
    /// error would be quadratic in a large file with many errors).
    pub fn line_cols(&self) -> Vec<Option<LineCol>> {
        let text = self.text();
        let mut order: Vec<(usize, usize)> = self
            .errors
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.range().map(|r| (floor_char_boundary(text, r.start), i)))
            .collect();
        order.sort_unstable();
        let mut out = vec![None; self.errors.len()];
        let (mut at, mut line, mut col) = (0, 1, 1);
        for (offset, i) in order {
            for c in text[at..offset].chars() {
                if c == '\n' {
                    line += 1;
                    col = 1;
                } else {
                    col += 1;
                }
            }
            at = offset;
            out[i] = Some(LineCol { line, col });
        }
        out
    }

    /// One error per line, as compilers print them:
    /// `path:line:col: error: message`, then `  help: hint` where there is one. An error
    /// without a span prints as `path: error: message`.
    pub fn render_plain(&self) -> String {
        let mut out = String::new();
        for (diag, lc) in self.errors.iter().zip(self.line_cols()) {
            match lc {
                Some(LineCol { line, col }) => {
                    let _ = write!(out, "{}:{line}:{col}: ", self.path());
                }
                None => {
                    let _ = write!(out, "{}: ", self.path());
                }
            }
            let _ = writeln!(out, "error: {}", diag.message);
            if let Some(help) = &diag.help {
                let _ = writeln!(out, "  help: {help}");
            }
        }
        out
    }

    /// `[{"message", "line", "col", "help"}]`, with `null` where there is no span or hint.
    pub fn to_json(&self) -> serde_json::Value {
        let items = self
            .errors
            .iter()
            .zip(self.line_cols())
            .map(|(diag, lc)| {
                serde_json::json!({
                    "message": diag.message,
                    "line": lc.map(|l| l.line),
                    "col": lc.map(|l| l.col),
                    "help": diag.help,
                })
            })
            .collect();
        serde_json::Value::Array(items)
    }
}

/// 1-based line and char column of byte `offset` in `text` (clamped to the text).
pub(crate) fn line_col(text: &str, offset: usize) -> LineCol {
    let before = &text[..floor_char_boundary(text, offset)];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    LineCol {
        line: before.matches('\n').count() + 1,
        col: before[line_start..].chars().count() + 1,
    }
}

/// The char boundary at or before `offset`, clamped to the text.
fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

pub(crate) fn span(r: Range<usize>) -> miette::SourceSpan {
    (r.start, r.end.saturating_sub(r.start)).into()
}

/// The candidate closest to `name` by edit distance, when it is close enough to be a likely
/// typo (an adjacent transposition counts as one edit).
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let len = name.chars().count();
    let limit = (len / 3).max(1);
    let candidates: Vec<&str> = candidates.into_iter().filter(|c| *c != name).collect();
    let by_distance = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    // `mem` for `mem_gb`: a truncated name is a typo too.
    by_distance.or_else(|| {
        candidates
            .iter()
            .find(|c| len >= 2 && c.starts_with(name))
            .copied()
    })
}

/// Drop repeated diagnostics, then order them: those without a span (about the invocation)
/// first, then by position in the file.
pub(crate) fn tidy(mut errors: Vec<RecipeDiagnostic>) -> Vec<RecipeDiagnostic> {
    let mut seen = std::collections::HashSet::new();
    errors.retain(|d| seen.insert((d.range().map(|r| (r.start, r.end)), d.message.clone())));
    errors.sort_by_key(|d| d.range().map(|r| r.start));
    errors
}

/// ``did you mean `x`?`` when a candidate is close to `name`.
pub(crate) fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(name, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// `` `a`, `b`, `c` ``
pub(crate) fn backticked<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_chars_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), LineCol { line: 1, col: 1 });
        assert_eq!(line_col(text, 6), LineCol { line: 2, col: 1 });
        // `=` after the two-byte `é`
        assert_eq!(line_col(text, 10), LineCol { line: 2, col: 4 });
        assert_eq!(line_col(text, 999), LineCol { line: 3, col: 1 });
    }

    #[test]
    fn line_cols_in_one_pass_agree_with_line_col() {
        let text = "a = 1\nbé = 2\n\nc = [1, 2]\n";
        let source = RecipeSource {
            path: "r.toml".into(),
            dir: "/".into(),
            text: text.into(),
        };
        let offsets = [21, 0, 10, 6, 999, 9, 10];
        let mut errors: Vec<RecipeDiagnostic> = offsets
            .iter()
            .map(|&o| RecipeDiagnostic::at(o..o + 1, "e"))
            .collect();
        errors.push(RecipeDiagnostic::whole("w"));
        let e = RecipeErrors::new(&source, errors);
        let expected: Vec<Option<LineCol>> = offsets
            .iter()
            .map(|&o| Some(line_col(text, o)))
            .chain([None])
            .collect();
        assert_eq!(e.line_cols(), expected);
    }

    #[test]
    fn errors_past_the_limit_are_counted() {
        let source = RecipeSource {
            path: "r.toml".into(),
            dir: "/".into(),
            text: "x".into(),
        };
        let errors = (0..MAX_SHOWN + 5)
            .map(|i| RecipeDiagnostic::whole(format!("e{i}")))
            .collect();
        let e = RecipeErrors::new(&source, errors);
        assert_eq!(e.total, MAX_SHOWN + 5);
        assert_eq!(e.errors.len(), MAX_SHOWN + 1);
        assert_eq!(e.errors[MAX_SHOWN].message, "5 more errors not shown");
        assert_eq!(
            e.to_string(),
            format!("recipe `r.toml` has {} errors", MAX_SHOWN + 5)
        );
    }

    #[test]
    fn closest_finds_typos_only() {
        let keys = ["op", "params", "inputs", "resources"];
        assert_eq!(closest("parmas", keys), Some("params"));
        assert_eq!(closest("input", keys), Some("inputs"));
        assert_eq!(closest("resorces", keys), Some("resources"));
        assert_eq!(closest("zzz", keys), None);
        assert_eq!(closest("lr", ["lr_", "arch"]), Some("lr_"));
        assert_eq!(closest("arc", ["lr", "size"]), None);
        assert_eq!(closest("mem", ["gpus", "mem_gb"]), Some("mem_gb"));
    }
}
