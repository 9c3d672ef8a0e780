//! Binary synaptic layers (EMPF.md §4): [`BinaryConv2d`] and [`BinaryLinear`].
//!
//! # Forward
//! Latent real weights `W` (one row `W[o, ·]` per output channel `o`, `K` entries each) give the
//! forward weights
//!
//! ```text
//! W_b[o, r] = α_o · sign(W[o, r]),   α_o = (1/K) Σ_r |W[o, r]|,   sign(0) = +1
//! ```
//!
//! and the layer is the convolution (or linear map) with `W_b` as its weights, no bias. `W_b` is
//! recomputed from `W.value` at every forward and backward (an `O·K` pass, negligible next to the
//! GEMM's `2·O·K·P·N` flops): the optimiser mutates `weight.value` through `visit_params`, so a
//! cached `W_b` could go stale; recomputing is always right.
//!
//! # Backward
//! * `dL/dx`: exactly the convolution / linear backward with `W_b` held as the weights.
//! * `dL/dW` (a defined estimator, not a derivative: `sign` has zero derivative almost everywhere):
//!   α is treated as a constant (no gradient through α), and the straight-through estimator
//!   clipped to the unit box passes the gradient of `W_b` through where `|W| ≤ 1`:
//!
//!   ```text
//!   dL/dW[o, r] += dL/dW_b[o, r] · 1{|W[o, r]| ≤ 1}
//!   ```
//!
//!   where `dL/dW_b` is the ordinary weight gradient of the convolution / linear map.
//!
//! # Deployment
//! [`BinaryConv2d::sign_alpha`] / [`BinaryLinear::sign_alpha`] give the packed-ready view: one sign
//! per weight and one α per output channel (1 bit per weight + one f32 per channel, §4).

use crate::error::{Error, Result};
use crate::layers::conv::{ConvCore, ConvSpec, InputCache, WeightInit};
use crate::layers::linear::{linear_backward, linear_forward};
use crate::layers::{Cache, Facts, Layer, Param, ParamKind, State, StepCtx, check_shape};
use crate::rng::Rng;
use crate::tensor::{Real, Tensor, as_slice, from_vec};
use empf_simd::SignConvWeights;

/// Initialisation of the latent weights of a binary layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BinaryInit {
    /// Kaiming normal with fan-in, `N(0, 2 / fan_in)`.
    #[default]
    Kaiming,
    /// The authors' code: `U[0, 1e-3)` (all signs start at +1, α ≈ 5e-4).
    AuthorsUniform,
}

impl BinaryInit {
    fn sample<R: Real>(self, fan_in: usize, len: usize, rng: &mut Rng) -> Vec<R> {
        match self {
            BinaryInit::Kaiming => WeightInit::KaimingNormal.sample(fan_in, len, rng),
            BinaryInit::AuthorsUniform => {
                WeightInit::Uniform { lo: 0.0, hi: 1e-3 }.sample(fan_in, len, rng)
            }
        }
    }
}

/// The deployable form of binary weights: signs and per-output-channel scales.
#[derive(Clone, Debug, PartialEq)]
pub struct SignAlpha<R> {
    /// Shape of the weight tensor (`O x C x k x k` or `O x in`).
    pub shape: Vec<usize>,
    /// `true` where `sign(W) = +1` (including `W = 0`), row-major like the weight tensor.
    pub positive: Vec<bool>,
    /// `α_o = mean |W[o, ·]|`, one per output channel.
    pub alpha: Vec<R>,
}

impl<R: Real> SignAlpha<R> {
    /// The forward weights `W_b = α_o · sign(W)`, row-major.
    pub fn weights(&self) -> Vec<R> {
        let per = self.positive.len() / self.alpha.len().max(1);
        self.positive
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                if p {
                    self.alpha[i / per]
                } else {
                    -self.alpha[i / per]
                }
            })
            .collect()
    }
}

/// `W_b[o, r] = α_o · sign(W[o, r])` with `α_o = mean_r |W[o, r]|` and `sign(0) = +1`;
/// rows of `per` entries. Writes into `wb` (same length as `w`).
pub fn binarize<R: Real>(w: &[R], per: usize, wb: &mut [R]) {
    debug_assert_eq!(w.len(), wb.len());
    for (row, out) in w.chunks_exact(per).zip(wb.chunks_exact_mut(per)) {
        let alpha = alpha_of(row);
        for (&v, o) in row.iter().zip(out) {
            *o = if v >= R::zero() { alpha } else { -alpha };
        }
    }
}

/// `α = mean |w|` of one output channel's latent weights (the one definition used everywhere, so
/// training, [`SignAlpha`] and deployment agree bit for bit).
pub fn alpha_of<R: Real>(row: &[R]) -> R {
    row.iter().map(|v| v.abs()).sum::<R>() / R::of(row.len().max(1) as f64)
}

/// The clipped straight-through estimator: `grad += dwb · 1{|w| ≤ 1}`.
pub fn ste_accumulate<R: Real>(w: &[R], dwb: &[R], grad: &mut [R]) {
    for ((g, &d), &v) in grad.iter_mut().zip(dwb).zip(w) {
        if v.abs() <= R::one() {
            *g += d;
        }
    }
}

fn sign_alpha<R: Real>(w: &Tensor<R>, per: usize) -> SignAlpha<R> {
    let ws = as_slice(w);
    SignAlpha {
        shape: w.shape().to_vec(),
        positive: ws.iter().map(|&v| v >= R::zero()).collect(),
        alpha: ws.chunks_exact(per).map(alpha_of).collect(),
    }
}

