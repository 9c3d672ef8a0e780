//! Data parallelism over processes (`mpirun -np N empf train ...`, cargo feature `mpi`).
//!
//! Every rank holds the whole network (same seed → same initial weights) and the whole dataset. For
//! each mini-batch of the global order (`Trainer::epoch_order`, the same on every rank) rank `r` of
//! `P` trains on its contiguous shard `idx[⌊r·B/P⌋ .. ⌊(r+1)·B/P⌋]` with the unchanged online time
//! loop, then the gradients accumulated over the time-steps are averaged with **one** allreduce over
//! a single contiguous bucket and every rank applies the same optimiser update, so the weights stay
//! identical on all ranks without ever being sent.
//!
//! **Why the average equals the single-process gradient.** The loss of a batch is the mean over its
//! samples, so rank `r` holds `g_r = (1/n_r) Σ_{i∈shard r} ∇ℓ_i`. The bucket carries `n_r·g_r`;
//! after the sum every rank divides by `B = Σ_r n_r` and gets `(1/B) Σ_i ∇ℓ_i`, the gradient one
//! process computes on the whole batch (exact for uneven shards too; only the summation order
//! differs, so weights agree to float rounding). Layers whose forward couples the samples of a
//! batch break this: BatchNorm normalises with the statistics of the local shard (B/P samples), as in
//! every data-parallel trainer without sync-BN; its running statistics are averaged over the ranks at
//! every epoch end and before every checkpoint.
//!
//! The random back-propagation steps of batch `b` of epoch `e` come from `Rng::derive(seed, e, b)`
//! with the *global* batch index, so every rank draws the same steps with no communication.
//!
//! The scalar statistics (loss·n, correct predictions) ride in the same bucket, so an update costs
//! exactly one collective. Evaluation is sharded the same way and its counts are summed.
//!
//! Overlapping the allreduce with the backward pass was measured not to pay here: a gradient is final
//! only after the backward of the *last* time-step, the allreduce of the whole `mnist-cnn` bucket
//! takes well under 1% of a batch (see `empf bench allreduce`), and the `Layer` trait has no hook
//! inside a backward pass. The projection in the README shows when it would start to matter.

use crate::error::{Error, Result};
use crate::layers::{Layer, Param, ParamKind};
use crate::tensor::Tensor;
use crate::train::trainer::{BatchSource, EvalResult, LossFn, evaluate};
use std::sync::Arc;
use std::time::Instant;

/// A group of cooperating processes. All collectives are blocking and must be called by every rank
/// in the same order; each rank gets the same result.
pub trait Comm: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, in place.
    fn allreduce_sum_f32(&self, buf: &mut [f32]);
    /// Element-wise sum over all ranks, in place.
    fn allreduce_sum_f64(&self, buf: &mut [f64]);
    /// Wait for every rank.
    fn barrier(&self);
    /// End the whole job (every rank) with exit code `code`: `MPI_Abort` under MPI.
    fn abort(&self, code: i32) -> !;
    /// Short description for logs (`single process`, `MPI rank 0 of 4`).
    fn describe(&self) -> String {
        format!("rank {} of {}", self.rank(), self.size())
    }
}

/// One process, no communication: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn allreduce_sum_f32(&self, _: &mut [f32]) {}
    fn allreduce_sum_f64(&self, _: &mut [f64]) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "single process".into()
    }
}

/// The communicator of this process: MPI's world when built with the `mpi` feature and started by an
/// MPI launcher (`mpirun`, `mpiexec`, `srun`: detected from its environment, or forced with
/// `EMPF_MPI=1`), else [`Single`]. Call once, early; MPI is finalised when the last clone is dropped.
pub fn init() -> Result<Arc<dyn Comm>> {
    #[cfg(feature = "mpi")]
    {
        if launched_by_mpi() {
            return Ok(Arc::new(mpi_comm::Mpi::init()?));
        }
    }
    Ok(Arc::new(Single))
}

/// Whether an MPI launcher started this process (OpenMPI, MPICH/Hydra, PMIx, or `EMPF_MPI=1`).
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
        || std::env::var("EMPF_MPI").is_ok_and(|v| v == "1")
}

