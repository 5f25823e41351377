//! The command line, as clap sees it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use needle_core::recipe::SetArg;

use crate::gpus::GpuSpec;

#[derive(Debug, Parser)]
#[command(
    name = "needle",
    version,
    about = "Declarative experiment orchestration for image-generation research",
    long_about = "needle runs TOML recipes: DAGs of steps with sweeps over their parameters. \
                  Every step gets a content address; what the store already holds is skipped.\n\n\
                  Exit codes: 0 all steps succeeded; 1 some step failed; 2 bad invocation or \
                  recipe; 3 the store is unavailable (in use, missing or unreadable); \
                  130 interrupted."
)]
pub struct Cli {
    /// The store directory.
    #[arg(long, global = true, env = "NEEDLE_STORE", default_value = ".needle")]
    pub store: PathBuf,

    /// Wait for another needle process holding the store instead of failing.
    #[arg(long, global = true)]
    pub wait: bool,

    /// More logging on stderr (-v: debug, -vv: trace). NEEDLE_LOG=filter overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a recipe: execute what the store does not hold yet.
    Run(RunArgs),
    /// Show what a run would do: unique steps, what is cached, what would run.
    Plan(PlanArgs),
    /// List recorded runs.
    Runs(JsonArg),
    /// Show the steps of one run and how each ended.
    Status(StatusArgs),
    /// Run a recorded run's recipe again, as it was recorded (text and --set values).
    Rerun(RerunArgs),
    /// Show the ancestry (or, with --down, the descendants) of a step or artifact.
    Lineage(LineageArgs),
    /// Show one step or artifact: op, params, inputs, output, timings, attempts.
    Show(ShowArgs),
    /// A run's result table: one row per step instance with a metrics.json (every evaluation).
    Results(ResultsArgs),
    /// One self-contained HTML report of a run: timeline, results and plots, summaries, grids.
    Report(ReportArgs),
    /// Two artifacts' ancestries side by side: only the steps and params that differ.
    Diff(DiffArgs),
    /// Copy an artifact out of the store as plain files into a new or empty directory.
    Export(ExportArgs),
    /// Why a step ran: what in its key differs from the closest earlier step of its name.
    #[command(alias = "explain")]
    Why(WhyArgs),
    /// Print the log of a step's attempt.
    Logs(LogsArgs),
    /// List the ops recipes can use, with their params and defaults.
    Ops(JsonArg),
    /// Print shell completions.
    Completions(CompletionsArgs),
    /// Check the store's records against its bytes: manifests, blobs, keys, indices, runs.
    Verify(VerifyArgs),
    /// Remove what no kept run or pin reaches; say what it freed.
    Gc(GcArgs),
    /// Keep an artifact and its lineage through every gc; with no REF, list the pins.
    Pin(PinArgs),
    /// Let gc remove a pinned artifact again (when no kept run reaches it).
    Unpin(UnpinArgs),
    /// Check the installation: libtorch, CUDA and GPUs, CPUs, and the store.
    Doctor(JsonArg),
    /// Upload steps to the shared cache: a run's (default: the last), or one step or
    /// artifact with every step upstream of it.
    Push(PushArgs),
    /// Download steps from the shared cache: a step (key prefix) and what it needs, or every
    /// step of a recipe's plan that the cache holds.
    Pull(PullArgs),
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// A run (`last`, `3`), or a step or artifact reference (`run:step`, a digest prefix).
    pub reference: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// The shared cache, `s3://bucket/prefix` (default: `$NEEDLE_REMOTE`, else needle.toml's).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// A step key prefix as the cache lists it, or a recipe file.
    pub reference: String,
    #[arg(long = "set", value_name = "VAR=VALUE")]
    pub sets: Vec<SetArg>,
    #[arg(long)]
    pub json: bool,
    /// The shared cache, `s3://bucket/prefix` (default: `$NEEDLE_REMOTE`, else needle.toml's).
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

#[derive(Debug, Args)]
pub struct JsonArg {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file (TOML).
    pub recipe: PathBuf,

    /// Override a var (`lr=0.01`), or pin a swept one to one value.
    #[arg(long = "set", value_name = "VAR=VALUE")]
    pub sets: Vec<SetArg>,
}

#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// GPUs to schedule onto: auto, none, a count (`4`: ids 0-3), or devices (`0,2`,
    /// `GPU-<uuid>`, `MIG-<uuid>`).
    #[arg(long, default_value = "auto")]
    pub gpus: GpuSpec,

