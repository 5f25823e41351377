//! `code` entries: the files and directories, inside the recipe's directory, whose bytes enter
//! an `exec` step's key and are copied into its working directory.
//!
//! A recipe may only hand its step what lies inside its own directory: a symlink is followed
//! when its target is inside too (its files keep the names they have under the link), and is
//! refused when it leads outside, when it closes a loop, or when it dangles. Only regular
//! files and directories are read: a FIFO or a device could block hashing forever or never
//! end. The validator walks each entry once to report these at the recipe's `code` line;
//! planning walks it again to hash what it lists.
//!
//! A directory's walk leaves out what is never a step's code, so that `code = ["."]` at the
//! root of a project works: a needle store (the one the run writes into would change under
//! its own key), version control (`.git`, `.hg`, `.svn`), Python's `__pycache__` (written as
//! soon as the code runs locally) and virtual environments (a directory with `pyvenv.cfg`),
//! and whatever a `.gitignore` or `.needleignore` in the recipe's directory or below it
//! ignores, as git reads those files. An entry the recipe names itself is always taken.

use std::path::{Path, PathBuf};

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

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
    // The ignore files of the directories above the entry, from the recipe's down.
    let mut ignores = Vec::new();
    let mut above = dir.to_path_buf();
    let parents: Vec<&str> = rel.split('/').collect();
    for (i, part) in parents.iter().enumerate() {
        if i + 1 == parents.len() {
            break;
        }
        load_ignores(&above, &mut ignores).map_err(io(rel))?;
        above.push(part);
    }
    if !rel.is_empty() {
        load_ignores(&above, &mut ignores).map_err(io(rel))?;
    }
    let mut out = Vec::new();
    walk(
        &root,
        rel.to_string(),
        &path,
        real,
        &mut Walk {
            open: Vec::new(),
            ignores,
        },
        &mut out,
    )?;
    Ok(out)
}

/// What a walk carries down: the real paths of the directories being walked (to catch a
/// symlink back to one of them) and the ignore files that apply, outermost first.
struct Walk {
    open: Vec<PathBuf>,
    ignores: Vec<Gitignore>,
}

/// Names of directories that are never a step's code.
const NEVER_CODE: &[&str] = &[".git", ".hg", ".svn", "__pycache__", ".needle"];

/// Read `dir`'s `.gitignore` and `.needleignore` into `ignores`, if it has them.
fn load_ignores(dir: &Path, ignores: &mut Vec<Gitignore>) -> std::io::Result<()> {
    for name in [".gitignore", ".needleignore"] {
        let file = dir.join(name);
        if !file.is_file() {
            continue;
        }
        let mut builder = GitignoreBuilder::new(dir);
        if let Some(e) = builder.add(&file) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("`{}`: {e}", file.display()),
            ));
        }
        let built = builder
            .build()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        ignores.push(built);
    }
    Ok(())
}

/// Whether the walk leaves out the child `path` (a directory when `is_dir`; `real` is where it
/// leads) of a directory being walked.
fn left_out(path: &Path, real: &Path, name: &str, is_dir: bool, ignores: &[Gitignore]) -> bool {
    if is_dir
        && (NEVER_CODE.contains(&name)
            || real.join("pyvenv.cfg").is_file()
            || std::fs::read(real.join("FORMAT")).is_ok_and(|f| f.starts_with(b"needle-store")))
    {
        return true;
    }
    // The innermost ignore file that says anything about it decides, as in git.
    for ignore in ignores.iter().rev() {
        match ignore.matched(path, is_dir) {
            Match::Ignore(_) => return true,
            Match::Whitelist(_) => return false,
            Match::None => {}
        }
    }
    false
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
    state: &mut Walk,
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
    if state.open.contains(&real) {
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
    state.open.push(real.clone());
    let ignores = state.ignores.len();
    load_ignores(path, &mut state.ignores).map_err(read_err)?;
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
        let is_dir = if kind.is_symlink() {
            child_real.is_dir()
        } else {
            kind.is_dir()
        };
        if left_out(&child, &child_real, &name, is_dir, &state.ignores) {
            continue;
        }
        walk(root, child_rel, &child, child_real, state, out)?;
    }
    state.ignores.truncate(ignores);
    state.open.pop();
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
    fn a_directory_leaves_out_stores_vcs_caches_venvs_and_ignored_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("project");
        let file = |rel: &str, text: &str| {
            let p = d.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        file("train.py", "1");
        file("lib/util.py", "2");
        file("lib/__pycache__/util.cpython-311.pyc", "x");
        file(".git/HEAD", "x");
        file(".needle/FORMAT", "needle-store 1\n");
        file("elsewhere/FORMAT", "needle-store 1\n");
        file("elsewhere/blobs/ab", "x");
        file("env/pyvenv.cfg", "x");
        file("env/lib/site.py", "x");
        file("runs/out.log", "x");
        file("lib/notes.tmp", "x");
        file("lib/keep.tmp", "x");
        file(".gitignore", "runs/\n*.tmp\n");
        file("lib/.needleignore", "!keep.tmp\n");
        file(".env", "hidden files are code");
        assert_eq!(
            names(&d, "."),
            [
                ".env",
                ".gitignore",
                "lib/.needleignore",
                "lib/keep.tmp",
                "lib/util.py",
                "train.py"
            ]
        );
        // The ignore files above an entry apply to it; an entry named outright is taken.
        assert_eq!(
            names(&d, "lib"),
            ["lib/.needleignore", "lib/keep.tmp", "lib/util.py"]
        );
        assert_eq!(names(&d, "runs/out.log"), ["runs/out.log"]);
        assert_eq!(names(&d, "env"), ["env/lib/site.py", "env/pyvenv.cfg"]);
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
        crate::testutil::mkfifo(&d.join("fifo"));

        let err = |entry: &str| code_files(&d, entry).unwrap_err();
        assert!(matches!(err("escape"), CodeError::Outside { path, .. } if path == "escape"));
        assert!(matches!(err("lib"), CodeError::Outside { path, .. } if path == "lib/escape"));
        assert!(matches!(err("loop"), CodeError::Loop { path, .. } if path == "loop/self"));
        assert!(matches!(err("dangling"), CodeError::Missing { path } if path == "dangling"));
        assert!(matches!(err("missing"), CodeError::Missing { .. }));
        assert!(matches!(err("fifo"), CodeError::Special { path } if path == "fifo"));
    }
}