#[cfg(feature = "mpi")]
mod mpi_comm {
    use super::Comm;
    use crate::error::{Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::CommunicatorCollectives;

    /// MPI's world communicator. Holds the `Universe` (MPI is finalised when it is dropped); the
    /// world handle is re-made per call (a constant), which keeps this type `Send + Sync`.
    pub struct Mpi {
        _universe: mpi::environment::Universe,
        rank: usize,
        size: usize,
    }

    impl Mpi {
        pub fn init() -> Result<Self> {
            let universe = mpi::initialize()
                .ok_or_else(|| Error::Config("MPI was already initialised".into()))?;
            let w = universe.world();
            let (rank, size) = (w.rank() as usize, w.size() as usize);
            if size > 1 {
                // a panicking rank must not leave the others blocked in a collective
                let prev = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    prev(info);
                    eprintln!("empf: rank {rank} panicked; aborting the MPI job");
                    SimpleCommunicator::world().abort(101);
                }));
            }
            Ok(Mpi {
                _universe: universe,
                rank,
                size,
            })
        }
    }

    impl Comm for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn allreduce_sum_f32(&self, buf: &mut [f32]) {
            if self.size > 1 {
                let send = buf.to_vec();
                SimpleCommunicator::world().all_reduce_into(&send[..], buf, SystemOperation::sum());
            }
        }
        fn allreduce_sum_f64(&self, buf: &mut [f64]) {
            if self.size > 1 {
                let send = buf.to_vec();
                SimpleCommunicator::world().all_reduce_into(&send[..], buf, SystemOperation::sum());
            }
        }
        fn barrier(&self) {
            SimpleCommunicator::world().barrier();
        }
        fn abort(&self, code: i32) -> ! {
            SimpleCommunicator::world().abort(code)
        }
        fn describe(&self) -> String {
            format!("MPI rank {} of {}", self.rank, self.size)
        }
    }
}

/// Rank `rank`'s contiguous part of `s` split into `size` near-equal parts
/// (`s[⌊r·n/P⌋ .. ⌊(r+1)·n/P⌋]`).
pub fn shard<T>(s: &[T], rank: usize, size: usize) -> &[T] {
    let n = s.len();
    &s[n * rank / size..n * (rank + 1) / size]
}

/// The data-parallel side of a trainer: the communicator, the gradient bucket and the time spent in
/// communication.
pub struct DataParallel {
    /// The process group.
    pub comm: Arc<dyn Comm>,
    bucket: Vec<f32>,
    /// Seconds spent in gradient allreduces since the last [`DataParallel::take_comm_stats`].
    comm_secs: f64,
    /// Gradient allreduces since the last [`DataParallel::take_comm_stats`].
    comm_updates: u64,
}

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel::new(Arc::new(Single))
    }
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataParallel({})", self.comm.describe())
    }
}

