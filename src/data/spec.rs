//! `--data KIND:PATH`: which reader, where, and the training / test sources it yields.
//!
//! | KIND | PATH | reader |
//! |---|---|---|
//! | `mnist`, `fashion-mnist` | directory of IDX files (raw or .gz) | [`super::idx`] |
//! | `cifar10` | directory of `data_batch_{1..5}.bin`, `test_batch.bin` | [`super::cifar`] |
//! | `cifar100` | directory of `train.bin`, `test.bin` | [`super::cifar`] |
//! | `folder` | ImageFolder root (with `train/` and `test/` or `val/`, or one set used for both) | [`super::folder`] |
//! | `npz` | `.npz` archive | [`super::npy`] |
//! | `nmnist` | root with `Train/<digit>/*.bin` and `Test/<digit>/*.bin` | [`super::events`] |
//! | `cifar10-dvs` | root with `<class>/*.aedat`; per class the first 90% train, the rest test | [`super::events`] |
//!
//! A plain path (no `KIND:`) is an MNIST IDX directory, as before.

use super::augment::{AugmentConfig, Normalize};
use super::events::{EventSet, FramesBy, load_event_folder};
use super::loader::{AugmentedImages, Batch};
use super::{Dataset, folder, npy};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::train::trainer::BatchSource;
use std::path::PathBuf;

/// The dataset kinds of `--data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    /// MNIST IDX.
    Mnist,
    /// Fashion-MNIST IDX.
    FashionMnist,
    /// CIFAR-10 binary.
    Cifar10,
    /// CIFAR-100 binary.
    Cifar100,
    /// ImageFolder.
    Folder,
    /// NumPy archive.
    Npz,
    /// N-MNIST events.
    Nmnist,
    /// CIFAR10-DVS events (AEDAT 2.0).
    Cifar10Dvs,
}

const KINDS: [(&str, DataKind); 8] = [
    ("mnist", DataKind::Mnist),
    ("fashion-mnist", DataKind::FashionMnist),
    ("cifar10", DataKind::Cifar10),
    ("cifar100", DataKind::Cifar100),
    ("folder", DataKind::Folder),
    ("npz", DataKind::Npz),
    ("nmnist", DataKind::Nmnist),
    ("cifar10-dvs", DataKind::Cifar10Dvs),
];

/// A parsed `--data` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSpec {
    /// Reader.
    pub kind: DataKind,
    /// File or directory.
    pub path: PathBuf,
}

impl DataSpec {
    /// Parse `KIND:PATH` (or a plain MNIST directory).
    pub fn parse(s: &str) -> Result<Self> {
        if let Some((k, p)) = s.split_once(':') {
            if let Some((_, kind)) = KINDS.iter().find(|(n, _)| *n == k) {
                if p.is_empty() {
                    return Err(Error::Config(format!("--data {s}: the path is empty")));
                }
                return Ok(DataSpec {
                    kind: *kind,
                    path: PathBuf::from(p),
                });
            }
            if !k.contains('/') && !k.contains('\\') && k.len() > 1 {
                return Err(Error::Config(format!(
                    "--data: unknown dataset kind `{k}` (known: {})",
                    KINDS.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(DataSpec {
            kind: DataKind::Mnist,
            path: PathBuf::from(s),
        })
    }

    /// Whether the kind is event data (fed as frames).
    pub fn is_events(&self) -> bool {
        matches!(self.kind, DataKind::Nmnist | DataKind::Cifar10Dvs)
    }
}

/// Reading options.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Image side for ImageFolder, frame side for events (default: 32 for folders, 34 for N-MNIST,
    /// 48 for CIFAR10-DVS).
    pub image_size: Option<usize>,
    /// Frames per event sample (the model's T).
    pub frames: usize,
    /// Event binning.
    pub frames_by: FramesBy,
    /// Augmentation of the training set (normalisation applies to both sets).
    pub augment: AugmentConfig,
    /// The run's seed.
    pub seed: u64,
}

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            image_size: None,
            frames: 4,
            frames_by: FramesBy::Count,
            augment: AugmentConfig::default(),
            seed: 0,
        }
    }
}

/// A training or test source: images (augmented when training) or event frames.
#[derive(Clone, Debug)]
pub enum Source {
    /// Static images.
    Images(AugmentedImages),
    /// Event frames.
    Events(EventSet),
}

impl Source {
    /// `[c, h, w]` of one input (one frame for events).
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Source::Images(a) => a.data.shape(),
            Source::Events(e) => e.shape(),
        }
    }
    /// Number of classes.
    pub fn classes(&self) -> usize {
        match self {
            Source::Images(a) => a.data.classes(),
            Source::Events(e) => e.classes(),
        }
    }
    /// Keep `n` samples spread evenly over the set (indices `⌊i·len/n⌋`), so that a set stored
    /// class by class (an image folder, an AEDAT tree) keeps every class; `n ≥ len` keeps all.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        let idx = spread_indices(self.len(), n);
        if idx.len() == self.len() {
            return Ok(());
        }
        match self {
            Source::Images(a) => a.data = a.data.subset(&idx)?,
            Source::Events(e) => *e = e.select(&idx)?,
        }
        Ok(())
    }
}

