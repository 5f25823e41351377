//! The `needle` binary.

mod cli;
mod commands;
mod config;
mod engine;
mod error;
mod executor;
mod gpu_usage;
mod gpus;
mod guard;
mod mps;
mod oom;
mod progress;
mod reaper;
mod refs;
mod report;
mod scheduler;
mod slurm;
mod spawn;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::{CliError, Exit};

fn main() {
    // Die quietly when a reader goes away (`needle status 3 | head`), as Unix tools do.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == reaper::ARG) {
        std::process::exit(reaper::main());
    }
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let code = match dispatch(&cli) {
        Ok(exit) => exit,
        Err(e) => {
            e.report();
            e.exit()
        }
    };
    std::process::exit(code as i32);
}

fn dispatch(cli: &Cli) -> Result<Exit, CliError> {
    match &cli.command {
        Command::Run(args) => commands::run::run(cli, args),
        Command::Plan(args) => commands::plan::plan(cli, args),
        Command::Runs(args) => commands::runs::runs(cli, args),
        Command::Status(args) => commands::status::status(cli, args),
        Command::Rerun(args) => commands::rerun::rerun(cli, args),
        Command::Lineage(args) => commands::lineage::lineage(cli, args),
        Command::Why(args) => commands::why::why(cli, args),
        Command::Export(args) => commands::export::export(cli, args),
        Command::Diff(args) => commands::diff::diff_cmd(cli, args),
        Command::Report(args) => commands::report::report(cli, args),
        Command::Results(args) => commands::results::results(cli, args),
        Command::Verify(args) => commands::verify::verify(cli, args),
        Command::Gc(args) => commands::gc::gc(cli, args),
        Command::Pin(args) => commands::pin::pin(cli, args),
        Command::Unpin(args) => commands::unpin::unpin(cli, args),
        Command::Show(args) => commands::show::show(cli, args),
        Command::Logs(args) => commands::logs::logs(cli, args),
        Command::Ops(args) => commands::ops::ops(args),
        Command::Completions(args) => commands::completions::completions(args),
        Command::Doctor(args) => commands::doctor::doctor(cli, args),
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NEEDLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .init();
}
