//! Data-parallel training over MPI from the command line: `mpirun -np N empf train ...` and
//! `empf bench allreduce` (timing of the gradient allreduce and a projection of epoch times).

use super::{TrainArgs, model_config};
use crate::dist::{Comm, project_epoch_secs, time_allreduce};
use crate::error::{Error, Result};
use crate::layers::Param;
use clap::Args;

/// `empf train`: one process, or (built with `--features mpi`, started by `mpirun`) every rank of an
/// MPI job. An error on any rank is printed with the rank and ends the whole job (`MPI_Abort`), so
/// no rank is left waiting in a collective.
pub fn train(a: TrainArgs) -> Result<()> {
    let comm = crate::dist::init()?;
    match super::train_on(a, comm.clone()) {
        Err(e) if comm.size() > 1 => {
            eprintln!("error: {e}");
            eprintln!(
                "empf: {} failed; aborting all {} ranks",
                comm.describe(),
                comm.size()
            );
            comm.abort(1)
        }
        r => r,
    }
}

/// ` on N MPI ranks` for the start line (empty for one process).
pub fn ranks_note(comm: &dyn Comm) -> String {
    if comm.size() > 1 {
        format!(" per rank on {} MPI ranks", comm.size())
    } else {
        String::new()
    }
}

/// `empf bench allreduce`.
#[derive(Args, Debug)]
pub struct BenchAllreduceArgs {
    /// Floats per allreduce (default: the trainable parameters of --arch).
    #[arg(long)]
    pub params: Option<usize>,
    /// Architecture whose trainable parameter count is the message size.
    #[arg(long, default_value = "mnist-cnn")]
    pub arch: String,
    /// Timed allreduces.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Measured training throughput of ONE rank (images/s) for the projection (e.g. the
    /// `train_img_per_s` of a 1-rank run of the recipe); without it only the timing is printed.
    #[arg(long)]
    pub img_per_s: Option<f64>,
    /// Training images per epoch for the projection (CIFAR-10: 50000).
    #[arg(long, default_value_t = 50_000)]
    pub images: usize,
    /// Per-rank batch for the projection (the global batch is ranks x this).
    #[arg(long, default_value_t = 64)]
    pub batch_per_rank: usize,
    /// Ranks to project.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub ranks: Vec<usize>,
    /// Network bandwidth per rank for the projection, Gbit/s (10 GbE: 10; EDR InfiniBand: 100).
    #[arg(long, default_value_t = 10.0)]
    pub gbit: f64,
    /// Per-message latency for the projection, microseconds.
    #[arg(long, default_value_t = 5.0)]
    pub latency_us: f64,
}

/// Trainable floats of an architecture (what one gradient allreduce carries).
pub fn trainable_floats(arch: &str) -> Result<usize> {
    let model = model_config(&TrainArgs::parse_default(arch))?;
    let mut rng = crate::rng::Rng::new(0);
    let mut net = crate::model::zoo::build::<f32>(&model, &mut rng)?;
    let mut n = 0;
    crate::layers::Layer::visit_params(&mut net, &mut |p: &mut Param<f32>| {
        if p.trainable() {
            n += p.value.len();
        }
    });
    Ok(n)
}

/// Run `empf bench allreduce`.
pub fn bench_allreduce(a: BenchAllreduceArgs) -> Result<()> {
    if a.gbit <= 0.0 || a.latency_us < 0.0 || a.batch_per_rank == 0 {
        return Err(Error::Config(
            "--gbit must be positive, --latency-us non-negative, --batch-per-rank at least 1"
                .into(),
        ));
    }
    let params = match a.params {
        Some(p) => p,
        None => trainable_floats(&a.arch)?,
    };
    let comm = crate::dist::init()?;
    let secs = time_allreduce(&*comm, params, a.iters);
    if comm.rank() != 0 {
        return Ok(());
    }
    let mb = 4.0 * params as f64 / 1e6;
    if comm.size() == 1 {
        println!(
            "allreduce of {params} f32 ({mb:.2} MB): one process, no communication (run under `mpirun -np N`)"
        );
    } else {
        println!(
            "allreduce of {params} f32 ({mb:.2} MB) over {} ranks: {:.3} ms per update ({:.2} GB/s algorithm bandwidth)",
            comm.size(),
            1e3 * secs,
            if secs > 0.0 { 1e-3 * mb / secs } else { 0.0 },
        );
    }
    let Some(ips) = a.img_per_s else {
        return Ok(());
    };
    if ips <= 0.0 {
        return Err(Error::Config("--img-per-s must be positive".into()));
    }
    let bw = a.gbit * 1e9 / 8.0;
    println!(
        "projection: {} images/epoch, {ips:.1} img/s per rank, batch {} per rank, {params} floats, ring allreduce at {} Gbit/s and {} us latency",
        a.images, a.batch_per_rank, a.gbit, a.latency_us
    );
    println!(
        "  t_epoch(P) = images/(P*img_per_s) + ceil(images/(P*batch))*(2(P-1)*lat + 2(P-1)/P*4*params/bw)"
    );
    println!(
        "{:>6} {:>12} {:>12} {:>12} {:>12} {:>9}",
        "ranks", "global batch", "compute s", "allreduce s", "epoch s", "comm %"
    );
    for &p in &a.ranks {
        let gb = a.batch_per_rank * p.max(1);
        let (c, m) = project_epoch_secs(a.images, gb, ips, params, p, bw, 1e-6 * a.latency_us);
        println!(
            "{:>6} {:>12} {:>12.1} {:>12.1} {:>12.1} {:>8.1}%",
            p,
            gb,
            c,
            m,
            c + m,
            100.0 * m / (c + m).max(1e-12)
        );
    }
    Ok(())
}
