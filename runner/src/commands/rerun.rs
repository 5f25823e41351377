//! `needle rerun RUN`: the recorded recipe text and `--set` values, against the code files as
//! they are now. What succeeded before is cached; what failed or never ran executes.

use needle_core::plan;
use needle_core::recipe::SetArg;
use needle_ops::Registry;

use crate::cli::{Cli, RerunArgs};
use crate::commands::run::{RunRequest, engine_options, recorded_source, run_or_join};
use crate::commands::{PlannedCode, find_run, load_recipe, open_reader};
use crate::error::{CliError, Exit};

pub fn rerun(cli: &Cli, args: &RerunArgs) -> Result<Exit, CliError> {
    // Read through the runner when one holds the store: the rerun then joins it.
    let record = find_run(&open_reader(cli)?, &args.run)?;
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
    let remote = crate::remote::Remote::from_args(&args.exec.remote, args.exec.config.as_deref())?;
    let request = RunRequest {
        sets: &sets,
        rerun_of: Some(record.id),
        json: args.exec.json,
        remote,
    };
    run_or_join(cli, plan, code, opts, request)
}
