//! Training graph → deployable [`Model`]: walks the layers generically through [`Layer::as_any`].
//!
//! * `BinaryConv2d` / `BinaryLinear` → signs at 1 bit per weight and a per-channel epilogue
//!   `scale = α·k_BN`, `shift = b_BN` when a `BatchNorm` follows (the BN is folded), else `α`, 0.
//! * `BatchNorm` with nothing to fold into → `Affine` (`fold_affine`).
//! * `EmpfV1` → `Empf` (λ[t] = sigmoid(a[t]), θ[t] = sigmoid(b[t])); `EmpfV2` (and `EmpfFolded`) →
//!   `Empf` with per-channel λ̂ = k·λ and the input affine Î = k ⊙ I + b (EMPF.md §5, exact).
//! * `EmpfV3` → `Parallel` (run over all T at once); `Lif` → `Lif`.
//! * `Conv2d` / `Linear` (stems and heads) stay f32; pools, `Flatten`, `Seca`, `SpikeQuant` copy;
//!   nested `Sequential`s are inlined; `Residual` → `Residual` with its two sub-graphs.
//! * `BasicBlock` (Fig. 3(b), [`crate::model::blocks`]) → nested `Residual`s (no new op needed):
//!   with `A1(x, c1)` identity or SECA_I and `A2` identity or SECA_I,
//!   `Residual{[N1, BinConv1+BN1, A1, N2, BinConv2+BN2, A2], shortcut}`; a SECA_II attention
//!   `A(prev, c) = SECA(prev + c)` wraps its half in an identity `Residual` (`prev + c`) followed by
//!   the `Seca` op, e.g. `Residual{[Residual{[N1, BinConv1]}, Seca1, Residual{[N2, BinConv2]},
//!   Seca2], identity}`. N2 (Version III) becomes `Parallel`, run over all T at once.
//! * Anything else is an error naming the layer.

use super::format::{ConvDims, Model, Op, Signs};
use crate::error::{Error, Result};
use crate::layers::neuron::{EmpfFolded, EmpfV1, EmpfV2, EmpfV3, Lif, Reset, SpikeFn};
use crate::layers::{
    AvgPool2d, BatchNorm, BinaryConv2d, BinaryLinear, Conv2d, Flatten, GlobalAvgPool, Layer,
    Linear, MaxPool2d, Seca, SpikeQuant,
};
use crate::model::blocks::{Attention, BasicBlock};
use crate::model::{ModelConfig, Residual, Sequential};
use crate::tensor::Real;
use std::any::Any;

fn f32s<R: Real>(v: &[R]) -> Vec<f32> {
    v.iter().map(|x| x.f64() as f32).collect()
}

fn values<R: Real>(p: &crate::layers::Param<R>) -> Vec<f32> {
    f32s(&p.value.iter().copied().collect::<Vec<R>>())
}

/// Export a network built from `cfg`.
pub fn export<R: Real>(cfg: &ModelConfig, net: &Sequential<R>) -> Result<Model> {
    let ops = export_seq(&net.layers)?;
    let model = Model {
        steps: cfg.steps,
        input: cfg.input,
        classes: cfg.classes,
        ops,
    };
    Ok(model)
}

fn any_of<R: Real>(l: &dyn Layer<R>) -> Result<&dyn Any> {
    l.as_any().ok_or_else(|| {
        Error::Config(format!(
            "layer `{}` of kind {} cannot be exported (it does not expose Layer::as_any)",
            l.name(),
            l.kind()
        ))
    })
}

/// The BatchNorm at `layers[i]`, if there is one.
fn bn_at<R: Real>(layers: &[Box<dyn Layer<R>>], i: usize) -> Option<&BatchNorm<R>> {
    layers
        .get(i)
        .and_then(|l| l.as_any())
        .and_then(|a| a.downcast_ref::<BatchNorm<R>>())
}

/// Whether the op before a binary layer produces binary spikes (Heaviside LIF, possibly max-pooled).
fn binary_source(ops: &[Op]) -> bool {
    for op in ops.iter().rev() {
        match op {
            Op::MaxPool { .. } | Op::Flatten { .. } => continue,
            Op::Lif { smooth, .. } => return !smooth,
            _ => return false,
        }
    }
    false
}

