//! What a built-in op sees when `needle-worker OP` runs it: the same environment an `exec`
//! step gets (`NEEDLE_OUT`, `NEEDLE_INPUTS`, `NEEDLE_PARAMS`, `NEEDLE_SEED`,
//! `CUDA_VISIBLE_DEVICES`, `NEEDLE_CPUS`), read once into a typed context.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use needle_core::ops::OpSchema;
use needle_core::value::Value;
use serde::de::DeserializeOwned;

use crate::errors::OpError;

/// One input of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A read-only directory holding the upstream artifact.
    One(PathBuf),
    /// A gather input: (label of the arm, its read-only directory), in order.
    Gather(Vec<(String, PathBuf)>),
}

#[derive(Debug, Clone)]
pub struct OpContext {
    pub op: String,
    /// The step's resolved params, defaults filled in (see the op's schema).
    pub params: BTreeMap<String, Value>,
    pub inputs: BTreeMap<String, Input>,
    /// An empty directory: whatever the op writes here is its output artifact.
    pub out: PathBuf,
    /// Derived from the step's key: the same step always gets the same seed.
    pub seed: u64,
    /// CPU slots the runner gave this step; torch's thread count is set to it.
    pub cpus: u32,
    /// GPU ids the runner gave this step (`CUDA_VISIBLE_DEVICES`); empty: run on the CPU.
    pub gpus: Vec<String>,
    /// The recipe's directory: relative `path` params resolve against it.
    pub recipe_dir: PathBuf,
    /// A directory that survives this step's failed or interrupted attempts and is removed once
    /// it succeeds (`NEEDLE_RESUME`): a long op keeps checkpoints here and, on its next attempt,
    /// resumes from the last one instead of starting over. What it resumes must lead to the
    /// same output as an uninterrupted run (save the random state with the weights).
    pub resume: Option<PathBuf>,
    /// Where progress lines go (`NEEDLE_PROGRESS`), read by the runner's live display.
    pub progress: Option<PathBuf>,
}

/// One line of progress, as [`OpContext::report`] writes it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Work done so far, in `unit`s, and the total when known.
    pub done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// What `done` counts (`step`, `image`…).
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Throughput, items per second (`images/s` for training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
}

