//! The binary's one error type, and the exit codes it maps to.

use std::io::IsTerminal;

use needle_core::plan::PlanError;
use needle_core::recipe::RecipeErrors;
use needle_core::store::StoreError;
use needle_ops::OpError;

/// Documented exit codes (`needle --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every step succeeded or was cached.
    Success = 0,
    /// At least one step failed (its dependents were skipped); or `verify` found a problem.
    StepFailed = 1,
    /// Bad invocation or recipe; nothing was written to the store.
    BadInput = 2,
    /// The store is in use by another process, missing, or unreadable.
    StoreUnavailable = 3,
    /// Stopped by Ctrl-C.
    Interrupted = 130,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Recipe(Box<RecipeErrors>),

    /// A wrong argument or reference: what is wrong, and a hint where one helps.
    #[error("{0}")]
    Usage(String),

    #[error(transparent)]
    Store(#[from] StoreError),

    /// The store could not be opened, whatever the cause: unavailable (exit 3).
    #[error(transparent)]
    StoreOpen(StoreError),

    #[error(transparent)]
    Plan(#[from] PlanError),

    /// A built-in op failed in `needle-worker`: the step fails.
    #[error(transparent)]
    Op(#[from] OpError),

    /// `--mps` could not start the run's MPS daemon: nothing ran (exit 2, as for a bad
    /// invocation: the run asked for what this machine cannot give).
    #[error(transparent)]
    Mps(#[from] crate::mps::MpsError),

    /// The shared cache could not do what was asked.
    #[error(transparent)]
    Remote(Box<crate::remote::RemoteError>),
    /// The runner this run joined went away before the run ended (exit 3).
    #[error("{0}")]
    RunnerLost(String),

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<RecipeErrors> for CliError {
    fn from(e: RecipeErrors) -> Self {
        CliError::Recipe(Box::new(e))
    }
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }

    pub fn exit(&self) -> Exit {
        match self {
            CliError::Recipe(_) | CliError::Usage(_) | CliError::Plan(_) | CliError::Mps(_) => {
                Exit::BadInput
            }
            CliError::Store(StoreError::Locked { .. })
            | CliError::Store(StoreError::Missing { .. })
            | CliError::Store(StoreError::ReadOnly { .. })
            | CliError::Store(StoreError::Format { .. })
            | CliError::Store(StoreError::NotAStore { .. })
            | CliError::Store(StoreError::Db(_))
            | CliError::Store(StoreError::Runner { .. })
            | CliError::Store(StoreError::RunnerProtocol { .. })
            | CliError::Store(StoreError::Corrupt { .. })
            | CliError::Store(StoreError::JournalPoisoned { .. })
            | CliError::Store(StoreError::CloseFailed { .. })
            | CliError::StoreOpen(_)
            | CliError::RunnerLost(_) => Exit::StoreUnavailable,
            CliError::Store(_) | CliError::Io { .. } | CliError::Op(_) | CliError::Remote(_) => {
                Exit::StepFailed
            }
        }
    }

    /// Print to stderr: recipe errors as labelled snippets on a terminal, plain
    /// `file:line:col: error: …` lines otherwise; other errors with their chain of causes.
    pub fn report(&self) {
        match self {
            CliError::Recipe(errors) => {
                if std::io::stderr().is_terminal() {
                    eprintln!("{:?}", miette::Report::new((**errors).clone()));
                } else {
                    eprint!("{}", errors.render_plain());
                }
            }
            other => {
                let chain = needle_core::error_chain::joined(other, "\n  caused by: ");
                eprintln!("error: {chain}");
            }
        }
    }
}
