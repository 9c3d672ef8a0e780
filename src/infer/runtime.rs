//! The inference runtime: runs a [`Model`] over T steps with no training machinery.
//!
//! Execution is layer-major over time: an activation holds all `T` steps at once (`T·N` rows,
//! step-major), so convolutions, pools and Version III neurons run as one batched call over `T·N`,
//! and only stateful neurons (Version I / folded II, LIF) loop over `t` inside their op. Until the
//! first neuron the activation is the same at every step (direct encoding) and is kept once
//! (`N` rows): the stem runs once instead of `T` times.
//!
//! Precision of binary layers ([`Precision`]):
//! * `Float`: exact float spikes; f32 GEMM with ±1 weights, `α` (and the folded BN) in the epilogue.
//! * `Bits(k)`: the layer input is quantised to `q = clamp(round(x/step), 0, 2^k − 1)` and the layer
//!   runs the bit-serial AND-popcount kernels of `empf-simd` with `scale·step` in the epilogue.
//! * An input known to be binary spikes (LIF with Heaviside spikes) always takes the 1-bit kernels
//!   (exact).

use super::format::{ConvDims, Model, Op};
use crate::error::{Error, Result};
use crate::layers::conv::{ConvCore, ConvSpec};
use crate::layers::quant::{DEFAULT_STEP, level};
use crate::layers::{
    AvgPool2d, Flatten, GlobalAvgPool, Layer, MaxPool2d, Seca, State, StepCtx, check_shape,
};
use crate::tensor::{Tensor, as_slice, from_vec, gemm};
use empf_simd::{
    BinOp, Binarize, EmpfNeuron, Epilogue, PackedConvWeights, PackedMatrix, QuantConvWeights,
    SignConvWeights, Simd, SpikeOut,
};
use rayon::prelude::*;

/// How binary layers compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Float spikes, exact.
    Float,
    /// k-bit quantised spikes (k in 1..=8): binary convolutions on float-spike inputs sum the
    /// non-zero levels in 16-bit integer lanes (sparse kernel); binary inputs (LIF) and linear
    /// layers run the bit-serial popcount kernels. The results equal [`Precision::Popcount`]'s.
    Bits(u32),
    /// k-bit quantised spikes through the bit-serial popcount kernels for every binary layer.
    Popcount(u32),
}

impl Precision {
    /// k for k-bit precision.
    pub fn bits(self) -> Option<u32> {
        match self {
            Precision::Float => None,
            Precision::Bits(k) | Precision::Popcount(k) => Some(k),
        }
    }
    /// Parse `float`, `f32` or `k` / `kbit` / `k-bit` with k in 1..=8, optionally followed by
    /// `-popcount` (or `p`: `4p`).
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        if t == "float" || t == "f32" {
            return Ok(Precision::Float);
        }
        let (t, popcount) = match t.strip_suffix("popcount").or_else(|| t.strip_suffix('p')) {
            Some(rest) => (rest.trim_end_matches('-'), true),
            None => (t.as_str(), false),
        };
        let digits = t.trim_end_matches("bit").trim_end_matches('-');
        match digits.parse::<u32>() {
            Ok(k) if (1..=8).contains(&k) && popcount => Ok(Precision::Popcount(k)),
            Ok(k) if (1..=8).contains(&k) => Ok(Precision::Bits(k)),
            _ => Err(Error::Config(format!(
                "unknown precision `{s}` (expected float or 1..8, e.g. 4bit, or 4bit-popcount)"
            ))),
        }
    }
    /// `float` or `k-bit`.
    pub fn name(&self) -> String {
        match self {
            Precision::Float => "float".into(),
            Precision::Bits(k) => format!("{k}-bit"),
            Precision::Popcount(k) => format!("{k}-bit popcount"),
        }
    }
}

