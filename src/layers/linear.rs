//! Full-precision fully connected layer (the classifier head): `y = x Wᵀ + b`.

use crate::error::Result;
use crate::layers::{Cache, Layer, Param, ParamKind, State, StepCtx, check_shape};
use crate::rng::Rng;
use crate::tensor::{Real, Tensor, as_slice, from_vec, gemm};

/// `y[n, o] = Σ_i x[n, i] · W[o, i] + b[o]`. Input `N x in`, output `N x out`.
pub struct Linear<R: Real> {
    name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// `W`, shape `out x in`.
    pub weight: Param<R>,
    /// `b`, shape `out` (absent when built without bias).
    pub bias: Option<Param<R>>,
}

/// Backward needs the input.
#[derive(Default)]
pub struct LinearCache<R: Real> {
    x: Option<Tensor<R>>,
}
crate::impl_cache!(LinearCache<R> { x });

impl<R: Real> Linear<R> {
    /// PyTorch-style init: W, b ~ U(−1/√in, 1/√in).
    pub fn new(
        name: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        rng: &mut Rng,
    ) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let w: Vec<R> = (0..in_features * out_features)
            .map(|_| R::of(rng.uniform_range(-bound, bound)))
            .collect();
        let bias = bias.then(|| {
            let b: Vec<R> = (0..out_features)
                .map(|_| R::of(rng.uniform_range(-bound, bound)))
                .collect();
            Param::new(
                format!("{name}.bias"),
                ParamKind::Bias,
                from_vec(&[out_features], b),
            )
        });
        Linear {
            name: name.to_string(),
            in_features,
            out_features,
            weight: Param::new(
                format!("{name}.weight"),
                ParamKind::Weight,
                from_vec(&[out_features, in_features], w),
            ),
            bias,
        }
    }
}

/// `y = x Wᵀ (+ b)` for `x` of `n x in`, `w` of `out x in`: shared by Linear and BinaryLinear.
pub(crate) fn linear_forward<R: Real>(
    x: &[R],
    n: usize,
    w: &[R],
    b: Option<&[R]>,
    fin: usize,
    fout: usize,
) -> Vec<R> {
    let mut y = vec![R::zero(); n * fout];
    if let Some(b) = b {
        for row in y.chunks_exact_mut(fout) {
            row.copy_from_slice(b);
        }
    }
    gemm(
        n,
        fin,
        fout,
        R::one(),
        x,
        false,
        w,
        true,
        if b.is_some() { R::one() } else { R::zero() },
        &mut y,
    );
    y
}

/// Backward of [`linear_forward`]: `dW += dyᵀ x`, `db += Σ_n dy`, returns `dx = dy W`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward<R: Real>(
    x: &[R],
    dy: &[R],
    n: usize,
    w: &[R],
    dw: &mut [R],
    db: Option<&mut [R]>,
    fin: usize,
    fout: usize,
) -> Vec<R> {
    gemm(fout, n, fin, R::one(), dy, true, x, false, R::one(), dw);
    if let Some(db) = db {
        for row in dy.chunks_exact(fout) {
            for (g, &d) in db.iter_mut().zip(row) {
                *g += d;
            }
        }
    }
    let mut dx = vec![R::zero(); n * fin];
    gemm(
        n,
        fout,
        fin,
        R::one(),
        dy,
        false,
        w,
        false,
        R::zero(),
        &mut dx,
    );
    dx
}

impl<R: Real> Layer<R> for Linear<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Linear"
    }
    fn describe(&self) -> String {
        format!(
            "Linear({} -> {}{})",
            self.in_features,
            self.out_features,
            if self.bias.is_some() { "" } else { ", no bias" }
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
        let xs = as_slice(x);
        let w = self.weight.value.as_slice().expect("standard layout");
        let b = self
            .bias
            .as_ref()
            .map(|b| b.value.as_slice().expect("standard layout"));
        let y = linear_forward(&xs, out[0], w, b, self.in_features, self.out_features);
        if let Some(c) = cache {
            c.get_or_default::<LinearCache<R>>().x = Some(x.clone());
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
        let x = cache
            .get::<LinearCache<R>>(&self.name)?
            .x
            .as_ref()
            .expect("input cached");
        let n = x.shape()[0];
        check_shape(
            &self.name,
            dy.shape(),
            &[Some(n), Some(self.out_features)],
            "output gradient N x out",
        )?;
        let dys = as_slice(dy);
        let dx = linear_backward(
            x.as_slice().expect("standard"),
            &dys,
            n,
            self.weight.value.as_slice().expect("standard"),
            self.weight.grad.as_slice_mut().expect("standard"),
            self.bias
                .as_mut()
                .map(|b| b.grad.as_slice_mut().expect("standard")),
            self.in_features,
            self.out_features,
        );
        Ok(from_vec(&[n, self.in_features], dx))
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.weight);
        if let Some(b) = &mut self.bias {
            f(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step};
    use crate::layers::GradMode;
    use crate::rng::Rng;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn linear_backward_matches_finite_differences(n in 1usize..5, fin in 1usize..20, fout in 1usize..12, seed in 0u64..1000) {
            let mut rng = Rng::new(seed);
            let mut l = Linear::<f64>::new("fc", fin, fout, true, &mut rng);
            let x = from_vec(&[n, fin], (0..n * fin).map(|_| rng.normal()).collect());
            let opts = GradCheckOpts { seed, ..Default::default() };
            let rep = check_step(&mut l, &x, &StepCtx::train(0, 1, GradMode::Online), &State::Empty, &opts).unwrap();
            rep.assert_ok(&opts, "Linear");
        }
    }

    #[test]
    fn gradcheck_catches_a_missing_term() {
        // a Linear whose backward forgets the bias must fail the check
        let broken =
            |l: &mut Linear<f64>, dy: &Tensor<f64>, c: &StepCtx, k: &Cache, s: &mut State<f64>| {
                let r = l.backward(dy, c, k, s);
                l.bias.as_mut().unwrap().grad.fill(0.0);
                r
            };
        let mut rng = Rng::new(3);
        let mut l = crate::gradcheck::Tampered {
            inner: Linear::new("fc", 4, 3, true, &mut rng),
            backward: broken,
        };
        let x = from_vec(&[2, 4], (0..8).map(|_| rng.normal()).collect());
        let opts = GradCheckOpts::default();
        let rep = check_step(
            &mut l,
            &x,
            &StepCtx::train(0, 1, GradMode::Online),
            &State::Empty,
            &opts,
        )
        .unwrap();
        assert!(!rep.passed(&opts));
        assert!(
            rep.failures.iter().all(|f| f.contains("bias")),
            "{:?}",
            rep.failures
        );
    }

    #[test]
    fn bad_shape_names_the_layer() {
        let mut rng = Rng::new(3);
        let mut l = Linear::<f32>::new("head", 4, 3, true, &mut rng);
        let x = crate::tensor::zeros::<f32>(&[2, 5]);
        let e = l
            .forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("head") && e.contains("[2, 5]"), "{e}");
    }
}
