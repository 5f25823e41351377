//! One file per verb. Each takes the parsed CLI and returns the exit code, or an error that
//! maps to one.

pub mod completions;
pub mod diff;
pub mod doctor;
pub mod export;
pub mod gc;
pub mod lineage;
pub mod logs;
pub mod ops;
pub mod pin;
pub mod plan;
pub mod pull;
pub mod push;
pub mod report;
pub mod rerun;
pub mod results;
pub mod run;
pub mod runs;
pub mod show;
pub mod status;
pub mod unpin;
pub mod verify;
pub mod why;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use needle_core::digest::BlobDigest;
use needle_core::plan::{CodeHasher, HashOnly, ProbeError};
use needle_core::recipe::{self, Expansion, Recipe, RecipeSource, SetArg};
use needle_core::store::remote::Reader;
use needle_core::store::{LockMode, RunRecord, Store, StoreError, StoreRead};
use needle_ops::Registry;

use crate::cli::Cli;
use crate::error::CliError;

/// Read a recipe file into a [`RecipeSource`].
pub fn read_recipe(path: &Path) -> Result<RecipeSource, CliError> {
    let unreadable = |e: std::io::Error| {
        CliError::usage(format!("could not read recipe `{}`: {e}", path.display()))
    };
    // One byte past the limit is enough to refuse a file (or `/dev/zero`) for its size.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(recipe::MAX_RECIPE_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(unreadable)?;
    let abs = std::path::absolute(path).map_err(|source| CliError::Io {
        context: format!("could not resolve `{}`", path.display()),
        source,
    })?;
    let dir = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    Ok(RecipeSource::from_bytes(path.to_path_buf(), dir, bytes)?)
}

/// Parse, validate and expand: every recipe error is reported here, before the store opens.
pub fn load_recipe(
    source: RecipeSource,
    sets: &[SetArg],
    registry: &Registry,
) -> Result<(Recipe, Expansion), CliError> {
    let recipe = recipe::parse(source, sets, registry)?;
    let expansion = recipe::expand(&recipe, registry)?;
    Ok((recipe, expansion))
}

pub fn lock_mode(cli: &Cli) -> LockMode {
    if cli.wait {
        LockMode::Wait
    } else {
        LockMode::Fail
    }
}

/// The store's path made absolute: steps run in their own directories and get paths inside it.
pub fn store_root(cli: &Cli) -> Result<PathBuf, CliError> {
    std::path::absolute(&cli.store).map_err(|source| CliError::Io {
        context: format!("could not resolve the store path `{}`", cli.store.display()),
        source,
    })
}

/// Open the store to write, creating it if missing (`pull`).
pub fn open_store(cli: &Cli) -> Result<Store, CliError> {
    Store::open(&store_root(cli)?, lock_mode(cli)).map_err(CliError::StoreOpen)
}

/// Open an existing store for a command that writes nothing but must see it alone (`rerun`,
/// `verify`).
pub fn open_existing(cli: &Cli) -> Result<Store, CliError> {
    Store::open_existing(&store_root(cli)?, lock_mode(cli)).map_err(CliError::StoreOpen)
}

/// Open an existing store for a read-only command: the store itself, or, while a run holds
/// it, through that runner.
pub fn open_reader(cli: &Cli) -> Result<Reader, CliError> {
    Reader::open(&store_root(cli)?, lock_mode(cli)).map_err(CliError::StoreOpen)
}

/// [`open_reader`], or `None` when there is no store yet.
pub fn open_reader_if_exists(cli: &Cli) -> Result<Option<Reader>, CliError> {
    match Reader::open(&store_root(cli)?, lock_mode(cli)) {
        Ok(r) => Ok(Some(r)),
        Err(StoreError::Missing { .. }) => Ok(None),
        Err(e) => Err(CliError::StoreOpen(e)),
    }
}

/// `3` or `last`.
pub fn find_run(store: &dyn StoreRead, text: &str) -> Result<RunRecord, CliError> {
    let id = if text == "last" || text == "latest" {
        store
            .runs()?
            .last()
            .map(|r| r.id)
            .ok_or_else(|| CliError::usage("no run is recorded in this store yet"))?
    } else {
        text.parse::<u64>().map_err(|_| {
            CliError::usage(format!(
                "`{text}` is not a run id (hint: `needle runs` lists them)"
            ))
        })?
    };
    store.run(id)?.ok_or_else(|| {
        CliError::usage(format!("no run `{id}` in this store (hint: `needle runs`)"))
    })
}

