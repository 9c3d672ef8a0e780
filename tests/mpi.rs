//! Data parallelism over MPI (`cargo test --release --features mpi --test mpi`).
//!
//! Each test, started normally, re-runs itself (or the `empf` binary) under
//! `mpirun --oversubscribe -np 2` and checks the job's exit status; the ranks then take the
//! `launched_by_mpi()` branch and do the distributed work, panicking (→ `MPI_Abort`, non-zero exit)
//! when a check fails. Skipped with a printed reason when `mpirun` is not installed.
#![cfg(feature = "mpi")]

use empf::dist::{DataParallel, launched_by_mpi};
use empf::layers::binary::BinaryInit;
use empf::layers::neuron::EmpfV1;
use empf::layers::pool::AvgPool2d;
use empf::layers::{BinaryConv2d, Conv2d, ConvSpec, Flatten, Layer, Linear, Param, ParamKind};
use empf::metrics::MetricsLog;
use empf::model::Sequential;
use empf::rng::Rng;
use empf::train::step::BpMode;
use empf::train::trainer::{BatchSource, EvalResult, TrainConfig, Trainer, named_tensors};
use empf::{Result, Tensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mpirun() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mpirun"))
            .find(|f| f.is_file())
    })
}

/// Run `prog args` under `mpirun -np 2` (killed after `limit`); None when mpirun is missing.
fn run_mpi(prog: &Path, args: &[&str], limit: Duration) -> Option<Output> {
    let Some(mpirun) = mpirun() else {
        eprintln!("SKIPPED: mpirun not found (install openmpi-bin libopenmpi-dev)");
        return None;
    };
    let mut child = Command::new(mpirun)
        .args(["--oversubscribe", "-np", "2"])
        .arg(prog)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mpirun");
    let t0 = Instant::now();
    // drain the pipes on threads so a chatty job cannot block on a full pipe
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let ho = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).ok();
        v
    });
    let he = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t0.elapsed() > limit {
            child.kill().ok();
            panic!("the MPI job hung for more than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: ho.join().unwrap(),
        stderr: he.join().unwrap(),
    };
    eprintln!(
        "--- mpirun {args:?}: {status}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out)
}

/// Parent side of a self-running test: re-run this test binary's test `name` on 2 ranks.
fn rerun_self_on_two_ranks(name: &str) {
    let exe = std::env::current_exe().unwrap();
    if let Some(out) = run_mpi(
        &exe,
        &[name, "--exact", "--nocapture", "--test-threads", "1"],
        Duration::from_secs(120),
    ) {
        assert!(out.status.success(), "the 2-rank run of `{name}` failed");
        // the harness of each rank must have run the test (not filtered it out)
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches("1 passed").count(), 2, "{text}");
    }
}

/// 48 random 1x8x8 images in 4 classes (a class shifts the image mean).
struct Synth {
    x: Vec<f32>,
    y: Vec<usize>,
}

impl Synth {
    fn new() -> Self {
        let mut rng = Rng::new(7);
        let n = 48;
        let y: Vec<usize> = (0..n).map(|_| rng.below(4)).collect();
        let x = (0..n * 64)
            .map(|i| rng.normal() as f32 + 0.5 * y[i / 64] as f32)
            .collect();
        Synth { x, y }
    }
}

impl BatchSource for Synth {
    fn len(&self) -> usize {
        self.y.len()
    }
    fn batch(&self, idx: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)> {
        let mut v = Vec::with_capacity(idx.len() * 64);
        for &i in idx {
            v.extend_from_slice(&self.x[i * 64..(i + 1) * 64]);
        }
        let x = Tensor::from_shape_vec(vec![idx.len(), 1, 8, 8], v).unwrap();
        Ok((x, idx.iter().map(|&i| self.y[i]).collect()))
    }
}

const STEPS: usize = 3;

/// conv → EM-PF → binary conv → EM-PF → pool → linear: every layer is per-sample, so the
/// gradient of a batch is the mean of per-sample gradients (no BatchNorm coupling).
fn net_without_bn() -> Sequential<f32> {
    let mut rng = Rng::new(11);
    let mut net = Sequential::new("net");
    net.push(Conv2d::new(
        "conv1",
        ConvSpec::new(1, 4, 3).padding(1),
        true,
        &mut rng,
    ));
    net.push(EmpfV1::new("sn1", STEPS));
    net.push(BinaryConv2d::new(
        "conv2",
        ConvSpec::new(4, 4, 3).padding(1),
        BinaryInit::Kaiming,
        &mut rng,
    ));
    net.push(EmpfV1::new("sn2", STEPS));
    net.push(AvgPool2d::new("pool", 2, 2, 0).unwrap());
    net.push(Flatten::new("flatten"));
    net.push(Linear::new("fc", 4 * 4 * 4, 4, true, &mut rng));
    net
}

