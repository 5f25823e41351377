//! `needle lineage REF`: ancestors (or `--down`, descendants) as a tree, DOT or JSON.

use std::collections::{HashMap, HashSet};

use needle_core::digest::StepKey;
use needle_core::lineage::{Direction, LineageGraph, LineageStep, walk};
use needle_core::store::fmt_ms;

use crate::cli::{Cli, LineageArgs, LineageFormat};
use crate::commands::open_reader;
use crate::commands::show::shell_words;
use crate::error::{CliError, Exit};
use crate::refs::resolve;

pub fn lineage(cli: &Cli, args: &LineageArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let target = resolve(&store, &args.reference)?;
    let key = crate::refs::stored_step(&store, &target, &args.reference)?;
    let direction = if args.down {
        Direction::Down
    } else {
        Direction::Up
    };
    let graph = walk(&store, &key, direction)?;
    let format = if args.json {
        LineageFormat::Json
    } else {
        args.format
    };
    match format {
        LineageFormat::Json => crate::commands::print_json(&graph),
        LineageFormat::Dot => print!("{}", dot(&graph)),
        LineageFormat::Mermaid => print!("{}", mermaid(&graph)),
        LineageFormat::Tree => print!("{}", tree(&graph)),
    }
    Ok(Exit::Success)
}

/// The default of `op`'s param `name`, if the op has one.
fn default_of(op: &str, name: &str) -> Option<needle_core::value::Value> {
    use needle_core::ops::{OpCatalog, ParamsSchema};
    thread_local! {
        static CATALOG: needle_ops::Registry = needle_ops::Registry::new();
    }
    CATALOG.with(|c| match &c.get(op)?.params {
        ParamsSchema::Fixed(specs) => specs.iter().find(|p| p.name == name)?.default.clone(),
        ParamsSchema::Free => None,
    })
}

fn describe(s: &LineageStep) -> String {
    let mut out = s.name.clone();
    if !s.bindings.is_empty() {
        out.push_str(&format!(
            "[{}]",
            needle_core::recipe::bindings_label(&s.bindings)
        ));
    }
    out.push_str(&format!("  ({})  {}", s.op, s.key.short()));
    // Only what the recipe set: a built-in op's defaults would drown it.
    let params: Vec<String> = s
        .params
        .iter()
        .filter(|(k, v)| default_of(&s.op, k).as_ref() != Some(*v))
        .map(|(k, v)| {
            let mut v = needle_core::value::render_short(v);
            if v.chars().count() > 40 {
                v = v.chars().take(39).collect::<String>() + "…";
            }
            format!("{k}={v}")
        })
        .collect();
    if !params.is_empty() {
        out.push_str(&format!("  {}", params.join(" ")));
    }
    if let Some(cmd) = &s.cmd {
        let mut c = shell_words(cmd);
        if c.chars().count() > 60 {
            c = c.chars().take(57).collect::<String>() + "...";
        }
        out.push_str(&format!("  $ {c}"));
    }
    out.push_str(&format!(
        "  -> {} {}",
        s.output.short(),
        fmt_ms(s.duration_ms)
    ));
    out
}

/// An indented tree from the root; a step reached twice is printed in full once.
fn tree(g: &LineageGraph) -> String {
    let by_key: HashMap<StepKey, &LineageStep> = g.steps.iter().map(|s| (s.key, s)).collect();
    let mut children: HashMap<StepKey, Vec<(String, StepKey)>> = HashMap::new();
    for e in &g.edges {
        let (parent, child) = match g.direction {
            Direction::Up => (e.to, e.from),
            Direction::Down => (e.from, e.to),
        };
        let list = children.entry(parent).or_default();
        if !list.iter().any(|(i, k)| *k == child && *i == e.input) {
            list.push((e.input.clone(), child));
        }
    }
    let mut out = String::new();
    let mut printed = HashSet::new();
    out.push_str(&describe(by_key[&g.root]));
    out.push('\n');
    printed.insert(g.root);
    print_children(&g.root, "", &children, &by_key, &mut printed, &mut out);
    let (n, what) = match g.direction {
        Direction::Up => (g.steps.len() - 1, "ancestor"),
        Direction::Down => (g.steps.len() - 1, "descendant"),
    };
    out.push_str(&format!("{n} {what} step(s)\n"));
    out
}

fn print_children(
    key: &StepKey,
    prefix: &str,
    children: &HashMap<StepKey, Vec<(String, StepKey)>>,
    by_key: &HashMap<StepKey, &LineageStep>,
    printed: &mut HashSet<StepKey>,
    out: &mut String,
) {
    let Some(kids) = children.get(key) else {
        return;
    };
    for (i, (input, child)) in kids.iter().enumerate() {
        let last = i + 1 == kids.len();
        let (branch, next) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        let step = by_key[child];
        if printed.insert(*child) {
            out.push_str(&format!("{prefix}{branch}{input}: {}\n", describe(step)));
            print_children(
                child,
                &format!("{prefix}{next}"),
                children,
                by_key,
                printed,
                out,
            );
        } else {
            out.push_str(&format!(
                "{prefix}{branch}{input}: {} {} (shown above)\n",
                step.name,
                step.key.short()
            ));
        }
    }
}

/// A Mermaid flowchart (GitHub and many notebooks render it inline).
fn mermaid(g: &LineageGraph) -> String {
    let escape = |t: &str| t.replace('"', "#quot;");
    let mut out = String::from("flowchart LR\n");
    for s in &g.steps {
        let mut label = s.name.clone();
        if !s.bindings.is_empty() {
            label.push_str(&format!(
                "<br/>[{}]",
                needle_core::recipe::bindings_label(&s.bindings)
            ));
        }
        label.push_str(&format!("<br/>{} {}", s.op, s.key.short()));
        out.push_str(&format!("  s{}[\"{}\"]\n", s.key.short(), escape(&label)));
    }
    for e in &g.edges {
        out.push_str(&format!(
            "  s{} -->|\"{}\"| s{}\n",
            e.from.short(),
            escape(&e.input),
            e.to.short()
        ));
    }
    out
}

fn dot(g: &LineageGraph) -> String {
    let mut out = String::from(
        "digraph lineage {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    for s in &g.steps {
        let mut label = s.name.clone();
        if !s.bindings.is_empty() {
            label.push_str(&format!(
                "\\n[{}]",
                needle_core::recipe::bindings_label(&s.bindings)
            ));
        }
        label.push_str(&format!("\\n{} {}", s.op, s.key.short()));
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\"];\n",
            s.key.short(),
            label.replace('"', "\\\"")
        ));
    }
    for e in &g.edges {
        out.push_str(&format!(
            "  \"{}\" -> \"{}\" [label=\"{}\"];\n",
            e.from.short(),
            e.to.short(),
            e.input.replace('"', "\\\"")
        ));
    }
    out.push_str("}\n");
    out
}
