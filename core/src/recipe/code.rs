//! `code` entries: the files and directories, inside the recipe's directory, whose bytes enter
//! an `exec` step's key and are copied into its working directory.
//!
//! A recipe may only hand its step what lies inside its own directory: a symlink is followed
//! when its target is inside too (its files keep the names they have under the link), and is
//! refused when it leads outside, when it closes a loop, or when it dangles. Only regular
//! files and directories are read: a FIFO or a device could block hashing forever or never
//! end. The validator walks each entry once to report these at the recipe's `code` line;
//! planning walks it again to hash what it lists.

use std::path::{Path, PathBuf};

/// Why a `code` entry cannot be read. `path` is as the recipe names it: relative to the
/// recipe's directory, `/`-separated.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    #[error("`{path}` does not exist")]
    Missing { path: String },
    #[error("`{path}` leads outside the recipe directory, to `{}`", target.display())]
    Outside { path: String, target: PathBuf },
    #[error("`{path}` is a symlink loop: it leads back to `{}`", target.display())]
    Loop { path: String, target: PathBuf },
    #[error("`{path}` is neither a file nor a directory")]
    Special { path: String },
    #[error("`{path}` holds a file name that is not UTF-8")]
    NotUtf8 { path: String },
    #[error("could not read `{path}`")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Every file of the code entry `entry` (normalised, relative to `dir`; `.` for the whole
/// directory), sorted by name: its name as the recipe sees it (`lib/util.py`) and its path.
pub fn code_files(dir: &Path, entry: &str) -> Result<Vec<(String, PathBuf)>, CodeError> {
    let io = |path: &str| {
        let path = path.to_string();
        move |source: std::io::Error| CodeError::Io { path, source }
    };
    let root = std::fs::canonicalize(dir).map_err(io("."))?;
    let rel = if entry == "." { "" } else { entry };
    let path = dir.join(entry);
    let real = resolve(&root, rel, &path)?;
    let mut out = Vec::new();
    walk(
        &root,
        rel.to_string(),
        &path,
        real,
        &mut Vec::new(),
        &mut out,
    )?;
    Ok(out)
}

/// The real path of `path` (named `rel`), checked to lie inside `root`.
fn resolve(root: &Path, rel: &str, path: &Path) -> Result<PathBuf, CodeError> {
    let shown = || {
        if rel.is_empty() {
            ".".to_string()
        } else {
            rel.to_string()
        }
    };
    match std::fs::canonicalize(path) {
        Ok(real) if real.starts_with(root) => Ok(real),
        Ok(real) => Err(CodeError::Outside {
            path: shown(),
            target: real,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(CodeError::Missing { path: shown() })
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(CodeError::Loop {
            path: shown(),
            target: path.to_path_buf(),
        }),
        Err(source) => Err(CodeError::Io {
            path: shown(),
            source,
        }),
    }
}

/// Depth first, in name order. `real` is `path` resolved; `open` the real paths of the
/// directories being walked, to catch a symlink back to one of them.
fn walk(
    root: &Path,
    rel: String,
    path: &Path,
    real: PathBuf,
    open: &mut Vec<PathBuf>,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), CodeError> {
    let shown = if rel.is_empty() { "." } else { rel.as_str() };
    let meta = std::fs::metadata(&real).map_err(|source| CodeError::Io {
        path: shown.to_string(),
        source,
    })?;
    if meta.is_file() {
        out.push((rel, path.to_path_buf()));
        return Ok(());
    }
    if !meta.is_dir() {
        return Err(CodeError::Special {
            path: shown.to_string(),
        });
    }
    if open.contains(&real) {
        return Err(CodeError::Loop {
            path: shown.to_string(),
            target: real,
        });
    }
    let read_err = |source| CodeError::Io {
        path: shown.to_string(),
        source,
    };
    let mut entries: Vec<(String, std::fs::FileType)> = Vec::new();
    for e in std::fs::read_dir(&real).map_err(read_err)? {
        let e = e.map_err(read_err)?;
        let name = e
            .file_name()
            .into_string()
            .map_err(|_| CodeError::NotUtf8 {
                path: shown.to_string(),
            })?;
        entries.push((name, e.file_type().map_err(read_err)?));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    open.push(real.clone());
    for (name, kind) in entries {
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let child = path.join(&name);
        // A child that is no symlink is as real as its directory; only links are resolved.
        let child_real = if kind.is_symlink() {
            resolve(root, &child_rel, &child)?
        } else {
            real.join(&name)
        };
        walk(root, child_rel, &child, child_real, open, out)?;
    }
    open.pop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(dir: &Path, entry: &str) -> Vec<String> {
        code_files(dir, entry)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn lists_files_by_their_names_inside_the_recipe_dir() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("project");
        std::fs::create_dir_all(d.join("lib/deep")).unwrap();
        std::fs::write(d.join("gen.py"), "1").unwrap();
        std::fs::write(d.join("lib/b.py"), "2").unwrap();
        std::fs::write(d.join("lib/deep/a.py"), "3").unwrap();
        symlink("lib/deep", d.join("inside")).unwrap();
        assert_eq!(names(&d, "gen.py"), ["gen.py"]);
        assert_eq!(names(&d, "lib"), ["lib/b.py", "lib/deep/a.py"]);
        // Through a link that stays inside: the names under the link.
        assert_eq!(names(&d, "inside"), ["inside/a.py"]);
        assert_eq!(
            names(&d, "."),
            ["gen.py", "inside/a.py", "lib/b.py", "lib/deep/a.py"]
        );
    }

    #[test]
    fn refuses_what_leads_outside_loops_dangles_or_is_no_file() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("project");
        std::fs::create_dir_all(d.join("lib")).unwrap();
        std::fs::create_dir_all(d.join("loop")).unwrap();
        std::fs::write(t.path().join("secret"), "s").unwrap();
        symlink("../secret", d.join("escape")).unwrap();
        symlink("../../secret", d.join("lib/escape")).unwrap();
        symlink(".", d.join("loop/self")).unwrap();
        symlink("nowhere", d.join("dangling")).unwrap();
        let fifo = std::ffi::CString::new(d.join("fifo").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let err = |entry: &str| code_files(&d, entry).unwrap_err();
        assert!(matches!(err("escape"), CodeError::Outside { path, .. } if path == "escape"));
        assert!(matches!(err("lib"), CodeError::Outside { path, .. } if path == "lib/escape"));
        assert!(matches!(err("loop"), CodeError::Loop { path, .. } if path == "loop/self"));
        assert!(matches!(err("dangling"), CodeError::Missing { path } if path == "dangling"));
        assert!(matches!(err("missing"), CodeError::Missing { .. }));
        assert!(matches!(err("fifo"), CodeError::Special { path } if path == "fifo"));
    }
}