/// A prepared op.
enum Node {
    Conv {
        name: String,
        core: ConvCore<f32>,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    },
    BinConv {
        name: String,
        core: ConvCore<f32>,
        dims: ConvDims,
        sparse: SignConvWeights,
        packed: PackedConvWeights,
        /// The masks for k-bit levels (k-bit precision, float-spike input).
        levels: Option<Box<QuantConvWeights>>,
        binary_input: bool,
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Linear {
        name: String,
        in_f: usize,
        out_f: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    },
    BinLinear {
        name: String,
        in_f: usize,
        out_f: usize,
        pm1: Vec<f32>,
        packed: PackedMatrix,
        binary_input: bool,
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Affine {
        name: String,
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Empf {
        name: String,
        channels: usize,
        leak: Vec<f32>,
        threshold: Vec<f32>,
        input: Option<(Vec<f32>, Vec<f32>)>,
        /// A 2x2, stride-2 average pool of the spikes follows, fused in (see [`fuse_pools`]).
        pool: bool,
    },
    Parallel {
        threshold: Vec<f32>,
    },
    Lif {
        leak: f32,
        threshold: f32,
        gamma: f32,
        hard_reset: bool,
        smooth: bool,
    },
    /// A stateless layer of the library (pools, flatten, SECA), run step-free.
    Layer(Op),
    Residual {
        name: String,
        body: Vec<Node>,
        shortcut: Option<Vec<Node>>,
    },
    Quant {
        bits: u32,
        step: f32,
    },
    /// A k-bit `BinConv` and the `Empf` neuron after it, run by one fused kernel where it can
    /// (see [`fuse_conv_neurons`]), else one after the other.
    ConvEmpf {
        /// An EM-PF neuron (no pool) in front of the convolution, run inside its packing.
        pre: Option<Box<Node>>,
        conv: Box<Node>,
        empf: Box<Node>,
    },
}

/// An activation: `T·N` rows (step-major), or `N` rows equal at every step (`repeated`).
struct Act {
    x: Tensor<f32>,
    repeated: bool,
}

/// Input values (samples × steps × C·H·W) per group of samples run through the whole network
/// together (see [`Runtime::run`]).
const GROUP_VALUES: usize = 1 << 12;

/// One slice per time-step (of one sample's activations).
type StepSlices<'a> = Vec<&'a mut [f32]>;

/// Elements of a channel plane whose potentials one pass of [`EmpfItem`] keeps local over all T
/// steps (a few vector registers).
const EMPF_BLOCK: usize = 64;

/// One sample of an EM-PF neuron layer over all T steps (`ys[t]`: the `C x HW` inputs of step
/// `t`, overwritten by the spikes), compiled for the host's vector extension. The potentials of a
/// block of [`EMPF_BLOCK`] elements live in a local array through the T steps: no potential
/// buffer is allocated, zeroed or streamed.
struct EmpfItem<'a> {
    ys: StepSlices<'a>,
    /// The layer's channel of `ys`' first (the item's channels are `c0..`).
    c0: usize,
    hw: usize,
    /// λ per step and channel (`T x C`, or `T x 1` for one value for all channels).
    leak: &'a [f32],
    /// The folded input affine `(k, b)` per step and channel (Version II), if any.
    input: Option<(&'a [f32], &'a [f32])>,
    /// The threshold per step.
    th: &'a [f32],
    /// The fused 2x2, stride-2 average pool: its output per step (`C x H/2 x W/2`), `H`, `W` and
    /// the kernels.
    pool: Option<(StepSlices<'a>, usize, usize, Simd)>,
}

impl empf_simd::VectorWork for EmpfItem<'_> {
    type Output = std::result::Result<(), empf_simd::SimdError>;
    #[inline(always)]
    fn run(self) -> std::result::Result<(), empf_simd::SimdError> {
        let EmpfItem {
            mut ys,
            c0,
            hw,
            leak,
            input,
            th,
            mut pool,
        } = self;
        let steps = ys.len();
        let chs = leak.len() / steps.max(1);
        let c = ys.first().map_or(0, |y| y.len() / hw.max(1));
        // a pooled layer's spikes of one channel, all steps (`T x HW`): the inputs are only read
        let mut planes = vec![0f32; if pool.is_some() { steps * hw } else { 0 }];
        for ci in 0..c {
            let ch = if chs == 1 { 0 } else { c0 + ci };
            for off in (0..hw).step_by(EMPF_BLOCK) {
                let len = EMPF_BLOCK.min(hw - off);
                let mut vb = [0f32; EMPF_BLOCK];
                for (t, yt) in ys.iter_mut().enumerate() {
                    let (k, b) =
                        input.map_or((1.0, 0.0), |(k, b)| (k[t * chs + ch], b[t * chs + ch]));
                    let n = Fire {
                        leak: leak[t * chs + ch],
                        k,
                        b,
                        affine: input.is_some(),
                        th: th[t],
                        recur: t > 0,
                    };
                    let yb = &mut yt[ci * hw + off..][..len];
                    // selects, not branches: vectorised (spikes are data-dependent)
                    if pool.is_some() {
                        let sb = &mut planes[t * hw + off..][..len];
                        for ((s, &x), v) in sb.iter_mut().zip(yb.iter()).zip(vb.iter_mut()) {
                            *s = n.fire(x, v);
                        }
                    } else {
                        for (y, v) in yb.iter_mut().zip(vb.iter_mut()) {
                            *y = n.fire(*y, v);
                        }
                    }
                }
            }
            if let Some((outs, h, w, simd)) = pool.as_mut() {
                let (h, w) = (*h, *w);
                let op = (h / 2) * (w / 2);
                for (plane, out) in planes.chunks_exact(hw).zip(outs.iter_mut()) {
                    // the plane while it is in cache
                    simd.avg_pool_2x2(plane, (h, w), &mut out[ci * op..][..op])?;
                }
            }
        }
        Ok(())
    }
}

/// One step of one channel of an EM-PF layer.
#[derive(Clone, Copy)]
struct Fire {
    leak: f32,
    /// The folded input affine (Version II), when `affine`.
    k: f32,
    b: f32,
    affine: bool,
    th: f32,
    /// Whether the step has a previous potential (`t > 0`).
    recur: bool,
}

impl Fire {
    /// The spike of input `x` and the new potential `v`.
    #[inline(always)]
    fn fire(self, x: f32, v: &mut f32) -> f32 {
        let mut m = if self.affine { self.k * x + self.b } else { x };
        if self.recur {
            // float addition commutes: this is both `λv + x` (V1) and `(kx + b) + λ̂v` (folded
            // V2), bit for bit
            m += self.leak * *v;
        }
        let fire = m > self.th;
        *v = if fire { self.th } else { m };
        if fire { m - self.th } else { 0.0 }
    }
}

/// A loaded model ready to run.
pub struct Runtime {
    nodes: Vec<Node>,
    steps: usize,
    input: [usize; 3],
    classes: usize,
    precision: Precision,
    step: f32,
    simd: Simd,
}

fn conv_spec(d: &ConvDims) -> ConvSpec {
    ConvSpec::new(d.in_ch, d.out_ch, d.kernel)
        .stride(d.stride)
        .padding(d.pad)
}

fn simd_err(name: &str, e: empf_simd::SimdError) -> Error {
    Error::Internal(format!("op `{name}`: {e}"))
}

fn first_quant(ops: &[Op]) -> Option<f32> {
    ops.iter().find_map(|op| match op {
        Op::SpikeQuant { step, .. } => Some(*step),
        Op::Residual { body, shortcut, .. } => {
            first_quant(body).or_else(|| shortcut.as_deref().and_then(first_quant))
        }
        _ => None,
    })
}

/// The library layer of a stateless op (pools, flatten, SECA). Built per call: `Layer::forward`
/// takes `&mut self`, and groups of samples run in parallel.
fn layer_of(op: &Op) -> Result<Box<dyn Layer<f32>>> {
    Ok(match op {
        Op::AvgPool {
            name,
            kernel,
            stride,
            pad,
        } => Box::new(AvgPool2d::new(name, *kernel, *stride, *pad)?),
        Op::MaxPool {
            name,
            kernel,
            stride,
            pad,
        } => Box::new(MaxPool2d::new(name, *kernel, *stride, *pad)?),
        Op::GlobalAvgPool { name } => Box::new(GlobalAvgPool::new(name)),
        Op::Flatten { name } => Box::new(Flatten::new(name)),
        Op::Seca { name, weight, bias } => {
            let mut s = Seca::<f32>::new(name, weight.len(), &mut crate::rng::Rng::new(0))?;
            s.weight.value = from_vec(&[weight.len()], weight.clone());
            s.bias.value = from_vec(&[1], vec![*bias]);
            Box::new(s)
        }
        _ => return Err(Error::Internal("layer_of: not a stateless layer op".into())),
    })
}

fn prepare(ops: Vec<Op>, simd: &Simd, bits: Option<u32>) -> Result<Vec<Node>> {
    ops.into_iter()
        .map(|op| prepare_op(op, simd, bits))
        .collect()
}

/// Drops, in k-bit modes (`quant`: the mode's bits and step), every spike quantiser of the same
/// bits and step that feeds a binary layer on float-spike inputs: that layer quantises its input
/// itself, and `clamp(round(x/s))` of the quantiser's output `s·q` is `q` again (`s·q/s` is within
/// a few ulps of the integer `q ≤ 255`, for steps in the normal range), the level the quantiser
/// would have produced from `x`: the same levels, one pass and one buffer fewer.
/// Fuses every 2x2, stride-2, unpadded average pool that follows an EM-PF neuron into the neuron
/// (`pool: true`): each spike plane is pooled while it is in cache, with the pool's additions in
/// its order (so the same values), instead of in a pass of its own over the whole tensor.
fn fuse_pools(nodes: Vec<Node>) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::with_capacity(nodes.len());
    for node in nodes {
        let node = match node {
            n @ Node::Residual { .. } => in_branches(n, &fuse_pools),
            Node::Layer(Op::AvgPool {
                kernel: 2,
                stride: 2,
                pad: 0,
                ..
            }) if matches!(out.last(), Some(Node::Empf { pool: false, .. })) => {
                if let Some(Node::Empf { pool, .. }) = out.last_mut() {
                    *pool = true;
                }
                continue;
            }
            n => n,
        };
        out.push(node);
    }
    out
}

/// A graph pass applied inside a residual block's body and shortcut (other nodes as they are).
fn in_branches(node: Node, pass: &dyn Fn(Vec<Node>) -> Vec<Node>) -> Node {
    match node {
        Node::Residual {
            name,
            body,
            shortcut,
        } => Node::Residual {
            name,
            body: pass(body),
            shortcut: shortcut.map(pass),
        },
        n => n,
    }
}

/// Pairs every k-bit, stride-1 binary convolution on float spikes (one with `levels`) with the
/// EM-PF neuron that follows it, for [`Simd::conv_q_empf`]: the convolution's outputs then stay in
/// registers, the neuron (and its fused pool) runs in the convolution's epilogue, and only the
/// spikes are stored, the same floats as the two layers give. An unpooled EM-PF neuron right in
/// front of the convolution joins too: it runs as the convolution packs its input, so its spikes
/// are never stored.
fn fuse_conv_neurons(nodes: Vec<Node>) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::with_capacity(nodes.len());
    for node in nodes {
        let node = match node {
            n @ Node::Residual { .. } => in_branches(n, &fuse_conv_neurons),
            empf @ Node::Empf { .. }
                if matches!(
                    out.last(),
                    Some(Node::BinConv { levels: Some(_), binary_input: false, dims, .. })
                        if dims.stride == 1
                ) =>
            {
                let conv = out.pop().expect("matched above");
                // the neuron in front too, where the convolution's spikes come straight from one
                let pre = match out.last() {
                    Some(Node::Empf { pool: false, .. }) => out.pop().map(Box::new),
                    _ => None,
                };
                Node::ConvEmpf {
                    pre,
                    conv: Box::new(conv),
                    empf: Box::new(empf),
                }
            }
            n => n,
        };
        out.push(node);
    }
    out
}

