//! SECA: spiking efficient channel attention (EMPF.md §8, Eqs. 9-10).
//!
//! Over an NCHW current `I` (shapes in comments: `N` batch, `C` channels, `P = H·W` pixels):
//!
//! ```text
//! z[n,c] = (1/P) Σ_p I[n,c,p]                                   z: N x C   (global average pool)
//! u[n,c] = Σ_{j<k} w[j] · z[n, c + j − h] + b,  h = (k−1)/2     u: N x C   (Conv1d 1→1 over channels,
//!                                                                          zero padding h, bias b)
//! a[n,c] = σ(u[n,c])                                            a: N x C
//! Ĩ[n,c,p] = a[n,c] · I[n,c,p]                                  Ĩ: N x C x H x W
//! ```
//!
//! `w` (`{name}.weight`, shape `[k]`) and `b` (`{name}.bias`, shape `[1]`) are shared over
//! time-steps: each step's backward adds into the same gradients. The layer keeps no state.
//!
//! Backward, given `G = dL/dĨ` (term by term):
//! * `Ĩ = a ⊙ I` has two paths to `I`: directly, `∂Ĩ[n,c,p]/∂I[n,c,p] = a[n,c]`, and through `a`.
//! * `da[n,c] = Σ_p G[n,c,p] · I[n,c,p]`.
//! * `du[n,c] = da[n,c] · a[n,c] · (1 − a[n,c])`  (σ' = σ(1 − σ)).
//! * `dw[j] += Σ_{n,c} du[n,c] · z[n, c + j − h]` (terms with `c + j − h` outside `0..C` are the zero
//!   padding and vanish); `db += Σ_{n,c} du[n,c]`.
//! * `dz[n,c'] = Σ_j w[j] · du[n, c' − j + h]` (the transposed convolution, same zero padding).
//! * `dI[n,c,p] = G[n,c,p] · a[n,c] + dz[n,c] / P`.
//!
//! SECA_II (`SECA_II(I_prev, I) = SECA_I(I_prev + I)`) is [`Seca::forward_pair`] /
//! [`Seca::backward_pair`]: the sum's gradient is the gradient of both operands.

use crate::error::{Error, Result};
use crate::layers::pool::{for_planes_2in, plane_means};
use crate::layers::{Cache, Layer, Param, ParamKind, State, StepCtx, check_shape};
use crate::rng::Rng;
use crate::tensor::{Real, Tensor, as_slice, from_vec};

/// The ECA adaptive kernel size for `C` channels: `t = |log2(C)/2 + 1/2|` (γ = 2, b = 1), then the
/// odd integer nearest to it (`t` truncated, plus one when even, as the ECA reference code does).
/// Gives 3 for C = 16..=64 and 5 for C = 128..=1024 (EMPF.md §8), 7 from 2048.
pub fn eca_kernel_size(channels: usize) -> usize {
    let c = channels.max(1) as f64;
    let t = (c.log2() / 2.0 + 0.5).abs() as usize;
    if t % 2 == 1 { t } else { t + 1 }
}

/// Spiking efficient channel attention over NCHW currents (module docs give the equations).
pub struct Seca<R: Real> {
    name: String,
    /// Kernel size `k` of the channel convolution (odd).
    pub k: usize,
    /// `w`, shape `[k]`.
    pub weight: Param<R>,
    /// `b`, shape `[1]`.
    pub bias: Param<R>,
}

/// What backward needs: the input (for `da`), the pooled means (for `dw`) and the attention `a`.
#[derive(Default)]
pub struct SecaCache<R: Real> {
    /// Input `I` (or `I_prev + I` for SECA_II), `N x C x H x W`.
    x: Option<Tensor<R>>,
    /// `z`, `N x C`.
    z: Vec<R>,
    /// `a`, `N x C`.
    a: Vec<R>,
}
crate::impl_cache!(SecaCache<R> { x, z, a });

fn sigmoid<R: Real>(u: R) -> R {
    // stable for large |u|: exp of a non-positive number only
    if u >= R::zero() {
        R::one() / (R::one() + (-u).exp())
    } else {
        let e = u.exp();
        e / (R::one() + e)
    }
}

