//! Layers: each with a forward over one time-step and a hand-derived backward that *accumulates*
//! parameter gradients (`+=`; zeroing is separate).
//!
//! The contract every layer follows (see `DESIGN.md`):
//! * A layer sees one time-step. What it carries from step `t-1` to step `t` (membrane potential)
//!   is its [`State`], owned by the caller (the network / trainer) and reset per batch.
//! * What its backward needs is written into a [`Cache`] owned by the caller. The online trainer keeps
//!   one cache per layer and reuses it every step; BPTT keeps one per step; steps that need no
//!   gradient pass `None` and keep nothing.
//! * `backward` receives `dL/dy[t]` and, in [`GradMode::Bptt`], `dL/dstate[t]` (the gradient flowing
//!   back from step `t+1`) in `dstate`; it returns `dL/dx[t]`, replaces `dstate` with
//!   `dL/dstate[t-1]`, and adds parameter gradients into each [`Param::grad`]. In
//!   [`GradMode::Online`] the residual potential is detached: `dstate` comes in empty and the layer
//!   need not fill it.

use crate::error::{Error, Result};
use crate::tensor::{Real, Tensor, zeros};
use ndarray::IxDyn;
use std::any::Any;

pub mod batchnorm;
pub mod binary;
pub mod conv;
pub mod linear;
pub mod neuron;
pub use batchnorm::BatchNorm;
pub use binary::{BinaryConv2d, BinaryInit, BinaryLinear};
pub use conv::{Conv2d, ConvSpec};
pub use linear::Linear;
pub use neuron::{EmpfFolded, EmpfV1, EmpfV2, EmpfV3, Lif};
pub mod misc;
pub mod pool;
pub mod quant;
pub mod seca;
pub use misc::Flatten;
pub use pool::{AvgPool2d, GlobalAvgPool, MaxPool2d};
pub use quant::SpikeQuant;
pub use seca::Seca;

/// How gradients flow through time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GradMode {
    /// Online training: charging uses `sg(v[t-1])`, each step's graph stands alone (EMPF.md §1).
    Online,
    /// Back-propagation through time over the full temporal graph.
    Bptt,
}

/// Everything a layer needs to know about the step it is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepCtx {
    /// Time-step index, `0..T` (per-step parameters such as λ[t] are indexed by it).
    pub t: usize,
    /// Total number of time-steps `T` of this run.
    pub steps: usize,
    /// Training mode (BatchNorm uses batch statistics and updates running statistics).
    pub train: bool,
    /// Gradient mode of the backward pass.
    pub grad: GradMode,
}

impl StepCtx {
    /// Training context for step `t` of `steps`.
    pub fn train(t: usize, steps: usize, grad: GradMode) -> Self {
        StepCtx {
            t,
            steps,
            train: true,
            grad,
        }
    }
    /// Evaluation context for step `t` of `steps`.
    pub fn eval(t: usize, steps: usize) -> Self {
        StepCtx {
            t,
            steps,
            train: false,
            grad: GradMode::Online,
        }
    }
}

/// What a parameter is, which decides weight decay and whether the optimiser touches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Synaptic / linear / conv weights (weight decay applies by default).
    Weight,
    /// Latent weights of a binary synaptic layer (deployed as 1 bit + α per channel; weight decay applies).
    BinaryWeight,
    /// Biases (no weight decay by default).
    Bias,
    /// BatchNorm affine γ, β (no weight decay by default).
    Norm,
    /// Neuron parameters: a[t] (λ), b[t] (θ), c[t] (α1), d[t] (α2) (no weight decay by default).
    Neuron,
    /// Non-trained buffers saved in checkpoints (BatchNorm running mean/var).
    Buffer,
}

/// A named parameter with its gradient of the same shape.
///
/// Names are stable, dot-separated paths (`block1.conv2.weight`, `lif3.a`): they are checkpoint keys.
#[derive(Clone, Debug)]
pub struct Param<R: Real> {
    /// Stable name (checkpoint key).
    pub name: String,
    /// What it is.
    pub kind: ParamKind,
    /// The value.
    pub value: Tensor<R>,
    /// The accumulated gradient (same shape as `value`; empty for buffers).
    pub grad: Tensor<R>,
}

impl<R: Real> Param<R> {
    /// A trainable parameter with a zero gradient.
    pub fn new(name: impl Into<String>, kind: ParamKind, value: Tensor<R>) -> Self {
        let grad = if kind == ParamKind::Buffer {
            zeros(&[0])
        } else {
            Tensor::zeros(value.raw_dim())
        };
        Param {
            name: name.into(),
            kind,
            value,
            grad,
        }
    }
    /// Whether the optimiser updates it.
    pub fn trainable(&self) -> bool {
        self.kind != ParamKind::Buffer
    }
    /// Set the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.fill(R::zero());
    }
}

