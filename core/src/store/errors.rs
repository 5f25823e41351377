use std::path::PathBuf;

/// Errors of the store. Causes are kept in `#[source]`, not formatted into the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store `{root}` is in use by {holder}")]
    Locked { root: PathBuf, holder: String },

    #[error("no store at `{root}` (hint: run a recipe first, or pass --store)")]
    Missing { root: PathBuf },

    #[error("`{root}` is a store of format `{found}`, this needle reads `{expected}`")]
    Format {
        root: PathBuf,
        found: String,
        expected: &'static str,
    },

    #[error("could not {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the store's metadata database failed")]
    Db(#[from] sled::Error),

    #[error("a metadata record is unreadable: {what}")]
    Corrupt { what: String },

    #[error("output `{path}` is a {kind}; outputs may hold only files and directories")]
    Unsupported { path: PathBuf, kind: &'static str },
}

impl StoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}