/// `n` indices spread evenly over `0..len` (`⌊i·len/n⌋`, strictly increasing); all of them when
/// `n ≥ len`.
pub fn spread_indices(len: usize, n: usize) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    (0..n).map(|i| i * len / n).collect()
}

impl BatchSource for Source {
    fn len(&self) -> usize {
        match self {
            Source::Images(a) => a.len(),
            Source::Events(e) => e.len(),
        }
    }
    fn batch(&self, idx: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)> {
        match self {
            Source::Images(a) => a.batch(idx),
            Source::Events(e) => e.batch(idx),
        }
    }
    fn train_batch(&self, idx: &[usize], epoch: usize, bi: usize) -> Result<Batch> {
        match self {
            Source::Images(a) => a.train_batch(idx, epoch, bi),
            Source::Events(e) => e.train_batch(idx, epoch, bi),
        }
    }
    fn eval_batch(&self, idx: &[usize]) -> Result<Batch> {
        match self {
            Source::Images(a) => a.eval_batch(idx),
            Source::Events(e) => e.eval_batch(idx),
        }
    }
}

/// The image train / test datasets of a non-event spec (no augmentation, no normalisation).
pub fn load_images(spec: &DataSpec, image_size: Option<usize>) -> Result<(Dataset, Dataset)> {
    let p = &spec.path;
    match spec.kind {
        DataKind::Mnist | DataKind::FashionMnist => {
            let m = super::idx::load_mnist(p)?;
            Ok((m.train, m.test))
        }
        DataKind::Cifar10 => super::cifar::load_cifar10(p),
        DataKind::Cifar100 => {
            let c = super::cifar::load_cifar100(p)?;
            Ok((c.train, c.test))
        }
        DataKind::Folder => {
            let (tr, te) = folder::load_folder_splits(p, 3, image_size.unwrap_or(32))?;
            Ok((tr.data, te.data))
        }
        DataKind::Npz => npy::load_npz_images(p),
        DataKind::Nmnist | DataKind::Cifar10Dvs => Err(Error::Config(format!(
            "{}: event data has no static images",
            p.display()
        ))),
    }
}

/// Apply `normalize:...` to both sets (statistics of `train` for `auto`).
pub fn normalise(n: &Normalize, train: Dataset, test: Dataset) -> Result<(Dataset, Dataset)> {
    let (m, s) = match n.stats() {
        Some((m, s)) => {
            if train.shape()[0] != 3 {
                return Err(Error::Config(format!(
                    "normalize: fixed statistics are for 3-channel images, these have {} (use normalize:auto)",
                    train.shape()[0]
                )));
            }
            (m.to_vec(), s.to_vec())
        }
        None => {
            let (m, s) = train.channel_stats();
            (m, s.into_iter().map(|v| v.max(1e-3)).collect())
        }
    };
    Ok((
        train.with_normalization(&m, &s)?,
        test.with_normalization(&m, &s)?,
    ))
}

