//! `empf bench train`: training throughput and peak memory of a network over T and gradient modes,
//! on synthetic inputs of the model's shape (the data pipeline is not part of the measurement).

use crate::error::{Error, Result};
use crate::model::{ModelConfig, zoo};
use crate::rng::Rng;
use crate::tensor::{Tensor, from_vec};
use crate::train::optim::{OptimConfig, Optimizer, zero_grads};
use crate::train::step::{BpMode, StepInput, train_batch};
use std::time::Instant;

/// One measured configuration.
#[derive(Clone, Debug)]
pub struct TrainBenchRow {
    /// Gradient mode.
    pub mode: BpMode,
    /// Time-steps.
    pub steps: usize,
    /// Training images per second.
    pub images_per_s: f64,
    /// Peak resident memory during the measurement (bytes), if the OS reports it.
    pub peak_rss: Option<u64>,
    /// Peak bytes held by step caches and neuron state.
    pub peak_cache_bytes: usize,
}

/// Reset the process's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Measure training throughput of `model` at batch `batch` for each (mode, T), `batches` timed
/// batches after one warm-up batch.
pub fn bench_train(
    model: &ModelConfig,
    batch: usize,
    batches: usize,
    modes: &[BpMode],
    steps: &[usize],
    seed: u64,
    profile: bool,
) -> Result<Vec<TrainBenchRow>> {
    if batch < 2 || batches == 0 {
        return Err(Error::Config(
            "bench needs --batch >= 2 and --batches >= 1".into(),
        ));
    }
    let mut rows = Vec::new();
    for &t in steps {
        for &mode in modes {
            let cfg = ModelConfig {
                steps: t,
                ..model.clone()
            };
            let mut rng = Rng::new(seed);
            let mut net = zoo::build::<f32>(&cfg, &mut rng)?;
            let [c, h, w] = cfg.input;
            let x: Tensor<f32> = from_vec(
                &[batch, c, h, w],
                (0..batch * c * h * w)
                    .map(|_| rng.uniform() as f32)
                    .collect(),
            );
            let y: Vec<usize> = (0..batch).map(|i| i % cfg.classes).collect();
            let mut opt = Optimizer::new(OptimConfig::default());
            let mut run =
                |net: &mut crate::model::Sequential<f32>, rng: &mut Rng| -> Result<usize> {
                    zero_grads(net);
                    let mut loss = |_t: usize, o: &Tensor<f32>| {
                        crate::loss::cross_entropy(o, crate::loss::Targets::Hard(&y), 0.0)
                    };
                    let r = train_batch(net, StepInput::Static(&x), t, mode, rng, &mut loss, None)?;
                    opt.update(net, 0.01);
                    Ok(r.peak_cache_bytes)
                };
            run(&mut net, &mut rng)?; // warm-up: allocations, caches
            if profile {
                net.enable_profile();
            }
            let can_reset = reset_peak_rss();
            let t0 = Instant::now();
            let mut peak_cache = 0;
            for _ in 0..batches {
                peak_cache = peak_cache.max(run(&mut net, &mut rng)?);
            }
            let secs = t0.elapsed().as_secs_f64();
            rows.push(TrainBenchRow {
                mode,
                steps: t,
                images_per_s: (batches * batch) as f64 / secs,
                peak_rss: if can_reset {
                    crate::metrics::peak_rss_bytes()
                } else {
                    None
                },
                peak_cache_bytes: peak_cache,
            });
            if profile {
                eprintln!(
                    "per-layer time, {} T={t}, {batches} batches:\n{}",
                    mode.name(),
                    net.profile_report()
                );
            }
        }
    }
    Ok(rows)
}

/// The table `empf bench train` prints.
pub fn format_rows(model: &ModelConfig, batch: usize, rows: &[TrainBenchRow]) -> String {
    let mut s = format!(
        "empf bench train: {} ({} neurons, widths {:?}), batch {batch}, {} threads\n{:<10} {:>4} {:>12} {:>16} {:>18}\n",
        model.arch,
        model.neuron,
        model.widths,
        rayon::current_num_threads(),
        "mode",
        "T",
        "images/s",
        "peak RSS (MiB)",
        "step caches (MiB)"
    );
    for r in rows {
        s += &format!(
            "{:<10} {:>4} {:>12.1} {:>16} {:>18.2}\n",
            r.mode.name(),
            r.steps,
            r.images_per_s,
            r.peak_rss.map_or("n/a".to_string(), |b| format!(
                "{:.1}",
                b as f64 / (1 << 20) as f64
            )),
            r.peak_cache_bytes as f64 / (1 << 20) as f64
        );
    }
    s
}
