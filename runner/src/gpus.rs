//! Which GPU ids a run may hand out.
//!
//! GPUs are tokens: a step that asks for two gets two concrete ids in `CUDA_VISIBLE_DEVICES`,
//! and no other step sees them while it runs. `--gpus 4` on a machine without GPUs still hands
//! out ids 0-3 (ops then run on CPU), so scheduling can be tested anywhere.

use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSpec {
    /// `CUDA_VISIBLE_DEVICES` if set, else the GPUs `nvidia-smi` lists, else none.
    Auto,
    None,
    /// Ids `0..n`.
    Count(u32),
    Ids(Vec<u32>),
}

impl FromStr for GpuSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "auto" => return Ok(GpuSpec::Auto),
            "none" | "" => return Ok(GpuSpec::None),
            _ => {}
        }
        if s.contains(',') {
            let ids = parse_ids(s).ok_or_else(|| bad(s))?;
            return Ok(GpuSpec::Ids(ids));
        }
        s.parse::<u32>().map(GpuSpec::Count).map_err(|_| bad(s))
    }
}

fn bad(s: &str) -> String {
    format!("`{s}` is not a GPU spec (expected auto, none, a count like 4, or ids like 0,2)")
}

fn parse_ids(s: &str) -> Option<Vec<u32>> {
    let mut ids: Vec<u32> = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    (ids.len() == n).then_some(ids)
}

impl GpuSpec {
    /// The concrete ids this spec stands for on this machine.
    pub fn resolve(&self) -> Vec<u32> {
        match self {
            GpuSpec::None => Vec::new(),
            GpuSpec::Count(n) => (0..*n).collect(),
            GpuSpec::Ids(ids) => ids.clone(),
            GpuSpec::Auto => detect(),
        }
    }
}

fn detect() -> Vec<u32> {
    if let Ok(visible) = std::env::var("CUDA_VISIBLE_DEVICES") {
        // Numeric ids are passed on as they are; UUIDs (GPU-…) cannot be re-split by index
        // reliably, so they count as the first n devices of what the process sees.
        if let Some(ids) = parse_ids(&visible) {
            return ids;
        }
        let n = visible.split(',').filter(|p| !p.trim().is_empty()).count();
        return (0..n as u32).collect();
    }
    let listed = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
        .unwrap_or(0);
    (0..listed as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("auto".parse(), Ok(GpuSpec::Auto));
        assert_eq!("none".parse(), Ok(GpuSpec::None));
        assert_eq!("4".parse(), Ok(GpuSpec::Count(4)));
        assert_eq!("0,2".parse(), Ok(GpuSpec::Ids(vec![0, 2])));
        assert!("0,0".parse::<GpuSpec>().is_err());
        assert!("x".parse::<GpuSpec>().is_err());
        assert_eq!(GpuSpec::Count(3).resolve(), vec![0, 1, 2]);
    }
}
