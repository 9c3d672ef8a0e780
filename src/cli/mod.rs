//! The `empf` command line: `train`, `eval`, `info`.

pub mod data;

use crate::error::{Error, Result};
use crate::metrics::MetricsLog;
use crate::model::{ModelConfig, NeuronKind};
use crate::train::optim::{OptimConfig, OptimKind};
use crate::train::step::BpMode;
use crate::train::trainer::{TrainConfig, Trainer};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

pub mod distributed;
pub mod export;
pub mod grad;
pub mod infer;
pub mod recipes;
pub mod separability;

/// empf: train and deploy EM-PF spiking neural networks on CPUs.
#[derive(Parser, Debug)]
#[command(name = "empf", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// The command.
    #[command(subcommand)]
    pub cmd: Command,
}

/// Subcommands.
// parsed once per process: the size of the `train` arguments does not matter
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a network (with no arguments: the quick start on the bundled MNIST subset).
    Train(TrainArgs),
    /// Evaluate a checkpoint on a dataset.
    Eval(EvalArgs),
    /// Show a model's layers, shapes and parameter counts.
    Info(InfoArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Compare the exact BPTT gradient with the online gradient, per layer (LIF vs EM-PF).
    Separability(separability::SeparabilityArgs),
    /// Dump parameters, inputs and both modes' gradients of one batch to an .npz.
    Grad(grad::GradArgs),
    /// Export a checkpoint to a deployable model file (1-bit weights, folded BN and Version II).
    Export(export::ExportArgs),
    /// Run a deployed model file on an MNIST-format split (float or k-bit spikes).
    Infer(infer::InferArgs),
    /// List the named training recipes (the paper's Tab. S1), or show one.
    Recipes(recipes::RecipesArgs),
}

/// `empf bench ...`.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Training images/s and peak memory over T and gradient modes (synthetic inputs).
    Train(BenchTrainArgs),
    /// Inference latency (batch 1) and throughput per precision vs the training graph's eval mode.
    Infer(infer::BenchInferArgs),
    /// Time the gradient allreduce (run under mpirun) and project data-parallel epoch times.
    Allreduce(distributed::BenchAllreduceArgs),
    /// Input-pipeline images/s (reading, augmentation, batching on the background loader).
    Data(data::BenchDataArgs),
}

/// `empf bench train`.
#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Architecture.
    #[arg(long, default_value = "mnist-cnn")]
    pub arch: String,
    /// Neuron.
    #[arg(long, default_value = "v1")]
    pub neuron: String,
    /// Channel widths.
    #[arg(long, value_delimiter = ',')]
    pub widths: Option<Vec<usize>>,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed batches per configuration.
    #[arg(long, default_value_t = 5)]
    pub batches: usize,
    /// Time-steps to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub steps: Vec<usize>,
    /// Gradient modes to measure.
    #[arg(long, value_delimiter = ',', default_value = "online,random,bptt")]
    pub modes: Vec<String>,
    /// Print the time spent in each layer.
    #[arg(long)]
    pub profile: bool,
    /// Run all configurations in this process (default: each in a fresh child process, so the
    /// peak memory of one is not inflated by pages the allocator kept from another).
    #[arg(long)]
    pub in_process: bool,
    /// Internal: print machine-readable rows (used by the child processes).
    #[arg(long, hide = true)]
    pub child_rows: bool,
    /// Measure a recipe's network (`empf recipes`) instead of `--arch`/`--neuron`/`--widths`.
    #[arg(long)]
    pub recipe: Option<String>,
    /// Train on real batches of this dataset (`KIND:PATH` as for train, or `bundled` for the
    /// bundled MNIST subset: `--batches` distinct batches of its training split) instead of one
    /// batch of uniform noise. Spike densities, and with them the work of the sparse-input
    /// kernels, follow the inputs.
    #[arg(long)]
    pub data: Option<String>,
}

