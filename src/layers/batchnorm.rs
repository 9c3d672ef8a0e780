//! Batch normalisation over NCHW (per channel over N, H, W) or NF (per feature over N) inputs
//! (EMPF.md §3, §5), PyTorch semantics: `eps = 1e-5`, `momentum = 0.1`, biased variance in the
//! normalisation and unbiased variance in the running update.
//!
//! Forward (per channel `c`, over the `M = N·H·W` values `x_i` of the channel):
//! ```text
//! train:  μ = (1/M) Σ x_i,  σ² = (1/M) Σ (x_i − μ)²           (batch statistics)
//!         running_mean ← (1 − mom)·running_mean + mom·μ
//!         running_var  ← (1 − mom)·running_var  + mom·σ²·M/(M − 1)
//! eval:   μ = running_mean, σ² = running_var
//! both:   s = (σ² + eps)^(−1/2),  x̂_i = (x_i − μ)·s,  y_i = γ·x̂_i + β
//! ```
//! Backward, derived term by term. `dβ = Σ dy_i`, `dγ = Σ dy_i·x̂_i` in both modes.
//! * eval: μ, s are constants, so `dx_i = γ·s·dy_i`.
//! * train: μ and σ² depend on every `x_j`. With `g_i = γ·dy_i` (= dL/dx̂_i):
//!   `dL/dσ² = Σ g_i·(x_i − μ)·(−½)s³ = −½ s² Σ g_i x̂_i`,
//!   `dL/dμ = −s Σ g_i + dL/dσ²·(−2/M)Σ(x_i − μ) = −s Σ g_i` (the second sum is 0),
//!   `dx_i = g_i·s + dL/dσ²·2(x_i − μ)/M + dL/dμ/M`
//!   `     = s·(g_i − mean(g) − x̂_i·mean(g·x̂))`.
//!
//! The pure math lives in free functions ([`batch_stats`], [`inv_std`], [`normalise`],
//! [`backward_train`], [`backward_eval`]) and in [`BatchNorm::forward_slice`] /
//! [`BatchNorm::backward_slice`], which the membrane-potential BN neuron (`EmpfV2`) reuses.

use crate::error::{Error, Result};
use crate::layers::{Cache, Layer, Param, ParamKind, State, StepCtx};
use crate::tensor::{Real, Tensor, as_slice, from_vec};
use rayon::prelude::*;

/// PyTorch's default `eps`.
pub const BN_EPS: f64 = 1e-5;
/// PyTorch's default running-statistics momentum.
pub const BN_MOMENTUM: f64 = 0.1;

/// The layout of a BN input: `n` samples of `c` channels of `hw` values each (`hw = 1` for NF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnGeom {
    /// Batch size N.
    pub n: usize,
    /// Channels (features) C.
    pub c: usize,
    /// Values per channel per sample: H·W, or 1 for NF inputs.
    pub hw: usize,
}

impl BnGeom {
    /// Geometry of an `N x C` or `N x C x H x W` input with `c` channels, or an [`Error::Shape`].
    pub fn of(layer: &str, shape: &[usize], c: usize) -> Result<Self> {
        let ok = matches!(shape.len(), 2 | 4) && shape[1] == c && shape.iter().all(|&d| d > 0);
        if !ok {
            return Err(Error::shape(
                layer,
                format!("expected N x {c} or N x {c} x H x W"),
                shape,
            ));
        }
        Ok(BnGeom {
            n: shape[0],
            c,
            hw: shape[2..].iter().product(),
        })
    }
    /// Values per channel, `M = N·H·W`.
    pub fn count(&self) -> usize {
        self.n * self.hw
    }
    /// Total number of values.
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// Whether the input is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The contiguous runs of channel `ch` (one per sample), as index ranges.
    fn runs(&self, ch: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.n).map(move |n| {
            let s = (n * self.c + ch) * self.hw;
            s..s + self.hw
        })
    }
}

