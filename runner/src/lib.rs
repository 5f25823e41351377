//! The `needle` binary, as a library: `main.rs` only calls [`main`], so that the engine's
//! unit tests can drive it with a fake executor (see `engine/tests.rs`).
//!
//! A map, for a first read (arrows: who calls whom; no module calls back up):
//!
//! ```text
//! main ── cli (clap) ── commands/<verb>.rs      one file per command; each opens the store
//!                          │                    (or reads through a live runner's socket)
//!            run / rerun ──┬── engine            the run loop: one select! over events;
//!                          │    │               owns every run's steps' state (one `State`
//!                          │    │               per node, with its spec, attempt or output;
//!                          │    │               the records), the ready queues, the pool
//!                          │    ├── runs         the runs it executes: joining, Ctrl-C of one,
//!                          │    │               a step handed over, a run's end
//!                          │    ├── scheduler    which ready step starts next (pure: shapes,
//!                          │    │               GPU shares, CPU slots, memory)
//!                          │    ├── executor     where attempts run (local or Slurm): the pool,
//!                          │    │    │          a step's shape and holdings, launch, stop
//!                          │    │    ├── local   one local attempt as a child process
//!                          │    │    │    ├── spawn   starts it (safe `command`, or `clone`)
//!                          │    │    │    ├── reaper  kills steps when the runner dies
//!                          │    │    │    └── oom     why a SIGKILL came
//!                          │    │    └── slurm   one attempt as a batch job, and the poller
//!                          │    ├── search       a later rung's step: kept or stopped
//!                          │    ├── commit       the commit thread: absorbs outputs, records
//!                          │    ├── progress     what the terminal shows
//!                          │    └── fake, tests  (tests only) the engine on a scripted
//!                          │                    executor: no processes, real scheduling
//!                          └── join              a run started while a runner holds the store:
//!                                               its client, and the runner's join.sock server
//!            staging                             a step's slot, its launch, its end (shared
//!                                                by local and slurm; input_guard: did it
//!                                                write into its inputs?)
//!            attempt, process                    leaves: the attempt's types and events;
//!                                                signalling groups, finding programs
//!            gpus, mps, gpu_usage                the run's GPUs, its MPS daemon, their sampling
//!            report/                             the HTML report (svg timeline, markdown)
//! ```
//!
//! State lives in the engine alone; executors and the commit thread talk to it only through
//! `attempt::Event`s on one channel. Everything durable is in the store (`needle_core::store`):
//! the engine writes the run record at the start and end, each step's progress as it changes,
//! and outputs through the commit thread.

mod attempt;
mod cli;
mod commands;
mod commit;
mod config;
mod engine;
mod error;
mod executor;
mod gpu_usage;
mod gpus;
mod input_guard;
mod join;
mod local;
mod mps;
mod oom;
mod process;
mod progress;
mod reaper;
mod refs;
mod remote;
mod report;
mod scheduler;
mod slurm;
mod spawn;
mod staging;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::{CliError, Exit};

/// The whole `needle` command: parses the arguments, runs the command, exits with its code.
pub fn main() -> ! {
    // Die quietly when a reader goes away (`needle status 3 | head`), as Unix tools do. And
    // block no signal: every thread inherits this thread's mask, and the steps the safe spawn
    // starts inherit the mask of the thread that starts them (a parent that blocked a signal
    // would otherwise pass that on to every step).
    // SAFETY: restoring the default disposition of SIGPIPE, and emptying this thread's signal
    // mask (a sigset_t filled in by sigemptyset), before any other thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
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
    // The store is closed by now: a failure of its last sync leaves the command's work
    // committed, but the store unavailable until it is opened again.
    let code = match needle_core::store::close_failure() {
        Some(e) => {
            let e = CliError::Store(e);
            e.report();
            if code == Exit::Interrupted {
                code
            } else {
                e.exit()
            }
        }
        None => code,
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
        Command::Push(args) => commands::push::push(cli, args),
        Command::Pull(args) => commands::pull::pull(cli, args),
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        // sled logs each failure of its own writes, a dozen lines for one failed disk write,
        // then returns it: needle's error says it once, with its cause (`-v` shows sled's).
        0 => "warn,sled=off",
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
