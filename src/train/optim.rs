//! Optimisers (SGD with momentum / Nesterov, Adam) and the learning-rate schedule (linear warm-up,
//! cosine annealing). EMPF.md §7: SGD, momentum 0.9, Nesterov, lr 0.01 at batch 64, cosine
//! annealing, weight decay 5e-4 - by default not on BatchNorm or neuron parameters.

use crate::error::{Error, Result};
use crate::layers::{Layer, Param, ParamKind};
use crate::tensor::Real;
use std::collections::BTreeMap;

/// Which optimiser.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimKind {
    /// SGD with (optionally Nesterov) momentum, PyTorch semantics.
    Sgd {
        /// Momentum μ (0 disables it).
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// Adam (Kingma & Ba), PyTorch semantics (coupled L2 weight decay).
    Adam {
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
        /// ε.
        eps: f64,
    },
}

impl OptimKind {
    /// Name for configs and logs: `sgd` or `adam`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimKind::Sgd { .. } => "sgd",
            OptimKind::Adam { .. } => "adam",
        }
    }
}

/// Optimiser settings.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    /// The algorithm.
    pub kind: OptimKind,
    /// Weight decay (L2, added to the gradient).
    pub weight_decay: f64,
    /// Also decay BatchNorm γ/β, biases and neuron parameters (off by default).
    pub decay_all: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            weight_decay: 5e-4,
            decay_all: false,
        }
    }
}

/// Learning rate over the run: linear warm-up for `warmup` steps, then cosine annealing from `base`
/// to `min` at `total` steps (constant `base` when `cosine` is off).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub base: f64,
    /// Final learning rate of the cosine.
    pub min: f64,
    /// Total optimiser steps of the run.
    pub total: u64,
    /// Warm-up steps.
    pub warmup: u64,
    /// Cosine annealing on/off.
    pub cosine: bool,
}

impl Schedule {
    /// The learning rate at optimiser step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.base * (step + 1) as f64 / self.warmup as f64;
        }
        if !self.cosine || self.total <= self.warmup {
            return self.base;
        }
        let p = ((step - self.warmup) as f64 / (self.total - self.warmup) as f64).min(1.0);
        self.min + 0.5 * (self.base - self.min) * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Optimiser state: one or two moment buffers per parameter, keyed by the parameter's stable name.
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// Settings.
    pub cfg: OptimConfig,
    /// Updates done so far.
    pub step: u64,
    m: BTreeMap<String, Vec<f32>>,
    v: BTreeMap<String, Vec<f32>>,
}

