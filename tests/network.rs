//! Whole-network properties: gradients of a small spiking conv net against finite differences in
//! both gradient modes, and the online-memory claim (no growth with T) against BPTT.

use empf::gradcheck::{GradCheckOpts, check_unrolled};
use empf::layers::GradMode;
use empf::model::{ModelConfig, NeuronKind, zoo};
use empf::rng::Rng;
use empf::tensor::{Tensor, from_vec};
use empf::train::step::{BpMode, StepInput, train_batch};

fn tiny(neuron: NeuronKind, steps: usize) -> ModelConfig {
    ModelConfig {
        arch: "mnist-cnn".into(),
        neuron,
        steps,
        widths: vec![3, 4, 5],
        input: [1, 8, 8],
        classes: 3,
        spike_quant: None,
        opts: Default::default(),
    }
}

fn images<R: empf::Real>(n: usize, rng: &mut Rng) -> Tensor<R> {
    from_vec(
        &[n, 1, 8, 8],
        (0..n * 64).map(|_| R::of(rng.uniform())).collect(),
    )
}

#[test]
fn small_network_gradients_match_finite_differences_online_and_bptt() {
    for neuron in [NeuronKind::V1, NeuronKind::V2, NeuronKind::V3] {
        for mode in [GradMode::Online, GradMode::Bptt] {
            let cfg = tiny(neuron, 3);
            let mut rng = Rng::new(42);
            let mut net = zoo::build::<f64>(&cfg, &mut rng).unwrap();
            let x = images::<f64>(4, &mut rng);
            let xs = vec![x.clone(), x.clone(), x];
            // the latent binary weights follow the STE (checked per layer); everything else is exact;
            // the stem computes no input gradient (it is fed with images)
            let opts = GradCheckOpts {
                skip_params: vec!["conv2.weight".into(), "conv3.weight".into()],
                directions: 3,
                max_rejected_fraction: 0.25,
                check_input: false,
                ..Default::default()
            };
            let rep = check_unrolled(&mut net, &xs, true, mode, &opts).unwrap();
            rep.assert_ok(&opts, &format!("mnist-cnn/{neuron}/{mode:?}"));
            assert!(rep.checked > 20, "too few samples checked: {rep:?}");
        }
    }
}

fn peak_cache_bytes(mode: BpMode, steps: usize) -> usize {
    let cfg = ModelConfig {
        steps,
        ..tiny(NeuronKind::V1, steps)
    };
    let mut rng = Rng::new(1);
    let mut net = zoo::build::<f32>(&cfg, &mut rng).unwrap();
    let x = images::<f32>(8, &mut rng);
    let y: Vec<usize> = (0..8).map(|i| i % 3).collect();
    let mut peak = 0;
    for _ in 0..3 {
        let mut loss = |_t: usize, o: &Tensor<f32>| {
            empf::loss::cross_entropy(o, empf::loss::Targets::Hard(&y), 0.0)
        };
        let r = train_batch(
            &mut net,
            StepInput::Static(&x),
            steps,
            mode,
            &mut rng,
            &mut loss,
            None,
        )
        .unwrap();
        peak = peak.max(r.peak_cache_bytes);
    }
    peak
}

#[test]
fn online_cache_memory_does_not_grow_with_time_steps_while_bptt_does() {
    let online: Vec<usize> = [1, 2, 4, 16]
        .iter()
        .map(|&t| peak_cache_bytes(BpMode::Online, t))
        .collect();
    let bptt: Vec<usize> = [1, 2, 4, 16]
        .iter()
        .map(|&t| peak_cache_bytes(BpMode::Bptt, t))
        .collect();
    println!("peak step-cache + state bytes for T = 1, 2, 4, 16: online {online:?}, BPTT {bptt:?}");
    // T = 1 has no previous potential to keep for dL/dλ; from T = 2 on the online cache holds
    // v[t−1] at the fired neurons only, so it varies with the firing count but not with T
    assert!(online[0] > 0 && online[0] <= online[1]);
    for &b in &online[2..] {
        assert!(
            b * 20 <= online[1] * 21,
            "online caches must not grow with T: {online:?}"
        );
    }
    assert!(
        online[3] * 5 <= online[0] * 6,
        "online caches at T = 16 within 20% of T = 1: {online:?}"
    );
    // BPTT keeps one cache per step: linear growth
    assert!(
        bptt[3] >= 12 * bptt[0],
        "BPTT caches must grow with T: {bptt:?}"
    );
    assert!(bptt[2] > bptt[1] && bptt[1] > bptt[0]);
}
