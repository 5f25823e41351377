//! `needle gc [--keep-last N] [--dry-run]`: remove what no kept run or pin reaches, and say
//! what it freed (see `Store::gc_plan` for what is kept, and the order that makes a SIGKILL
//! at any moment harmless).

use std::time::Instant;

use needle_core::store::{GcOptions, GcSummary, StoreError, Tally};

use crate::cli::{Cli, GcArgs};
use crate::commands::show::human_bytes;
use crate::commands::{open_existing, print_json};
use crate::error::{CliError, Exit};

pub fn gc(cli: &Cli, args: &GcArgs) -> Result<Exit, CliError> {
    if args.remote.is_some() {
        return gc_remote(args);
    }
    // The store's exclusive lock, as `run` takes it: gc cannot start while a run uses the
    // store, and no run starts while gc works. (Were read-only commands to share the store
    // one day, gc must keep taking it exclusively.)
    let store = open_existing(cli)?;
    let t0 = Instant::now();
    let opts = GcOptions {
        keep_last: args.keep_last,
    };
    let plan = store.gc_plan(opts).inspect_err(|e| {
        if matches!(e, StoreError::Corrupt { .. }) {
            eprintln!(
                "hint: gc decides only on records it can read: `needle verify` names the \
                 damaged ones, `needle verify --repair` drops them"
            );
        }
    })?;
    if !args.dry_run {
        store.gc_apply(&plan)?;
    }
    let s = &plan.summary;
    if args.json {
        print_json(&serde_json::json!({
            "dry_run": args.dry_run,
            "keep_last": args.keep_last,
            "freed": s,
            "seconds": t0.elapsed().as_secs_f64(),
        }));
    } else {
        print_summary(s, args.dry_run, t0.elapsed().as_secs_f64());
    }
    Ok(Exit::Success)
}

fn print_summary(s: &GcSummary, dry_run: bool, seconds: f64) {
    let records = s.runs + s.steps + s.artifacts + s.index_entries;
    let things = s.blobs.count + s.views.count + s.logs.count + s.resume.count;
    if records == 0 && things == 0 {
        println!("nothing to free");
    } else {
        let verb = if dry_run { "would free" } else { "freed" };
        println!("{verb} {}", human_bytes(s.bytes));
        println!(
            "  records   {}, {}, {}, {}",
            count(s.runs, "run"),
            count(s.steps, "step"),
            count(s.artifacts, "artifact"),
            count(s.index_entries, "index entry")
        );
        let tally =
            |t: &Tally, what: &str| format!("{} ({})", count(t.count, what), human_bytes(t.bytes));
        println!(
            "  files     {}, {}, {}, {}",
            tally(&s.blobs, "blob"),
            tally(&s.logs, "log"),
            tally(&s.resume, "resume dir"),
            tally(&s.views, "view")
        );
    }
    let k = &s.kept;
    println!(
        "kept {}, {}, {}, {} ({}), {}{}",
        count(k.runs, "run"),
        count(k.steps, "step"),
        count(k.artifacts, "artifact"),
        count(k.blobs.count, "blob"),
        human_bytes(k.blobs.bytes),
        count(k.pins, "pin"),
        if dry_run {
            " (dry run: nothing was removed)".to_string()
        } else {
            format!(" in {seconds:.2}s")
        }
    );
}

/// `1 run`, `3 runs`, `2 index entries`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else if let Some(stem) = what.strip_suffix('y') {
        format!("{n} {stem}ies")
    } else {
        format!("{n} {what}s")
    }
}

/// `gc --remote`: delete broken records, damaged blobs and old orphans of the shared cache.
/// Never touches the local store.
fn gc_remote(args: &GcArgs) -> Result<Exit, CliError> {
    let remote = crate::remote::Remote::required(args.remote.clone().flatten().as_deref())?;
    let done = crate::remote::block_on(async {
        let report = crate::remote::check(&remote, args.hash, args.grace).await?;
        crate::remote::gc(&remote, &report, args.dry_run).await
    })?;
    if args.json {
        print_json(&done);
        return Ok(Exit::Success);
    }
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    println!(
        "remote {}: {verb} {} broken record(s) and {} unneeded object(s) older than {} ({})",
        done.url,
        done.broken,
        done.orphans,
        humantime::format_duration(args.grace),
        human_bytes(done.orphan_bytes)
    );
    for name in &done.deleted {
        println!("  {name}");
    }
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_read_as_english() {
        assert_eq!(super::count(1, "run"), "1 run");
        assert_eq!(super::count(0, "blob"), "0 blobs");
        assert_eq!(super::count(2, "index entry"), "2 index entries");
    }
}
