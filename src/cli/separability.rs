//! `empf separability`: the exact BPTT gradient against the online gradient of every parameter
//! (EMPF.md §2), per layer, for LIF and EM-PF versions I, II, III; and the per-epoch tracking hook
//! of `empf train --track-separability`.

use crate::cli::{TrainArgs, model_config};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::metrics::Record;
use crate::model::{ModelConfig, Sequential};
use crate::separability::{Report, analyse, cosine_svg};
use crate::tensor::Tensor;
use crate::train::step::StepInput;
use crate::train::trainer::EpochHook;
use clap::Args;
use std::path::{Path, PathBuf};

/// `empf separability`.
#[derive(Args, Debug)]
pub struct SeparabilityArgs {
    /// Checkpoints or model files (.npz) written by `empf train`; none: fresh models, one per
    /// `--neurons` entry.
    pub checkpoints: Vec<PathBuf>,
    /// Neurons of the fresh models: lif, v1, v2, v3 (ignored with checkpoints).
    #[arg(long, value_delimiter = ',', default_value = "lif,v1,v2,v3")]
    pub neurons: Vec<String>,
    /// Fresh-model settings.
    #[command(flatten)]
    pub model: FreshArgs,
    /// Data settings.
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Output directory for `separability.json` and `separability.svg`.
    #[arg(long, default_value = "runs/separability")]
    pub out: PathBuf,
}

/// How a fresh model is built (`empf separability`, `empf grad` without a checkpoint).
#[derive(Args, Debug, Clone)]
pub struct FreshArgs {
    /// Architecture of a fresh model.
    #[arg(long, default_value = "small")]
    pub arch: String,
    /// Time-steps T of a fresh model.
    #[arg(long, short = 'T')]
    pub steps: Option<usize>,
    /// Channel widths of a fresh model.
    #[arg(long, value_delimiter = ',')]
    pub widths: Option<Vec<usize>>,
    /// Seed of a fresh model's initialisation (the same as `empf train --seed`).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Which batch is used (samples `start .. start + batch` of a split).
#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// Directory with MNIST-format IDX files (default: the bundled subset).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split the batch is taken from: train or test.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// First sample of the batch.
    #[arg(long, default_value_t = 0)]
    pub start: usize,
}

impl BatchArgs {
    /// Load the batch.
    pub fn load(&self) -> Result<LoadedBatch> {
        load_batch(self.data.as_deref(), &self.split, self.start, self.batch)
    }
}

/// Images, labels, C x H x W, classes.
pub(crate) type LoadedBatch = (Tensor<f32>, Vec<usize>, [usize; 3], usize);

/// Load `batch` samples from `start` of a split: (images, labels, C x H x W, classes).
pub(crate) fn load_batch(
    data: Option<&Path>,
    split: &str,
    start: usize,
    batch: usize,
) -> Result<LoadedBatch> {
    let dir = data
        .map(Path::to_path_buf)
        .unwrap_or_else(crate::data::bundled_mnist_dir);
    let m = crate::data::idx::load_mnist(&dir)?;
    let set = match split {
        "train" => m.train,
        "test" => m.test,
        s => {
            return Err(Error::Config(format!(
                "unknown split `{s}` (expected train or test)"
            )));
        }
    };
    if batch < 2 {
        return Err(Error::Config(
            "--batch must be at least 2 (BatchNorm needs batch statistics)".into(),
        ));
    }
    if start.checked_add(batch).is_none_or(|e| e > set.len()) {
        return Err(Error::Config(format!(
            "samples {start}..{} requested, the {split} split of {} has {}",
            start.saturating_add(batch),
            dir.display(),
            set.len()
        )));
    }
    let idx: Vec<usize> = (start..start + batch).collect();
    let (x, y) = set.batch(&idx)?;
    Ok((x, y, set.shape(), set.classes()))
}

