//! Which GPUs a run may hand out, and how much memory each has.
//!
//! GPUs are tokens: a step gets concrete devices in `CUDA_VISIBLE_DEVICES`, and no step sees a
//! device outside the run's list. `--gpus 4` on a machine without GPUs still hands out ids 0-3
//! (ops then run on CPU), so scheduling can be tested anywhere.
//!
//! `--gpus auto` keeps the ids it was given: `CUDA_VISIBLE_DEVICES` may hold indices (`2,3`),
//! UUIDs (`GPU-8f1c…`) or MIG ids (`MIG-…`), and a step sees exactly one of those strings, never
//! a renumbering of them. CUDA's own rule applies to that list: it ends at the first entry that
//! is not a device (`-1` hides every GPU), and an empty one hides them all.
//!
//! Memory comes from `nvidia-smi` for real GPUs (a MIG device's from its profile name, e.g.
//! `3g.40gb`), or from `--gpu-mem GB`, which states it for every GPU of the run (fake ids
//! included) and wins over what was detected.

use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSpec {
    /// `CUDA_VISIBLE_DEVICES` if set, else the GPUs `nvidia-smi` lists, else none.
    Auto,
    None,
    /// Ids `0..n`.
    Count(u32),
    /// Devices as given: indices, UUIDs or MIG ids.
    Ids(Vec<String>),
}

/// One GPU a run may hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// What a step sees in `CUDA_VISIBLE_DEVICES`: an index, a UUID or a MIG id.
    pub id: String,
    /// Its memory in MB, where known.
    pub mem_mb: Option<u64>,
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
        if let Ok(n) = s.parse::<u32>() {
            return Ok(GpuSpec::Count(n));
        }
        let ids: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(String::from)
            .collect();
        if ids.is_empty() || !ids.iter().all(|id| is_device(id)) {
            return Err(bad(s));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = ids.iter().find(|id| !seen.insert(id.as_str())) {
            return Err(format!("`{s}` names GPU `{dup}` twice"));
        }
        Ok(GpuSpec::Ids(ids))
    }
}

fn bad(s: &str) -> String {
    format!(
        "`{s}` is not a GPU spec (expected auto, none, a count like 4, or devices like 0,2 or \
         GPU-<uuid>,MIG-<uuid>)"
    )
}

/// Whether CUDA takes `entry` of `CUDA_VISIBLE_DEVICES` as a device: a non-negative index,
/// or a GPU or MIG UUID (a prefix of one is enough for CUDA).
fn is_device(entry: &str) -> bool {
    entry.parse::<u32>().is_ok()
        || entry
            .strip_prefix("GPU-")
            .is_some_and(|rest| !rest.is_empty())
        || entry
            .strip_prefix("MIG-")
            .is_some_and(|rest| !rest.is_empty())
}

/// The devices a `CUDA_VISIBLE_DEVICES` value makes visible, as CUDA reads it: entries up to
/// the first that is not a device, each once.
pub fn visible_devices(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if !is_device(entry) {
            break;
        }
        if !out.iter().any(|d| d == entry) {
            out.push(entry.to_string());
        }
    }
    out
}

impl GpuSpec {
    /// The GPUs this spec stands for on this machine; `gpu_mem_gb` (from `--gpu-mem`) states
    /// every GPU's memory.
    pub fn resolve(&self, gpu_mem_gb: Option<f64>) -> Vec<Gpu> {
        let ids: Vec<String> = match self {
            GpuSpec::None => Vec::new(),
            GpuSpec::Count(n) => (0..*n).map(|i| i.to_string()).collect(),
            GpuSpec::Ids(ids) => ids.clone(),
            GpuSpec::Auto => match std::env::var("CUDA_VISIBLE_DEVICES") {
                Ok(visible) => visible_devices(&visible),
                Err(_) => Smi::query().devices(),
            },
        };
        if ids.is_empty() {
            return Vec::new();
        }
        let stated = gpu_mem_gb.map(|gb| (gb * 1024.0).round() as u64);
        // nvidia-smi is asked only when something is left to learn from it.
        let smi = if stated.is_none() {
            Smi::query()
        } else {
            Smi::default()
        };
        ids.into_iter()
            .map(|id| Gpu {
                mem_mb: stated.or_else(|| smi.mem_mb(&id)),
                id,
            })
            .collect()
    }
}

/// What `nvidia-smi` says of this machine's GPUs (nothing where it is missing or fails).
#[derive(Debug, Default)]
struct Smi {
    /// (index, UUID, memory in MB) per physical GPU.
    gpus: Vec<(String, String, Option<u64>)>,
    /// (parent index, MIG UUID, memory in MB from its profile) per MIG device.
    migs: Vec<(String, String, Option<u64>)>,
}

