//! What the runner asks of libtorch itself: thread counts and seeds for a worker, and what
//! `needle doctor` reports. The runner reaches torch only through here.

/// The torch release this build was compiled against (`<LIBTORCH>/version.py` at build time).
pub const BUILT_AGAINST: &str = env!("NEEDLE_LIBTORCH_VERSION");

/// Set torch's intra-op threads (a worker gets as many as it holds CPU slots, so several CPU
/// steps at once do not oversubscribe the machine) and seed its global generator.
pub fn prepare_worker(cpus: u32, seed: u64) {
    keep_freed_memory();
    tch::set_num_threads(cpus.max(1) as i32);
    // Ops seed their own generators from the context; this covers torch's global one.
    tch::manual_seed(seed as i64);
}

/// Let the C allocator keep the memory a tensor frees for the next one. libtorch allocates CPU
/// tensors with `posix_memalign`, and glibc by default maps a block of over 128 KiB afresh each
/// time (raising that threshold as blocks are freed, to at most 32 MiB) and hands free memory at
/// the top of its heap back to the kernel: every step then faults in and zeroes its activations
/// again. Sampling the demo's 240 images took 29,000 page faults per DDIM step, training at
/// channels 64, batch 256 some 450,000 per step; with this, none and 65,000 (what is left are
/// blocks over 32 MiB), and 15 % and 12 % less CPU time per step. A worker runs one op and exits,
/// so holding on to its peak costs nothing that it did not already use.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::c_int;
        // <malloc.h>
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        unsafe extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        // SAFETY: glibc's mallopt takes the allocator's lock and sets one tuning value; no
        // memory changes hands. 32 MiB is the largest mmap threshold glibc accepts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, c_int::MAX);
        }
    }
}

/// What torch sees of the machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TorchInfo {
    /// The torch release of the libtorch this process loaded, when it can be told (its
    /// `version.py`, next to `lib/`); `None` for a libtorch without one.
    pub version: Option<String>,
    pub built_against: &'static str,
    /// The directory libtorch was loaded from.
    pub lib_dir: Option<String>,
    pub cuda: bool,
    pub cuda_devices: i64,
    pub cudnn: bool,
    /// Intra-op threads torch uses by default in this process.
    pub threads: i32,
}

pub fn info() -> TorchInfo {
    let lib_dir = loaded_lib_dir();
    let version = lib_dir
        .as_deref()
        .and_then(|lib| std::fs::read_to_string(format!("{lib}/../version.py")).ok())
        .and_then(|text| version_from_py(&text));
    let cuda = tch::Cuda::is_available();
    TorchInfo {
        version,
        built_against: BUILT_AGAINST,
        lib_dir,
        cuda,
        cuda_devices: if cuda { tch::Cuda::device_count() } else { 0 },
        cudnn: cuda && tch::Cuda::cudnn_is_available(),
        threads: tch::get_num_threads(),
    }
}

/// Where `libtorch_cpu.so` is mapped from in this process (`/proc/self/maps`).
fn loaded_lib_dir() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .and_then(|p| p.rsplit_once('/'))
        .map(|(dir, _)| dir.to_string())
}

/// `__version__ = '2.11.0+cu130'` → `2.11.0+cu130`.
pub fn version_from_py(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("__version__")?.trim_start();
        let v = rest
            .strip_prefix('=')?
            .trim()
            .trim_matches(|c| c == '\'' || c == '"');
        (!v.is_empty()).then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_version_py() {
        let text = "from typing import Optional\n__version__ = '2.11.0+cu130'\ndebug = False\n";
        assert_eq!(version_from_py(text).as_deref(), Some("2.11.0+cu130"));
        assert_eq!(version_from_py("x = 1"), None);
    }

    #[test]
    fn torch_runs_on_the_cpu() {
        let info = info();
        assert!(info.threads >= 1);
        assert_eq!(info.version.as_deref(), Some(BUILT_AGAINST));
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), 6.0);
    }
}
