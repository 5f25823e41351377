//! `needle export REF DIR`: an artifact out of the store as plain, writable files (a model's
//! safetensors and config, a dataset in image-folder form), never writing outside DIR.

use std::path::{Component, Path, PathBuf};

use needle_core::store::{EntryKind, StoreRead};

use crate::cli::{Cli, ExportArgs};
use crate::commands::open_reader;
use crate::error::{CliError, Exit};
use crate::refs::{artifact_of, resolve};

pub fn export(cli: &Cli, args: &ExportArgs) -> Result<Exit, CliError> {
    let store = open_reader(cli)?;
    let artifact = artifact_of(&store, &resolve(&store, &args.reference)?)?;
    let manifest = store.manifest(&artifact)?.ok_or_else(|| {
        CliError::usage(format!("artifact `{}` has no manifest", artifact.short()))
    })?;
    let dir = &args.dir;
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|source| io(format!("could not read `{}`", dir.display()), source))?
            .next()
            .is_none();
        if !empty {
            return Err(CliError::usage(format!(
                "`{}` is not empty: export writes into a new or empty directory",
                dir.display()
            )));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|source| io(format!("could not create `{}`", dir.display()), source))?;
    let mut files = 0u64;
    let mut bytes = 0u64;
    for e in &manifest.entries {
        let dest = inside(dir, &e.path)?;
        match &e.kind {
            EntryKind::Dir => std::fs::create_dir_all(&dest)
                .map_err(|source| io(format!("could not create `{}`", dest.display()), source))?,
            EntryKind::File {
                blob,
                size,
                executable,
            } => {
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(|source| {
                        io(format!("could not create `{}`", parent.display()), source)
                    })?;
                }
                // A copy, not a link: the exported files are the user's to edit.
                std::fs::copy(store.blob_path(blob), &dest).map_err(|source| {
                    io(format!("could not write `{}`", dest.display()), source)
                })?;
                use std::os::unix::fs::PermissionsExt;
                let mode = if *executable { 0o755 } else { 0o644 };
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(
                    |source| io(format!("could not chmod `{}`", dest.display()), source),
                )?;
                files += 1;
                bytes += size;
            }
        }
    }
    eprintln!(
        "exported artifact {} to {}: {files} files, {}",
        artifact.short(),
        dir.display(),
        crate::commands::show::human_bytes(bytes)
    );
    Ok(Exit::Success)
}

/// `rel` under `dir`, refused unless it is a plain relative path that stays inside.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, CliError> {
    let path = Path::new(rel);
    let plain = !rel.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(CliError::usage(format!(
            "the artifact holds a path `{rel}` that would leave `{}`; nothing more is written",
            dir.display()
        )));
    }
    Ok(dir.join(path))
}

fn io(context: String, source: std::io::Error) -> CliError {
    CliError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside() {
        let d = Path::new("/tmp/out");
        assert_eq!(inside(d, "a/b.png").unwrap(), d.join("a/b.png"));
        for bad in ["../x", "a/../../x", "/etc/passwd", "", "./a"] {
            assert!(inside(d, bad).is_err(), "{bad}");
        }
    }
}
