//! Recipes: a TOML file describing a DAG of steps and sweeps over their parameters.
//!
//! Life of a recipe:
//! ```text
//! text ──parse+validate──▶ Recipe ──expand(sweep)──▶ Expansion (arms × step instances)
//! ```
//! Every error of a file is collected before reporting ([`RecipeErrors`]), each pointing at the
//! offending TOML with a label. Nothing here touches the store.

mod code;
mod errors;
mod expand;
mod parse;
mod sample;
mod template;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

pub use code::{CodeError, code_files};
pub use errors::{MAX_SHOWN, RecipeDiagnostic, RecipeErrors};
pub use expand::expand;
pub use parse::parse;
pub use template::{VarRef, render_template, template_vars};

use crate::ops::OpKind;
use crate::value::Value;

/// Hard limits that keep a typo in a sweep from exhausting memory and time. Planning costs
/// some 25 µs and 1.5 KB per step instance, so the instance limit keeps the worst plan to a
/// few seconds; a sweep past either limit is refused before any instance is built.
pub const MAX_ARMS: usize = 100_000;
pub const MAX_INSTANCES: usize = 200_000;

/// The recipe's text and where it came from.
#[derive(Debug, Clone)]
pub struct RecipeSource {
    /// The path as the user gave it; shown in diagnostics (`recipes/demo.toml:12:5`).
    pub path: PathBuf,
    /// Absolute directory against which `code` files are resolved.
    pub dir: PathBuf,
    pub text: String,
}

/// The largest recipe file needle reads: far more than any written or generated sweep needs,
/// and small enough that a wrong path (a dataset, `/dev/zero`) is refused at once instead of
/// filling memory.
pub const MAX_RECIPE_BYTES: usize = 16 << 20;

impl RecipeSource {
    /// The source of a file read as bytes: refused when it is larger than
    /// [`MAX_RECIPE_BYTES`] or not UTF-8 (pointing at the first byte that is not).
    pub fn from_bytes(path: PathBuf, dir: PathBuf, bytes: Vec<u8>) -> Result<Self, RecipeErrors> {
        if bytes.len() > MAX_RECIPE_BYTES {
            let source = RecipeSource {
                path,
                dir,
                text: String::new(),
            };
            let d = RecipeDiagnostic::whole(format!(
                "recipe is larger than the limit of {} MiB",
                MAX_RECIPE_BYTES >> 20
            ))
            .with_help(
                "a recipe describes steps and sweeps; keep data in files that its steps read",
            );
            return Err(RecipeErrors::new(&source, vec![d]));
        }
        match String::from_utf8(bytes) {
            Ok(text) => Ok(RecipeSource { path, dir, text }),
            Err(e) => {
                let bytes = e.as_bytes();
                let at = e.utf8_error().valid_up_to();
                let help = if bytes.starts_with(&[0xff, 0xfe]) || bytes.starts_with(&[0xfe, 0xff]) {
                    "the file starts with a UTF-16 byte-order mark: save it as UTF-8"
                } else {
                    "recipes are UTF-8 text: save the file as UTF-8"
                };
                let d = RecipeDiagnostic::at(
                    at..at + char::REPLACEMENT_CHARACTER.len_utf8(),
                    format!(
                        "recipe is not UTF-8: byte `0x{:02x}` starts no character",
                        bytes[at]
                    ),
                )
                .with_help(help);
                // The snippet shows the bytes up to the bad one as they are; it is the same
                // text up to there, so the line and column are right.
                let source = RecipeSource {
                    path,
                    dir,
                    text: String::from_utf8_lossy(bytes).into_owned(),
                };
                Err(RecipeErrors::new(&source, vec![d]))
            }
        }
    }
}

/// A `--set var=value` from the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct SetArg {
    pub var: String,
    pub value: Value,
}

impl std::str::FromStr for SetArg {
    type Err = String;