fn epilogue<R: Real>(alpha: &[R], bn: Option<&BatchNorm<R>>) -> (Vec<f32>, Vec<f32>) {
    match bn {
        Some(bn) => {
            let (k, b) = bn.fold_affine();
            (
                alpha
                    .iter()
                    .zip(&k)
                    .map(|(&a, &k)| (a * k).f64() as f32)
                    .collect(),
                f32s(&b),
            )
        }
        None => (f32s(alpha), vec![0.0; alpha.len()]),
    }
}

fn export_seq<R: Real>(layers: &[Box<dyn Layer<R>>]) -> Result<Vec<Op>> {
    let mut ops = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let l = layers[i].as_ref();
        let a = any_of(l)?;
        let name = l.name().to_string();
        i += 1;
        if let Some(c) = a.downcast_ref::<BinaryConv2d<R>>() {
            let sa = c.sign_alpha();
            let s = c.spec();
            let bn = bn_at(layers, i).filter(|b| b.channels == s.out_ch);
            i += bn.is_some() as usize;
            let (scale, shift) = epilogue(&sa.alpha, bn);
            ops.push(Op::BinConv {
                name,
                dims: conv_dims(&s),
                binary_input: binary_source(&ops),
                signs: Signs::pack(&sa.positive),
                scale,
                shift,
            });
        } else if let Some(c) = a.downcast_ref::<BinaryLinear<R>>() {
            let sa = c.sign_alpha();
            let bn = bn_at(layers, i).filter(|b| b.channels == c.out_features);
            i += bn.is_some() as usize;
            let (scale, shift) = epilogue(&sa.alpha, bn);
            ops.push(Op::BinLinear {
                name,
                in_f: c.in_features,
                out_f: c.out_features,
                binary_input: binary_source(&ops),
                signs: Signs::pack(&sa.positive),
                scale,
                shift,
            });
        } else if let Some(c) = a.downcast_ref::<Conv2d<R>>() {
            let s = c.spec();
            ops.push(Op::Conv {
                name,
                dims: conv_dims(&s),
                weight: values(&c.weight),
                bias: c.bias.as_ref().map(values),
            });
        } else if let Some(c) = a.downcast_ref::<Linear<R>>() {
            ops.push(Op::Linear {
                name,
                in_f: c.in_features,
                out_f: c.out_features,
                weight: values(&c.weight),
                bias: c.bias.as_ref().map(values),
            });
        } else if let Some(b) = a.downcast_ref::<BatchNorm<R>>() {
            let (k, s) = b.fold_affine();
            ops.push(Op::Affine {
                name,
                scale: f32s(&k),
                shift: f32s(&s),
            });
        } else if let Some(n) = a.downcast_ref::<EmpfV1<R>>() {
            ops.push(Op::Empf {
                name,
                channels: 1,
                leak: (0..n.steps).map(|t| n.leak(t).f64() as f32).collect(),
                threshold: (0..n.steps).map(|t| n.threshold(t).f64() as f32).collect(),
                input: None,
            });
        } else if let Some(n) = a.downcast_ref::<EmpfV2<R>>() {
            ops.push(folded_op(name, &n.to_folded()));
        } else if let Some(n) = a.downcast_ref::<EmpfFolded<R>>() {
            ops.push(folded_op(name, n));
        } else if let Some(n) = a.downcast_ref::<EmpfV3<R>>() {
            ops.push(Op::Parallel {
                name,
                threshold: n
                    .b
                    .value
                    .iter()
                    .map(|&b| crate::layers::neuron::sigmoid(b).f64() as f32)
                    .collect(),
            });
        } else if let Some(n) = a.downcast_ref::<Lif<R>>() {
            ops.push(Op::Lif {
                name,
                leak: n.leak.f64() as f32,
                threshold: n.threshold.f64() as f32,
                gamma: n.gamma.f64() as f32,
                hard_reset: matches!(n.reset, Reset::Hard),
                smooth: matches!(n.spike, SpikeFn::SmoothTriangle),
            });
        } else if let Some(p) = a.downcast_ref::<AvgPool2d>() {
            ops.push(Op::AvgPool {
                name,
                kernel: p.geom.kernel,
                stride: p.geom.stride,
                pad: p.geom.pad,
            });
        } else if let Some(p) = a.downcast_ref::<MaxPool2d>() {
            ops.push(Op::MaxPool {
                name,
                kernel: p.geom.kernel,
                stride: p.geom.stride,
                pad: p.geom.pad,
            });
        } else if a.is::<GlobalAvgPool>() {
            ops.push(Op::GlobalAvgPool { name });
        } else if a.is::<Flatten>() {
            ops.push(Op::Flatten { name });
        } else if let Some(s) = a.downcast_ref::<Seca<R>>() {
            ops.push(Op::Seca {
                name,
                weight: values(&s.weight),
                bias: values(&s.bias)[0],
            });
        } else if let Some(q) = a.downcast_ref::<SpikeQuant>() {
            ops.push(Op::SpikeQuant {
                name,
                bits: q.bits,
                step: q.step as f32,
            });
        } else if let Some(s) = a.downcast_ref::<Sequential<R>>() {
            ops.extend(export_seq(&s.layers)?);
        } else if let Some(b) = a.downcast_ref::<BasicBlock<R>>() {
            ops.push(block_op(name, b)?);
        } else if let Some(r) = a.downcast_ref::<Residual<R>>() {
            ops.push(Op::Residual {
                name,
                body: export_seq(&r.body.layers)?,
                shortcut: match &r.shortcut {
                    Some(s) => Some(export_seq(&s.layers)?),
                    None => None,
                },
            });
        } else {
            return Err(Error::Config(format!(
                "layer `{name}` of kind {} has no deployed form",
                l.kind()
            )));
        }
    }
    Ok(ops)
}