/// Per-layer state carried from one time-step to the next (the residual membrane potential v[t-1]).
/// `Empty` means "zero" (v[0] = 0) or "no state"; composite layers hold their children's states.
#[derive(Clone, Debug, Default)]
pub enum State<R: Real> {
    /// No state, or a state equal to zero.
    #[default]
    Empty,
    /// A single tensor.
    Tensor(Tensor<R>),
    /// The states of a composite layer's children, in order.
    Children(Vec<State<R>>),
}

impl<R: Real> State<R> {
    /// The tensor, if any.
    pub fn tensor(&self) -> Option<&Tensor<R>> {
        match self {
            State::Tensor(t) => Some(t),
            _ => None,
        }
    }
    /// Take the tensor out (leaving `Empty`).
    pub fn take_tensor(&mut self) -> Option<Tensor<R>> {
        match std::mem::take(self) {
            State::Tensor(t) => Some(t),
            other => {
                *self = other;
                None
            }
        }
    }
    /// The children of a composite state, created as `n` empties when missing.
    pub fn children_mut(&mut self, n: usize) -> &mut Vec<State<R>> {
        if !matches!(self, State::Children(c) if c.len() == n) {
            *self = State::Children(vec![State::Empty; n]);
        }
        match self {
            State::Children(c) => c,
            _ => unreachable!(),
        }
    }
    /// Visit every tensor in the state (depth first), mutably.
    pub fn visit_tensors_mut(&mut self, f: &mut dyn FnMut(&mut Tensor<R>)) {
        match self {
            State::Empty => {}
            State::Tensor(t) => f(t),
            State::Children(c) => c.iter_mut().for_each(|s| s.visit_tensors_mut(f)),
        }
    }
    /// Visit every tensor in the state (depth first).
    pub fn visit_tensors(&self, f: &mut dyn FnMut(&Tensor<R>)) {
        match self {
            State::Empty => {}
            State::Tensor(t) => f(t),
            State::Children(c) => c.iter().for_each(|s| s.visit_tensors(f)),
        }
    }
    /// Bytes held by the state's tensors.
    pub fn bytes(&self) -> usize {
        let mut n = 0;
        self.visit_tensors(&mut |t| n += t.len() * std::mem::size_of::<R>());
        n
    }
}

/// Type-erased storage for what a layer's backward needs. Owned by the caller; the layer creates
/// its concrete cache type on first use and reuses its allocations on later steps.
#[derive(Default)]
pub struct Cache {
    inner: Option<Box<dyn CacheData>>,
}

/// A concrete cache type: reports the bytes it holds (the online-memory claim is checked with it).
pub trait CacheData: Any + Send + Sync {
    /// Bytes held by this cache (tensors and vectors; not counting the small struct itself).
    fn bytes(&self) -> usize;
    /// Upcast for downcasting.
    fn as_any(&self) -> &dyn Any;
    /// Upcast for downcasting.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Implement [`CacheData`] for a struct whose fields are tensors, vectors, nested caches or
/// `Option`s of those, listing the fields that hold memory.
#[macro_export]
macro_rules! impl_cache {
    ($ty:ident<R> { $($field:ident),* $(,)? }) => {
        impl<R: $crate::tensor::Real> $crate::layers::CacheData for $ty<R> {
            fn bytes(&self) -> usize {
                0 $(+ $crate::layers::CacheBytes::cache_bytes(&self.$field))*
            }
            fn as_any(&self) -> &dyn ::std::any::Any { self }
            fn as_any_mut(&mut self) -> &mut dyn ::std::any::Any { self }
        }
    };
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl $crate::layers::CacheData for $ty {
            fn bytes(&self) -> usize {
                0 $(+ $crate::layers::CacheBytes::cache_bytes(&self.$field))*
            }
            fn as_any(&self) -> &dyn ::std::any::Any { self }
            fn as_any_mut(&mut self) -> &mut dyn ::std::any::Any { self }
        }
    };
}

/// Bytes held by a cached value (see [`impl_cache!`]).
pub trait CacheBytes {
    /// Heap bytes.
    fn cache_bytes(&self) -> usize;
}
impl<A: Clone, D: ndarray::Dimension> CacheBytes for ndarray::Array<A, D> {
    fn cache_bytes(&self) -> usize {
        self.len() * std::mem::size_of::<A>()
    }
}
impl<T: Copy> CacheBytes for Vec<T> {
    fn cache_bytes(&self) -> usize {
        self.len() * std::mem::size_of::<T>()
    }
}
impl<T: CacheBytes> CacheBytes for Option<T> {
    fn cache_bytes(&self) -> usize {
        self.as_ref().map_or(0, |x| x.cache_bytes())
    }
}
impl CacheBytes for Cache {
    fn cache_bytes(&self) -> usize {
        self.bytes()
    }
}
impl CacheBytes for Vec<Cache> {
    fn cache_bytes(&self) -> usize {
        self.iter().map(|c| c.bytes()).sum()
    }
}
impl<R: Real> CacheBytes for State<R> {
    fn cache_bytes(&self) -> usize {
        self.bytes()
    }
}

