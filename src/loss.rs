//! Softmax cross-entropy and prediction helpers (EMPF.md §7: `L[t] = CE(O[t], y)`, soft targets
//! under Mixup / CutMix; prediction `argmax Σ_t O[t]`).
//!
//! For logits `x` (`N x K`) and target distribution rows `q[n]` (one-hot for hard labels, a Mixup /
//! CutMix mixture for soft targets), with label smoothing `ε`:
//!
//! ```text
//! q̃[n,k] = (1 − ε) q[n,k] + ε / K
//! log p[n,k] = x[n,k] − m[n] − log Σ_j exp(x[n,j] − m[n]),   m[n] = max_j x[n,j]   (log-sum-exp)
//! L = −(1/N) Σ_n Σ_k q̃[n,k] log p[n,k]
//! ```
//!
//! Gradient: `∂L/∂x[n,k] = (1/N) (p[n,k] · S[n] − q̃[n,k])` with `S[n] = Σ_k q̃[n,k]` (`= 1` for valid
//! targets, giving the familiar `(p − q̃)/N`; the general form keeps the derivative exact when a
//! soft row is off by rounding). Derivation: `∂ log p[n,k] / ∂x[n,j] = δ_kj − p[n,j]`, so
//! `∂L/∂x[n,j] = −(1/N) Σ_k q̃[n,k] (δ_kj − p[n,j]) = (1/N)(p[n,j] S[n] − q̃[n,j])`.

use crate::error::{Error, Result};
use crate::tensor::{Real, Tensor, as_slice, from_vec};

const NAME: &str = "cross_entropy";

/// Targets of the cross-entropy.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a, R: Real> {
    /// One class index per row, each `< K`.
    Hard(&'a [usize]),
    /// `N x K` rows of non-negative weights summing to 1 (Mixup / CutMix).
    Soft(&'a Tensor<R>),
}

/// Tolerance on a soft target row's sum (`|Σ_k q[n,k] − 1|`), loose enough for f32 mixtures.
pub const SOFT_SUM_TOL: f64 = 1e-3;

fn logits_shape<R: Real>(logits: &Tensor<R>) -> Result<(usize, usize)> {
    let s = logits.shape();
    if s.len() != 2 || s[0] == 0 || s[1] == 0 {
        return Err(Error::shape(NAME, "expected N x K logits", s));
    }
    Ok((s[0], s[1]))
}

/// Mean softmax cross-entropy over the batch and its gradient `dL/dlogits` (same shape as
/// `logits`), in one pass. `label_smoothing` is `ε ∈ [0, 1]`. Errors: logits not `N x K`, a
/// label count or soft-target shape that does not match, a label `≥ K`, a soft row that is
/// negative or does not sum to 1, `ε` outside `[0, 1]`.
pub fn cross_entropy<R: Real>(
    logits: &Tensor<R>,
    targets: Targets<'_, R>,
    label_smoothing: f64,
) -> Result<(f64, Tensor<R>)> {
    let (n, k) = logits_shape(logits)?;
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::Config(format!(
            "{NAME}: label smoothing must be in [0, 1], got {label_smoothing}"
        )));
    }
    let soft = match targets {
        Targets::Hard(labels) => {
            if labels.len() != n {
                return Err(Error::shape(
                    NAME,
                    format!("one label per row of the {n} x {k} logits"),
                    &[labels.len()],
                ));
            }
            if let Some((i, &l)) = labels.iter().enumerate().find(|&(_, &l)| l >= k) {
                return Err(Error::Config(format!(
                    "{NAME}: label {l} of sample {i} is out of range for {k} classes"
                )));
            }
            None
        }
        Targets::Soft(q) => {
            if q.shape() != [n, k] {
                return Err(Error::shape(
                    NAME,
                    format!("soft targets shaped like the logits, [{n}, {k}]"),
                    q.shape(),
                ));
            }
            let qs = as_slice(q);
            for (i, row) in qs.chunks_exact(k).enumerate() {
                let sum: f64 = row.iter().map(|v| v.f64()).sum();
                if row.iter().any(|v| v.is_nan() || v.f64() < 0.0)
                    || (sum - 1.0).abs() > SOFT_SUM_TOL
                {
                    return Err(Error::Config(format!(
                        "{NAME}: soft target row {i} must be non-negative and sum to 1 (sums to {sum})"
                    )));
                }
            }
            Some(qs)
        }
    };
    let xs = as_slice(logits);
    let eps = label_smoothing;
    let uniform = eps / k as f64;
    let inv_n = 1.0 / n as f64;
    let mut grad = vec![R::zero(); n * k];
    let mut total = 0.0f64;
    for (i, (row, g)) in xs.chunks_exact(k).zip(grad.chunks_exact_mut(k)).enumerate() {
        // log-sum-exp in f64 for accuracy in both precisions
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v.f64()));
        let se: f64 = row.iter().map(|&v| (v.f64() - m).exp()).sum();
        let lse = m + se.ln();
        let target = |j: usize| -> f64 {
            let q = match (&soft, targets) {
                (Some(qs), _) => qs[i * k + j].f64(),
                (None, Targets::Hard(l)) => f64::from(u8::from(l[i] == j)),
                _ => unreachable!("targets checked above"),
            };
            (1.0 - eps) * q + uniform
        };
        let s: f64 = (0..k).map(target).sum();
        for (j, (&v, gv)) in row.iter().zip(g.iter_mut()).enumerate() {
            let logp = v.f64() - lse;
            let q = target(j);
            if q != 0.0 {
                total -= q * logp;
            }
            *gv = R::of(inv_n * (logp.exp() * s - q));
        }
    }
    Ok((total * inv_n, from_vec(&[n, k], grad)))
}

