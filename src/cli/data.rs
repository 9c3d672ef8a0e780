//! Data arguments of `train` / `eval` (`--data KIND:PATH`, `--augment`, `--image-size`,
//! `--frames-by`) and `empf bench data` (input-pipeline throughput).

use crate::data::augment::AugmentConfig;
use crate::data::events::FramesBy;
use crate::data::loader::{AugmentedImages, PREFETCH_DEPTH, next, prefetch};
use crate::data::spec::{DataOptions, DataSpec, Source, load};
use crate::error::{Error, Result};
use crate::train::trainer::BatchSource;
use clap::Args;
use std::time::Instant;

/// The augmentation of the CIFAR-10 ResNet-18 recipe (EMPF.md §7: crop + flip, AutoAugment,
/// Cutout, Mixup / CutMix), measured by `empf bench data`.
pub const CIFAR_RECIPE_AUGMENT: &str =
    "autoaugment:cifar10,crop:4,flip,normalize:cifar10,cutout:16,mixup:0.2,cutmix:1.0";

/// Load the train and test sources of `--data` (default: the bundled MNIST subset); returns them
/// with a description for the log.
pub fn load_data(
    data: Option<&str>,
    augment: Option<&str>,
    image_size: Option<usize>,
    frames_by: &str,
    frames: usize,
    seed: u64,
) -> Result<(Source, Source, String)> {
    let spec = match data {
        Some(s) => DataSpec::parse(s)?,
        None => DataSpec {
            kind: crate::data::spec::DataKind::Mnist,
            path: crate::data::bundled_mnist_dir(),
        },
    };
    let augment = AugmentConfig::parse(augment.unwrap_or(""))?;
    let opts = DataOptions {
        image_size,
        frames,
        frames_by: FramesBy::parse(frames_by)?,
        augment: augment.clone(),
        seed,
    };
    let (tr, te) = load(&spec, &opts)?;
    let desc = format!(
        "{} ({:?}; augment {augment})",
        spec.path.display(),
        spec.kind
    );
    Ok((tr, te, desc))
}

/// `empf bench data`.
#[derive(Args, Debug)]
pub struct BenchDataArgs {
    /// Dataset (`KIND:PATH`, as for train); default: synthetic CIFAR-size images.
    #[arg(long)]
    pub data: Option<String>,
    /// Augmentation list (default: the CIFAR-10 ResNet-18 recipe's).
    #[arg(long, default_value = CIFAR_RECIPE_AUGMENT)]
    pub augment: String,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Images to push through the pipeline.
    #[arg(long, default_value_t = 10240)]
    pub images: usize,
}

/// Measure the training input pipeline: batches per second through the background loader,
/// consumed as fast as they come.
pub fn bench_data(a: BenchDataArgs) -> Result<()> {
    if a.batch == 0 || a.images == 0 {
        return Err(Error::Config(
            "--batch and --images must be at least 1".into(),
        ));
    }
    let src = match &a.data {
        Some(d) => load_data(Some(d), Some(&a.augment), None, "count", 4, 0)?.0,
        None => {
            let n = 10_000usize;
            let mut rng = crate::rng::Rng::new(7);
            let px: Vec<u8> = (0..n * 3072).map(|_| rng.next_u64() as u8).collect();
            let labels = (0..n).map(|i| (i % 10) as u16).collect();
            let data = crate::data::Dataset::new(px, labels, [3, 32, 32], 10)?;
            let aug = AugmentConfig::parse(&a.augment)?;
            let data = match &aug.normalize {
                Some(nm) => crate::data::spec::normalise(nm, data.clone(), data)?.0,
                None => data,
            };
            Source::Images(AugmentedImages { data, aug, seed: 0 })
        }
    };
    let n = src.len();
    let batches = a.images.div_ceil(a.batch);
    let t0 = Instant::now();
    let mut done = 0usize;
    std::thread::scope(|s| -> Result<()> {
        let src = &src;
        let rx = prefetch(s, PREFETCH_DEPTH, batches, move |b| {
            let idx: Vec<usize> = (0..a.batch).map(|k| (b * a.batch + k) % n).collect();
            src.train_batch(&idx, b * a.batch / n, b)
        });
        for _ in 0..batches {
            done += next(&rx)?.labels.len();
        }
        Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "bench data: {done} images in {secs:.2}s = {:.0} images/s (batch {}, {} threads, augment {})",
        done as f64 / secs,
        a.batch,
        rayon::current_num_threads(),
        a.augment
    );
    Ok(())
}
