//! Deployment: the exported model and the inference runtime against the training graph's eval mode,
//! the file size rule, k-bit modes against a scalar reference, and hostile model files.

use empf::infer::format::{Model, Op, fnv1a};
use empf::infer::{Precision, Runtime, export};
use empf::layers::neuron::EmpfV3;
use empf::layers::{
    BatchNorm, BinaryConv2d, BinaryInit, Conv2d, ConvSpec, GlobalAvgPool, Layer, Linear, ParamKind,
    Seca,
};
use empf::model::{ModelConfig, NeuronKind, Residual, Sequential, SpikeQuantConfig, zoo};
use empf::rng::Rng;
use empf::tensor::{Tensor, as_slice, from_vec};
use empf::train::step::{StepInput, eval_batch};
use empf_simd::Simd;

/// Give BatchNorm statistics/affines and neuron parameters non-trivial values (a trained-like net),
/// so that the folds are exercised.
fn perturb(net: &mut dyn Layer<f32>, seed: u64) {
    let mut rng = Rng::new(seed);
    net.visit_params(&mut |p| {
        let name = p.name.clone();
        let v = p.value.as_slice_mut().unwrap();
        match p.kind {
            ParamKind::Buffer if name.ends_with("running_var") => v
                .iter_mut()
                .for_each(|x| *x = 0.5 + rng.uniform() as f32 * 2.0),
            ParamKind::Buffer => v.iter_mut().for_each(|x| *x = rng.normal() as f32 * 0.3),
            ParamKind::Norm if name.ends_with("weight") => v
                .iter_mut()
                .for_each(|x| *x = 0.7 + rng.uniform() as f32 * 0.6),
            ParamKind::Norm | ParamKind::Neuron => {
                v.iter_mut().for_each(|x| *x = rng.normal() as f32 * 0.5)
            }
            _ => {}
        }
    });
}

/// Summed eval-mode logits of the training graph.
fn eval_logits(net: &mut dyn Layer<f32>, x: &Tensor<f32>, steps: usize) -> Tensor<f32> {
    let outs = eval_batch(net, StepInput::Static(x), steps).unwrap();
    let mut s = outs[0].clone();
    for o in &outs[1..] {
        s += o;
    }
    s
}

fn argmax(o: &Tensor<f32>) -> Vec<usize> {
    empf::infer::runtime::argmax_rows(o)
}

/// Largest |a − b| relative to the largest |b| of the row.
fn max_rel(a: &Tensor<f32>, b: &Tensor<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let k = a.shape()[1];
    let (a, b) = (as_slice(a), as_slice(b));
    a.chunks(k)
        .zip(b.chunks(k))
        .map(|(ra, rb)| {
            let scale = rb.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            ra.iter()
                .zip(rb)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
        })
        .fold(0.0, f32::max)
}

fn runtime(model: &Model, p: Precision) -> Runtime {
    Runtime::new(model.clone(), p, None, Simd::global()).unwrap()
}

fn images(n: usize, shape: [usize; 3], rng: &mut Rng) -> Tensor<f32> {
    let len = n * shape.iter().product::<usize>();
    from_vec(
        &[n, shape[0], shape[1], shape[2]],
        (0..len).map(|_| rng.uniform() as f32).collect(),
    )
}

fn round_trip(m: &Model) -> Model {
    Model::from_bytes(&m.to_bytes(), "mem.empfm").unwrap()
}

#[test]
fn exported_float_model_predicts_like_eval_mode_on_the_whole_mnist_test_set() {
    let dir = empf::data::bundled_mnist_dir();
    let test = match empf::data::idx::load_mnist(&dir) {
        Ok(m) => m.test,
        Err(e) => {
            println!("skipped: bundled MNIST not readable ({e})");
            return;
        }
    };
    // Version I on the whole split; Version II (its fold has its own test) on the first 1000
    for (neuron, limit) in [(NeuronKind::V1, test.len()), (NeuronKind::V2, 1000)] {
        let cfg = ModelConfig {
            neuron,
            ..zoo::small_config()
        };
        let mut net = zoo::build::<f32>(&cfg, &mut Rng::new(3)).unwrap();
        perturb(&mut net, 7);
        let model = round_trip(&export(&cfg, &net).unwrap());
        let mut rt = runtime(&model, Precision::Float);
        let (mut same, mut worst) = (0, 0f32);
        let idx: Vec<usize> = (0..limit).collect();
        for chunk in idx.chunks(500) {
            let (x, _) = test.batch(chunk).unwrap();
            let want = eval_logits(&mut net, &x, cfg.steps);
            let got = rt.run(&x).unwrap();
            worst = worst.max(max_rel(&got, &want));
            same += argmax(&got)
                .iter()
                .zip(argmax(&want))
                .filter(|(a, b)| **a == *b)
                .count();
        }
        assert!(
            worst <= 1e-4,
            "{neuron}: logits differ by {worst:e} relative"
        );
        assert_eq!(same, limit, "{neuron}: predictions differ");
    }
}