    /// `k=v` where `v` is read as a TOML value (`3`, `0.5`, `true`, `"x"`, `[1, 2]`) and, when
    /// it is not one, as a bare string (`arch=pixel-diffusion`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (var, raw) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not of the form var=value"))?;
        let var = var.trim();
        if var.is_empty() {
            return Err(format!("`{s}` has an empty variable name"));
        }
        Ok(SetArg {
            var: var.to_string(),
            value: parse::value_from_cli(raw.trim()),
        })
    }
}

/// A parsed and validated recipe (before sweep expansion).
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub description: Option<String>,
    pub source: RecipeSource,
    /// Defaults from `[vars]`, with `--set` applied. Every swept var has one: its `[vars]`
    /// value, else the first value of its sweep list (what an `include` arm that leaves it out
    /// takes).
    pub vars: BTreeMap<String, Value>,
    pub sweep: Sweep,
    /// In the order the file declares them; with a `[search]`, its step ([`SEARCH_STEP`])
    /// comes last.
    pub steps: Vec<StepDef>,
    /// `[search]`: successive halving over the sweep's arms.
    pub search: Option<Search>,
}

/// Successive halving (`[search]`): the budget var is swept over `rungs` like an axis, and at
/// each rung a step named [`SEARCH_STEP`] ranks the live arms by `metric`; only the kept arms'
/// steps of the next rung run (the others are stopped), and the `continue` step of a kept arm
/// reads its own output of the previous rung as its input [`CONTINUE_INPUT`].
///
/// [`SEARCH_STEP`]: crate::ops::SEARCH_STEP
/// [`CONTINUE_INPUT`]: crate::ops::CONTINUE_INPUT
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    /// The var that sets each rung's budget (a training step's `steps`, say).
    pub budget: String,
    /// Its value at each rung, increasing.
    pub rungs: Vec<Value>,
    /// The step whose `metrics.json` ranks the arms, and the field (dots reach into objects).
    pub metric_step: String,
    pub metric_field: String,
    /// Whether higher is better.
    pub maximize: bool,
    /// The share of the live arms kept at each rung: `ceil(n × keep)`, at least one.
    pub keep: f64,
    /// The step that continues from its previous rung's output, if any.
    pub continue_step: Option<String>,
    /// Byte range of the `[search]` table, and of its `continue` and `metric` values.
    pub span: Range<usize>,
    pub continue_span: Option<Range<usize>>,
    pub metric_span: Range<usize>,
}

impl Search {
    /// The rung a budget value belongs to.
    pub fn rung_of(&self, budget: &Value) -> Option<usize> {
        let key = crate::canonical::to_string(budget);
        (self.rungs.iter()).position(|r| crate::canonical::to_string(r) == key)
    }

    /// What identifies an arm across rungs: its bindings without the budget, canonically
    /// encoded.
    pub fn arm_key(&self, bindings: &BTreeMap<String, Value>) -> String {
        let mut b = bindings.clone();
        b.remove(&self.budget);
        crate::canonical::to_string(&serde_json::json!(b))
    }

    /// How many of `n` live arms a rung keeps.
    pub fn kept_of(&self, n: usize) -> usize {
        keep_count(n, self.keep)
    }
}

/// How many of `n` arms a share `keep` keeps: `ceil(n × keep)`, at least one; a hair of
/// tolerance so that `keep = 0.3333` of 27 keeps 9.
pub fn keep_count(n: usize, keep: f64) -> usize {
    if n == 0 {
        return 0;
    }
    (((n as f64) * keep - 1e-3).ceil() as usize).clamp(1, n)
}

/// The sweep: the cartesian product of its axes, minus `exclude`, plus `include`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sweep {
    pub axes: Vec<Axis>,
    /// An arm matching every binding of one of these is dropped.
    pub exclude: Vec<BTreeMap<String, Value>>,
    /// Extra arms; swept vars they leave out take their default.
    pub include: Vec<BTreeMap<String, Value>>,
}

/// One dimension of the product: a single var (`lr = [1e-3, 1e-4]`), several vars zipped
/// together (`[[sweep.zip]]`), whose lists advance in step, or the `n` draws of a sampled
/// table (`[sweep.random]`, `[sweep.sobol]`), made when the recipe is parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub vars: Vec<String>,
    /// `rows[i][j]` is the value of `vars[j]` in the i-th position of this axis.
    pub rows: Vec<Vec<Value>>,
}

