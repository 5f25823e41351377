//! The shape every built-in op has.

use needle_core::ops::OpSchema;

use crate::context::OpContext;
use crate::errors::OpError;

/// A built-in op: a schema the recipe validator checks params and inputs against, and a
/// body that `needle-worker` runs in the step's own process.
///
/// Contract: `run` reads only its inputs and params (and `path` params' files), writes only
/// under `ctx.out`, and is deterministic for a given context (`ctx.seed` seeds every random
/// choice), so that equal keys mean equal outputs. Bump the schema's `version` whenever the
/// output for the same params and inputs may change.
pub trait Op: Sync + Send {
    fn schema(&self) -> OpSchema;
    fn run(&self, ctx: &OpContext) -> Result<(), OpError>;
}
