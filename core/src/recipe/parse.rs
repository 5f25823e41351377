use super::*;
use crate::ops::OpCatalog;

pub fn parse(
    _source: RecipeSource,
    _sets: &[SetArg],
    _catalog: &dyn OpCatalog,
) -> Result<Recipe, RecipeErrors> {
    todo!("recipe parsing")
}

pub(crate) fn value_from_cli(raw: &str) -> Value {
    Value::String(raw.to_string())
}
