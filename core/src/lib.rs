//! needle's core: recipes (parse, validate, expand sweeps), plans (the DAG of unique steps and
//! their content keys), the content-addressed store, and lineage queries.
//!
//! This crate knows nothing of tch, tokio or processes: it is the data model and its rules.

// Its system calls go through rustix.
#![forbid(unsafe_code)]

pub mod canonical;
pub mod digest;
pub mod error_chain;
pub mod lineage;
pub mod ops;
pub mod plan;
pub mod recipe;
pub mod search;
pub mod store;
pub mod value;
pub mod why;

pub use digest::{ArtifactDigest, BlobDigest, Digest, StepId, StepKey};

#[cfg(test)]
mod testutil {
    /// A FIFO at `path`: a file kind the store and `code` directories refuse.
    pub fn mkfifo(path: &std::path::Path) {
        use rustix::fs::{CWD, FileType, Mode};
        rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
    }
}
