//! GPU usage sampled during a run: each sampled GPU's utilisation and memory over the run's
//! wall time, kept beside the run record, not inside it (`status` and `runs` load run records
//! and summaries; a series of hours must not make them slower).
//!
//! ```text
//! gpu_usage    run id (u64 big-endian)     → GpuUsage
//! ```
//!
//! The series are fixed-width buckets counted from the run's start: bucket `i` covers
//! `[start + i·bucket_ms, start + (i+1)·bucket_ms)`. A bucket holds how many samples fell in
//! it, their mean utilisation and their peak memory. Buckets begin one sampling interval wide;
//! when a sample would fall past [`MAX_BUCKETS`], every series is halved (neighbouring buckets
//! merged, the width doubled), so a run of any length keeps between `MAX_BUCKETS / 2` and
//! `MAX_BUCKETS` buckets per GPU: about 13 KB of JSON each, 2 Hz or not, 10 minutes or 10 hours.
//!
//! The runner saves the record as it samples (see `runner/src/gpu_usage.rs`), so a runner
//! killed mid-run leaves what it had saved. `gc` drops the record with its run.

use serde::{Deserialize, Serialize};

use super::journal::{Op, TreeId};
use super::meta::{decode_u64, display_key, get_json, to_json};
use super::{Millis, Store, StoreError};

/// The sled tree.
pub(super) const TREE: &str = "gpu_usage";

/// The most buckets a GPU's series holds before the series are halved.
pub const MAX_BUCKETS: usize = 1024;

/// What was sampled of a run's GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuUsage {
    pub run: u64,
    /// What sampled: `nvml` or `nvidia-smi`.
    pub source: String,
    /// How often each GPU was sampled (ms).
    pub interval_ms: u64,
    /// When bucket 0 begins: the run's start.
    pub start: Millis,
    /// The width of every bucket (ms): `interval_ms` at first, doubled by each halving.
    pub bucket_ms: u64,
    /// The run's GPUs that could be sampled, in the run's order. A GPU the machine does not
    /// have (`--gpus 4` on a laptop) is not here.
    pub gpus: Vec<GpuSeries>,
}

/// One GPU's series, as parallel arrays (one entry per bucket): compact in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSeries {
    /// The id the run handed its steps (`CUDA_VISIBLE_DEVICES`), as their attempts record it:
    /// an index (`0`), a UUID (`GPU-…`) or a MIG id (`MIG-…`).
    pub id: String,
    /// The physical GPU sampled for it (for a MIG id, the GPU it is part of): its index in PCI
    /// bus order (nvidia-smi's and NVML's), UUID and name.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: u64,
    /// Samples in each bucket (0: none, e.g. before the sampler's first).
    pub n: Vec<u32>,
    /// Mean utilisation (%) of each bucket's samples, to 0.1; `null` where none had one (an
    /// empty bucket, or a GPU in MIG mode, which reports no utilisation).
    pub util: Vec<Option<f32>>,
    /// Most memory used (MiB) among each bucket's samples.
    pub memory_mib: Vec<u64>,
}

/// One reading of one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuSample {
    /// Utilisation in percent (the share of the last sample period in which a kernel ran), when
    /// the GPU reports one.
    pub util: Option<u32>,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
}

/// Which physical GPU a series samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIdentity {
    pub index: u32,
    pub uuid: String,
    pub name: String,
}

impl GpuUsage {
    pub fn new(run: u64, source: &str, interval_ms: u64, start: Millis) -> GpuUsage {
        GpuUsage {
            run,
            source: source.to_string(),
            interval_ms,
            start,
            bucket_ms: interval_ms.max(1),
            gpus: Vec::new(),
        }
    }

    /// Add an empty series for the run's GPU `id`, sampled as `gpu`; returns its position.
    pub fn add_gpu(&mut self, id: &str, gpu: &GpuIdentity) -> usize {
        self.gpus.push(GpuSeries {
            id: id.to_string(),
            index: gpu.index,
            uuid: gpu.uuid.clone(),
            name: gpu.name.clone(),
            memory_total_mib: 0,
            n: Vec::new(),
            util: Vec::new(),
            memory_mib: Vec::new(),
        });
        self.gpus.len() - 1
    }

    /// Count `sample`, taken at `at`, in series `gpu`'s bucket (a sample from before the start
    /// counts in the first bucket), halving every series first if it would fall past
    /// [`MAX_BUCKETS`].
    pub fn record(&mut self, gpu: usize, at: Millis, sample: GpuSample) {
        let offset = at.saturating_sub(self.start);
        while (offset / self.bucket_ms) as usize >= MAX_BUCKETS {
            self.halve();
        }
        let i = (offset / self.bucket_ms) as usize;
        let series = &mut self.gpus[gpu];
        if series.n.len() <= i {
            series.n.resize(i + 1, 0);
            series.util.resize(i + 1, None);
            series.memory_mib.resize(i + 1, 0);
        }
        series.memory_total_mib = series.memory_total_mib.max(sample.memory_total_mib);
        series.util[i] = merge_util(
            (series.util[i], series.n[i]),
            (sample.util.map(|u| u as f32), 1),
        );
        series.n[i] += 1;
        series.memory_mib[i] = series.memory_mib[i].max(sample.memory_used_mib);
    }