impl Sweep {
    /// Every var the sweep binds, sorted.
    pub fn vars(&self) -> BTreeSet<String> {
        let mut vars: BTreeSet<String> = self
            .axes
            .iter()
            .flat_map(|a| a.vars.iter().cloned())
            .collect();
        for inc in &self.include {
            vars.extend(inc.keys().cloned());
        }
        vars
    }
}

#[derive(Debug, Clone)]
pub struct StepDef {
    pub name: String,
    pub op: String,
    pub op_version: u32,
    /// How the op runs: the user's command, or `needle-worker OP`.
    pub kind: OpKind,
    /// Params the op types as `path`: the planner fingerprints what they point at.
    pub path_params: Vec<String>,
    /// Input name → upstream step.
    pub inputs: BTreeMap<String, InputRef>,
    /// Param templates: strings may hold `${var}`. Defaults of the op are filled in.
    pub params: BTreeMap<String, Value>,
    /// `exec` only: the argv templates.
    pub cmd: Option<Vec<Value>>,
    /// `exec` only: paths relative to the recipe's directory (files or directories) whose
    /// content enters the key. Validated: relative, inside the recipe directory, existing.
    pub code: Vec<String>,
    /// Commands (argv, split at whitespace, no shell) whose output enters the key: what the
    /// step's results depend on outside its code and inputs (`python3 -V`, `pip freeze`).
    pub environment: Vec<String>,
    pub resources: Resources,
    pub retries: RetryPolicy,
    pub timeout: Option<Duration>,
    /// Vars referenced by this step's params and cmd (not through its inputs).
    pub vars_used: BTreeSet<String>,
    /// Byte range of the step's header or table in the source, for later diagnostics.
    pub span: Range<usize>,
    /// Byte range of each param's value, for type errors found at expansion.
    pub param_spans: BTreeMap<String, Range<usize>>,
    /// Byte range of each `resources` value, for errors found against the run's machine
    /// (`gpu_mem_gb` above every GPU's memory).
    pub resource_spans: BTreeMap<String, Range<usize>>,
}

/// `inputs = { data = "haystack" }` reads the single matching instance of `haystack`;
/// `inputs = { all = "evaluate[*]" }` gathers every instance of `evaluate` that agrees with
/// this step on the vars this step depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    pub step: String,
    pub gather: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resources {
    pub gpus: GpuRequest,
    pub cpus: u32,
    pub mem_gb: f64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            gpus: GpuRequest::None,
            cpus: 1,
            mem_gb: 0.0,
        }
    }
}

/// What a step asks of the GPUs: `resources.gpus` and `resources.gpu_mem_gb`.
///
/// Whole GPUs are held alone. Part of a GPU never spans two: it is a share of one GPU's
/// compute (`gpus = 0.25`: up to four such steps at once), an amount of its memory
/// (`gpu_mem_gb = 6`, packed against the GPU's capacity), or both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuRequest {
    /// No GPU (`gpus = 0`, or nothing said).
    None,
    /// `gpus = N` (N ≥ 1), each GPU with at least `mem_gb` of memory when that is given.
    Whole { count: u32, mem_gb: Option<f64> },
    /// Part of one GPU. At least one of the two is given; `share` is in (0, 1).
    Part {
        share: Option<f64>,
        mem_gb: Option<f64>,
    },
}

impl GpuRequest {
    pub fn is_none(&self) -> bool {
        matches!(self, GpuRequest::None)
    }

    /// GPUs this step holds alone (0 for part of one).
    pub fn whole(&self) -> u32 {
        match self {
            GpuRequest::Whole { count, .. } => *count,
            _ => 0,
        }
    }

    /// The GPU memory it asks for, per GPU.
    pub fn mem_gb(&self) -> Option<f64> {
        match self {
            GpuRequest::None => None,
            GpuRequest::Whole { mem_gb, .. } | GpuRequest::Part { mem_gb, .. } => *mem_gb,
        }
    }