/// `Σ f(a[i], b[i])` in f64 with 8 interleaved accumulators (lane `i mod 8`, lanes added in
/// order at the end): a fixed order, so deterministic, and not bound by the latency of one
/// serial f64 add chain.
#[inline(always)]
fn sum8<R: Real>(a: &[R], b: &[R], f: impl Fn(R, R) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += f(xa[k], xb[k]);
        }
    }
    for (k, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[k] += f(x, y);
    }
    acc.iter().sum()
}

/// `(Σ a[i], Σ a[i]·b[i])` in one pass, each sum exactly as [`sum8`] takes it (same lanes, same
/// order, so the same bits as two separate `sum8` passes).
#[inline(always)]
fn sum8_pair<R: Real>(a: &[R], b: &[R]) -> (f64, f64) {
    let (mut s1, mut s2) = ([0.0f64; 8], [0.0f64; 8]);
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            s1[k] += xa[k].f64();
            s2[k] += (xa[k] * xb[k]).f64();
        }
    }
    for (k, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        s1[k] += x.f64();
        s2[k] += (x * y).f64();
    }
    (s1.iter().sum(), s2.iter().sum())
}

/// Per-channel batch mean and biased variance (two passes, accumulated in f64; channels in
/// parallel, each summed in a fixed order ([`sum8`]), so the result does not depend on the
/// thread count).
pub fn batch_stats<R: Real>(x: &[R], g: BnGeom) -> (Vec<R>, Vec<R>) {
    let m = g.count() as f64;
    let stats: Vec<(R, R)> = (0..g.c)
        .into_par_iter()
        .map(|ch| empf_simd::vectorized(ChannelStats { x, g, ch, m }))
        .collect();
    stats.into_iter().unzip()
}

/// Mean and biased variance of one channel ([`batch_stats`]), compiled for the host's vector
/// extension.
struct ChannelStats<'a, R> {
    x: &'a [R],
    g: BnGeom,
    ch: usize,
    m: f64,
}

impl<R: Real> empf_simd::VectorWork for ChannelStats<'_, R> {
    type Output = (R, R);
    #[inline(always)]
    fn run(self) -> (R, R) {
        let ChannelStats { x, g, ch, m } = self;
        let mut s = 0.0;
        for r in g.runs(ch) {
            s += sum8(&x[r.clone()], &x[r], |v, _| v.f64());
        }
        let mu = s / m;
        let mut q = 0.0;
        for r in g.runs(ch) {
            q += sum8(&x[r.clone()], &x[r], |v, _| {
                let d = v.f64() - mu;
                d * d
            });
        }
        (R::of(mu), R::of(q / m))
    }
}

/// Per-channel `(Σ dy, Σ dy·x̂)` (channels in parallel, each summed serially in f64).
fn channel_sums<R: Real>(dy: &[R], xhat: &[R], g: BnGeom) -> Vec<(f64, f64)> {
    (0..g.c)
        .into_par_iter()
        .map(|ch| empf_simd::vectorized(ChannelSums { dy, xhat, g, ch }))
        .collect()
}

/// `(Σ dy, Σ dy·x̂)` of one channel ([`channel_sums`]), compiled for the host's vector extension.
struct ChannelSums<'a, R> {
    dy: &'a [R],
    xhat: &'a [R],
    g: BnGeom,
    ch: usize,
}

impl<R: Real> empf_simd::VectorWork for ChannelSums<'_, R> {
    type Output = (f64, f64);
    #[inline(always)]
    fn run(self) -> (f64, f64) {
        let ChannelSums { dy, xhat, g, ch } = self;
        let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
        for r in g.runs(ch) {
            let (a, b) = sum8_pair(&dy[r.clone()], &xhat[r]);
            sdy += a;
            sdyx += b;
        }
        (sdy, sdyx)
    }
}

/// `s = (σ² + eps)^(−1/2)` per channel.
pub fn inv_std<R: Real>(var: &[R], eps: R) -> Vec<R> {
    var.iter().map(|&v| R::one() / (v + eps).sqrt()).collect()
}

