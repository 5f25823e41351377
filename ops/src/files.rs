//! `files`: a file or directory from outside the store, imported as a step's output — the
//! usual first step of a recipe whose data already exists on disk.
//!
//! The planner fingerprints `path` (every file's relative path, size and mtime) into the
//! step's key, so the step re-runs when the data changes; when the bytes come out the same,
//! the output has the same digest and nothing downstream re-runs.

use std::fs;
use std::path::{Path, PathBuf};

use needle_core::ops::{InputsSchema, OpKind, OpSchema, ParamSpec, ParamType, ParamsSchema};

use crate::context::OpContext;
use crate::errors::OpError;
use crate::op::Op;

pub struct Files;

impl Op for Files {
    fn schema(&self) -> OpSchema {
        OpSchema {
            name: "files",
            version: 1,
            summary: "import a file or directory (`path`) as this step's output artifact",
            kind: OpKind::Builtin,
            params: ParamsSchema::Fixed(vec![ParamSpec {
                name: "path",
                ty: ParamType::Path,
                default: None,
                doc: "a file or directory, relative to the recipe or absolute; a directory's \
                      contents become the artifact, a file is its one entry; symlinks are followed",
            }]),
            inputs: InputsSchema::Fixed(vec![]),
        }
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let src = ctx.path_param("path")?;
        let meta = fs::metadata(&src).map_err(OpError::io("read", &src))?;
        if meta.is_dir() {
            copy_dir(&src, &ctx.out, &mut Vec::new())
        } else {
            let name = src.file_name().ok_or_else(|| OpError::Param {
                name: "path".into(),
                why: format!("`{}` names no file", src.display()),
            })?;
            copy_file(&src, &ctx.out.join(name), &meta)
        }
    }
}

/// Copy the tree under `src` into the existing directory `dest`, following symlinks.
/// `ancestors` holds the (device, inode) of the directories being copied, to refuse a loop.
fn copy_dir(src: &Path, dest: &Path, ancestors: &mut Vec<(u64, u64)>) -> Result<(), OpError> {
    use std::os::unix::fs::MetadataExt;

    let meta = fs::metadata(src).map_err(OpError::io("read", src))?;
    let id = (meta.dev(), meta.ino());
    if ancestors.contains(&id) {
        return Err(OpError::Failed(format!(
            "`{}` is a symlink loop",
            src.display()
        )));
    }
    ancestors.push(id);
    let mut entries: Vec<PathBuf> = fs::read_dir(src)
        .map_err(OpError::io("list", src))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(OpError::io("list", src))?;
    entries.sort();
    for path in entries {
        let to = dest.join(path.file_name().expect("a directory entry has a name"));
        let meta = fs::metadata(&path).map_err(OpError::io("read", &path))?;
        if meta.is_dir() {
            fs::create_dir(&to).map_err(OpError::io("create", &to))?;
            copy_dir(&path, &to, ancestors)?;
        } else {
            copy_file(&path, &to, &meta)?;
        }
    }
    ancestors.pop();
    Ok(())
}

fn copy_file(src: &Path, dest: &Path, meta: &fs::Metadata) -> Result<(), OpError> {
    if !meta.is_file() {
        return Err(OpError::Failed(format!(
            "`{}` is neither a file nor a directory",
            src.display()
        )));
    }
    // fs::copy keeps the permission bits, so an executable stays one in the artifact.
    fs::copy(src, dest).map_err(OpError::io("copy", src))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use serde_json::json;

    use super::*;

    fn ctx(recipe_dir: &Path, path: &str, out: &Path) -> OpContext {
        let mut ctx = OpContext::standalone(&Files.schema(), json!({ "path": path }), out);
        ctx.recipe_dir = recipe_dir.to_path_buf();
        ctx
    }

    /// Relative path → contents ("<dir>" for a directory), of everything under `dir`.
    fn tree(dir: &Path) -> BTreeMap<String, String> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                if p.is_dir() {
                    out.insert(rel, "<dir>".into());
                    walk(root, &p, out);
                } else {
                    out.insert(rel, fs::read_to_string(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    #[test]
    fn copies_a_directory_following_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        fs::create_dir_all(data.join("sub/empty")).unwrap();
        fs::write(data.join("a.txt"), "a").unwrap();
        fs::write(data.join("sub/run.sh"), "#!/bin/sh").unwrap();
        fs::set_permissions(data.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(t.path().join("outside.txt"), "outside").unwrap();
        std::os::unix::fs::symlink(t.path().join("outside.txt"), data.join("link.txt")).unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();

        Files.run(&ctx(t.path(), "data", &out)).unwrap();
        let got = tree(&out);
        let want: BTreeMap<String, String> = [
            ("a.txt", "a"),
            ("link.txt", "outside"),
            ("sub", "<dir>"),
            ("sub/empty", "<dir>"),
            ("sub/run.sh", "#!/bin/sh"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        assert!(
            !out.join("link.txt")
                .symlink_metadata()
                .unwrap()
                .is_symlink()
        );
        let mode = fs::metadata(out.join("sub/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "the x bit is kept");
    }

    #[test]
    fn a_file_becomes_the_one_entry() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("table.csv");
        fs::write(&file, "x,y\n").unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        // An absolute path ignores the recipe's directory.
        Files
            .run(&ctx(
                Path::new("/nonexistent"),
                file.to_str().unwrap(),
                &out,
            ))
            .unwrap();
        assert_eq!(
            tree(&out),
            BTreeMap::from([("table.csv".to_string(), "x,y\n".to_string())])
        );
    }

    #[test]
    fn a_missing_path_or_a_loop_fails() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        let err = Files.run(&ctx(t.path(), "nope", &out)).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");

        let data = t.path().join("data");
        fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&data, data.join("again")).unwrap();
        let err = Files.run(&ctx(t.path(), "data", &out)).unwrap_err();
        assert!(err.to_string().contains("symlink loop"), "{err}");
    }
}