/// The `BinConv` op of a binary conv with its following BatchNorm folded.
fn bin_conv_op<R: Real>(c: &BinaryConv2d<R>, bn: &BatchNorm<R>, binary_input: bool) -> Op {
    let sa = c.sign_alpha();
    let s = c.spec();
    let (scale, shift) = epilogue(&sa.alpha, Some(bn));
    Op::BinConv {
        name: c.name().to_string(),
        dims: conv_dims(&s),
        binary_input,
        signs: Signs::pack(&sa.positive),
        scale,
        shift,
    }
}

fn seca_op<R: Real>(s: &Seca<R>) -> Op {
    Op::Seca {
        name: s.name().to_string(),
        weight: values(&s.weight),
        bias: values(&s.bias)[0],
    }
}

/// One half of a block, `A(prev, BN(BConv(N(prev))))`, appended to `ops` (module docs).
#[allow(clippy::borrowed_box)] // `slice::from_ref` needs the box
fn block_half<R: Real>(
    name: &str,
    n: &Box<dyn Layer<R>>,
    conv: &BinaryConv2d<R>,
    bn: &BatchNorm<R>,
    att: &Attention<R>,
    ops: &mut Vec<Op>,
) -> Result<()> {
    let mut half = export_seq(std::slice::from_ref(n))?;
    let binary = binary_source(&half);
    half.push(bin_conv_op(conv, bn, binary));
    match att {
        Attention::None => ops.extend(half),
        Attention::SecaI(s) => {
            ops.extend(half);
            ops.push(seca_op(s));
        }
        Attention::SecaII(s) => {
            ops.push(Op::Residual {
                name: name.to_string(),
                body: half,
                shortcut: None,
            });
            ops.push(seca_op(s));
        }
    }
    Ok(())
}

/// A [`BasicBlock`] as nested `Residual`s (module docs).
fn block_op<R: Real>(name: String, b: &BasicBlock<R>) -> Result<Op> {
    let mut body = Vec::new();
    block_half(
        &format!("{name}.half1"),
        &b.n1,
        &b.conv1,
        &b.bn1,
        &b.a1,
        &mut body,
    )?;
    block_half(
        &format!("{name}.half2"),
        &b.n2,
        &b.conv2,
        &b.bn2,
        &b.a2,
        &mut body,
    )?;
    Ok(Op::Residual {
        name,
        body,
        shortcut: match &b.shortcut {
            Some(s) => Some(export_seq(&s.layers)?),
            None => None,
        },
    })
}

fn folded_op<R: Real>(name: String, n: &EmpfFolded<R>) -> Op {
    let flat = |v: &Vec<Vec<R>>| v.iter().flat_map(|r| f32s(r)).collect::<Vec<f32>>();
    Op::Empf {
        name,
        channels: n.channels,
        leak: flat(&n.leak),
        threshold: f32s(&n.threshold),
        input: Some((flat(&n.scale), flat(&n.shift))),
    }
}

/// The stored geometry of a conv layer's spec.
fn conv_dims(s: &crate::layers::conv::ConvSpec) -> ConvDims {
    ConvDims {
        in_ch: s.in_ch,
        out_ch: s.out_ch,
        kernel: s.kernel,
        stride: s.stride,
        pad: s.padding,
    }
}