    /// Memory of each GPU, in GB, for packing steps by `gpu_mem_gb` (default: what
    /// nvidia-smi says of real GPUs; fake ids have none).
    #[arg(long, value_name = "GB", value_parser = parse_gpu_mem)]
    pub gpu_mem: Option<f64>,

    /// Run the GPU steps as clients of a CUDA MPS server that needle starts for the run
    /// (`nvidia-cuda-mps-control`), so steps sharing a GPU run their kernels side by side.
    #[arg(long)]
    pub mps: bool,

    /// CPU slots (default: the number of CPUs).
    #[arg(short = 'j', long)]
    pub jobs: Option<u32>,

    /// Re-execute every instance of this step even if cached (repeatable).
    #[arg(long, value_name = "STEP")]
    pub force: Vec<String>,

    /// Machine-readable summary on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// When runs share a runner (a run started while another holds the store joins it):
    /// higher starts its steps first; equal, the earlier run (default 0).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,

    /// The most GPUs this run's steps hold at once, whole GPUs and shares added up (`1.5`),
    /// so that the rest stays free for other runs sharing the runner.
    #[arg(long, value_name = "N", value_parser = parse_max_gpus)]
    pub max_gpus: Option<f64>,

    /// Where steps run: child processes here, or Slurm batch jobs (default: the config
    /// file's `[executor] kind`, else local).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorKind>,

    /// Config file with an `[executor]` table (default: $NEEDLE_CONFIG, else ./needle.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub remote: RemoteArgs,

    /// Slurm partition (`sbatch --partition`).
    #[arg(long, help_heading = "Slurm")]
    pub partition: Option<String>,

    /// Slurm account (`sbatch --account`).
    #[arg(long, help_heading = "Slurm")]
    pub account: Option<String>,

    /// Most Slurm jobs in flight at once; the other ready steps wait in needle (default 100).
    #[arg(long, help_heading = "Slurm")]
    pub max_jobs: Option<u32>,

    /// How often to ask Slurm about the jobs (default 2s).
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Slurm")]
    pub poll: Option<std::time::Duration>,

    /// An extra argument for every sbatch (repeatable): `--sbatch-arg=--qos=high`.
    #[arg(
        long = "sbatch-arg",
        value_name = "ARG",
        allow_hyphen_values = true,
        help_heading = "Slurm"
    )]
    pub sbatch_args: Vec<String>,
}

/// Which shared cache a command uses (`remote/`).
#[derive(Debug, Clone, Default, Args)]
pub struct RemoteArgs {
    /// The shared cache, `s3://bucket/prefix` (default: `$NEEDLE_REMOTE`, else `url` in the
    /// [remote] table of needle.toml).
    #[arg(long, value_name = "URL", help_heading = "Shared cache")]
    pub remote: Option<String>,

    /// Use no shared cache, whatever needle.toml says.
    #[arg(long, conflicts_with = "remote", help_heading = "Shared cache")]
    pub no_remote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Local,
    Slurm,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,

    /// GPUs the run would have (for the resource check and the packing shown).
    #[arg(long, default_value = "auto")]
    pub gpus: GpuSpec,

    /// Memory of each GPU, in GB (as `needle run --gpu-mem`).
    #[arg(long, value_name = "GB", value_parser = parse_gpu_mem)]
    pub gpu_mem: Option<f64>,

    /// List every unique step, not one line per recipe step.
    #[arg(long)]
    pub steps: bool,