impl<R: Real> Seca<R> {
    /// SECA with kernel `k` (odd, ≥ 1). Init as PyTorch's `Conv1d(1, 1, k)`: `w`, `b` ~ U(−1/√k, 1/√k)
    /// (kaiming-uniform with a = √5 on fan-in `k`).
    pub fn new(name: &str, k: usize, rng: &mut Rng) -> Result<Self> {
        if k == 0 || k % 2 == 0 {
            return Err(Error::Config(format!(
                "SECA `{name}`: kernel size must be odd and positive, got {k}"
            )));
        }
        let bound = 1.0 / (k as f64).sqrt();
        let w: Vec<R> = (0..k)
            .map(|_| R::of(rng.uniform_range(-bound, bound)))
            .collect();
        let b = vec![R::of(rng.uniform_range(-bound, bound))];
        Ok(Seca {
            name: name.to_string(),
            k,
            weight: Param::new(
                format!("{name}.weight"),
                ParamKind::Weight,
                from_vec(&[k], w),
            ),
            bias: Param::new(format!("{name}.bias"), ParamKind::Bias, from_vec(&[1], b)),
        })
    }

    /// SECA for `channels` channels with the ECA adaptive kernel size [`eca_kernel_size`].
    pub fn for_channels(name: &str, channels: usize, rng: &mut Rng) -> Result<Self> {
        Self::new(name, eca_kernel_size(channels), rng)
    }

    fn check_input(&self, shape: &[usize]) -> Result<()> {
        check_shape(
            &self.name,
            shape,
            &[None, None, None, None],
            "an N x C x H x W current (SECA pools over H x W)",
        )
    }

    /// `(Ĩ, z, a)` for input data `x` of shape `[n, c, h, w]`.
    fn compute(&self, x: &[R], shape: &[usize]) -> (Vec<R>, Vec<R>, Vec<R>) {
        let (n, c, p) = (shape[0], shape[1], shape[2] * shape[3]);
        let z = plane_means(x, p); // N x C
        let w = self.weight.value.as_slice().expect("standard layout");
        let b = self.bias.value.as_slice().expect("standard layout")[0];
        let h = (self.k - 1) / 2;
        let mut a = vec![R::zero(); n * c];
        for (zr, ar) in z.chunks_exact(c).zip(a.chunks_exact_mut(c)) {
            for (ci, av) in ar.iter_mut().enumerate() {
                let mut u = b;
                for (j, &wj) in w.iter().enumerate() {
                    let src = ci + j;
                    if src >= h && src - h < c {
                        u += wj * zr[src - h];
                    }
                }
                *av = sigmoid(u);
            }
        }
        let mut y = vec![R::zero(); x.len()];
        for_planes_2in(x, p, &a, 1, &mut y, p, |xp, av, yp| {
            for (yv, &xv) in yp.iter_mut().zip(xp) {
                *yv = av[0] * xv;
            }
        });
        (y, z, a)
    }

    /// Forward on `x`, keeping `x`, `z`, `a` in the cache (reusing its allocations across steps).
    fn forward_cached(&mut self, x: &[R], shape: &[usize], cache: &mut Cache) -> Tensor<R> {
        let (y, z, a) = self.compute(x, shape);
        let sc = cache.get_or_default::<SecaCache<R>>();
        match &mut sc.x {
            Some(t) if t.shape() == shape && t.is_standard_layout() => {
                t.as_slice_mut().expect("standard").copy_from_slice(x)
            }
            slot => *slot = Some(from_vec(shape, x.to_vec())),
        }
        sc.z = z;
        sc.a = a;
        from_vec(shape, y)
    }