/// `x̂ = (x − μ)·s` into `xhat`, and `y = γ·x̂ + β` into `y`.
#[allow(clippy::too_many_arguments)]
pub fn normalise<R: Real>(
    x: &[R],
    g: BnGeom,
    mean: &[R],
    inv_std: &[R],
    gamma: &[R],
    beta: &[R],
    xhat: &mut [R],
    y: &mut [R],
) {
    let block = g.c * g.hw;
    y.par_chunks_mut(block)
        .zip(xhat.par_chunks_mut(block))
        .zip(x.par_chunks(block))
        .for_each(|((yb, hb), xb)| {
            empf_simd::vectorized(NormaliseSample {
                x: xb,
                hw: g.hw,
                coef: (mean, inv_std, gamma, beta),
                xhat: hb,
                y: yb,
            })
        });
}

/// [`normalise`] over one sample, compiled for the host's vector extension.
struct NormaliseSample<'a, R> {
    x: &'a [R],
    hw: usize,
    /// Mean, inverse standard deviation, γ, β.
    coef: (&'a [R], &'a [R], &'a [R], &'a [R]),
    xhat: &'a mut [R],
    y: &'a mut [R],
}

impl<R: Real> empf_simd::VectorWork for NormaliseSample<'_, R> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let NormaliseSample {
            x,
            hw,
            coef: (mean, inv_std, gamma, beta),
            xhat,
            y,
        } = self;
        let planes = x.chunks(hw).zip(xhat.chunks_mut(hw)).zip(y.chunks_mut(hw));
        for (ch, ((xp, hp), yp)) in planes.enumerate() {
            let (mu, s, ga, be) = (mean[ch], inv_std[ch], gamma[ch], beta[ch]);
            for ((xh, yy), &xx) in hp.iter_mut().zip(yp.iter_mut()).zip(xp) {
                *xh = (xx - mu) * s;
                *yy = ga * *xh + be;
            }
        }
    }
}

/// Train-mode backward (batch statistics differentiated): writes `dx`, adds into `dgamma`, `dbeta`.
/// `dx_i = γ s (dy_i − mean(dy) − x̂_i·mean(dy·x̂))`.
#[allow(clippy::too_many_arguments)]
pub fn backward_train<R: Real>(
    dy: &[R],
    xhat: &[R],
    inv_std: &[R],
    gamma: &[R],
    g: BnGeom,
    dgamma: &mut [R],
    dbeta: &mut [R],
    dx: &mut [R],
) {
    let m = g.count() as f64;
    let sums = channel_sums(dy, xhat, g);
    let mut coef = Vec::with_capacity(g.c);
    for (ch, &(sdy, sdyx)) in sums.iter().enumerate() {
        dgamma[ch] += R::of(sdyx);
        dbeta[ch] += R::of(sdy);
        coef.push((gamma[ch] * inv_std[ch], R::of(sdy / m), R::of(sdyx / m)));
    }
    let block = g.c * g.hw;
    dx.par_chunks_mut(block)
        .zip(dy.par_chunks(block))
        .zip(xhat.par_chunks(block))
        .for_each(|((ob, db), hb)| {
            empf_simd::vectorized(BackwardSample {
                dy: db,
                xhat: hb,
                hw: g.hw,
                coef: &coef,
                dx: ob,
            })
        });
}

/// The train-mode `dx` of one sample ([`backward_train`]), compiled for the host's vector
/// extension.
struct BackwardSample<'a, R> {
    dy: &'a [R],
    xhat: &'a [R],
    hw: usize,
    /// Per channel `(γ s, mean(dy), mean(dy·x̂))`.
    coef: &'a [(R, R, R)],
    dx: &'a mut [R],
}

impl<R: Real> empf_simd::VectorWork for BackwardSample<'_, R> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let BackwardSample {
            dy,
            xhat,
            hw,
            coef,
            dx,
        } = self;
        let planes = dx.chunks_mut(hw).zip(dy.chunks(hw)).zip(xhat.chunks(hw));
        for (((op, dp), hp), &(k, mdy, mdyx)) in planes.zip(coef) {
            for ((o, &d), &xh) in op.iter_mut().zip(dp).zip(hp) {
                *o = k * (d - mdy - xh * mdyx);
            }
        }
    }
}

