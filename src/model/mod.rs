//! Models: composition of layers over one time-step ([`Sequential`], [`Residual`]) and the model zoo.
//!
//! Composite layers are layers too: their [`State`] and [`Cache`] hold their children's, so the
//! trainer sees a network as one layer and the time loop stays in `train/` and `infer/`.

pub mod blocks;
pub mod config;
pub mod zoo;
pub use blocks::{BasicBlock, BlockSpec, SecaMode};
pub use config::SpikeQuantConfig;
pub use config::{ArchOptions, ModelConfig, NeuronKind, Parallel, Stem};

use crate::error::Result;
use crate::layers::{Cache, Facts, Layer, Param, State, StepCtx};
use crate::tensor::{Real, Tensor};

/// Layers applied in order.
pub struct Sequential<R: Real> {
    name: String,
    /// The layers.
    pub layers: Vec<Box<dyn Layer<R>>>,
    /// Per-layer (forward, backward) seconds, accumulated when profiling is on.
    pub profile: Option<Vec<(f64, f64)>>,
    /// What the input guarantees ([`Layer::set_input_facts`]).
    input_facts: Facts,
}

/// Caches of a composite layer's children (reused step after step).
#[derive(Default)]
pub struct ChildCaches {
    caches: Vec<Cache>,
}
crate::impl_cache!(ChildCaches { caches });

impl ChildCaches {
    /// The first `n` child caches, created empty when missing.
    pub fn resize(&mut self, n: usize) -> &mut [Cache] {
        self.caches.resize_with(n, Cache::new);
        &mut self.caches[..n]
    }
    /// Child cache `i`.
    pub fn get(&self, i: usize) -> &Cache {
        &self.caches[i]
    }
}

impl<R: Real> Sequential<R> {
    /// An empty sequence.
    pub fn new(name: &str) -> Self {
        Sequential {
            name: name.to_string(),
            layers: Vec::new(),
            profile: None,
            input_facts: Facts::default(),
        }
    }
    /// Append a layer.
    pub fn push(&mut self, layer: impl Layer<R> + 'static) -> &mut Self {
        self.layers.push(Box::new(layer));
        self
    }
    /// Append a boxed layer.
    pub fn push_boxed(&mut self, layer: Box<dyn Layer<R>>) -> &mut Self {
        self.layers.push(layer);
        self
    }
    /// Start (or restart) accumulating per-layer forward/backward time.
    pub fn enable_profile(&mut self) {
        self.profile = Some(vec![(0.0, 0.0); self.layers.len()]);
    }
    /// Per-layer time as `name: forward ms / backward ms` lines.
    pub fn profile_report(&self) -> String {
        let Some(p) = &self.profile else {
            return String::new();
        };
        let total: f64 = p.iter().map(|x| x.0 + x.1).sum();
        let mut s = String::new();
        for (l, (f, b)) in self.layers.iter().zip(p) {
            s += &format!(
                "{:<10} {:<12} forward {:>9.1} ms  backward {:>9.1} ms  ({:>4.1}%)\n",
                l.name(),
                l.kind(),
                f * 1e3,
                b * 1e3,
                100.0 * (f + b) / total.max(1e-12)
            );
        }
        s
    }
    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }
    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
    /// One line per layer: name, description and output shape, for `empf info`.
    pub fn summary(&self, input: &[usize]) -> Result<Vec<(String, String, Vec<usize>)>> {
        let mut shape = input.to_vec();
        let mut out = Vec::new();
        for l in &self.layers {
            shape = l.output_shape(&shape)?;
            out.push((l.name().to_string(), l.describe(), shape.clone()));
        }
        Ok(out)
    }
}

