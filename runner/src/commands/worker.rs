//! `needle worker OP` (hidden): runs one built-in op in this process. The runner starts it as
//! a step's command, with exactly the environment an `exec` step gets; the op reads its
//! context from there. A failure prints the error and its causes to stderr (the step's log)
//! and exits 1, which fails the step.

use needle_ops::{OpContext, Registry};

use crate::cli::WorkerArgs;
use crate::error::{CliError, Exit};

pub fn worker(args: &WorkerArgs) -> Result<Exit, CliError> {
    let registry = Registry::new();
    let op = registry.builtin(&args.op).ok_or_else(|| {
        CliError::usage(format!(
            "`{}` is not a built-in op (hint: `needle ops` lists them)",
            args.op
        ))
    })?;
    let ctx = OpContext::from_env(&op.schema())?;
    needle_ops::torch::prepare_worker(ctx.cpus, ctx.seed);
    op.run(&ctx)?;
    Ok(Exit::Success)
}
