//! Finite-difference gradient checks, usable by tests and by users on their own layers.
//!
//! Central differences in `f64` on the loss `L = Σ ⟨r, y⟩` with random `r` (so every output matters);
//! in BPTT mode one step's check adds `⟨q, state_after⟩` so the gradient with respect to the carried
//! state is checked as well. Small tensors are checked element by element (the full Jacobian-vector
//! rows), larger ones along random directions. A sample whose difference quotient changes when the
//! step is halved sits near a kink (ReLU, H(m − θ), sign, |W| = 1, max-pool ties): it is rejected and
//! counted, never silently passed.
//!
//! What is checked is the definition of each gradient:
//! * online: the derivative of one step's graph with the carried state `v[t−1]` held as an input,
//!   accumulated over the steps ([`check_unrolled`] with [`GradMode::Online`]);
//! * BPTT: the derivative of the unrolled `T`-step forward ([`check_unrolled`] with [`GradMode::Bptt`]).

use crate::error::Result;
use crate::layers::{Cache, GradMode, Layer, Param, State, StepCtx};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// A loss of (layer, per-step inputs, states before each step), as the finite differences see it.
type LossOf<'a> = dyn FnMut(&mut dyn Layer<f64>, &[Tensor<f64>], &[State<f64>]) -> Result<f64> + 'a;

/// Options of a gradient check.
#[derive(Clone, Debug)]
pub struct GradCheckOpts {
    /// Finite-difference step.
    pub h: f64,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance, relative to the largest gradient entry of the tensor (plus 1e-9).
    pub atol: f64,
    /// Tensors with at most this many entries are checked element by element.
    pub full_max: usize,
    /// Random directions checked for larger tensors.
    pub directions: usize,
    /// Seed of `r`, `q` and the directions.
    pub seed: u64,
    /// Parameter names (suffix match) not checked here (e.g. the latent weights under an STE).
    pub skip_params: Vec<String>,
    /// Check the gradient with respect to the input.
    pub check_input: bool,
    /// Largest fraction of samples that may be rejected as near a kink before the check fails.
    pub max_rejected_fraction: f64,
}

impl Default for GradCheckOpts {
    fn default() -> Self {
        GradCheckOpts {
            h: 1e-5,
            rtol: 1e-5,
            atol: 1e-7,
            full_max: 48,
            directions: 4,
            seed: 1,
            skip_params: Vec::new(),
            check_input: true,
            max_rejected_fraction: 0.1,
        }
    }
}

/// What a gradient check found.
#[derive(Clone, Debug, Default)]
pub struct GradCheckReport {
    /// Samples compared.
    pub checked: usize,
    /// Samples rejected as near a kink.
    pub rejected: usize,
    /// Largest error relative to the tolerance scale seen (≤ 1 means within tolerance).
    pub worst: f64,
    /// Human-readable failures (empty when the check passed).
    pub failures: Vec<String>,
}

