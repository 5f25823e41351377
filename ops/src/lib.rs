//! needle's ops: the catalog of op schemas the recipe validator reads, and the built-in ops
//! that `needle worker` runs. `exec` is described here but executed by the runner directly,
//! since it is the user's own command.

pub mod context;
pub mod dataset;
pub mod detect;
pub mod errors;
pub mod files;
pub mod haystack;
pub mod ingest;
pub mod op;
pub mod torch;

use needle_core::ops::{OpCatalog, OpSchema, exec_schema};

pub use context::{Input, OpContext};
pub use errors::OpError;
pub use op::Op;

/// Every op needle knows.
pub struct Registry {
    schemas: Vec<OpSchema>,
    builtins: Vec<Box<dyn Op>>,
}

impl Registry {
    pub fn new() -> Registry {
        let builtins: Vec<Box<dyn Op>> = vec![
            Box::new(files::Files),
            Box::new(haystack::Haystack),
            Box::new(ingest::Ingest),
        ];
        let mut schemas = vec![exec_schema()];
        schemas.extend(builtins.iter().map(|op| op.schema()));
        Registry { schemas, builtins }
    }

    /// The built-in op called `name`.
    pub fn builtin(&self, name: &str) -> Option<&dyn Op> {
        self.builtins
            .iter()
            .find(|op| op.schema().name == name)
            .map(|op| op.as_ref())
    }
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