fn fold_quantisers(nodes: Vec<Node>, quant: Option<(u32, f32)>) -> Vec<Node> {
    let Some((k, s)) = quant else { return nodes };
    let exact = (f32::MIN_POSITIVE * 256.0..=1e30).contains(&s);
    let mut out: Vec<Node> = Vec::with_capacity(nodes.len());
    let mut it = nodes.into_iter().peekable();
    while let Some(node) = it.next() {
        let node = match node {
            n @ Node::Residual { .. } => in_branches(n, &|b| fold_quantisers(b, quant)),
            Node::Quant { bits, step }
                if exact
                    && bits == k
                    && step == s
                    && matches!(
                        it.peek(),
                        Some(
                            Node::BinConv {
                                binary_input: false,
                                ..
                            } | Node::BinLinear {
                                binary_input: false,
                                ..
                            }
                        )
                    ) =>
            {
                continue;
            }
            n => n,
        };
        out.push(node);
    }
    out
}

/// `bits`: the k of k-bit precision with the sparse integer kernels.
fn prepare_op(op: Op, simd: &Simd, bits: Option<u32>) -> Result<Node> {
    Ok(match op {
        Op::Conv {
            name,
            dims,
            weight,
            bias,
        } => Node::Conv {
            name,
            core: ConvCore::new(conv_spec(&dims)),
            weight,
            bias,
        },
        Op::BinConv {
            name,
            dims,
            binary_input,
            signs,
            scale,
            shift,
        } => {
            let pm1 = signs.to_f32();
            let (o, i, k) = (dims.out_ch, dims.in_ch, dims.kernel);
            let packed = PackedConvWeights::from_f32_oihw(&pm1, o, i, k, k)
                .map_err(|e| simd_err(&name, e))?;
            let sparse =
                SignConvWeights::from_f32_oihw(&pm1, o, i, k, k).map_err(|e| simd_err(&name, e))?;
            let levels = match bits {
                Some(b) if !binary_input => {
                    let q = QuantConvWeights::new(&sparse, b).map_err(|e| simd_err(&name, e))?;
                    Some(Box::new(q))
                }
                _ => None,
            };
            Node::BinConv {
                levels,
                core: ConvCore::new(conv_spec(&dims)),
                name,
                dims,
                sparse,
                packed,
                binary_input,
                scale,
                shift,
            }
        }
        Op::Linear {
            name,
            in_f,
            out_f,
            weight,
            bias,
        } => Node::Linear {
            name,
            in_f,
            out_f,
            weight,
            bias,
        },
        Op::BinLinear {
            name,
            in_f,
            out_f,
            binary_input,
            signs,
            scale,
            shift,
        } => {
            let pm1 = signs.to_f32();
            let packed = simd
                .pack_rows(&pm1, out_f, in_f, Binarize::Sign)
                .map_err(|e| simd_err(&name, e))?;
            Node::BinLinear {
                name,
                in_f,
                out_f,
                pm1,
                packed,
                binary_input,
                scale,
                shift,
            }
        }
        Op::Affine { name, scale, shift } => Node::Affine { name, scale, shift },
        Op::Empf {
            name,
            channels,
            leak,
            threshold,
            input,
        } => Node::Empf {
            name,
            channels,
            leak,
            threshold,
            input,
            pool: false,
        },
        Op::Parallel { threshold, .. } => Node::Parallel { threshold },
        Op::Lif {
            leak,
            threshold,
            gamma,
            hard_reset,
            smooth,
            ..
        } => Node::Lif {
            leak,
            threshold,
            gamma,
            hard_reset,
            smooth,
        },
        op @ (Op::AvgPool { .. }
        | Op::MaxPool { .. }
        | Op::GlobalAvgPool { .. }
        | Op::Flatten { .. }
        | Op::Seca { .. }) => {
            layer_of(&op)?; // its errors now, not per call
            Node::Layer(op)
        }
        Op::Residual {
            name,
            body,
            shortcut,
        } => Node::Residual {
            name,
            body: prepare(body, simd, bits)?,
            shortcut: match shortcut {
                Some(s) => Some(prepare(s, simd, bits)?),
                None => None,
            },
        },
        Op::SpikeQuant { bits, step, .. } => Node::Quant { bits, step },
    })
}

/// Per-channel `y = scale[c]·y + shift[c]` over an `N x C x ...` buffer.
fn affine_inplace(y: &mut [f32], c: usize, inner: usize, scale: &[f32], shift: &[f32]) {
    let planes = |(i, plane): (usize, &mut [f32])| {
        let ch = i % c;
        let (k, b) = (scale[ch], shift[ch]);
        for v in plane {
            *v = k * *v + b;
        }
    };
    // a pass over memory: threads pay only for large tensors (a fork-join costs more than a
    // sample's planes)
    if y.len() < 1 << 18 {
        y.chunks_mut(inner.max(1)).enumerate().for_each(planes)
    } else {
        y.par_chunks_mut(inner.max(1)).enumerate().for_each(planes)
    }
}