    /// Merge each pair of neighbouring buckets of every series; the width doubles.
    pub fn halve(&mut self) {
        self.bucket_ms *= 2;
        for s in &mut self.gpus {
            let pairs = s.n.len().div_ceil(2);
            let (mut n, mut util, mut memory) = (
                Vec::with_capacity(pairs),
                Vec::with_capacity(pairs),
                Vec::with_capacity(pairs),
            );
            for i in (0..s.n.len()).step_by(2) {
                // A last bucket without a neighbour merges with an empty one.
                let (next_util, next_n, next_memory) = match s.n.get(i + 1) {
                    Some(&next_n) => (s.util[i + 1], next_n, s.memory_mib[i + 1]),
                    None => (None, 0, 0),
                };
                n.push(s.n[i] + next_n);
                util.push(merge_util((s.util[i], s.n[i]), (next_util, next_n)));
                memory.push(s.memory_mib[i].max(next_memory));
            }
            s.n = n;
            s.util = util;
            s.memory_mib = memory;
        }
    }
}

/// The mean of two means weighted by their sample counts, to 0.1 %.
fn merge_util(a: (Option<f32>, u32), b: (Option<f32>, u32)) -> Option<f32> {
    let mean = match (a, b) {
        ((Some(x), wx), (Some(y), wy)) if wx + wy > 0 => {
            (x as f64 * wx as f64 + y as f64 * wy as f64) / (wx + wy) as f64
        }
        ((Some(x), _), _) | (_, (Some(x), _)) => x as f64,
        _ => return None,
    };
    Some(((mean * 10.0).round() / 10.0) as f32)
}

impl GpuSeries {
    /// Samples taken in all.
    pub fn samples(&self) -> u64 {
        self.n.iter().map(|&n| n as u64).sum()
    }

    /// Mean utilisation (%) over the samples that had one: the GPU's busy share of the run,
    /// since samples are evenly spaced over it. Within 0.05 of the samples' own mean (bucket
    /// means are kept to 0.1). `None` when no sample had one.
    pub fn busy_percent(&self) -> Option<f64> {
        let (mut sum, mut count) = (0.0, 0u64);
        for (u, &n) in self.util.iter().zip(&self.n) {
            if let Some(u) = u {
                sum += *u as f64 * n as f64;
                count += n as u64;
            }
        }
        (count > 0).then(|| sum / count as f64)
    }

    /// The most memory any sample saw in use (MiB).
    pub fn memory_peak_mib(&self) -> u64 {
        self.memory_mib.iter().copied().max().unwrap_or(0)
    }
}

impl Store {
    /// Insert or replace the GPU usage of run `usage.run`, then flush (a runner killed later
    /// keeps it). Refused, writing nothing, when the disk lacks room (see `space.rs`).
    pub fn put_gpu_usage(&self, usage: &GpuUsage) -> Result<(), StoreError> {
        let value = to_json(usage);
        self.ensure_room(value.len() as u64)?;
        let op = Op::insert(TreeId::GpuUsage, usage.run.to_be_bytes(), value);
        self.write(|| Ok((vec![op], ())))
    }

    /// The GPU usage sampled during run `id`; `None` when nothing was (no GPU, or none the
    /// machine has, or a run from before needle sampled).
    pub fn gpu_usage(&self, id: u64) -> Result<Option<GpuUsage>, StoreError> {
        get_json(&self.trees.gpu_usage, TREE, &id.to_be_bytes())
    }

