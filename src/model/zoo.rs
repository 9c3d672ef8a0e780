//! The model zoo: networks by name, built from a [`ModelConfig`].
//!
//! * `mnist-cnn` (the benchmark network of the training issue): FP conv3x3 1→32 + BN → neuron →
//!   BConv3x3 32→64 + BN → neuron → AvgPool2 → BConv3x3 64→128 + BN → neuron → AvgPool2 → GAP →
//!   FP Linear 128→classes.
//! * `small` (the quick-start default): the same shape with widths 16-32-64.
//!
//! * `resnet18`, `resnet34` (BasicBlock [2,2,2,2] / [3,4,6,3], widths 64-128-256-512) and `resnet19`
//!   ([3,3,2] from width 128, head Linear(512,256) → neuron → Linear(256,classes)), built from the
//!   block of Fig. 3(b) ([`crate::model::blocks`]); CIFAR stem (FP conv3x3 + BN) or ImageNet stem
//!   (FP conv7x7/s2 + BN + max-pool 3x3/s2), no neuron after the stem; head GAP on the current stream
//!   + FP Linear. `widths` are the stage widths.
//! * `vgg13` (64x64 inputs): 64 | 64,P,128,128,P | 256,256,P | 512,512,512,P | 512, GAP → Linear;
//!   first conv full precision. `vgg-snn` (DVS 48x48): 64 | 128,P | 256,256,P | 512,512,P |
//!   512,512,P → Linear(512·3·3, classes); first conv binary. Each conv is followed by BN and the
//!   neuron; P is AvgPool2d(2). `widths` are the channels of every conv. With `seca` on, SECA_I
//!   follows the BN of every binary conv (a VGG has no residual stream for SECA_II's `I_prev`).
//!
//! Stems and heads stay full precision, synaptic convolutions are binary (EMPF.md §4, §9).

use crate::error::{Error, Result};
use crate::layers::Seca;
use crate::layers::batchnorm::BatchNorm;
use crate::layers::neuron::{EmpfV1, EmpfV2, EmpfV3, Lif};
use crate::layers::pool::{AvgPool2d, GlobalAvgPool, MaxPool2d};
use crate::layers::{
    BinaryConv2d, BinaryInit, Conv2d, ConvSpec, Flatten, Layer, Linear, ParamKind,
};
use crate::model::blocks::{BasicBlock, BlockSpec, SecaMode};
use crate::model::{ArchOptions, ModelConfig, NeuronKind, Parallel, Sequential, Stem};
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

/// Every architecture name [`build`] knows.
pub const ARCHS: &[&str] = &[
    "small",
    "mnist-cnn",
    "resnet18",
    "resnet19",
    "resnet34",
    "vgg13",
    "vgg-snn",
];