/// Index of the largest entry of each row of `N x K` scores (the first on ties; NaN never wins).
pub fn argmax<R: Real>(scores: &Tensor<R>) -> Result<Vec<usize>> {
    let (_, k) = logits_shape(scores)?;
    Ok(as_slice(scores)
        .chunks_exact(k)
        .map(|row| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] || row[best].is_nan() && !v.is_nan() {
                    best = j;
                }
            }
            best
        })
        .collect())
}

/// Number of rows whose argmax equals the label.
pub fn correct<R: Real>(scores: &Tensor<R>, labels: &[usize]) -> Result<usize> {
    let pred = argmax(scores)?;
    if pred.len() != labels.len() {
        return Err(Error::shape(
            "accuracy",
            format!("one label per row of the {} score rows", pred.len()),
            &[labels.len()],
        ));
    }
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count())
}

/// Fraction of rows whose argmax equals the label (in `[0, 1]`).
pub fn accuracy<R: Real>(scores: &Tensor<R>, labels: &[usize]) -> Result<f64> {
    Ok(correct(scores, labels)? as f64 / labels.len() as f64)
}

/// `Σ_t O[t]` over the per-step outputs (all `N x K`), the score the prediction is taken on.
pub fn sum_over_time<R: Real>(outputs: &[Tensor<R>]) -> Result<Tensor<R>> {
    let first = outputs
        .first()
        .ok_or_else(|| Error::Config("sum_over_time: no time-steps".into()))?;
    logits_shape(first)?;
    let mut acc = first.to_owned();
    for (t, o) in outputs.iter().enumerate().skip(1) {
        if o.shape() != first.shape() {
            return Err(Error::shape(
                "sum_over_time",
                format!("step {t} output shaped like step 0, {:?}", first.shape()),
                o.shape(),
            ));
        }
        acc += o;
    }
    Ok(acc)
}