/// NCHW floats → NHWC k-bit levels.
fn quantise_nhwc(x: &[f32], shape: &[usize], step: f32, bits: u32) -> Vec<u8> {
    let (c, hw) = (shape[1], shape[2] * shape[3]);
    let mut q = vec![0u8; x.len()];
    q.par_chunks_mut(c * hw)
        .zip(x.par_chunks(c * hw))
        .for_each(|(qn, xn)| {
            for ci in 0..c {
                for p in 0..hw {
                    qn[p * c + ci] = level(xn[ci * hw + p], step, bits);
                }
            }
        });
    q
}

/// NHWC → NCHW.
fn nhwc_to_nchw(y: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    let mut out = vec![0f32; y.len()];
    out.par_chunks_mut(c * hw)
        .zip(y.par_chunks(c * hw))
        .take(n)
        .for_each(|(on, yn)| {
            for p in 0..hw {
                for ci in 0..c {
                    on[ci * hw + p] = yn[p * c + ci];
                }
            }
        });
    out
}

impl Runtime {
    /// Prepare `model` for `precision`, with the ISA level `simd`. The quantisation step of k-bit
    /// modes is the model's own (from its `SpikeQuant` ops, when trained with QAT), else `step`, else
    /// [`DEFAULT_STEP`]. Checks the whole graph's shapes on a batch of one.
    pub fn new(model: Model, precision: Precision, step: Option<f32>, simd: Simd) -> Result<Self> {
        let step = first_quant(&model.ops)
            .or(step)
            .unwrap_or(DEFAULT_STEP as f32);
        if !(step.is_finite() && step > 0.0) {
            return Err(Error::Config(format!(
                "quantisation step must be positive, got {step}"
            )));
        }
        if let Some(k) = precision.bits()
            && !(1..=8).contains(&k)
        {
            return Err(Error::Config(format!("spike bits {k} out of range 1..=8")));
        }
        let elems = model.input.iter().product::<usize>();
        if elems > 1 << 26 {
            return Err(Error::Config(format!(
                "input {:?} too large ({elems} values per sample)",
                model.input
            )));
        }
        let nodes = prepare(
            model.ops,
            &simd,
            match precision {
                Precision::Bits(k) => Some(k),
                _ => None,
            },
        )?;
        let rt = Runtime {
            nodes: fuse_conv_neurons(fuse_pools(fold_quantisers(
                nodes,
                precision.bits().map(|k| (k, step)),
            ))),
            steps: model.steps,
            input: model.input,
            classes: model.classes,
            precision,
            step,
            simd,
        };
        let [c, h, w] = rt.input;
        let out = shapes(&rt.nodes, vec![1, c, h, w])?;
        if out != [1, rt.classes] {
            return Err(Error::Config(format!(
                "the model maps an input 1x{c}x{h}x{w} to {out:?}, not to 1 x {} logits",
                rt.classes
            )));
        }
        Ok(rt)
    }

    /// Time-steps.
    pub fn steps(&self) -> usize {
        self.steps
    }
    /// Input `C x H x W`.
    pub fn input(&self) -> [usize; 3] {
        self.input
    }
    /// Classes.
    pub fn classes(&self) -> usize {
        self.classes
    }
    /// The precision mode.
    pub fn precision(&self) -> Precision {
        self.precision
    }
    /// The k-bit quantisation step.
    pub fn step(&self) -> f32 {
        self.step
    }
    /// The kernels in use: the sparse-input convolutions (float and k-bit precision; binary-input
    /// layers still take the popcount kernels) or the popcount kernels (`Popcount`).
    pub fn kernel_name(&self) -> String {
        match self.precision {
            Precision::Popcount(_) => self.simd.kernel_name().to_string(),
            _ => format!(
                "{}, {} for binary inputs",
                self.simd.sparse_kernel_name(),
                self.simd.kernel_name()
            ),
        }
    }
    /// Run a batch `N x C x H x W` through the T steps; returns the logits summed over steps,
    /// `N x classes` (the prediction is their argmax, as in the trainer).
    pub fn run(&mut self, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        let [c, h, w] = self.input;
        check_shape(
            "input",
            x.shape(),
            &[None, Some(c), Some(h), Some(w)],
            &format!("N x {c} x {h} x {w}"),
        )?;
        let n = x.shape()[0];
        let k = self.classes;
        let x = crate::tensor::standard(x.clone());
        let xs = as_slice(&x);
        let per = c * h * w;
        // Run the batch in groups of samples whose T steps of activations stay cache-sized (and
        // below the allocator's direct-mapping size, so buffers are reused, not page-faulted in).
        let group = (GROUP_VALUES / (per * self.steps).max(1)).clamp(1, n.max(1));
        let mut out = vec![0f32; n * k];
        // Groups run in parallel (each also splits its own work, for batches of one group):
        // coarse tasks keep both cores busy without a fork-join per op.
        out.par_chunks_mut(group * k)
            .enumerate()
            .try_for_each(|(g, og)| {
                let ng = og.len() / k;
                let xg = from_vec(&[ng, c, h, w], xs[g * group * per..][..ng * per].to_vec());
                self.run_group(xg, og)
            })?;
        Ok(from_vec(&[n, k], out))
    }

    /// Adds the summed logits of the samples `x` into `out` (`N x classes`).
    fn run_group(&self, x: Tensor<f32>, out: &mut [f32]) -> Result<()> {
        let n = x.shape()[0];
        let ctx = Ctx {
            steps: self.steps,
            precision: self.precision,
            step: self.step,
            simd: self.simd,
        };
        let mut a = Act { x, repeated: true };
        let prof = std::env::var_os("EMPF_RT_PROFILE").is_some();
        for node in &self.nodes {
            let t0 = std::time::Instant::now();
            a = apply(node, a, &ctx)?;
            if prof {
                eprintln!(
                    "{:>10.3} ms  {} -> {:?}",
                    t0.elapsed().as_secs_f64() * 1e3,
                    node_kind(node),
                    a.x.shape()
                );
            }
        }
        let ys = as_slice(&a.x);
        let k = self.classes;
        if a.repeated {
            for (o, &y) in out.iter_mut().zip(ys.iter()) {
                for _ in 0..self.steps {
                    *o += y;
                }
            }
        } else {
            for t in 0..self.steps {
                for (o, &y) in out.iter_mut().zip(&ys[t * n * k..(t + 1) * n * k]) {
                    *o += y;
                }
            }
        }
        Ok(())
    }

    /// Predicted classes of a batch.
    pub fn predict(&mut self, x: &Tensor<f32>) -> Result<Vec<usize>> {
        let o = self.run(x)?;
        Ok(argmax_rows(&o))
    }
}