    /// SECA_II forward: `SECA_I(I_prev + I)` (EMPF.md §8). Shapes must match.
    pub fn forward_pair(
        &mut self,
        x_prev: &Tensor<R>,
        x: &Tensor<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        self.check_input(x_prev.shape())?;
        if x_prev.shape() != x.shape() {
            return Err(Error::shape(
                &self.name,
                format!(
                    "SECA_II inputs of equal shapes: I_prev is {:?}",
                    x_prev.shape()
                ),
                x.shape(),
            ));
        }
        let sum = x_prev + x;
        let shape = sum.shape().to_vec();
        let xs = sum.as_slice().expect("fresh sums are standard");
        Ok(match cache {
            Some(c) => self.forward_cached(xs, &shape, c),
            None => from_vec(&shape, self.compute(xs, &shape).0),
        })
    }

    /// SECA_II backward: the gradient with respect to `I_prev + I`, which is the gradient with
    /// respect to each of `I_prev` and `I` (use it for both). Adds into the weight and bias gradients.
    pub fn backward_pair(&mut self, dy: &Tensor<R>, cache: &Cache) -> Result<Tensor<R>> {
        self.backward_impl(dy, cache)
    }

    fn backward_impl(&mut self, dy: &Tensor<R>, cache: &Cache) -> Result<Tensor<R>> {
        let sc = cache.get::<SecaCache<R>>(&self.name)?;
        let x = sc.x.as_ref().ok_or_else(|| {
            Error::Internal(format!("layer `{}`: cache without input", self.name))
        })?;
        if dy.shape() != x.shape() {
            return Err(Error::shape(
                &self.name,
                format!("output gradient of shape {:?}", x.shape()),
                dy.shape(),
            ));
        }
        let shape = x.shape();
        let (n, c, p) = (shape[0], shape[1], shape[2] * shape[3]);
        let xs = x.as_slice().expect("standard");
        let g = as_slice(dy);
        let (z, a) = (&sc.z, &sc.a);
        let h = (self.k - 1) / 2;
        // da, then du = da · a (1 − a)                                              N x C
        let mut du = vec![R::zero(); n * c];
        for_planes_2in(&g, p, xs, p, &mut du, 1, |gp, xp, d| {
            d[0] = gp.iter().zip(xp).map(|(&gv, &xv)| gv * xv).sum();
        });
        for (d, &av) in du.iter_mut().zip(a) {
            *d *= av * (R::one() - av);
        }
        // dw[j] += Σ du[n,c] z[n,c+j−h];  db += Σ du;  dz[n,c+j−h] += w[j] du[n,c]
        let w = self.weight.value.as_slice().expect("standard").to_vec();
        let dw = self.weight.grad.as_slice_mut().expect("standard");
        let mut db = R::zero();
        let mut dz = vec![R::zero(); n * c];
        for ((dur, zr), dzr) in du
            .chunks_exact(c)
            .zip(z.chunks_exact(c))
            .zip(dz.chunks_exact_mut(c))
        {
            for (ci, &d) in dur.iter().enumerate() {
                db += d;
                for (j, &wj) in w.iter().enumerate() {
                    let src = ci + j;
                    if src >= h && src - h < c {
                        dw[j] += d * zr[src - h];
                        dzr[src - h] += wj * d;
                    }
                }
            }
        }
        self.bias.grad.as_slice_mut().expect("standard")[0] += db;
        // dI = G · a + dz / P
        let inv = R::one() / R::of(p as f64);
        let ad: Vec<(R, R)> = a.iter().zip(&dz).map(|(&av, &d)| (av, d * inv)).collect();
        let mut dx = vec![R::zero(); xs.len()];
        for_planes_2in(&g, p, &ad, 1, &mut dx, p, |gp, adp, dp| {
            let (av, add) = adp[0];
            for (dv, &gv) in dp.iter_mut().zip(gp) {
                *dv = gv * av + add;
            }
        });
        Ok(from_vec(shape, dx))
    }
}