/// `empf train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Dataset `KIND:PATH`, KIND one of mnist, fashion-mnist, cifar10, cifar100, folder, npz,
    /// nmnist, cifar10-dvs; a plain path is an MNIST IDX directory (default: the bundled subset).
    #[arg(long)]
    pub data: Option<String>,
    /// Augmentation list, e.g. crop:4,flip,autoaugment:cifar10,cutout:16,mixup:0.2,normalize:cifar10.
    #[arg(long)]
    pub augment: Option<String>,
    /// Image side for folder datasets, frame side for event data.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Event binning into T frames: count or time.
    #[arg(long, default_value = "count")]
    pub frames_by: String,
    /// Architecture: `small` (quick start) or `mnist-cnn` (benchmark network).
    #[arg(long, default_value = "small")]
    pub arch: String,
    /// Neuron: v1, v2, v3 (EM-PF versions) or lif.
    #[arg(long, default_value = "v1")]
    pub neuron: String,
    /// Time-steps T.
    #[arg(long, short = 'T')]
    pub steps: Option<usize>,
    /// Channel widths, comma separated (e.g. 32,64,128).
    #[arg(long, value_delimiter = ',')]
    pub widths: Option<Vec<usize>>,
    /// Epochs (default 2 for the quick-start `small` network, 1 otherwise).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate (default 0.1 for sgd, 0.001 for adam).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimiser: sgd or adam.
    #[arg(long, default_value = "sgd")]
    pub optim: String,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Plain momentum instead of Nesterov.
    #[arg(long)]
    pub no_nesterov: bool,
    /// Weight decay (not applied to BatchNorm, biases and neuron parameters unless --decay-all).
    #[arg(long, default_value_t = 5e-4)]
    pub wd: f64,
    /// Apply weight decay to every parameter.
    #[arg(long)]
    pub decay_all: bool,
    /// Linear warm-up, in epochs.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f64,
    /// Constant learning rate instead of cosine annealing.
    #[arg(long)]
    pub no_cosine: bool,
    /// Gradient mode: online, random (one random step per batch), random-K, or bptt.
    #[arg(long, default_value = "online")]
    pub bp: String,
    /// Update weights after every back-propagated step (the authors' code) instead of once per batch.
    #[arg(long)]
    pub per_step_update: bool,
    /// Master seed (initialisation, data order, random BP steps).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (default runs/<arch>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Resume from a checkpoint (default: <out>/last.npz).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<PathBuf>,
    /// Also checkpoint every N batches.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Log a step record every N batches.
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
    /// Use only N training samples, spread evenly over the set (every class of a class-sorted folder).
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Use only N test samples, spread evenly over the set.
    #[arg(long)]
    pub limit_test: Option<usize>,
    /// Stop after N batches (simulates an interrupted run; used by the resume test).
    #[arg(long, hide = true, default_value_t = 0)]
    pub stop_after_batches: u64,
    /// No progress line.
    #[arg(long, short)]
    pub quiet: bool,
    /// At each epoch end, add the BPTT-vs-online gradient agreement of the first 64 training
    /// samples to the epoch record (`sep_cosine`, `sep_cosine.<layer>`, ...).
    #[arg(long)]
    pub track_separability: bool,
    /// Quantisation-aware training of k-bit spikes (1..8): a straight-through quantiser before
    /// every binary layer, for `empf infer --precision Kbit`.
    #[arg(long)]
    pub spike_bits: Option<u32>,
    /// Quantisation step of --spike-bits (the spec's 4-bit rule: 0.25).
    #[arg(long, default_value_t = 0.25)]
    pub spike_step: f64,
    /// A named recipe (`empf recipes`): the paper's model and hyper-parameters as defaults that
    /// explicit flags override.
    #[arg(long)]
    pub recipe: Option<String>,
    /// Channel attention in residual blocks: none, i or ii (SECA_II except at down-sampling convs).
    #[arg(long)]
    pub seca: Option<String>,
    /// ResNet stem: cifar (conv3x3) or imagenet (conv7x7/s2 + max-pool).
    #[arg(long)]
    pub stem: Option<String>,
    /// Parallel neurons in residual blocks: half (N1 = --neuron, N2 = v3) or all (both v3).
    #[arg(long)]
    pub parallel: Option<String>,
}

/// `empf eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint (.npz) written by `empf train`.
    pub checkpoint: PathBuf,
    /// Dataset `KIND:PATH` as for train (default: the bundled MNIST subset).
    #[arg(long)]
    pub data: Option<String>,
    /// Normalisation used in training (e.g. cifar10, auto), as in train's `--augment normalize:...`.
    #[arg(long)]
    pub normalize: Option<String>,
    /// Image side for folder datasets, frame side for event data.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Event binning into T frames: count or time.
    #[arg(long, default_value = "count")]
    pub frames_by: String,
    /// Split: test or train.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
}

/// `empf info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// A checkpoint (.npz), an architecture (small, mnist-cnn, resnet18, resnet19, resnet34, vgg13,
    /// vgg-snn) or a recipe name (`empf recipes`).
    #[arg(default_value = "mnist-cnn")]
    pub model: String,
}

