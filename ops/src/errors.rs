//! Errors of the ops. A worker prints the error with its causes and exits non-zero, which
//! fails the step with that message in its log.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("the worker's environment is wrong: {what}")]
    Environment { what: String },

    #[error("param `{name}`: {why}")]
    Param { name: String, why: String },

    #[error("input `{name}` {why}")]
    Input { name: String, why: String },

    #[error("could not {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("dataset `{path}`: {why}")]
    Dataset { path: PathBuf, why: String },

    #[error("{0}")]
    Failed(String),
}

impl OpError {
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> OpError {
        let path = path.into();
        move |source| OpError::Io {
            action,
            path,
            source,
        }
    }
}
