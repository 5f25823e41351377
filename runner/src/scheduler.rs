//! Which ready step starts next: a pure function of the ready set and the free resources.
//!
//! Preconditions for a step to start: it is ready (every input committed, its key not in the
//! store) and its shape (GPUs, CPU slots, memory) fits what is free. Among those, the step with
//! the longest remaining path to a sink starts first; ties go to the larger GPU need (big
//! allocations are hardest to place later), then to the earlier step. A step that does not fit
//! never blocks smaller ones behind it (backfilling).
//!
//! GPUs are packed, never over-committed: a step holding whole GPUs holds them alone; a step
//! asking for part of a GPU (a share of its compute, an amount of its memory, or both) goes on
//! one GPU that has that much of both left and is not held whole, the fullest such GPU first
//! (best fit), so that empty GPUs stay free for whole-GPU steps.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use needle_core::recipe::{GpuRequest, Resources};

/// A GPU's compute, counted in these units: 720,720 is divisible by every k up to 16, so
/// `gpus = 1/k` written to enough digits packs exactly k steps on a GPU.
pub const SHARE_UNITS: u32 = 720_720;

/// The units of a share in (0, 1): rounded to the nearest, at least one.
pub fn share_units(share: f64) -> u32 {
    ((share * SHARE_UNITS as f64).round() as u32).clamp(1, SHARE_UNITS)
}

/// What a step needs of the GPUs, in the units the pool counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GpuNeed {
    None,
    /// `count` GPUs held alone, each with at least `mem_mb` of memory.
    Whole {
        count: u32,
        mem_mb: u64,
    },
    /// Part of one GPU: `units` of its compute (0: memory only) and `mem_mb` of its memory.
    Part {
        units: u32,
        mem_mb: u64,
    },
}

impl GpuNeed {
    pub fn of(r: &GpuRequest) -> GpuNeed {
        let mb = |gb: Option<f64>| gb.map_or(0, gb_to_mb);
        match *r {
            GpuRequest::None => GpuNeed::None,
            GpuRequest::Whole { count, mem_gb } => GpuNeed::Whole {
                count,
                mem_mb: mb(mem_gb),
            },
            GpuRequest::Part { share, mem_gb } => GpuNeed::Part {
                units: share.map_or(0, share_units),
                mem_mb: mb(mem_gb),
            },
        }
    }

    /// How much GPU this is, for ranking ties: whole GPUs count all their units.
    fn weight(&self) -> u64 {
        match *self {
            GpuNeed::None => 0,
            GpuNeed::Whole { count, .. } => count as u64 * SHARE_UNITS as u64,
            GpuNeed::Part { units, .. } => units as u64,
        }
    }
}

/// GB as the pool counts memory: MB, rounded up.
pub fn gb_to_mb(gb: f64) -> u64 {
    (gb * 1024.0).ceil() as u64
}

/// What a step needs, in the units the pool counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shape {
    pub gpus: GpuNeed,
    pub cpus: u32,
    pub mem_mb: u64,
}

impl Shape {
    /// The shape of `r`, with CPU slots clamped to what the pool has (a step asking for more
    /// CPUs than the machine has still runs, alone). In a run without any GPU, a step asking
    /// for GPUs runs on the CPU: the ops fall back to it when `CUDA_VISIBLE_DEVICES` is empty.
    pub fn of(r: &Resources, total_cpus: u32, has_gpus: bool) -> Shape {
        Shape {
            gpus: if has_gpus {
                GpuNeed::of(&r.gpus)
            } else {
                GpuNeed::None
            },
            cpus: r.cpus.clamp(1, total_cpus.max(1)),
            mem_mb: gb_to_mb(r.mem_gb),
        }
    }
}

/// The GPUs a step holds while it runs, as indices into the run's GPU list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuGrant {
    None,
    Whole(Vec<usize>),
    Part { gpu: usize, units: u32, mem_mb: u64 },
}