/// Eval-mode backward (running statistics are constants): `dx = γ s dy`; adds into `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn backward_eval<R: Real>(
    dy: &[R],
    xhat: &[R],
    inv_std: &[R],
    gamma: &[R],
    g: BnGeom,
    dgamma: &mut [R],
    dbeta: &mut [R],
    dx: &mut [R],
) {
    let sums = channel_sums(dy, xhat, g);
    let mut coef = Vec::with_capacity(g.c);
    for (ch, &(sdy, sdyx)) in sums.iter().enumerate() {
        dgamma[ch] += R::of(sdyx);
        dbeta[ch] += R::of(sdy);
        coef.push(gamma[ch] * inv_std[ch]);
    }
    let block = g.c * g.hw;
    dx.par_chunks_mut(block)
        .zip(dy.par_chunks(block))
        .for_each(|(ob, db)| {
            for (ch, &k) in coef.iter().enumerate() {
                let r = ch * g.hw..(ch + 1) * g.hw;
                for (o, &d) in ob[r.clone()].iter_mut().zip(&db[r]) {
                    *o = k * d;
                }
            }
        });
}

/// BatchNorm over NCHW or NF inputs. Parameters `{name}.weight` (γ, init 1) and `{name}.bias`
/// (β, init 0) of kind [`ParamKind::Norm`]; buffers `{name}.running_mean` (init 0) and
/// `{name}.running_var` (init 1) of kind [`ParamKind::Buffer`].
pub struct BatchNorm<R: Real> {
    name: String,
    /// Channels (features).
    pub channels: usize,
    /// Added to the variance.
    pub eps: R,
    /// Running-statistics momentum.
    pub momentum: R,
    /// γ.
    pub weight: Param<R>,
    /// β.
    pub bias: Param<R>,
    /// Running mean.
    pub running_mean: Param<R>,
    /// Running (unbiased) variance.
    pub running_var: Param<R>,
}

/// What the BN backward needs: x̂ and the per-channel `s`, and which statistics were used.
#[derive(Default)]
pub struct BnCache<R: Real> {
    xhat: Vec<R>,
    inv_std: Vec<R>,
    train: bool,
    shape: Vec<usize>,
}
crate::impl_cache!(BnCache<R> { xhat, inv_std });

impl<R: Real> BnCache<R> {
    /// The normalised input x̂ of the forward.
    pub fn xhat(&self) -> &[R] {
        &self.xhat
    }
    /// Whether the forward used batch statistics.
    pub fn train(&self) -> bool {
        self.train
    }
}

impl<R: Real> crate::layers::CacheBytes for BnCache<R> {
    fn cache_bytes(&self) -> usize {
        crate::layers::CacheData::bytes(self)
    }
}

impl<R: Real> BatchNorm<R> {
    /// γ = 1, β = 0, running mean 0, running variance 1, PyTorch eps and momentum.
    pub fn new(name: &str, channels: usize) -> Self {
        let p = |suffix: &str, kind, v: f64| {
            Param::new(
                format!("{name}.{suffix}"),
                kind,
                from_vec(&[channels], vec![R::of(v); channels]),
            )
        };
        BatchNorm {
            name: name.to_string(),
            channels,
            eps: R::of(BN_EPS),
            momentum: R::of(BN_MOMENTUM),
            weight: p("weight", ParamKind::Norm, 1.0),
            bias: p("bias", ParamKind::Norm, 0.0),
            running_mean: p("running_mean", ParamKind::Buffer, 0.0),
            running_var: p("running_var", ParamKind::Buffer, 1.0),
        }
    }

