//! Datasets: images stored compactly as `u8` (N × C × H × W) with integer labels, fetched a
//! mini-batch at a time as `f32` NCHW tensors.
//!
//! A batch element is `x[n, c, h, w] = (img[i_n, c, h, w] / 255 - mean[c]) / std[c]`, where
//! `mean = 0`, `std = 1` unless [`Dataset::with_normalization`] set them. Static images are then
//! repeated as the input of every time-step by the trainer (EMPF.md, "direct encoding"); nothing
//! here knows about time.
//!
//! Readers: [`idx`] (MNIST, Fashion-MNIST). The quick-start subset of MNIST bundled with the
//! repository is found by [`bundled_mnist_dir`].

pub mod augment;
pub mod cifar;
pub mod events;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod npy;
pub mod spec;

pub use idx::{Mnist, load_mnist, parse_idx_bytes, read_idx};

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use ndarray::IxDyn;
use rayon::prelude::*;
use std::path::PathBuf;

/// Images (u8, N × C × H × W, row-major) with one label each.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Pixels of all images, `n * c * h * w` bytes.
    images: Vec<u8>,
    /// One label per image, each `< classes`.
    labels: Vec<u16>,
    /// `[c, h, w]` of one image.
    chw: [usize; 3],
    /// Number of classes.
    classes: usize,
    /// Per-channel mean and standard deviation applied after scaling to [0, 1].
    norm: Option<(Vec<f32>, Vec<f32>)>,
}

impl Dataset {
    /// A dataset from raw pixels (`labels.len() * c * h * w` bytes, row-major NCHW) and labels.
    ///
    /// Errors ([`Error::Shape`], layer `"Dataset"`) when the pixel count does not match, an image
    /// dimension is zero, or a label is `>= classes`.
    pub fn new(images: Vec<u8>, labels: Vec<u16>, chw: [usize; 3], classes: usize) -> Result<Self> {
        let per = chw.iter().product::<usize>();
        if per == 0 {
            return Err(Error::shape(
                "Dataset",
                "image dimensions [c, h, w] must be non-zero",
                &chw,
            ));
        }
        if classes == 0 || classes > usize::from(u16::MAX) + 1 {
            return Err(Error::Config(format!(
                "Dataset: class count must be in 1..=65536, got {classes}"
            )));
        }
        let want = labels.len().checked_mul(per);
        if want != Some(images.len()) {
            return Err(Error::shape(
                "Dataset",
                format!(
                    "{} labels of images {:?} need {} pixel bytes, got {}",
                    labels.len(),
                    chw,
                    labels.len().saturating_mul(per),
                    images.len()
                ),
                &[images.len()],
            ));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| usize::from(**l) >= classes)
        {
            return Err(Error::Config(format!(
                "Dataset: label {l} of image {i} is out of range for {classes} classes"
            )));
        }
        Ok(Dataset {
            images,
            labels,
            chw,
            classes,
            norm: None,
        })
    }