    /// Run ids of the `gpu_usage` tree whose run `keep` does not keep, as keys to remove.
    pub(super) fn gpu_usage_keys_without(
        &self,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self.trees.gpu_usage.iter() {
            let (key, _) = item?;
            match decode_u64(Some(&key)) {
                Some(id) if keep(id) => {}
                Some(_) => out.push(key.to_vec()),
                None => {
                    return Err(StoreError::corrupt(format!(
                        "key `{}` of tree `gpu_usage`",
                        display_key(&key)
                    )));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LockMode;

    fn gpu() -> GpuIdentity {
        GpuIdentity {
            index: 0,
            uuid: "GPU-0".into(),
            name: "Test GPU".into(),
        }
    }

    fn sample(util: u32, mem: u64) -> GpuSample {
        GpuSample {
            util: Some(util),
            memory_used_mib: mem,
            memory_total_mib: 1000,
        }
    }

    #[test]
    fn samples_fall_in_buckets_from_the_start() {
        let mut u = GpuUsage::new(1, "nvidia-smi", 500, 10_000);
        let g = u.add_gpu("0", &gpu());
        u.record(g, 10_000, sample(10, 100));
        u.record(g, 10_499, sample(30, 300));
        u.record(g, 11_200, sample(50, 200));
        // Before the start: the first bucket.
        u.record(g, 9_000, sample(70, 50));
        let s = &u.gpus[g];
        assert_eq!(s.n, vec![3, 0, 1]);
        assert_eq!(s.util, vec![Some(36.7), None, Some(50.0)]);
        assert_eq!(s.memory_mib, vec![300, 0, 200]);
        assert_eq!(s.memory_total_mib, 1000);
        assert_eq!(s.samples(), 4);
        // (36.7 · 3 + 50) / 4: the bucket means are kept to 0.1 %.
        let busy = s.busy_percent().unwrap();
        assert!((busy - 40.0).abs() <= 0.05, "{busy}");
        assert_eq!(s.memory_peak_mib(), 300);
    }

    #[test]
    fn a_long_run_is_halved_within_the_cap_and_keeps_its_mean_and_peak() {
        // Four hours at 2 Hz on two GPUs: 28,800 samples each.
        let mut u = GpuUsage::new(1, "nvml", 500, 0);
        let a = u.add_gpu("0", &gpu());
        let b = u.add_gpu("1", &gpu());
        let mut sum = 0u64;
        for k in 0..28_800u64 {
            let util = (k % 100) as u32;
            sum += util as u64;
            let mem = if k == 12_345 { 900 } else { 100 + k % 7 };
            u.record(a, k * 500, sample(util, mem));
            u.record(b, k * 500 + 250, sample(50, 10));
        }
        for s in &u.gpus {
            assert!(
                s.n.len() <= MAX_BUCKETS && s.n.len() > MAX_BUCKETS / 2,
                "{}",
                s.n.len()
            );
            assert_eq!(s.samples(), 28_800);
        }
        // 14,400,000 ms over at most 1,024 buckets: 500 ms doubled five times.
        assert_eq!(u.bucket_ms, 16_000);
        let exact = sum as f64 / 28_800.0;
        let busy = u.gpus[a].busy_percent().unwrap();
        assert!((busy - exact).abs() < 0.05, "{busy} vs {exact}");
        assert_eq!(u.gpus[a].memory_peak_mib(), 900);
        assert_eq!(u.gpus[b].busy_percent(), Some(50.0));
        let json = serde_json::to_vec(&u).unwrap();
        assert!(json.len() < 40_000, "{} bytes", json.len());
    }

    #[test]
    fn halving_merges_pairs_weighted_by_their_samples() {
        let mut u = GpuUsage::new(1, "nvml", 100, 0);
        let g = u.add_gpu("0", &gpu());
        u.record(g, 0, sample(10, 1));
        u.record(g, 0, sample(10, 1));
        u.record(g, 100, sample(40, 5));
        u.record(g, 250, sample(0, 2));
        u.halve();
        let s = &u.gpus[g];
        assert_eq!(u.bucket_ms, 200);
        // The third bucket has no neighbour: it keeps its own values.
        assert_eq!(s.n, vec![3, 1]);
        assert_eq!(s.util, vec![Some(20.0), Some(0.0)]);
        assert_eq!(s.memory_mib, vec![5, 2]);
        u.halve();
        assert_eq!(u.gpus[g].n, vec![4]);
        assert_eq!(u.gpus[g].util, vec![Some(15.0)]);
    }

    #[test]
    fn a_gpu_without_utilisation_has_memory_but_no_busy_share() {
        let mut u = GpuUsage::new(1, "nvidia-smi", 500, 0);
        let g = u.add_gpu("MIG-1", &gpu());
        u.record(
            g,
            0,
            GpuSample {
                util: None,
                memory_used_mib: 42,
                memory_total_mib: 80,
            },
        );
        assert_eq!(u.gpus[g].util, vec![None]);
        assert_eq!(u.gpus[g].busy_percent(), None);
        assert_eq!(u.gpus[g].memory_peak_mib(), 42);
    }

    #[test]
    fn the_store_keeps_it_apart_from_the_run_and_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        let mut u = GpuUsage::new(7, "nvidia-smi", 500, 1_000);
        let g = u.add_gpu("GPU-0", &gpu());
        u.record(g, 1_600, sample(25, 512));
        {
            let store = Store::open(&root, LockMode::Fail).unwrap();
            assert_eq!(store.gpu_usage(7).unwrap(), None);
            store.put_gpu_usage(&u).unwrap();
            assert_eq!(store.run(7).unwrap(), None);
        }
        let store = Store::open(&root, LockMode::Fail).unwrap();
        assert_eq!(store.gpu_usage(7).unwrap(), Some(u));
        assert_eq!(store.gpu_usage(8).unwrap(), None);
    }
}