impl GpuGrant {
    /// How much GPU it holds, in share units: whole GPUs count all theirs.
    pub fn units(&self) -> u64 {
        match self {
            GpuGrant::None => 0,
            GpuGrant::Whole(gpus) => gpus.len() as u64 * SHARE_UNITS as u64,
            GpuGrant::Part { units, .. } => *units as u64,
        }
    }

    /// Indices of the GPUs it runs on.
    pub fn gpus(&self) -> Vec<usize> {
        match self {
            GpuGrant::None => Vec::new(),
            GpuGrant::Whole(gpus) => gpus.clone(),
            GpuGrant::Part { gpu, .. } => vec![*gpu],
        }
    }
}

/// The resources a step holds while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub gpu: GpuGrant,
    pub cpus: u32,
    pub mem_mb: u64,
}

/// One GPU of the pool.
#[derive(Debug, Clone)]
struct Device {
    /// Its memory, where known; a step asking for GPU memory never goes on one that is not.
    capacity_mb: Option<u64>,
    /// Held whole by a step.
    whole: bool,
    /// Compute units and memory not held by the steps sharing it.
    free_units: u32,
    free_mem_mb: u64,
    /// Steps sharing it now.
    parts: u32,
}

impl Device {
    fn empty(&self) -> bool {
        !self.whole && self.parts == 0
    }

    fn holds_whole(&self, mem_mb: u64) -> bool {
        self.empty() && (mem_mb == 0 || self.capacity_mb.is_some_and(|c| c >= mem_mb))
    }

    fn holds_part(&self, units: u32, mem_mb: u64) -> bool {
        !self.whole
            && self.free_units >= units
            && (mem_mb == 0 || (self.capacity_mb.is_some() && self.free_mem_mb >= mem_mb))
    }
}

/// Free resources. GPUs are the run's devices by index; CPU slots and memory are counts.
#[derive(Debug, Clone)]
pub struct Pool {
    gpus: Vec<Device>,
    free_cpus: u32,
    free_mem_mb: u64,
}

impl Pool {
    /// A pool of the GPUs whose memory (MB, where known) `gpu_mem_mb` lists, in that order.
    pub fn new(gpu_mem_mb: &[Option<u64>], cpus: u32, mem_mb: u64) -> Pool {
        Pool {
            gpus: gpu_mem_mb
                .iter()
                .map(|&capacity_mb| Device {
                    capacity_mb,
                    whole: false,
                    free_units: SHARE_UNITS,
                    free_mem_mb: capacity_mb.unwrap_or(0),
                    parts: 0,
                })
                .collect(),
            free_cpus: cpus,
            free_mem_mb: mem_mb,
        }
    }

    pub fn fits(&self, s: Shape) -> bool {
        s.cpus <= self.free_cpus && s.mem_mb <= self.free_mem_mb && self.gpus_for(s.gpus).is_some()
    }

    /// The GPUs `need` would take now, or `None` if it does not fit: whole ones, lowest index
    /// first; part of the fullest GPU that has room (then the lowest index).
    fn gpus_for(&self, need: GpuNeed) -> Option<GpuGrant> {
        match need {
            GpuNeed::None => Some(GpuGrant::None),
            GpuNeed::Whole { count, mem_mb } => {
                let free: Vec<usize> = (0..self.gpus.len())
                    .filter(|&g| self.gpus[g].holds_whole(mem_mb))
                    .take(count as usize)
                    .collect();
                (free.len() == count as usize).then_some(GpuGrant::Whole(free))
            }
            GpuNeed::Part { units, mem_mb } => (0..self.gpus.len())
                .filter(|&g| self.gpus[g].holds_part(units, mem_mb))
                .min_by_key(|&g| (self.gpus[g].free_units, self.gpus[g].free_mem_mb, g))
                .map(|gpu| GpuGrant::Part { gpu, units, mem_mb }),
        }
    }

