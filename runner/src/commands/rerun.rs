//! `needle rerun RUN`: the recorded recipe text and `--set` values, against the code files as
//! they are now. What succeeded before is cached; what failed or never ran executes.

use needle_core::plan;
use needle_core::recipe::SetArg;
use needle_ops::Registry;

use crate::cli::{Cli, RerunArgs};
use crate::commands::run::{engine_options, execute, recorded_source};
use crate::commands::{PlannedCode, find_run, load_recipe, open_existing};
use crate::error::{CliError, Exit};

pub fn rerun(cli: &Cli, args: &RerunArgs) -> Result<Exit, CliError> {
    let store = open_existing(cli)?;
    let record = find_run(&store, &args.run)?;
    let sets: Vec<SetArg> = record
        .sets
        .iter()
        .map(|(var, value)| SetArg {
            var: var.clone(),
            value: value.clone(),
        })
        .collect();
    let registry = Registry::new();
    let (recipe, expansion) = load_recipe(recorded_source(&record), &sets, &registry)?;
    let opts = engine_options(&args.exec, &recipe)?;
    let mut code = PlannedCode::default();
    let plan = plan::build(recipe, expansion, &mut code)?;
    code.keep_in(&store)?;
    let remote = crate::remote::Remote::from_args(&args.exec.remote, args.exec.config.as_deref())?;
    execute(
        store,
        plan,
        &sets,
        opts,
        Some(record.id),
        args.exec.json,
        remote,
    )
}