    /// Forward on a flat slice laid out as `g` (train: batch statistics, and the running
    /// statistics are updated; eval: running statistics). Fills `cache` when given.
    pub fn forward_slice(
        &mut self,
        x: &[R],
        g: BnGeom,
        train: bool,
        cache: Option<&mut BnCache<R>>,
    ) -> Result<Vec<R>> {
        let (mean, s) = if train {
            if g.count() < 2 {
                return Err(Error::shape(
                    &self.name,
                    "training-mode BatchNorm needs more than one value per channel",
                    &[g.n, g.c, g.hw],
                ));
            }
            let (mean, var) = batch_stats(x, g);
            let mom = self.momentum;
            let unbias = R::of(g.count() as f64 / (g.count() - 1) as f64);
            let rm = self.running_mean.value.as_slice_mut().expect("standard");
            for (r, &m) in rm.iter_mut().zip(&mean) {
                *r = (R::one() - mom) * *r + mom * m;
            }
            let rv = self.running_var.value.as_slice_mut().expect("standard");
            for (r, &v) in rv.iter_mut().zip(&var) {
                *r = (R::one() - mom) * *r + mom * v * unbias;
            }
            let s = inv_std(&var, self.eps);
            (mean, s)
        } else {
            let mean = self
                .running_mean
                .value
                .as_slice()
                .expect("standard")
                .to_vec();
            let s = inv_std(
                self.running_var.value.as_slice().expect("standard"),
                self.eps,
            );
            (mean, s)
        };
        let mut y = vec![R::zero(); g.len()];
        let gamma = self.weight.value.as_slice().expect("standard");
        let beta = self.bias.value.as_slice().expect("standard");
        match cache {
            Some(c) => {
                // every value is overwritten by `normalise`: no clearing pass
                c.xhat.resize(g.len(), R::zero());
                normalise(x, g, &mean, &s, gamma, beta, &mut c.xhat, &mut y);
                c.inv_std = s;
                c.train = train;
                c.shape = vec![g.n, g.c, g.hw];
            }
            None => {
                // no cache: y = γ·((x − μ)·s) + β directly, same arithmetic as `normalise`
                let block = g.c * g.hw;
                y.par_chunks_mut(block)
                    .zip(x.par_chunks(block))
                    .for_each(|(yb, xb)| {
                        for ch in 0..g.c {
                            let (mu, sc, ga, be) = (mean[ch], s[ch], gamma[ch], beta[ch]);
                            let r = ch * g.hw..(ch + 1) * g.hw;
                            for (yy, &xx) in yb[r.clone()].iter_mut().zip(&xb[r]) {
                                *yy = ga * ((xx - mu) * sc) + be;
                            }
                        }
                    });
            }
        }
        Ok(y)
    }

    /// Backward on a flat slice (the mode is the one the forward used): returns `dx`, adds into
    /// the γ and β gradients.
    pub fn backward_slice(&mut self, dy: &[R], g: BnGeom, cache: &BnCache<R>) -> Result<Vec<R>> {
        if cache.shape != [g.n, g.c, g.hw] || dy.len() != g.len() {
            return Err(Error::shape(
                &self.name,
                format!(
                    "output gradient shaped like the forward input {:?}",
                    cache.shape
                ),
                &[g.n, g.c, g.hw],
            ));
        }
        let mut dx = vec![R::zero(); g.len()];
        let gamma = self.weight.value.as_slice().expect("standard");
        let dgamma = self.weight.grad.as_slice_mut().expect("standard");
        let dbeta = self.bias.grad.as_slice_mut().expect("standard");
        let f = if cache.train {
            backward_train
        } else {
            backward_eval
        };
        f(
            dy,
            &cache.xhat,
            &cache.inv_std,
            gamma,
            g,
            dgamma,
            dbeta,
            &mut dx,
        );
        Ok(dx)
    }

    /// `y = x̂·γ + β`-equivalent per-channel affine of the eval-mode BN: `y = scale ⊙ x + shift` with
    /// `scale = γ / sqrt(running_var + eps)`, `shift = β − running_mean·scale`.
    pub fn fold_affine(&self) -> (Vec<R>, Vec<R>) {
        let gamma = self.weight.value.as_slice().expect("standard");
        let beta = self.bias.value.as_slice().expect("standard");
        let rm = self.running_mean.value.as_slice().expect("standard");
        let s = inv_std(
            self.running_var.value.as_slice().expect("standard"),
            self.eps,
        );
        let scale: Vec<R> = gamma.iter().zip(&s).map(|(&g, &s)| g * s).collect();
        let shift = beta
            .iter()
            .zip(rm)
            .zip(&scale)
            .map(|((&b, &m), &k)| b - m * k)
            .collect();
        (scale, shift)
    }
}

