use std::path::PathBuf;

/// What makes a manifest one the store cannot lay out as a tree (see `check_manifest`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestProblem {
    /// Empty, `.` or `..` components, or a NUL.
    #[error("path `{0}` is not a clean relative path")]
    NotClean(String),
    #[error("path `{0}` is out of order or repeated")]
    OutOfOrder(String),
    /// An entry under a file or under an empty-directory entry.
    #[error("`{parent}` holds `{path}` but is not a directory")]
    UnderAFile { parent: String, path: String },
}

/// Errors of the store. Causes are kept in `#[source]`, not formatted into the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store `{root}` is in use by {holder}")]
    Locked { root: PathBuf, holder: String },

    #[error("no store at `{root}` (hint: run a recipe first, or pass --store)")]
    Missing { root: PathBuf },

    /// The store's filesystem is mounted read-only: it can be read, not written.
    #[error(
        "the store `{root}` is on a read-only filesystem: it can be read (`runs`, `status`, \
         `show`, `lineage`, `export`…), not written"
    )]
    ReadOnly { root: PathBuf },

    /// `FORMAT` names another format than this needle's: see [`format_message`].
    #[error("{}", format_message(root, found, expected))]
    Format {
        root: PathBuf,
        found: String,
        expected: &'static str,
    },

    /// The directory is laid out as a store and holds data, but its `FORMAT` file is gone.
    #[error(
        "`{root}` holds a needle store's directories but no `FORMAT` file, so which needle \
         wrote it is unknown (the file was removed, or the store's creation was interrupted \
         on a filesystem that lost it); if this needle made it, restore the file with \
         `echo '{expected}' > {root}/FORMAT`"
    )]
    FormatMissing {
        root: PathBuf,
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

    /// sled would not open `meta/` (damaged files, "Read corrupted data").
    #[error(
        "the store's metadata `{}/meta` cannot be read{}",
        root.display(),
        if *journal {
            " (hint: `needle verify --rebuild` restores it from the store's journal)"
        } else {
            ", and the store has no journal to rebuild it from"
        }
    )]
    MetaUnreadable {
        root: PathBuf,
        /// Whether a journal with records is there to rebuild from.
        journal: bool,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// `meta/` is missing or empty, but the journal holds records.
    #[error(
        "the store's metadata `{}/meta` is missing or empty, but its journal holds its records \
         (hint: `needle verify --rebuild` restores them)",
        root.display()
    )]
    MetaLost { root: PathBuf },

    /// sled holds records but no journal position, beside a journal that holds records: which
    /// of the two is the store's cannot be told.
    #[error(
        "the store's metadata `{}/meta` does not match its journal (it records no place in it) \
         (hint: `needle verify --rebuild` restores the metadata from the journal, keeping this \
         one aside)",
        root.display()
    )]
    MetaUnmatched { root: PathBuf },

    /// sled is older than the journal's snapshot: changes between are in neither.
    #[error(
        "the store's metadata `{}/meta` is older than its journal (it lost changes the journal \
         has) (hint: `needle verify --rebuild` restores it from the journal)",
        root.display()
    )]
    MetaStale { root: PathBuf },

    /// The journal cannot be read from its start, and sled holds nothing to rewrite it from.
    #[error(
        "the store's journal `{}` cannot be used: {reason} (hint: move it away to start the \
         store's records afresh; its blobs stay)",
        path.display()
    )]
    JournalDamaged { path: PathBuf, reason: String },

    /// An earlier write of this process reached the journal and not sled, or could not be
    /// cut off after failing.
    #[error(
        "an earlier write to the store's metadata failed part-way, so this process writes no \
         more (`{}`) (hint: run the command again: opening the store finishes that write)",
        path.display()
    )]
    JournalPoisoned { path: PathBuf },

    /// sled's last sync, as the store was closed, failed (`sled_db.rs`); what sled said.
    #[error(
        "the store's metadata database `{}` failed as it was closed (sled: {what}) (hint: run \
         `needle verify`: the next command finishes what the store's journal holds)",
        path.display()
    )]
    CloseFailed { path: PathBuf, what: String },

    /// `needle verify --rebuild` on a store that has no journal.
    #[error(
        "the store `{}` has no journal to rebuild its metadata from: {why}",
        root.display()
    )]
    NoJournal { root: PathBuf, why: String },

    /// `NEEDLE_TEST_FAULT` (a test's fault plan, `faults.rs`) in a form it does not take.
    #[error(
        "NEEDLE_TEST_FAULT=`{spec}` cannot be read: expected trace:PATH, abort@N, abort@NAME, \
         eio@N or enospc@N, or one of the others and a trace, joined by a comma"
    )]
    BadFaultPlan { spec: String },

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
    #[error("the manifest of artifact `{artifact}` is invalid: {problem}")]
    BadManifest {
        artifact: String,
        problem: ManifestProblem,
    },

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

    #[error(
        "artifact `{artifact}` was dropped from the store: {reason} (the next run makes it \
         again)"
    )]
    Dropped { artifact: String, reason: String },

    /// The store's filesystem is full (or the user's quota is spent); nothing was recorded.
    #[error("no space left on device: free space on `{mount}` (the store's filesystem; {} free)", human_bytes(*free))]
    NoSpace {
        mount: PathBuf,
        free: u64,
        #[source]
        source: Option<std::io::Error>,
    },
}

/// What to do with a store of another format. `found` is what `FORMAT` says.
fn format_message(root: &std::path::Path, found: &str, expected: &str) -> String {
    let root = root.display();
    let version = |s: &str| {
        s.strip_prefix("needle-store ")
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (version(found), version(expected)) {
        (Some(theirs), Some(ours)) if theirs > ours => format!(
            "`{root}` was written by a newer needle (store format {theirs}; this needle reads \
             format {ours}): use that needle, or `needle export` the artifacts you need with it"
        ),
        (Some(theirs), Some(ours)) => format!(
            "`{root}` was written by an older needle (store format {theirs}; this needle reads \
             format {ours}, and cannot convert it): use that needle, or `needle export` the \
             artifacts you need with it"
        ),
        _ => format!(
            "`{root}/FORMAT` says `{found}`, which is no needle store format (this needle \
             reads `{expected}`): is `{root}` a needle store? (hint: pass --store with a new or \
             empty directory)"
        ),
    }
}

/// `512 B`, `12.0 KiB`, `3.4 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
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
                source: copy_io(source),
            },
            StoreError::NoSpace {
                mount,
                free,
                source,
            } => StoreError::NoSpace {
                mount: mount.clone(),
                free: *free,
                source: source.as_ref().map(copy_io),
            },
            other => StoreError::corrupt(other.to_string()),
        }
    }

    /// Whether this failure is the filesystem running out of space (or of the user's quota),
    /// whether the store's own writes or sled's met it.
    pub fn is_no_space(&self) -> bool {
        let full = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        };
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Io { source, .. } => full(source),
            StoreError::Db(sled::Error::Io(e)) => full(e),
            _ => false,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            what: what.into(),
            source: None,
        }
    }
}

/// The same error again, with its `errno` where it has one.
fn copy_io(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}