    /// How many GPUs it runs on: a part runs on one.
    pub fn devices(&self) -> u32 {
        match self {
            GpuRequest::None => 0,
            GpuRequest::Whole { count, .. } => *count,
            GpuRequest::Part { .. } => 1,
        }
    }

    /// As a recipe would write it: `-`, `2`, `0.25`, `0.25, 6 GB`, `6 GB`, `1, ≥ 40 GB`.
    pub fn label(&self) -> String {
        // f64's Display is the shortest form that reads back: `6`, `0.25`.
        let gb = |g: f64| format!("{g} GB");
        match *self {
            GpuRequest::None => "-".into(),
            GpuRequest::Whole {
                count,
                mem_gb: None,
            } => count.to_string(),
            GpuRequest::Whole {
                count,
                mem_gb: Some(m),
            } => format!("{count} (≥ {} each)", gb(m)),
            GpuRequest::Part {
                share: Some(s),
                mem_gb: None,
            } => format!("{s}"),
            GpuRequest::Part {
                share: None,
                mem_gb: Some(m),
            } => gb(m),
            GpuRequest::Part {
                share: Some(s),
                mem_gb: Some(m),
            } => format!("{s}, {}", gb(m)),
            GpuRequest::Part {
                share: None,
                mem_gb: None,
            } => "-".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Further attempts after the first failure.
    pub count: u32,
    /// Delay before the first retry; doubles each time, capped at 10 minutes.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            count: 0,
            backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt` (1-based; attempt 1 has none).
    pub fn delay_before(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (attempt - 2).min(16);
        // Saturating: a backoff of a million years must not overflow into a panic mid-run.
        self.backoff
            .saturating_mul(factor)
            .min(Duration::from_secs(600))
    }
}

/// A recipe with its sweep expanded: the arms, and one instance per distinct restriction of an
/// arm to the vars a step depends on.
#[derive(Debug, Clone)]
pub struct Expansion {
    pub arms: Vec<Arm>,
    /// Topologically ordered: an instance's inputs come before it.
    pub instances: Vec<Instance>,
}

/// One combination of the swept vars.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Arm {
    /// Stable id derived from the bindings alone (8 hex digits): the same bindings give the
    /// same id in every run and every recipe edit.
    pub id: String,
    /// Swept vars only, sorted.
    pub bindings: BTreeMap<String, Value>,
}

impl Arm {
    /// `arch=pixel,qt_images=100`, or `default` for a recipe without a sweep.
    pub fn label(&self) -> String {
        bindings_label(&self.bindings)
    }
}

/// `k=v,k2=v2` for bindings, `default` when there are none.
pub fn bindings_label(bindings: &BTreeMap<String, Value>) -> String {
    if bindings.is_empty() {
        return "default".to_string();
    }
    bindings
        .iter()
        .map(|(k, v)| format!("{k}={}", crate::value::render_short(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A step under one restriction of the sweep.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Index into [`Recipe::steps`].
    pub step: usize,
    /// The swept vars this instance depends on (directly or through its non-gather inputs),
    /// with their values. Empty for a step no swept var reaches.
    pub bindings: BTreeMap<String, Value>,
    /// Resolved and type-checked params.
    pub params: BTreeMap<String, Value>,
    /// Resolved argv (`exec` only).
    pub cmd: Option<Vec<String>>,
    pub inputs: BTreeMap<String, InstanceInput>,
    /// Indices into [`Expansion::arms`] of the arms this instance belongs to, ascending.
    pub arms: Vec<u32>,
    /// Under `[search]`, for an instance of a rung after the first: the search step's
    /// instance of the rung before, whose decision says whether it runs.
    pub gate: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceInput {
    /// Index into [`Expansion::instances`].
    One(usize),
    /// Indices into [`Expansion::instances`], in the upstream step's instance order (the order
    /// in which its instances first appear among the arms).
    Gather(Vec<usize>),
}

impl InstanceInput {
    pub fn indices(&self) -> &[usize] {
        match self {
            InstanceInput::One(i) => std::slice::from_ref(i),
            InstanceInput::Gather(v) => v,
        }
    }
}