fn grow<R: Real>(v: &mut Vec<R>, n: usize) {
    v.clear();
    v.resize(n, R::zero());
}

/// Binary 2-D convolution (BConv, EMPF.md §4): the convolution of [`Conv2d`](super::conv::Conv2d)
/// with weights `W_b = α_o · sign(W)`, no bias; clipped STE backward for the latent `W`.
///
/// Parameter: `{name}.weight`, the latent weights `O x C x k x k`.
#[derive(Debug)]
pub struct BinaryConv2d<R: Real> {
    name: String,
    /// Latent real weights `W`, `O x C x k x k`.
    pub weight: Param<R>,
    core: ConvCore<R>,
    /// `W_b` buffer (reused).
    wb: Vec<R>,
    /// `dL/dW_b` buffer (reused).
    dwb: Vec<R>,
    /// f32 forward and backward through the sparse-input kernels when the input is sparse enough.
    sparse: bool,
    /// The producer of the input ignores its gradient where the input is zero
    /// ([`Facts::grad_ignored_at_zero`], told by the enclosing [`crate::model::Sequential`]): the
    /// sparse backward then computes `dL/dx` at the non-zero inputs only.
    input_grad_at_nonzero: bool,
}

/// Largest fraction of non-zero inputs for which [`BinaryConv2d`]'s f32 forward takes the
/// sparse-input kernel rather than the GEMM. Trained `mnist-cnn` layers see 0.2–0.4; the kernel
/// does work in proportion to the non-zeros at a lower rate than the GEMM.
pub const SPARSE_MAX_DENSITY: f64 = 0.6;

/// Largest fraction of non-zero inputs for which [`BinaryConv2d`]'s f32 weight gradient takes the
/// sparse-input dW kernel rather than im2col and the GEMM.
pub const SPARSE_DW_MAX_DENSITY: f64 = 0.45;

/// Largest fraction of non-zero inputs for which [`BinaryConv2d`]'s f32 backward takes the
/// sparse-input kernel for both gradients (when the input gradient is needed at the non-zero
/// inputs only, [`Facts::grad_ignored_at_zero`]): it then also replaces the input-gradient GEMM
/// and its col2im, and wins up to dense inputs (`mnist-cnn` on noise, 80 % non-zero: 217 against
/// 208 images/s).
pub const SPARSE_GRADS_MAX_DENSITY: f64 = 0.9;

/// Fraction of non-zero entries (sampled: every 7th of at most 64 Ki values).
fn density(x: &[f32]) -> f64 {
    let step = 7;
    let seen = x.iter().step_by(step).take(1 << 16);
    let (n, nz) = seen.fold((0usize, 0usize), |(n, nz), &v| {
        (n + 1, nz + usize::from(v != 0.0))
    });
    if n == 0 { 0.0 } else { nz as f64 / n as f64 }
}

impl<R: Real> BinaryConv2d<R> {
    /// A binary convolution with latent weights drawn by `init`.
    pub fn new(name: &str, spec: ConvSpec, init: BinaryInit, rng: &mut Rng) -> Self {
        let shape = spec.weight_shape();
        let w = init.sample(spec.fan_in(), shape.iter().product(), rng);
        BinaryConv2d {
            name: name.to_string(),
            weight: Param::new(
                format!("{name}.weight"),
                ParamKind::BinaryWeight,
                from_vec(&shape, w),
            ),
            core: ConvCore::new(spec),
            wb: Vec::new(),
            dwb: Vec::new(),
            sparse: true,
            input_grad_at_nonzero: false,
        }
    }

    /// The hyper-parameters.
    pub fn spec(&self) -> ConvSpec {
        self.core.spec
    }

    /// Largest im2col block per GEMM in elements (see [`Conv2d::set_col_budget`](super::conv::Conv2d::set_col_budget)).
    pub fn set_col_budget(&mut self, elements: usize) {
        self.core.col_budget = elements.max(1);
    }

    /// Signs and per-output-channel α of the current latent weights (the deployable form).
    pub fn sign_alpha(&self) -> SignAlpha<R> {
        sign_alpha(&self.weight.value, self.core.spec.fan_in())
    }

    /// The forward weights `W_b = α_o · sign(W)` (`O x C x k x k`).
    pub fn binary_weights(&self) -> Tensor<R> {
        let mut wb = vec![R::zero(); self.weight.value.len()];
        binarize(
            &as_slice(&self.weight.value),
            self.core.spec.fan_in(),
            &mut wb,
        );
        from_vec(self.weight.value.shape(), wb)
    }