impl<R: Real> Layer<R> for Sequential<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Sequential"
    }
    fn describe(&self) -> String {
        format!("Sequential({} layers)", self.layers.len())
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let mut s = input.to_vec();
        for l in &self.layers {
            s = l.output_shape(&s)?;
        }
        Ok(s)
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let n = self.layers.len();
        // each child learns what its input guarantees (cheap; robust to `layers` being edited)
        let mut facts = self.input_facts;
        for l in &mut self.layers {
            l.set_input_facts(facts);
            facts = l.output_facts(facts);
        }
        let states = state.children_mut(n);
        let mut caches = cache.map(|c| c.get_or_default::<ChildCaches>().resize(n));
        let mut cur: Option<Tensor<R>> = None;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let input = cur.as_ref().unwrap_or(x);
            let c = caches.as_mut().map(|cs| &mut cs[i]);
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            cur = Some(l.forward(input, ctx, &mut states[i], c)?);
            if let (Some(p), Some(t0)) = (self.profile.as_mut(), t0) {
                p[i].0 += t0.elapsed().as_secs_f64();
            }
        }
        Ok(cur.unwrap_or_else(|| x.clone()))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let n = self.layers.len();
        let caches = cache.get::<ChildCaches>(&self.name)?;
        let dstates = dstate.children_mut(n);
        let mut g: Option<Tensor<R>> = None;
        for i in (0..n).rev() {
            let gi = g.as_ref().unwrap_or(dy);
            let t0 = self.profile.is_some().then(std::time::Instant::now);
            g = Some(self.layers[i].backward(gi, ctx, caches.get(i), &mut dstates[i])?);
            if let (Some(p), Some(t0)) = (self.profile.as_mut(), t0) {
                p[i].1 += t0.elapsed().as_secs_f64();
            }
        }
        Ok(g.unwrap_or_else(|| dy.clone()))
    }
    fn output_facts(&self, input: Facts) -> Facts {
        self.layers.iter().fold(input, |f, l| l.output_facts(f))
    }
    fn set_input_facts(&mut self, facts: Facts) {
        self.input_facts = facts;
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        for l in &mut self.layers {
            l.visit_params(f);
        }
    }
}

/// A residual connection: `out = body(x) + shortcut(x)`, the shortcut being the identity when absent.
pub struct Residual<R: Real> {
    name: String,
    /// Main branch.
    pub body: Sequential<R>,
    /// Projection shortcut (e.g. BN(BConv1x1 stride s)), identity when `None`.
    pub shortcut: Option<Sequential<R>>,
}

impl<R: Real> Residual<R> {
    /// A residual block.
    pub fn new(name: &str, body: Sequential<R>, shortcut: Option<Sequential<R>>) -> Self {
        Residual {
            name: name.to_string(),
            body,
            shortcut,
        }
    }
}