#[test]
fn folded_membrane_bn_neuron_matches_version_two_to_1e5() {
    let cfg = ModelConfig {
        neuron: NeuronKind::V2,
        steps: 4,
        widths: vec![6, 8, 8],
        input: [1, 12, 12],
        ..zoo::small_config()
    };
    let mut rng = Rng::new(5);
    let mut net = zoo::build::<f32>(&cfg, &mut rng).unwrap();
    perturb(&mut net, 11);
    let model = export(&cfg, &net).unwrap();
    assert!(
        model
            .ops
            .iter()
            .any(|o| matches!(o, Op::Empf { channels, input: Some(_), .. } if *channels > 1)),
        "Version II exports as a per-channel Version I neuron with an input affine"
    );
    let x = images(16, cfg.input, &mut rng);
    let want = eval_logits(&mut net, &x, cfg.steps);
    let got = runtime(&model, Precision::Float).run(&x).unwrap();
    let d = max_rel(&got, &want);
    assert!(d <= 1e-5, "folded V2 differs by {d:e}");
}

/// stem → BN → [Residual: V1 → BConv → BN → SECA, identity] → [Residual: V3 → BConv s2 → BN,
/// shortcut BConv1x1 s2 + BN] → GAP → Linear.
fn residual_seca_net(rng: &mut Rng) -> Sequential<f32> {
    let mut net = Sequential::new("net");
    net.push(Conv2d::new(
        "stem",
        ConvSpec::new(2, 8, 3).padding(1),
        false,
        rng,
    ));
    net.push(BatchNorm::new("bn0", 8));
    let mut body = Sequential::new("b1");
    body.push(empf::layers::EmpfV1::new("b1.sn", 3));
    body.push(BinaryConv2d::new(
        "b1.conv",
        ConvSpec::new(8, 8, 3).padding(1),
        BinaryInit::Kaiming,
        rng,
    ));
    body.push(BatchNorm::new("b1.bn", 8));
    body.push(Seca::new("b1.seca", 3, rng).unwrap());
    net.push(Residual::new("b1", body, None));
    let mut body = Sequential::new("b2");
    body.push(EmpfV3::new("b2.sn", 3));
    body.push(BinaryConv2d::new(
        "b2.conv",
        ConvSpec::new(8, 16, 3).padding(1).stride(2),
        BinaryInit::Kaiming,
        rng,
    ));
    body.push(BatchNorm::new("b2.bn", 16));
    let mut sc = Sequential::new("b2.sc");
    sc.push(BinaryConv2d::new(
        "b2.sc.conv",
        ConvSpec::new(8, 16, 1).stride(2),
        BinaryInit::Kaiming,
        rng,
    ));
    sc.push(BatchNorm::new("b2.sc.bn", 16));
    net.push(Residual::new("b2", body, Some(sc)));
    net.push(GlobalAvgPool::new("gap"));
    net.push(Linear::new("fc", 16, 5, true, rng));
    net
}

fn tiny_cfg(steps: usize, input: [usize; 3], classes: usize) -> ModelConfig {
    ModelConfig {
        steps,
        input,
        classes,
        ..zoo::small_config()
    }
}

#[test]
fn residual_and_seca_blocks_export_and_run_like_eval_mode() {
    let mut rng = Rng::new(9);
    let mut net = residual_seca_net(&mut rng);
    perturb(&mut net, 4);
    let cfg = tiny_cfg(3, [2, 8, 8], 5);
    let model = round_trip(&export(&cfg, &net).unwrap());
    assert!(matches!(&model.ops[2], Op::Residual { shortcut: None, body, .. } if body.len() == 3));
    let x = images(6, cfg.input, &mut rng);
    let want = eval_logits(&mut net, &x, cfg.steps);
    let got = runtime(&model, Precision::Float).run(&x).unwrap();
    let d = max_rel(&got, &want);
    assert!(d <= 1e-4, "residual/SECA net differs by {d:e}");
    assert_eq!(argmax(&got), argmax(&want));
}