/// Hashes code files while a plan is built, remembering each, so that `run` can plan before
/// it opens the store: a recipe whose code cannot be read leaves the store as it was, or
/// absent. [`PlannedCode::keep_in`] then keeps their bytes in the store, so what ran can be
/// shown later.
#[derive(Default)]
pub struct PlannedCode(BTreeMap<PathBuf, BlobDigest>, BTreeMap<BlobDigest, Vec<u8>>);

impl CodeHasher for PlannedCode {
    fn hash_file(&mut self, path: &Path) -> std::io::Result<BlobDigest> {
        let digest = HashOnly.hash_file(path)?;
        self.0.insert(path.to_path_buf(), digest);
        Ok(digest)
    }

    fn probe(&mut self, command: &str, dir: &Path) -> Result<String, ProbeError> {
        let printed = probe(command, dir)?;
        let mut h = blake3::Hasher::new();
        h.update(&printed);
        let digest = BlobDigest::from_hasher(&h);
        self.1.insert(digest, printed);
        Ok(digest.hex())
    }
}

/// Run an `environment` command (its argv split at whitespace, no shell) in `dir`, with the
/// runner's environment and no input: what it printed (stdout, then stderr: `python -V` once
/// wrote to stderr). A command that cannot start, or exits non-zero, is an error: a probe that
/// fails would key every step on its error message.
pub fn probe(command: &str, dir: &Path) -> Result<Vec<u8>, ProbeError> {
    let argv: Vec<&str> = command.split_whitespace().collect();
    let Some((program, args)) = argv.split_first() else {
        return Err(ProbeError::Empty);
    };
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(ProbeError::Spawn)?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(ProbeError::Failed {
            status: out.status,
            said: said.lines().last().unwrap_or("").trim().to_string(),
        });
    }
    let mut printed = out.stdout;
    printed.extend_from_slice(&out.stderr);
    Ok(printed)
}

impl PlannedCode {
    /// Copy every planned code file into the store; refused if one changed since it was
    /// hashed, since the plan's keys would then not be the code that runs.
    pub fn keep_in(&self, store: &Store) -> Result<(), CliError> {
        for (path, planned) in &self.0 {
            if store.absorb_file_copy(path)? != *planned {
                return Err(CliError::usage(format!(
                    "code file `{}` changed while the run was being planned: run again",
                    path.display()
                )));
            }
        }
        // What the environment commands printed, so that `show` and `why` can say it.
        for (digest, printed) in &self.1 {
            let mut tmp = tempfile::NamedTempFile::new().map_err(|source| CliError::Io {
                context: "could not write what an environment command printed".into(),
                source,
            })?;
            std::io::Write::write_all(&mut tmp, printed).map_err(|source| CliError::Io {
                context: "could not write what an environment command printed".into(),
                source,
            })?;
            let kept = store.absorb_file_copy(tmp.path())?;
            debug_assert_eq!(kept, *digest);
        }
        Ok(())
    }
}

/// Print `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("our JSON values serialise")
    );
}

/// RFC 3339 time (seconds) of a millisecond timestamp.
pub fn fmt_time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The GPUs an attempt held and the GPU memory it asked for, for tables: `0`, `0,1`,
/// `0 ×0.25`, `0 ×0.25 4 GB`, `0 4 GB`; empty for none. A long device name (a UUID) is cut to its first 12 characters.
pub fn gpu_label(gpus: &[String], share: Option<f64>, mem_gb: Option<f64>) -> String {
    if gpus.is_empty() {
        return String::new();
    }
    let ids: Vec<String> = gpus
        .iter()
        .map(|id| match id.char_indices().nth(12) {
            Some((at, _)) => format!("{}…", &id[..at]),
            None => id.clone(),
        })
        .collect();
    let mut label = ids.join(",");
    if let Some(share) = share {
        label.push_str(&format!(" ×{share}"));
    }
    if let Some(gb) = mem_gb {
        label.push_str(&format!(" {} GB", (gb * 10.0).round() / 10.0));
    }
    label
}