    /// Take `s` from the pool.
    pub fn take(&mut self, s: Shape) -> Option<Grant> {
        if !self.fits(s) {
            return None;
        }
        let gpu = self.gpus_for(s.gpus)?;
        match &gpu {
            GpuGrant::None => {}
            GpuGrant::Whole(gpus) => {
                for &g in gpus {
                    self.gpus[g].whole = true;
                }
            }
            GpuGrant::Part { gpu, units, mem_mb } => {
                let d = &mut self.gpus[*gpu];
                d.parts += 1;
                d.free_units -= units;
                d.free_mem_mb -= mem_mb;
            }
        }
        self.free_cpus -= s.cpus;
        self.free_mem_mb -= s.mem_mb;
        Some(Grant {
            gpu,
            cpus: s.cpus,
            mem_mb: s.mem_mb,
        })
    }

    pub fn give_back(&mut self, g: &Grant) {
        match &g.gpu {
            GpuGrant::None => {}
            GpuGrant::Whole(gpus) => {
                for &i in gpus {
                    self.gpus[i].whole = false;
                }
            }
            GpuGrant::Part { gpu, units, mem_mb } => {
                let d = &mut self.gpus[*gpu];
                d.parts -= 1;
                d.free_units += units;
                d.free_mem_mb += mem_mb;
            }
        }
        self.free_cpus += g.cpus;
        self.free_mem_mb += g.mem_mb;
    }
}

/// Ready steps, grouped by shape so that finding the best fitting one costs O(shapes · log n)
/// rather than a scan of every ready step.
#[derive(Debug, Default)]
pub struct ReadyQueue {
    by_shape: BTreeMap<Shape, BinaryHeap<(u64, Reverse<usize>)>>,
}

impl ReadyQueue {
    pub fn push(&mut self, node: usize, priority: u64, shape: Shape) {
        self.by_shape
            .entry(shape)
            .or_default()
            .push((priority, Reverse(node)));
    }

    pub fn is_empty(&self) -> bool {
        self.by_shape.is_empty()
    }

    /// Remove and return the best ready step that fits `pool` and needs at most `gpu_room`
    /// GPU share units (a run's `--max-gpus`), with its shape.
    pub fn pop_fitting(&mut self, pool: &Pool, gpu_room: u64) -> Option<(usize, Shape)> {
        // Rank: remaining path, then GPUs, then the earlier node.
        type Rank = (u64, u64, Reverse<usize>);
        let mut best: Option<(Shape, Rank)> = None;
        for (shape, heap) in &self.by_shape {
            let Some(&(priority, node)) = heap.peek() else {
                continue;
            };
            if !pool.fits(*shape) || shape.gpus.weight() > gpu_room {
                continue;
            }
            let rank = (priority, shape.gpus.weight(), node);
            if best.as_ref().is_none_or(|(_, b)| rank > *b) {
                best = Some((*shape, rank));
            }
        }
        let (shape, _) = best?;
        let heap = self.by_shape.get_mut(&shape)?;
        let (_, Reverse(node)) = heap.pop()?;
        if heap.is_empty() {
            self.by_shape.remove(&shape);
        }
        Some((node, shape))
    }

