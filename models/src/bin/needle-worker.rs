//! `needle-worker`: runs one built-in op in this process. The runner starts it as a step's
//! command (`needle-worker OP`) with exactly the environment an `exec` step gets, and the op
//! reads its context from there. It is a binary of its own because it links libtorch, which
//! takes half a second to load: `needle` itself never needs it.
//!
//! Exit codes: 0 done; 1 the op failed (the error and its causes are on stderr, which is the
//! step's log); 2 bad invocation.
//!
//! `needle-worker --torch-info` prints what libtorch sees (version, CUDA, GPUs) as JSON, for
//! `needle doctor`.

use std::process::ExitCode;

use needle_models::{builtin, torch};
use needle_ops::OpContext;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag] if flag == "--torch-info" => {
            let info = serde_json::to_string(&torch::info()).expect("torch info serialises");
            println!("{info}");
            ExitCode::SUCCESS
        }
        [op] if !op.starts_with('-') => run(op),
        _ => {
            eprintln!("usage: needle-worker OP | needle-worker --torch-info");
            ExitCode::from(2)
        }
    }
}

fn run(name: &str) -> ExitCode {
    let Some(op) = builtin(name) else {
        eprintln!("error: `{name}` is not a built-in op (hint: `needle ops` lists them)");
        return ExitCode::from(2);
    };
    let result = OpContext::from_env(&op.schema()).and_then(|ctx| {
        torch::prepare_worker(ctx.cpus, ctx.seed);
        op.run(&ctx)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain = needle_core::error_chain::joined(&e, "\n  caused by: ");
            eprintln!("error: {chain}");
            ExitCode::FAILURE
        }
    }
}
