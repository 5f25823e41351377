//! `needle verify [--hash] [--repair]`: check the store's records against its bytes (see
//! `Store::verify`). Exit 0 when all is well, 1 with one line per problem. `--repair` drops
//! what is damaged (`Store::repair`) and exits 0 when the store verifies afterwards.

use needle_core::store::{Repaired, VerifyReport};

use crate::cli::{Cli, VerifyArgs};
use crate::commands::show::human_bytes;
use crate::commands::{open_existing, print_json};
use crate::error::{CliError, Exit};

pub fn verify(cli: &Cli, args: &VerifyArgs) -> Result<Exit, CliError> {
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
        "checked {} steps, {} artifacts, {} runs, {} pins, {} blobs{}",
        report.steps,
        report.artifacts,
        report.runs,
        report.pins,
        report.blobs,
        if hash {
            format!(" ({} hashed)", human_bytes(report.bytes_hashed))
        } else {
            " (sizes; --hash re-hashes their bytes)".into()
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
