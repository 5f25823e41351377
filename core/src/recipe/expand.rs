use super::*;
use crate::ops::OpCatalog;

pub fn expand(_recipe: &Recipe, _catalog: &dyn OpCatalog) -> Result<Expansion, RecipeErrors> {
    todo!("sweep expansion")
}