    /// Drop every queued step (on interrupt), returning them.
    pub fn drain(&mut self) -> Vec<usize> {
        let mut out: Vec<usize> = self
            .by_shape
            .values_mut()
            .flat_map(|h| h.drain().map(|(_, Reverse(n))| n))
            .collect();
        out.sort_unstable();
        self.by_shape.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(gpus: u32) -> Shape {
        Shape {
            gpus: if gpus == 0 {
                GpuNeed::None
            } else {
                GpuNeed::Whole {
                    count: gpus,
                    mem_mb: 0,
                }
            },
            cpus: 1,
            mem_mb: 0,
        }
    }

    fn part(share: f64, gpu_mem_gb: f64) -> Shape {
        Shape {
            gpus: GpuNeed::Part {
                units: if share > 0.0 { share_units(share) } else { 0 },
                mem_mb: gb_to_mb(gpu_mem_gb),
            },
            cpus: 1,
            mem_mb: 0,
        }
    }

    fn pool(gpus: usize, mem_gb: Option<f64>) -> Pool {
        Pool::new(&vec![mem_gb.map(gb_to_mb); gpus], 64, 0)
    }

    fn on(g: &Grant) -> Vec<usize> {
        g.gpu.gpus()
    }

    #[test]
    fn longest_path_first() {
        let pool = Pool::new(&[], 4, 0);
        let mut q = ReadyQueue::default();
        q.push(0, 1, shape(0));
        q.push(1, 5, shape(0));
        q.push(2, 3, shape(0));
        let order: Vec<usize> =
            std::iter::from_fn(|| q.pop_fitting(&pool, u64::MAX).map(|(n, _)| n)).collect();
        assert_eq!(order, vec![1, 2, 0]);
    }

    #[test]
    fn ties_prefer_more_gpus_then_earlier_node() {
        let pool = pool(4, None);
        let mut q = ReadyQueue::default();
        q.push(3, 1, shape(1));
        q.push(1, 1, shape(4));
        q.push(2, 1, shape(1));
        q.push(4, 1, part(0.5, 0.0));
        assert_eq!(q.pop_fitting(&pool, u64::MAX).unwrap().0, 1);
        assert_eq!(q.pop_fitting(&pool, u64::MAX).unwrap().0, 2);
        assert_eq!(q.pop_fitting(&pool, u64::MAX).unwrap().0, 3);
        assert_eq!(q.pop_fitting(&pool, u64::MAX).unwrap().0, 4);
    }

    #[test]
    fn backfills_what_fits() {
        let mut pool = pool(4, None);
        let held = pool.take(shape(3)).unwrap();
        assert_eq!(on(&held), vec![0, 1, 2]);
        let mut q = ReadyQueue::default();
        q.push(0, 9, shape(2));
        q.push(1, 1, shape(1));
        assert_eq!(q.pop_fitting(&pool, u64::MAX).unwrap().0, 1);
        assert!(q.pop_fitting(&pool, u64::MAX).is_none());
        pool.give_back(&held);
        assert_eq!(q.pop_fitting(&pool, u64::MAX).unwrap().0, 0);
    }

    #[test]
    fn a_runs_gpu_room_leaves_out_what_needs_more() {
        let pool = pool(4, None);
        let mut q = ReadyQueue::default();
        q.push(0, 9, shape(2));
        q.push(1, 5, part(0.5, 0.0));
        q.push(2, 1, shape(0));
        // Room for one GPU: the two-GPU step waits, the half and the CPU step go.
        let room = SHARE_UNITS as u64;
        assert_eq!(q.pop_fitting(&pool, room).unwrap().0, 1);
        assert_eq!(q.pop_fitting(&pool, room / 4).unwrap().0, 2);
        assert!(q.pop_fitting(&pool, room).is_none());
        assert_eq!(q.pop_fitting(&pool, 2 * room).unwrap().0, 0);
        let held = Pool::new(&[None; 2], 4, 0).take(shape(2)).unwrap();
        assert_eq!(held.gpu.units(), 2 * room);
    }

    #[test]
    fn grants_distinct_gpus() {
        let mut pool = pool(3, None);
        let a = pool.take(shape(2)).unwrap();
        let b = pool.take(shape(1)).unwrap();
        assert_eq!(on(&a), vec![0, 1]);
        assert_eq!(on(&b), vec![2]);
        assert!(pool.take(shape(1)).is_none());
        assert!(
            pool.take(part(0.1, 0.0)).is_none(),
            "a whole GPU is never shared"
        );
    }

    #[test]
    fn quarter_shares_pack_four_on_one_gpu() {
        let mut pool = pool(1, None);
        let grants: Vec<Grant> = (0..4)
            .map(|_| pool.take(part(0.25, 0.0)).unwrap())
            .collect();
        assert!(grants.iter().all(|g| on(g) == vec![0]));
        assert!(pool.take(part(0.25, 0.0)).is_none());
        pool.give_back(&grants[2]);
        assert!(pool.take(part(0.25, 0.0)).is_some());
    }

    #[test]
    fn shares_written_as_decimals_pack_exactly() {
        for (share, k) in [
            (0.333333, 3),
            (0.166667, 6),
            (0.16666, 6),
            (0.17, 5),
            (0.1, 10),
            (0.0625, 16),
        ] {
            let mut pool = pool(1, None);
            let n = std::iter::from_fn(|| pool.take(part(share, 0.0))).count();
            assert_eq!(n, k, "gpus = {share}");
        }
    }

    #[test]
    fn half_and_three_quarters_never_share() {
        let mut pool = pool(2, None);
        let a = pool.take(part(0.5, 0.0)).unwrap();
        let b = pool.take(part(0.75, 0.0)).unwrap();
        assert_ne!(on(&a), on(&b));
        // A third GPU's worth is not there: 0.5 fits beside the 0.5 only.
        assert!(pool.take(part(0.75, 0.0)).is_none());
        assert_eq!(on(&pool.take(part(0.5, 0.0)).unwrap()), on(&a));
    }

    #[test]
    fn whole_gpu_waits_for_an_empty_one() {
        let mut pool = pool(1, None);
        let small = pool.take(part(0.1, 0.0)).unwrap();
        assert!(!pool.fits(shape(1)));
        let mut q = ReadyQueue::default();
        q.push(0, 9, shape(1));
        q.push(1, 1, part(0.25, 0.0));
        // The whole-GPU step cannot start; the share backfills.
        assert_eq!(q.pop_fitting(&pool, u64::MAX).unwrap().0, 1);
        pool.give_back(&small);
        assert!(pool.take(shape(1)).is_some());
    }

    #[test]
    fn parts_go_to_the_fullest_gpu_that_has_room() {
        let mut pool = pool(3, None);
        let a = pool.take(part(0.5, 0.0)).unwrap();
        assert_eq!(on(&a), vec![0]);
        // Best fit: beside `a`, not on an empty GPU, which stays free for a whole step.
        assert_eq!(on(&pool.take(part(0.25, 0.0)).unwrap()), vec![0]);
        assert_eq!(on(&pool.take(part(0.5, 0.0)).unwrap()), vec![1]);
        assert_eq!(on(&pool.take(shape(1)).unwrap()), vec![2]);
    }

    #[test]
    fn memory_packs_against_capacity() {
        let mut pool = pool(2, Some(16.0));
        // Memory alone: two 6 GB steps per 16 GB GPU.
        let grants: Vec<Grant> = std::iter::from_fn(|| pool.take(part(0.0, 6.0))).collect();
        assert_eq!(grants.len(), 4);
        assert_eq!(grants.iter().filter(|g| on(g) == vec![0]).count(), 2);
        // Share and memory together: whichever runs out first.
        let mut pool = self::pool(1, Some(16.0));
        assert!(pool.take(part(0.25, 10.0)).is_some());
        assert!(pool.take(part(0.25, 10.0)).is_none());
        assert!(pool.take(part(0.25, 6.0)).is_some());
        // A whole GPU asking for more memory than any has never fits.
        assert!(!self::pool(1, Some(16.0)).fits(Shape {
            gpus: GpuNeed::Whole {
                count: 1,
                mem_mb: gb_to_mb(40.0)
            },
            cpus: 1,
            mem_mb: 0
        }));
    }

    #[test]
    fn gpu_memory_needs_a_known_capacity() {
        let pool = pool(1, None);
        assert!(!pool.fits(part(0.25, 1.0)));
        assert!(pool.fits(part(0.25, 0.0)));
    }

    #[test]
    fn cpus_clamp_to_pool() {
        let r = Resources {
            gpus: GpuRequest::None,
            cpus: 16,
            mem_gb: 0.5,
        };
        assert_eq!(
            Shape::of(&r, 2, true),
            Shape {
                gpus: GpuNeed::None,
                cpus: 2,
                mem_mb: 512
            }
        );
    }

    #[test]
    fn no_gpus_run_on_the_cpu() {
        let r = Resources {
            gpus: GpuRequest::Part {
                share: Some(0.25),
                mem_gb: Some(6.0),
            },
            cpus: 1,
            mem_gb: 0.0,
        };
        assert_eq!(Shape::of(&r, 2, false).gpus, GpuNeed::None);
    }
}