fn node_kind(n: &Node) -> &'static str {
    match n {
        Node::Conv { .. } => "conv",
        Node::BinConv { .. } => "binconv",
        Node::Linear { .. } => "linear",
        Node::BinLinear { .. } => "binlinear",
        Node::Affine { .. } => "affine",
        Node::Empf { pool: false, .. } => "empf",
        Node::Empf { pool: true, .. } => "empf+avgpool",
        Node::Parallel { .. } => "parallel",
        Node::Lif { .. } => "lif",
        Node::Layer(_) => "layer",
        Node::Residual { .. } => "residual",
        Node::Quant { .. } => "quant",
        Node::ConvEmpf { pre, empf, .. } => match (pre.is_some(), &**empf) {
            (true, Node::Empf { pool: true, .. }) => "empf+binconv+empf+avgpool",
            (true, _) => "empf+binconv+empf",
            (false, Node::Empf { pool: true, .. }) => "binconv+empf+avgpool",
            (false, _) => "binconv+empf",
        },
    }
}

/// The step slices `s` cut into runs of `len` values: one list of step slices per run (as many
/// runs as the longest slice has; an empty `s`, or empty slices, give runs of no slices).
fn split_steps(s: StepSlices<'_>, len: usize) -> Vec<StepSlices<'_>> {
    let runs = s.first().map_or(0, |x| x.len().div_ceil(len.max(1)));
    let mut out: Vec<StepSlices<'_>> = (0..runs.max(1)).map(|_| Vec::new()).collect();
    for x in s {
        for (o, part) in out.iter_mut().zip(x.chunks_mut(len.max(1))) {
            o.push(part);
        }
    }
    out
}

/// Row-wise argmax of an `N x K` tensor.
pub fn argmax_rows(o: &Tensor<f32>) -> Vec<usize> {
    let k = o.shape()[1];
    as_slice(o)
        .chunks(k)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0
        })
        .collect()
}

struct Ctx {
    steps: usize,
    precision: Precision,
    step: f32,
    simd: Simd,
}

fn shapes(nodes: &[Node], mut s: Vec<usize>) -> Result<Vec<usize>> {
    for n in nodes {
        s = shape_of(n, &s)?;
    }
    Ok(s)
}

fn shape_of(node: &Node, s: &[usize]) -> Result<Vec<usize>> {
    Ok(match node {
        Node::Conv { name, core, .. } | Node::BinConv { name, core, .. } => {
            core.output_shape(name, s)?
        }
        Node::Linear {
            name, in_f, out_f, ..
        }
        | Node::BinLinear {
            name, in_f, out_f, ..
        } => {
            check_shape(name, s, &[None, Some(*in_f)], &format!("N x {in_f}"))?;
            vec![s[0], *out_f]
        }
        Node::Affine { name, scale, .. } => {
            if s.len() < 2 || s[1] != scale.len() {
                return Err(Error::shape(name, format!("N x {} x ...", scale.len()), s));
            }
            s.to_vec()
        }
        Node::Empf {
            name,
            channels,
            pool,
            ..
        } => {
            let ok = matches!(s.len(), 2 | 4) && (*channels == 1 || s[1] == *channels);
            if !ok || (*pool && (s.len() != 4 || s[2] < 2 || s[3] < 2)) {
                return Err(Error::shape(
                    name,
                    format!("N x {channels} (x H x W) for a per-channel neuron"),
                    s,
                ));
            }
            if *pool {
                vec![s[0], s[1], s[2] / 2, s[3] / 2]
            } else {
                s.to_vec()
            }
        }
        Node::Parallel { .. } | Node::Lif { .. } | Node::Quant { .. } => s.to_vec(),
        Node::ConvEmpf { pre, conv, empf } => {
            let s = match pre {
                Some(p) => shape_of(p, s)?,
                None => s.to_vec(),
            };
            shape_of(empf, &shape_of(conv, &s)?)?
        }
        Node::Layer(op) => layer_of(op)?.output_shape(s)?,
        Node::Residual {
            name,
            body,
            shortcut,
        } => {
            let a = shapes(body, s.to_vec())?;
            let b = match shortcut {
                Some(sc) => shapes(sc, s.to_vec())?,
                None => s.to_vec(),
            };
            if a != b {
                return Err(Error::shape(
                    name,
                    format!("body output {a:?} and shortcut output {b:?} must match"),
                    s,
                ));
            }
            a
        }
    })
}

/// The values of all `steps` steps of `a` in one owned buffer, step-major, for a per-step op to
/// overwrite in place: a repeated input is copied once per step, otherwise its buffer is taken
/// (no buffer is zeroed and then overwritten).
fn step_buffer(a: Act, steps: usize) -> Vec<f32> {
    let xs = a.x.as_slice().expect("standard layout");
    if a.repeated {
        let mut y = Vec::with_capacity(xs.len() * steps);
        for _ in 0..steps {
            y.extend_from_slice(xs);
        }
        return y;
    }
    let len = xs.len();
    // standard layout: the values are one run of the buffer, from its offset
    let (buf, off) = a.x.into_raw_vec_and_offset();
    match off {
        Some(0) if buf.len() == len => buf,
        _ => buf[off.unwrap_or(0)..][..len].to_vec(),
    }
}

/// The slices of each of the `n` samples at every step of a step-major buffer (`steps x n x
/// inner`); `n` empty lists when the buffer is empty.
fn per_sample_steps(buf: &mut [f32], n: usize, inner: usize, steps: usize) -> Vec<StepSlices<'_>> {
    let mut out: Vec<StepSlices<'_>> = (0..n).map(|_| Vec::with_capacity(steps)).collect();
    if n * inner > 0 {
        for bt in buf.chunks_mut(n * inner) {
            for (s, b) in out.iter_mut().zip(bt.chunks_mut(inner)) {
                s.push(b);
            }
        }
    }
    out
}

fn rows_shape(a: &Act, steps: usize) -> (usize, usize, Vec<usize>) {
    let s = a.x.shape();
    let n = if a.repeated { s[0] } else { s[0] / steps };
    let inner: usize = s[1..].iter().product();
    let mut out = s.to_vec();
    out[0] = n * steps;
    (n, inner, out)
}

