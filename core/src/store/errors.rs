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

    /// A directory that holds something else; opening it as a store would scribble over it.
    #[error(
        "`{root}` is not empty and is not a needle store (no `FORMAT` file) \
         (hint: pass --store with a new or empty directory)"
    )]
    NotAStore { root: PathBuf },

    #[error("could not {action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the store's metadata database failed")]
    Db(#[from] sled::Error),

    /// A record that does not decode, an index key that does not parse, a blob that a record
    /// needs and that is not in `blobs/`.
    #[error("a metadata record is unreadable: {what}")]
    Corrupt {
        what: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    #[error("output `{path}` is a {kind}; outputs may hold only files and directories")]
    Unsupported { path: PathBuf, kind: &'static str },

    #[error("output `{path}` has a name that is not UTF-8; outputs need UTF-8 paths")]
    NonUtf8Path { path: PathBuf },

    /// A manifest handed to [`crate::store::Store::commit`] that the store cannot lay out as a
    /// tree (unsorted, duplicate or escaping paths, a file with entries under it).
    #[error("the manifest of artifact `{artifact}` is invalid: {reason}")]
    BadManifest { artifact: String, reason: String },

    /// A step commit whose record names another output than the manifest it carries.
    #[error("step `{step}` records output `{recorded}` but its manifest is artifact `{manifest}`")]
    OutputMismatch {
        step: String,
        recorded: String,
        manifest: String,
    },

    #[error("artifact `{artifact}` is not in the store")]
    UnknownArtifact { artifact: String },

    /// The runner holding the store stopped answering in the middle of a command, and
    /// neither the store nor a new runner could be reached after it.
    #[error(
        "lost the runner holding `{root}` while reading through it (hint: run the command again)"
    )]
    Runner {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The runner holding the store answered a read with an error of its own.
    #[error("the runner holding the store could not answer: {message}")]
    RunnerAnswer { message: String },

    /// The runner holding the store is another build of needle, whose read protocol differs.
    #[error(
        "the runner holding `{root}` reads the store with protocol {found}, this needle with \
         {expected} (hint: use the needle binary that is running, or pass --wait to wait for the run)"
    )]
    RunnerProtocol {
        root: PathBuf,
        found: u32,
        expected: u32,
    },
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

    /// A copy for each of the callers one failure affects (`io::Error` is not `Clone`).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io {
                action,
                path,
                source,
            } => StoreError::Io {
                action,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            other => StoreError::corrupt(other.to_string()),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            what: what.into(),
            source: None,
        }
    }
}