/// The same network with a quantiser before every binary layer (the QAT graph `zoo` builds for
/// `spike_quant`): the scalar reference of k-bit mode.
fn with_quantisers(cfg: &ModelConfig, seed: u64, q: Option<(u32, f64)>) -> Sequential<f32> {
    let cfg = ModelConfig {
        spike_quant: q.map(|(bits, step)| SpikeQuantConfig { bits, step }),
        ..cfg.clone()
    };
    let mut net = zoo::build::<f32>(&cfg, &mut Rng::new(seed)).unwrap();
    perturb(&mut net, seed + 1);
    let quantisers = net
        .layers
        .iter()
        .filter(|l| l.kind() == "SpikeQuant")
        .count();
    assert_eq!(quantisers, if q.is_some() { 2 } else { 0 });
    net
}

#[test]
fn k_bit_runtime_equals_the_scalar_reference_of_the_quantised_network() {
    let cfg = ModelConfig {
        steps: 3,
        widths: vec![8, 16, 16],
        input: [1, 12, 12],
        ..zoo::small_config()
    };
    let mut rng = Rng::new(2);
    let x = images(8, cfg.input, &mut rng);
    let plain = with_quantisers(&cfg, 21, None);
    let model = export(&cfg, &plain).unwrap();
    for bits in [1u32, 2, 4, 8] {
        let step = 0.25;
        let mut reference = with_quantisers(&cfg, 21, Some((bits, step as f64)));
        let want = eval_logits(&mut reference, &x, cfg.steps);
        let run = |p: Precision| {
            Runtime::new(model.clone(), p, Some(step), Simd::global())
                .unwrap()
                .run(&x)
                .unwrap()
        };
        let got = run(Precision::Bits(bits));
        let d = max_rel(&got, &want);
        assert!(d <= 1e-4, "{bits}-bit runtime differs by {d:e}");
        // the sparse integer kernels and the popcount kernels sum the same integers
        assert_eq!(
            got,
            run(Precision::Popcount(bits)),
            "{bits}-bit kernels differ"
        );
        // a QAT model (quantisers in the graph) runs the same in float and k-bit mode; in k-bit
        // mode its quantisers fold into the binary layers: exactly the plain model's k-bit run
        let qat = export(&cfg, &reference).unwrap();
        let qk = Runtime::new(qat.clone(), Precision::Bits(bits), None, Simd::global())
            .unwrap()
            .run(&x)
            .unwrap();
        assert_eq!(qk, got, "{bits}-bit QAT model in {bits}-bit mode");
        let f = runtime(&qat, Precision::Float).run(&x).unwrap();
        let d = max_rel(&f, &want);
        assert!(
            d <= 1e-4,
            "{bits}-bit QAT model in float mode differs by {d:e}"
        );
    }
}

#[test]
fn lif_network_runs_through_one_bit_kernels_like_eval_mode() {
    let cfg = ModelConfig {
        neuron: NeuronKind::Lif,
        steps: 4,
        widths: vec![8, 16, 16],
        input: [1, 12, 12],
        ..zoo::small_config()
    };
    let mut rng = Rng::new(8);
    let mut net = zoo::build::<f32>(&cfg, &mut rng).unwrap();
    perturb(&mut net, 3);
    let model = export(&cfg, &net).unwrap();
    assert!(
        model.ops.iter().any(|o| matches!(
            o,
            Op::BinConv {
                binary_input: true,
                ..
            }
        )),
        "a binary conv fed by LIF spikes is marked for the 1-bit kernels"
    );
    let x = images(8, cfg.input, &mut rng);
    let want = eval_logits(&mut net, &x, cfg.steps);
    let got = runtime(&model, Precision::Float).run(&x).unwrap();
    let d = max_rel(&got, &want);
    assert!(d <= 1e-4, "LIF net differs by {d:e}");
}

