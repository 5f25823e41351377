//! Process utilities the runner's modules share: signalling a step's group, the runner's own
//! `NEEDLE_*` variables, finding a program on `PATH`. A leaf.

use std::fs;
use std::path::{Path, PathBuf};

/// Signal the process group led by `pid` (each step leads its own group).
pub fn kill_group(pid: u32, signal: i32) {
    if pid > 1 {
        // SAFETY: kill(2) with a negative pid signals a process group; it has no memory effects.
        unsafe {
            libc::kill(-(pid as i32), signal);
        }
    }
}

/// The runner's own `NEEDLE_*` variables, which steps must not inherit (a step gets its own),
/// read once: scanning the environment per spawn costs an allocation per variable.
pub fn inherited_needle_vars() -> &'static [std::ffi::OsString] {
    static VARS: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();
    VARS.get_or_init(|| {
        std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| k.to_str().is_some_and(|k| k.starts_with("NEEDLE_")))
            .collect()
    })
}

/// The full path of `program` on PATH, if it is a bare name found there.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate) && candidate.is_file())
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}