    /// Set the per-channel normalisation `x = (p / 255 - mean[c]) / std[c]` applied by
    /// [`batch`](Self::batch). `mean` and `std` have one value per channel; `std` must be > 0.
    pub fn with_normalization(mut self, mean: &[f32], std: &[f32]) -> Result<Self> {
        let c = self.chw[0];
        if mean.len() != c || std.len() != c {
            return Err(Error::shape(
                "Dataset::with_normalization",
                format!("need {c} means and {c} standard deviations"),
                &[mean.len(), std.len()],
            ));
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Config(format!(
                "Dataset::with_normalization: standard deviation {s} must be finite and > 0"
            )));
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            return Err(Error::Config(format!(
                "Dataset::with_normalization: mean {m} must be finite"
            )));
        }
        self.norm = Some((mean.to_vec(), std.to_vec()));
        Ok(self)
    }

    /// Per-channel `(mean, std)` of the pixels scaled to [0, 1], over the whole dataset (computed
    /// in f64, channel by channel in a fixed order).
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let [c, h, w] = self.chw;
        let hw = h * w;
        let mut mean = vec![0f32; c];
        let mut std = vec![0f32; c];
        let count = (self.len() * hw) as f64;
        for ch in 0..c {
            let (mut s, mut s2) = (0f64, 0f64);
            for img in self.images.chunks_exact(c * hw) {
                for &p in &img[ch * hw..(ch + 1) * hw] {
                    let x = f64::from(p) / 255.0;
                    s += x;
                    s2 += x * x;
                }
            }
            if count > 0.0 {
                let m = s / count;
                mean[ch] = m as f32;
                std[ch] = (s2 / count - m * m).max(0.0).sqrt() as f32;
            }
        }
        (mean, std)
    }

    /// The per-channel `(mean, std)` set by [`with_normalization`](Self::with_normalization).
    pub fn normalization(&self) -> Option<(&[f32], &[f32])> {
        self.norm.as_ref().map(|(m, s)| (&m[..], &s[..]))
    }

    /// Per-channel lookup table of the 256 possible pixel values:
    /// `lut[c][p] = (p / 255 - mean[c]) / std[c]` (or `p / 255` without normalisation).
    pub fn pixel_lut(&self) -> Vec<[f32; 256]> {
        (0..self.chw[0])
            .map(|ch| {
                let mut t = [0f32; 256];
                for (p, v) in t.iter_mut().enumerate() {
                    let x = p as f32 / 255.0;
                    *v = match &self.norm {
                        None => x,
                        Some((m, s)) => (x - m[ch]) / s[ch],
                    };
                }
                t
            })
            .collect()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[c, h, w]` of one image.
    pub fn shape(&self) -> [usize; 3] {
        self.chw
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// All labels.
    pub fn labels(&self) -> &[u16] {
        &self.labels
    }

    /// The raw pixels of image `i` (C × H × W bytes), or `None` when out of range.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let per = self.chw.iter().product::<usize>();
        self.images.get(i * per..(i + 1) * per)
    }

    /// How many images carry each label (`classes` counts).
    pub fn label_histogram(&self) -> Vec<usize> {
        let mut h = vec![0; self.classes];
        for &l in &self.labels {
            h[usize::from(l)] += 1;
        }
        h
    }

    fn check_indices(&self, what: &str, indices: &[usize]) -> Result<()> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::shape(
                format!("Dataset::{what}"),
                format!("index {bad} out of range for {} images", self.len()),
                &[bad],
            ));
        }
        Ok(())
    }

    /// A new dataset holding the images at `indices` (in that order; repeats allowed), keeping
    /// the class count and normalisation.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        self.check_indices("subset", indices)?;
        let per = self.chw.iter().product::<usize>();
        let mut images = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            images.extend_from_slice(&self.images[i * per..(i + 1) * per]);
        }
        Ok(Dataset {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            chw: self.chw,
            classes: self.classes,
            norm: self.norm.clone(),
        })
    }

    /// The images at `indices` as an `f32` tensor `[indices.len(), c, h, w]` (scaled to [0, 1],
    /// then normalised if set) and their labels.
    pub fn batch(&self, indices: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)> {
        let [c, h, w] = self.chw;
        let mut x = Tensor::<f32>::zeros(IxDyn(&[indices.len(), c, h, w]));
        let labels = self.batch_into(indices, &mut x)?;
        Ok((x, labels))
    }

    /// Like [`batch`](Self::batch) but writes into a caller-owned tensor of shape
    /// `[indices.len(), c, h, w]` (standard layout), so a training loop can reuse one buffer.
    pub fn batch_into(&self, indices: &[usize], x: &mut Tensor<f32>) -> Result<Vec<usize>> {
        self.check_indices("batch", indices)?;
        let [c, h, w] = self.chw;
        let want = [indices.len(), c, h, w];
        if x.shape() != want {
            return Err(Error::shape(
                "Dataset::batch_into",
                format!("output tensor must have shape {want:?}"),
                x.shape(),
            ));
        }
        let out = x.as_slice_mut().ok_or_else(|| {
            Error::shape(
                "Dataset::batch_into",
                "output tensor must be in standard (row-major) layout",
                &want,
            )
        })?;
        let per = c * h * w;
        let hw = h * w;
        let lut = self.pixel_lut();
        // Each output image is written by one task: no reduction, so the result does not depend
        // on the thread count.
        out.par_chunks_mut(per)
            .zip(indices.par_iter())
            .for_each(|(dst, &i)| {
                let src = &self.images[i * per..(i + 1) * per];
                for (ch, lut) in lut.iter().enumerate() {
                    let r = ch * hw..(ch + 1) * hw;
                    for (d, &p) in dst[r.clone()].iter_mut().zip(&src[r]) {
                        *d = lut[usize::from(p)];
                    }
                }
            });
        Ok(indices
            .iter()
            .map(|&i| usize::from(self.labels[i]))
            .collect())
    }
}

/// The directory of the MNIST subset bundled with the repository (`data/mnist-mini`, IDX files
/// with the standard MNIST names): `$EMPF_DATA` when set, else the directory baked in at compile
/// time (`<CARGO_MANIFEST_DIR>/data/mnist-mini`), so `cargo run --release -- train` works from a
/// fresh clone.
pub fn bundled_mnist_dir() -> PathBuf {
    match std::env::var_os("EMPF_DATA") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist-mini")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Dataset {
        // 3 images of 2 × 1 × 2 with pixels 0..12.
        Dataset::new((0..12).collect(), vec![0, 2, 1], [2, 1, 2], 3).unwrap()
    }

    #[test]
    fn batch_scales_to_unit_interval_in_index_order() {
        let d = toy();
        let (x, y) = d.batch(&[2, 0]).unwrap();
        assert_eq!(x.shape(), &[2, 2, 1, 2]);
        assert_eq!(y, vec![1, 0]);
        let want: Vec<f32> = [8, 9, 10, 11, 0, 1, 2, 3]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        assert_eq!(x.as_slice().unwrap(), &want[..]);
    }

    #[test]
    fn batch_applies_per_channel_normalisation() {
        let d = toy().with_normalization(&[0.5, 0.0], &[2.0, 0.25]).unwrap();
        let (x, _) = d.batch(&[1]).unwrap();
        let got = x.as_slice().unwrap();
        let want = [
            (4.0f32 / 255.0 - 0.5) / 2.0,
            (5.0f32 / 255.0 - 0.5) / 2.0,
            (6.0f32 / 255.0) / 0.25,
            (7.0f32 / 255.0) / 0.25,
        ];
        for (g, w) in got.iter().zip(want) {
            assert_eq!(*g, w);
        }
    }

    #[test]
    fn subset_keeps_images_labels_and_order() {
        let d = toy();
        let s = d.subset(&[1, 1, 0]).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.labels(), &[2, 2, 0]);
        assert_eq!(s.image(0).unwrap(), d.image(1).unwrap());
        assert_eq!(s.image(2).unwrap(), d.image(0).unwrap());
        assert_eq!(s.label_histogram(), vec![1, 0, 2]);
    }

    #[test]
    fn out_of_range_index_is_a_shape_error_naming_the_index() {
        let d = toy();
        let e = d.batch(&[0, 3]).unwrap_err().to_string();
        assert!(e.contains("Dataset::batch") && e.contains("index 3"), "{e}");
        assert!(d.subset(&[7]).is_err());
    }

    #[test]
    fn new_rejects_pixel_count_mismatch_and_bad_labels() {
        assert!(Dataset::new(vec![0; 5], vec![0, 1], [1, 1, 2], 2).is_err());
        let e = Dataset::new(vec![0; 4], vec![0, 2], [1, 1, 2], 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 2 of image 1"), "{e}");
        assert!(Dataset::new(vec![], vec![], [0, 1, 1], 2).is_err());
    }

    #[test]
    fn batch_into_rejects_wrong_output_shape() {
        let d = toy();
        let mut x = Tensor::<f32>::zeros(IxDyn(&[1, 2, 1, 2]));
        assert!(d.batch_into(&[0, 1], &mut x).is_err());
        assert_eq!(d.batch_into(&[2], &mut x).unwrap(), vec![1]);
    }

    #[test]
    fn channel_stats_of_constant_channels() {
        let d = Dataset::new(
            vec![255, 255, 0, 0, 255, 255, 0, 0],
            vec![0, 0],
            [2, 1, 2],
            1,
        )
        .unwrap();
        let (m, s) = d.channel_stats();
        assert_eq!(m, vec![1.0, 0.0]);
        assert_eq!(s, vec![0.0, 0.0]);
    }
}
