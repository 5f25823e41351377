//! Which ready step starts next: a pure function of the ready set and the free resources.
//!
//! Preconditions for a step to start: it is ready (every input committed, its key not in the
//! store) and its shape (GPUs, CPU slots, memory) fits what is free. Among those, the step with
//! the longest remaining path to a sink starts first; ties go to the larger GPU count (big
//! allocations are hardest to place later), then to the earlier step. A step that does not fit
//! never blocks smaller ones behind it (backfilling).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use needle_core::recipe::Resources;

/// What a step needs, in the units the pool counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shape {
    pub gpus: u32,
    pub cpus: u32,
    pub mem_mb: u64,
}

impl Shape {
    /// The shape of `r`, with CPU slots clamped to what the pool has (a step asking for more
    /// CPUs than the machine has still runs, alone). In a run without any GPU, a step asking
    /// for GPUs runs on the CPU: the ops fall back to it when `CUDA_VISIBLE_DEVICES` is empty.
    pub fn of(r: &Resources, total_cpus: u32, total_gpus: u32) -> Shape {
        Shape {
            gpus: if total_gpus == 0 { 0 } else { r.gpus },
            cpus: r.cpus.clamp(1, total_cpus.max(1)),
            mem_mb: (r.mem_gb * 1024.0).ceil() as u64,
        }
    }
}

/// The resources a step holds while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub gpus: Vec<u32>,
    pub cpus: u32,
    pub mem_mb: u64,
}

/// Free resources. GPUs are concrete ids; CPU slots and memory are counts.
#[derive(Debug, Clone)]
pub struct Pool {
    free_gpus: BTreeSet<u32>,
    free_cpus: u32,
    free_mem_mb: u64,
}

impl Pool {
    pub fn new(gpus: &[u32], cpus: u32, mem_mb: u64) -> Pool {
        Pool {
            free_gpus: gpus.iter().copied().collect(),
            free_cpus: cpus,
            free_mem_mb: mem_mb,
        }
    }

    pub fn fits(&self, s: Shape) -> bool {
        s.gpus as usize <= self.free_gpus.len()
            && s.cpus <= self.free_cpus
            && s.mem_mb <= self.free_mem_mb
    }

    /// Take `s` from the pool: the lowest free GPU ids.
    pub fn take(&mut self, s: Shape) -> Option<Grant> {
        if !self.fits(s) {
            return None;
        }
        let gpus: Vec<u32> = self
            .free_gpus
            .iter()
            .take(s.gpus as usize)
            .copied()
            .collect();
        for g in &gpus {
            self.free_gpus.remove(g);
        }
        self.free_cpus -= s.cpus;
        self.free_mem_mb -= s.mem_mb;
        Some(Grant {
            gpus,
            cpus: s.cpus,
            mem_mb: s.mem_mb,
        })
    }

    pub fn give_back(&mut self, g: &Grant) {
        self.free_gpus.extend(g.gpus.iter().copied());
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

    /// Remove and return the best ready step that fits `pool`, with its shape.
    pub fn pop_fitting(&mut self, pool: &Pool) -> Option<(usize, Shape)> {
        // Rank: remaining path, then GPUs, then the earlier node.
        type Rank = (u64, u32, Reverse<usize>);
        let mut best: Option<(Shape, Rank)> = None;
        for (shape, heap) in &self.by_shape {
            let Some(&(priority, node)) = heap.peek() else {
                continue;
            };
            if !pool.fits(*shape) {
                continue;
            }
            let rank = (priority, shape.gpus, node);
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
            gpus,
            cpus: 1,
            mem_mb: 0,
        }
    }

    #[test]
    fn longest_path_first() {
        let pool = Pool::new(&[], 4, 0);
        let mut q = ReadyQueue::default();
        q.push(0, 1, shape(0));
        q.push(1, 5, shape(0));
        q.push(2, 3, shape(0));
        let order: Vec<usize> =
            std::iter::from_fn(|| q.pop_fitting(&pool).map(|(n, _)| n)).collect();
        assert_eq!(order, vec![1, 2, 0]);
    }

    #[test]
    fn ties_prefer_more_gpus_then_earlier_node() {
        let pool = Pool::new(&[0, 1, 2, 3], 8, 0);
        let mut q = ReadyQueue::default();
        q.push(3, 1, shape(1));
        q.push(1, 1, shape(4));
        q.push(2, 1, shape(1));
        assert_eq!(q.pop_fitting(&pool).unwrap().0, 1);
        assert_eq!(q.pop_fitting(&pool).unwrap().0, 2);
        assert_eq!(q.pop_fitting(&pool).unwrap().0, 3);
    }

    #[test]
    fn backfills_what_fits() {
        let mut pool = Pool::new(&[0, 1, 2, 3], 8, 0);
        let held = pool.take(shape(3)).unwrap();
        assert_eq!(held.gpus, vec![0, 1, 2]);
        let mut q = ReadyQueue::default();
        q.push(0, 9, shape(2));
        q.push(1, 1, shape(1));
        assert_eq!(q.pop_fitting(&pool).unwrap().0, 1);
        assert!(q.pop_fitting(&pool).is_none());
        pool.give_back(&held);
        assert_eq!(q.pop_fitting(&pool).unwrap().0, 0);
    }

    #[test]
    fn grants_distinct_gpu_ids() {
        let mut pool = Pool::new(&[0, 2, 5], 8, 0);
        let a = pool.take(shape(2)).unwrap();
        let b = pool.take(shape(1)).unwrap();
        assert_eq!(a.gpus, vec![0, 2]);
        assert_eq!(b.gpus, vec![5]);
        assert!(pool.take(shape(1)).is_none());
    }

    #[test]
    fn cpus_clamp_to_pool() {
        let r = Resources {
            gpus: 0,
            cpus: 16,
            mem_gb: 0.5,
        };
        assert_eq!(
            Shape::of(&r, 2, 4),
            Shape {
                gpus: 0,
                cpus: 2,
                mem_mb: 512
            }
        );
    }
}
