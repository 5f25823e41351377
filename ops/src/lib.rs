//! needle's ops: the catalog of op schemas the recipe validator reads, and the built-in ops
//! that `needle worker` runs. `exec` is described here but executed by the runner directly,
//! since it is the user's own command.

use needle_core::ops::{OpCatalog, OpSchema, exec_schema};

/// Every op needle knows.
pub struct Registry {
    ops: Vec<OpSchema>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            ops: vec![exec_schema()],
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl OpCatalog for Registry {
    fn get(&self, name: &str) -> Option<&OpSchema> {
        self.ops.iter().find(|op| op.name == name)
    }

    fn all(&self) -> Vec<&OpSchema> {
        self.ops.iter().collect()
    }
}
