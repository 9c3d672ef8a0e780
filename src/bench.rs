//! `empf bench train`: training throughput and peak memory of a network over T and gradient modes,
//! on synthetic inputs of the model's shape (the data pipeline is not part of the measurement).
//!
//! Memory is measured honestly by running each (mode, T) configuration in a fresh child process
//! ([`bench_train_isolated`]): in one process the allocator keeps pages freed by an earlier
//! configuration (BPTT's caches at a large T, say) and later rows would inherit them. Within a
//! process the peak RSS (`VmHWM`) is reset after the warm-up batches, so the figure is the peak over
//! the timed batches of that configuration alone, model and allocator warm.

use crate::error::{Error, Result};
use crate::model::{ModelConfig, zoo};
use crate::rng::Rng;
use crate::tensor::{Tensor, from_vec};
use crate::train::optim::{OptimConfig, Optimizer, zero_grads};
use crate::train::step::{BpMode, StepInput, train_batch};
use std::path::Path;
use std::process::Command;
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

/// Time-steps run before the measurement of each configuration (`ceil(16 / T)` warm-up batches):
/// with one warm-up batch, a small T would start its measurement after a few steps, before the
/// allocator's pools settle, and its peak RSS would not be comparable with a large T's.
pub const WARMUP_STEPS: usize = 16;

/// Reset the process's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// What a training benchmark feeds the network and reports.
#[derive(Default)]
pub struct TrainBenchOptions<'a> {
    /// Seed of the initialisation, the synthetic inputs and the random-BP draws.
    pub seed: u64,
    /// Print the time spent in each layer.
    pub profile: bool,
    /// Real batches (inputs `batch x C x H x W` and labels), cycled through in order; empty:
    /// one batch of uniform noise in `[0, 1)` with cyclic labels. Spike densities, and with
    /// them the work of the sparse-input kernels, follow the inputs.
    pub data: &'a [(Tensor<f32>, Vec<usize>)],
}

/// Measure training throughput of `model` at batch `batch` for each (mode, T), `batches` timed
/// batches after `ceil(WARMUP_STEPS / T)` warm-up batches.
pub fn bench_train(
    model: &ModelConfig,
    batch: usize,
    batches: usize,
    modes: &[BpMode],
    steps: &[usize],
    opts: &TrainBenchOptions<'_>,
) -> Result<Vec<TrainBenchRow>> {
    if batch < 2 || batches == 0 {
        return Err(Error::Config(
            "bench needs --batch >= 2 and --batches >= 1".into(),
        ));
    }
    if let Some((x, _)) = opts.data.iter().find(|(x, _)| x.shape()[0] != batch) {
        return Err(Error::Config(format!(
            "bench: a data batch of {} images for --batch {batch}",
            x.shape()[0]
        )));
    }
    let (seed, profile) = (opts.seed, opts.profile);
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
            let synthetic;
            let data = if opts.data.is_empty() {
                let x: Tensor<f32> = from_vec(
                    &[batch, c, h, w],
                    (0..batch * c * h * w)
                        .map(|_| rng.uniform() as f32)
                        .collect(),
                );
                synthetic = [(x, (0..batch).map(|i| i % cfg.classes).collect())];
                &synthetic[..]
            } else {
                opts.data
            };
            let mut opt = Optimizer::new(OptimConfig::default());
            let mut next = 0;
            let mut run =
                |net: &mut crate::model::Sequential<f32>, rng: &mut Rng| -> Result<usize> {
                    let (x, y) = &data[next % data.len()];
                    next += 1;
                    zero_grads(net);
                    let mut loss = |_t: usize, o: &Tensor<f32>| {
                        crate::loss::cross_entropy(o, crate::loss::Targets::Hard(y), 0.0)
                    };
                    let r = train_batch(net, StepInput::Static(x), t, mode, rng, &mut loss, None)?;
                    opt.update(net, 0.01);
                    Ok(r.peak_cache_bytes)
                };
            // warm-up: allocations, caches; at least WARMUP_STEPS time-steps, so every T starts
            // its measurement with the allocator in the same steady state; on a copy of the
            // generator, so the random-BP draws of the timed batches do not depend on it
            let mut warm = rng.clone();
            for _ in 0..WARMUP_STEPS.div_ceil(t).max(1) {
                run(&mut net, &mut warm)?;
            }
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

/// One row as the single line a child process prints (`ROW mode T images/s rss cache`; rss `-`
/// when unknown).
pub fn row_line(r: &TrainBenchRow) -> String {
    format!(
        "ROW {} {} {} {} {}",
        r.mode.name(),
        r.steps,
        r.images_per_s,
        r.peak_rss.map_or("-".to_string(), |b| b.to_string()),
        r.peak_cache_bytes
    )
}

/// Parse [`row_line`].
pub fn parse_row_line(line: &str) -> Option<TrainBenchRow> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 6 || f[0] != "ROW" {
        return None;
    }
    Some(TrainBenchRow {
        mode: BpMode::parse(f[1])?,
        steps: f[2].parse().ok()?,
        images_per_s: f[3].parse().ok()?,
        peak_rss: if f[4] == "-" {
            None
        } else {
            Some(f[4].parse().ok()?)
        },
        peak_cache_bytes: f[5].parse().ok()?,
    })
}

