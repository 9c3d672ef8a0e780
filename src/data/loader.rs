//! The input pipeline: ready training batches (augmented images with hard or soft targets, or T
//! event frames), produced on a background thread ahead of the trainer through a bounded queue.
//!
//! Determinism: a batch is a pure function of `(seed, epoch, batch number, sample indices)`
//! (see [`super::augment`]), and the queue delivers batches in order, so the training run is the
//! same whatever the relative speed of the loader and the trainer.

use super::Dataset;
use super::augment::{AugmentConfig, batch_rng, mix_batch, sample_rng};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::train::trainer::BatchSource;
use ndarray::IxDyn;
use rayon::prelude::*;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::Scope;

/// Batches the background loader keeps ready ahead of the trainer.
pub const PREFETCH_DEPTH: usize = 4;

/// What feeds the network over the time-steps.
#[derive(Clone, Debug)]
pub enum BatchInput {
    /// The same `N × C × H × W` tensor at every step (static images).
    Static(Tensor<f32>),
    /// One `N × C × H × W` frame per step (event data).
    Frames(Vec<Tensor<f32>>),
}

/// One ready batch.
#[derive(Clone, Debug)]
pub struct Batch {
    /// The input.
    pub x: BatchInput,
    /// Hard labels (for soft targets: the label of each sample before mixing).
    pub labels: Vec<usize>,
    /// Soft targets `N × classes` (Mixup / CutMix), if any.
    pub soft: Option<Tensor<f32>>,
}

impl Batch {
    /// A static batch with hard labels.
    pub fn hard(x: Tensor<f32>, labels: Vec<usize>) -> Self {
        Batch {
            x: BatchInput::Static(x),
            labels,
            soft: None,
        }
    }
}