fn apply(node: &Node, a: Act, ctx: &Ctx) -> Result<Act> {
    let shape = a.x.shape().to_vec();
    let out_shape = shape_of(node, &shape)?;
    let xs = a.x.as_slice().expect("standard layout");
    let rep = a.repeated;
    let y = match node {
        Node::Conv {
            core, weight, bias, ..
        } => ConvCore::new(core.spec).forward(xs, &shape, weight, bias.as_deref()),
        Node::BinConv {
            name,
            core: _,
            dims,
            sparse,
            packed,
            levels,
            binary_input,
            scale,
            shift,
        } => {
            let quant = match (*binary_input, ctx.precision) {
                (true, _) => Some((1, 1.0)),
                (false, Precision::Bits(k) | Precision::Popcount(k)) => Some((k, ctx.step)),
                (false, Precision::Float) => None,
            };
            match quant {
                None => ctx
                    .simd
                    .sparse_conv_vec(
                        xs,
                        (shape[0], shape[2], shape[3]),
                        if rep { 0 } else { shape[0] / ctx.steps },
                        sparse,
                        dims.stride,
                        dims.pad,
                        scale,
                        shift,
                    )
                    .map_err(|e| simd_err(name, e))?,
                Some((bits, step)) if levels.is_some() => {
                    let lv = levels.as_ref().expect("checked");
                    debug_assert_eq!(lv.bits(), bits, "levels built for the mode's bits");
                    let sc: Vec<f32> = scale.iter().map(|&k| k * step).collect();
                    ctx.simd
                        .sparse_conv_q_spikes_vec(
                            xs,
                            step,
                            (shape[0], shape[2], shape[3]),
                            if rep { 0 } else { shape[0] / ctx.steps },
                            lv,
                            dims.stride,
                            dims.pad,
                            &sc,
                            shift,
                        )
                        .map_err(|e| simd_err(name, e))?
                }
                Some((bits, step)) => {
                    let (n, h, w) = (shape[0], shape[2], shape[3]);
                    let q = quantise_nhwc(xs, &shape, step, bits);
                    let img = ctx
                        .simd
                        .pack_image_u8_nhwc(&q, n, h, w, dims.in_ch, bits)
                        .map_err(|e| simd_err(name, e))?;
                    let sc: Vec<f32> = scale.iter().map(|&k| k * step).collect();
                    let ep = Epilogue {
                        scale: &sc,
                        bias: shift,
                        neuron: None,
                    };
                    let len: usize = out_shape.iter().product();
                    let mut y = vec![0f32; len];
                    ctx.simd
                        .bconv_fused(
                            BinOp::And,
                            &img,
                            packed,
                            dims.stride,
                            dims.pad,
                            &ep,
                            SpikeOut::F32(&mut y),
                            &mut [],
                        )
                        .map_err(|e| simd_err(name, e))?;
                    nhwc_to_nchw(&y, n, dims.out_ch, out_shape[2] * out_shape[3])
                }
            }
        }
        Node::Linear {
            in_f,
            out_f,
            weight,
            bias,
            ..
        } => {
            let m = shape[0];
            let mut y = vec![0f32; m * *out_f];
            if let Some(b) = bias {
                for r in y.chunks_mut(*out_f) {
                    r.copy_from_slice(b);
                }
            }
            let beta = if bias.is_some() { 1.0 } else { 0.0 };
            gemm(m, *in_f, *out_f, 1.0, xs, false, weight, true, beta, &mut y);
            y
        }
        Node::BinLinear {
            name,
            in_f,
            out_f,
            pm1,
            packed,
            binary_input,
            scale,
            shift,
        } => {
            let m = shape[0];
            let quant = match (*binary_input, ctx.precision) {
                (true, _) => Some((1, 1.0)),
                (false, Precision::Bits(k) | Precision::Popcount(k)) => Some((k, ctx.step)),
                (false, Precision::Float) => None,
            };
            let mut y = vec![0f32; m * *out_f];
            match quant {
                None => {
                    gemm(m, *in_f, *out_f, 1.0, xs, false, pm1, true, 0.0, &mut y);
                    affine_inplace(&mut y, *out_f, 1, scale, shift);
                }
                Some((bits, step)) => {
                    let q: Vec<u8> = xs.iter().map(|&v| level(v, step, bits)).collect();
                    let a = ctx
                        .simd
                        .pack_rows_u8(&q, m, *in_f, bits)
                        .map_err(|e| simd_err(name, e))?;
                    let sc: Vec<f32> = scale.iter().map(|&k| k * step).collect();
                    let ep = Epilogue {
                        scale: &sc,
                        bias: shift,
                        neuron: None,
                    };
                    ctx.simd
                        .bgemm_fused(BinOp::And, &a, packed, &ep, SpikeOut::F32(&mut y), &mut [])
                        .map_err(|e| simd_err(name, e))?;
                }
            }
            y
        }
        Node::Affine { scale, shift, .. } => {
            let mut y = xs.to_vec();
            let inner: usize = shape[2..].iter().product();
            affine_inplace(&mut y, scale.len(), inner, scale, shift);
            y
        }
        Node::Quant { bits, step } => {
            // the levels of `level`, by the vectorised quantiser (tested equal)
            let mut q = vec![0u8; xs.len()];
            ctx.simd
                .quantise(xs, *step, *bits, &mut q)
                .map_err(|e| simd_err("spike quantiser", e))?;
            let s = *step;
            q.iter().map(|&v| f32::from(v) * s).collect()
        }
        Node::Parallel { threshold } => {
            let (n, inner, os) = rows_shape(&a, ctx.steps);
            let per = n * inner;
            let mut y = step_buffer(a, ctx.steps);
            for (t, yt) in y.chunks_mut(per.max(1)).enumerate() {
                let th = threshold[t];
                yt.par_iter_mut()
                    .for_each(|o| *o = if *o > th { *o - th } else { 0.0 });
            }
            return Ok(Act {
                x: from_vec(&os, y),
                repeated: false,
            });
        }
        Node::Empf {
            name,
            channels,
            leak,
            threshold,
            input,
            pool,
            ..
        } => {
            let (n, inner, os) = rows_shape(&a, ctx.steps);
            debug_assert_eq!(leak.len(), ctx.steps * *channels, "λ per step and channel");
            let hw = if shape.len() == 4 {
                shape[2] * shape[3]
            } else {
                1
            };
            // the spikes overwrite the inputs in place (a pooled layer only reads them and writes
            // `pooled`)
            let mut y = step_buffer(a, ctx.steps);
            // the pooled spikes: `T·N x C x H/2 x W/2`
            let mut pooled_shape = out_shape.clone();
            pooled_shape[0] = os[0];
            let pooled_inner: usize = if *pool {
                pooled_shape[1..].iter().product()
            } else {
                0
            };
            let mut pooled = vec![0f32; os[0] * pooled_inner];
            // per sample, its T step slices of the spikes and of the pooled spikes
            let ys = per_sample_steps(&mut y, n, inner, ctx.steps);
            let ps = per_sample_steps(&mut pooled, n, pooled_inner, ctx.steps);
            let aff = input.as_ref().map(|(k, b)| (&k[..], &b[..]));
            // work items of whole samples, or (fewer samples than twice the threads, e.g. at
            // batch 1) of runs of channels
            let c = inner / hw.max(1);
            let parts = (2 * rayon::current_num_threads())
                .div_ceil(n.max(1))
                .clamp(1, c.max(1));
            let per = c.div_ceil(parts).max(1);
            let mut items = Vec::with_capacity(n * parts);
            for (ys, ps) in ys.into_iter().zip(ps) {
                let ys = split_steps(ys, per * hw);
                let ps = if *pool {
                    split_steps(ps, per * pooled_inner / c.max(1))
                } else {
                    ys.iter().map(|_| Vec::new()).collect()
                };
                for (k, (ys, ps)) in ys.into_iter().zip(ps).enumerate() {
                    items.push(EmpfItem {
                        ys,
                        c0: k * per,
                        hw,
                        leak,
                        input: aff,
                        th: threshold,
                        pool: pool.then(|| (ps, shape[2], shape[3], ctx.simd)),
                    });
                }
            }
            items
                .into_par_iter()
                .try_for_each(empf_simd::vectorized)
                .map_err(|e| simd_err(name, e))?;
            if *pool {
                return Ok(Act {
                    x: from_vec(&pooled_shape, pooled),
                    repeated: false,
                });
            }
            return Ok(Act {
                x: from_vec(&os, y),
                repeated: false,
            });
        }
        Node::Lif {
            leak,
            threshold,
            gamma,
            hard_reset,
            smooth,
            ..
        } => {
            let (n, inner, os) = rows_shape(&a, ctx.steps);
            let per = n * inner;
            let (lk, th, g, hard, smooth) = (*leak, *threshold, *gamma, *hard_reset, *smooth);
            let spike = move |m: f32| {
                let x = m - th;
                if !smooth {
                    return if x >= 0.0 { 1.0 } else { 0.0 };
                }
                if x <= -g {
                    0.0
                } else if x <= 0.0 {
                    0.5 * (x + g) * (x + g) / (g * g)
                } else if x < g {
                    1.0 - 0.5 * (g - x) * (g - x) / (g * g)
                } else {
                    1.0
                }
            };
            let mut y = step_buffer(a, ctx.steps);
            let mut v = vec![0f32; per];
            for (t, yt) in y.chunks_mut(per.max(1)).enumerate() {
                yt.par_iter_mut().zip(v.par_iter_mut()).for_each(|(o, vv)| {
                    let x = *o;
                    let m = if t > 0 { lk * *vv + x } else { x };
                    let s = spike(m);
                    *o = s;
                    *vv = if hard { m * (1.0 - s) } else { m - th * s };
                });
            }
            return Ok(Act {
                x: from_vec(&os, y),
                repeated: false,
            });
        }
        Node::Layer(op) => {
            let out = layer_of(op)?.forward(&a.x, &StepCtx::eval(0, 1), &mut State::Empty, None)?;
            return Ok(Act {
                x: crate::tensor::standard(out),
                repeated: rep,
            });
        }
        Node::ConvEmpf { pre, conv, empf } => {
            let pre_neuron = pre.as_deref().and_then(|p| neuron_of(p, ctx.steps));
            if let (
                Node::BinConv {
                    name,
                    dims,
                    levels: Some(lv),
                    scale,
                    shift,
                    ..
                },
                Some(neuron),
            ) = (&**conv, neuron_of(empf, ctx.steps))
                && shape.len() == 4
                && pre.is_none() == pre_neuron.is_none()
            {
                let sc: Vec<f32> = scale.iter().map(|&k| k * ctx.step).collect();
                let input = empf_simd::ConvInput {
                    x: xs,
                    repeated: rep,
                    neuron: pre_neuron,
                };
                let y = ctx
                    .simd
                    .conv_q_empf(
                        &input,
                        ctx.step,
                        (shape[0], shape[2], shape[3]),
                        lv,
                        dims.stride,
                        dims.pad,
                        &sc,
                        shift,
                        &neuron,
                    )
                    .map_err(|e| simd_err(name, e))?;
                if let Some(y) = y {
                    // every step's spikes (from a repeated input too)
                    let mut os = out_shape.clone();
                    if rep {
                        os[0] *= ctx.steps;
                    }
                    return Ok(Act {
                        x: from_vec(&os, y),
                        repeated: false,
                    });
                }
            }
            // no fused kernel here: the layers one by one
            let a = match pre {
                Some(p) => apply(p, a, ctx)?,
                None => a,
            };
            let b = apply(conv, a, ctx)?;
            return apply(empf, b, ctx);
        }
        Node::Residual { body, shortcut, .. } => {
            let mut b = Act {
                x: a.x.clone(),
                repeated: rep,
            };
            for n in body.iter() {
                b = apply(n, b, ctx)?;
            }
            let s = match shortcut {
                Some(sc) => {
                    let mut s = a;
                    for n in sc.iter() {
                        s = apply(n, s, ctx)?;
                    }
                    s
                }
                None => a,
            };
            return Ok(add(b, s, ctx.steps));
        }
    };
    Ok(Act {
        x: from_vec(&out_shape, y),
        repeated: rep,
    })
}

