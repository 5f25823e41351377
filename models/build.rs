//! Find libtorch (LIBTORCH, which `.cargo/config.toml` points at the `.libtorch` link that
//! `make build` makes) and bake its `lib/` into the rpath of `needle-worker` and this crate's
//! test binaries, so they run without `LD_LIBRARY_PATH`. Link `libtorch_cuda` into the worker
//! explicitly: nothing references it by symbol, so the linker would drop it and torch would
//! never see a GPU; it loads fine on a machine without one.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let given = std::env::var_os("LIBTORCH").map(PathBuf::from);
    let lib = given
        .as_ref()
        .and_then(|dir| dir.join("lib").canonicalize().ok())
        .filter(|lib| lib.join("libtorch_cpu.so").exists())
        .unwrap_or_else(|| {
            let shown = given.map_or("(unset)".into(), |d| d.display().to_string());
            eprintln!(
                "error: libtorch not found: LIBTORCH = `{shown}` has no lib/libtorch_cpu.so\n\
                 hint: run `make build` (or scripts/setup.sh) once: it installs torch into \
                 .venv and links .libtorch to it"
            );
            std::process::exit(1)
        });
    // A reinstalled torch changes this file; the venv's path may have changed with it.
    println!(
        "cargo:rerun-if-changed={}",
        lib.join("libtorch_cpu.so").display()
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-search=native={}", lib.display());
    for arg in ["-Wl,--no-as-needed", "-ltorch_cuda", "-Wl,--as-needed"] {
        println!("cargo:rustc-link-arg-bin=needle-worker={arg}");
    }

    // The torch release this build uses, for `needle doctor`.
    let version_py = lib.join("../version.py");
    println!("cargo:rerun-if-changed={}", version_py.display());
    let version = std::fs::read_to_string(&version_py)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let v = l.strip_prefix("__version__ = ")?;
                Some(v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NEEDLE_LIBTORCH_VERSION={version}");
}
