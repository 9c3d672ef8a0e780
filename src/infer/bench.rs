//! `empf bench infer`: batch-1 latency and batch-64 throughput of the runtime per precision mode,
//! against the training graph's eval mode on the same model, in the same run (synthetic inputs of
//! the model's shape, or the images of a labelled test set, when the accuracy of every engine on
//! the whole set is measured too).

use super::{Precision, Runtime};
use crate::error::{Error, Result};
use crate::model::{ModelConfig, Sequential};
use crate::rng::Rng;
use crate::tensor::{Tensor, from_vec};
use crate::train::step::{StepInput, eval_batch};
use empf_simd::Simd;
use std::time::Instant;

/// One measured engine.
#[derive(Clone, Debug)]
pub struct InferBenchRow {
    /// `eval` (training graph) or the runtime's precision.
    pub engine: String,
    /// Median seconds per batch-1 call.
    pub latency_s: f64,
    /// Images per second at the large batch.
    pub throughput: f64,
    /// Test accuracy (%) on the labelled set, when one is given.
    pub accuracy: Option<f64>,
}

/// Labelled images: `N x C x H x W` and the `N` labels.
pub struct Labelled {
    /// The images.
    pub x: Tensor<f32>,
    /// Their labels.
    pub y: Vec<usize>,
}

impl Labelled {
    fn head(&self, n: usize) -> Tensor<f32> {
        let n = n.min(self.y.len());
        self.x
            .slice_axis(ndarray::Axis(0), (0..n).into())
            .to_owned()
    }
    fn chunks(&self, batch: usize) -> impl Iterator<Item = (Tensor<f32>, &[usize])> {
        let n = self.y.len();
        (0..n).step_by(batch.max(1)).map(move |i| {
            let j = (i + batch).min(n);
            (
                self.x
                    .slice_axis(ndarray::Axis(0), (i..j).into())
                    .to_owned(),
                &self.y[i..j],
            )
        })
    }
}

/// Correct predictions (argmax of the logits) of `logits` for `labels`.
fn correct(logits: &Tensor<f32>, labels: &[usize]) -> usize {
    super::runtime::argmax_rows(logits)
        .iter()
        .zip(labels)
        .filter(|(p, y)| p == y)
        .count()
}

fn images(n: usize, input: [usize; 3], rng: &mut Rng) -> Tensor<f32> {
    let len = n * input.iter().product::<usize>();
    from_vec(
        &[n, input[0], input[1], input[2]],
        (0..len).map(|_| rng.uniform() as f32).collect(),
    )
}

/// One engine's inference call on a batch.
type Engine<'a> = dyn FnMut(&Tensor<f32>) -> Result<()> + 'a;