impl GradCheckReport {
    /// Whether every sample agreed and few were rejected.
    pub fn passed(&self, opts: &GradCheckOpts) -> bool {
        self.failures.is_empty()
            && (self.rejected as f64)
                <= opts.max_rejected_fraction * (self.checked + self.rejected).max(1) as f64
    }
    /// Panic with the failures when the check did not pass (for tests).
    pub fn assert_ok(&self, opts: &GradCheckOpts, what: &str) {
        assert!(
            self.passed(opts),
            "gradient check `{what}` failed: checked {}, rejected {}, worst {:.3e}\n{}",
            self.checked,
            self.rejected,
            self.worst,
            self.failures
                .iter()
                .take(12)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    fn merge(&mut self, o: GradCheckReport) {
        self.checked += o.checked;
        self.rejected += o.rejected;
        self.worst = self.worst.max(o.worst);
        self.failures.extend(o.failures);
    }
}

fn random_like(t: &Tensor<f64>, rng: &mut Rng) -> Tensor<f64> {
    t.mapv(|_| rng.normal())
}

fn dot(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
    a.iter().zip(b.iter()).map(|(x, y)| x * y).sum()
}

fn state_dot(a: &State<f64>, b: &State<f64>) -> f64 {
    let mut va = Vec::new();
    a.visit_tensors(&mut |t| va.push(t.clone()));
    let mut i = 0;
    let mut s = 0.0;
    b.visit_tensors(&mut |t| {
        if let Some(x) = va.get(i) {
            s += dot(x, t);
        }
        i += 1;
    });
    s
}

/// Where a perturbation goes.
#[derive(Clone, Debug)]
enum Target {
    Input(usize),
    Param(String),
}

fn param_names(layer: &mut dyn Layer<f64>, skip: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    layer.visit_params(&mut |p: &mut Param<f64>| {
        if p.trainable() && !skip.iter().any(|s| p.name.ends_with(s.as_str())) {
            names.push(p.name.clone());
        }
    });
    names
}

fn with_param(layer: &mut dyn Layer<f64>, name: &str, f: &mut dyn FnMut(&mut Param<f64>)) {
    layer.visit_params(&mut |p: &mut Param<f64>| {
        if p.name == name {
            f(p)
        }
    });
}

fn zero_grads(layer: &mut dyn Layer<f64>) {
    layer.visit_params(&mut |p| {
        if p.trainable() {
            p.zero_grad()
        }
    });
}

/// Compare an analytic gradient tensor `g` against finite differences of `loss` along `target`.
#[allow(clippy::too_many_arguments)]
fn compare(
    what: &str,
    g: &Tensor<f64>,
    target: Target,
    len: usize,
    layer: &mut dyn Layer<f64>,
    inputs: &mut [Tensor<f64>],
    states: &mut [State<f64>],
    loss: &mut LossOf<'_>,
    opts: &GradCheckOpts,
    rng: &mut Rng,
) -> Result<GradCheckReport> {
    let mut rep = GradCheckReport::default();
    let gmax = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let scale = opts.atol * (gmax + 1e-2) + 1e-10;
    // directions: unit vectors for small tensors, random normal ones otherwise
    let dirs: Vec<Option<Tensor<f64>>> = if len <= opts.full_max {
        (0..len).map(|_| None).collect()
    } else {
        (0..opts.directions)
            .map(|_| Some(random_like(g, rng)))
            .collect()
    };
    for (k, dir) in dirs.iter().enumerate() {
        let analytic = match dir {
            None => g
                .as_slice()
                .map_or_else(|| g.iter().nth(k).copied().unwrap_or(0.0), |s| s[k]),
            Some(u) => dot(g, u),
        };
        let apply = |layer: &mut dyn Layer<f64>,
                     inputs: &mut [Tensor<f64>],
                     _states: &mut [State<f64>],
                     eps: f64| {
            let bump = |t: &mut Tensor<f64>| match dir {
                None => {
                    if let Some(v) = t.iter_mut().nth(k) {
                        *v += eps
                    }
                }
                Some(u) => t.zip_mut_with(u, |a, b| *a += eps * b),
            };
            match &target {
                Target::Input(i) => bump(&mut inputs[*i]),
                Target::Param(name) => with_param(layer, name, &mut |p| bump(&mut p.value)),
            }
        };
        let mut fd = |h: f64,
                      layer: &mut dyn Layer<f64>,
                      inputs: &mut [Tensor<f64>],
                      states: &mut [State<f64>]|
         -> Result<f64> {
            apply(layer, inputs, states, h);
            let lp = loss(layer, inputs, states);
            apply(layer, inputs, states, -2.0 * h);
            let lm = loss(layer, inputs, states);
            apply(layer, inputs, states, h);
            Ok((lp? - lm?) / (2.0 * h))
        };
        let d1 = fd(opts.h, layer, inputs, states)?;
        let d2 = fd(opts.h * 0.5, layer, inputs, states)?;
        if (d1 - d2).abs() > 1e-5 * (1.0 + d1.abs()) {
            rep.rejected += 1;
            continue;
        }
        rep.checked += 1;
        let tol = scale + opts.rtol * analytic.abs().max(d2.abs());
        let err = (analytic - d2).abs();
        rep.worst = rep.worst.max(err / tol);
        if err > tol {
            rep.failures.push(format!(
                "{what}[{}]: analytic {analytic:.9e} vs finite difference {d2:.9e} (|diff| {err:.2e} > tol {tol:.2e})",
                if dir.is_none() { k.to_string() } else { format!("dir{k}") }
            ));
        }
    }
    Ok(rep)
}

/// Check one time-step's backward: input, parameter and (BPTT) state gradients, with `state_before`
/// held fixed. Loss: `⟨r, y⟩`, plus `⟨q, state_after⟩` when `ctx.grad` is BPTT.
pub fn check_step(
    layer: &mut dyn Layer<f64>,
    x: &Tensor<f64>,
    ctx: &StepCtx,
    state_before: &State<f64>,
    opts: &GradCheckOpts,
) -> Result<GradCheckReport> {
    let mut rng = Rng::new(opts.seed);
    // analytic pass
    zero_grads(layer);
    let mut st = state_before.clone();
    let mut cache = Cache::new();
    let y = layer.forward(x, ctx, &mut st, Some(&mut cache))?;
    let r = random_like(&y, &mut rng);
    let bptt = ctx.grad == GradMode::Bptt;
    let mut q = st.clone();
    q.visit_tensors_mut(&mut |t| *t = random_like(t, &mut rng));
    let mut dstate = if bptt { q.clone() } else { State::Empty };
    let dx = layer.backward(&r, ctx, &cache, &mut dstate)?;
    let mut grads = Vec::new();
    let names = param_names(layer, &opts.skip_params);
    for n in &names {
        with_param(layer, n, &mut |p| grads.push(p.grad.clone()));
    }
    let ctx = *ctx;
    let mut loss =
        |layer: &mut dyn Layer<f64>, xs: &[Tensor<f64>], sts: &[State<f64>]| -> Result<f64> {
            let mut s = sts[0].clone();
            let y = layer.forward(&xs[0], &ctx, &mut s, None)?;
            let mut l = dot(&r, &y);
            if bptt {
                l += state_dot(&q, &s);
            }
            Ok(l)
        };
    let mut inputs = vec![x.clone()];
    let mut states = vec![state_before.clone()];
    let mut rep = GradCheckReport::default();
    if opts.check_input {
        rep.merge(compare(
            &format!("{} d/dx", layer.name()),
            &dx,
            Target::Input(0),
            x.len(),
            layer,
            &mut inputs,
            &mut states,
            &mut loss,
            opts,
            &mut rng,
        )?);
    }
    for (n, g) in names.iter().zip(&grads) {
        rep.merge(compare(
            &format!("d/d{n}"),
            g,
            Target::Param(n.clone()),
            g.len(),
            layer,
            &mut inputs,
            &mut states,
            &mut loss,
            opts,
            &mut rng,
        )?);
    }
    if bptt {
        let mut gs = Vec::new();
        dstate.visit_tensors(&mut |t| gs.push(t.clone()));
        let mut ss = Vec::new();
        state_before.visit_tensors(&mut |t| ss.push(t.clone()));
        if gs.len() != ss.len() {
            rep.failures.push(format!(
                "{}: backward returned {} state-gradient tensors for a state of {} tensors",
                layer.name(),
                gs.len(),
                ss.len()
            ));
        } else if !ss.is_empty() {
            let flat = |v: &[Tensor<f64>]| -> Tensor<f64> {
                let d: Vec<f64> = v.iter().flat_map(|t| t.iter().copied()).collect();
                let n = d.len();
                crate::tensor::from_vec(&[n], d)
            };
            let g = flat(&gs);
            // perturb the whole state along directions (or per element for small states)
            let mut rep2 = GradCheckReport::default();
            let len = g.len();
            if len <= opts.full_max {
                for k in 0..len {
                    let mut e = crate::tensor::zeros::<f64>(&[len]);
                    e[[k].as_ref()] = 1.0;
                    rep2.merge(state_dir(
                        layer, &inputs, &states[0], &g, &e, &mut loss, opts,
                    )?);
                }
            } else {
                for _ in 0..opts.directions {
                    let u = random_like(&g, &mut rng);
                    rep2.merge(state_dir(
                        layer, &inputs, &states[0], &g, &u, &mut loss, opts,
                    )?);
                }
            }
            rep.merge(rep2);
        }
    }
    Ok(rep)
}

fn state_dir(
    layer: &mut dyn Layer<f64>,
    inputs: &[Tensor<f64>],
    state: &State<f64>,
    g: &Tensor<f64>,
    u: &Tensor<f64>,
    loss: &mut LossOf<'_>,
    opts: &GradCheckOpts,
) -> Result<GradCheckReport> {
    let us = u.as_slice().expect("flat direction");
    let shifted = |eps: f64| {
        let mut s = state.clone();
        let mut off = 0;
        s.visit_tensors_mut(&mut |t| {
            for v in t.iter_mut() {
                *v += eps * us[off];
                off += 1;
            }
        });
        s
    };
    let mut fd = |h: f64| -> Result<f64> {
        let lp = loss(layer, inputs, &[shifted(h)])?;
        let lm = loss(layer, inputs, &[shifted(-h)])?;
        Ok((lp - lm) / (2.0 * h))
    };
    let d1 = fd(opts.h)?;
    let d2 = fd(opts.h * 0.5)?;
    let mut rep = GradCheckReport::default();
    if (d1 - d2).abs() > 1e-5 * (1.0 + d1.abs()) {
        rep.rejected = 1;
        return Ok(rep);
    }
    rep.checked = 1;
    let analytic = dot(g, u);
    let gmax = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let tol = opts.atol * (gmax + 1e-2) * (u.len() as f64).sqrt()
        + 1e-10
        + opts.rtol * analytic.abs().max(d2.abs());
    let err = (analytic - d2).abs();
    rep.worst = err / tol;
    if err > tol {
        rep.failures.push(format!(
            "{} d/dstate: analytic {analytic:.9e} vs finite difference {d2:.9e}",
            layer.name()
        ));
    }
    Ok(rep)
}

/// Check the gradient of a `T`-step run (`xs[t]` is the input of step `t`, state starting empty).
///
/// * BPTT: analytic gradients from backward through time against finite differences of the unrolled
///   loss `Σ_t ⟨r_t, y_t⟩`, for every parameter and every step's input.
/// * Online: the accumulated per-step gradients against the sum over `t` of finite differences of
///   `⟨r_t, y_t⟩` with the state before step `t` held fixed (the online gradient's definition).
pub fn check_unrolled(
    layer: &mut dyn Layer<f64>,
    xs: &[Tensor<f64>],
    train: bool,
    grad: GradMode,
    opts: &GradCheckOpts,
) -> Result<GradCheckReport> {
    let steps = xs.len();
    let ctx = |t: usize| StepCtx {
        t,
        steps,
        train,
        grad,
    };
    let mut rng = Rng::new(opts.seed);
    zero_grads(layer);
    // forward with caches, remembering the state before each step
    let mut st = State::Empty;
    let mut caches: Vec<Cache> = (0..steps).map(|_| Cache::new()).collect();
    let mut before = Vec::with_capacity(steps);
    let mut rs = Vec::with_capacity(steps);
    for t in 0..steps {
        before.push(st.clone());
        let y = layer.forward(&xs[t], &ctx(t), &mut st, Some(&mut caches[t]))?;
        rs.push(random_like(&y, &mut rng));
    }
    let mut dxs = vec![Tensor::<f64>::zeros(ndarray::IxDyn(&[0])); steps];
    match grad {
        GradMode::Bptt => {
            let mut dstate = State::Empty;
            for t in (0..steps).rev() {
                dxs[t] = layer.backward(&rs[t], &ctx(t), &caches[t], &mut dstate)?;
            }
        }
        GradMode::Online => {
            for t in 0..steps {
                let mut dstate = State::Empty;
                dxs[t] = layer.backward(&rs[t], &ctx(t), &caches[t], &mut dstate)?;
            }
        }
    }
    drop(caches);
    let names = param_names(layer, &opts.skip_params);
    let mut grads = Vec::new();
    for n in &names {
        with_param(layer, n, &mut |p| grads.push(p.grad.clone()));
    }
    let mut loss =
        |layer: &mut dyn Layer<f64>, xs: &[Tensor<f64>], sts: &[State<f64>]| -> Result<f64> {
            let mut l = 0.0;
            match grad {
                GradMode::Bptt => {
                    let mut s = State::Empty;
                    for t in 0..steps {
                        let y = layer.forward(&xs[t], &ctx(t), &mut s, None)?;
                        l += dot(&rs[t], &y);
                    }
                }
                GradMode::Online => {
                    for t in 0..steps {
                        let mut s = sts[t].clone();
                        let y = layer.forward(&xs[t], &ctx(t), &mut s, None)?;
                        l += dot(&rs[t], &y);
                    }
                }
            }
            Ok(l)
        };
    let mut inputs: Vec<Tensor<f64>> = xs.to_vec();
    let mut states = before;
    let mut rep = GradCheckReport::default();
    for (n, g) in names.iter().zip(&grads) {
        rep.merge(compare(
            &format!("d/d{n}"),
            g,
            Target::Param(n.clone()),
            g.len(),
            layer,
            &mut inputs,
            &mut states,
            &mut loss,
            opts,
            &mut rng,
        )?);
    }
    if opts.check_input && grad == GradMode::Bptt {
        for (t, dx) in dxs.iter().enumerate() {
            let dx = dx.clone();
            rep.merge(compare(
                &format!("{} d/dx[{t}]", layer.name()),
                &dx,
                Target::Input(t),
                dx.len(),
                layer,
                &mut inputs,
                &mut states,
                &mut loss,
                opts,
                &mut rng,
            )?);
        }
    }
    Ok(rep)
}

/// A layer whose backward is replaced by `backward(inner, dy, ctx, cache, dstate)`, forward and
/// parameters delegated to `inner`: the way to show that a gradient check can fail (tamper with one
/// term of a correct backward and the check must report it).
pub struct Tampered<L, F> {
    /// The real layer.
    pub inner: L,
    /// The replacement backward.
    pub backward: F,
}

impl<L, F> Layer<f64> for Tampered<L, F>
where
    L: Layer<f64>,
    F: FnMut(&mut L, &Tensor<f64>, &StepCtx, &Cache, &mut State<f64>) -> Result<Tensor<f64>>
        + Send
        + Sync,
{
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kind(&self) -> &'static str {
        "Tampered"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.inner.output_shape(input)
    }
    fn forward(
        &mut self,
        x: &Tensor<f64>,
        ctx: &StepCtx,
        state: &mut State<f64>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<f64>> {
        self.inner.forward(x, ctx, state, cache)
    }
    fn backward(
        &mut self,
        dy: &Tensor<f64>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<f64>,
    ) -> Result<Tensor<f64>> {
        (self.backward)(&mut self.inner, dy, ctx, cache, dstate)
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<f64>)) {
        self.inner.visit_params(f)
    }
}

/// Assert that an f32 run of a layer agrees with its f64 run to `rtol` of the largest f64 output
/// (the same generic code at both precisions: a check that nothing depends on the float type).
pub fn assert_f32_matches_f64(y64: &Tensor<f64>, y32: &Tensor<f32>, rtol: f64) {
    assert_eq!(
        y64.shape(),
        y32.shape(),
        "f32 and f64 outputs differ in shape"
    );
    let scale = y64.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (a, b) in y64.iter().zip(y32.iter()) {
        assert!((a - *b as f64).abs() <= rtol * scale, "f64 {a} vs f32 {b}");
    }
}
