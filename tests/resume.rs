//! A run interrupted mid-epoch and resumed from its last checkpoint ends with the same weights as an
//! uninterrupted run with the same seed and thread count.

use empf::data::idx::load_mnist;
use empf::metrics::MetricsLog;
use empf::model::{ModelConfig, NeuronKind, zoo};
use empf::rng::Rng;
use empf::train::checkpoint::{load_training, save_training};
use empf::train::step::BpMode;
use empf::train::trainer::{TrainConfig, Trainer, named_tensors};
use std::path::Path;

fn config(out: &Path, bp: BpMode) -> (TrainConfig, ModelConfig) {
    let tc = TrainConfig {
        epochs: 2,
        batch: 16,
        eval_batch: 64,
        lr: 0.05,
        bp,
        seed: 7,
        out: out.to_path_buf(),
        checkpoint_every: 3,
        log_every: 2,
        quiet: true,
        ..Default::default()
    };
    let mc = ModelConfig {
        arch: "small".into(),
        neuron: NeuronKind::V1,
        steps: 2,
        widths: vec![4, 6, 8],
        input: [1, 28, 28],
        classes: 10,
        spike_quant: None,
        opts: Default::default(),
    };
    (tc, mc)
}

fn run(
    out: &Path,
    bp: BpMode,
    stop_after: u64,
    resume: bool,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mnist = load_mnist(empf::data::bundled_mnist_dir()).expect("bundled MNIST subset");
    let train = mnist.train.subset(&(0..160).collect::<Vec<_>>()).unwrap();
    let test = mnist.test.subset(&(0..64).collect::<Vec<_>>()).unwrap();
    let (mut tc, mc) = config(out, bp);
    tc.stop_after_batches = stop_after;
    let net = zoo::build::<f32>(&mc, &mut Rng::derive(tc.seed, 0x1417)).unwrap();
    let mut t = Trainer::new(tc, mc, net);
    let mut log = MetricsLog::open(out, resume).unwrap();
    if resume {
        load_training(&out.join("last.npz"), &mut t).unwrap();
    }
    let loss = |o: &empf::Tensor<f32>, y: &[usize]| {
        empf::loss::cross_entropy(o, empf::loss::Targets::Hard(y), 0.0)
    };
    let mut save =
        |t: &mut Trainer, name: &str| save_training(&t.cfg.out.join(format!("{name}.npz")), t);
    t.fit(&train, Some(&test), &loss, &mut log, &mut save)
        .unwrap();
    named_tensors(&mut t.net)
}

#[test]
fn interrupted_and_resumed_run_ends_with_the_same_weights() {
    for bp in [BpMode::Online, BpMode::Random { k: 1 }] {
        let base =
            std::env::temp_dir().join(format!("empf-resume-{}-{}", std::process::id(), bp.name()));
        let (a, b) = (base.join("a"), base.join("b"));
        let _ = std::fs::remove_dir_all(&base);
        let full = run(&a, bp, 0, false);
        // 10 batches per epoch; stop after 14 (mid-epoch 2, last checkpoint at batch 3 of epoch 2)
        run(&b, bp, 14, false);
        let resumed = run(&b, bp, 0, true);
        assert_eq!(full.len(), resumed.len());
        for (x, y) in full.iter().zip(&resumed) {
            assert_eq!(x.0, y.0);
            assert!(
                x.2 == y.2,
                "parameter {} differs after resume ({})",
                x.0,
                bp.name()
            );
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
