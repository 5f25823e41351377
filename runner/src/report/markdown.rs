//! The little Markdown the ops write in `summary.md` — paragraphs, `- ` lists, pipe tables,
//! `code` spans — as HTML. Anything else passes through as escaped text.

use super::svg::esc;

/// Inline: escaped text with `code` spans.
fn inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in esc(s).split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str("<code>");
            out.push_str(part);
            out.push_str("</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn cells(line: &str) -> Vec<&str> {
    line.trim()
        .trim_start_matches('|')
        .trim_end_matches('|')
        .split('|')
        .map(str::trim)
        .collect()
}

fn is_separator(line: &str) -> bool {
    let t = line.trim();
    t.starts_with('|') && t.chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
}

pub fn to_html(md: &str) -> String {
    let lines: Vec<&str> = md.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim();
        if t.is_empty() {
            i += 1;
        } else if t.starts_with('|') {
            out.push_str("<table>");
            let mut first = true;
            while i < lines.len() && lines[i].trim().starts_with('|') {
                if !is_separator(lines[i]) {
                    let tag = if first { "th" } else { "td" };
                    out.push_str("<tr>");
                    for c in cells(lines[i]) {
                        out.push_str(&format!("<{tag}>{}</{tag}>", inline(c)));
                    }
                    out.push_str("</tr>");
                    first = false;
                }
                i += 1;
            }
            out.push_str("</table>");
        } else if let Some(item) = t.strip_prefix("- ") {
            out.push_str("<ul>");
            out.push_str(&format!("<li>{}</li>", inline(item)));
            i += 1;
            while i < lines.len() {
                match lines[i].trim().strip_prefix("- ") {
                    Some(item) => out.push_str(&format!("<li>{}</li>", inline(item))),
                    None => break,
                }
                i += 1;
            }
            out.push_str("</ul>");
        } else {
            let mut para = vec![t];
            i += 1;
            while i < lines.len() {
                let n = lines[i].trim();
                if n.is_empty() || n.starts_with('|') || n.starts_with("- ") {
                    break;
                }
                para.push(n);
                i += 1;
            }
            out.push_str(&format!("<p>{}</p>", inline(&para.join(" "))));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_lists_and_paragraphs() {
        let md = "Kept 200 of `20000`.\n\n| stage | in |\n|---|---:|\n| pool | 20000 |\n\n- a <b>\n- c\n";
        let html = to_html(md);
        assert_eq!(
            html,
            "<p>Kept 200 of <code>20000</code>.</p><table><tr><th>stage</th><th>in</th></tr><tr><td>pool</td><td>20000</td></tr></table><ul><li>a &lt;b&gt;</li><li>c</li></ul>"
        );
    }
}
