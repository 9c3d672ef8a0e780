//! k-bit spike quantisation for quantisation-aware training (EMPF.md §10).
//!
//! Forward: `q(x) = clamp(round(x/step), 0, 2^bits − 1) · step` (spec: 4-bit = round(4s) clipped to
//! [0, 15], divided by 4, i.e. `bits = 4`, `step = 1/4`).
//!
//! Backward (straight-through estimator, clipped to the representable range): `round` is treated as
//! the identity, the clamp is kept, so `dL/dx = dL/dy · 1{0 ≤ x ≤ (2^bits − 1)·step}`. The STE is
//! not a derivative of the forward (which is piecewise constant), so it is checked against this
//! formula, not against finite differences. No parameters, no state.

use crate::error::{Error, Result};
use crate::layers::{Cache, Layer, Param, State, StepCtx, check_grad_shape};
use crate::tensor::{Real, Tensor, as_slice, from_vec};

/// The default step: `1/4` (the spec's 4-bit rule), for every `bits`.
pub const DEFAULT_STEP: f64 = 0.25;

/// `clamp(round(x/step), 0, 2^bits − 1)` as an integer level (the runtime's quantiser).
pub fn level(x: f32, step: f32, bits: u32) -> u8 {
    let max = ((1u32 << bits) - 1) as f32;
    (x / step).round().clamp(0.0, max) as u8
}

/// Spike quantiser layer.
pub struct SpikeQuant {
    name: String,
    /// Bits per spike (1..=8).
    pub bits: u32,
    /// Quantisation step.
    pub step: f64,
}

/// Backward needs the pass-through mask.
#[derive(Default)]
pub struct QuantCache {
    pass: Vec<u8>,
    shape: Vec<usize>,
}
crate::impl_cache!(QuantCache { pass });

impl SpikeQuant {
    /// A `bits`-bit quantiser with step `step`.
    pub fn new(name: &str, bits: u32, step: f64) -> Result<Self> {
        if !((1..=8).contains(&bits) && step.is_finite() && step > 0.0) {
            return Err(Error::Config(format!(
                "spike quantiser `{name}`: bits must be 1..=8 and step positive, got {bits} and {step}"
            )));
        }
        Ok(SpikeQuant {
            name: name.to_string(),
            bits,
            step,
        })
    }
    fn max(&self) -> f64 {
        ((1u32 << self.bits) - 1) as f64
    }
}

impl<R: Real> Layer<R> for SpikeQuant {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "SpikeQuant"
    }
    fn describe(&self) -> String {
        format!("SpikeQuant({} bits, step {})", self.bits, self.step)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let xs = as_slice(x);
        let (step, max) = (R::of(self.step), R::of(self.max()));
        let y: Vec<R> = xs
            .iter()
            .map(|&v| (v / step).round().max(R::zero()).min(max) * step)
            .collect();
        if let Some(c) = cache {
            let c = c.get_or_default::<QuantCache>();
            let hi = max * step;
            c.pass.clear();
            c.pass
                .extend(xs.iter().map(|&v| u8::from(v >= R::zero() && v <= hi)));
            c.shape = x.shape().to_vec();
        }
        Ok(from_vec(x.shape(), y))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<QuantCache>(&self.name)?;
        check_grad_shape(&self.name, dy.shape(), &c.shape)?;
        *dstate = State::Empty;
        let d = as_slice(dy);
        let dx = d
            .iter()
            .zip(&c.pass)
            .map(|(&g, &p)| if p == 1 { g } else { R::zero() })
            .collect();
        Ok(from_vec(&c.shape, dx))
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::GradMode;

    #[test]
    fn spike_quant_follows_the_four_bit_rule_and_its_ste_masks_the_clamped_range() {
        let mut q = SpikeQuant::new("q", 4, 0.25).unwrap();
        let x = from_vec(&[1, 6], vec![-0.3f64, 0.1, 0.13, 0.5, 3.75, 9.0]);
        let ctx = StepCtx::train(0, 1, GradMode::Online);
        let mut cache = Cache::new();
        let y = q
            .forward(&x, &ctx, &mut State::Empty, Some(&mut cache))
            .unwrap();
        assert_eq!(
            y.as_slice().unwrap(),
            &[0.0, 0.0, 0.25, 0.5, 3.75, 3.75],
            "round(4s) clipped to [0, 15], /4"
        );
        let dy = from_vec(&[1, 6], vec![1.0f64; 6]);
        let dx = q.backward(&dy, &ctx, &cache, &mut State::Empty).unwrap();
        assert_eq!(dx.as_slice().unwrap(), &[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        assert_eq!(level(0.13, 0.25, 4), 1);
        assert_eq!(level(9.0, 0.25, 2), 3);
        assert!(SpikeQuant::new("q", 9, 0.25).is_err());
        assert!(SpikeQuant::new("q", 4, f64::NAN).is_err());
    }
}
