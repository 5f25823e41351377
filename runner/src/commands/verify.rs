//! `needle verify [--hash] [--repair | --rebuild]`: check the store's records against its bytes
//! (see `Store::verify`). Exit 0 when all is well, 1 with one line per problem. `--repair`
//! drops what is damaged (`Store::repair`) and exits 0 when the store verifies afterwards.
//! `--rebuild` restores `meta/` from the journal (`Store::rebuild`), says what it restored,
//! and exits 0 when nothing was lost and the result verifies.

use needle_core::store::{Rebuilt, Repaired, Store, VerifyReport};

use crate::cli::{Cli, VerifyArgs};
use crate::commands::show::human_bytes;
use crate::commands::{lock_mode, open_existing, print_json, store_root};
use crate::error::{CliError, Exit};

pub fn verify(cli: &Cli, args: &VerifyArgs) -> Result<Exit, CliError> {
    if args.remote.is_some() {
        return verify_remote(args);
    }
    if args.rebuild {
        let (_store, rebuilt) = Store::rebuild(&store_root(cli)?, lock_mode(cli), args.hash)
            .map_err(CliError::StoreOpen)?;
        if args.json {
            print_json(&rebuilt);
        } else {
            print_rebuilt(&rebuilt, args.hash);
        }
        return Ok(if rebuilt.frames_lost > 0 {
            Exit::StepFailed
        } else {
            exit(&rebuilt.verify)
        });
    }
    let store = open_existing(cli)?;
    if args.repair {
        let repaired = store.repair()?;
        if args.json {
            print_json(&repaired);
        } else {
            print_repaired(&repaired);
        }
        return Ok(exit(&repaired.after));
    }
    let report = store.verify(args.hash)?;
    if args.json {
        print_json(&report);
    } else {
        print_report(&report, args.hash);
        if report.problems.is_empty() {
            println!("the store is consistent");
        }
    }
    Ok(exit(&report))
}

fn exit(report: &VerifyReport) -> Exit {
    if report.problems.is_empty() {
        Exit::Success
    } else {
        Exit::StepFailed
    }
}

fn print_report(report: &VerifyReport, hash: bool) {
    println!(
        "checked {} steps, {} artifacts, {} runs, {} pins, {} blobs{}{}",
        report.steps,
        report.artifacts,
        report.runs,
        report.pins,
        report.blobs,
        if hash {
            format!(" ({} hashed)", human_bytes(report.bytes_hashed))
        } else {
            " (sizes; --hash re-hashes their bytes)".into()
        },
        match report.journal_records {
            Some(n) => format!(", and the journal ({n} records)"),
            None => String::new(),
        }
    );
    for p in &report.problems {
        println!("problem: {p}");
    }
    if report.dropped_outputs > 0 {
        println!(
            "note: {} output(s) of recorded runs were dropped as damaged; the next run that \
             needs them executes their steps again",
            report.dropped_outputs
        );
    }
}

fn print_rebuilt(r: &Rebuilt, hash: bool) {
    let n = &r.restored;
    println!(
        "rebuilt the store's metadata from its journal `{}` ({}, {} frames)",
        r.journal.display(),
        human_bytes(r.journal_bytes),
        r.frames
    );
    println!(
        "restored {} steps, {} artifacts, {} runs, {} pins, {} dropped-artifact notes, GPU \
         usage of {} runs, {} step states of unfinished runs, {} index entries",
        n.steps,
        n.artifacts,
        n.runs,
        n.pins,
        n.dropped,
        n.gpu_usage,
        n.run_progress,
        n.index_entries
    );
    if let Some(stop) = &r.stopped {
        if r.frames_lost == 0 {
            println!(
                "ignored the last {} byte(s) of the journal, from offset {} ({}): a write that a \
                 killed process did not finish, never recorded",
                stop.bytes, stop.offset, stop.reason
            );
        } else {
            println!(
                "problem: the journal is damaged at offset {} ({}): {} later change(s) could not \
                 be restored",
                stop.offset, stop.reason, r.frames_lost
            );
        }
    }
    match &r.old_meta {
        Some(old) => println!(
            "the old metadata is kept in `{}` (remove it once you no longer need it)",
            old.display()
        ),
        None => println!("there was no old metadata to keep"),
    }
    print_report(&r.verify, hash);
    if r.verify.problems.is_empty() {
        println!("the store is consistent");
    } else {
        println!("(hint: `needle verify --repair` drops what the blobs no longer hold)");
    }
}

fn print_repaired(r: &Repaired) {
    print_report(&r.before, true);
    let d = &r.dropped;
    for b in &d.blobs {
        println!("dropped blob {}: it {}", b.id, b.reason);
    }
    for a in &d.artifacts {
        println!("dropped artifact {}: {}", a.id, a.reason);
    }
    for s in &d.steps {
        let name = s
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        println!(
            "dropped step {}{name}: {}; the next run executes it again",
            s.id, s.reason
        );
    }
    for run in &d.runs {
        println!("dropped run {}: {}", run.id, run.reason);
    }
    if d.producer_entries_added > 0 {
        println!("added {} producer index entries", d.producer_entries_added);
    }
    if d.pins_rewritten > 0 {
        println!("rewrote {} unreadable pin record(s)", d.pins_rewritten);
    }
    if let Some(kept) = &d.journal_kept_as {
        println!(
            "wrote the journal anew from the metadata; the old one is kept as `{}`",
            kept.display()
        );
    }
    if r.after.problems.is_empty() {
        if d.is_empty() {
            println!("the store is consistent: nothing to repair");
        } else {
            println!("repaired: the store is consistent");
        }
    } else {
        println!("after the repair:");
        for p in &r.after.problems {
            println!("problem: {p}");
        }
    }
}

/// `verify --remote`: every record, manifest and blob of the shared cache against its name.
fn verify_remote(args: &VerifyArgs) -> Result<Exit, CliError> {
    let remote = crate::remote::Remote::required(args.remote.clone().flatten().as_deref())?;
    let report = crate::remote::block_on(crate::remote::check(
        &remote,
        args.hash,
        std::time::Duration::MAX,
    ))?;
    if args.json {
        print_json(&report);
    } else {
        println!(
            "remote {}: {} step record(s) · {} artifact(s) · {} blob(s), {}{}",
            report.url,
            report.steps,
            report.artifacts,
            report.blobs,
            human_bytes(report.bytes),
            if report.hashed {
                ", every blob hashed"
            } else {
                ""
            }
        );
        for p in &report.problems {
            println!("  damaged: {p}");
        }
        if report.problems.is_empty() {
            println!("the remote is consistent");
        } else {
            println!(
                "  a pull refuses these; `needle gc --remote` deletes them, and a push of the steps \
                 uploads them again"
            );
        }
    }
    Ok(if report.problems.is_empty() {
        Exit::Success
    } else {
        Exit::StepFailed
    })
}