/// The `small` zoo network (with BatchNorm) for 1x8x8 inputs and 4 classes.
fn net_with_bn() -> (empf::model::ModelConfig, Sequential<f32>) {
    let mut m = empf::model::zoo::small_config();
    m.steps = STEPS;
    m.input = [1, 8, 8];
    m.classes = 4;
    m.widths = vec![4, 4, 4];
    let net = empf::model::zoo::build(&m, &mut Rng::new(11)).unwrap();
    (m, net)
}

fn trainer(bp: BpMode, per_step: bool) -> Trainer {
    let mut m = empf::model::zoo::small_config();
    m.steps = STEPS;
    let cfg = TrainConfig {
        epochs: 2,
        batch: 16,
        eval_batch: 10,
        lr: 0.05,
        bp,
        per_step_update: per_step,
        seed: 3,
        out: std::env::temp_dir().join("empf-mpi-test-unused"),
        log_every: 0,
        quiet: true,
        ..TrainConfig::default()
    };
    Trainer::new(cfg, m, net_without_bn())
}

fn fit(t: &mut Trainer, data: &Synth) -> EvalResult {
    let loss = |o: &Tensor<f32>, y: &[usize]| {
        empf::loss::cross_entropy(o, empf::loss::Targets::Hard(y), 0.0)
    };
    let dir = std::env::temp_dir().join(format!("empf-mpi-eq-{}", std::process::id()));
    let mut log = MetricsLog::open(&dir, false).unwrap();
    let ev = t
        .fit(data, Some(data), &loss, &mut log, &mut |_, _| Ok(()))
        .unwrap()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    ev
}

#[test]
fn two_ranks_with_half_batches_match_one_rank_with_the_whole_batch() {
    const NAME: &str = "two_ranks_with_half_batches_match_one_rank_with_the_whole_batch";
    if !launched_by_mpi() {
        return rerun_self_on_two_ranks(NAME);
    }
    let comm = empf::dist::init().unwrap();
    assert_eq!(comm.size(), 2, "run with -np 2");
    let data = Synth::new();
    for (bp, per_step) in [
        (BpMode::Online, false),
        (BpMode::Random { k: 1 }, false),
        (BpMode::Online, true),
    ] {
        // reference: one process, global batch 16
        let mut one = trainer(bp, per_step);
        let ev1 = fit(&mut one, &data);
        // this rank: 8 samples of every batch of 16, gradients averaged over the 2 ranks
        let mut two = trainer(bp, per_step);
        two.dist = DataParallel::new(comm.clone());
        let ev2 = fit(&mut two, &data);
        assert_eq!(one.pos, two.pos);
        let (w1, w2) = (named_tensors(&mut one.net), named_tensors(&mut two.net));
        let mut worst = 0.0f64;
        for ((name, _, a), (_, _, b)) in w1.iter().zip(&w2) {
            for (x, y) in a.iter().zip(b) {
                let d = (*x as f64 - *y as f64).abs() / (1.0 + x.abs() as f64);
                assert!(d < 1e-6, "{bp:?} per-step {per_step}: {name}: {x} vs {y}");
                worst = worst.max(d);
            }
        }
        // both ranks hold bit-identical weights
        let flat: Vec<f64> = w2
            .iter()
            .flat_map(|t| t.2.iter().map(|&v| v as f64))
            .collect();
        let mut sum = flat.clone();
        comm.allreduce_sum_f64(&mut sum);
        assert!(flat.iter().zip(&sum).all(|(a, s)| 2.0 * a == *s));
        // distributed evaluation covers the whole set once
        assert_eq!(ev2.n, ev1.n);
        assert!(
            (ev2.loss - ev1.loss).abs() < 1e-4,
            "{} vs {}",
            ev2.loss,
            ev1.loss
        );
        assert!((ev2.acc - ev1.acc).abs() <= 100.0 / 48.0 + 1e-9);
        println!(
            "rank {}: {bp:?} per-step {per_step}: max relative weight difference {worst:.2e}",
            comm.rank()
        );
    }
}

fn max_rel_diff(a: &mut Trainer, b: &mut Trainer, buffers: bool) -> f64 {
    let mut wa = Vec::new();
    a.net.visit_params(&mut |p: &mut Param<f32>| {
        if (p.kind == ParamKind::Buffer) == buffers {
            wa.extend(p.value.iter().copied())
        }
    });
    let mut wb = Vec::new();
    b.net.visit_params(&mut |p: &mut Param<f32>| {
        if (p.kind == ParamKind::Buffer) == buffers {
            wb.extend(p.value.iter().copied())
        }
    });
    wa.iter()
        .zip(&wb)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / (1.0 + x.abs() as f64))
        .fold(0.0, f64::max)
}