    /// Say, for each step that will run, what differs from the closest stored step of its name.
    #[arg(long)]
    pub why: bool,

    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Also re-hash every blob (reads every byte of the store).
    #[arg(long)]
    pub hash: bool,
    /// Drop what is damaged (implies --hash): damaged blobs, the artifacts using them, the
    /// steps that produced those (the next run executes them again).
    #[arg(long)]
    pub repair: bool,
    /// Rebuild the store's metadata (`meta/`) from its journal, when it is lost, emptied or
    /// unreadable; the old `meta/` is kept as `meta.broken-<time>/`. The result is verified
    /// (with --hash, every blob re-hashed).
    #[arg(long, conflicts_with = "repair")]
    pub rebuild: bool,
    /// Check the shared cache instead of the store: every record, manifest and blob size
    /// (with --hash, every blob's bytes too). URL: which (default: `$NEEDLE_REMOTE`, else
    /// needle.toml's).
    #[arg(long, value_name = "URL", num_args = 0..=1, conflicts_with_all = ["repair", "rebuild"])]
    pub remote: Option<Option<String>>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep only the N most recent runs (and what they and the pins reach); default: every run.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<usize>,
    /// Say what would be freed; remove nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Collect the shared cache instead of the store: delete broken records, and blobs and
    /// manifests no record needs that are older than --grace. URL: which (default:
    /// `$NEEDLE_REMOTE`, else needle.toml's).
    #[arg(long, value_name = "URL", num_args = 0..=1, conflicts_with = "keep_last")]
    pub remote: Option<Option<String>>,
    /// With --remote: how old an unneeded object must be to go (a push under way writes its
    /// blobs before its record).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h", requires = "remote")]
    pub grace: std::time::Duration,
    /// With --remote: also download and hash every blob, and delete the damaged ones with the
    /// records that need them.
    #[arg(long, requires = "remote")]
    pub hash: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// A step key or artifact digest prefix, or RUN:STEP: the artifact, or the step's output.
    pub reference: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UnpinArgs {
    /// A pinned artifact: a digest prefix, a step key prefix or RUN:STEP.
    pub reference: String,
}

#[derive(Debug, Args)]
pub struct ResultsArgs {
    /// Run id, or `last`.
    pub run: String,
    /// Only this recipe step's rows.
    #[arg(long)]
    pub step: Option<String>,
    /// Comma-separated values.
    #[arg(long, conflicts_with = "json")]
    pub csv: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run id, or `last`.
    pub run: String,
    /// Where to write the HTML (default: report-RUN.html).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// A step key or artifact digest prefix, or RUN:STEP.
    pub a: String,
    /// The other one.
    pub b: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A step key or artifact digest prefix, or RUN:STEP: the artifact, or the step's output.
    pub reference: String,
    /// Where to write (created; must be empty if it exists).
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct WhyArgs {
    /// A step key or artifact digest prefix, or RUN:STEP (`last:train[lr=0.1]`).
    pub reference: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Run id, or `last`.
    pub run: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RerunArgs {
    /// Run id, or `last`.
    pub run: String,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LineageFormat {
    Tree,
    Dot,
    Mermaid,
    Json,
}

#[derive(Debug, Args)]
pub struct LineageArgs {
    /// A step key or artifact digest prefix, or RUN:STEP (RUN:STEP[var=value,…] in a sweep).
    pub reference: String,

    /// Descendants instead of ancestors.
    #[arg(long)]
    pub down: bool,

    #[arg(long, value_enum, default_value = "tree")]
    pub format: LineageFormat,

    /// Same as --format json.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A step key or artifact digest prefix, or RUN:STEP (RUN:STEP[var=value,…] in a sweep).
    pub reference: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A step key prefix, or RUN:STEP (RUN:STEP[var=value,…] in a sweep).
    pub reference: String,

    /// Which attempt (default: the last).
    #[arg(long)]
    pub attempt: Option<u32>,

    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<usize>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

/// `--gpu-mem`: a positive number of GB.
fn parse_max_gpus(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n),
        _ => Err(format!(
            "`{s}` is not a number of GPUs above 0 (`2`, or `0.5` for half of one)"
        )),
    }
}

fn parse_gpu_mem(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(gb) if gb.is_finite() && gb > 0.0 => Ok(gb),
        _ => Err(format!(
            "`{s}` is not a GPU memory size (expected a positive number of GB, like 80)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// clap's own checks of the definitions (ids, conflicts, requirements), which it runs in
    /// debug builds only: the release test builds run them here.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn remote_flags_parse_where_they_belong() {
        let cli = Cli::try_parse_from(["needle", "verify", "--remote", "--hash"]).unwrap();
        let Command::Verify(v) = cli.command else {
            panic!("verify")
        };
        assert_eq!((v.remote, v.hash), (Some(None), true));
        let cli = Cli::try_parse_from(["needle", "gc", "--remote", "s3://b/p", "-n"]).unwrap();
        let Command::Gc(g) = cli.command else {
            panic!("gc")
        };
        assert_eq!(g.remote, Some(Some("s3://b/p".to_string())));
        assert!(Cli::try_parse_from(["needle", "gc", "--grace", "1s"]).is_err());
        assert!(
            Cli::try_parse_from([
                "needle",
                "run",
                "r.toml",
                "--remote",
                "s3://b",
                "--no-remote"
            ])
            .is_err()
        );
    }
}
