//! The time loop of one mini-batch (EMPF.md §1, §7; Algorithm 1 of the paper).
//!
//! * [`BpMode::Online`]: for t = 1..T, forward step t carrying the neuron state, back-propagate L[t]
//!   through step t only, accumulate parameter gradients. One cache, reused every step: memory does
//!   not grow with T.
//! * [`BpMode::Random`]: draw K distinct steps (K = 1: one step t_r) from the run's seeded generator;
//!   forward 1..max(t_r) with no cache except at the drawn steps, back-propagate only their losses.
//! * [`BpMode::Bptt`]: forward all T steps keeping T caches, then back-propagate Σ_t L[t] through
//!   time (the STBP baseline).
//!
//! The loss is the mean over the back-propagated steps of the per-step loss, so gradients have the
//! same scale in every mode.

use crate::error::Result;
use crate::layers::{Cache, GradMode, Layer, State, StepCtx};
use crate::rng::Rng;
use crate::tensor::{Real, Tensor};

/// How gradients are computed over the T steps of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpMode {
    /// Online training: back-propagate every step's loss through that step only.
    Online,
    /// Random back-propagation: only `k` random steps (drawn per batch) are back-propagated.
    Random {
        /// Steps drawn per batch (1 = the paper's random BP; K > 1 = SLTT-K style).
        k: usize,
    },
    /// Back-propagation through time over the unrolled graph.
    Bptt,
}

impl BpMode {
    /// Short name for logs and configs: `online`, `random`, `random-K`, `bptt`.
    pub fn name(&self) -> String {
        match self {
            BpMode::Online => "online".into(),
            BpMode::Random { k: 1 } => "random".into(),
            BpMode::Random { k } => format!("random-{k}"),
            BpMode::Bptt => "bptt".into(),
        }
    }
    /// Parse [`BpMode::name`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "online" => Some(BpMode::Online),
            "random" => Some(BpMode::Random { k: 1 }),
            "bptt" => Some(BpMode::Bptt),
            _ => s
                .strip_prefix("random-")
                .and_then(|k| k.parse().ok())
                .filter(|&k| k >= 1)
                .map(|k| BpMode::Random { k }),
        }
    }
}

/// The input of each time-step.
#[derive(Clone, Copy)]
pub enum StepInput<'a, R: Real> {
    /// The same tensor at every step (direct encoding of static images).
    Static(&'a Tensor<R>),
    /// One frame per step (event data): `frames[t]`.
    Frames(&'a [Tensor<R>]),
}

impl<R: Real> StepInput<'_, R> {
    fn at(&self, t: usize) -> &Tensor<R> {
        match self {
            StepInput::Static(x) => x,
            StepInput::Frames(f) => &f[t.min(f.len() - 1)],
        }
    }
}

/// What one batch produced.
#[derive(Clone, Debug)]
pub struct BatchResult<R: Real> {
    /// Mean over back-propagated steps of the per-step loss.
    pub loss: f64,
    /// Outputs O[t] of every step that was run (random BP stops at the last drawn step).
    pub outputs: Vec<Tensor<R>>,
    /// Steps whose loss was back-propagated (0-based).
    pub bp_steps: Vec<usize>,
    /// Largest number of bytes held by caches at any point of the batch.
    pub peak_cache_bytes: usize,
}

/// Per-step loss: `(t, O[t]) -> (loss, dL/dO[t])`.
pub type StepLoss<'a, R> = dyn FnMut(usize, &Tensor<R>) -> Result<(f64, Tensor<R>)> + 'a;

/// Hook called after each back-propagated step's backward (per-step optimiser updates).
pub type AfterStep<'a, R> = &'a mut dyn FnMut(&mut dyn Layer<R>) -> Result<()>;