/// The default configuration of a named architecture (the paper's setting for the paper's models:
/// ResNet-18/19 on CIFAR-10 32x32, ResNet-34 on ImageNet 224x224, VGG-13 on ImageNet-200 64x64,
/// VGG-SNN on DVS 2x48x48).
pub fn named_config(arch: &str) -> Result<ModelConfig> {
    let base = ModelConfig {
        spike_quant: None,
        arch: arch.to_string(),
        neuron: NeuronKind::V1,
        steps: 4,
        widths: vec![64, 128, 256, 512],
        input: [3, 32, 32],
        classes: 10,
        opts: ArchOptions::default(),
    };
    Ok(match arch {
        "mnist-cnn" => ModelConfig::mnist_cnn(),
        "small" => small_config(),
        "resnet18" => base,
        "resnet19" => ModelConfig {
            widths: vec![128, 256, 512],
            ..base
        },
        "resnet34" => ModelConfig {
            input: [3, 224, 224],
            classes: 1000,
            opts: ArchOptions {
                stem: Stem::Imagenet,
                ..ArchOptions::default()
            },
            ..base
        },
        "vgg13" => ModelConfig {
            widths: vec![64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
            input: [3, 64, 64],
            classes: 200,
            ..base
        },
        "vgg-snn" => ModelConfig {
            neuron: NeuronKind::V2,
            steps: 10,
            widths: vec![64, 128, 256, 256, 512, 512, 512, 512],
            input: [2, 48, 48],
            ..base
        },
        other => {
            return Err(Error::Config(format!(
                "unknown architecture `{other}` (expected one of {})",
                ARCHS.join(", ")
            )));
        }
    })
}

/// Build the network a configuration names.
pub fn build<R: Real>(cfg: &ModelConfig, rng: &mut Rng) -> Result<Sequential<R>> {
    cfg.validate()?;
    match cfg.arch.as_str() {
        "mnist-cnn" | "small" => build_cnn(cfg, rng),
        "resnet18" => build_resnet(cfg, &[2, 2, 2, 2], rng),
        "resnet34" => build_resnet(cfg, &[3, 4, 6, 3], rng),
        "resnet19" => build_resnet(cfg, &[3, 3, 2], rng),
        "vgg13" => build_vgg(cfg, &[1, 3, 5, 8], false, rng),
        "vgg-snn" => build_vgg(cfg, &[1, 3, 5, 7], true, rng),
        other => Err(Error::Config(format!(
            "unknown architecture `{other}` (expected one of {})",
            ARCHS.join(", ")
        ))),
    }
}

fn build_resnet<R: Real>(
    cfg: &ModelConfig,
    blocks: &[usize],
    rng: &mut Rng,
) -> Result<Sequential<R>> {
    if cfg.widths.len() != blocks.len() {
        return Err(Error::Config(format!(
            "`{}` takes {} stage widths, got {:?}",
            cfg.arch,
            blocks.len(),
            cfg.widths
        )));
    }
    let [c, h, w] = cfg.input;
    let t = cfg.steps;
    let w0 = cfg.widths[0];
    let mut net = Sequential::new("net");
    let stem_spec = match cfg.opts.stem {
        Stem::Cifar => ConvSpec::new(c, w0, 3).padding(1),
        Stem::Imagenet => ConvSpec::new(c, w0, 7).stride(2).padding(3),
    };
    let mut stem = Conv2d::new("conv1", stem_spec, false, rng);
    stem.set_input_grad(false);
    net.push(stem);
    net.push(BatchNorm::new("bn1", w0));
    if cfg.opts.stem == Stem::Imagenet {
        net.push(MaxPool2d::new("pool1", 3, 2, 1)?);
    }
    let n1 = match cfg.opts.parallel {
        Parallel::Half => cfg.neuron,
        Parallel::All => NeuronKind::V3,
    };
    let mut in_ch = w0;
    for (stage, (&n, &width)) in blocks.iter().zip(&cfg.widths).enumerate() {
        for b in 0..n {
            let spec = BlockSpec {
                in_ch,
                out_ch: width,
                stride: if stage > 0 && b == 0 { 2 } else { 1 },
                n1,
                n2: NeuronKind::V3,
                seca: cfg.opts.seca,
                steps: t,
            };
            net.push(BasicBlock::new(
                &format!("layer{}.{b}", stage + 1),
                spec,
                rng,
            )?);
            in_ch = width;
        }
    }
    net.push(GlobalAvgPool::new("gap"));
    if cfg.arch == "resnet19" {
        net.push(Linear::new("fc1", in_ch, 256, true, rng));
        net.push_boxed(neuron(cfg.neuron, "sn_fc", 256, t));
        net.push(Linear::new("fc", 256, cfg.classes, true, rng));
    } else {
        net.push(Linear::new("fc", in_ch, cfg.classes, true, rng));
    }
    net.output_shape(&[1, c, h, w])?;
    Ok(net)
}

fn build_vgg<R: Real>(
    cfg: &ModelConfig,
    pools_after: &[usize],
    first_binary: bool,
    rng: &mut Rng,
) -> Result<Sequential<R>> {
    let expect = if first_binary { 8 } else { 10 };
    if cfg.widths.len() != expect {
        return Err(Error::Config(format!(
            "`{}` takes {expect} conv widths, got {:?}",
            cfg.arch, cfg.widths
        )));
    }
    let [c, h, w] = cfg.input;
    let t = cfg.steps;
    let mut net = Sequential::new("net");
    let mut in_ch = c;
    for (i, &width) in cfg.widths.iter().enumerate() {
        let name = format!("conv{}", i + 1);
        let spec = ConvSpec::new(in_ch, width, 3).padding(1);
        if i == 0 && !first_binary {
            let mut stem = Conv2d::new(&name, spec, false, rng);
            stem.set_input_grad(false);
            net.push(stem);
        } else {
            net.push(BinaryConv2d::new(&name, spec, BinaryInit::Kaiming, rng));
        }
        net.push(BatchNorm::new(&format!("bn{}", i + 1), width));
        if cfg.opts.seca != SecaMode::None && (i > 0 || first_binary) {
            // no residual stream in a VGG: SECA_I on the current of each binary conv
            net.push(Seca::for_channels(&format!("seca{}", i + 1), width, rng)?);
        }
        net.push_boxed(neuron(cfg.neuron, &format!("sn{}", i + 1), width, t));
        if pools_after.contains(&i) {
            net.push(AvgPool2d::new(&format!("pool{}", i + 1), 2, 2, 0)?);
        }
        in_ch = width;
    }
    if first_binary {
        // VGG-SNN: flatten head over the remaining 3x3 map (48x48 input)
        let f = 1 << pools_after.len();
        let (fh, fw) = (h / f, w / f);
        if fh == 0 || fw == 0 {
            return Err(Error::Config(format!(
                "`{}` needs inputs of at least {f}x{f} pixels, got {h}x{w}",
                cfg.arch
            )));
        }
        net.push(Flatten::new("flatten"));
        net.push(Linear::new("fc", in_ch * fh * fw, cfg.classes, true, rng));
    } else {
        net.push(GlobalAvgPool::new("gap"));
        net.push(Linear::new("fc", in_ch, cfg.classes, true, rng));
    }
    net.output_shape(&[1, c, h, w])?;
    Ok(net)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(cfg: &ModelConfig) -> (f64, f64) {
        let mut net = build::<f32>(cfg, &mut Rng::new(0)).unwrap();
        param_memory(&mut net)
    }

    /// The paper's Param.(B) column (EMPF.md §9) under the 2-bit rule, to the paper's rounding
    /// (two decimals of MB = 10^6 bytes).
    #[test]
    fn named_models_match_the_papers_param_memory_column() {
        let cfg = |arch: &str, f: &dyn Fn(&mut ModelConfig)| {
            let mut c = named_config(arch).unwrap();
            f(&mut c);
            c
        };
        let cases = [
            ("CIFAR-10 ResNet-18", cfg("resnet18", &|_| {}), 2.82),
            (
                "CIFAR-100 ResNet-18",
                cfg("resnet18", &|c| c.classes = 100),
                3.00,
            ),
            ("ImageNet-200 VGG-13", cfg("vgg13", &|_| {}), 2.77),
            ("ImageNet-1k ResNet-34", cfg("resnet34", &|_| {}), 7.40),
            (
                "DVS ResNet-18",
                cfg("resnet18", &|c| {
                    c.input = [2, 48, 48];
                    c.steps = 10;
                    c.neuron = NeuronKind::V2
                }),
                2.81,
            ),
            ("DVS VGG-SNN", cfg("vgg-snn", &|_| {}), 2.49),
        ];
        for (what, c, paper) in cases {
            let (two, _) = memory(&c);
            let mb = (two / 1e4).round() / 100.0;
            assert_eq!(mb, paper, "{what}: {two} bytes");
        }
        // the 1-bit figure the paper quotes for the CIFAR-10 ResNet-18
        let (_, one) = memory(&named_config("resnet18").unwrap());
        assert_eq!((one / 1e4).round() / 100.0, 1.42, "{one} bytes");
    }

    /// A narrow ResNet-18 (both stems, SECA_II, all-parallel) and VGG-SNN run in the trainer's time
    /// loop: every binary conv of every block, the stem and the head receive a finite, non-zero
    /// gradient in online and BPTT training.
    #[test]
    fn narrow_paper_models_train_in_the_time_loop() {
        use crate::train::step::{BpMode, StepInput, train_batch};
        let mut cases = Vec::new();
        for (stem, seca, parallel) in [
            (Stem::Cifar, SecaMode::II, Parallel::Half),
            (Stem::Imagenet, SecaMode::None, Parallel::All),
        ] {
            let mut c = named_config("resnet18").unwrap();
            c.widths = vec![4, 6, 6, 8];
            c.input = [3, 16, 16];
            c.steps = 2;
            c.opts = ArchOptions {
                seca,
                stem,
                parallel,
            };
            cases.push(c);
        }
        let mut v = named_config("vgg-snn").unwrap();
        v.widths = vec![4, 4, 6, 6, 8, 8, 8, 8];
        v.steps = 2;
        v.input = [2, 16, 16];
        cases.push(v);
        for c in cases {
            for mode in [BpMode::Online, BpMode::Bptt] {
                let mut rng = Rng::new(4);
                let mut net = build::<f64>(&c, &mut rng).unwrap();
                let [ch, h, w] = c.input;
                let n = 4 * ch * h * w;
                let x =
                    crate::tensor::from_vec(&[4, ch, h, w], (0..n).map(|_| rng.normal()).collect());
                let y = [0usize, 1, 2, 3];
                let mut loss = |_t: usize, o: &crate::tensor::Tensor<f64>| {
                    crate::loss::cross_entropy(o, crate::loss::Targets::Hard(&y), 0.0)
                };
                let r = train_batch(
                    &mut net,
                    StepInput::Static(&x),
                    c.steps,
                    mode,
                    &mut rng,
                    &mut loss,
                    None,
                )
                .unwrap();
                assert!(r.loss.is_finite());
                net.visit_params(&mut |p| {
                    let weight = matches!(p.kind, ParamKind::Weight | ParamKind::BinaryWeight);
                    if weight && !p.name.contains("seca") {
                        let g: f64 = p.grad.iter().map(|g| g.abs()).sum();
                        assert!(
                            g.is_finite() && g > 0.0,
                            "{} {mode:?}: {} has no gradient",
                            c.arch,
                            p.name
                        );
                    }
                });
            }
        }
    }

    #[test]
    fn every_named_model_builds_with_its_output_shape() {
        for arch in ARCHS {
            let c = named_config(arch).unwrap();
            let net = build::<f32>(&c, &mut Rng::new(0)).unwrap();
            let [ch, h, w] = c.input;
            assert_eq!(
                net.output_shape(&[2, ch, h, w]).unwrap(),
                vec![2, c.classes],
                "{arch}"
            );
        }
        assert!(
            named_config("resnet50")
                .unwrap_err()
                .to_string()
                .contains("resnet18")
        );
        let mut c = named_config("resnet18").unwrap();
        c.widths = vec![8, 16];
        assert!(build::<f32>(&c, &mut Rng::new(0)).is_err());
    }
}