/// Run `make(0..count)` on a background thread of `scope`, keeping at most `depth` results queued;
/// results arrive in order. Dropping the receiver stops the producer at its next send. An error is
/// sent and ends the stream.
pub fn prefetch<'scope, 'env, T, F>(
    scope: &'scope Scope<'scope, 'env>,
    depth: usize,
    count: usize,
    make: F,
) -> Receiver<Result<T>>
where
    T: Send + 'scope,
    F: Fn(usize) -> Result<T> + Send + 'scope,
{
    let (tx, rx) = sync_channel(depth.max(1));
    scope.spawn(move || {
        for k in 0..count {
            let r = make(k);
            let failed = r.is_err();
            if tx.send(r).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// Receive the next prefetched item (an error if the producer stopped early).
pub fn next<T>(rx: &Receiver<Result<T>>) -> Result<T> {
    rx.recv()
        .map_err(|_| Error::Internal("the background loader stopped early".into()))?
}

/// An image dataset with training-time augmentation driven by a seed.
#[derive(Clone, Debug)]
pub struct AugmentedImages {
    /// The images (normalisation, if any, set on the dataset).
    pub data: Dataset,
    /// The augmentation.
    pub aug: AugmentConfig,
    /// The run's seed.
    pub seed: u64,
}

impl AugmentedImages {
    /// Augmented batch `bi` of epoch `epoch` holding the samples `idx`.
    pub fn augmented(&self, idx: &[usize], epoch: usize, bi: usize) -> Result<Batch> {
        let (mut x, labels) = self.data.batch(idx)?;
        let chw = self.data.shape();
        let per = chw.iter().product::<usize>();
        let aug = &self.aug;
        if aug.autoaugment.is_some() || aug.crop.is_some() || aug.flip || aug.cutout.is_some() {
            let lut = self.data.pixel_lut();
            let out = x
                .as_slice_mut()
                .ok_or_else(|| Error::Internal("batch tensor not contiguous".into()))?;
            let hw = chw[1] * chw[2];
            out.par_chunks_mut(per).zip(idx.par_iter()).for_each_init(
                Vec::new,
                |scratch, (dst, &i)| {
                    let mut rng = sample_rng(self.seed, epoch, i);
                    let mut img = self.data.image(i).unwrap_or_default().to_vec();
                    aug.apply_image(&mut img, chw, &mut rng, scratch);
                    for (k, (d, &p)) in dst.iter_mut().zip(&img).enumerate() {
                        *d = lut[k / hw][usize::from(p)];
                    }
                    aug.apply_cutout(dst, chw, &mut rng);
                },
            );
        }
        let soft = if aug.soft_targets() {
            let out = x
                .as_slice_mut()
                .ok_or_else(|| Error::Internal("batch tensor not contiguous".into()))?;
            let k = self.data.classes();
            let mut rng = batch_rng(self.seed, epoch, bi);
            mix_batch(aug, out, chw, &labels, k, &mut rng)
                .map(|q| Tensor::from_shape_vec(IxDyn(&[labels.len(), k]), q))
                .transpose()
                .map_err(|e| Error::Internal(format!("soft targets: {e}")))?
        } else {
            None
        };
        Ok(Batch {
            x: BatchInput::Static(x),
            labels,
            soft,
        })
    }
}

impl BatchSource for AugmentedImages {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn batch(&self, idx: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)> {
        self.data.batch(idx)
    }
    fn train_batch(&self, idx: &[usize], epoch: usize, bi: usize) -> Result<Batch> {
        self.augmented(idx, epoch, bi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> Dataset {
        let px = (0..n * 3 * 8 * 8).map(|i| (i * 31 % 256) as u8).collect();
        let labels = (0..n).map(|i| (i % 3) as u16).collect();
        Dataset::new(px, labels, [3, 8, 8], 3).unwrap()
    }

    #[test]
    fn prefetch_delivers_in_order_and_stops_on_error() {
        let got: Vec<Result<usize>> = std::thread::scope(|s| {
            let rx = prefetch(s, 2, 10, |k| {
                if k == 5 {
                    Err(Error::Config("boom".into()))
                } else {
                    Ok(k * k)
                }
            });
            rx.iter().collect()
        });
        assert_eq!(got.len(), 6);
        assert_eq!(got[4].as_ref().unwrap(), &16);
        assert!(got[5].is_err());
        // dropping the receiver early does not hang
        std::thread::scope(|s| {
            let rx = prefetch(s, 1, 1000, Ok);
            assert_eq!(next(&rx).unwrap(), 0);
        });
    }

    #[test]
    fn augmented_batches_are_deterministic_and_unaugmented_source_matches_dataset() {
        let d = toy(6);
        let plain = AugmentedImages {
            data: d.clone(),
            aug: AugmentConfig::default(),
            seed: 1,
        };
        let b = plain.train_batch(&[4, 1], 0, 0).unwrap();
        let BatchInput::Static(x) = b.x else { panic!() };
        assert_eq!(x, d.batch(&[4, 1]).unwrap().0);
        let aug = AugmentedImages {
            aug: AugmentConfig::parse(
                "autoaugment:cifar10,crop:2,flip,cutout:3,mixup:0.5,cutmix:1",
            )
            .unwrap(),
            ..plain
        };
        let a1 = aug.train_batch(&[0, 2, 3, 5], 1, 7).unwrap();
        let a2 = aug.train_batch(&[0, 2, 3, 5], 1, 7).unwrap();
        let (BatchInput::Static(x1), BatchInput::Static(x2)) = (a1.x, a2.x) else {
            panic!()
        };
        assert_eq!(x1, x2);
        assert_eq!(a1.soft, a2.soft);
        assert_eq!(a1.soft.unwrap().shape(), &[4, 3]);
        let a3 = aug.train_batch(&[0, 2, 3, 5], 2, 7).unwrap();
        let BatchInput::Static(x3) = a3.x else {
            panic!()
        };
        assert_ne!(x1, x3, "another epoch must augment differently");
    }

    #[test]
    fn normalised_augmented_pixels_match_the_dataset_normalisation() {
        let d = toy(2)
            .with_normalization(&[0.5, 0.4, 0.3], &[0.2, 0.25, 0.3])
            .unwrap();
        let src = AugmentedImages {
            data: d.clone(),
            aug: AugmentConfig::parse("crop:0").unwrap(),
            seed: 0,
        };
        let BatchInput::Static(x) = src.train_batch(&[1, 0], 0, 0).unwrap().x else {
            panic!()
        };
        assert_eq!(x, d.batch(&[1, 0]).unwrap().0);
    }
}