/// The parameters of an EM-PF neuron node for [`Simd::conv_q_empf`].
fn neuron_of(n: &Node, steps: usize) -> Option<EmpfNeuron<'_>> {
    match n {
        Node::Empf {
            leak,
            threshold,
            input,
            pool,
            ..
        } => Some(EmpfNeuron {
            steps,
            leak,
            affine: input.as_ref().map(|(k, b)| (&k[..], &b[..])),
            threshold,
            pool: *pool,
        }),
        _ => None,
    }
}

/// `a + b`, expanding a repeated operand over the steps when the other is not repeated.
fn add(a: Act, b: Act, steps: usize) -> Act {
    let (mut full, other) = match (a.repeated, b.repeated) {
        (true, false) => (b, a),
        _ => (a, b),
    };
    let os = as_slice(&other.x).into_owned();
    let fx = full.x.as_slice_mut().expect("standard layout");
    if full.repeated == other.repeated {
        fx.par_iter_mut().zip(&os).for_each(|(y, &x)| *y += x);
    } else {
        let per = os.len();
        for t in 0..steps {
            fx[t * per..(t + 1) * per]
                .par_iter_mut()
                .zip(&os)
                .for_each(|(y, &x)| *y += x);
        }
    }
    full
}

#[cfg(test)]
mod tests {
    use super::{Node, Op, Precision, Runtime};
    use crate::model::{ModelConfig, NeuronKind, SpikeQuantConfig, zoo};
    use crate::tensor::{Tensor, as_slice, from_vec};

    fn quantisers(nodes: &[Node]) -> usize {
        nodes
            .iter()
            .map(|n| match n {
                Node::Quant { .. } => 1,
                Node::Residual { body, shortcut, .. } => {
                    quantisers(body) + shortcut.as_deref().map_or(0, quantisers)
                }
                _ => 0,
            })
            .sum()
    }

