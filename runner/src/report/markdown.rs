//! A step's `summary.md` as HTML, for the report: CommonMark with tables, strikethrough and
//! task lists (pulldown-cmark), safely. The file is a step's output, so nothing in it may run
//! in the reader's browser: raw HTML is shown as text, and a link or image whose address has
//! a scheme other than http(s) or mailto (`javascript:`, `data:`) keeps its text and loses its
//! address. Images other than by http(s) address show their alt text.

use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, html};

pub fn to_html(md: &str) -> String {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let events = Parser::new_ext(md, options).map(|event| match event {
        // Raw HTML becomes text, escaped like any other.
        Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) => Event::Start(Tag::Link {
            link_type,
            dest_url: safe_url(dest_url),
            title,
            id,
        }),
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => Event::Start(Tag::Image {
            link_type,
            dest_url: safe_url(dest_url),
            title,
            id,
        }),
        other => other,
    });
    let mut out = String::new();
    html::push_html(&mut out, events);
    out
}

/// `url` when it is relative or http(s)/mailto; otherwise nothing.
fn safe_url(url: CowStr<'_>) -> CowStr<'_> {
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s)
        .filter(|s| !s.contains('/') && !s.contains('?') && !s.contains('#'));
    match scheme.map(str::to_ascii_lowercase).as_deref() {
        None | Some("http" | "https" | "mailto") => url,
        Some(_) => CowStr::Borrowed(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_lists_and_paragraphs() {
        let md = "Kept 200 of `20000`.\n\n| stage | in |\n|---|---:|\n| pool | 20000 |\n\n- a <b>\n- c\n";
        let html = to_html(md);
        assert!(
            html.contains("<p>Kept 200 of <code>20000</code>.</p>"),
            "{html}"
        );
        assert!(html.contains("<th>stage</th>"), "{html}");
        assert!(
            html.contains("<td style=\"text-align: right\">20000</td>"),
            "{html}"
        );
        assert!(html.contains("<li>a &lt;b&gt;</li>"), "{html}");
    }

    #[test]
    fn a_users_markdown_renders_and_nothing_in_it_runs() {
        let md = "# Results\n\nThe *tuned* model **wins**; see [the paper](https://arxiv.org/abs/2309.15807).\n\n<script>alert(1)</script>\n\n[click](javascript:alert(1)) ![x](data:image/svg+xml;base64,PHN2Zz4=)\n";
        let html = to_html(md);
        assert!(html.contains("<h1>Results</h1>"), "{html}");
        assert!(
            html.contains("<em>tuned</em>") && html.contains("<strong>wins</strong>"),
            "{html}"
        );
        assert!(
            html.contains("<a href=\"https://arxiv.org/abs/2309.15807\">the paper</a>"),
            "{html}"
        );
        assert!(!html.contains("<script"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("<a href=\"\">click</a>"), "{html}");
        assert!(html.contains("<img src=\"\" alt=\"x\""), "{html}");
    }
}
