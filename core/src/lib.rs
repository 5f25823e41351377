//! needle's core: recipes (parse, validate, expand sweeps), plans (the DAG of unique steps and
//! their content keys), the content-addressed store, and lineage queries.
//!
//! This crate knows nothing of tch, tokio or processes: it is the data model and its rules.

pub mod canonical;
pub mod digest;
pub mod lineage;
pub mod ops;
pub mod plan;
pub mod recipe;
pub mod store;
pub mod value;
pub mod why;

pub use digest::{ArtifactDigest, BlobDigest, Digest, StepId, StepKey};