/// Prediction of a spiking network: `argmax_k Σ_t O[t][n, k]` (EMPF.md §7).
pub fn predict<R: Real>(outputs: &[Tensor<R>]) -> Result<Vec<usize>> {
    argmax(&sum_over_time(outputs)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::tensor::zeros;
    use proptest::prelude::*;

    fn randn(shape: &[usize], rng: &mut Rng, scale: f64) -> Tensor<f64> {
        from_vec(
            shape,
            (0..shape.iter().product())
                .map(|_| scale * rng.normal())
                .collect(),
        )
    }

    /// Central differences of the loss in every logit against a claimed gradient `g`.
    fn fd_mismatch(
        x: &Tensor<f64>,
        t: Targets<'_, f64>,
        eps: f64,
        g: &Tensor<f64>,
    ) -> Option<String> {
        let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let h = 1e-5;
        for i in 0..x.len() {
            let mut xp = x.clone();
            xp.as_slice_mut().unwrap()[i] += h;
            let mut xm = x.clone();
            xm.as_slice_mut().unwrap()[i] -= h;
            let fd = (cross_entropy(&xp, t, eps).unwrap().0
                - cross_entropy(&xm, t, eps).unwrap().0)
                / (2.0 * h);
            let a = g.as_slice().unwrap()[i];
            if (a - fd).abs() > 1e-7 * (gmax + 1e-2) + 1e-6 * a.abs() {
                return Some(format!("logit {i}: analytic {a:e} vs fd {fd:e}"));
            }
        }
        None
    }

    fn fd_check(x: &Tensor<f64>, t: Targets<'_, f64>, eps: f64) {
        let (_, g) = cross_entropy(x, t, eps).unwrap();
        if let Some(m) = fd_mismatch(x, t, eps, &g) {
            panic!("{m}");
        }
    }

    fn naive_ce(x: &Tensor<f64>, q: &[f64]) -> f64 {
        let (n, k) = (x.shape()[0], x.shape()[1]);
        let xs = x.as_slice().unwrap();
        let mut l = 0.0;
        for i in 0..n {
            let z: f64 = xs[i * k..(i + 1) * k].iter().map(|v| v.exp()).sum();
            for j in 0..k {
                l -= q[i * k + j] * (xs[i * k + j].exp() / z).ln();
            }
        }
        l / n as f64
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn hard_label_gradient_matches_finite_differences(n in 1usize..5, k in 1usize..11, eps in 0.0f64..0.3, seed in 0u64..1000) {
            let mut rng = Rng::new(seed);
            let x = randn(&[n, k], &mut rng, 2.0);
            let labels: Vec<usize> = (0..n).map(|_| rng.below(k)).collect();
            fd_check(&x, Targets::Hard(&labels), eps);
            // value against the naive formula with the smoothed one-hot rows
            let q: Vec<f64> = (0..n * k).map(|i| (1.0 - eps) * f64::from(u8::from(labels[i / k] == i % k)) + eps / k as f64).collect();
            let (l, _) = cross_entropy(&x, Targets::Hard(&labels), eps).unwrap();
            prop_assert!((l - naive_ce(&x, &q)).abs() < 1e-10);
        }

        #[test]
        fn soft_target_gradient_matches_finite_differences(n in 1usize..5, k in 2usize..11, eps in 0.0f64..0.3, seed in 0u64..1000) {
            let mut rng = Rng::new(seed);
            let x = randn(&[n, k], &mut rng, 2.0);
            // Mixup-like rows: λ on one class, 1 − λ on another
            let mut q = zeros::<f64>(&[n, k]);
            for i in 0..n {
                let lam = rng.uniform();
                let (a, b) = (rng.below(k), rng.below(k));
                q[[i, a].as_ref()] += lam;
                q[[i, b].as_ref()] += 1.0 - lam;
            }
            fd_check(&x, Targets::Soft(&q), eps);
            let qs: Vec<f64> = q.iter().map(|v| (1.0 - eps) * v + eps / k as f64).collect();
            let (l, _) = cross_entropy(&x, Targets::Soft(&q), eps).unwrap();
            prop_assert!((l - naive_ce(&x, &qs)).abs() < 1e-10);
        }
    }

    #[test]
    fn hard_labels_equal_one_hot_soft_targets() {
        let mut rng = Rng::new(3);
        let x = randn(&[3, 4], &mut rng, 1.0);
        let labels = [2, 0, 3];
        let mut q = zeros::<f64>(&[3, 4]);
        for (i, &l) in labels.iter().enumerate() {
            q[[i, l].as_ref()] = 1.0;
        }
        let (lh, gh) = cross_entropy(&x, Targets::Hard(&labels), 0.1).unwrap();
        let (ls, gs) = cross_entropy(&x, Targets::Soft(&q), 0.1).unwrap();
        assert!((lh - ls).abs() < 1e-14);
        for (a, b) in gh.iter().zip(gs.iter()) {
            assert!((a - b).abs() < 1e-15);
        }
    }

    #[test]
    fn large_logits_stay_finite_in_f32() {
        let x = from_vec(&[2, 3], vec![1e4f32, -1e4, 0.0, 88.0, 89.0, 90.0]);
        let (l, g) = cross_entropy(&x, Targets::Hard(&[1, 2]), 0.0).unwrap();
        assert!(l.is_finite() && g.iter().all(|v| v.is_finite()));
        // row 0: log p[1] = −2e4 exactly; row 1: −log(e^-2 + e^-1 + 1)
        let r1 = (1.0 + (-1.0f64).exp() + (-2.0f64).exp()).ln();
        assert!((l - (2e4 + r1) / 2.0).abs() < 1e-6 * l, "{l}");
        // each gradient row sums to 0 (softmax sums to 1, as does the target)
        for row in g.as_slice().unwrap().chunks(3) {
            assert!(row.iter().sum::<f32>().abs() < 1e-6);
        }
    }

    #[test]
    fn a_wrong_gradient_is_caught_by_the_finite_difference_check() {
        // the checker used above rejects gradients missing the 1/N factor, the label-smoothing
        // term, or the soft-target weighting
        let mut rng = Rng::new(8);
        let x = randn(&[3, 4], &mut rng, 1.0);
        let labels = [1, 1, 0];
        let (_, g) = cross_entropy(&x, Targets::Hard(&labels), 0.1).unwrap();
        assert!(fd_mismatch(&x, Targets::Hard(&labels), 0.1, &g).is_none());
        assert!(fd_mismatch(&x, Targets::Hard(&labels), 0.1, &g.mapv(|v| v * 3.0)).is_some());
        let (_, g_unsmoothed) = cross_entropy(&x, Targets::Hard(&labels), 0.0).unwrap();
        assert!(fd_mismatch(&x, Targets::Hard(&labels), 0.1, &g_unsmoothed).is_some());
        let q = from_vec(
            &[3, 4],
            vec![0.7, 0.3, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.5],
        );
        assert!(
            fd_mismatch(
                &x,
                Targets::Soft(&q),
                0.0,
                &cross_entropy(&x, Targets::Hard(&labels), 0.0).unwrap().1
            )
            .is_some()
        );
    }

    #[test]
    fn bad_targets_and_shapes_are_errors() {
        let x = zeros::<f32>(&[2, 3]);
        let e = cross_entropy(&x, Targets::Hard(&[0, 3]), 0.0).unwrap_err();
        assert!(e.to_string().contains("label 3"), "{e}");
        let e = cross_entropy(&x, Targets::Hard(&[0]), 0.0).unwrap_err();
        assert!(matches!(&e, Error::Shape { layer, .. } if layer == NAME));
        let e = cross_entropy(&zeros::<f32>(&[6]), Targets::Hard(&[0]), 0.0).unwrap_err();
        assert!(matches!(&e, Error::Shape { got, .. } if got == &[6]));
        let q = zeros::<f32>(&[2, 4]);
        assert!(matches!(
            cross_entropy(&x, Targets::Soft(&q), 0.0),
            Err(Error::Shape { .. })
        ));
        let q = from_vec(&[2, 3], vec![0.5f32, 0.5, 0.0, 0.3, 0.3, 0.3]);
        let e = cross_entropy(&x, Targets::Soft(&q), 0.0).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
        let q = from_vec(&[2, 3], vec![1.5f32, -0.5, 0.0, 1.0, 0.0, 0.0]);
        assert!(cross_entropy(&x, Targets::Soft(&q), 0.0).is_err());
        assert!(cross_entropy(&x, Targets::Hard(&[0, 1]), 1.5).is_err());
    }

    #[test]
    fn prediction_is_argmax_of_the_sum_over_time() {
        // step 0 favours class 0, step 1 favours class 2 more strongly: the sum picks class 2
        let o0 = from_vec(&[2, 3], vec![3.0f32, 0.0, 1.0, 0.0, 2.0, 0.0]);
        let o1 = from_vec(&[2, 3], vec![0.0f32, 0.0, 2.5, 0.0, 0.0, 1.0]);
        assert_eq!(argmax(&o0).unwrap(), vec![0, 1]);
        assert_eq!(predict(&[o0.clone(), o1.clone()]).unwrap(), vec![2, 1]);
        let s = sum_over_time(&[o0.clone(), o1.clone()]).unwrap();
        assert_eq!(s.as_slice().unwrap(), &[3.0, 0.0, 3.5, 0.0, 2.0, 1.0]);
        assert_eq!(correct(&s, &[2, 0]).unwrap(), 1);
        assert!((accuracy(&s, &[2, 1]).unwrap() - 1.0).abs() < 1e-12);
        // ties go to the first class; NaN never wins
        let t = from_vec(&[2, 3], vec![1.0f32, 1.0, 0.0, f32::NAN, 0.5, 0.7]);
        assert_eq!(argmax(&t).unwrap(), vec![0, 2]);
        // errors
        assert!(sum_over_time::<f32>(&[]).is_err());
        assert!(sum_over_time(&[o0.clone(), zeros(&[2, 4])]).is_err());
        assert!(accuracy(&o0, &[0]).is_err());
    }
}