#[test]
fn model_file_is_at_most_1_1x_one_bit_per_binary_weight_plus_4_bytes_per_value() {
    let cfg = zoo::small_config();
    let net = zoo::build::<f32>(&cfg, &mut Rng::new(1)).unwrap();
    let model = export(&cfg, &net).unwrap();
    let (mut bits, mut values) = (0usize, 0usize);
    fn count(ops: &[Op], bits: &mut usize, values: &mut usize) {
        for op in ops {
            match op {
                Op::Conv { weight, bias, .. } | Op::Linear { weight, bias, .. } => {
                    *values += weight.len() + bias.as_ref().map_or(0, |b| b.len())
                }
                Op::BinConv {
                    signs,
                    scale,
                    shift,
                    ..
                }
                | Op::BinLinear {
                    signs,
                    scale,
                    shift,
                    ..
                } => {
                    *bits += signs.len;
                    *values += scale.len() + shift.len();
                }
                Op::Affine { scale, shift, .. } => *values += scale.len() + shift.len(),
                Op::Empf {
                    leak,
                    threshold,
                    input,
                    ..
                } => {
                    *values += leak.len()
                        + threshold.len()
                        + input.as_ref().map_or(0, |(a, b)| a.len() + b.len())
                }
                Op::Parallel { threshold, .. } => *values += threshold.len(),
                Op::Lif { .. } => *values += 3,
                Op::Seca { weight, .. } => *values += weight.len() + 1,
                Op::SpikeQuant { .. } => *values += 2,
                Op::Residual { body, shortcut, .. } => {
                    count(body, bits, values);
                    count(shortcut.as_deref().unwrap_or(&[]), bits, values);
                }
                _ => {}
            }
        }
    }
    count(&model.ops, &mut bits, &mut values);
    let ideal = bits as f64 / 8.0 + 4.0 * values as f64;
    let size = model.to_bytes().len() as f64;
    assert!(
        bits > 10_000,
        "the small net has binary layers ({bits} bits)"
    );
    assert!(
        size <= 1.1 * ideal,
        "file {size} B > 1.1 x {ideal} B ({bits} binary weights, {values} other values)"
    );
}

// ------------------------------------------------------------------------------------------------
// hostile files
// ------------------------------------------------------------------------------------------------

fn small_model_bytes() -> Vec<u8> {
    let cfg = ModelConfig {
        widths: vec![4, 8, 8],
        input: [1, 8, 8],
        ..zoo::small_config()
    };
    let net = zoo::build::<f32>(&cfg, &mut Rng::new(1)).unwrap();
    export(&cfg, &net).unwrap().to_bytes()
}

/// Replace the checksum so a tampered body reaches the structural checks.
fn reseal(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 8;
    let h = fnv1a(&b[..n]);
    b[n..].copy_from_slice(&h.to_le_bytes());
    b
}

fn load_err(b: &[u8]) -> String {
    Model::from_bytes(b, "bad.empfm").unwrap_err().to_string()
}

/// Byte offset of the first op's fields (after header, op count, tag and name).
fn first_op_fields(b: &[u8]) -> usize {
    let name_len = u16::from_le_bytes([b[37], b[38]]) as usize;
    39 + name_len
}

#[test]
fn truncated_or_corrupted_model_files_give_clear_errors() {
    let b = small_model_bytes();
    assert!(Model::from_bytes(&b, "ok.empfm").is_ok());
    for cut in [0, 5, 11, 20, 40, b.len() / 2, b.len() - 1] {
        let e = load_err(&b[..cut]);
        assert!(e.contains("bad.empfm"), "{e}");
    }
    let mut c = b.clone();
    c[b.len() / 2] ^= 0x40;
    assert!(load_err(&c).contains("checksum"), "{}", load_err(&c));
    let mut m = b.clone();
    m[0] = b'X';
    assert!(load_err(&m).contains("magic"));
    let mut v = b.clone();
    v[8] = 2;
    let e = load_err(&reseal(v));
    assert!(e.contains("version 2"), "{e}");
    // truncated but resealed: the structural reader reports it
    let mut t = b[..b.len() - 30].to_vec();
    t.extend_from_slice(&[0; 8]);
    let e = load_err(&reseal(t));
    assert!(e.contains("truncated") || e.contains("left"), "{e}");
}