/// Run one mini-batch through `steps` time-steps in training mode and accumulate gradients into the
/// network's parameters (it does not zero them first, nor update them).
///
/// `loss(t, output)` returns the step's loss and its gradient with respect to the output.
pub fn train_batch<R: Real>(
    net: &mut dyn Layer<R>,
    input: StepInput<'_, R>,
    steps: usize,
    mode: BpMode,
    rng: &mut Rng,
    loss: &mut StepLoss<'_, R>,
    mut after_step: Option<AfterStep<'_, R>>,
) -> Result<BatchResult<R>> {
    let mut state = State::Empty;
    let mut outputs = Vec::with_capacity(steps);
    let mut peak = 0usize;
    let mut total = 0.0;
    match mode {
        BpMode::Online | BpMode::Random { .. } => {
            let bp: Vec<usize> = match mode {
                BpMode::Random { k } => draw_steps(rng, steps, k),
                _ => (0..steps).collect(),
            };
            let scale = R::of(1.0 / bp.len() as f64);
            let last = *bp.last().expect("at least one step");
            let mut cache = Cache::new();
            for t in 0..=last {
                let ctx = StepCtx::train(t, steps, GradMode::Online);
                let wants = bp.binary_search(&t).is_ok();
                let y = net.forward(
                    input.at(t),
                    &ctx,
                    &mut state,
                    if wants { Some(&mut cache) } else { None },
                )?;
                peak = peak.max(cache.bytes() + state.bytes());
                if wants {
                    let (l, mut dy) = loss(t, &y)?;
                    total += l;
                    dy.mapv_inplace(|g| g * scale);
                    let mut dstate = State::Empty;
                    net.backward(&dy, &ctx, &cache, &mut dstate)?;
                    if let Some(h) = after_step.as_mut() {
                        h(net)?;
                    }
                }
                outputs.push(y);
            }
            Ok(BatchResult {
                loss: total / bp.len() as f64,
                outputs,
                bp_steps: bp,
                peak_cache_bytes: peak,
            })
        }
        BpMode::Bptt => {
            let mut caches: Vec<Cache> = (0..steps).map(|_| Cache::new()).collect();
            let mut dys = Vec::with_capacity(steps);
            let scale = R::of(1.0 / steps as f64);
            let mut held = 0;
            for (t, cache) in caches.iter_mut().enumerate() {
                let ctx = StepCtx::train(t, steps, GradMode::Bptt);
                let y = net.forward(input.at(t), &ctx, &mut state, Some(cache))?;
                held += cache.bytes();
                peak = peak.max(held + state.bytes());
                let (l, mut dy) = loss(t, &y)?;
                total += l;
                dy.mapv_inplace(|g| g * scale);
                dys.push(dy);
                outputs.push(y);
            }
            let mut dstate = State::Empty;
            for t in (0..steps).rev() {
                let ctx = StepCtx::train(t, steps, GradMode::Bptt);
                net.backward(&dys[t], &ctx, &caches[t], &mut dstate)?;
                caches[t].clear();
            }
            if let Some(h) = after_step.as_mut() {
                h(net)?;
            }
            Ok(BatchResult {
                loss: total / steps as f64,
                outputs,
                bp_steps: (0..steps).collect(),
                peak_cache_bytes: peak,
            })
        }
    }
}

/// Forward `steps` time-steps in evaluation mode (running BN statistics, no caches); returns O[t].
pub fn eval_batch<R: Real>(
    net: &mut dyn Layer<R>,
    input: StepInput<'_, R>,
    steps: usize,
) -> Result<Vec<Tensor<R>>> {
    let mut state = State::Empty;
    (0..steps)
        .map(|t| net.forward(input.at(t), &StepCtx::eval(t, steps), &mut state, None))
        .collect()
}

/// `k` distinct steps drawn uniformly from `0..steps`, sorted.
pub fn draw_steps(rng: &mut Rng, steps: usize, k: usize) -> Vec<usize> {
    let k = k.clamp(1, steps);
    let mut all: Vec<usize> = (0..steps).collect();
    // partial Fisher-Yates: the first k entries are a uniform sample
    for i in 0..k {
        let j = i + rng.below(steps - i);
        all.swap(i, j);
    }
    let mut s = all[..k].to_vec();
    s.sort_unstable();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bp_mode_names_round_trip() {
        for m in [
            BpMode::Online,
            BpMode::Bptt,
            BpMode::Random { k: 1 },
            BpMode::Random { k: 3 },
        ] {
            assert_eq!(BpMode::parse(&m.name()), Some(m));
        }
        assert_eq!(BpMode::parse("random-0"), None);
        assert_eq!(BpMode::parse("nope"), None);
    }

    #[test]
    fn drawn_steps_are_distinct_sorted_and_uniform() {
        let mut rng = Rng::new(9);
        let mut hist = [0usize; 4];
        for _ in 0..4000 {
            let s = draw_steps(&mut rng, 4, 1);
            hist[s[0]] += 1;
            let s2 = draw_steps(&mut rng, 4, 3);
            assert_eq!(s2.len(), 3);
            assert!(s2.windows(2).all(|w| w[0] < w[1]));
        }
        assert!(hist.iter().all(|&c| (850..1150).contains(&c)), "{hist:?}");
    }
}