/// Run the command line.
pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            return Err(Error::Config("--threads must be at least 1".into()));
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Error::Config(format!("thread pool: {e}")))?;
    }
    match cli.cmd {
        Command::Train(a) => distributed::train(a),
        Command::Eval(a) => eval(a),
        Command::Info(a) => info(a),
        Command::Bench(BenchCmd::Train(a)) => bench_train(a),
        Command::Separability(a) => separability::run(a),
        Command::Grad(a) => grad::run(a),
        Command::Bench(BenchCmd::Infer(a)) => infer::bench(a),
        Command::Export(a) => export::run(a),
        Command::Infer(a) => infer::run(a),
        Command::Recipes(a) => recipes::run(a),
        Command::Bench(BenchCmd::Allreduce(a)) => distributed::bench_allreduce(a),
        Command::Bench(BenchCmd::Data(a)) => data::bench_data(a),
    }
}

/// The model configuration `train` builds from its arguments.
pub fn model_config(a: &TrainArgs) -> Result<ModelConfig> {
    let mut m = match a.recipe.as_deref().map(crate::recipes::find).transpose()? {
        Some(r) if r.model.arch == a.arch => r.model,
        _ => crate::model::zoo::named_config(&a.arch)?,
    };
    recipes::apply_arch_options(a, &mut m)?;
    m.neuron = NeuronKind::parse(&a.neuron)?;
    if let Some(t) = a.steps {
        m.steps = t;
    }
    if let Some(w) = &a.widths {
        if w.len() != m.widths.len() {
            return Err(Error::Config(format!(
                "--widths: `{}` takes {} widths, got {}",
                m.arch,
                m.widths.len(),
                w.len()
            )));
        }
        m.widths = w.clone();
    }
    m.spike_quant = a.spike_bits.map(|bits| crate::model::SpikeQuantConfig {
        bits,
        step: a.spike_step,
    });
    m.validate()?;
    Ok(m)
}

/// The run configuration `train` builds from its arguments.
pub fn train_config(a: &TrainArgs, model: &ModelConfig) -> Result<TrainConfig> {
    let kind = match a.optim.as_str() {
        "sgd" => OptimKind::Sgd {
            momentum: a.momentum,
            nesterov: !a.no_nesterov,
        },
        "adam" => OptimKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        o => {
            return Err(Error::Config(format!(
                "unknown optimiser `{o}` (expected sgd or adam)"
            )));
        }
    };
    let bp = BpMode::parse(&a.bp).ok_or_else(|| {
        Error::Config(format!(
            "unknown --bp `{}` (expected online, random, random-K or bptt)",
            a.bp
        ))
    })?;
    if a.batch < 2 {
        return Err(Error::Config(
            "--batch must be at least 2 (BatchNorm needs batch statistics)".into(),
        ));
    }
    let default_epochs = if a.arch == "small" { 2 } else { 1 };
    Ok(TrainConfig {
        epochs: a.epochs.unwrap_or(default_epochs),
        batch: a.batch,
        eval_batch: 256,
        lr: a.lr.unwrap_or(if matches!(kind, OptimKind::Adam { .. }) {
            1e-3
        } else {
            0.1
        }),
        warmup_epochs: a.warmup,
        cosine: !a.no_cosine,
        optim: OptimConfig {
            kind,
            weight_decay: a.wd,
            decay_all: a.decay_all,
        },
        bp,
        per_step_update: a.per_step_update,
        seed: a.seed,
        out: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&model.arch)),
        checkpoint_every: a.checkpoint_every,
        log_every: a.log_every,
        quiet: a.quiet,
        stop_after_batches: a.stop_after_batches,
    })
}

