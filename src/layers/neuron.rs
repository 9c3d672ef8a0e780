//! Spiking neurons (EMPF.md §1, §3, §5, §6): the EM-PF neuron in its three versions, its folded
//! inference form, and the LIF baseline.
//!
//! All neurons take `N x F` or `N x C x H x W` inputs (the input current `I[t]`), return the spike
//! tensor of the same shape, and carry the residual potential `v[t]` in their [`State`]
//! (`State::Empty` = `v[0] = 0`). Per-step parameters are one scalar per layer per time-step, so
//! the constructors take `T` and `StepCtx::t` indexes them.
//!
//! Gradient modes (see `layers` module docs): in [`GradMode::Online`] the charging uses
//! `sg(v[t−1])`, so the backward covers the step alone (it still yields `dL/dλ[t] = Σ dL/dm·v[t−1]`,
//! `v[t−1]` being a constant input of the step); in [`GradMode::Bptt`] `dstate` brings `dL/dv[t]` in
//! and takes `dL/dv[t−1] = λ[t]·dL/dm[t]` out.

use crate::error::{Error, Result};
use crate::layers::batchnorm::{BatchNorm, BnCache, BnGeom};
use crate::layers::{Cache, CacheBytes, GradMode, Layer, Param, ParamKind, State, StepCtx};
use crate::tensor::{Real, Tensor, as_slice, from_vec};

/// `1 / (1 + e^{−x})`.
#[inline]
pub fn sigmoid<R: Real>(x: R) -> R {
    R::one() / (R::one() + (-x).exp())
}

/// A packed bit per element (`H(m − θ)`, "fired"): what most neuron backwards need.
#[derive(Clone, Debug, Default)]
pub struct BitMask {
    words: Vec<u64>,
    len: usize,
}

