//! `needle.toml`: where runs execute, kept out of recipes (a recipe says what to compute, and
//! its keys must not depend on where it ran).
//!
//! ```toml
//! [executor]
//! kind = "slurm"            # or "local" (the default)
//! partition = "gpu"
//! account = "my-project"
//! max_jobs = 100            # jobs submitted and not yet ended, at most
//! poll = "2s"               # how often the runner asks Slurm about its jobs
//! sbatch_args = ["--qos=normal"]
//!
//! [remote]                  # the shared cache (`runner/src/remote/`)
//! url = "s3://bucket/prefix"
//! endpoint = "http://127.0.0.1:8333"   # an S3-compatible server; absent: AWS
//! region = "us-east-1"
//! upload = true             # runs upload what they make (the default)
//! ```
//! Read from `--config PATH`, else `$NEEDLE_CONFIG`, else `needle.toml` in the current
//! directory if there is one. Command-line flags win over the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{ExecArgs, ExecutorKind};
use crate::error::CliError;
use crate::slurm::SlurmConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub executor: ExecutorTable,
    #[serde(default)]
    pub remote: crate::remote::RemoteTable,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorTable {
    pub kind: Option<ExecutorKind>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub max_jobs: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    pub poll: Option<Duration>,
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

/// `"2s"`, `"500ms"`.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| serde::de::Error::custom(format!("`{t}` is not a duration: {e}")))
        })
        .transpose()
    }
}

/// The config file this invocation reads, if any.
fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NEEDLE_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from("needle.toml");
    default.is_file().then_some(default)
}

pub fn load(explicit: Option<&Path>) -> Result<ConfigFile, CliError> {
    let Some(path) = config_path(explicit) else {
        return Ok(ConfigFile::default());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        CliError::usage(format!(
            "could not read config file `{}`: {e}",
            path.display()
        ))
    })?;
    toml::from_str(&text)
        .map_err(|e| CliError::usage(format!("config file `{}`: {e}", path.display())))
}

/// The executor a run uses: flags over the config file over the default (local).
pub fn executor(exec: &ExecArgs) -> Result<Option<SlurmConfig>, CliError> {
    let file = load(exec.config.as_deref())?.executor;
    let kind = exec.executor.or(file.kind).unwrap_or(ExecutorKind::Local);
    if kind == ExecutorKind::Local {
        return Ok(None);
    }
    let defaults = SlurmConfig::default();
    let mut sbatch_args = file.sbatch_args;
    sbatch_args.extend(exec.sbatch_args.iter().cloned());
    let config = SlurmConfig {
        partition: exec.partition.clone().or(file.partition),
        account: exec.account.clone().or(file.account),
        max_jobs: exec.max_jobs.or(file.max_jobs).unwrap_or(defaults.max_jobs),
        poll: exec.poll.or(file.poll).unwrap_or(defaults.poll),
        sbatch_args,
    };
    if config.max_jobs == 0 {
        return Err(CliError::usage("max_jobs must be at least 1"));
    }
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_executor_table_parses() {
        let c: ConfigFile = toml::from_str(
            r#"
[executor]
kind = "slurm"
partition = "gpu"
account = "proj"
max_jobs = 8
poll = "500ms"
sbatch_args = ["--qos=high"]
"#,
        )
        .unwrap();
        assert_eq!(c.executor.kind, Some(ExecutorKind::Slurm));
        assert_eq!(c.executor.poll, Some(Duration::from_millis(500)));
        assert_eq!(c.executor.max_jobs, Some(8));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = toml::from_str::<ConfigFile>("[executor]\npartiton = \"gpu\"\n").unwrap_err();
        assert!(e.to_string().contains("partiton"), "{e}");
        let e = toml::from_str::<ConfigFile>("[executor]\nkind = \"pbs\"\n").unwrap_err();
        assert!(e.to_string().contains("pbs"), "{e}");
        let e = toml::from_str::<ConfigFile>("[executor]\npoll = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
    }
}