/// `empf train` on the process group `comm` (one process, or every rank of an MPI job).
pub fn train_on(a: TrainArgs, comm: std::sync::Arc<dyn crate::dist::Comm>) -> Result<()> {
    let root = comm.rank() == 0;
    let a = recipes::with_recipe(a)?;
    let model = model_config(&a)?;
    let cfg = train_config(&a, &model)?;
    use crate::train::trainer::BatchSource;
    let (mut train_set, mut test_set, data_name) = data::load_data(
        a.data.as_deref(),
        a.augment.as_deref(),
        a.image_size,
        &a.frames_by,
        model.steps,
        cfg.seed,
    )?;
    if let Some(n) = a.limit_train {
        train_set.truncate(n)?;
    }
    if let Some(n) = a.limit_test {
        test_set.truncate(n)?;
    }
    let out = cfg.out.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let resume_path = a.resume.as_ref().map(|p| {
        if p.as_os_str().is_empty() {
            out.join("last.npz")
        } else {
            p.clone()
        }
    });
    let mut model = model;
    model.input = train_set.shape();
    model.classes = train_set.classes().max(model.classes);
    if let Some(p) = &resume_path {
        // the network is rebuilt exactly as the checkpoint describes it
        model = crate::train::checkpoint::peek_model_config(p)?;
    }
    let mut rng = crate::rng::Rng::derive(cfg.seed, 0x1417);
    let net = crate::model::zoo::build::<f32>(&model, &mut rng)?;
    let mut trainer = Trainer::new(cfg, model, net);
    if a.track_separability {
        let steps = trainer.model_cfg.steps;
        let images = match &train_set {
            crate::data::spec::Source::Images(a) => &a.data,
            crate::data::spec::Source::Events(_) => {
                return Err(Error::Config(
                    "--track-separability supports image datasets, not event frames".into(),
                ));
            }
        };
        trainer.epoch_hook = Some(separability::track_hook(images, 64, steps)?);
    }
    trainer.dist = crate::dist::DataParallel::new(comm.clone());
    // only rank 0 writes metrics and checkpoints
    let mut log = if root {
        MetricsLog::open(&out, resume_path.is_some())?
    } else {
        MetricsLog::unopened(&out)
    };
    if let Some(p) = &resume_path {
        crate::train::checkpoint::load_training(p, &mut trainer)?;
        if root {
            log.truncate(trainer.pos.epoch, trainer.pos.global_step)?;
        }
        if root {
            eprintln!(
                "resumed from {} at epoch {} batch {} (step {})",
                p.display(),
                trainer.pos.epoch + 1,
                trainer.pos.batch,
                trainer.pos.global_step
            );
        }
    }
    if root {
        eprintln!(
            "training {} ({} neurons, T = {}) on {} ({} train / {} test images) with {} threads{}; bp {}; output {}",
            trainer.model_cfg.arch,
            trainer.model_cfg.neuron,
            trainer.model_cfg.steps,
            data_name,
            train_set.len(),
            test_set.len(),
            rayon::current_num_threads(),
            distributed::ranks_note(&*comm),
            trainer.cfg.bp.name(),
            out.display()
        );
    }
    let loss = |o: &crate::Tensor<f32>, y: &[usize]| {
        crate::loss::cross_entropy(o, crate::loss::Targets::Hard(y), 0.0)
    };
    let mut save = |t: &mut Trainer, name: &str| -> Result<()> {
        if !t.dist.is_root() {
            return Ok(());
        }
        let p = t.cfg.out.join(format!("{name}.npz"));
        crate::train::checkpoint::save_training(&p, t)
    };
    let ev = trainer.fit(&train_set, Some(&test_set), &loss, &mut log, &mut save)?;
    if !root {
        return Ok(());
    }
    if trainer.pos.epoch >= trainer.cfg.epochs {
        let model_path = out.join("model.npz");
        crate::train::checkpoint::save_model(&model_path, &mut trainer)?;
        if let Some(ev) = ev {
            println!(
                "test accuracy {:.2}% ({} images, T = {}); per t: {}",
                ev.acc,
                ev.n,
                trainer.model_cfg.steps,
                fmt_list(&ev.acc_per_t)
            );
        }
        println!(
            "model: {}  metrics: {}  plot: {}",
            model_path.display(),
            out.join("metrics.jsonl").display(),
            out.join("curves.svg").display()
        );
    } else {
        println!(
            "stopped at epoch {} batch {}; resume with --resume {}",
            trainer.pos.epoch + 1,
            trainer.pos.batch,
            out.join("last.npz").display()
        );
    }
    Ok(())
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|a| format!("{a:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn eval(a: EvalArgs) -> Result<()> {
    let (model, mut net) = crate::train::checkpoint::load_model(&a.checkpoint)?;
    let norm = a.normalize.as_ref().map(|n| format!("normalize:{n}"));
    let (train_set, test_set, dir) = data::load_data(
        a.data.as_deref(),
        norm.as_deref(),
        a.image_size,
        &a.frames_by,
        model.steps,
        0,
    )?;
    let data = match a.split.as_str() {
        "test" => test_set,
        "train" => train_set,
        s => {
            return Err(Error::Config(format!(
                "unknown split `{s}` (expected test or train)"
            )));
        }
    };
    let loss = |o: &crate::Tensor<f32>, y: &[usize]| {
        crate::loss::cross_entropy(o, crate::loss::Targets::Hard(y), 0.0)
    };
    // under mpirun each rank evaluates a shard and the counts are summed
    let dp = crate::dist::DataParallel::new(crate::dist::init()?);
    let ev = dp.evaluate(&mut net, model.steps, a.batch, &data, &loss)?;
    if !dp.is_root() {
        return Ok(());
    }
    println!(
        "{}: {} split of {}: accuracy {:.2}% loss {:.4} ({} images, T = {}, {:.1}s); accuracy per t: {}",
        a.checkpoint.display(),
        a.split,
        dir,
        ev.acc,
        ev.loss,
        ev.n,
        model.steps,
        ev.secs,
        fmt_list(&ev.acc_per_t)
    );
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let model = if Path::new(&a.model).exists() {
        crate::train::checkpoint::peek_model_config(Path::new(&a.model))?
    } else {
        let (m, r) = recipes::info_model(&a.model)?;
        if let Some(r) = r {
            println!("{}", recipes::describe(&r));
        }
        m
    };
    let mut rng = crate::rng::Rng::new(0);
    let mut net = crate::model::zoo::build::<f32>(&model, &mut rng)?;
    println!("{}", crate::model::zoo::info_table(&model, &mut net)?);
    Ok(())
}

impl TrainArgs {
    /// Default arguments for an architecture.
    pub fn parse_default(arch: &str) -> Self {
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: TrainArgs,
        }
        let mut a = W::parse_from(["empf"]).a;
        a.arch = arch.to_string();
        a
    }
}

