//! needle's ops: the catalog of every op's schema (what the recipe validator and the planner
//! read), the context a built-in op runs in, image datasets, and the ops that need no torch
//! (`files`, `haystack`, `ingest`). The ops built on tch live in `needle-models`, which also
//! holds `needle-worker`, the one binary that loads libtorch; their schemas are here so that
//! `needle` itself never links it. `exec` is described here but run by the runner directly.

#![forbid(unsafe_code)]

pub mod context;
pub mod dataset;
pub mod detect;
pub mod errors;
pub mod files;
pub mod haystack;
pub mod ingest;
pub mod op;
pub mod schemas;
pub mod search;

use needle_core::ops::{OpCatalog, OpSchema, exec_schema};

pub use context::{Input, OpContext, Progress};

/// An op may write a short Markdown summary of its output under this name; `needle show`
/// prints it (the funnel table of `filter`, a scorer's validation metrics…).
pub const SUMMARY: &str = "summary.md";
pub use errors::OpError;
pub use op::Op;

/// The schemas of every op needle knows: what the validator and the planner read.
///
/// Built by calling each op's `schema` directly, never through `dyn Op`, so that a binary using
/// only the catalog (the `needle` orchestrator) references no op body and links no libtorch:
/// loading it costs half a second a process.
pub struct Registry {
    schemas: Vec<OpSchema>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            schemas: vec![
                exec_schema(),
                files::Files.schema(),
                haystack::Haystack.schema(),
                ingest::Ingest.schema(),
                schemas::scorer(),
                schemas::filter(),
                schemas::judges(),
                schemas::evaluate(),
                schemas::pretrain(),
                schemas::quality_tune(),
                schemas::sample(),
            ],
        }
    }
}

/// The built-in op called `name` among those that need no torch (`needle_models::builtin`
/// knows them all).
pub fn builtin(name: &str) -> Option<Box<dyn Op>> {
    let ops: Vec<Box<dyn Op>> = vec![
        Box::new(files::Files),
        Box::new(haystack::Haystack),
        Box::new(ingest::Ingest),
        Box::new(search::SearchRung),
    ];
    ops.into_iter().find(|op| op.schema().name == name)
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl OpCatalog for Registry {
    fn get(&self, name: &str) -> Option<&OpSchema> {
        self.schemas.iter().find(|op| op.name == name)
    }

    fn all(&self) -> Vec<&OpSchema> {
        self.schemas.iter().collect()
    }
}
