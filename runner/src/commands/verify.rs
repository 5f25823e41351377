//! `needle verify [--hash]`: check the store's records against its bytes (see
//! `Store::verify`). Exit 0 when all is well, 1 with one line per problem.

use crate::cli::{Cli, VerifyArgs};
use crate::commands::{open_existing, print_json};
use crate::error::{CliError, Exit};

pub fn verify(cli: &Cli, args: &VerifyArgs) -> Result<Exit, CliError> {
    let store = open_existing(cli)?;
    let report = store.verify(args.hash)?;
    if args.json {
        print_json(&report);
    } else {
        println!(
            "checked {} steps, {} artifacts, {} runs, {} blobs{}",
            report.steps,
            report.artifacts,
            report.runs,
            report.blobs,
            if args.hash {
                format!(
                    " ({} hashed)",
                    crate::commands::show::human_bytes(report.bytes_hashed)
                )
            } else {
                " (sizes; --hash re-hashes their bytes)".into()
            }
        );
        for p in &report.problems {
            println!("problem: {p}");
        }
        if report.problems.is_empty() {
            println!("the store is consistent");
        }
    }
    Ok(if report.problems.is_empty() {
        Exit::Success
    } else {
        Exit::StepFailed
    })
}