    /// The f32 forward through the sparse-input kernel ([`empf_simd::Simd::sparse_conv`]), which
    /// skips zero inputs: spikes are mostly zero (firing rates of 0.2–0.4), where an im2col GEMM
    /// multiplies every zero. `y = α_o·Σ x·sign(W)`, the same sum as the GEMM path's `Σ x·W_b` in
    /// another order (equal to rounding). `None` (take the GEMM path) for f64 (the gradient checks),
    /// and for inputs denser than [`SPARSE_MAX_DENSITY`]. Reads α from `wb`: call
    /// [`Self::refresh_wb`] first.
    fn sparse_forward(&self, x: &Tensor<R>) -> Option<Result<Vec<R>>> {
        use std::any::Any;
        if !self.sparse {
            return None;
        }
        // R is f32 exactly when these downcasts succeed (f64 takes the GEMM path)
        let x32 = (x as &dyn Any).downcast_ref::<Tensor<f32>>()?;
        let w32 = (&self.weight.value as &dyn Any).downcast_ref::<Tensor<f32>>()?;
        let wb32 = (&self.wb as &dyn Any).downcast_ref::<Vec<f32>>()?;
        let xs = x32.as_slice()?;
        if density(xs) > SPARSE_MAX_DENSITY {
            return None;
        }
        let (s, shape) = (self.core.spec, x.shape());
        let run = || -> std::result::Result<Vec<f32>, empf_simd::SimdError> {
            let w = w32.as_slice().expect("standard layout");
            let signs = SignConvWeights::from_f32_oihw(w, s.out_ch, s.in_ch, s.kernel, s.kernel)?;
            let alpha: Vec<f32> = wb32.chunks_exact(s.fan_in()).map(|r| r[0].abs()).collect();
            empf_simd::Simd::global().sparse_conv_vec(
                xs,
                (shape[0], shape[2], shape[3]),
                0,
                &signs,
                s.stride,
                s.padding,
                &alpha,
                &vec![0.0f32; s.out_ch],
            )
        };
        Some(match run() {
            Ok(y) => Ok(*(Box::new(y) as Box<dyn Any>)
                .downcast::<Vec<R>>()
                .expect("R is f32")),
            Err(e) => Err(Error::Internal(format!("layer `{}`: {e}", self.name))),
        })
    }

    /// `dL/dW_b` into `dwb` through the sparse-input dW kernel
    /// ([`empf_simd::Simd::sparse_conv_backward`]), which visits only the non-zero input spikes
    /// (the GEMM path's `G · colᵀ` multiplies every zero of the 9x larger im2col block, which it
    /// first lays out); when the input's producer ignores the gradient at zero inputs
    /// ([`Facts::grad_ignored_at_zero`]), also `dL/dx` at the non-zero inputs (zero elsewhere), in
    /// the same pass, instead of the GEMM `W_bᵀ · G` and its col2im over every input. The same
    /// sums in another order (equal to rounding). `Ok(None)`: nothing done (take the GEMM path)
    /// for f64, strides other than 1, padding of `k` or more, inputs denser than
    /// [`SPARSE_DW_MAX_DENSITY`] (dW alone) or [`SPARSE_GRADS_MAX_DENSITY`] (both), and ISA levels
    /// without hardware FMA; `Ok(Some(dx))`: `dwb` is filled, and `dx` is the input gradient when
    /// it was computed.
    fn sparse_grads(&mut self, x: &Tensor<R>, dy: &Tensor<R>) -> Result<Option<Option<Vec<R>>>> {
        use std::any::Any;
        let s = self.core.spec;
        let simd = empf_simd::Simd::global();
        if !self.sparse || s.stride != 1 || s.padding >= s.kernel || !simd.sparse_dw_is_native() {
            return Ok(None);
        }
        // R is f32 exactly when these downcasts succeed (f64 takes the GEMM path)
        let (Some(x32), Some(dy32)) = (
            (x as &dyn Any).downcast_ref::<Tensor<f32>>(),
            (dy as &dyn Any).downcast_ref::<Tensor<f32>>(),
        ) else {
            return Ok(None);
        };
        let (Some(xs), Some(gs)) = (x32.as_slice(), dy32.as_slice()) else {
            return Ok(None);
        };
        let (Some(dwb), Some(wb)) = (
            (&mut self.dwb as &mut dyn Any).downcast_mut::<Vec<f32>>(),
            (&self.wb as &dyn Any).downcast_ref::<Vec<f32>>(),
        ) else {
            return Ok(None);
        };
        let limit = if self.input_grad_at_nonzero {
            SPARSE_GRADS_MAX_DENSITY
        } else {
            SPARSE_DW_MAX_DENSITY
        };
        if density(xs) > limit {
            return Ok(None);
        }
        let sh = x.shape();
        let dx = simd
            .sparse_conv_backward(
                xs,
                (sh[0], sh[1], sh[2], sh[3]),
                gs,
                s.out_ch,
                s.kernel,
                s.padding,
                dwb,
                self.input_grad_at_nonzero.then_some(&wb[..]),
            )
            .map_err(|e| Error::Internal(format!("layer `{}`: {e}", self.name)))?;
        Ok(Some(dx.map(|d| {
            *(Box::new(d) as Box<dyn Any>)
                .downcast::<Vec<R>>()
                .expect("R is f32")
        })))
    }

    /// Whether the input gradient is computed at the non-zero inputs only (its producer ignores
    /// the rest, as its enclosing [`crate::model::Sequential`] told it).
    pub fn input_grad_at_nonzero(&self) -> bool {
        self.input_grad_at_nonzero
    }

    /// Whether the f32 forward may take the sparse-input kernel (default on; off gives the GEMM
    /// path, for comparisons).
    pub fn set_sparse(&mut self, on: bool) {
        self.sparse = on;
    }

    fn refresh_wb(&mut self) {
        let w = self.weight.value.as_slice().expect("standard layout");
        grow(&mut self.wb, w.len());
        binarize(w, self.core.spec.fan_in(), &mut self.wb);
    }
}