    /// k-bit modes of the QAT model's own bits and step drop its quantisers (the binary layers
    /// quantise their inputs to the same levels); other modes keep them.
    #[test]
    fn k_bit_modes_fold_the_quantisers_of_their_own_bits_and_step() {
        let cfg = ModelConfig {
            steps: 2,
            widths: vec![4, 8, 8],
            input: [1, 8, 8],
            spike_quant: Some(SpikeQuantConfig {
                bits: 4,
                step: 0.25,
            }),
            ..zoo::small_config()
        };
        let net = zoo::build::<f32>(&cfg, &mut crate::rng::Rng::new(1)).unwrap();
        let model = crate::infer::export(&cfg, &net).unwrap();
        let simd = empf_simd::Simd::global();
        let count = |p: Precision, step: Option<f32>| {
            quantisers(&Runtime::new(model.clone(), p, step, simd).unwrap().nodes)
        };
        assert_eq!(count(Precision::Float, None), 2);
        assert_eq!(count(Precision::Bits(4), None), 0);
        assert_eq!(count(Precision::Popcount(4), None), 0);
        assert_eq!(count(Precision::Bits(2), None), 2);
        // the model's own step wins over a requested one: still folded
        assert_eq!(count(Precision::Bits(4), Some(0.5)), 0);
    }

    /// Splits fused convolution-neurons back into the two layers.
    fn unfuse_convs(nodes: Vec<Node>) -> Vec<Node> {
        let mut out = Vec::new();
        for node in nodes {
            match node {
                Node::ConvEmpf { pre, conv, empf } => {
                    out.extend(pre.map(|p| *p));
                    out.push(*conv);
                    out.push(*empf);
                }
                n => out.push(n),
            }
        }
        out
    }

    /// Splits fused neuron pools (and fused convolution-neurons) back into a neuron and an
    /// `AvgPool` layer.
    fn unfuse(nodes: Vec<Node>) -> Vec<Node> {
        let mut out = Vec::new();
        for node in unfuse_convs(nodes) {
            match node {
                Node::Empf {
                    name,
                    channels,
                    leak,
                    threshold,
                    input,
                    pool: true,
                } => {
                    out.push(Node::Empf {
                        name,
                        channels,
                        leak,
                        threshold,
                        input,
                        pool: false,
                    });
                    out.push(Node::Layer(Op::AvgPool {
                        name: "pool".into(),
                        kernel: 2,
                        stride: 2,
                        pad: 0,
                    }));
                }
                n => out.push(n),
            }
        }
        out
    }

    /// An EM-PF neuron with its 2x2 average pool fused in gives the separate neuron and pool
    /// layer's outputs bit for bit (odd sizes: 9 -> 4 -> 2), at float and k-bit precision.
    #[test]
    fn fused_neuron_pools_equal_the_separate_pool_layer() {
        let cfg = ModelConfig {
            steps: 3,
            widths: vec![4, 8, 8],
            input: [1, 9, 9],
            ..zoo::small_config()
        };
        let net = zoo::build::<f32>(&cfg, &mut crate::rng::Rng::new(3)).unwrap();
        let model = crate::infer::export(&cfg, &net).unwrap();
        let simd = empf_simd::Simd::global();
        let mut rng = crate::rng::Rng::new(4);
        let x = from_vec(
            &[3, 1, 9, 9],
            (0..243).map(|_| rng.uniform() as f32).collect(),
        );
        for p in [Precision::Float, Precision::Bits(4)] {
            let mut fused = Runtime::new(model.clone(), p, None, simd).unwrap();
            let fusions = unfuse_convs(std::mem::take(&mut fused.nodes));
            let pools = fusions
                .iter()
                .filter(|n| matches!(n, Node::Empf { pool: true, .. }))
                .count();
            assert_eq!(pools, 2, "mnist-cnn's two pools fused");
            fused.nodes = fusions;
            let mut plain = Runtime::new(model.clone(), p, None, simd).unwrap();
            plain.nodes = unfuse(std::mem::take(&mut plain.nodes));
            let (a, b) = (fused.run(&x).unwrap(), plain.run(&x).unwrap());
            let bits =
                |t: &Tensor<f32>| as_slice(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{p:?}");
        }
    }

    /// In k-bit modes each binary convolution on float spikes is fused with the EM-PF neuron after
    /// it (and the neuron's pool), the first also with the stem's neuron before it (on the stem's
    /// repeated output), and the runtime's logits are those of the separate layers bit for bit:
    /// Version I and II neurons, odd sizes (9 -> 4 -> 2 under the pools), T = 5 (a chunk of 4
    /// steps and a rest), several samples in a group; float precision fuses nothing.
    #[test]
    fn fused_conv_neurons_equal_the_separate_layers() {
        let simd = empf_simd::Simd::global();
        for version in [NeuronKind::V1, NeuronKind::V2] {
            let cfg = ModelConfig {
                steps: 5,
                widths: vec![4, 8, 8],
                input: [1, 9, 9],
                neuron: version,
                ..zoo::small_config()
            };
            let net = zoo::build::<f32>(&cfg, &mut crate::rng::Rng::new(7)).unwrap();
            let model = crate::infer::export(&cfg, &net).unwrap();
            let mut rng = crate::rng::Rng::new(8);
            let x = from_vec(
                &[4, 1, 9, 9],
                (0..324).map(|_| (rng.uniform() * 2.0) as f32).collect(),
            );
            let convs = |rt: &Runtime| {
                rt.nodes
                    .iter()
                    .filter(|n| matches!(n, Node::ConvEmpf { .. }))
                    .count()
            };
            for p in [Precision::Float, Precision::Bits(2), Precision::Bits(4)] {
                let mut fused = Runtime::new(model.clone(), p, Some(0.125), simd).unwrap();
                let want = if p == Precision::Float { 0 } else { 2 };
                // the stem's neuron runs inside the first convolution's packing
                let pres = fused
                    .nodes
                    .iter()
                    .filter(|n| matches!(n, Node::ConvEmpf { pre: Some(_), .. }))
                    .count();
                assert_eq!(
                    pres,
                    want / 2,
                    "{p:?}: the neuron in front of the first conv"
                );
                assert_eq!(
                    convs(&fused),
                    want,
                    "{p:?}: mnist-cnn's two binary convolutions"
                );
                let mut plain = Runtime::new(model.clone(), p, Some(0.125), simd).unwrap();
                plain.nodes = unfuse_convs(std::mem::take(&mut plain.nodes));
                let (a, b) = (fused.run(&x).unwrap(), plain.run(&x).unwrap());
                let bits =
                    |t: &Tensor<f32>| as_slice(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{version:?} {p:?}");
            }
        }
    }

    #[test]
    fn precision_names_parse_with_and_without_popcount() {
        for (s, p) in [
            ("float", Precision::Float),
            ("F32", Precision::Float),
            ("4", Precision::Bits(4)),
            ("2bit", Precision::Bits(2)),
            ("8-bit", Precision::Bits(8)),
            ("4p", Precision::Popcount(4)),
            ("4bit-popcount", Precision::Popcount(4)),
            ("1-popcount", Precision::Popcount(1)),
        ] {
            assert_eq!(Precision::parse(s).unwrap(), p, "{s}");
        }
        for bad in ["0", "9", "9p", "p", "popcount", "fourbit", ""] {
            assert!(Precision::parse(bad).is_err(), "{bad}");
        }
    }
}
