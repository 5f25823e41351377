//! `needle show REF`: one step (op, params, inputs, output, timings, attempts) or one artifact
//! (its files, who made it, who read it).

use needle_core::digest::{ArtifactDigest, StepKey};
use needle_core::lineage::producer;
use needle_core::store::{EntryKind, InputDigests, RunStep, StoreRead, fmt_ms, now_millis};
use needle_core::value::render_short;

use crate::cli::{Cli, ShowArgs};
use crate::commands::status::step_state;
use crate::commands::{fmt_time, gpu_label, open_reader, print_json};
use crate::error::{CliError, Exit};
use crate::progress::step_label;
use crate::refs::{Target, resolve};

pub fn show(cli: &Cli, args: &ShowArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    match resolve(&store, &args.reference)? {
        Target::Artifact(a) => show_artifact(&store, &a, args.json),
        Target::Step(k) => show_step(&store, &k, None, args.json),
        Target::RunStep { run, index } => {
            let step = &run.steps[index];
            let live = store.is_live(run.id);
            match step.key {
                Some(k) if store.step(&k)?.is_some() => {
                    show_step(&store, &k, Some((step, live)), args.json)
                }
                _ => show_unfinished(run.id, step, live, args.json),
            }
        }
    }
}

fn show_step(
    store: &dyn StoreRead,
    key: &StepKey,
    in_run: Option<(&RunStep, bool)>,
    json: bool,
) -> Result<Exit, CliError> {
    let rec = store
        .step(key)?
        .ok_or_else(|| CliError::usage(format!("step `{}` is not in the store", key.short())))?;
    if json {
        let mut v = serde_json::to_value(&rec).expect("records serialise");
        if store.manifest(&rec.output)?.is_some() {
            v["view"] = serde_json::to_value(store.view(&rec.output)?).expect("serialise");
        }
        if let Some((step, _)) = in_run {
            v["run_status"] = serde_json::to_value(&step.status).expect("serialise");
            v["run_attempts"] = serde_json::to_value(&step.attempts).expect("serialise");
        }
        print_json(&v);
        return Ok(Exit::Success);
    }
    let label = if rec.bindings.is_empty() {
        rec.name.clone()
    } else {
        format!(
            "{}[{}]",
            rec.name,
            needle_core::recipe::bindings_label(&rec.bindings)
        )
    };
    println!("step     {label}");
    println!("key      {}", rec.key);
    println!("op       {} (v{})", rec.spec.op, rec.spec.op_version);
    if let Some(cmd) = &rec.spec.cmd {
        println!("cmd      {}", shell_words(cmd));
    }
    if !rec.spec.params.is_empty() {
        println!("params");
        for (k, v) in &rec.spec.params {
            println!("  {k} = {}", needle_core::canonical::to_string(v));
        }
    }
    if !rec.spec.code.is_empty() {
        println!("code");
        for (path, digest) in &rec.spec.code {
            println!("  {path}  {}", digest.short());
        }
    }
    if !rec.spec.paths.is_empty() {
        println!("paths    (fingerprints of the files there when it was planned)");
        for (param, fingerprint) in &rec.spec.paths {
            println!("  {param}  {}", &fingerprint[..fingerprint.len().min(12)]);
        }
    }
    if !rec.spec.environment.is_empty() {
        println!("environment  (what each command printed when it was planned)");
        for (command, digest) in &rec.spec.environment {
            let printed = (digest.parse::<needle_core::digest::BlobDigest>().ok())
                .and_then(|d| std::fs::read_to_string(store.blob_path(&d)).ok());
            match printed {
                Some(text) => {
                    let lines: Vec<&str> = text.lines().collect();
                    let first = lines.first().copied().unwrap_or("").trim();
                    let more = match lines.len() {
                        0 | 1 => String::new(),
                        n => format!(" (and {} more lines)", n - 1),
                    };
                    println!("  {command}: {first}{more}");
                }
                None => println!("  {command}: {}", &digest[..digest.len().min(12)]),
            }
        }
    }
    if !rec.spec.inputs.is_empty() {
        println!("inputs");
        for (name, digests) in &rec.spec.inputs {
            match digests {
                InputDigests::One(a) => {
                    println!("  {name}: {} {}", a.short(), made_by(store, a)?);
                }
                InputDigests::Gather(members) => {
                    println!("  {name}: {} artifacts gathered", members.len());
                    for m in members {
                        println!(
                            "    {:<24} {} {}",
                            m.label,
                            m.artifact.short(),
                            made_by(store, &m.artifact)?
                        );
                    }
                }
            }
        }
    }
    let manifest = store.manifest(&rec.output)?;
    let files = manifest.as_ref().map_or(0, |m| m.file_count());
    let size = manifest.as_ref().map_or(0, |m| m.total_size());
    println!(
        "output   {} ({files} files, {})",
        rec.output,
        human_bytes(size)
    );
    if let Some(text) = manifest.as_ref().and_then(|m| summary_of(store, m)) {
        print_summary(&text);
    }
    if let Some(m) = &manifest {
        let view = store.view(&rec.output)?;
        println!("files    {}", view.display());
        // The pictures an op leaves at the top of its output (grids, plots): openable as is.
        for e in &m.entries {
            if matches!(e.kind, EntryKind::File { .. })
                && !e.path.contains('/')
                && e.path.ends_with(".png")
            {
                println!("  {}", view.join(&e.path).display());
            }
        }
    }
    println!("executions");
    if let Some(url) = &rec.fetched_from {
        println!(
            "  (fetched from {url}: run numbers are the other machine's; its logs stayed there)"
        );
    }
    for e in &rec.executions {
        let gpus = match gpu_label(&e.gpus, e.gpu_share, e.gpu_mem_gb) {
            label if label.is_empty() => label,
            label => format!(" on gpu {label}"),
        };
        let job = e
            .job
            .as_ref()
            .map(|j| format!(" ({j})"))
            .unwrap_or_default();
        println!(
            "  run {} attempt {}: {} took {}{gpus}{job} -> {}  log {}",
            e.run,
            e.attempt,
            fmt_time(e.started),
            fmt_ms(e.ended.saturating_sub(e.started)),
            e.output.short(),
            e.log
        );
    }
    if let Some((step, live)) = in_run {
        print_attempts(step, live);
    }
    Ok(Exit::Success)
}