impl<R: Real> Layer<R> for BatchNorm<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "BatchNorm"
    }
    fn describe(&self) -> String {
        format!("BatchNorm({})", self.channels)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        BnGeom::of(&self.name, input, self.channels)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let g = BnGeom::of(&self.name, x.shape(), self.channels)?;
        let xs = as_slice(x);
        let c = cache.map(|c| c.get_or_default::<BnCache<R>>());
        let y = self.forward_slice(&xs, g, ctx.train, c)?;
        Ok(from_vec(x.shape(), y))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<BnCache<R>>(&self.name)?;
        let g = BnGeom::of(&self.name, dy.shape(), self.channels)?;
        let dys = as_slice(dy);
        let dx = self.backward_slice(&dys, g, c)?;
        Ok(from_vec(dy.shape(), dx))
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.weight);
        f(&mut self.bias);
        f(&mut self.running_mean);
        f(&mut self.running_var);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step, check_unrolled};
    use crate::layers::GradMode;
    use crate::rng::Rng;
    use proptest::prelude::*;

    fn shape_of(rank4: bool, n: usize, c: usize, h: usize, w: usize) -> Vec<usize> {
        if rank4 { vec![n, c, h, w] } else { vec![n, c] }
    }

    fn random_bn(c: usize, rng: &mut Rng) -> BatchNorm<f64> {
        let mut bn = BatchNorm::<f64>::new("bn", c);
        bn.weight
            .value
            .mapv_inplace(|_| rng.uniform_range(0.5, 1.5));
        bn.bias.value.mapv_inplace(|_| rng.normal());
        bn.running_mean.value.mapv_inplace(|_| rng.normal());
        bn.running_var
            .value
            .mapv_inplace(|_| rng.uniform_range(0.3, 2.0));
        bn
    }

    fn rand_tensor(shape: &[usize], scale: f64, rng: &mut Rng) -> Tensor<f64> {
        let n = shape.iter().product();
        from_vec(shape, (0..n).map(|_| scale * rng.normal() + 0.3).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn batchnorm_backward_matches_finite_differences(
            rank4 in any::<bool>(), n in 2usize..5, c in 1usize..4, h in 1usize..4, w in 1usize..4,
            train in any::<bool>(), steps in 1usize..4, seed in 0u64..1000,
        ) {
            let mut rng = Rng::new(seed);
            let mut bn = random_bn(c, &mut rng);
            let shape = shape_of(rank4, n, c, h, w);
            let x = rand_tensor(&shape, 2.0, &mut rng);
            let opts = GradCheckOpts { seed, ..Default::default() };
            let ctx = StepCtx { t: 0, steps: 1, train, grad: GradMode::Online };
            check_step(&mut bn, &x, &ctx, &State::Empty, &opts).unwrap().assert_ok(&opts, "BN step");
            let xs: Vec<_> = (0..steps).map(|_| rand_tensor(&shape, 2.0, &mut rng)).collect();
            for mode in [GradMode::Online, GradMode::Bptt] {
                check_unrolled(&mut bn, &xs, train, mode, &opts).unwrap().assert_ok(&opts, "BN unrolled");
            }
        }
    }

    #[test]
    fn train_mode_matches_pytorch_semantics() {
        // x over one channel: 1, 2, 3, 6 -> mean 3, biased var 3.5, unbiased 14/3
        let mut bn = BatchNorm::<f64>::new("bn", 1);
        let x = from_vec(&[4, 1], vec![1.0, 2.0, 3.0, 6.0]);
        let y = bn
            .forward(
                &x,
                &StepCtx::train(0, 1, GradMode::Online),
                &mut State::Empty,
                None,
            )
            .unwrap();
        let s = 1.0 / (3.5f64 + 1e-5).sqrt();
        assert!((y[[0, 0]] - (1.0 - 3.0) * s).abs() < 1e-12);
        assert!((bn.running_mean.value[[0]] - 0.3).abs() < 1e-12);
        assert!((bn.running_var.value[[0]] - (0.9 + 0.1 * 14.0 / 3.0)).abs() < 1e-12);
        // eval uses the running statistics
        let y = bn
            .forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap();
        let s = 1.0 / (0.9f64 + 0.1 * 14.0 / 3.0 + 1e-5).sqrt();
        assert!((y[[3, 0]] - (6.0 - 0.3) * s).abs() < 1e-12);
    }

    #[test]
    fn fold_affine_equals_eval_forward() {
        let mut rng = Rng::new(5);
        let mut bn = random_bn(3, &mut rng);
        let x = rand_tensor(&[2, 3, 2, 3], 1.0, &mut rng);
        let y = bn
            .forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap();
        let (k, b) = bn.fold_affine();
        for ((idx, &xv), &yv) in x.indexed_iter().zip(y.iter()) {
            let c = idx[1];
            assert!((k[c] * xv + b[c] - yv).abs() < 1e-12);
        }
    }

    /// Without a cache the forward skips storing x̂ (a fast path); it must give the same output,
    /// bit for bit, in train and eval mode.
    #[test]
    fn uncached_forward_equals_the_cached_forward_bit_for_bit() {
        let mut rng = Rng::new(12);
        for train in [true, false] {
            let mut a = random_bn(5, &mut rng);
            let mut b = random_bn(5, &mut rng);
            for (pa, pb) in [
                (&a.weight, &mut b.weight),
                (&a.bias, &mut b.bias),
                (&a.running_mean, &mut b.running_mean),
                (&a.running_var, &mut b.running_var),
            ] {
                pb.value = pa.value.clone();
            }
            let x = rand_tensor(&[3, 5, 4, 7], 2.0, &mut rng);
            let g = BnGeom::of("bn", x.shape(), 5).unwrap();
            let xs = x.as_slice().unwrap();
            let mut c = BnCache::default();
            let y1 = a.forward_slice(xs, g, train, Some(&mut c)).unwrap();
            let y2 = b.forward_slice(xs, g, train, None).unwrap();
            assert_eq!(
                y1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(a.running_var.value, b.running_var.value);
        }
    }

    #[test]
    fn train_backward_has_the_batch_statistics_terms() {
        // backward_eval used on a train-mode forward misses the mean/variance terms
        let mut rng = Rng::new(9);
        let mut bn = random_bn(2, &mut rng);
        let x = rand_tensor(&[3, 2], 1.0, &mut rng);
        let g = BnGeom::of("bn", x.shape(), 2).unwrap();
        let mut c = BnCache::default();
        let xs = x.as_slice().unwrap();
        bn.forward_slice(xs, g, true, Some(&mut c)).unwrap();
        let dy: Vec<f64> = (0..6).map(|_| rng.normal()).collect();
        let good = bn.backward_slice(&dy, g, &c).unwrap();
        c.train = false;
        let bad = bn.backward_slice(&dy, g, &c).unwrap();
        // the correct train-mode dx sums to zero per channel (shift invariance), the eval one does not
        for ch in 0..2 {
            let sg: f64 = (0..3).map(|n| good[n * 2 + ch]).sum();
            let sb: f64 = (0..3).map(|n| bad[n * 2 + ch]).sum();
            assert!(sg.abs() < 1e-12 && sb.abs() > 1e-6, "{sg} {sb}");
        }
    }

    #[test]
    fn bad_shapes_name_the_layer() {
        let mut bn = BatchNorm::<f32>::new("bn7", 3);
        for shape in [vec![2, 4], vec![2, 3, 4], vec![2, 4, 2, 2], vec![0, 3]] {
            let x = crate::tensor::zeros::<f32>(&shape);
            let e = bn
                .forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None)
                .unwrap_err();
            assert!(matches!(e, Error::Shape { .. }));
            assert!(e.to_string().contains("bn7"), "{e}");
        }
        let x = crate::tensor::zeros::<f32>(&[1, 3]);
        let e = bn
            .forward(
                &x,
                &StepCtx::train(0, 1, GradMode::Online),
                &mut State::Empty,
                None,
            )
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }));
    }
}