/// A fresh model for `neuron` (as `empf train` builds it for the same arguments and seed).
pub(crate) fn fresh_model(
    f: &FreshArgs,
    neuron: &str,
    input: [usize; 3],
    classes: usize,
) -> Result<(ModelConfig, Sequential<f32>)> {
    let mut ta = TrainArgs::parse_default(&f.arch);
    ta.neuron = neuron.to_string();
    ta.steps = f.steps;
    ta.widths = f.widths.clone();
    let seed = f.seed;
    let mut mc = model_config(&ta)?;
    mc.input = input;
    mc.classes = classes.max(mc.classes);
    let mut rng = crate::rng::Rng::derive(seed, 0x1417);
    let net = crate::model::zoo::build::<f32>(&mc, &mut rng)?;
    Ok((mc, net))
}

/// One report for a network on a batch (mean-over-t cross-entropy, as in training).
pub fn report_for(
    net: &mut Sequential<f32>,
    steps: usize,
    x: &Tensor<f32>,
    y: &[usize],
    label: &str,
) -> Result<Report> {
    let mut loss = |_: usize, o: &Tensor<f32>| {
        crate::loss::cross_entropy(o, crate::loss::Targets::Hard(y), 0.0)
    };
    analyse(net, StepInput::Static(x), steps, &mut loss, label)
}

/// Run `empf separability`.
pub fn run(a: SeparabilityArgs) -> Result<()> {
    let (x, y, chw, classes) = a.batch.load()?;
    let mut reports = Vec::new();
    if a.checkpoints.is_empty() {
        for n in &a.neurons {
            let (mc, mut net) = fresh_model(&a.model, n, chw, classes)?;
            let label = format!("{} (fresh)", mc.neuron);
            reports.push(report_for(&mut net, mc.steps, &x, &y, &label)?);
        }
    } else {
        for p in &a.checkpoints {
            let (mc, mut net) = crate::train::checkpoint::load_model(p)?;
            if mc.input != chw {
                return Err(Error::Config(format!(
                    "{}: the model takes {:?} inputs, the data has {chw:?}",
                    p.display(),
                    mc.input
                )));
            }
            let label = format!("{} ({})", mc.neuron, p.display());
            reports.push(report_for(&mut net, mc.steps, &x, &y, &label)?);
        }
    }
    for r in &reports {
        println!("{}", r.table());
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
    let json = format!(
        "{{\"split\": \"{}\", \"start\": {}, \"batch\": {}, \"reports\": [{}]}}\n",
        a.batch.split,
        a.batch.start,
        a.batch.batch,
        reports
            .iter()
            .map(|r| r.to_json())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let jp = a.out.join("separability.json");
    crate::io::atomic_write(&jp, |w| w.write_all(json.as_bytes()))?;
    let sp = a.out.join("separability.svg");
    let svg = cosine_svg(&reports);
    crate::io::atomic_write(&sp, |w| w.write_all(svg.as_bytes()))?;
    println!("json: {}  chart: {}", jp.display(), sp.display());
    Ok(())
}

/// The `empf train --track-separability` hook: at each epoch end, the separability report of the
/// first `batch` training samples is added to the epoch record as `sep_cosine` /
/// `sep_rel_l2` (weights and BN over the whole network), `sep_cosine.<layer>` per layer with
/// parameters, and `sep_always.<layer>`, `sep_silent.<layer>` per spiking layer.
pub fn track_hook(train: &Dataset, batch: usize, steps: usize) -> Result<EpochHook> {
    let n = batch.min(train.len());
    if n < 2 {
        return Err(Error::Config(
            "--track-separability needs at least 2 training samples".into(),
        ));
    }
    let (x, y) = train.batch(&(0..n).collect::<Vec<_>>())?;
    Ok(Box::new(move |net: &mut Sequential<f32>, rec: Record| {
        let r = report_for(net, steps, &x, &y, "track")?;
        let mut rec = rec
            .num("sep_cosine", r.synaptic.cosine)
            .num("sep_rel_l2", finite(r.synaptic.rel_l2));
        for l in &r.layers {
            if let Some(g) = l.grad {
                rec = rec.num(&format!("sep_cosine.{}", l.layer), g.cosine);
            }
            if let Some(f) = &l.firing {
                rec = rec
                    .num(&format!("sep_always.{}", l.layer), f.always())
                    .num(&format!("sep_silent.{}", l.layer), f.silent());
            }
        }
        Ok(rec)
    }))
}

fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { f64::MAX }
}