fn show_unfinished(run: u64, step: &RunStep, live: bool, json: bool) -> Result<Exit, CliError> {
    if json {
        let state = step_state(step, live);
        print_json(&serde_json::json!({"run": run, "step": step, "state": state}));
        return Ok(Exit::Success);
    }
    println!("step     {} (run {run})", step_label(step));
    println!(
        "key      {}",
        step.key
            .map(|k| k.hex())
            .unwrap_or_else(|| "(not known: an input was never produced)".into())
    );
    println!("op       {}", step.op);
    println!("status   {}", step_state(step, live));
    match &step.status {
        needle_core::store::StepStatus::Failed { reason } => println!("reason   {reason}"),
        needle_core::store::StepStatus::Skipped { upstream } => {
            println!("reason   upstream step `{upstream}` failed")
        }
        _ => {}
    }
    print_attempts(step, live);
    Ok(Exit::Success)
}

/// The attempts of a step in one run; `live` when that run is going now.
fn print_attempts(step: &RunStep, live: bool) {
    if step.attempts.is_empty() {
        return;
    }
    println!("attempts in this run");
    for a in &step.attempts {
        if live && a.ended == 0 {
            println!(
                "  {}: running since {}, for {} (`needle logs` shows its output so far)",
                a.n,
                fmt_time(a.started),
                fmt_ms(now_millis().saturating_sub(a.started)),
            );
            continue;
        }
        let job = a
            .job
            .as_ref()
            .map(|j| format!(" as {j}"))
            .unwrap_or_default();
        println!(
            "  {}: {} at {}, took {}{job}  log {}",
            a.n,
            a.result.describe(),
            fmt_time(a.started),
            fmt_ms(a.ended.saturating_sub(a.started)),
            a.log
        );
    }
}

fn show_artifact(store: &dyn StoreRead, a: &ArtifactDigest, json: bool) -> Result<Exit, CliError> {
    let manifest = store
        .manifest(a)?
        .ok_or_else(|| CliError::usage(format!("artifact `{}` has no manifest", a.short())))?;
    let made = producer(store, a)?;
    let readers = store.consumers(a)?;
    if json {
        print_json(&serde_json::json!({
            "artifact": a,
            "files": manifest.entries,
            "size": manifest.total_size(),
            "producer": made.as_ref().map(|r| r.key),
            "consumers": readers,
            "view": store.view(a)?,
            "summary": summary_of(store, &manifest),
        }));
        return Ok(Exit::Success);
    }
    println!("artifact {a}");
    println!(
        "size     {} in {} files",
        human_bytes(manifest.total_size()),
        manifest.file_count()
    );
    if let Some(r) = &made {
        println!("made by  {} ({}) {}", r.name, r.spec.op, r.key.short());
    }
    if !readers.is_empty() {
        println!("read by  {} step(s)", readers.len());
        for k in readers.iter().take(20) {
            if let Some(r) = store.step(k)? {
                println!("  {} {}", r.name, k.short());
            }
        }
    }
    if let Some(text) = summary_of(store, &manifest) {
        print_summary(&text);
    }
    println!("files    (at {})", store.view(a)?.display());
    for e in manifest.entries.iter().take(200) {
        match &e.kind {
            EntryKind::File { size, blob, .. } => {
                println!(
                    "  {:<48} {:>10}  {}",
                    e.path,
                    human_bytes(*size),
                    blob.short()
                )
            }
            EntryKind::Dir => println!("  {}/", e.path),
        }
    }
    if manifest.entries.len() > 200 {
        println!("  … {} more", manifest.entries.len() - 200);
    }
    Ok(Exit::Success)
}

/// The op's own summary of an output (`summary.md`), if it wrote a short one.
fn summary_of(store: &dyn StoreRead, manifest: &needle_core::store::Manifest) -> Option<String> {
    const MAX: u64 = 64 * 1024;
    let entry = manifest
        .entries
        .iter()
        .find(|e| e.path == needle_ops::SUMMARY)?;
    match &entry.kind {
        EntryKind::File { blob, size, .. } if *size <= MAX => {
            std::fs::read_to_string(store.blob_path(blob)).ok()
        }
        _ => None,
    }
}

fn print_summary(text: &str) {
    println!("summary");
    for line in text.lines() {
        println!("  {line}");
    }
}

fn made_by(store: &dyn StoreRead, a: &ArtifactDigest) -> Result<String, CliError> {
    Ok(match producer(store, a)? {
        Some(r) if r.bindings.is_empty() => format!("from {}", r.name),
        Some(r) => {
            let b: Vec<String> = r
                .bindings
                .iter()
                .map(|(k, v)| format!("{k}={}", render_short(v)))
                .collect();
            format!("from {}[{}]", r.name, b.join(","))
        }
        None => String::new(),
    })
}

pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