/// The medians of `reps` timed calls of each engine on `x`, after one warm-up call each. The
/// engines take turns call by call, so a host whose speed drifts (a shared machine) slows all of
/// them alike instead of whichever ran during a slow spell.
fn measure(reps: usize, engines: &mut [&mut Engine<'_>], x: &Tensor<f32>) -> Result<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(reps); engines.len()];
    for e in engines.iter_mut() {
        e(x)?; // warm-up
    }
    for _ in 0..reps {
        for (e, t) in engines.iter_mut().zip(&mut times) {
            let t0 = Instant::now();
            e(x)?;
            t.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// Measure eval mode of `net` and the runtime at each precision: median of `reps` batch-1 calls and
/// of `reps` calls at `batch` (the engines taking turns), on synthetic images or on the first
/// images of `data`, and then every engine's accuracy on the whole of `data`.
pub fn bench_infer(
    cfg: &ModelConfig,
    net: &mut Sequential<f32>,
    precisions: &[Precision],
    batch: usize,
    reps: usize,
    data: Option<&Labelled>,
) -> Result<Vec<InferBenchRow>> {
    if batch == 0 || reps == 0 {
        return Err(Error::Config(
            "bench infer needs --batch >= 1 and --reps >= 1".into(),
        ));
    }
    let model = super::export(cfg, net)?;
    let mut rng = Rng::new(1);
    let (x1, xb) = match data {
        Some(d) if !d.y.is_empty() => (d.head(1), d.head(batch)),
        _ => (
            images(1, cfg.input, &mut rng),
            images(batch, cfg.input, &mut rng),
        ),
    };
    let steps = cfg.steps;
    let mut rts = precisions
        .iter()
        .map(|&p| Runtime::new(model.clone(), p, None, Simd::global()))
        .collect::<Result<Vec<_>>>()?;
    let (lat, thr) = {
        let mut eval = |x: &Tensor<f32>| -> Result<()> {
            eval_batch(net, StepInput::Static(x), steps).map(|_| ())
        };
        let mut runs: Vec<_> = rts
            .iter_mut()
            .map(|rt| move |x: &Tensor<f32>| rt.run(x).map(|_| ()))
            .collect();
        let mut engines: Vec<&mut Engine<'_>> = vec![&mut eval];
        for r in &mut runs {
            engines.push(r);
        }
        (
            measure(reps, &mut engines, &x1)?,
            measure(reps, &mut engines, &xb)?,
        )
    };
    let mut rows = Vec::new();
    let accuracy = match data {
        Some(d) => {
            let mut ok = 0;
            for (x, y) in d.chunks(batch) {
                let outs = eval_batch(net, StepInput::Static(&x), steps)?;
                let mut sum = outs[0].clone();
                for o in &outs[1..] {
                    sum += o;
                }
                ok += correct(&sum, y);
            }
            Some(100.0 * ok as f64 / d.y.len().max(1) as f64)
        }
        None => None,
    };
    let n = xb.shape()[0] as f64;
    rows.push(InferBenchRow {
        engine: "eval (training graph)".into(),
        latency_s: lat[0],
        throughput: n / thr[0],
        accuracy,
    });
    for (i, (&p, rt)) in precisions.iter().zip(&mut rts).enumerate() {
        let accuracy = match data {
            Some(d) => {
                let mut ok = 0;
                for (x, y) in d.chunks(batch) {
                    ok += correct(&rt.run(&x)?, y);
                }
                Some(100.0 * ok as f64 / d.y.len().max(1) as f64)
            }
            None => None,
        };
        rows.push(InferBenchRow {
            engine: format!("runtime {}", p.name()),
            latency_s: lat[i + 1],
            throughput: n / thr[i + 1],
            accuracy,
        });
    }
    Ok(rows)
}

/// The table `empf bench infer` prints.
pub fn format_rows(cfg: &ModelConfig, batch: usize, rows: &[InferBenchRow]) -> String {
    let acc = rows.iter().any(|r| r.accuracy.is_some());
    let mut s = format!(
        "model {} ({} neurons, T = {}, widths {:?}), kernels {} / {}, {} threads\n",
        cfg.arch,
        cfg.neuron,
        cfg.steps,
        cfg.widths,
        Simd::global().sparse_kernel_name(),
        Simd::global().kernel_name(),
        rayon::current_num_threads()
    );
    s += &format!(
        "{:<24} {:>14} {:>9} {:>18} {:>9} {:>10}{}\n",
        "engine",
        "batch-1 ms",
        "vs eval",
        format!("batch-{batch} img/s"),
        "vs eval",
        "vs float",
        if acc { "  accuracy" } else { "" }
    );
    let (el, et) = (rows[0].latency_s, rows[0].throughput);
    let ft = rows
        .iter()
        .find(|r| r.engine == "runtime float")
        .map(|r| r.throughput);
    for r in rows {
        s += &format!(
            "{:<24} {:>14.3} {:>8.2}x {:>18.1} {:>8.2}x {:>10}{}\n",
            r.engine,
            r.latency_s * 1e3,
            el / r.latency_s,
            r.throughput,
            r.throughput / et,
            ft.map(|f| format!("{:.2}x", r.throughput / f))
                .unwrap_or_default(),
            r.accuracy
                .map(|a| format!("  {a:>7.2}%"))
                .unwrap_or_default()
        );
    }
    s
}