impl OpContext {
    /// Read the context from the environment the runner set, for the op `schema`.
    pub fn from_env(schema: &OpSchema) -> Result<OpContext, OpError> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| OpError::Environment {
                what: format!("`{name}` is not set; is this running under `needle run`?"),
            })
        };
        let params: BTreeMap<String, Value> = serde_json::from_str(&var("NEEDLE_PARAMS")?)
            .map_err(|e| OpError::Environment {
                what: format!("`NEEDLE_PARAMS` is not a JSON object: {e}"),
            })?;
        let inputs = var("NEEDLE_INPUTS")?;
        // A long one (a gather of many arms) comes as `@file`: see [`parse_inputs`].
        let inputs = match inputs.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file).map_err(OpError::io("read", file))?,
            None => inputs,
        };
        let inputs = parse_inputs(&inputs)?;
        let seed = var("NEEDLE_SEED")?
            .parse()
            .map_err(|_| OpError::Environment {
                what: "`NEEDLE_SEED` is not a number".into(),
            })?;
        let cpus = std::env::var("NEEDLE_CPUS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        let gpus = std::env::var("CUDA_VISIBLE_DEVICES")
            .unwrap_or_default()
            .split(',')
            .filter(|g| !g.trim().is_empty())
            .map(|g| g.trim().to_string())
            .collect();
        Ok(OpContext {
            op: schema.name.to_string(),
            params,
            inputs,
            out: PathBuf::from(var("NEEDLE_OUT")?),
            seed,
            cpus,
            gpus,
            recipe_dir: std::env::var("NEEDLE_RECIPE_DIR")
                .map(PathBuf::from)
                .unwrap_or_default(),
            resume: std::env::var_os("NEEDLE_RESUME").map(PathBuf::from),
            progress: std::env::var_os("NEEDLE_PROGRESS").map(PathBuf::from),
        })
    }

    /// A context outside any run, for calling an op directly (tests, notebooks): the schema's
    /// defaults overridden by `params` (a JSON object), no inputs, one CPU, no GPU, seed 7.
    pub fn standalone(schema: &OpSchema, params: Value, out: &Path) -> OpContext {
        let mut all = BTreeMap::new();
        if let needle_core::ops::ParamsSchema::Fixed(specs) = &schema.params {
            for spec in specs {
                if let Some(default) = &spec.default {
                    all.insert(spec.name.to_string(), default.clone());
                }
            }
        }
        if let Value::Object(given) = params {
            all.extend(given);
        }
        OpContext {
            op: schema.name.to_string(),
            params: all,
            inputs: BTreeMap::new(),
            out: out.to_path_buf(),
            seed: 7,
            cpus: 1,
            gpus: Vec::new(),
            recipe_dir: PathBuf::new(),
            resume: None,
            progress: None,
        }
    }

    /// Tell the runner how far the op is (a line appended to `NEEDLE_PROGRESS`; nothing
    /// outside a run). Cheap enough to call every few hundred milliseconds; never fails the op.
    pub fn report(&self, p: &Progress) {
        use std::io::Write;
        let Some(path) = &self.progress else {
            return;
        };
        let mut line = serde_json::to_string(p).expect("progress serialises");
        line.push('\n');
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// A param, deserialised; the recipe validator already checked its type.
    pub fn param<T: DeserializeOwned>(&self, name: &str) -> Result<T, OpError> {
        let v = self.params.get(name).ok_or_else(|| OpError::Param {
            name: name.to_string(),
            why: "missing".into(),
        })?;
        serde_json::from_value(v.clone()).map_err(|e| OpError::Param {
            name: name.to_string(),
            why: e.to_string(),
        })
    }

    /// The directory of a single (non-gather) input.
    pub fn input(&self, name: &str) -> Result<&Path, OpError> {
        match self.inputs.get(name) {
            Some(Input::One(dir)) => Ok(dir),
            Some(Input::Gather(_)) => Err(OpError::Input {
                name: name.to_string(),
                why: "is a gather input (`step[*]`); this op reads one artifact".into(),
            }),
            None => Err(OpError::Input {
                name: name.to_string(),
                why: "was not given".into(),
            }),
        }
    }

    /// An optional single input.
    pub fn optional_input(&self, name: &str) -> Result<Option<&Path>, OpError> {
        if self.inputs.contains_key(name) {
            self.input(name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A `path` param resolved against the recipe's directory.
    pub fn path_param(&self, name: &str) -> Result<PathBuf, OpError> {
        let p: String = self.param(name)?;
        Ok(self.recipe_dir.join(p))
    }
}

/// `NEEDLE_INPUTS`: `{"name": {"dir": "…"}}` for a plain input, and for a gather input
/// `{"name": {"dir": "…", "members": [{"label": "…", "dir": "…"}, …]}}`. When the JSON would
/// be too long for one environment variable (Linux allows 128 KiB), the runner writes it to a
/// file and sets `NEEDLE_INPUTS` to `@` and that file's path; [`OpContext::from_env`] reads it.
pub fn parse_inputs(json: &str) -> Result<BTreeMap<String, Input>, OpError> {
    #[derive(serde::Deserialize)]
    struct Member {
        label: String,
        dir: PathBuf,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        dir: PathBuf,
        #[serde(default)]
        members: Option<Vec<Member>>,
    }
    let entries: BTreeMap<String, Entry> =
        serde_json::from_str(json).map_err(|e| OpError::Environment {
            what: format!("`NEEDLE_INPUTS` is not what the runner writes: {e}"),
        })?;
    Ok(entries
        .into_iter()
        .map(|(name, e)| {
            let input = match e.members {
                None => Input::One(e.dir),
                Some(members) => {
                    Input::Gather(members.into_iter().map(|m| (m.label, m.dir)).collect())
                }
            };
            (name, input)
        })
        .collect())
}
