//! The model zoo: networks by name, built from a [`ModelConfig`].
//!
//! * `mnist-cnn` (the benchmark network of the training issue): FP conv3x3 1→32 + BN → neuron →
//!   BConv3x3 32→64 + BN → neuron → AvgPool2 → BConv3x3 64→128 + BN → neuron → AvgPool2 → GAP →
//!   FP Linear 128→classes.
//! * `small` (the quick-start default): the same shape with widths 16-32-64.
//!
//! Stems and heads stay full precision, synaptic convolutions are binary (EMPF.md §4, §9).

use crate::error::{Error, Result};
use crate::layers::batchnorm::BatchNorm;
use crate::layers::neuron::{EmpfV1, EmpfV2, EmpfV3, Lif};
use crate::layers::pool::{AvgPool2d, GlobalAvgPool};
use crate::layers::{
    BinaryConv2d, BinaryInit, Conv2d, ConvSpec, Flatten, Layer, Linear, ParamKind,
};
use crate::model::{ModelConfig, NeuronKind, Sequential};
use crate::rng::Rng;
use crate::tensor::Real;
use std::fmt::Write as _;

/// The quick-start configuration (`small`).
pub fn small_config() -> ModelConfig {
    ModelConfig {
        arch: "small".into(),
        widths: vec![16, 32, 32],
        steps: 2,
        ..ModelConfig::mnist_cnn()
    }
}

/// A spiking neuron layer of the configured kind for `channels` channels.
pub fn neuron<R: Real>(
    kind: NeuronKind,
    name: &str,
    channels: usize,
    steps: usize,
) -> Box<dyn Layer<R>> {
    match kind {
        NeuronKind::V1 => Box::new(EmpfV1::new(name, steps)),
        NeuronKind::V2 => Box::new(EmpfV2::new(name, channels, steps)),
        NeuronKind::V3 => Box::new(EmpfV3::new(name, steps)),
        NeuronKind::Lif => Box::new(Lif::new(name)),
    }
}

/// Build the network a configuration names.
pub fn build<R: Real>(cfg: &ModelConfig, rng: &mut Rng) -> Result<Sequential<R>> {
    cfg.validate()?;
    match cfg.arch.as_str() {
        "mnist-cnn" | "small" => build_cnn(cfg, rng),
        other => Err(Error::Config(format!(
            "unknown architecture `{other}` (expected small or mnist-cnn)"
        ))),
    }
}

fn build_cnn<R: Real>(cfg: &ModelConfig, rng: &mut Rng) -> Result<Sequential<R>> {
    if cfg.widths.len() != 3 {
        return Err(Error::Config(format!(
            "`{}` takes 3 widths, got {:?}",
            cfg.arch, cfg.widths
        )));
    }
    let [c, h, w] = cfg.input;
    if h < 4 || w < 4 {
        return Err(Error::Config(format!(
            "`{}` needs inputs of at least 4x4 pixels, got {h}x{w}",
            cfg.arch
        )));
    }
    let (w0, w1, w2) = (cfg.widths[0], cfg.widths[1], cfg.widths[2]);
    let t = cfg.steps;
    let mut net = Sequential::new("net");
    let mut stem = Conv2d::new("conv1", ConvSpec::new(c, w0, 3).padding(1), false, rng);
    // the stem is fed with images: no dL/dx needed
    stem.set_input_grad(false);
    net.push(stem);
    net.push(BatchNorm::new("bn1", w0));
    net.push_boxed(neuron(cfg.neuron, "sn1", w0, t));
    net.push(BinaryConv2d::new(
        "conv2",
        ConvSpec::new(w0, w1, 3).padding(1),
        BinaryInit::Kaiming,
        rng,
    ));
    net.push(BatchNorm::new("bn2", w1));
    net.push_boxed(neuron(cfg.neuron, "sn2", w1, t));
    net.push(AvgPool2d::new("pool2", 2, 2, 0)?);
    net.push(BinaryConv2d::new(
        "conv3",
        ConvSpec::new(w1, w2, 3).padding(1),
        BinaryInit::Kaiming,
        rng,
    ));
    net.push(BatchNorm::new("bn3", w2));
    net.push_boxed(neuron(cfg.neuron, "sn3", w2, t));
    net.push(AvgPool2d::new("pool3", 2, 2, 0)?);
    if cfg.arch == "small" {
        // flatten head: the class evidence keeps its position (a 7x7 map for 28x28 inputs)
        let (fh, fw) = (h / 4, w / 4);
        net.push(Flatten::new("flatten"));
        net.push(Linear::new("fc", w2 * fh * fw, cfg.classes, true, rng));
    } else {
        net.push(GlobalAvgPool::new("gap"));
        net.push(Linear::new("fc", w2, cfg.classes, true, rng));
    }
    net.output_shape(&[1, c, h, w])?;
    insert_spike_quant(cfg, &mut net)?;
    Ok(net)
}