impl<R: Real> Layer<R> for BinaryConv2d<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "BinaryConv2d"
    }
    fn describe(&self) -> String {
        let s = self.core.spec;
        format!(
            "BinaryConv2d({} -> {}, {k}x{k}, stride {}, padding {})",
            s.in_ch,
            s.out_ch,
            s.stride,
            s.padding,
            k = s.kernel
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.core.output_shape(&self.name, input)
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let out = self.output_shape(x.shape())?;
        self.refresh_wb();
        let y = match self.sparse_forward(x) {
            Some(y) => y?,
            None => self.core.forward(&as_slice(x), x.shape(), &self.wb, None),
        };
        if let Some(c) = cache {
            c.get_or_default::<InputCache<R>>().store(x);
        }
        Ok(from_vec(&out, y))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let x = cache.get::<InputCache<R>>(&self.name)?.input(&self.name)?;
        let out = self.output_shape(x.shape())?;
        crate::layers::check_grad_shape(&self.name, dy.shape(), &out)?;
        self.refresh_wb();
        grow(&mut self.dwb, self.wb.len());
        let sparse = self.sparse_grads(x, dy)?;
        let dx = match sparse {
            Some(Some(dx)) => dx,
            _ => self.core.backward(
                x.as_slice().expect("standard layout"),
                x.shape(),
                &self.wb,
                &as_slice(dy),
                sparse.is_none().then_some(&mut self.dwb[..]),
                None,
                true,
            ),
        };
        ste_accumulate(
            self.weight.value.as_slice().expect("standard layout"),
            &self.dwb,
            self.weight.grad.as_slice_mut().expect("standard layout"),
        );
        Ok(from_vec(x.shape(), dx))
    }
    fn set_input_facts(&mut self, facts: Facts) {
        self.input_grad_at_nonzero = facts.grad_ignored_at_zero;
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.weight);
    }
}

/// Binary fully connected layer (BLinear, EMPF.md §4): `y = x W_bᵀ`, `W_b = α_o · sign(W)`, no
/// bias; clipped STE backward for the latent `W`. Input `N x in`, output `N x out`.
///
/// Parameter: `{name}.weight`, the latent weights `out x in`.
#[derive(Debug)]
pub struct BinaryLinear<R: Real> {
    name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Latent real weights `W`, `out x in`.
    pub weight: Param<R>,
    wb: Vec<R>,
    dwb: Vec<R>,
}

impl<R: Real> BinaryLinear<R> {
    /// A binary linear layer with latent weights drawn by `init` (fan-in = `in_features`).
    pub fn new(
        name: &str,
        in_features: usize,
        out_features: usize,
        init: BinaryInit,
        rng: &mut Rng,
    ) -> Self {
        let w = init.sample(in_features, in_features * out_features, rng);
        BinaryLinear {
            name: name.to_string(),
            in_features,
            out_features,
            weight: Param::new(
                format!("{name}.weight"),
                ParamKind::BinaryWeight,
                from_vec(&[out_features, in_features], w),
            ),
            wb: Vec::new(),
            dwb: Vec::new(),
        }
    }

    /// Signs and per-output α of the current latent weights (the deployable form).
    pub fn sign_alpha(&self) -> SignAlpha<R> {
        sign_alpha(&self.weight.value, self.in_features)
    }

    /// The forward weights `W_b = α_o · sign(W)` (`out x in`).
    pub fn binary_weights(&self) -> Tensor<R> {
        let mut wb = vec![R::zero(); self.weight.value.len()];
        binarize(&as_slice(&self.weight.value), self.in_features, &mut wb);
        from_vec(self.weight.value.shape(), wb)
    }

    fn refresh_wb(&mut self) {
        let w = self.weight.value.as_slice().expect("standard layout");
        grow(&mut self.wb, w.len());
        binarize(w, self.in_features, &mut self.wb);
    }
}