impl<R: Real> Layer<R> for Seca<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Seca"
    }
    fn describe(&self) -> String {
        format!("Seca(k={})", self.k)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.check_input(input)?;
        Ok(input.to_vec())
    }
    /// SECA_I: `Ĩ = σ(Conv1d_k(GAP(I)) + b) ⊙ I`.
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        self.check_input(x.shape())?;
        let xs = as_slice(x);
        Ok(match cache {
            Some(c) => self.forward_cached(&xs, x.shape(), c),
            None => from_vec(x.shape(), self.compute(&xs, x.shape()).0),
        })
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        self.backward_impl(dy, cache)
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.weight);
        f(&mut self.bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step, check_unrolled};
    use crate::layers::GradMode;
    use crate::rng::Rng;
    use crate::tensor::zeros;
    use ndarray::{Axis, concatenate};
    use proptest::prelude::*;

    fn randn(shape: &[usize], rng: &mut Rng) -> Tensor<f64> {
        from_vec(
            shape,
            (0..shape.iter().product()).map(|_| rng.normal()).collect(),
        )
    }

    fn train() -> StepCtx {
        StepCtx::train(0, 1, GradMode::Online)
    }

    /// A SECA with weights large enough that a missing term would show (init is small for k = 5).
    fn seca(k: usize, rng: &mut Rng) -> Seca<f64> {
        let mut s = Seca::new("seca", k, rng).unwrap();
        s.weight.value.mapv_inplace(|v| 3.0 * v);
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn seca_input_weight_and_bias_gradients_match_finite_differences(
            n in 1usize..3, c in 1usize..9, h in 1usize..5, w in 1usize..5, kk in 0usize..3, seed in 0u64..1000) {
            let k = 2 * kk + 1;
            let mut rng = Rng::new(seed);
            let mut l = seca(k, &mut rng);
            let x = randn(&[n, c, h, w], &mut rng);
            let opts = GradCheckOpts { seed, ..Default::default() };
            check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap().assert_ok(&opts, "Seca");
        }
    }

    #[test]
    fn seca_weights_are_shared_over_time_and_gradients_accumulate() {
        for (mode, seed) in [(GradMode::Online, 1u64), (GradMode::Bptt, 2)] {
            let mut rng = Rng::new(seed);
            let mut l = seca(3, &mut rng);
            let xs: Vec<Tensor<f64>> = (0..3).map(|_| randn(&[2, 7, 3, 2], &mut rng)).collect();
            let opts = GradCheckOpts {
                seed,
                ..Default::default()
            };
            check_unrolled(&mut l, &xs, true, mode, &opts)
                .unwrap()
                .assert_ok(&opts, "Seca over T=3");
            // the accumulated gradient is the sum of the single-step gradients
            let mut single = [0.0; 3];
            let mut total_b = 0.0;
            for x in &xs {
                let mut c = Cache::new();
                l.weight.zero_grad();
                l.bias.zero_grad();
                let y = l
                    .forward(x, &train(), &mut State::Empty, Some(&mut c))
                    .unwrap();
                let r = y.mapv(|v| v.sin());
                l.backward(&r, &train(), &c, &mut State::Empty).unwrap();
                for (s, g) in single.iter_mut().zip(l.weight.grad.iter()) {
                    *s += g;
                }
                total_b += l.bias.grad[[0].as_ref()];
            }
            l.weight.zero_grad();
            l.bias.zero_grad();
            let mut cache = Cache::new(); // one reused cache, as the online trainer does
            for x in &xs {
                let y = l
                    .forward(x, &train(), &mut State::Empty, Some(&mut cache))
                    .unwrap();
                let r = y.mapv(|v| v.sin());
                l.backward(&r, &train(), &cache, &mut State::Empty).unwrap();
            }
            for (s, g) in single.iter().zip(l.weight.grad.iter()) {
                assert!((s - g).abs() < 1e-12);
            }
            assert!((total_b - l.bias.grad[[0].as_ref()]).abs() < 1e-12);
        }
    }

    /// SECA_II as a one-input layer over `[2, N, C, H, W]` (I_prev stacked on I) so the gradient
    /// checker sees both operands; backward stacks the one gradient twice.
    struct Pair(Seca<f64>);
    impl Layer<f64> for Pair {
        fn name(&self) -> &str {
            "pair"
        }
        fn kind(&self) -> &'static str {
            "SecaII"
        }
        fn output_shape(&self, i: &[usize]) -> Result<Vec<usize>> {
            Ok(i[1..].to_vec())
        }
        fn forward(
            &mut self,
            x: &Tensor<f64>,
            _c: &StepCtx,
            _s: &mut State<f64>,
            k: Option<&mut Cache>,
        ) -> Result<Tensor<f64>> {
            let a = x.index_axis(Axis(0), 0).to_owned();
            let b = x.index_axis(Axis(0), 1).to_owned();
            self.0.forward_pair(&a, &b, k)
        }
        fn backward(
            &mut self,
            dy: &Tensor<f64>,
            _c: &StepCtx,
            k: &Cache,
            _s: &mut State<f64>,
        ) -> Result<Tensor<f64>> {
            let d = self.0.backward_pair(dy, k)?.insert_axis(Axis(0));
            Ok(concatenate(Axis(0), &[d.view(), d.view()]).unwrap())
        }
        fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<f64>)) {
            self.0.visit_params(f)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn seca_ii_pair_gradients_match_finite_differences(
            n in 1usize..3, c in 1usize..8, h in 1usize..4, w in 1usize..4, seed in 0u64..1000) {
            let mut rng = Rng::new(seed);
            let mut l = Pair(seca(5, &mut rng));
            let x = randn(&[2, n, c, h, w], &mut rng);
            let opts = GradCheckOpts { seed, ..Default::default() };
            check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap().assert_ok(&opts, "SECA_II");
        }
    }

    #[test]
    fn seca_forward_matches_a_direct_evaluation() {
        // C = 3, k = 3, one pixel per channel so z = I: u_c = w0 z_{c-1} + w1 z_c + w2 z_{c+1} + b
        let mut rng = Rng::new(0);
        let mut l = Seca::<f64>::new("s", 3, &mut rng).unwrap();
        l.weight.value = from_vec(&[3], vec![0.5, -1.0, 2.0]);
        l.bias.value = from_vec(&[1], vec![0.25]);
        let x = from_vec(&[1, 3, 1, 1], vec![1.0, 2.0, -3.0]);
        let y = l.forward(&x, &train(), &mut State::Empty, None).unwrap();
        let s = |u: f64| 1.0 / (1.0 + (-u).exp());
        let u = [
            -1.0 + 2.0 * 2.0 + 0.25, // w1 z0 + w2 z1 + b (z_{-1} is padding)
            0.5 * 1.0 - 1.0 * 2.0 + 2.0 * -3.0 + 0.25,
            0.5 * 2.0 - 1.0 * -3.0 + 0.25,
        ];
        let want = [s(u[0]) * 1.0, s(u[1]) * 2.0, s(u[2]) * -3.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
        // the cached and uncached forward agree
        let mut c = Cache::new();
        let y2 = l
            .forward(&x, &train(), &mut State::Empty, Some(&mut c))
            .unwrap();
        assert_eq!(y, y2);
        assert!(c.bytes() > 0);
    }

    #[test]
    fn broken_seca_backward_fails_the_check() {
        // dropping the path through the attention (dz / P term) must be caught on the input gradient
        let broken =
            |_l: &mut Seca<f64>, dy: &Tensor<f64>, _c: &StepCtx, k: &Cache, _s: &mut State<f64>| {
                let sc = k.get::<SecaCache<f64>>("broken")?;
                let p = dy.shape()[2] * dy.shape()[3];
                let mut dx = dy.clone();
                for (dp, &a) in dx.as_slice_mut().unwrap().chunks_exact_mut(p).zip(&sc.a) {
                    dp.iter_mut().for_each(|v| *v *= a);
                }
                Ok(dx)
            };
        let mut rng = Rng::new(5);
        let mut l = crate::gradcheck::Tampered {
            inner: seca(3, &mut rng),
            backward: broken,
        };
        let x = randn(&[2, 5, 2, 3], &mut rng);
        let opts = GradCheckOpts {
            skip_params: vec!["weight".into(), "bias".into()],
            ..Default::default()
        };
        let rep = check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap();
        assert!(!rep.passed(&opts), "{rep:?}");
    }

    #[test]
    fn seca_results_do_not_depend_on_the_thread_count() {
        let mut rng = Rng::new(12);
        let x = randn(&[4, 16, 24, 24], &mut rng);
        assert!(x.len() >= crate::layers::pool::PAR_MIN_ELEMS);
        let mut l = seca(5, &mut rng);
        let (y1, dx1) = crate::layers::pool::tests::run_in_pool(&mut l, &x, 1);
        let g1 = l.weight.grad.clone();
        l.weight.zero_grad();
        let (y3, dx3) = crate::layers::pool::tests::run_in_pool(&mut l, &x, 3);
        assert_eq!(y1, y3);
        assert_eq!(dx1, dx3);
        assert_eq!(g1, l.weight.grad);
    }

    #[test]
    fn eca_kernel_size_follows_the_adaptive_rule() {
        // t = floor(|log2 C / 2 + 1/2|), made odd by +1 when even
        assert_eq!(eca_kernel_size(64), 3);
        assert_eq!(eca_kernel_size(128), 5);
        assert_eq!(eca_kernel_size(256), 5);
        assert_eq!(eca_kernel_size(512), 5);
        assert_eq!(eca_kernel_size(32), 3);
        assert_eq!(eca_kernel_size(16), 3);
        assert_eq!(eca_kernel_size(1024), 5);
        assert_eq!(eca_kernel_size(2048), 7);
        assert_eq!(eca_kernel_size(1), 1);
        for c in 1..5000 {
            assert_eq!(eca_kernel_size(c) % 2, 1);
        }
        let mut rng = Rng::new(1);
        assert_eq!(Seca::<f32>::for_channels("s", 256, &mut rng).unwrap().k, 5);
    }

    #[test]
    fn init_is_pytorch_conv1d_uniform_and_names_are_stable() {
        let mut rng = Rng::new(11);
        let mut l = Seca::<f64>::new("blk2.seca", 5, &mut rng).unwrap();
        let bound = 1.0 / 5f64.sqrt();
        assert!(l.weight.value.iter().all(|v| v.abs() <= bound));
        assert!(l.bias.value[[0].as_ref()].abs() <= bound);
        let mut names = Vec::new();
        l.visit_params(&mut |p| names.push((p.name.clone(), p.kind, p.value.shape().to_vec())));
        assert_eq!(
            names,
            vec![
                ("blk2.seca.weight".to_string(), ParamKind::Weight, vec![5]),
                ("blk2.seca.bias".to_string(), ParamKind::Bias, vec![1]),
            ]
        );
    }

    #[test]
    fn bad_shapes_and_configs_are_errors_naming_the_layer() {
        let mut rng = Rng::new(1);
        assert!(matches!(
            Seca::<f32>::new("s", 4, &mut rng),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Seca::<f32>::new("s", 0, &mut rng),
            Err(Error::Config(_))
        ));
        let mut l = Seca::<f32>::new("att1", 3, &mut rng).unwrap();
        let e = l
            .forward(
                &zeros(&[4, 16]),
                &StepCtx::eval(0, 1),
                &mut State::Empty,
                None,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("att1") && e.contains("[4, 16]"), "{e}");
        let e = l
            .forward_pair(&zeros(&[1, 2, 3, 3]), &zeros(&[1, 2, 3, 4]), None)
            .unwrap_err();
        assert!(
            matches!(&e, Error::Shape { layer, got, .. } if layer == "att1" && got == &[1, 2, 3, 4])
        );
        let mut c = Cache::new();
        l.forward(
            &zeros(&[1, 2, 3, 3]),
            &train(),
            &mut State::Empty,
            Some(&mut c),
        )
        .unwrap();
        let e = l
            .backward(&zeros(&[1, 2, 3]), &train(), &c, &mut State::Empty)
            .unwrap_err();
        assert!(matches!(e, Error::Shape { ref layer, .. } if layer == "att1"));
    }
}