/// Load the train and test sources of `spec`.
pub fn load(spec: &DataSpec, opts: &DataOptions) -> Result<(Source, Source)> {
    if spec.is_events() {
        let (default, train_dir, test_dir) = match spec.kind {
            DataKind::Nmnist => (34, spec.path.join("Train"), Some(spec.path.join("Test"))),
            _ => (48, spec.path.clone(), None),
        };
        let s = opts.image_size.unwrap_or(default);
        let all = load_event_folder(&train_dir, opts.frames, opts.frames_by, [s, s])?;
        let (mut train, test) = match test_dir {
            Some(d) => (
                all,
                load_event_folder(&d, opts.frames, opts.frames_by, [s, s])?,
            ),
            None => split_per_class(&all)?,
        };
        train.aug = opts.augment.clone();
        train.seed = opts.seed;
        return Ok((Source::Events(train), Source::Events(test)));
    }
    let (mut train, mut test) = load_images(spec, opts.image_size)?;
    if let Some(n) = &opts.augment.normalize {
        (train, test) = normalise(n, train, test)?;
    }
    let mk = |data: Dataset, aug: AugmentConfig| {
        Source::Images(AugmentedImages {
            data,
            aug,
            seed: opts.seed,
        })
    };
    Ok((
        mk(train, opts.augment.clone()),
        mk(test, AugmentConfig::default()),
    ))
}

/// Split an event set per class: the first 90% of each class train, the rest test.
fn split_per_class(all: &EventSet) -> Result<(EventSet, EventSet)> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); all.classes()];
    for (i, &l) in all.labels().iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    let (mut tr, mut te) = (Vec::new(), Vec::new());
    for v in by_class {
        let k = (v.len() * 9).div_ceil(10);
        tr.extend_from_slice(&v[..k]);
        te.extend_from_slice(&v[k..]);
    }
    Ok((all.select(&tr)?, all.select(&te)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_spec_parses_kinds_and_plain_paths() {
        let s = DataSpec::parse("cifar10:/d/cifar").unwrap();
        assert_eq!(s.kind, DataKind::Cifar10);
        assert_eq!(s.path, PathBuf::from("/d/cifar"));
        assert_eq!(DataSpec::parse("data/mnist").unwrap().kind, DataKind::Mnist);
        assert_eq!(
            DataSpec::parse("cifar10-dvs:x").unwrap().kind,
            DataKind::Cifar10Dvs
        );
        let e = DataSpec::parse("svhn:/x").unwrap_err().to_string();
        assert!(e.contains("unknown dataset kind `svhn`"), "{e}");
        assert!(DataSpec::parse("npz:").is_err());
    }

    #[test]
    fn cifar_directory_loads_with_normalisation_and_augmentation() {
        let dir = std::env::temp_dir().join(format!("empf-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = |l: u8| {
            let mut v = vec![l];
            v.extend((0..3072).map(|p| (p % 256) as u8));
            v
        };
        for b in 1..=5 {
            std::fs::write(
                dir.join(format!("data_batch_{b}.bin")),
                [rec(b), rec(0)].concat(),
            )
            .unwrap();
        }
        std::fs::write(dir.join("test_batch.bin"), rec(3)).unwrap();
        let spec = DataSpec::parse(&format!("cifar10:{}", dir.display())).unwrap();
        let opts = DataOptions {
            augment: AugmentConfig::parse("crop:4,flip,normalize:cifar10,mixup:0.2").unwrap(),
            ..DataOptions::default()
        };
        let (tr, te) = load(&spec, &opts).unwrap();
        assert_eq!(tr.len(), 10);
        assert_eq!(te.len(), 1);
        assert_eq!(tr.shape(), [3, 32, 32]);
        let b = tr.train_batch(&[0, 1, 2, 3], 0, 0).unwrap();
        assert_eq!(b.soft.unwrap().shape(), &[4, 10]);
        let e = te.eval_batch(&[0]).unwrap();
        assert!(e.soft.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod spread_tests {
    use super::spread_indices;

    #[test]
    fn spread_indices_cover_the_set() {
        assert_eq!(spread_indices(10, 20), (0..10).collect::<Vec<_>>());
        assert_eq!(spread_indices(10, 5), vec![0, 2, 4, 6, 8]);
        // 10 classes of 5000 sorted by class: 1000 samples take 100 of each
        let idx = spread_indices(50_000, 1000);
        for c in 0..10 {
            assert_eq!(idx.iter().filter(|&&i| i / 5000 == c).count(), 100);
        }
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
    }
}