impl DataParallel {
    /// Data parallelism over `comm`.
    pub fn new(comm: Arc<dyn Comm>) -> Self {
        DataParallel {
            comm,
            bucket: Vec::new(),
            comm_secs: 0.0,
            comm_updates: 0,
        }
    }
    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// Whether this is rank 0 (the one that logs and writes files).
    pub fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }
    /// This rank's part of a global batch.
    pub fn shard<'a, T>(&self, idx: &'a [T]) -> &'a [T] {
        shard(idx, self.comm.rank(), self.comm.size())
    }

    /// Average the accumulated gradients of `net` over the ranks, weighting this rank's by its
    /// sample count `n_local` (see the module doc), and sum `extra` over the ranks, all in one
    /// allreduce over one contiguous buffer. Returns the global sample count. One process: nothing
    /// is touched and `n_local` is returned.
    pub fn sync_grads(
        &mut self,
        net: &mut dyn Layer<f32>,
        n_local: usize,
        extra: &mut [f64],
    ) -> usize {
        if self.comm.size() == 1 {
            return n_local;
        }
        let w = n_local as f32;
        self.bucket.clear();
        let bucket = &mut self.bucket;
        net.visit_params(&mut |p: &mut Param<f32>| {
            if p.trainable() {
                bucket.extend(p.grad.iter().map(|&g| g * w));
            }
        });
        bucket.extend(extra.iter().map(|&v| v as f32));
        bucket.push(w);
        let t0 = Instant::now();
        self.comm.allreduce_sum_f32(bucket);
        self.comm_secs += t0.elapsed().as_secs_f64();
        self.comm_updates += 1;
        let total = *bucket.last().expect("count entry");
        let k = bucket.len() - 1 - extra.len();
        for (e, v) in extra.iter_mut().zip(&bucket[k..]) {
            *e = *v as f64;
        }
        let inv = 1.0 / total;
        let mut off = 0;
        net.visit_params(&mut |p: &mut Param<f32>| {
            if p.trainable() {
                let n = p.grad.len();
                for (g, &s) in p.grad.iter_mut().zip(&bucket[off..off + n]) {
                    *g = s * inv;
                }
                off += n;
            }
        });
        total.round() as usize
    }

    /// Sum `v` over the ranks (small statistics; not counted as communication time).
    pub fn sum(&self, v: &mut [f64]) {
        self.comm.allreduce_sum_f64(v);
    }

    /// Average the non-trained buffers (BatchNorm running mean/variance) over the ranks, so every
    /// rank evaluates and checkpoints the same network.
    pub fn average_buffers(&mut self, net: &mut dyn Layer<f32>) {
        let p = self.comm.size();
        if p == 1 {
            return;
        }
        let mut buf = Vec::new();
        net.visit_params(&mut |q: &mut Param<f32>| {
            if q.kind == ParamKind::Buffer {
                buf.extend(q.value.iter().copied());
            }
        });
        self.comm.allreduce_sum_f32(&mut buf);
        let inv = 1.0 / p as f32;
        let mut off = 0;
        net.visit_params(&mut |q: &mut Param<f32>| {
            if q.kind == ParamKind::Buffer {
                let n = q.value.len();
                for (v, &s) in q.value.iter_mut().zip(&buf[off..off + n]) {
                    *v = s * inv;
                }
                off += n;
            }
        });
    }

    /// (seconds, allreduces) of gradient communication since the last call; resets both.
    pub fn take_comm_stats(&mut self) -> (f64, u64) {
        let r = (self.comm_secs, self.comm_updates);
        self.comm_secs = 0.0;
        self.comm_updates = 0;
        r
    }

    /// Evaluate with every rank on its contiguous shard of `data`; counts and loss sums are reduced,
    /// so every rank returns the result over the whole set.
    pub fn evaluate(
        &self,
        net: &mut dyn Layer<f32>,
        steps: usize,
        batch: usize,
        data: &dyn BatchSource,
        loss: LossFn<'_>,
    ) -> Result<EvalResult> {
        if self.comm.size() == 1 {
            return evaluate(net, steps, batch, data, loss);
        }
        let n = data.len();
        let (r, p) = (self.comm.rank(), self.comm.size());
        let part = ShardSource {
            inner: data,
            start: n * r / p,
            len: n * (r + 1) / p - n * r / p,
        };
        let local = if part.len == 0 {
            EvalResult {
                acc_per_t: vec![0.0; steps],
                ..EvalResult::default()
            }
        } else {
            evaluate(net, steps, batch, &part, loss)?
        };
        // correct counts per t, loss·n, n
        let nl = local.n as f64;
        let mut v: Vec<f64> = local
            .acc_per_t
            .iter()
            .map(|a| (a * nl / 100.0).round())
            .collect();
        v.push(local.loss * nl);
        v.push(nl);
        self.comm.allreduce_sum_f64(&mut v);
        let total = v[steps + 1];
        let acc_per_t: Vec<f64> = v[..steps]
            .iter()
            .map(|c| 100.0 * c / total.max(1.0))
            .collect();
        Ok(EvalResult {
            loss: v[steps] / total.max(1.0),
            acc: *acc_per_t.last().unwrap_or(&0.0),
            acc_per_t,
            n: total as usize,
            secs: local.secs,
        })
    }

    /// Check that a global batch of `batch` can be split into shards of at least two samples
    /// (BatchNorm needs two).
    pub fn check_batch(&self, batch: usize) -> Result<()> {
        let p = self.comm.size();
        if batch < 2 * p {
            return Err(Error::Config(format!(
                "--batch {batch} is the global batch over {p} ranks: it must be at least {} \
                 (two samples per rank)",
                2 * p
            )));
        }
        Ok(())
    }
}