/// Run every (T, mode) configuration in its own child process `exe args.. --steps T --modes M`
/// (the child is expected to print [`row_line`]s on stdout; its stderr, e.g. a profile, passes
/// through).
pub fn bench_train_isolated(
    exe: &Path,
    args: &[String],
    modes: &[BpMode],
    steps: &[usize],
) -> Result<Vec<TrainBenchRow>> {
    let mut rows = Vec::new();
    for &t in steps {
        for mode in modes {
            let out = Command::new(exe)
                .args(args)
                .args(["--steps", &t.to_string(), "--modes", &mode.name()])
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| Error::Config(format!("bench: cannot run {}: {e}", exe.display())))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let got: Vec<TrainBenchRow> = text.lines().filter_map(parse_row_line).collect();
            if !out.status.success() || got.is_empty() {
                return Err(Error::Config(format!(
                    "bench: child for {} T={t} failed ({}): {}",
                    mode.name(),
                    out.status,
                    text.trim()
                )));
            }
            rows.extend(got);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real batches are cycled through (the step caches see them), and a batch of the wrong size
    /// is an error naming both sizes.
    #[test]
    fn bench_train_runs_on_given_batches_and_checks_their_size() {
        let model = ModelConfig {
            widths: vec![4, 4, 8],
            ..ModelConfig::mnist_cnn()
        };
        let mut rng = Rng::new(1);
        let batch = |n: usize, rng: &mut Rng| {
            let x: Tensor<f32> = from_vec(
                &[n, 1, 28, 28],
                (0..n * 784).map(|_| rng.uniform() as f32).collect(),
            );
            (x, (0..n).map(|i| i % 10).collect::<Vec<_>>())
        };
        let data = vec![batch(2, &mut rng), batch(2, &mut rng)];
        let opts = TrainBenchOptions {
            data: &data,
            ..Default::default()
        };
        let rows = bench_train(&model, 2, 3, &[BpMode::Online], &[1], &opts).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].images_per_s > 0.0 && rows[0].peak_cache_bytes > 0);
        let e = bench_train(&model, 3, 1, &[BpMode::Online], &[1], &opts).unwrap_err();
        assert!(e.to_string().contains("2 images for --batch 3"), "{e}");
    }

    #[test]
    fn row_lines_round_trip() {
        for r in [
            TrainBenchRow {
                mode: BpMode::Random { k: 2 },
                steps: 16,
                images_per_s: 123.456,
                peak_rss: Some(1 << 28),
                peak_cache_bytes: 777,
            },
            TrainBenchRow {
                mode: BpMode::Bptt,
                steps: 1,
                images_per_s: 0.5,
                peak_rss: None,
                peak_cache_bytes: 0,
            },
        ] {
            let p = parse_row_line(&row_line(&r)).unwrap();
            assert_eq!(
                (
                    p.mode,
                    p.steps,
                    p.images_per_s,
                    p.peak_rss,
                    p.peak_cache_bytes
                ),
                (
                    r.mode,
                    r.steps,
                    r.images_per_s,
                    r.peak_rss,
                    r.peak_cache_bytes
                )
            );
        }
        assert!(parse_row_line("online 4 1.0").is_none());
        assert!(parse_row_line("ROW online x 1.0 - 0").is_none());
    }
}