#[test]
fn hostile_model_files_are_rejected_before_allocating() {
    let b = small_model_bytes();
    let at = first_op_fields(&b); // the stem Conv: in, out, kernel, stride, pad u32
    // huge declared shapes: 2^20 x 2^20 x 64 x 64 weights
    let mut h = b.clone();
    h[at..at + 4].copy_from_slice(&(1u32 << 20).to_le_bytes());
    h[at + 4..at + 8].copy_from_slice(&(1u32 << 20).to_le_bytes());
    h[at + 8..at + 12].copy_from_slice(&64u32.to_le_bytes());
    let e = load_err(&reseal(h));
    assert!(e.contains("declared") && e.contains("conv1"), "{e}");
    // a dimension beyond the bound
    let mut h = b.clone();
    h[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = load_err(&reseal(h));
    assert!(e.contains("out of range"), "{e}");
    // a huge op count
    let mut h = b.clone();
    h[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = load_err(&reseal(h));
    assert!(e.contains("ops declared"), "{e}");
    // NaN in a value
    let mut h = b.clone();
    let w0 = at + 21; // after dims (20 bytes) and the bias flag
    h[w0..w0 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = load_err(&reseal(h));
    assert!(e.contains("non-finite"), "{e}");
    // unknown op tag
    let mut h = b.clone();
    h[36] = 99;
    let e = load_err(&reseal(h));
    assert!(e.contains("unknown op tag 99"), "{e}");
    // deep residual nesting: Residual { body: [Residual { body: [...] }] } 40 levels deep
    let mut d = b[..32].to_vec();
    d.extend_from_slice(&1u32.to_le_bytes());
    for _ in 0..40 {
        d.extend_from_slice(&[13, 0, 0, 1, 0, 0, 0]);
    }
    d.extend_from_slice(&[0; 8]);
    let e = load_err(&reseal(d));
    assert!(e.contains("nesting"), "{e}");
    // a model whose ops disagree with each other loads but the runtime refuses it
    let cfg = zoo::small_config();
    let net = zoo::build::<f32>(&cfg, &mut Rng::new(1)).unwrap();
    let mut model = export(&cfg, &net).unwrap();
    model.ops.remove(3);
    let m = round_trip(&model);
    let e = Runtime::new(m, Precision::Float, None, Simd::global())
        .err()
        .expect("shape mismatch")
        .to_string();
    assert!(e.contains("expected"), "{e}");
}

/// A seeded tiny ResNet-18 (widths 8,8,16,16, 16x16 input) with `neuron` N1, `seca` attention and
/// `parallel` blocks: the exported model (BasicBlocks as nested Residuals) gives the eval-mode
/// logits to 1e-4 and the same predictions, and the file round-trips.
fn check_tiny_resnet18(
    neuron: NeuronKind,
    seca: empf::model::blocks::SecaMode,
    parallel: empf::model::Parallel,
    seed: u64,
) {
    let cfg = ModelConfig {
        arch: "resnet18".into(),
        neuron,
        steps: 3,
        widths: vec![8, 8, 16, 16],
        input: [3, 16, 16],
        classes: 10,
        spike_quant: None,
        opts: empf::model::ArchOptions {
            seca,
            parallel,
            ..Default::default()
        },
    };
    let mut rng = Rng::new(seed);
    let mut net = zoo::build::<f32>(&cfg, &mut rng).unwrap();
    perturb(&mut net, seed + 1);
    let model = round_trip(&export(&cfg, &net).unwrap());
    let blocks = model
        .ops
        .iter()
        .filter(|o| matches!(o, Op::Residual { .. }))
        .count();
    assert_eq!(blocks, 8, "ResNet-18 has 8 blocks");
    let x = images(5, cfg.input, &mut rng);
    let want = eval_logits(&mut net, &x, cfg.steps);
    let got = runtime(&model, Precision::Float).run(&x).unwrap();
    let d = max_rel(&got, &want);
    assert!(d <= 1e-4, "resnet18 ({neuron}, {seca:?}) differs by {d:e}");
    assert_eq!(argmax(&got), argmax(&want));
    // k-bit modes run too: the sparse integer and the popcount kernels give the same logits
    let q = runtime(&model, Precision::Bits(4)).run(&x).unwrap();
    assert_eq!(q.shape(), got.shape());
    assert_eq!(q, runtime(&model, Precision::Popcount(4)).run(&x).unwrap());
}

#[test]
fn tiny_resnet18_exports_and_runs_like_eval_mode() {
    use empf::model::Parallel;
    use empf::model::blocks::SecaMode;
    check_tiny_resnet18(NeuronKind::V1, SecaMode::None, Parallel::Half, 21);
    check_tiny_resnet18(NeuronKind::V2, SecaMode::II, Parallel::Half, 22);
    check_tiny_resnet18(NeuronKind::V1, SecaMode::I, Parallel::All, 23);
}