impl Optimizer {
    /// Fresh state.
    pub fn new(cfg: OptimConfig) -> Self {
        Optimizer {
            cfg,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update of every trainable parameter of `net` from its accumulated gradient, at rate `lr`.
    /// Gradients are left as they are (zero them before the next accumulation).
    pub fn update<R: Real>(&mut self, net: &mut dyn Layer<R>, lr: f64) {
        self.step += 1;
        let t = self.step as f64;
        let cfg = self.cfg.clone();
        let (m, v) = (&mut self.m, &mut self.v);
        net.visit_params(&mut |p: &mut Param<R>| {
            if !p.trainable() {
                return;
            }
            let wd = if cfg.weight_decay != 0.0
                && (cfg.decay_all || matches!(p.kind, ParamKind::Weight | ParamKind::BinaryWeight))
            {
                cfg.weight_decay
            } else {
                0.0
            };
            let n = p.value.len();
            let w = p
                .value
                .as_slice_mut()
                .expect("parameters are standard layout");
            let g = p.grad.as_slice().expect("gradients are standard layout");
            match cfg.kind {
                OptimKind::Sgd { momentum, nesterov } => {
                    let buf = m.entry(p.name.clone()).or_insert_with(|| vec![0.0; n]);
                    let first = t == 1.0 || buf.len() != n;
                    if buf.len() != n {
                        *buf = vec![0.0; n];
                    }
                    for i in 0..n {
                        let gi = g[i].f64() + wd * w[i].f64();
                        let step = if momentum != 0.0 {
                            // PyTorch: buf = g on the first step, then buf = μ·buf + g
                            let b = if first {
                                gi
                            } else {
                                momentum * buf[i] as f64 + gi
                            };
                            buf[i] = b as f32;
                            if nesterov { gi + momentum * b } else { b }
                        } else {
                            gi
                        };
                        w[i] = R::of(w[i].f64() - lr * step);
                    }
                }
                OptimKind::Adam { beta1, beta2, eps } => {
                    let mb = m.entry(p.name.clone()).or_insert_with(|| vec![0.0; n]);
                    let vb = v.entry(p.name.clone()).or_insert_with(|| vec![0.0; n]);
                    let (c1, c2) = (1.0 - beta1.powf(t), 1.0 - beta2.powf(t));
                    for i in 0..n {
                        let gi = g[i].f64() + wd * w[i].f64();
                        let mi = beta1 * mb[i] as f64 + (1.0 - beta1) * gi;
                        let vi = beta2 * vb[i] as f64 + (1.0 - beta2) * gi * gi;
                        mb[i] = mi as f32;
                        vb[i] = vi as f32;
                        w[i] = R::of(w[i].f64() - lr * (mi / c1) / ((vi / c2).sqrt() + eps));
                    }
                }
            }
        });
    }

    /// The moment buffers as named tensors (for checkpoints): `optim.m.<param>`, `optim.v.<param>`.
    pub fn state_tensors(&self) -> Vec<(String, Vec<f32>)> {
        let mut out = Vec::new();
        for (k, b) in &self.m {
            out.push((format!("optim.m.{k}"), b.clone()));
        }
        for (k, b) in &self.v {
            out.push((format!("optim.v.{k}"), b.clone()));
        }
        out
    }

    /// Restore buffers written by [`Optimizer::state_tensors`].
    pub fn load_state_tensor(&mut self, name: &str, data: Vec<f32>) -> Result<()> {
        if let Some(k) = name.strip_prefix("optim.m.") {
            self.m.insert(k.to_string(), data);
        } else if let Some(k) = name.strip_prefix("optim.v.") {
            self.v.insert(k.to_string(), data);
        } else {
            return Err(Error::Config(format!(
                "unknown optimiser state entry `{name}`"
            )));
        }
        Ok(())
    }
}

/// Zero every gradient of `net`.
pub fn zero_grads<R: Real>(net: &mut dyn Layer<R>) {
    net.visit_params(&mut |p| {
        if p.trainable() {
            p.zero_grad()
        }
    });
}

/// Multiply every gradient by `s` (e.g. 1/T or 1/K).
pub fn scale_grads<R: Real>(net: &mut dyn Layer<R>, s: f64) {
    let s = R::of(s);
    net.visit_params(&mut |p| {
        if p.trainable() {
            p.grad.mapv_inplace(|g| g * s)
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Linear;
    use crate::rng::Rng;

    #[test]
    fn cosine_schedule_with_warmup() {
        let s = Schedule {
            base: 0.1,
            min: 0.0,
            total: 110,
            warmup: 10,
            cosine: true,
        };
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(60) - 0.05).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-12);
    }

    #[test]
    fn sgd_nesterov_matches_hand_computation_and_skips_decay_on_bias() {
        let mut rng = Rng::new(0);
        let mut l = Linear::<f32>::new("fc", 1, 1, true, &mut rng);
        l.weight.value.fill(1.0);
        l.bias.as_mut().unwrap().value.fill(1.0);
        let mut opt = Optimizer::new(OptimConfig {
            kind: OptimKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            weight_decay: 0.1,
            decay_all: false,
        });
        for _ in 0..2 {
            l.weight.grad.fill(0.5);
            l.bias.as_mut().unwrap().grad.fill(0.5);
            opt.update(&mut l, 0.1);
        }
        // weight: step1 g=0.5+0.1=0.6, buf=0.6, upd=0.6+0.54=1.14, w=0.886
        //         step2 g=0.5+0.0886=0.5886, buf=0.54+0.5886=1.1286, upd=0.5886+1.01574=1.60434, w=0.7255660
        assert!(
            (l.weight.value[[0, 0]] - 0.725566).abs() < 1e-5,
            "{}",
            l.weight.value[[0, 0]]
        );
        // bias: no decay: step1 buf .5 upd .95 b=.905; step2 buf .95 upd .5+.855=1.355 b=.7695
        assert!((l.bias.as_ref().unwrap().value[[0]] - 0.7695).abs() < 1e-5);
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        let mut rng = Rng::new(0);
        let mut l = Linear::<f32>::new("fc", 2, 1, false, &mut rng);
        let w0 = l.weight.value.clone();
        l.weight.grad.fill(3.0);
        let mut opt = Optimizer::new(OptimConfig {
            kind: OptimKind::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            weight_decay: 0.0,
            decay_all: false,
        });
        opt.update(&mut l, 0.01);
        for (a, b) in l.weight.value.iter().zip(w0.iter()) {
            assert!((b - a - 0.01).abs() < 1e-6);
        }
    }
}