#[test]
fn with_batchnorm_two_ranks_stay_within_the_documented_tolerance_of_one_rank() {
    const NAME: &str = "with_batchnorm_two_ranks_stay_within_the_documented_tolerance_of_one_rank";
    if !launched_by_mpi() {
        return rerun_self_on_two_ranks(NAME);
    }
    let comm = empf::dist::init().unwrap();
    let data = Synth::new();
    let mk = || {
        let (m, net) = net_with_bn();
        let mut t = trainer(BpMode::Online, false);
        t.model_cfg = m;
        t.net = net;
        t
    };
    let mut one = mk();
    fit(&mut one, &data);
    let mut two = mk();
    two.dist = DataParallel::new(comm.clone());
    fit(&mut two, &data);
    // BatchNorm normalises each rank's 8 samples with their own statistics instead of the 16 of the
    // whole batch: the gradients differ by design. Documented tolerance (README): 2% relative on
    // the trained parameters after 6 updates at lr 0.05 (measured 0.7%), 10% on the running
    // statistics, which are the mean over the ranks of per-shard estimates (measured 3.6%).
    let w = max_rel_diff(&mut one, &mut two, false);
    let stats = max_rel_diff(&mut one, &mut two, true);
    println!(
        "rank {}: with BatchNorm: max relative difference {w:.2e} (running stats {stats:.2e})",
        comm.rank()
    );
    assert!(w < 2e-2, "{w}");
    assert!(stats < 1e-1, "{stats}");
    assert!(
        w > 1e-6,
        "BatchNorm's local statistics should make a visible difference: {w}"
    );
}

fn empf_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_empf"))
}

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--threads",
        "1",
        "train",
        "--arch",
        "small",
        "--widths",
        "4,8,8",
        "--limit-train",
        "192",
        "--limit-test",
        "64",
        "--epochs",
        "2",
        "--batch",
        "32",
        "--checkpoint-every",
        "2",
        "--quiet",
        "--out",
        out,
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn interrupted_two_rank_run_resumes_to_the_same_model_and_rank_0_alone_writes() {
    if launched_by_mpi() {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("empf-mpi-resume-{}", std::process::id()));
    let (full, cut) = (tmp.join("full"), tmp.join("cut"));
    let (fs, cs) = (full.to_str().unwrap(), cut.to_str().unwrap());
    let limit = Duration::from_secs(120);
    let Some(a) = run_mpi(&empf_bin(), &train_args(fs, &[]), limit) else {
        return;
    };
    assert!(a.status.success());
    let err = String::from_utf8_lossy(&a.stderr);
    // rank 0 alone logs: one start line, one line per epoch
    assert_eq!(err.matches("training small").count(), 1, "{err}");
    assert_eq!(err.matches("epoch 2:").count(), 1, "{err}");
    assert!(err.contains("on 2 MPI ranks"), "{err}");
    let m = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    assert_eq!(m.lines().count(), 2, "{m}");
    assert!(m.contains("\"ranks\": 2") && m.contains("allreduce_ms_per_update"));
    // 6 batches per epoch: stop inside epoch 2, then resume
    let b = run_mpi(
        &empf_bin(),
        &train_args(cs, &["--stop-after-batches", "9"]),
        limit,
    )
    .unwrap();
    assert!(b.status.success());
    let resume = cut.join("last.npz").to_str().unwrap().to_string();
    let c = run_mpi(&empf_bin(), &train_args(cs, &["--resume", &resume]), limit).unwrap();
    assert!(c.status.success());
    let (m1, m2) = (
        std::fs::read(full.join("model.npz")).unwrap(),
        std::fs::read(cut.join("model.npz")).unwrap(),
    );
    assert!(
        m1 == m2,
        "the resumed 2-rank run ended with a different model"
    );
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn a_rank_that_fails_ends_the_whole_job_with_a_message() {
    if launched_by_mpi() {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("empf-mpi-fail-{}", std::process::id()));
    // rank 0 cannot write its epoch-end checkpoint (a directory is in the way); rank 1 goes on into
    // epoch 2 and would wait in the next allreduce forever without the abort
    std::fs::create_dir_all(tmp.join("last.npz").join("x")).unwrap();
    let Some(out) = run_mpi(
        &empf_bin(),
        &train_args(tmp.to_str().unwrap(), &[]),
        Duration::from_secs(60),
    ) else {
        return;
    };
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MPI rank 0 of 2 failed; aborting all 2 ranks"),
        "{err}"
    );
    assert!(
        err.contains("last.npz"),
        "the message names the file: {err}"
    );
    std::fs::remove_dir_all(&tmp).ok();
}
