//! `needle report RUN -o report.html`: see [`crate::report`].

use crate::cli::{Cli, ReportArgs};
use crate::commands::{find_run, open_reader};
use crate::error::{CliError, Exit};

pub fn report(cli: &Cli, args: &ReportArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let run = find_run(&store, &args.run)?;
    let html = crate::report::build(&store, &run)?;
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(format!("report-{}.html", run.id)));
    std::fs::write(&out, html).map_err(|source| CliError::Io {
        context: format!("could not write `{}`", out.display()),
        source,
    })?;
    eprintln!(
        "wrote {} (run {}, {})",
        out.display(),
        run.id,
        run.recipe_name
    );
    Ok(Exit::Success)
}