impl BitMask {
    /// Clear to `len` zero bits (reusing the allocation).
    pub fn reset(&mut self, len: usize) {
        self.words.clear();
        self.words.resize(len.div_ceil(64), 0);
        self.len = len;
    }
    /// Set bit `i`.
    #[inline]
    pub fn set(&mut self, i: usize) {
        self.words[i >> 6] |= 1u64 << (i & 63);
    }
    /// Bit `i`.
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        (self.words[i >> 6] >> (i & 63)) & 1 == 1
    }
    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether there are no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CacheBytes for BitMask {
    fn cache_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

fn check_neuron_shape(layer: &str, shape: &[usize]) -> Result<()> {
    if matches!(shape.len(), 2 | 4) && shape.iter().all(|&d| d > 0) {
        Ok(())
    } else {
        Err(Error::shape(
            layer,
            "expected N x F or N x C x H x W",
            shape,
        ))
    }
}

fn step_index(layer: &str, ctx: &StepCtx, steps: usize) -> Result<usize> {
    if ctx.t < steps {
        Ok(ctx.t)
    } else {
        Err(Error::Config(format!(
            "layer `{layer}`: time-step {} out of range (built for T = {steps})",
            ctx.t
        )))
    }
}

/// Take `v[t−1]` out of the state (None = zero), checking it is shaped like the input.
fn take_prev<R: Real>(
    layer: &str,
    state: &mut State<R>,
    shape: &[usize],
) -> Result<Option<Tensor<R>>> {
    match std::mem::take(state) {
        State::Empty => Ok(None),
        State::Tensor(v) if v.shape() == shape => Ok(Some(crate::tensor::standard(v))),
        State::Tensor(v) => Err(Error::shape(
            layer,
            format!("residual potential shaped like the input {shape:?}"),
            v.shape(),
        )),
        State::Children(_) => Err(Error::shape(
            layer,
            "a single residual-potential tensor, got a composite state",
            shape,
        )),
    }
}

/// `dL/dv[t]` from `dstate` in BPTT mode (None = zero), shape-checked.
fn take_dv<R: Real>(
    layer: &str,
    ctx: &StepCtx,
    dstate: &mut State<R>,
    shape: &[usize],
) -> Result<Option<Tensor<R>>> {
    if ctx.grad == GradMode::Bptt {
        take_prev(layer, dstate, shape)
    } else {
        *dstate = State::Empty;
        Ok(None)
    }
}

fn param_t<R: Real>(p: &Param<R>, t: usize) -> R {
    p.value.as_slice().expect("standard")[t]
}

fn add_grad<R: Real>(p: &mut Param<R>, t: usize, g: f64) {
    p.grad.as_slice_mut().expect("standard")[t] += R::of(g);
}

fn step_param<R: Real>(name: &str, suffix: &str, steps: usize) -> Param<R> {
    Param::new(
        format!("{name}.{suffix}"),
        ParamKind::Neuron,
        from_vec(&[steps], vec![R::zero(); steps]),
    )
}

fn check_dy<R: Real>(layer: &str, dy: &Tensor<R>, shape: &[usize]) -> Result<()> {
    if dy.shape() == shape {
        Ok(())
    } else {
        Err(Error::shape(
            layer,
            format!("output gradient shaped like the forward input {shape:?}"),
            dy.shape(),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Version I
// ---------------------------------------------------------------------------------------------

/// EM-PF Version I (EMPF.md §3, Eq. 5): learnable leak and threshold, float spikes.
///
/// ```text
/// λ[t] = sigmoid(a[t]),  θ[t] = sigmoid(b[t])          (a = b = 0 at init)
/// m[t] = λ[t]·sg(v[t−1]) + I[t]
/// s[t] = ReLU(m[t] − θ[t])                               (output)
/// v[t] = m[t] − s[t] = min(m[t], θ[t])                   (state)
/// ```
/// Backward, with `H = H(m − θ)` (strict: `m > θ`), `dy = dL/ds[t]`, `dv = dL/dv[t]` (BPTT only,
/// from `dstate`; 0 online):
/// * `ds/dm = H`, `dv/dm = 1 − H`  ⇒  `dm = dy·H + dv·(1 − H)`; `dL/dI = dm`.
/// * `ds/dθ = −H`, `dv/dθ = H`  ⇒  `dL/dθ[t] = Σ (dv − dy)·H` (the `dv` part is the θ exception of
///   Theorem 4.2: it only exists in BPTT).
/// * `dm/dλ = v[t−1]`  ⇒  `dL/dλ[t] = Σ dm·v[t−1]` (both modes; `v[t−1]` is kept in the cache).
/// * `dm/dv[t−1] = λ`  ⇒  BPTT returns `dL/dv[t−1] = λ·dm` in `dstate`.
/// * chain through the sigmoids: `dL/da = dL/dλ·λ(1 − λ)`, `dL/db = dL/dθ·θ(1 − θ)`.
pub struct EmpfV1<R: Real> {
    name: String,
    /// Time-steps `T` the per-step parameters cover.
    pub steps: usize,
    /// `a[t]`, λ = sigmoid(a), shape `[T]`.
    pub a: Param<R>,
    /// `b[t]`, θ = sigmoid(b), shape `[T]`.
    pub b: Param<R>,
}

/// V1 backward needs which neurons fired and `v[t−1]` (absent at `t = 0`).
#[derive(Default)]
pub struct EmpfV1Cache<R: Real> {
    fired: BitMask,
    v_prev: Option<Tensor<R>>,
    shape: Vec<usize>,
}
crate::impl_cache!(EmpfV1Cache<R> { fired, v_prev });

impl<R: Real> EmpfV1<R> {
    /// `a = b = 0` (λ = θ = 0.5) for `steps` time-steps.
    pub fn new(name: &str, steps: usize) -> Self {
        EmpfV1 {
            name: name.to_string(),
            steps,
            a: step_param(name, "a", steps),
            b: step_param(name, "b", steps),
        }
    }
    /// λ[t].
    pub fn leak(&self, t: usize) -> R {
        sigmoid(param_t(&self.a, t))
    }
    /// θ[t].
    pub fn threshold(&self, t: usize) -> R {
        sigmoid(param_t(&self.b, t))
    }
}

impl<R: Real> Layer<R> for EmpfV1<R> {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfV1"
    }
    fn describe(&self) -> String {
        format!("EmpfV1(T = {})", self.steps)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_neuron_shape(&self.name, input)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let (lam, th) = (self.leak(t), self.threshold(t));
        let prev = take_prev(&self.name, state, x.shape())?;
        let xs = as_slice(x);
        let mut s = vec![R::zero(); xs.len()];
        let mut v = vec![R::zero(); xs.len()];
        let mut c = cache.map(|c| c.get_or_default::<EmpfV1Cache<R>>());
        if let Some(c) = c.as_mut() {
            c.fired.reset(xs.len());
        }
        let pv = prev.as_ref().map(|p| p.as_slice().expect("standard"));
        for i in 0..xs.len() {
            let m = match pv {
                Some(p) => lam * p[i] + xs[i],
                None => xs[i],
            };
            if m > th {
                s[i] = m - th;
                v[i] = th;
                if let Some(c) = c.as_mut() {
                    c.fired.set(i);
                }
            } else {
                v[i] = m;
            }
        }
        if let Some(c) = c {
            c.v_prev = prev;
            c.shape = x.shape().to_vec();
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<EmpfV1Cache<R>>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let (lam, th) = (self.leak(t), self.threshold(t));
        let dv = take_dv(&self.name, ctx, dstate, &c.shape)?;
        let dvs = dv.as_ref().map(|d| d.as_slice().expect("standard"));
        let pv = c.v_prev.as_ref().map(|p| p.as_slice().expect("standard"));
        let dys = as_slice(dy);
        let mut dm = vec![R::zero(); dys.len()];
        let (mut dlam, mut dth) = (0.0f64, 0.0f64);
        for i in 0..dys.len() {
            let dvi = dvs.map_or(R::zero(), |d| d[i]);
            if c.fired.get(i) {
                dm[i] = dys[i];
                dth += (dvi - dys[i]).f64();
            } else {
                dm[i] = dvi;
            }
            if let Some(p) = pv {
                dlam += (dm[i] * p[i]).f64();
            }
        }
        add_grad(&mut self.a, t, dlam * (lam * (R::one() - lam)).f64());
        add_grad(&mut self.b, t, dth * (th * (R::one() - th)).f64());
        *dstate = if ctx.grad == GradMode::Bptt && pv.is_some() {
            State::Tensor(from_vec(&c.shape, dm.iter().map(|&d| lam * d).collect()))
        } else {
            State::Empty
        };
        Ok(from_vec(&c.shape, dm))
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.a);
        f(&mut self.b);
    }
}

// ---------------------------------------------------------------------------------------------
// Version II (membrane-potential BatchNorm) and its fold
// ---------------------------------------------------------------------------------------------

/// EM-PF Version II (EMPF.md §5, Eqs. 6-8): membrane-potential BatchNorm, one BN per time-step.
///
/// ```text
/// m[t]  = λ[t]·sg(v[t−1]) + I[t]
/// m̂[t] = α1[t]·BN_t(m[t]) + α2[t]·m[t],     α1 = sigmoid(c[t]), α2 = sigmoid(d[t])
/// s[t]  = ReLU(m̂[t] − θ[t]),                 v[t] = m̂[t] − s[t] = min(m̂[t], θ[t])
/// ```
/// Backward, `H = H(m̂ − θ)`, `dy = dL/ds`, `dv = dL/dv[t]` (BPTT only):
/// * `dm̂ = dy·H + dv·(1 − H)`; `dL/dθ = Σ (dv − dy)·H`;
/// * `dL/dα1 = Σ dm̂·BN_t(m)`, `dL/dα2 = Σ dm̂·m`;
/// * `dm = BN_t.backward(α1·dm̂) + α2·dm̂` (train: full batch-statistics derivative; eval: `γ s`),
///   which also adds `dγ`, `dβ` of `BN_t`; `dL/dI = dm`;
/// * `dL/dλ = Σ dm·v[t−1]`; BPTT: `dL/dv[t−1] = λ·dm`;
/// * chain through the sigmoids of a, b, c, d.
///
/// Parameters `{name}.a`, `.b`, `.c`, `.d` (shape `[T]`) and BN `{name}.bn{t}.weight|bias|
/// running_mean|running_var`.
pub struct EmpfV2<R: Real> {
    name: String,
    /// Channels (features) of the input.
    pub channels: usize,
    /// Time-steps `T`.
    pub steps: usize,
    /// λ = sigmoid(a).
    pub a: Param<R>,
    /// θ = sigmoid(b).
    pub b: Param<R>,
    /// α1 = sigmoid(c).
    pub c: Param<R>,
    /// α2 = sigmoid(d).
    pub d: Param<R>,
    /// One BatchNorm per time-step.
    pub bns: Vec<BatchNorm<R>>,
}

/// V2 backward needs the firing mask, `v[t−1]`, `m` (for α2) and the BN cache (x̂, s).
#[derive(Default)]
pub struct EmpfV2Cache<R: Real> {
    fired: BitMask,
    v_prev: Option<Tensor<R>>,
    m: Vec<R>,
    bn: BnCache<R>,
    shape: Vec<usize>,
}
crate::impl_cache!(EmpfV2Cache<R> { fired, v_prev, m, bn });

impl<R: Real> EmpfV2<R> {
    /// a = b = c = d = 0, fresh BatchNorms, for `channels` channels and `steps` time-steps.
    pub fn new(name: &str, channels: usize, steps: usize) -> Self {
        EmpfV2 {
            name: name.to_string(),
            channels,
            steps,
            a: step_param(name, "a", steps),
            b: step_param(name, "b", steps),
            c: step_param(name, "c", steps),
            d: step_param(name, "d", steps),
            bns: (0..steps)
                .map(|t| BatchNorm::new(&format!("{name}.bn{t}"), channels))
                .collect(),
        }
    }

    /// The exact inference fold of the eval-mode step `t` (per channel):
    /// `k = α1·γ/sqrt(σ² + eps) + α2`, `b = α1·(β − γ·μ/sqrt(σ² + eps))`, so `m̂ = k ⊙ m + b`.
    /// Returns `(k[t][ch], b[t][ch])`.
    pub fn fold(&self) -> (Vec<Vec<R>>, Vec<Vec<R>>) {
        let mut ks = Vec::with_capacity(self.steps);
        let mut bs = Vec::with_capacity(self.steps);
        for t in 0..self.steps {
            let a1 = sigmoid(param_t(&self.c, t));
            let a2 = sigmoid(param_t(&self.d, t));
            let (scale, shift) = self.bns[t].fold_affine();
            ks.push(scale.iter().map(|&k| a1 * k + a2).collect());
            bs.push(shift.iter().map(|&b| a1 * b).collect());
        }
        (ks, bs)
    }

    /// The folded inference neuron: `λ̂[t][ch] = k·λ[t]`, `Î = k ⊙ I + b`, `θ̂ = θ`.
    pub fn to_folded(&self) -> EmpfFolded<R> {
        let (k, b) = self.fold();
        let leak = (0..self.steps)
            .map(|t| {
                let lam = sigmoid(param_t(&self.a, t));
                k[t].iter().map(|&k| k * lam).collect()
            })
            .collect();
        EmpfFolded {
            name: self.name.clone(),
            channels: self.channels,
            leak,
            scale: k,
            shift: b,
            threshold: (0..self.steps)
                .map(|t| sigmoid(param_t(&self.b, t)))
                .collect(),
        }
    }
}

impl<R: Real> Layer<R> for EmpfV2<R> {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfV2"
    }
    fn describe(&self) -> String {
        format!("EmpfV2({} channels, T = {})", self.channels, self.steps)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        BnGeom::of(&self.name, input, self.channels)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let g = BnGeom::of(&self.name, x.shape(), self.channels)?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let lam = sigmoid(param_t(&self.a, t));
        let th = sigmoid(param_t(&self.b, t));
        let a1 = sigmoid(param_t(&self.c, t));
        let a2 = sigmoid(param_t(&self.d, t));
        let prev = take_prev(&self.name, state, x.shape())?;
        let xs = as_slice(x);
        let m: Vec<R> = match prev.as_ref() {
            Some(p) => p
                .as_slice()
                .expect("standard")
                .iter()
                .zip(xs.iter())
                .map(|(&v, &i)| lam * v + i)
                .collect(),
            None => xs.to_vec(),
        };
        let mut c = cache.map(|c| c.get_or_default::<EmpfV2Cache<R>>());
        let bn = self.bns[t].forward_slice(&m, g, ctx.train, c.as_mut().map(|c| &mut c.bn))?;
        let mut s = vec![R::zero(); m.len()];
        let mut v = vec![R::zero(); m.len()];
        if let Some(c) = c.as_mut() {
            c.fired.reset(m.len());
        }
        for i in 0..m.len() {
            let mh = a1 * bn[i] + a2 * m[i];
            if mh > th {
                s[i] = mh - th;
                v[i] = th;
                if let Some(c) = c.as_mut() {
                    c.fired.set(i);
                }
            } else {
                v[i] = mh;
            }
        }
        if let Some(c) = c {
            c.v_prev = prev;
            c.m = m;
            c.shape = x.shape().to_vec();
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<EmpfV2Cache<R>>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let g = BnGeom::of(&self.name, &c.shape, self.channels)?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let lam = sigmoid(param_t(&self.a, t));
        let th = sigmoid(param_t(&self.b, t));
        let a1 = sigmoid(param_t(&self.c, t));
        let a2 = sigmoid(param_t(&self.d, t));
        let dv = take_dv(&self.name, ctx, dstate, &c.shape)?;
        let dvs = dv.as_ref().map(|d| d.as_slice().expect("standard"));
        let dys = as_slice(dy);
        let xhat = c.bn.xhat();
        let gamma = self.bns[t].weight.value.as_slice().expect("standard");
        let beta = self.bns[t].bias.value.as_slice().expect("standard");
        let mut dmh = vec![R::zero(); dys.len()];
        let (mut dth, mut da1, mut da2) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..dys.len() {
            let dvi = dvs.map_or(R::zero(), |d| d[i]);
            if c.fired.get(i) {
                dmh[i] = dys[i];
                dth += (dvi - dys[i]).f64();
            } else {
                dmh[i] = dvi;
            }
            let ch = (i / g.hw) % g.c;
            let bn = gamma[ch] * xhat[i] + beta[ch];
            da1 += (dmh[i] * bn).f64();
            da2 += (dmh[i] * c.m[i]).f64();
        }
        let dbn: Vec<R> = dmh.iter().map(|&d| a1 * d).collect();
        let mut dm = self.bns[t].backward_slice(&dbn, g, &c.bn)?;
        let mut dlam = 0.0f64;
        let pv = c.v_prev.as_ref().map(|p| p.as_slice().expect("standard"));
        for i in 0..dm.len() {
            dm[i] += a2 * dmh[i];
            if let Some(p) = pv {
                dlam += (dm[i] * p[i]).f64();
            }
        }
        let sd = |x: R| (x * (R::one() - x)).f64();
        add_grad(&mut self.a, t, dlam * sd(lam));
        add_grad(&mut self.b, t, dth * sd(th));
        add_grad(&mut self.c, t, da1 * sd(a1));
        add_grad(&mut self.d, t, da2 * sd(a2));
        *dstate = if ctx.grad == GradMode::Bptt && pv.is_some() {
            State::Tensor(from_vec(&c.shape, dm.iter().map(|&d| lam * d).collect()))
        } else {
            State::Empty
        };
        Ok(from_vec(&c.shape, dm))
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.a);
        f(&mut self.b);
        f(&mut self.c);
        f(&mut self.d);
        for bn in &mut self.bns {
            bn.visit_params(f);
        }
    }
}

/// The folded Version II neuron for inference (EMPF.md §5): a Version I neuron with a per-channel
/// leak and an input affine,
/// ```text
/// m[t] = λ̂[t][ch]·v[t−1] + k[t][ch]·I[t] + b[t][ch],   s = ReLU(m − θ[t]),   v = min(m, θ[t])
/// ```
/// equal to the eval-mode [`EmpfV2`] it was folded from. The input affine `(k, b)` is kept apart so
/// that a deployment can fold it into the preceding BatchNorm. Inference only: `backward` errors.
pub struct EmpfFolded<R: Real> {
    name: String,
    /// Channels.
    pub channels: usize,
    /// `λ̂[t][ch] = k[t][ch]·λ[t]`.
    pub leak: Vec<Vec<R>>,
    /// Input scale `k[t][ch]`.
    pub scale: Vec<Vec<R>>,
    /// Input shift `b[t][ch]`.
    pub shift: Vec<Vec<R>>,
    /// `θ[t]`.
    pub threshold: Vec<R>,
}

impl<R: Real> Layer<R> for EmpfFolded<R> {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfFolded"
    }
    fn describe(&self) -> String {
        format!(
            "EmpfFolded({} channels, T = {})",
            self.channels,
            self.threshold.len()
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        BnGeom::of(&self.name, input, self.channels)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        _cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let g = BnGeom::of(&self.name, x.shape(), self.channels)?;
        let t = step_index(&self.name, ctx, self.threshold.len())?;
        let th = self.threshold[t];
        let (leak, k, b) = (&self.leak[t], &self.scale[t], &self.shift[t]);
        let prev = take_prev(&self.name, state, x.shape())?;
        let pv = prev.as_ref().map(|p| p.as_slice().expect("standard"));
        let xs = as_slice(x);
        let mut s = vec![R::zero(); xs.len()];
        let mut v = vec![R::zero(); xs.len()];
        for i in 0..xs.len() {
            let ch = (i / g.hw) % g.c;
            let mut m = k[ch] * xs[i] + b[ch];
            if let Some(p) = pv {
                m += leak[ch] * p[i];
            }
            if m > th {
                s[i] = m - th;
                v[i] = th;
            } else {
                v[i] = m;
            }
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        _dy: &Tensor<R>,
        _ctx: &StepCtx,
        _cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        Err(Error::Config(format!(
            "layer `{}`: the folded EM-PF neuron is inference-only (train the EmpfV2 it came from)",
            self.name
        )))
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

// ---------------------------------------------------------------------------------------------
// Version III (parallel)
// ---------------------------------------------------------------------------------------------

/// EM-PF Version III (EMPF.md §6): the parallel neuron, `s[t] = ReLU(I[t] − θ[t])`, θ = sigmoid(b[t]).
///
/// No leak and no membrane state, so all `T` steps are independent and can run as one batched call
/// ([`EmpfV3::forward_all`] / [`EmpfV3::backward_all`]). Backward: `dL/dI = dy·H(I − θ)`,
/// `dL/dθ[t] = −Σ dy·H(I − θ)`, `dL/db = dL/dθ·θ(1 − θ)`; `dstate` stays empty in both modes.
pub struct EmpfV3<R: Real> {
    name: String,
    /// Time-steps `T`.
    pub steps: usize,
    /// θ = sigmoid(b), shape `[T]`.
    pub b: Param<R>,
}

/// V3 backward needs only the firing mask.
#[derive(Default)]
pub struct EmpfV3Cache {
    fired: BitMask,
    shape: Vec<usize>,
    /// Time-steps covered by the cache (1 for a step-wise forward, T for `forward_all`) and the
    /// first step index.
    steps: usize,
    t0: usize,
}
crate::impl_cache!(EmpfV3Cache { fired });

impl<R: Real> EmpfV3<R> {
    /// `b = 0` (θ = 0.5) for `steps` time-steps.
    pub fn new(name: &str, steps: usize) -> Self {
        EmpfV3 {
            name: name.to_string(),
            steps,
            b: step_param(name, "b", steps),
        }
    }

    /// Forward over `nsteps` consecutive equal chunks of `x`, chunk `j` using θ[t0 + j].
    fn run(&self, x: &[R], t0: usize, nsteps: usize, mut fired: Option<&mut BitMask>) -> Vec<R> {
        let per = x.len() / nsteps;
        let mut s = vec![R::zero(); x.len()];
        if let Some(f) = fired.as_mut() {
            f.reset(x.len());
        }
        for j in 0..nsteps {
            let th = sigmoid(param_t(&self.b, t0 + j));
            for i in j * per..(j + 1) * per {
                if x[i] > th {
                    s[i] = x[i] - th;
                    if let Some(f) = fired.as_mut() {
                        f.set(i);
                    }
                }
            }
        }
        s
    }

    fn run_back(&mut self, dy: &[R], c: &EmpfV3Cache) -> Vec<R> {
        let per = dy.len() / c.steps;
        let mut dx = vec![R::zero(); dy.len()];
        for j in 0..c.steps {
            let t = c.t0 + j;
            let th = sigmoid(param_t(&self.b, t));
            let mut dth = 0.0f64;
            for i in j * per..(j + 1) * per {
                if c.fired.get(i) {
                    dx[i] = dy[i];
                    dth -= dy[i].f64();
                }
            }
            add_grad(&mut self.b, t, dth * (th * (R::one() - th)).f64());
        }
        dx
    }

    /// All `T` steps in one call. Layout: `x` is `[T·N, ...]` in **step-major** order — rows
    /// `t·N..(t+1)·N` are step `t` (the step tensors concatenated along axis 0). Returns the spikes
    /// in the same layout; fills `cache` for [`EmpfV3::backward_all`].
    pub fn forward_all(&mut self, x: &Tensor<R>, cache: Option<&mut Cache>) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        if x.shape()[0] % self.steps != 0 {
            return Err(Error::shape(
                &self.name,
                format!(
                    "a batch of T·N rows (T = {}) in step-major order",
                    self.steps
                ),
                x.shape(),
            ));
        }
        let xs = as_slice(x);
        let c = cache.map(|c| c.get_or_default::<EmpfV3Cache>());
        let s = match c {
            Some(c) => {
                c.shape = x.shape().to_vec();
                c.steps = self.steps;
                c.t0 = 0;
                self.run(&xs, 0, self.steps, Some(&mut c.fired))
            }
            None => self.run(&xs, 0, self.steps, None),
        };
        Ok(from_vec(x.shape(), s))
    }

    /// Backward of [`EmpfV3::forward_all`]: `dy` in the same `[T·N, ...]` layout; returns `dL/dI`
    /// and adds into `b`'s gradient (bit-identical to running the steps one by one).
    pub fn backward_all(&mut self, dy: &Tensor<R>, cache: &Cache) -> Result<Tensor<R>> {
        let c = cache.get::<EmpfV3Cache>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let dys = as_slice(dy);
        let dx = self.run_back(&dys, c);
        Ok(from_vec(&c.shape, dx))
    }
}

impl<R: Real> Layer<R> for EmpfV3<R> {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfV3"
    }
    fn describe(&self) -> String {
        format!("EmpfV3(T = {}, parallel)", self.steps)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_neuron_shape(&self.name, input)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let xs = as_slice(x);
        let c = cache.map(|c| c.get_or_default::<EmpfV3Cache>());
        let s = match c {
            Some(c) => {
                c.shape = x.shape().to_vec();
                c.steps = 1;
                c.t0 = t;
                self.run(&xs, t, 1, Some(&mut c.fired))
            }
            None => self.run(&xs, t, 1, None),
        };
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        *dstate = State::Empty;
        self.backward_all(dy, cache)
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.b);
    }
}

// ---------------------------------------------------------------------------------------------
// LIF baseline
// ---------------------------------------------------------------------------------------------

/// The spike function of [`Lif`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpikeFn {
    /// `s = H(m − θ) ∈ {0, 1}` (the real LIF); backward uses the triangle surrogate.
    Heaviside,
    /// `s = S(m − θ)`, the antiderivative of the triangle surrogate (`S(−∞) = 0`, `S(+∞) = 1`):
    /// for tests only, so that the surrogate backward is the exact derivative and can be checked
    /// against finite differences through the very same backward code.
    SmoothTriangle,
}

/// The reset of [`Lif`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// `v = m − θ·s` (EMPF.md §1 Decision).
    Soft,
    /// `v = m·(1 − s)`.
    Hard,
}

/// The LIF baseline (EMPF.md §1): fixed leak λ and threshold θ, binary spikes, triangle surrogate.
///
/// ```text
/// m = λ·v[t−1] + I,  s = H(m − θ),  v = m − θ·s (soft) or m·(1 − s) (hard)
/// surrogate ds/dm = g(m) = (1/γ²)·max(γ − |m − θ|, 0)
/// ```
/// Backward, `dy = dL/ds`, `dv = dL/dv[t]` (BPTT only):
/// * `dv/dm = 1 − θ·g` (soft) or `(1 − s) − m·g` (hard);
/// * `dm = dy·g + dv·dv/dm`; `dL/dI = dm`; BPTT: `dL/dv[t−1] = λ·dm`.
///
/// With [`SpikeFn::SmoothTriangle`] `s = S(m − θ)` with `S' = g`, so the same formulas are the
/// exact derivative.
pub struct Lif<R: Real> {
    name: String,
    /// λ (default 0.5).
    pub leak: R,
    /// θ (default 1.0).
    pub threshold: R,
    /// Surrogate width γ (default 1).
    pub gamma: R,
    /// Spike function (default Heaviside).
    pub spike: SpikeFn,
    /// Reset (default soft).
    pub reset: Reset,
}

/// LIF backward needs `m` (for the surrogate and the hard reset) and whether `v[t−1]` existed.
#[derive(Default)]
pub struct LifCache<R: Real> {
    m: Vec<R>,
    has_prev: bool,
    shape: Vec<usize>,
}
crate::impl_cache!(LifCache<R> { m });

impl<R: Real> Lif<R> {
    /// λ = 0.5, θ = 1, γ = 1, Heaviside spikes, soft reset.
    pub fn new(name: &str) -> Self {
        Lif {
            name: name.to_string(),
            leak: R::of(0.5),
            threshold: R::one(),
            gamma: R::one(),
            spike: SpikeFn::Heaviside,
            reset: Reset::Soft,
        }
    }

    /// The spike value for membrane potential `m`.
    pub fn spike_of(&self, m: R) -> R {
        let x = m - self.threshold;
        match self.spike {
            SpikeFn::Heaviside => {
                if x >= R::zero() {
                    R::one()
                } else {
                    R::zero()
                }
            }
            SpikeFn::SmoothTriangle => {
                let g = self.gamma;
                let half = R::of(0.5);
                if x <= -g {
                    R::zero()
                } else if x <= R::zero() {
                    half * (x + g) * (x + g) / (g * g)
                } else if x < g {
                    R::one() - half * (g - x) * (g - x) / (g * g)
                } else {
                    R::one()
                }
            }
        }
    }

    /// The triangle surrogate `g(m) = (1/γ²)·max(γ − |m − θ|, 0)`.
    pub fn surrogate(&self, m: R) -> R {
        let g = self.gamma;
        (g - (m - self.threshold).abs()).max(R::zero()) / (g * g)
    }
}

impl<R: Real> Layer<R> for Lif<R> {
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Lif"
    }
    fn describe(&self) -> String {
        format!(
            "Lif(λ = {}, θ = {}, {:?} reset)",
            self.leak, self.threshold, self.reset
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_neuron_shape(&self.name, input)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        let prev = take_prev(&self.name, state, x.shape())?;
        let pv = prev.as_ref().map(|p| p.as_slice().expect("standard"));
        let xs = as_slice(x);
        let mut c = cache.map(|c| c.get_or_default::<LifCache<R>>());
        if let Some(c) = c.as_mut() {
            c.m.clear();
            c.has_prev = pv.is_some();
            c.shape = x.shape().to_vec();
        }
        let mut s = vec![R::zero(); xs.len()];
        let mut v = vec![R::zero(); xs.len()];
        for i in 0..xs.len() {
            let m = match pv {
                Some(p) => self.leak * p[i] + xs[i],
                None => xs[i],
            };
            s[i] = self.spike_of(m);
            v[i] = match self.reset {
                Reset::Soft => m - self.threshold * s[i],
                Reset::Hard => m * (R::one() - s[i]),
            };
            if let Some(c) = c.as_mut() {
                c.m.push(m);
            }
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<LifCache<R>>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let dv = take_dv(&self.name, ctx, dstate, &c.shape)?;
        let dvs = dv.as_ref().map(|d| d.as_slice().expect("standard"));
        let dys = as_slice(dy);
        let mut dm = vec![R::zero(); dys.len()];
        for i in 0..dys.len() {
            let m = c.m[i];
            let g = self.surrogate(m);
            let mut d = dys[i] * g;
            if let Some(dv) = dvs {
                let dvdm = match self.reset {
                    Reset::Soft => R::one() - self.threshold * g,
                    Reset::Hard => R::one() - self.spike_of(m) - m * g,
                };
                d += dv[i] * dvdm;
            }
            dm[i] = d;
        }
        *dstate = if ctx.grad == GradMode::Bptt && c.has_prev {
            State::Tensor(from_vec(
                &c.shape,
                dm.iter().map(|&d| self.leak * d).collect(),
            ))
        } else {
            State::Empty
        };
        Ok(from_vec(&c.shape, dm))
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}