impl<R: Real> Layer<R> for Residual<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Residual"
    }
    fn describe(&self) -> String {
        format!(
            "Residual(body {} layers, {} shortcut)",
            self.body.len(),
            if self.shortcut.is_some() {
                "projection"
            } else {
                "identity"
            }
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let a = self.body.output_shape(input)?;
        let b = match &self.shortcut {
            Some(s) => s.output_shape(input)?,
            None => input.to_vec(),
        };
        if a != b {
            return Err(crate::Error::shape(
                &self.name,
                format!("body output {a:?} and shortcut output {b:?} must match"),
                input,
            ));
        }
        Ok(a)
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let states = state.children_mut(2);
        let mut caches = cache.map(|c| c.get_or_default::<ChildCaches>().resize(2));
        let (s0, s1) = states.split_at_mut(1);
        let mut y = self
            .body
            .forward(x, ctx, &mut s0[0], caches.as_mut().map(|c| &mut c[0]))?;
        match &mut self.shortcut {
            Some(s) => {
                let z = s.forward(x, ctx, &mut s1[0], caches.as_mut().map(|c| &mut c[1]))?;
                if z.shape() != y.shape() {
                    return Err(crate::Error::shape(
                        &self.name,
                        format!("shortcut output {:?} must match body output", z.shape()),
                        y.shape(),
                    ));
                }
                y += &z;
            }
            None => {
                if x.shape() != y.shape() {
                    return Err(crate::Error::shape(
                        &self.name,
                        format!(
                            "identity shortcut needs the body to keep the shape {:?}",
                            x.shape()
                        ),
                        y.shape(),
                    ));
                }
                y += x;
            }
        }
        Ok(y)
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let caches = cache.get::<ChildCaches>(&self.name)?;
        let dstates = dstate.children_mut(2);
        let (d0, d1) = dstates.split_at_mut(1);
        let mut dx = self.body.backward(dy, ctx, caches.get(0), &mut d0[0])?;
        match &mut self.shortcut {
            Some(s) => dx += &s.backward(dy, ctx, caches.get(1), &mut d1[0])?,
            None => dx += dy,
        }
        Ok(dx)
    }
    fn set_input_facts(&mut self, facts: Facts) {
        // dL/dx is the sum of the branches' input gradients: where x = 0 and its gradient is
        // ignored, both may hold anything
        self.body.set_input_facts(facts);
        if let Some(s) = &mut self.shortcut {
            s.set_input_facts(facts);
        }
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        self.body.visit_params(f);
        if let Some(s) = &mut self.shortcut {
            s.visit_params(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_unrolled};
    use crate::layers::{GradMode, Linear};
    use crate::rng::Rng;
    use crate::tensor::from_vec;

    /// A network of EM-PF neurons, pooling and binary convs tells each conv what its input
    /// guarantees (`Facts`): a conv after a neuron (directly or through an average pool) computes
    /// its input gradient at the non-zero spikes only, one after a LIF neuron or at the network's
    /// input does not; every parameter gradient, and `dL/dx` at the network's input, equals the
    /// all-GEMM network's to rounding, over two online steps and in BPTT.
    #[test]
    fn facts_reach_the_binary_convs_and_keep_every_gradient() {
        use crate::layers::{
            AvgPool2d, BatchNorm, BinaryConv2d, BinaryInit, ConvSpec, EmpfV1, Facts, Lif,
        };
        if !empf_simd::Simd::global().sparse_dw_is_native() {
            eprintln!("SKIPPED: no hardware FMA, the GEMM path is taken");
            return;
        }
        let build = |sparse: bool| {
            let mut rng = Rng::new(21);
            let mut net = Sequential::<f32>::new("net");
            let conv = |name: &str, cin, cout, rng: &mut Rng| {
                let mut c = BinaryConv2d::<f32>::new(
                    name,
                    ConvSpec::new(cin, cout, 3).padding(1),
                    BinaryInit::Kaiming,
                    rng,
                );
                c.set_sparse(sparse);
                c
            };
            net.push(conv("c0", 3, 8, &mut rng));
            net.push(BatchNorm::<f32>::new("bn0", 8));
            net.push(EmpfV1::<f32>::new("sn0", 2));
            net.push(conv("c1", 8, 16, &mut rng));
            net.push(BatchNorm::<f32>::new("bn1", 16));
            net.push(EmpfV1::<f32>::new("sn1", 2));
            net.push(AvgPool2d::new("p1", 2, 2, 0).unwrap());
            net.push(conv("c2", 16, 16, &mut rng));
            net.push(Lif::<f32>::new("lif"));
            net.push(conv("c3", 16, 8, &mut rng));
            net
        };
        assert_eq!(build(true).output_facts(Facts::default()), Facts::default());
        let mut rng = Rng::new(22);
        let xs: Vec<Tensor<f32>> = (0..2)
            .map(|_| {
                from_vec(
                    &[4, 3, 8, 8],
                    (0..768).map(|_| rng.normal() as f32).collect(),
                )
            })
            .collect();
        for mode in [GradMode::Online, GradMode::Bptt] {
            let mut grads = Vec::new();
            for sparse in [false, true] {
                let mut net = build(sparse);
                let (mut state, mut caches) = (State::Empty, vec![Cache::new(), Cache::new()]);
                let mut dxs = Vec::new();
                for (t, x) in xs.iter().enumerate() {
                    let ctx = StepCtx::train(t, 2, mode);
                    let y = net
                        .forward(x, &ctx, &mut state, Some(&mut caches[t]))
                        .unwrap();
                    if mode == GradMode::Online {
                        let dy = y.mapv(|v| (v * 3.1).sin());
                        dxs.push(
                            net.backward(&dy, &ctx, &caches[t], &mut State::Empty)
                                .unwrap(),
                        );
                    }
                }
                if mode == GradMode::Bptt {
                    let mut dstate = State::Empty;
                    for t in (0..2).rev() {
                        let ctx = StepCtx::train(t, 2, mode);
                        let dy = from_vec(
                            &[4, 8, 4, 4],
                            (0..512)
                                .map(|i| (i as f32 * 0.3 + t as f32).sin())
                                .collect(),
                        );
                        dxs.push(net.backward(&dy, &ctx, &caches[t], &mut dstate).unwrap());
                    }
                }
                let facts: Vec<bool> = net
                    .layers
                    .iter()
                    .filter_map(|l| l.as_any()?.downcast_ref::<BinaryConv2d<f32>>())
                    .map(|c| c.input_grad_at_nonzero())
                    .collect();
                assert_eq!(facts, [false, true, true, false], "which convs were told");
                let mut g = Vec::new();
                net.visit_params(&mut |p| g.push((p.name.clone(), p.grad.clone())));
                grads.push((g, dxs));
            }
            let ((g0, dx0), (g1, dx1)) = (&grads[0], &grads[1]);
            for ((name, a), (_, b)) in g0.iter().zip(g1) {
                let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                for (u, v) in a.iter().zip(b.iter()) {
                    assert!(
                        (u - v).abs() <= 2e-4 * scale,
                        "{name} ({mode:?}): {u} vs {v}"
                    );
                }
            }
            for (a, b) in dx0.iter().zip(dx1) {
                let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                for (u, v) in a.iter().zip(b.iter()) {
                    assert!(
                        (u - v).abs() <= 2e-4 * scale,
                        "dL/dx ({mode:?}): {u} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn sequential_and_residual_backward_match_finite_differences() {
        let mut rng = Rng::new(11);
        let mut body = Sequential::new("body");
        body.push(Linear::<f64>::new("body.fc1", 5, 7, true, &mut rng));
        body.push(Linear::<f64>::new("body.fc2", 7, 5, true, &mut rng));
        let mut sc = Sequential::new("sc");
        sc.push(Linear::<f64>::new("sc.fc", 5, 5, false, &mut rng));
        let mut net = Sequential::new("net");
        net.push(Residual::new("res1", body, None));
        let mut body2 = Sequential::new("b2");
        body2.push(Linear::<f64>::new("b2.fc", 5, 5, true, &mut rng));
        net.push(Residual::new("res2", body2, Some(sc)));
        net.push(Linear::<f64>::new("head", 5, 3, true, &mut rng));
        let xs: Vec<_> = (0..2)
            .map(|_| from_vec(&[3, 5], (0..15).map(|_| rng.normal()).collect()))
            .collect();
        for mode in [GradMode::Online, GradMode::Bptt] {
            let opts = GradCheckOpts::default();
            check_unrolled(&mut net, &xs, true, mode, &opts)
                .unwrap()
                .assert_ok(&opts, "residual net");
        }
    }

    #[test]
    fn residual_shape_mismatch_is_an_error() {
        let mut rng = Rng::new(1);
        let mut body = Sequential::new("body");
        body.push(Linear::<f32>::new("body.fc", 4, 3, true, &mut rng));
        let mut r = Residual::new("res", body, None);
        let x = crate::tensor::zeros::<f32>(&[2, 4]);
        let e = r
            .forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("res"), "{e}");
    }
}