/// `batches` batches of `batch` training images of `spec` (`bundled`: the bundled MNIST subset),
/// spread over the training split, for `empf bench train --data`.
fn bench_batches(
    spec: &str,
    model: &crate::model::ModelConfig,
    batch: usize,
    batches: usize,
) -> Result<Vec<(crate::tensor::Tensor<f32>, Vec<usize>)>> {
    use crate::train::trainer::BatchSource;
    let spec = (spec != "bundled").then_some(spec);
    let (train, _, desc) = data::load_data(spec, None, None, "count", model.steps, 0)?;
    if train.shape() != model.input || train.len() < batch {
        return Err(Error::Config(format!(
            "bench --data {desc}: {} images of shape {:?} for a network taking {:?} at batch {batch}",
            train.len(),
            train.shape(),
            model.input
        )));
    }
    let idx = crate::data::spec::spread_indices(train.len(), (batch * batches).min(train.len()));
    idx.chunks_exact(batch).map(|b| train.batch(b)).collect()
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    let mut ta = TrainArgs::parse_default(&a.arch);
    ta.neuron = a.neuron.clone();
    ta.widths = a.widths.clone();
    let model = match &a.recipe {
        Some(r) => crate::recipes::find(r)?.model,
        None => model_config(&ta)?,
    };
    let modes = a
        .modes
        .iter()
        .map(|m| {
            BpMode::parse(m).ok_or_else(|| {
                Error::Config(format!(
                    "unknown mode `{m}` (expected online, random, random-K or bptt)"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rows = if a.in_process || a.child_rows || modes.len() * a.steps.len() <= 1 {
        let data = match a.data.as_deref() {
            Some(spec) => bench_batches(spec, &model, a.batch, a.batches)?,
            None => Vec::new(),
        };
        let opts = crate::bench::TrainBenchOptions {
            profile: a.profile,
            data: &data,
            ..Default::default()
        };
        crate::bench::bench_train(&model, a.batch, a.batches, &modes, &a.steps, &opts)?
    } else {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Config(format!("bench: cannot find own executable: {e}")))?;
        let mut args: Vec<String> = vec![
            "--threads".into(),
            rayon::current_num_threads().to_string(),
            "bench".into(),
            "train".into(),
            "--child-rows".into(),
            "--arch".into(),
            a.arch.clone(),
            "--neuron".into(),
            a.neuron.clone(),
            "--batch".into(),
            a.batch.to_string(),
            "--batches".into(),
            a.batches.to_string(),
        ];
        if let Some(w) = &a.widths {
            args.push("--widths".into());
            args.push(
                w.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
        }
        if let Some(r) = &a.recipe {
            args.push("--recipe".into());
            args.push(r.clone());
        }
        if a.profile {
            args.push("--profile".into());
        }
        if let Some(d) = &a.data {
            args.push("--data".into());
            args.push(d.clone());
        }
        crate::bench::bench_train_isolated(&exe, &args, &modes, &a.steps)?
    };
    if a.child_rows {
        for r in &rows {
            println!("{}", crate::bench::row_line(r));
        }
        return Ok(());
    }
    print!("{}", crate::bench::format_rows(&model, a.batch, &rows));
    Ok(())
}
