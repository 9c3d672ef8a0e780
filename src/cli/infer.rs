//! `empf infer` (run a deployed model file on an MNIST-format split) and `empf bench infer`.

use crate::error::{Error, Result};
use crate::infer::{Model, Precision, Runtime};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

/// `empf infer`.
#[derive(Args, Debug)]
pub struct InferArgs {
    /// Model file written by `empf export`.
    pub model: PathBuf,
    /// Directory with MNIST-format IDX files (default: the bundled subset).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split: test or train.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Precision of binary layers: float, or k-bit spikes `1`..`8` (e.g. `4bit`: sparse integer
    /// kernels; `4bit-popcount` or `4p`: bit-serial popcount kernels); several comma separated.
    #[arg(long, value_delimiter = ',', default_value = "float")]
    pub precision: Vec<String>,
    /// Quantisation step of k-bit modes for a model trained without QAT (default 0.25).
    #[arg(long)]
    pub step: Option<f32>,
    /// Batch size (1 = one sample at a time).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Use only the first N samples.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Run `empf infer`.
pub fn run(a: InferArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let dir = a
        .data
        .clone()
        .unwrap_or_else(crate::data::bundled_mnist_dir);
    let m = crate::data::idx::load_mnist(&dir)?;
    let data = match a.split.as_str() {
        "test" => m.test,
        "train" => m.train,
        s => {
            return Err(Error::Config(format!(
                "unknown split `{s}` (expected test or train)"
            )));
        }
    };
    let n = a.limit.unwrap_or(data.len()).min(data.len());
    let idx: Vec<usize> = (0..n).collect();
    for p in &a.precision {
        let p = Precision::parse(p)?;
        let mut rt = Runtime::new(model.clone(), p, a.step, empf_simd::Simd::global())?;
        let t0 = Instant::now();
        let mut correct = 0usize;
        for chunk in idx.chunks(a.batch.max(1)) {
            let (x, y) = data.batch(chunk)?;
            let pred = rt.predict(&x)?;
            correct += pred.iter().zip(&y).filter(|(p, y)| p == y).count();
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{}: {} precision{}, kernels {}: accuracy {:.2}% on {n} {} images of {} (T = {}, batch {}, {:.2}s, {:.0} img/s)",
            a.model.display(),
            p.name(),
            match p {
                Precision::Bits(_) | Precision::Popcount(_) => format!(" (step {})", rt.step()),
                Precision::Float => String::new(),
            },
            rt.kernel_name(),
            100.0 * correct as f64 / n.max(1) as f64,
            a.split,
            dir.display(),
            rt.steps(),
            a.batch,
            secs,
            n as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

/// `empf bench infer`.
#[derive(Args, Debug)]
pub struct BenchInferArgs {
    /// A checkpoint (.npz) or an architecture (small, mnist-cnn; seeded initialisation).
    #[arg(default_value = "mnist-cnn")]
    pub model: String,
    /// Neuron (architecture names only).
    #[arg(long, default_value = "v1")]
    pub neuron: String,
    /// Precisions to measure (as `empf infer --precision`: float, k, kp).
    #[arg(long, value_delimiter = ',', default_value = "float,4,2,1")]
    pub precision: Vec<String>,
    /// Throughput batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed calls per measurement (median reported).
    #[arg(long, default_value_t = 10)]
    pub reps: usize,
    /// Time on real images and report every engine's accuracy: a directory of MNIST-format IDX
    /// files (`bundled` for the bundled subset); its test split, or its first `--limit` images.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// With --data: use only the first N test images.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Run `empf bench infer`.
pub fn bench(a: BenchInferArgs) -> Result<()> {
    let (cfg, mut net) = if std::path::Path::new(&a.model).exists() {
        crate::train::checkpoint::load_model(std::path::Path::new(&a.model))?
    } else {
        let mut ta = super::TrainArgs::parse_default(&a.model);
        ta.neuron = a.neuron.clone();
        let cfg = super::model_config(&ta)?;
        let net = crate::model::zoo::build::<f32>(&cfg, &mut crate::rng::Rng::new(0))?;
        (cfg, net)
    };
    let precisions = a
        .precision
        .iter()
        .map(|p| Precision::parse(p))
        .collect::<Result<Vec<_>>>()?;
    let data = match &a.data {
        Some(dir) => {
            let dir = if dir.as_os_str() == "bundled" {
                crate::data::bundled_mnist_dir()
            } else {
                dir.clone()
            };
            let test = crate::data::idx::load_mnist(&dir)?.test;
            let n = a.limit.unwrap_or(test.len()).min(test.len());
            let (x, y) = test.batch(&(0..n).collect::<Vec<_>>())?;
            println!("data: {n} test images of {}", dir.display());
            Some(crate::infer::bench::Labelled { x, y })
        }
        None => None,
    };
    let rows = crate::infer::bench::bench_infer(
        &cfg,
        &mut net,
        &precisions,
        a.batch,
        a.reps,
        data.as_ref(),
    )?;
    print!("{}", crate::infer::bench::format_rows(&cfg, a.batch, &rows));
    Ok(())
}