impl Cache {
    /// An empty cache.
    pub fn new() -> Self {
        Cache { inner: None }
    }
    /// The layer's concrete cache, created with `Default` when absent or of another type.
    pub fn get_or_default<T: CacheData + Default>(&mut self) -> &mut T {
        let fresh = match &self.inner {
            Some(b) => !b.as_any().is::<T>(),
            None => true,
        };
        if fresh {
            self.inner = Some(Box::new(T::default()));
        }
        self.inner
            .as_mut()
            .and_then(|b| b.as_any_mut().downcast_mut::<T>())
            .expect("cache type just set")
    }
    /// The layer's concrete cache for backward; an error naming the layer when forward did not fill it.
    pub fn get<T: CacheData>(&self, layer: &str) -> Result<&T> {
        self.inner
            .as_ref()
            .and_then(|b| b.as_any().downcast_ref::<T>())
            .ok_or_else(|| {
                Error::Internal(format!(
                    "layer `{layer}`: backward called without a cache from its forward"
                ))
            })
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.as_ref().map_or(0, |b| b.bytes())
    }
    /// Drop the contents.
    pub fn clear(&mut self) {
        self.inner = None;
    }
}

/// What is known of the values of a tensor between two layers, so that a backward may skip work
/// (see [`Layer::output_facts`]). The default knows nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Every value is `≥ 0` (spikes `ReLU(m − θ)`, and their averages).
    pub nonneg: bool,
    /// The backward of whatever produced the tensor ignores the gradient where a value is zero
    /// (an EM-PF neuron: `ds/dm = H(m − θ)`, zero exactly where `s = 0`), so a consumer may return
    /// anything there: [`BinaryConv2d`] then computes its input gradient at the non-zero inputs
    /// only.
    pub grad_ignored_at_zero: bool,
}

impl Facts {
    /// The output of an EM-PF neuron (`s = ReLU(m − θ)`, backward through `H(m − θ)` only).
    pub const EMPF_SPIKES: Facts = Facts {
        nonneg: true,
        grad_ignored_at_zero: true,
    };
    /// What a pooling layer (average or maximum over windows) keeps of its input's facts: a
    /// pooled value of non-negative inputs is zero only when its whole window is, whose gradient
    /// is then ignored too.
    pub fn pooled(input: Facts) -> Facts {
        Facts {
            nonneg: input.nonneg,
            grad_ignored_at_zero: input.nonneg && input.grad_ignored_at_zero,
        }
    }
}

/// One layer of a spiking network, over one time-step.
pub trait Layer<R: Real>: Send + Sync {
    /// Instance name (prefix of its parameter names), e.g. `conv2`.
    fn name(&self) -> &str;

    /// Kind, e.g. `BinaryConv2d`.
    fn kind(&self) -> &'static str;

    /// Output shape for an input shape, or a [`Error::Shape`] naming this layer and the shape.
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>>;

    /// Forward one time-step. `cache` is `Some` when a backward will follow.
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>>;

    /// Backward one time-step (see the module docs for `dstate`). Adds into parameter gradients.
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>>;

    /// Visit every parameter and buffer (mutably), in a stable order.
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>));

    /// A short description for `empf info` (kind and hyper-parameters).
    fn describe(&self) -> String {
        self.kind().to_string()
    }

    /// What this layer's output guarantees, given what its input does (default: nothing).
    /// Composites ([`crate::model::Sequential`]) pass the facts along to each child with
    /// [`Layer::set_input_facts`] before every forward.
    fn output_facts(&self, _input: Facts) -> Facts {
        Facts::default()
    }

    /// Told what its input guarantees, before a forward (default: ignored).
    fn set_input_facts(&mut self, _facts: Facts) {}

    /// The concrete layer, for walkers that need its type (the deployment exporter, `infer::export`).
    /// Layers that return `None` (the default) cannot be exported.
    fn as_any(&self) -> Option<&dyn Any> {
        None
    }
}

/// Check that `x` has `rank` dimensions (and, where `Some`, the given sizes); errors name the layer.
pub fn check_shape(layer: &str, x: &[usize], expect: &[Option<usize>], what: &str) -> Result<()> {
    let ok =
        x.len() == expect.len() && x.iter().zip(expect).all(|(&d, e)| e.is_none_or(|e| e == d));
    if ok && x.iter().all(|&d| d > 0) {
        Ok(())
    } else {
        Err(Error::shape(layer, format!("expected {what}"), x))
    }
}

/// Check that an output gradient has the shape of the step's output; the error names the layer.
pub fn check_grad_shape(layer: &str, dy: &[usize], out: &[usize]) -> Result<()> {
    if dy == out {
        Ok(())
    } else {
        Err(Error::shape(
            layer,
            format!("output gradient of shape {out:?}"),
            dy,
        ))
    }
}

/// Zero tensor shaped like `t`.
pub fn zeros_like<R: Real>(t: &Tensor<R>) -> Tensor<R> {
    Tensor::zeros(IxDyn(t.shape()))
}