/// Quantisation-aware training (EMPF.md §10): with `cfg.spike_quant` set, put a
/// [`SpikeQuant`](crate::layers::SpikeQuant) before every binary synaptic layer of `net`, so that
/// each binary layer sees exactly what the k-bit runtime feeds its popcount kernels.
pub fn insert_spike_quant<R: Real>(cfg: &ModelConfig, net: &mut Sequential<R>) -> Result<()> {
    let Some(q) = cfg.spike_quant else {
        return Ok(());
    };
    let mut i = 0;
    while i < net.layers.len() {
        let kind = net.layers[i].kind();
        if kind == "BinaryConv2d" || kind == "BinaryLinear" {
            let name = format!("{}.quant", net.layers[i].name());
            let layer = crate::layers::SpikeQuant::new(&name, q.bits, q.step)?;
            net.layers.insert(i, Box::new(layer));
            i += 1;
        }
        i += 1;
    }
    Ok(())
}

/// Parameter memory of a network (EMPF.md §9): (paper's rule: binary weights at 2 bits, every other
/// parameter at 4 bytes, BatchNorm and neuron parameters excluded; 1 bit per binary weight).
pub fn param_memory<R: Real>(net: &mut dyn Layer<R>) -> (f64, f64) {
    let (mut two_bit, mut one_bit) = (0.0, 0.0);
    net.visit_params(&mut |p| match p.kind {
        ParamKind::BinaryWeight => {
            two_bit += p.value.len() as f64 * 0.25;
            one_bit += p.value.len() as f64 * 0.125;
        }
        ParamKind::Weight | ParamKind::Bias => {
            two_bit += p.value.len() as f64 * 4.0;
            one_bit += p.value.len() as f64 * 4.0;
        }
        _ => {}
    });
    (two_bit, one_bit)
}

/// The `empf info` table: layers with output shapes and parameter counts, then totals and memory.
pub fn info_table<R: Real>(cfg: &ModelConfig, net: &mut Sequential<R>) -> Result<String> {
    let mut s = String::new();
    let input = [1, cfg.input[0], cfg.input[1], cfg.input[2]];
    let _ = writeln!(
        s,
        "model {} ({} neurons, T = {}, input {:?}, {} classes)",
        cfg.arch, cfg.neuron, cfg.steps, cfg.input, cfg.classes
    );
    let _ = writeln!(
        s,
        "{:<10} {:<52} {:<18} {:>10}",
        "layer", "kind", "output (N=1)", "params"
    );
    let rows = net.summary(&input)?;
    for ((name, desc, shape), layer) in rows.iter().zip(net.layers.iter_mut()) {
        let mut n = 0;
        layer.visit_params(&mut |p| {
            if p.trainable() {
                n += p.value.len()
            }
        });
        let _ = writeln!(
            s,
            "{:<10} {:<52} {:<18} {:>10}",
            name,
            desc,
            format!("{shape:?}"),
            n
        );
    }
    let (mut total, mut binary, mut other, mut norm) = (0usize, 0usize, 0usize, 0usize);
    net.visit_params(&mut |p| match p.kind {
        ParamKind::BinaryWeight => binary += p.value.len(),
        ParamKind::Weight | ParamKind::Bias => other += p.value.len(),
        ParamKind::Norm | ParamKind::Neuron => norm += p.value.len(),
        ParamKind::Buffer => {}
    });
    total += binary + other + norm;
    let (two, one) = param_memory(net);
    let _ = writeln!(
        s,
        "parameters: {total} ({binary} binary weights, {other} full-precision weights and biases, {norm} BatchNorm and neuron parameters)"
    );
    let _ = writeln!(
        s,
        "parameter memory: {:.4} MB by the paper's rule (2 bits per binary weight, 4 bytes per other weight; BN and neuron parameters excluded)",
        two / 1e6
    );
    let _ = writeln!(
        s,
        "parameter memory: {:.4} MB at 1 bit per binary weight (same exclusions)",
        one / 1e6
    );
    Ok(s)
}