/// A contiguous window `start..start+len` of a dataset.
struct ShardSource<'a> {
    inner: &'a dyn BatchSource,
    start: usize,
    len: usize,
}

impl BatchSource for ShardSource<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn batch(&self, idx: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)> {
        let g: Vec<usize> = idx.iter().map(|&i| self.start + i).collect();
        self.inner.batch(&g)
    }
}

/// Time `iters` allreduces of `params` floats (after one warm-up); returns seconds per allreduce
/// (the maximum over the ranks, as the slowest rank sets the pace).
pub fn time_allreduce(comm: &dyn Comm, params: usize, iters: usize) -> f64 {
    let mut buf = vec![1.0f32; params];
    comm.allreduce_sum_f32(&mut buf);
    comm.barrier();
    let t0 = Instant::now();
    for _ in 0..iters.max(1) {
        comm.allreduce_sum_f32(&mut buf);
    }
    let local = t0.elapsed().as_secs_f64() / iters.max(1) as f64;
    // max over ranks = sum of the one-hot spread; a sum of maxima is not available, so gather
    let mut all = vec![0.0; comm.size()];
    all[comm.rank()] = local;
    comm.allreduce_sum_f64(&mut all);
    all.into_iter().fold(0.0, f64::max)
}

/// Projected seconds per epoch of data-parallel training on `ranks` ranks: compute
/// `images / (ranks · img_per_s_rank)` plus `updates · t_allreduce(ranks)`, with the ring-allreduce
/// cost `t_allreduce(P) = 2(P−1)·latency + 2·(P−1)/P · 4·params / bandwidth` (bytes/s).
pub fn project_epoch_secs(
    images: usize,
    global_batch: usize,
    img_per_s_rank: f64,
    params: usize,
    ranks: usize,
    bandwidth: f64,
    latency: f64,
) -> (f64, f64) {
    let p = ranks.max(1) as f64;
    let compute = images as f64 / (p * img_per_s_rank);
    let t_ar = if ranks <= 1 {
        0.0
    } else {
        2.0 * (p - 1.0) * latency + 2.0 * (p - 1.0) / p * 4.0 * params as f64 / bandwidth
    };
    let updates = images.div_ceil(global_batch.max(1)) as f64;
    (compute, updates * t_ar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order_without_overlap() {
        let v: Vec<usize> = (0..13).collect();
        for p in 1..6 {
            let joined: Vec<usize> = (0..p).flat_map(|r| shard(&v, r, p).to_vec()).collect();
            assert_eq!(joined, v, "P = {p}");
            let lens: Vec<usize> = (0..p).map(|r| shard(&v, r, p).len()).collect();
            assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn single_process_sync_leaves_gradients_untouched() {
        let mut rng = crate::rng::Rng::new(1);
        let mut lin = crate::layers::linear::Linear::<f32>::new("fc", 3, 2, true, &mut rng);
        lin.visit_params(&mut |p| p.grad.fill(0.25));
        let mut dp = DataParallel::default();
        let mut extra = [3.0, 4.0];
        assert_eq!(dp.sync_grads(&mut lin, 7, &mut extra), 7);
        assert_eq!(extra, [3.0, 4.0]);
        lin.visit_params(&mut |p| assert!(p.grad.iter().all(|&g| g == 0.25)));
        assert_eq!(dp.take_comm_stats(), (0.0, 0));
    }

    #[test]
    fn projection_adds_ring_allreduce_cost_per_update() {
        // 1000 images, batch 100 → 10 updates; 2 ranks at 50 img/s each → 10 s compute;
        // t_ar = 2·1·1e-3 + 2·(1/2)·4·1000/4000 = 0.002 + 1 = 1.002 s
        let (c, m) = project_epoch_secs(1000, 100, 50.0, 1000, 2, 4000.0, 1e-3);
        assert!((c - 10.0).abs() < 1e-12);
        assert!((m - 10.02).abs() < 1e-9, "{m}");
        assert_eq!(
            project_epoch_secs(1000, 100, 50.0, 1000, 1, 4000.0, 1e-3).1,
            0.0
        );
    }
}