impl<R: Real> Layer<R> for BinaryLinear<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "BinaryLinear"
    }
    fn describe(&self) -> String {
        format!(
            "BinaryLinear({} -> {})",
            self.in_features, self.out_features
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_shape(
            &self.name,
            input,
            &[None, Some(self.in_features)],
            &format!("N x {} features", self.in_features),
        )?;
        Ok(vec![input[0], self.out_features])
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let out = self.output_shape(x.shape())?;
        self.refresh_wb();
        let xs = as_slice(x);
        let y = linear_forward(
            &xs,
            out[0],
            &self.wb,
            None,
            self.in_features,
            self.out_features,
        );
        if let Some(c) = cache {
            c.get_or_default::<InputCache<R>>().store(x);
        }
        Ok(from_vec(&out, y))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let x = cache.get::<InputCache<R>>(&self.name)?.input(&self.name)?;
        let n = x.shape()[0];
        check_shape(
            &self.name,
            dy.shape(),
            &[Some(n), Some(self.out_features)],
            "output gradient N x out",
        )?;
        self.refresh_wb();
        grow(&mut self.dwb, self.wb.len());
        let dys = as_slice(dy);
        let dx = linear_backward(
            x.as_slice().expect("standard layout"),
            &dys,
            n,
            &self.wb,
            &mut self.dwb,
            None,
            self.in_features,
            self.out_features,
        );
        ste_accumulate(
            self.weight.value.as_slice().expect("standard layout"),
            &self.dwb,
            self.weight.grad.as_slice_mut().expect("standard layout"),
        );
        Ok(from_vec(&[n, self.in_features], dx))
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step};
    use crate::layers::GradMode;
    use crate::layers::conv::naive_conv;
    use crate::rng::Rng;
    use crate::tensor::zeros;
    use proptest::prelude::*;

    fn rand_tensor(rng: &mut Rng, shape: &[usize]) -> Tensor<f64> {
        from_vec(
            shape,
            (0..shape.iter().product()).map(|_| rng.normal()).collect(),
        )
    }

    /// Latent weights with a good share beyond the unit box (|W| > 1) and a few exact zeros.
    fn spread_weights(w: &mut Tensor<f64>, rng: &mut Rng) {
        w.mapv_inplace(|_| {
            let u = rng.uniform();
            if u < 0.05 { 0.0 } else { 1.6 * rng.normal() }
        });
    }

    fn conv_strategy() -> impl Strategy<Value = (usize, ConvSpec, usize, usize)> {
        (
            1usize..4,
            1usize..4,
            1usize..5,
            prop::sample::select(vec![1usize, 3]),
            1usize..3,
            0usize..2,
            1usize..8,
            1usize..8,
        )
            .prop_map(|(n, c, o, k, s, p, h, w)| {
                let spec = ConvSpec::new(c, o, k).stride(s).padding(p);
                let min = k.saturating_sub(2 * p).max(1);
                (n, spec, h.max(min), w.max(min))
            })
    }

    /// `dL/dW_b` by central differences of `L = ⟨r, layer(x; W_b)⟩` over the weights of a layer
    /// built with `W_b` as its (full-precision) weights; `eval(wb)` runs that layer.
    fn fd_weight_grad(wb: &[f64], eval: &mut dyn FnMut(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-4;
        let mut w = wb.to_vec();
        (0..wb.len())
            .map(|i| {
                w[i] = wb[i] + h;
                let lp = eval(&w);
                w[i] = wb[i] - h;
                let lm = eval(&w);
                w[i] = wb[i];
                (lp - lm) / (2.0 * h)
            })
            .collect()
    }

    fn assert_ste(w: &[f64], grad: &[f64], fd: &[f64]) {
        let scale = fd.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for ((&wv, &g), &f) in w.iter().zip(grad).zip(fd) {
            let want = if wv.abs() <= 1.0 { f } else { 0.0 };
            if wv.abs() > 1.0 {
                assert_eq!(g, 0.0, "|W| = {} > 1 must get no gradient", wv.abs());
            }
            assert!(
                (g - want).abs() <= 1e-7 * scale,
                "latent grad {g} vs STE of finite difference {want} (W = {wv})"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn binary_conv_input_gradient_matches_finite_differences(
            (n, spec, h, w) in conv_strategy(),
            seed in 0u64..1000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = BinaryConv2d::<f64>::new("bconv", spec, BinaryInit::Kaiming, &mut rng);
            spread_weights(&mut l.weight.value, &mut rng);
            let x = rand_tensor(&mut rng, &[n, spec.in_ch, h, w]);
            let opts = GradCheckOpts { seed, skip_params: vec!["weight".into()], ..Default::default() };
            let rep = check_step(&mut l, &x, &StepCtx::train(0, 1, GradMode::Online), &State::Empty, &opts).unwrap();
            prop_assert!(rep.checked > 0);
            rep.assert_ok(&opts, "BinaryConv2d input");
        }

        #[test]
        fn binary_conv_latent_gradient_is_clipped_ste_of_the_wb_conv_gradient(
            (n, spec, h, w) in conv_strategy(),
            seed in 0u64..1000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = BinaryConv2d::<f64>::new("bconv", spec, BinaryInit::Kaiming, &mut rng);
            spread_weights(&mut l.weight.value, &mut rng);
            let shape = [n, spec.in_ch, h, w];
            let x = rand_tensor(&mut rng, &shape);
            let ctx = StepCtx::train(0, 1, GradMode::Online);
            let mut cache = Cache::new();
            let y = l.forward(&x, &ctx, &mut State::Empty, Some(&mut cache)).unwrap();
            let r = rand_tensor(&mut rng, y.shape());
            l.weight.zero_grad();
            l.backward(&r, &ctx, &cache, &mut State::Empty).unwrap();
            let wb = l.binary_weights();
            let xs = x.as_slice().unwrap().to_vec();
            let rs = r.as_slice().unwrap().to_vec();
            let fd = fd_weight_grad(wb.as_slice().unwrap(), &mut |wv| {
                naive_conv(&spec, &xs, &shape, wv, None).iter().zip(&rs).map(|(a, b)| a * b).sum()
            });
            assert_ste(l.weight.value.as_slice().unwrap(), l.weight.grad.as_slice().unwrap(), &fd);
        }

        #[test]
        fn binary_linear_gradients_are_exact_for_input_and_clipped_ste_for_weights(
            n in 1usize..5, fin in 1usize..20, fout in 1usize..9, seed in 0u64..1000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = BinaryLinear::<f64>::new("bfc", fin, fout, BinaryInit::Kaiming, &mut rng);
            spread_weights(&mut l.weight.value, &mut rng);
            let x = rand_tensor(&mut rng, &[n, fin]);
            let opts = GradCheckOpts { seed, skip_params: vec!["weight".into()], ..Default::default() };
            let ctx = StepCtx::train(0, 1, GradMode::Online);
            let rep = check_step(&mut l, &x, &ctx, &State::Empty, &opts).unwrap();
            prop_assert!(rep.checked > 0);
            rep.assert_ok(&opts, "BinaryLinear input");
            // STE: latent grad == 1{|W| <= 1} ⊙ d⟨r, x W_bᵀ⟩/dW_b
            let mut cache = Cache::new();
            let y = l.forward(&x, &ctx, &mut State::Empty, Some(&mut cache)).unwrap();
            let r = rand_tensor(&mut rng, y.shape());
            l.weight.zero_grad();
            l.backward(&r, &ctx, &cache, &mut State::Empty).unwrap();
            let wb = l.binary_weights();
            let fd = fd_weight_grad(wb.as_slice().unwrap(), &mut |wv| {
                let mut fc = crate::layers::Linear::<f64>::new("fc", fin, fout, false, &mut Rng::new(0));
                fc.weight.value = from_vec(&[fout, fin], wv.to_vec());
                let y = fc.forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None).unwrap();
                y.iter().zip(r.iter()).map(|(a, b)| a * b).sum()
            });
            assert_ste(l.weight.value.as_slice().unwrap(), l.weight.grad.as_slice().unwrap(), &fd);
        }

        #[test]
        fn binary_conv_forward_equals_naive_conv_with_alpha_sign_weights(
            (n, spec, h, w) in conv_strategy(),
            budget in prop::sample::select(vec![1usize, 64, 1 << 20]),
            seed in 0u64..1000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = BinaryConv2d::<f64>::new("bconv", spec, BinaryInit::Kaiming, &mut rng);
            spread_weights(&mut l.weight.value, &mut rng);
            l.set_col_budget(budget);
            let shape = [n, spec.in_ch, h, w];
            let x = rand_tensor(&mut rng, &shape);
            let y = l.forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None).unwrap();
            // W_b built here independently: α_o = mean |W[o]|, sign(0) = +1
            let k = spec.fan_in();
            let wv = l.weight.value.as_slice().unwrap();
            let wb: Vec<f64> = (0..wv.len())
                .map(|i| {
                    let o = i / k;
                    let a = wv[o * k..(o + 1) * k].iter().map(|v| v.abs()).sum::<f64>() / k as f64;
                    if wv[i] < 0.0 { -a } else { a }
                })
                .collect();
            let yr = naive_conv(&spec, x.as_slice().unwrap(), &shape, &wb, None);
            for (a, b) in y.iter().zip(&yr) {
                prop_assert!((a - b).abs() < 1e-12 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }

    #[test]
    fn sign_of_zero_is_plus_one_and_sign_alpha_rebuilds_wb() {
        let mut rng = Rng::new(1);
        let mut l = BinaryConv2d::<f64>::new(
            "b",
            ConvSpec::new(1, 2, 1).padding(0),
            BinaryInit::Kaiming,
            &mut rng,
        );
        l.weight.value = from_vec(&[2, 1, 1, 1], vec![0.0, -0.5]);
        let sa = l.sign_alpha();
        assert_eq!(sa.positive, vec![true, false]);
        assert_eq!(sa.alpha, vec![0.0, 0.5]);
        assert_eq!(sa.weights(), vec![0.0, -0.5]);
        let mut l2 =
            BinaryConv2d::<f64>::new("b", ConvSpec::new(3, 4, 3), BinaryInit::Kaiming, &mut rng);
        spread_weights(&mut l2.weight.value, &mut rng);
        let sa = l2.sign_alpha();
        assert_eq!(sa.shape, vec![4, 3, 3, 3]);
        assert_eq!(sa.alpha.len(), 4);
        assert_eq!(
            sa.weights(),
            l2.binary_weights().into_raw_vec_and_offset().0
        );
        let bl = BinaryLinear::<f64>::new("bl", 5, 3, BinaryInit::Kaiming, &mut rng);
        assert_eq!(
            bl.sign_alpha().weights(),
            bl.binary_weights().into_raw_vec_and_offset().0
        );
    }

    #[test]
    fn authors_init_is_uniform_in_zero_to_one_thousandth() {
        let l = BinaryConv2d::<f32>::new(
            "b",
            ConvSpec::new(8, 16, 3),
            BinaryInit::AuthorsUniform,
            &mut Rng::new(2),
        );
        assert!(l.weight.value.iter().all(|&v| (0.0..1e-3).contains(&v)));
        let mean = l.weight.value.iter().sum::<f32>() / l.weight.value.len() as f32;
        assert!((mean - 5e-4).abs() < 5e-5, "{mean}");
        assert!(l.sign_alpha().positive.iter().all(|&p| p));
    }

    #[test]
    fn bad_shapes_name_the_layer() {
        let mut rng = Rng::new(3);
        let mut l = BinaryConv2d::<f32>::new(
            "bconv2",
            ConvSpec::new(4, 8, 3),
            BinaryInit::Kaiming,
            &mut rng,
        );
        for shape in [vec![2, 3, 8, 8], vec![2, 4, 8, 2], vec![4, 8, 8]] {
            let e = l
                .forward(
                    &zeros(&shape),
                    &StepCtx::eval(0, 1),
                    &mut State::Empty,
                    None,
                )
                .unwrap_err();
            assert!(matches!(e, Error::Shape { .. }), "{e}");
            assert!(
                e.to_string().contains("bconv2") && e.to_string().contains(&format!("{shape:?}"))
            );
        }
        let mut bl = BinaryLinear::<f32>::new("bfc", 6, 2, BinaryInit::Kaiming, &mut rng);
        let e = bl
            .forward(
                &zeros(&[3, 5]),
                &StepCtx::eval(0, 1),
                &mut State::Empty,
                None,
            )
            .unwrap_err();
        assert!(
            matches!(e, Error::Shape { .. }) && e.to_string().contains("bfc"),
            "{e}"
        );
    }

    #[test]
    fn f32_and_f64_forward_agree() {
        let spec = ConvSpec::new(16, 8, 3).padding(1);
        let mut rng = Rng::new(4);
        let mut l64 = BinaryConv2d::<f64>::new("b", spec, BinaryInit::Kaiming, &mut rng);
        let mut l32 = BinaryConv2d::<f32>::new("b", spec, BinaryInit::Kaiming, &mut rng);
        l32.weight.value = l64.weight.value.mapv(|v| v as f32);
        l64.weight.value = l32.weight.value.mapv(|v| v as f64);
        let x32 = rand_tensor(&mut rng, &[2, 16, 7, 7]).mapv(|v| v as f32);
        let x64 = x32.mapv(|v| v as f64);
        let y64 = l64
            .forward(&x64, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap();
        let y32 = l32
            .forward(&x32, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap();
        crate::gradcheck::assert_f32_matches_f64(&y64, &y32, 1e-5);
        let mut b64 = BinaryLinear::<f64>::new("bl", 33, 5, BinaryInit::Kaiming, &mut rng);
        let mut b32 = BinaryLinear::<f32>::new("bl", 33, 5, BinaryInit::Kaiming, &mut rng);
        b32.weight.value = b64.weight.value.mapv(|v| v as f32);
        b64.weight.value = b32.weight.value.mapv(|v| v as f64);
        let x32 = rand_tensor(&mut rng, &[3, 33]).mapv(|v| v as f32);
        let y64 = b64
            .forward(
                &x32.mapv(|v| v as f64),
                &StepCtx::eval(0, 1),
                &mut State::Empty,
                None,
            )
            .unwrap();
        let y32 = b32
            .forward(&x32, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap();
        crate::gradcheck::assert_f32_matches_f64(&y64, &y32, 1e-5);
    }

    #[test]
    fn gradients_accumulate_across_steps() {
        // backward adds: two identical steps give twice the gradient of one
        let mut rng = Rng::new(8);
        let mut l = BinaryConv2d::<f64>::new(
            "b",
            ConvSpec::new(2, 3, 3).padding(1),
            BinaryInit::Kaiming,
            &mut rng,
        );
        let x = rand_tensor(&mut rng, &[2, 2, 5, 5]);
        let ctx = StepCtx::train(0, 2, GradMode::Online);
        let mut cache = Cache::new();
        let y = l
            .forward(&x, &ctx, &mut State::Empty, Some(&mut cache))
            .unwrap();
        let r = rand_tensor(&mut rng, y.shape());
        l.backward(&r, &ctx, &cache, &mut State::Empty).unwrap();
        let once = l.weight.grad.clone();
        assert!(once.iter().any(|&g| g != 0.0));
        l.backward(&r, &ctx, &cache, &mut State::Empty).unwrap();
        for (a, b) in l.weight.grad.iter().zip(once.iter()) {
            assert!((a - 2.0 * b).abs() < 1e-12 * (1.0 + b.abs()));
        }
    }

    /// An f32 binary conv 5 → 12 (`(stride, padding, k)`) with latent weights `N(0, scale²)`,
    /// spike-like inputs `3 x 5 x 9 x 10` (70 % zeros, the rest uniform in [0, 1)), and the same
    /// inputs made dense (+0.5).
    fn f32_layer_and_inputs(
        rng: &mut Rng,
        (stride, padding, k): (usize, usize, usize),
        scale: f32,
    ) -> (BinaryConv2d<f32>, Tensor<f32>, Tensor<f32>) {
        let spec = ConvSpec::new(5, 12, k).stride(stride).padding(padding);
        let mut l = BinaryConv2d::<f32>::new("b", spec, BinaryInit::Kaiming, rng);
        l.weight.value.mapv_inplace(|_| rng.normal() as f32 * scale);
        let spikes: Tensor<f32> = from_vec(
            &[3, 5, 9, 10],
            (0..3 * 5 * 90)
                .map(|_| {
                    if rng.uniform() < 0.7 {
                        0.0
                    } else {
                        rng.uniform() as f32
                    }
                })
                .collect(),
        );
        let dense = spikes.mapv(|v| v + 0.5);
        (l, spikes, dense)
    }

    /// One training step of `l` from zeroed weight gradients, with `dL/dy[i] = dy(i)`: the weight
    /// gradient and `dL/dx`.
    fn f32_step_grads(
        l: &mut BinaryConv2d<f32>,
        x: &Tensor<f32>,
        dy: impl Fn(usize) -> f32,
    ) -> (Tensor<f32>, Tensor<f32>) {
        let ctx = StepCtx::train(0, 1, GradMode::Online);
        l.weight.grad.fill(0.0);
        let mut cache = Cache::new();
        let y = l
            .forward(x, &ctx, &mut State::Empty, Some(&mut cache))
            .unwrap();
        let dy: Tensor<f32> = from_vec(y.shape(), (0..y.len()).map(dy).collect());
        let dx = l.backward(&dy, &ctx, &cache, &mut State::Empty).unwrap();
        (l.weight.grad.clone(), dx)
    }

    /// The f32 backward with the sparse-input dW kernel gives the GEMM path's weight gradient to
    /// rounding and the same input gradient, on spike-like inputs (70 % zeros) at every padding of
    /// a stride-1 conv (1x1 and 3x3, 12 outputs: a 8-lane tail); strides of 2 and dense inputs take
    /// the GEMM path (bit-identical gradients), as do ISA levels without hardware FMA.
    #[test]
    fn f32_sparse_weight_gradient_equals_the_gemm_one() {
        let mut rng = Rng::new(5);
        for (stride, padding, k) in [(1, 1, 3), (1, 0, 3), (1, 2, 3), (1, 0, 1), (2, 1, 3)] {
            let (mut l, spikes, dense) = f32_layer_and_inputs(&mut rng, (stride, padding, k), 0.5);
            for (x, dense_input) in [(&spikes, false), (&dense, true)] {
                let mut grads = Vec::new();
                for sparse in [true, false] {
                    l.set_sparse(sparse);
                    grads.push(f32_step_grads(&mut l, x, |i| (i as f32 * 0.37).sin()));
                }
                l.set_sparse(true);
                let ((gs, dxs), (gd, dxd)) = (&grads[0], &grads[1]);
                assert!(gd.iter().any(|&g| g != 0.0));
                if dense_input || stride != 1 || !empf_simd::Simd::global().sparse_dw_is_native() {
                    assert_eq!(gs, gd, "the GEMM path either way");
                    continue;
                }
                let scale = gd.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (a, b) in gs.iter().zip(gd.iter()) {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale,
                        "{a} vs {b}, padding {padding}, k {k}"
                    );
                }
                assert_ne!(gs, gd, "the sparse kernel ran (its sums round differently)");
                assert_eq!(dxs, dxd, "dL/dx through the GEMM either way");
            }
        }
    }

    /// Told that its input's producer ignores the gradient at zero inputs, the f32 backward gives
    /// `dL/dx` through the sparse kernel: equal to the GEMM path's to rounding at the non-zero
    /// inputs, exactly zero at the zero inputs, with the same weight gradient as without the
    /// facts; dense inputs, strides of 2 and unknown facts keep the GEMM's `dL/dx`.
    #[test]
    fn f32_sparse_input_gradient_equals_the_gemm_one_at_non_zero_inputs() {
        if !empf_simd::Simd::global().sparse_dw_is_native() {
            eprintln!("SKIPPED: no hardware FMA, the GEMM path is taken");
            return;
        }
        let mut rng = Rng::new(6);
        for (stride, padding, k) in [(1, 1, 3), (1, 0, 3), (1, 2, 3), (1, 0, 1), (2, 1, 3)] {
            let (mut l, spikes, dense) = f32_layer_and_inputs(&mut rng, (stride, padding, k), 0.5);
            for x in [&spikes, &dense] {
                // (sparse, facts): the GEMM path, the sparse dW alone, both sparse
                let mut runs = Vec::new();
                for (sparse, facts) in [(false, false), (true, false), (true, true)] {
                    l.set_sparse(sparse);
                    l.set_input_facts(if facts {
                        Facts::EMPF_SPIKES
                    } else {
                        Facts::default()
                    });
                    runs.push(f32_step_grads(&mut l, x, |i| (i as f32 * 0.61).cos()));
                }
                l.set_sparse(true);
                l.set_input_facts(Facts::default());
                let ((g0, dx0), (g1, dx1), (g2, dx2)) = (&runs[0], &runs[1], &runs[2]);
                assert_eq!(g1, g2, "the same dW kernel with or without dx");
                let sparse_path = stride == 1 && std::ptr::eq(x, &spikes);
                if !sparse_path {
                    assert_eq!(dx0, dx2, "the GEMM's dL/dx");
                    assert_eq!(g0, g2);
                    continue;
                }
                assert_eq!(dx0, dx1, "without the facts, the GEMM's dL/dx");
                let scale = dx0.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let mut differ = false;
                for ((&a, &b), &xv) in dx2.iter().zip(dx0.iter()).zip(x.iter()) {
                    if xv == 0.0 {
                        assert_eq!(a, 0.0, "dL/dx at a zero input");
                    } else {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{a} vs {b}, padding {padding}"
                        );
                        differ |= a != b;
                    }
                }
                assert!(differ, "the sparse kernel ran (its sums round differently)");
            }
        }
    }

    /// The f32 forward through the sparse-input kernel equals the GEMM forward to rounding, on
    /// spike-like inputs (70 % zeros) and every stride/padding; a dense input takes the GEMM path.
    #[test]
    fn f32_sparse_forward_equals_the_gemm_forward() {
        let mut rng = Rng::new(3);
        for (stride, padding, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 3), (2, 0, 1)] {
            let (mut l, spikes, dense) = f32_layer_and_inputs(&mut rng, (stride, padding, k), 1.0);
            for (x, sparse_path) in [(&spikes, true), (&dense, false)] {
                let ctx = StepCtx::eval(0, 1);
                let y = l.forward(x, &ctx, &mut State::Empty, None).unwrap();
                assert_eq!(l.sparse_forward(x).is_some(), sparse_path);
                l.set_sparse(false);
                let want = l.forward(x, &ctx, &mut State::Empty, None).unwrap();
                l.set_sparse(true);
                assert_eq!(y.shape(), want.shape());
                if !sparse_path {
                    assert_eq!(y, want, "dense input: the GEMM path");
                    continue;
                }
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (a, b) in y.iter().zip(want.iter()) {
                    assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}, stride {stride}");
                }
            }
        }
    }
}