impl Smi {
    fn query() -> Smi {
        let run = |args: &[&str]| {
            std::process::Command::new("nvidia-smi")
                .args(args)
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let Some(listing) = run(&["-L"]) else {
            return Smi::default();
        };
        let memory = run(&[
            "--query-gpu=index,uuid,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .unwrap_or_default();
        Smi::parse(&listing, &memory)
    }

    /// `listing` is `nvidia-smi -L`; `memory` its `--query-gpu=index,uuid,memory.total`.
    fn parse(listing: &str, memory: &str) -> Smi {
        let mut smi = Smi::default();
        let mem_of: Vec<(String, Option<u64>)> = memory
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').map(str::trim).collect();
                (f.len() == 3).then(|| (f[1].to_string(), f[2].parse().ok()))
            })
            .collect();
        let mut parent = None;
        for line in listing.lines() {
            let uuid = line
                .split("(UUID: ")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .map(str::trim);
            if let Some(rest) = line.strip_prefix("GPU ") {
                // "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-…)"
                let (Some(index), Some(uuid)) = (rest.split(':').next(), uuid) else {
                    continue;
                };
                let mem = mem_of.iter().find(|(u, _)| u == uuid).and_then(|(_, m)| *m);
                smi.gpus
                    .push((index.trim().to_string(), uuid.to_string(), mem));
                parent = Some(index.trim().to_string());
            } else if let (Some(rest), Some(uuid), Some(parent)) =
                (line.trim_start().strip_prefix("MIG "), uuid, &parent)
            {
                // "  MIG 3g.40gb     Device  0: (UUID: MIG-…)"
                let mem = rest
                    .split_whitespace()
                    .next()
                    .and_then(|profile| profile.split('.').nth(1))
                    .and_then(|gb| gb.strip_suffix("gb"))
                    .and_then(|gb| gb.parse::<u64>().ok())
                    .map(|gb| gb * 1024);
                smi.migs.push((parent.clone(), uuid.to_string(), mem));
            }
        }
        smi
    }

    /// The devices CUDA would use: a GPU split by MIG is its MIG devices, any other GPU its
    /// index.
    fn devices(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (index, _, _) in &self.gpus {
            let migs: Vec<&String> = (self.migs.iter())
                .filter(|(p, _, _)| p == index)
                .map(|(_, uuid, _)| uuid)
                .collect();
            if migs.is_empty() {
                out.push(index.clone());
            } else {
                out.extend(migs.into_iter().cloned());
            }
        }
        out
    }

    /// The memory of the device `id` names: by index, by (a prefix of) its UUID, or a MIG
    /// device's by its UUID.
    fn mem_mb(&self, id: &str) -> Option<u64> {
        if let Some((_, _, mem)) = self.gpus.iter().find(|(index, uuid, _)| {
            index == id || (id.starts_with("GPU-") && uuid.starts_with(id))
        }) {
            return *mem;
        }
        (self.migs.iter())
            .find(|(_, uuid, _)| id.starts_with("MIG-") && uuid.starts_with(id))
            .and_then(|(_, _, mem)| *mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_specs() {
        assert_eq!("auto".parse(), Ok(GpuSpec::Auto));
        assert_eq!("none".parse(), Ok(GpuSpec::None));
        assert_eq!("4".parse(), Ok(GpuSpec::Count(4)));
        assert_eq!("0,2".parse(), Ok(GpuSpec::Ids(ids(&["0", "2"]))));
        assert_eq!(
            "GPU-8f1c,MIG-aa".parse(),
            Ok(GpuSpec::Ids(ids(&["GPU-8f1c", "MIG-aa"])))
        );
        assert!("0,0".parse::<GpuSpec>().unwrap_err().contains("twice"));
        assert!("x".parse::<GpuSpec>().is_err());
        assert!("0,-1".parse::<GpuSpec>().is_err());
        let three = GpuSpec::Count(3).resolve(Some(8.0));
        assert_eq!(
            three.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(),
            ["0", "1", "2"]
        );
        assert!(three.iter().all(|g| g.mem_mb == Some(8192)));
    }

    #[test]
    fn visible_devices_as_cuda_reads_them() {
        assert_eq!(visible_devices("2,3"), ids(&["2", "3"]));
        assert_eq!(visible_devices("-1"), Vec::<String>::new());
        assert_eq!(visible_devices(""), Vec::<String>::new());
        assert_eq!(visible_devices("1,-1,0"), ids(&["1"]));
        assert_eq!(
            visible_devices("GPU-8f1c2d, MIG-4b1e/1/0"),
            ids(&["GPU-8f1c2d", "MIG-4b1e/1/0"])
        );
        assert_eq!(visible_devices("0,0,1"), ids(&["0", "1"]));
        assert_eq!(visible_devices("nvidia0"), Vec::<String>::new());
    }

    const LISTING: &str = "\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-aaaa)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-22222222-bbbb)
  MIG 3g.20gb     Device  0: (UUID: MIG-33333333-cccc)
  MIG 1g.5gb      Device  1: (UUID: MIG-44444444-dddd)
";
    const MEMORY: &str = "0, GPU-11111111-aaaa, 81559\n1, GPU-22222222-bbbb, 40960\n";

    #[test]
    fn reads_nvidia_smi() {
        let smi = Smi::parse(LISTING, MEMORY);
        assert_eq!(
            smi.devices(),
            ids(&["0", "MIG-33333333-cccc", "MIG-44444444-dddd"])
        );
        assert_eq!(smi.mem_mb("0"), Some(81559));
        assert_eq!(smi.mem_mb("GPU-1111"), Some(81559));
        assert_eq!(smi.mem_mb("1"), Some(40960));
        assert_eq!(smi.mem_mb("MIG-33333333-cccc"), Some(20 * 1024));
        assert_eq!(smi.mem_mb("MIG-44444444"), Some(5 * 1024));
        assert_eq!(smi.mem_mb("7"), None);
        // No memory query: devices are still listed, their memory unknown.
        let smi = Smi::parse(LISTING, "");
        assert_eq!(smi.devices().len(), 3);
        assert_eq!(smi.mem_mb("0"), None);
    }
}
