//! Data augmentation, driven entirely by the run's seed.
//!
//! One textual syntax serves the CLI (`--augment`) and recipes: a comma-separated list of
//! `name` or `name:value` items, e.g. `crop:4,flip,autoaugment:cifar10,cutout:16,mixup:0.2,cutmix:1.0`.
//!
//! | item | effect |
//! |---|---|
//! | `crop:P` | pad each side by `P` zero pixels, crop a random window of the original size |
//! | `flip` | horizontal flip with probability 1/2 (event frames: the same) |
//! | `autoaugment:cifar10` / `autoaugment:imagenet` | one of the 25 sub-policies of AutoAugment (Cubuk et al. 2019; the tables and magnitudes of torchvision) |
//! | `cutout:S` | zero (after normalisation) one random `S × S` square, clipped at the borders (DeVries & Taylor 2017) |
//! | `mixup:A` | Mixup with `λ ~ Beta(A, A)`: `x = λ x_i + (1 − λ) x_j`, soft targets |
//! | `cutmix:A` | CutMix with `λ ~ Beta(A, A)`: a box of area `(1 − λ)` from `x_j`, soft targets weighted by the exact box area |
//! | `normalize:cifar10`, `normalize:cifar100`, `normalize:imagenet`, `normalize:auto` | per-channel `(x − mean) / std` (the usual published statistics, or computed from the training set); also applied to the test set |
//! | `roll:R` | event frames: shift all frames by a random `(dx, dy) ∈ [−R, R]²`, wrapping around |
//!
//! When both `mixup` and `cutmix` are given each batch uses one of them, chosen with probability 1/2.
//! Order of application per image: AutoAugment (on u8 pixels), crop, flip, scaling + normalisation,
//! Cutout; then per batch Mixup or CutMix.
//!
//! Randomness: image `i` of epoch `e` draws from `Rng::derive(seed, SAMPLE ^ e << 32 ^ i)`, batch `b` of
//! epoch `e` (the Mixup / CutMix partner permutation and `λ`) from `Rng::derive(seed, BATCH ^ e << 32 ^ b)`,
//! so the augmented data depend only on `(seed, epoch, index)`, never on thread scheduling.

use crate::error::{Error, Result};
use crate::rng::Rng;
use std::fmt;

/// Stream tag of per-sample augmentation randomness.
const SAMPLE_STREAM: u64 = 0xA06_0000_0000_0000;
/// Stream tag of per-batch (Mixup / CutMix) randomness.
const BATCH_STREAM: u64 = 0xB47_0000_0000_0000;

/// The random generator of image `index` in epoch `epoch`.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> Rng {
    Rng::derive(seed, SAMPLE_STREAM ^ ((epoch as u64) << 32) ^ index as u64)
}

/// The random generator of batch `batch` in epoch `epoch`.
pub fn batch_rng(seed: u64, epoch: usize, batch: usize) -> Rng {
    Rng::derive(seed, BATCH_STREAM ^ ((epoch as u64) << 32) ^ batch as u64)
}

/// AutoAugment policy table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoAugmentPolicy {
    /// The CIFAR-10 policy.
    Cifar10,
    /// The ImageNet policy.
    Imagenet,
}

/// Per-channel normalisation statistics.
#[derive(Clone, Debug, PartialEq)]
pub enum Normalize {
    /// CIFAR-10 mean / std.
    Cifar10,
    /// CIFAR-100 mean / std.
    Cifar100,
    /// ImageNet mean / std.
    Imagenet,
    /// Computed from the training set.
    Auto,
}

impl Normalize {
    /// `(mean, std)` of the fixed statistics (3 channels), or `None` for [`Normalize::Auto`].
    pub fn stats(&self) -> Option<([f32; 3], [f32; 3])> {
        match self {
            Normalize::Cifar10 => Some(([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])),
            Normalize::Cifar100 => Some(([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762])),
            Normalize::Imagenet => Some(([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])),
            Normalize::Auto => None,
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Normalize::Cifar10 => "cifar10",
            Normalize::Cifar100 => "cifar100",
            Normalize::Imagenet => "imagenet",
            Normalize::Auto => "auto",
        }
    }
}

/// A parsed augmentation list (see the module documentation for the syntax).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AugmentConfig {
    /// Random crop with this zero padding.
    pub crop: Option<usize>,
    /// Random horizontal flip.
    pub flip: bool,
    /// AutoAugment policy.
    pub autoaugment: Option<AutoAugmentPolicy>,
    /// Cutout square side.
    pub cutout: Option<usize>,
    /// Mixup Beta parameter.
    pub mixup: Option<f64>,
    /// CutMix Beta parameter.
    pub cutmix: Option<f64>,
    /// Normalisation.
    pub normalize: Option<Normalize>,
    /// Event roll radius.
    pub roll: Option<usize>,
}

fn num<T: std::str::FromStr>(item: &str, v: Option<&str>) -> Result<T> {
    let v = v.ok_or_else(|| {
        Error::Config(format!("augmentation `{item}` needs a value (`{item}:N`)"))
    })?;
    v.trim()
        .parse()
        .map_err(|_| Error::Config(format!("augmentation `{item}`: bad value `{v}`")))
}

impl AugmentConfig {
    /// Parse `crop:4,flip,...`; an empty string or `none` is no augmentation. Unknown names,
    /// repeated names, missing or bad values are errors.
    pub fn parse(s: &str) -> Result<Self> {
        let mut c = AugmentConfig::default();
        let mut seen = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if item == "none" {
                continue;
            }
            let (name, val) = match item.split_once(':') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (item, None),
            };
            if seen.contains(&name) {
                return Err(Error::Config(format!("augmentation `{name}` given twice")));
            }
            seen.push(name);
            let no_value = |c: &mut AugmentConfig| -> Result<()> {
                if val.is_some() {
                    return Err(Error::Config(format!(
                        "augmentation `{name}` takes no value"
                    )));
                }
                let _ = c;
                Ok(())
            };
            match name {
                "crop" => c.crop = Some(num(name, val)?),
                "flip" => {
                    no_value(&mut c)?;
                    c.flip = true
                }
                "autoaugment" => {
                    c.autoaugment = Some(match val.unwrap_or("cifar10") {
                        "cifar" | "cifar10" => AutoAugmentPolicy::Cifar10,
                        "imagenet" => AutoAugmentPolicy::Imagenet,
                        v => {
                            return Err(Error::Config(format!(
                                "autoaugment policy `{v}` unknown (cifar10 or imagenet)"
                            )));
                        }
                    })
                }
                "cutout" => {
                    let s: usize = num(name, val)?;
                    if s == 0 {
                        return Err(Error::Config("cutout size must be at least 1".into()));
                    }
                    c.cutout = Some(s)
                }
                "mixup" | "cutmix" => {
                    let a: f64 = num(name, val)?;
                    if !(a.is_finite() && a > 0.0) {
                        return Err(Error::Config(format!(
                            "{name}: the Beta parameter must be > 0, got {a}"
                        )));
                    }
                    if name == "mixup" {
                        c.mixup = Some(a)
                    } else {
                        c.cutmix = Some(a)
                    }
                }
                "normalize" | "norm" => {
                    c.normalize = Some(match val.unwrap_or("auto") {
                        "cifar" | "cifar10" => Normalize::Cifar10,
                        "cifar100" => Normalize::Cifar100,
                        "imagenet" => Normalize::Imagenet,
                        "auto" => Normalize::Auto,
                        v => {
                            return Err(Error::Config(format!(
                                "normalize: unknown statistics `{v}` (cifar10, cifar100, imagenet or auto)"
                            )));
                        }
                    })
                }
                "roll" => c.roll = Some(num(name, val)?),
                _ => {
                    return Err(Error::Config(format!(
                        "unknown augmentation `{name}` (known: crop:P, flip, autoaugment:cifar10|imagenet, \
                         cutout:S, mixup:A, cutmix:A, normalize:cifar10|cifar100|imagenet|auto, roll:R)"
                    )));
                }
            }
        }
        Ok(c)
    }

    /// Whether batches get soft targets.
    pub fn soft_targets(&self) -> bool {
        self.mixup.is_some() || self.cutmix.is_some()
    }

    /// Whether any per-image (u8) augmentation is on.
    fn per_image(&self) -> bool {
        self.crop.is_some() || self.flip || self.autoaugment.is_some()
    }

    /// Augment one `C × H × W` u8 image in place (AutoAugment, crop, flip).
    pub fn apply_image(
        &self,
        img: &mut [u8],
        chw: [usize; 3],
        rng: &mut Rng,
        scratch: &mut Vec<u8>,
    ) {
        if !self.per_image() {
            return;
        }
        if let Some(p) = self.autoaugment {
            autoaugment(img, chw, p, rng, scratch);
        }
        if let Some(pad) = self.crop {
            random_crop(img, chw, pad, rng, scratch);
        }
        if self.flip && rng.below(2) == 1 {
            hflip(img, chw);
        }
    }

    /// Cutout on one normalised `C × H × W` image.
    pub fn apply_cutout(&self, x: &mut [f32], chw: [usize; 3], rng: &mut Rng) {
        if let Some(s) = self.cutout {
            cutout(x, chw, s, rng);
        }
    }
}

impl fmt::Display for AugmentConfig {
    /// The canonical text form (parses back to the same configuration).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut v: Vec<String> = Vec::new();
        if let Some(p) = self.autoaugment {
            v.push(format!(
                "autoaugment:{}",
                if p == AutoAugmentPolicy::Cifar10 {
                    "cifar10"
                } else {
                    "imagenet"
                }
            ));
        }
        if let Some(p) = self.crop {
            v.push(format!("crop:{p}"));
        }
        if self.flip {
            v.push("flip".into());
        }
        if let Some(n) = &self.normalize {
            v.push(format!("normalize:{}", n.name()));
        }
        if let Some(s) = self.cutout {
            v.push(format!("cutout:{s}"));
        }
        if let Some(a) = self.mixup {
            v.push(format!("mixup:{a}"));
        }
        if let Some(a) = self.cutmix {
            v.push(format!("cutmix:{a}"));
        }
        if let Some(r) = self.roll {
            v.push(format!("roll:{r}"));
        }
        if v.is_empty() {
            write!(f, "none")
        } else {
            write!(f, "{}", v.join(","))
        }
    }
}

/// Pad by `pad` zeros on each side and crop a random `H × W` window.
pub fn random_crop(
    img: &mut [u8],
    [c, h, w]: [usize; 3],
    pad: usize,
    rng: &mut Rng,
    scratch: &mut Vec<u8>,
) {
    if pad == 0 {
        return;
    }
    // window origin in padded coordinates: 0..=2·pad; offset relative to the image: −pad..=pad
    let dy = rng.below(2 * pad + 1) as isize - pad as isize;
    let dx = rng.below(2 * pad + 1) as isize - pad as isize;
    shift(img, [c, h, w], dx, dy, scratch);
}

/// out(y, x) = in(y + dy, x + dx), zero outside.
fn shift(img: &mut [u8], [c, h, w]: [usize; 3], dx: isize, dy: isize, scratch: &mut Vec<u8>) {
    scratch.clear();
    scratch.extend_from_slice(img);
    for ch in 0..c {
        for y in 0..h {
            let sy = y as isize + dy;
            for x in 0..w {
                let sx = x as isize + dx;
                img[(ch * h + y) * w + x] =
                    if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                        scratch[(ch * h + sy as usize) * w + sx as usize]
                    } else {
                        0
                    };
            }
        }
    }
}

/// Mirror left-right.
pub fn hflip<T>(img: &mut [T], [_, _, w]: [usize; 3]) {
    for row in img.chunks_exact_mut(w) {
        row.reverse();
    }
}

/// Zero one `s × s` square (centre uniform over the image, clipped at the borders).
pub fn cutout(x: &mut [f32], [c, h, w]: [usize; 3], s: usize, rng: &mut Rng) {
    let cy = rng.below(h) as isize;
    let cx = rng.below(w) as isize;
    let half = (s / 2) as isize;
    let y0 = (cy - half).clamp(0, h as isize) as usize;
    let y1 = (cy - half + s as isize).clamp(0, h as isize) as usize;
    let x0 = (cx - half).clamp(0, w as isize) as usize;
    let x1 = (cx - half + s as isize).clamp(0, w as isize) as usize;
    for ch in 0..c {
        for y in y0..y1 {
            x[(ch * h + y) * w + x0..(ch * h + y) * w + x1].fill(0.0);
        }
    }
}

/// A Gamma(a, 1) variate (Marsaglia & Tsang; `a < 1` through `Gamma(a + 1) · U^{1/a}`).
pub fn gamma(rng: &mut Rng, a: f64) -> f64 {
    if a < 1.0 {
        let u = rng.uniform().max(f64::MIN_POSITIVE);
        return gamma(rng, a + 1.0) * u.powf(1.0 / a);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let z = rng.normal();
        let v = (1.0 + c * z).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.uniform();
        if u < 1.0 - 0.0331 * z.powi(4)
            || u.max(f64::MIN_POSITIVE).ln() < 0.5 * z * z + d * (1.0 - v + v.ln())
        {
            return d * v;
        }
    }
}

/// A Beta(a, a) variate.
pub fn beta(rng: &mut Rng, a: f64) -> f64 {
    let x = gamma(rng, a);
    let y = gamma(rng, a);
    if x + y > 0.0 { x / (x + y) } else { 0.5 }
}

/// Mix a batch `x` (`N × C × H × W`, flat) in place with Mixup or CutMix as `cfg` says, drawing
/// from `rng`. Returns the soft targets (`N × classes`, flat) built from `labels`, or `None` when
/// neither is on.
pub fn mix_batch(
    cfg: &AugmentConfig,
    x: &mut [f32],
    chw: [usize; 3],
    labels: &[usize],
    classes: usize,
    rng: &mut Rng,
) -> Option<Vec<f32>> {
    let n = labels.len();
    let use_cutmix = match (cfg.mixup, cfg.cutmix) {
        (None, None) => return None,
        (Some(_), None) => false,
        (None, Some(_)) => true,
        (Some(_), Some(_)) => rng.below(2) == 1,
    };
    let mut perm: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut perm);
    let [c, h, w] = chw;
    let per = c * h * w;
    let src = x.to_vec();
    let lam = if use_cutmix {
        let l = beta(rng, cfg.cutmix.unwrap_or(1.0));
        let r = (1.0 - l).sqrt();
        let (bh, bw) = ((h as f64 * r) as usize, (w as f64 * r) as usize);
        let cy = rng.below(h) as isize;
        let cx = rng.below(w) as isize;
        let y0 = (cy - (bh / 2) as isize).clamp(0, h as isize) as usize;
        let y1 = (cy + (bh - bh / 2) as isize).clamp(0, h as isize) as usize;
        let x0 = (cx - (bw / 2) as isize).clamp(0, w as isize) as usize;
        let x1 = (cx + (bw - bw / 2) as isize).clamp(0, w as isize) as usize;
        for (i, &j) in perm.iter().enumerate() {
            for ch in 0..c {
                for y in y0..y1 {
                    let o = (ch * h + y) * w;
                    x[i * per + o + x0..i * per + o + x1]
                        .copy_from_slice(&src[j * per + o + x0..j * per + o + x1]);
                }
            }
        }
        1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64
    } else {
        let l = beta(rng, cfg.mixup.unwrap_or(1.0));
        let (a, b) = (l as f32, (1.0 - l) as f32);
        for (i, &j) in perm.iter().enumerate() {
            for (d, s) in x[i * per..(i + 1) * per]
                .iter_mut()
                .zip(&src[j * per..(j + 1) * per])
            {
                *d = a * *d + b * s;
            }
        }
        l
    };
    let mut q = vec![0f32; n * classes];
    for (i, &j) in perm.iter().enumerate() {
        q[i * classes + labels[i]] += lam as f32;
        q[i * classes + labels[j]] += (1.0 - lam) as f32;
    }
    Some(q)
}

// ---------------------------------------------------------------------------------------------
// AutoAugment

/// The operations of AutoAugment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Shear along x.
    ShearX,
    /// Shear along y.
    ShearY,
    /// Translate along x.
    TranslateX,
    /// Translate along y.
    TranslateY,
    /// Rotate about the centre.
    Rotate,
    /// Blend with a black image.
    Brightness,
    /// Blend with the grey version (saturation).
    Color,
    /// Blend with the mean grey level.
    Contrast,
    /// Blend with a smoothed image.
    Sharpness,
    /// Keep the top bits.
    Posterize,
    /// Invert pixels above a threshold.
    Solarize,
    /// Stretch each channel to 0..255.
    AutoContrast,
    /// Histogram-equalise each channel.
    Equalize,
    /// 255 − p.
    Invert,
}

use Op::*;

/// One sub-policy: two (operation, probability, magnitude bin 0..=9) triples.
pub type SubPolicy = [(Op, f32, u8); 2];

/// The 25 sub-policies of the AutoAugment CIFAR-10 policy.
pub const CIFAR10_POLICY: [SubPolicy; 25] = [
    [(Invert, 0.1, 0), (Contrast, 0.2, 6)],
    [(Rotate, 0.7, 2), (TranslateX, 0.3, 9)],
    [(Sharpness, 0.8, 1), (Sharpness, 0.9, 3)],
    [(ShearY, 0.5, 8), (TranslateY, 0.7, 9)],
    [(AutoContrast, 0.5, 0), (Equalize, 0.9, 0)],
    [(ShearY, 0.2, 7), (Posterize, 0.3, 7)],
    [(Color, 0.4, 3), (Brightness, 0.6, 7)],
    [(Sharpness, 0.3, 9), (Brightness, 0.7, 9)],
    [(Equalize, 0.6, 0), (Equalize, 0.5, 0)],
    [(Contrast, 0.6, 7), (Sharpness, 0.6, 5)],
    [(Color, 0.7, 7), (TranslateX, 0.5, 8)],
    [(Equalize, 0.3, 0), (AutoContrast, 0.4, 0)],
    [(TranslateY, 0.4, 3), (Sharpness, 0.2, 6)],
    [(Brightness, 0.9, 6), (Color, 0.2, 8)],
    [(Solarize, 0.5, 2), (Invert, 0.0, 0)],
    [(Equalize, 0.2, 0), (AutoContrast, 0.6, 0)],
    [(Equalize, 0.2, 0), (Equalize, 0.6, 0)],
    [(Color, 0.9, 9), (Equalize, 0.6, 0)],
    [(AutoContrast, 0.8, 0), (Solarize, 0.2, 8)],
    [(Brightness, 0.1, 3), (Color, 0.7, 0)],
    [(Solarize, 0.4, 5), (AutoContrast, 0.9, 0)],
    [(TranslateY, 0.9, 9), (TranslateY, 0.7, 9)],
    [(AutoContrast, 0.9, 0), (Solarize, 0.8, 3)],
    [(Equalize, 0.8, 0), (Invert, 0.1, 0)],
    [(TranslateY, 0.7, 9), (AutoContrast, 0.9, 0)],
];

/// The 25 sub-policies of the AutoAugment ImageNet policy.
pub const IMAGENET_POLICY: [SubPolicy; 25] = [
    [(Posterize, 0.4, 8), (Rotate, 0.6, 9)],
    [(Solarize, 0.6, 5), (AutoContrast, 0.6, 0)],
    [(Equalize, 0.8, 0), (Equalize, 0.6, 0)],
    [(Posterize, 0.6, 7), (Posterize, 0.6, 6)],
    [(Equalize, 0.4, 0), (Solarize, 0.2, 4)],
    [(Equalize, 0.4, 0), (Rotate, 0.8, 8)],
    [(Solarize, 0.6, 3), (Equalize, 0.6, 0)],
    [(Posterize, 0.8, 5), (Equalize, 1.0, 0)],
    [(Rotate, 0.2, 3), (Solarize, 0.6, 8)],
    [(Equalize, 0.6, 0), (Posterize, 0.4, 6)],
    [(Rotate, 0.8, 8), (Color, 0.4, 0)],
    [(Rotate, 0.4, 9), (Equalize, 0.6, 0)],
    [(Equalize, 0.0, 0), (Equalize, 0.8, 0)],
    [(Invert, 0.6, 0), (Equalize, 1.0, 0)],
    [(Color, 0.6, 4), (Contrast, 1.0, 8)],
    [(Rotate, 0.8, 8), (Color, 1.0, 2)],
    [(Color, 0.8, 8), (Solarize, 0.8, 7)],
    [(Sharpness, 0.4, 7), (Invert, 0.6, 0)],
    [(ShearX, 0.6, 5), (Equalize, 1.0, 0)],
    [(Color, 0.4, 0), (Equalize, 0.6, 0)],
    [(Equalize, 0.4, 0), (Solarize, 0.2, 4)],
    [(Solarize, 0.6, 5), (AutoContrast, 0.6, 0)],
    [(Invert, 0.6, 0), (Equalize, 1.0, 0)],
    [(Color, 0.6, 4), (Contrast, 1.0, 8)],
    [(Equalize, 0.8, 0), (Equalize, 0.6, 0)],
];

/// Apply one random sub-policy of `policy`.
pub fn autoaugment(
    img: &mut [u8],
    chw: [usize; 3],
    policy: AutoAugmentPolicy,
    rng: &mut Rng,
    scratch: &mut Vec<u8>,
) {
    let table = match policy {
        AutoAugmentPolicy::Cifar10 => &CIFAR10_POLICY,
        AutoAugmentPolicy::Imagenet => &IMAGENET_POLICY,
    };
    let sub = table[rng.below(table.len())];
    for (op, p, mag) in sub {
        // draw the probability and the sign every time, so the stream does not depend on outcomes
        let go = rng.uniform() < f64::from(p);
        let neg = rng.below(2) == 1;
        if go {
            apply_op(img, chw, op, mag, neg, scratch);
        }
    }
}

/// Apply `op` at magnitude bin `mag` (0..=9; torchvision's magnitude ranges) with the sign `neg`
/// for signed operations.
pub fn apply_op(
    img: &mut [u8],
    chw: [usize; 3],
    op: Op,
    mag: u8,
    neg: bool,
    scratch: &mut Vec<u8>,
) {
    let [_, h, w] = chw;
    let m = f64::from(mag.min(9)) / 9.0;
    let s = if neg { -1.0 } else { 1.0 };
    match op {
        ShearX => affine(img, chw, [1.0, s * 0.3 * m, 0.0, 0.0, 1.0, 0.0], scratch),
        ShearY => affine(img, chw, [1.0, 0.0, 0.0, s * 0.3 * m, 1.0, 0.0], scratch),
        TranslateX => {
            let t = s * 150.0 / 331.0 * w as f64 * m;
            affine(img, chw, [1.0, 0.0, t, 0.0, 1.0, 0.0], scratch)
        }
        TranslateY => {
            let t = s * 150.0 / 331.0 * h as f64 * m;
            affine(img, chw, [1.0, 0.0, 0.0, 0.0, 1.0, t], scratch)
        }
        Rotate => {
            let a = (s * 30.0 * m).to_radians();
            let (sn, cs) = a.sin_cos();
            // inverse map about the centre: src = R(−a)(dst − c) + c
            let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
            affine(
                img,
                chw,
                [
                    cs,
                    sn,
                    cx - cs * cx - sn * cy,
                    -sn,
                    cs,
                    cy + sn * cx - cs * cy,
                ],
                scratch,
            )
        }
        Brightness => {
            let f = 1.0 + s * 0.9 * m;
            for p in img.iter_mut() {
                *p = clamp_u8(f * f64::from(*p));
            }
        }
        Color => {
            let f = 1.0 + s * 0.9 * m;
            let grey = greyscale(img, chw);
            blend_with(img, chw, f, |_, i| grey[i]);
        }
        Contrast => {
            let f = 1.0 + s * 0.9 * m;
            let grey = greyscale(img, chw);
            let mean = grey.iter().map(|&g| f64::from(g)).sum::<f64>() / grey.len().max(1) as f64;
            let mean = mean.round();
            for p in img.iter_mut() {
                *p = clamp_u8(mean + f * (f64::from(*p) - mean));
            }
        }
        Sharpness => {
            let f = 1.0 + s * 0.9 * m;
            scratch.clear();
            scratch.extend_from_slice(img);
            let c = chw[0];
            for ch in 0..c {
                for y in 1..h.saturating_sub(1) {
                    for x in 1..w.saturating_sub(1) {
                        let mut acc = 0u32;
                        for dy in 0..3 {
                            for dx in 0..3 {
                                let k = if dy == 1 && dx == 1 { 5 } else { 1 };
                                acc +=
                                    k * u32::from(scratch[(ch * h + y + dy - 1) * w + x + dx - 1]);
                            }
                        }
                        let blur = ((acc as f64) / 13.0).round();
                        let i = (ch * h + y) * w + x;
                        img[i] = clamp_u8(blur + f * (f64::from(scratch[i]) - blur));
                    }
                }
            }
        }
        Posterize => {
            let bits = 8 - ((f64::from(mag.min(9)) / 2.25).round() as u32);
            let mask = !((1u16 << (8 - bits)) - 1) as u8;
            for p in img.iter_mut() {
                *p &= mask;
            }
        }
        Solarize => {
            let thr = 255.0 * (1.0 - m);
            for p in img.iter_mut() {
                if f64::from(*p) >= thr {
                    *p = 255 - *p;
                }
            }
        }
        AutoContrast => {
            for plane in img.chunks_exact_mut(h * w) {
                let lo = *plane.iter().min().unwrap_or(&0);
                let hi = *plane.iter().max().unwrap_or(&255);
                if hi > lo {
                    let sc = 255.0 / f64::from(hi - lo);
                    for p in plane.iter_mut() {
                        *p = clamp_u8((f64::from(*p - lo) * sc).round());
                    }
                }
            }
        }
        Equalize => {
            for plane in img.chunks_exact_mut(h * w) {
                let mut hist = [0usize; 256];
                for &p in plane.iter() {
                    hist[usize::from(p)] += 1;
                }
                let last = hist.iter().rposition(|&c| c > 0).map_or(0, |i| hist[i]);
                let step = (plane.len() - last) / 255;
                if step == 0 {
                    continue;
                }
                let mut lut = [0u8; 256];
                let mut n = step / 2;
                for (i, l) in lut.iter_mut().enumerate() {
                    *l = (n / step).min(255) as u8;
                    n += hist[i];
                }
                for p in plane.iter_mut() {
                    *p = lut[usize::from(*p)];
                }
            }
        }
        Invert => {
            for p in img.iter_mut() {
                *p = 255 - *p;
            }
        }
    }
}

fn clamp_u8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// ITU-R 601-2 luma of each pixel (the first channel itself for grey images).
fn greyscale(img: &[u8], [c, h, w]: [usize; 3]) -> Vec<u8> {
    let hw = h * w;
    if c < 3 {
        return img[..hw].to_vec();
    }
    (0..hw)
        .map(|i| {
            clamp_u8(
                0.299 * f64::from(img[i])
                    + 0.587 * f64::from(img[hw + i])
                    + 0.114 * f64::from(img[2 * hw + i]),
            )
        })
        .collect()
}

/// p ← d + f (p − d) with d = deg(channel, pixel index within the plane).
fn blend_with(img: &mut [u8], [_, h, w]: [usize; 3], f: f64, deg: impl Fn(usize, usize) -> u8) {
    for (ch, plane) in img.chunks_exact_mut(h * w).enumerate() {
        for (i, p) in plane.iter_mut().enumerate() {
            let d = f64::from(deg(ch, i));
            *p = clamp_u8(d + f * (f64::from(*p) - d));
        }
    }
}

/// Inverse-mapped affine warp with nearest-neighbour sampling, zero fill: the output pixel (x, y)
/// takes the input at (a x + b y + c, d x + e y + f).
fn affine(img: &mut [u8], [ch, h, w]: [usize; 3], m: [f64; 6], scratch: &mut Vec<u8>) {
    scratch.clear();
    scratch.extend_from_slice(img);
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let sx = (m[0] * xf + m[1] * yf + m[2]).round();
            let sy = (m[3] * xf + m[4] * yf + m[5]).round();
            let inside = sx >= 0.0 && sy >= 0.0 && sx < w as f64 && sy < h as f64;
            for c in 0..ch {
                img[(c * h + y) * w + x] = if inside {
                    scratch[(c * h + sy as usize) * w + sx as usize]
                } else {
                    0
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trips_and_rejects_unknown_names() {
        let c =
            AugmentConfig::parse("crop:4,flip,autoaugment:cifar,cutout:16,mixup:0.2,cutmix:1.0")
                .unwrap();
        assert_eq!(c.crop, Some(4));
        assert!(c.flip);
        assert_eq!(c.autoaugment, Some(AutoAugmentPolicy::Cifar10));
        assert_eq!(c.cutout, Some(16));
        assert_eq!(c.mixup, Some(0.2));
        assert_eq!(c.cutmix, Some(1.0));
        assert_eq!(AugmentConfig::parse(&c.to_string()).unwrap(), c);
        assert_eq!(
            AugmentConfig::parse("none").unwrap(),
            AugmentConfig::default()
        );
        for bad in [
            "blur",
            "crop",
            "crop:x",
            "flip:1",
            "mixup:0",
            "flip,flip",
            "autoaugment:svhn",
            "normalize:mnist",
        ] {
            assert!(AugmentConfig::parse(bad).is_err(), "{bad}");
        }
        let e = AugmentConfig::parse("crop:4,blur").unwrap_err().to_string();
        assert!(e.contains("unknown augmentation `blur`"), "{e}");
    }

    #[test]
    fn crop_shifts_with_zero_fill_and_keeps_size() {
        let chw = [1, 3, 3];
        let mut img: Vec<u8> = (1..=9).collect();
        let mut s = Vec::new();
        shift(&mut img, chw, 1, 0, &mut s);
        assert_eq!(img, vec![2, 3, 0, 5, 6, 0, 8, 9, 0]);
        let mut img: Vec<u8> = (1..=9).collect();
        shift(&mut img, chw, 0, -1, &mut s);
        assert_eq!(img, vec![0, 0, 0, 1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn flip_mirrors_each_row() {
        let mut img: Vec<u8> = (0..6).collect();
        hflip(&mut img, [1, 2, 3]);
        assert_eq!(img, vec![2, 1, 0, 5, 4, 3]);
    }

    #[test]
    fn augmentation_depends_only_on_seed_epoch_and_index() {
        let cfg = AugmentConfig::parse("autoaugment:cifar10,crop:4,flip").unwrap();
        let chw = [3, 8, 8];
        let base: Vec<u8> = (0..192).map(|i| (i * 7 % 256) as u8).collect();
        let run = |e, i| {
            let mut img = base.clone();
            cfg.apply_image(&mut img, chw, &mut sample_rng(5, e, i), &mut Vec::new());
            img
        };
        assert_eq!(run(0, 3), run(0, 3));
        let distinct = (0..8)
            .map(|i| run(1, i))
            .collect::<std::collections::HashSet<_>>();
        assert!(
            distinct.len() > 4,
            "augmentation hardly varies across samples"
        );
    }

    #[test]
    fn cutout_zeroes_a_clipped_square() {
        let mut x = vec![1f32; 2 * 6 * 6];
        cutout(&mut x, [2, 6, 6], 4, &mut Rng::new(1));
        let zeros = x.iter().filter(|v| **v == 0.0).count();
        assert!(zeros > 0 && zeros <= 2 * 16 && zeros % 2 == 0, "{zeros}");
        assert_eq!(x[..36].iter().filter(|v| **v == 0.0).count(), zeros / 2);
    }

    #[test]
    fn beta_has_the_right_mean() {
        let mut r = Rng::new(3);
        for a in [0.2, 1.0, 2.0] {
            let m: f64 = (0..4000).map(|_| beta(&mut r, a)).sum::<f64>() / 4000.0;
            assert!((m - 0.5).abs() < 0.03, "Beta({a},{a}) mean {m}");
            assert!((0..100).all(|_| (0.0..=1.0).contains(&beta(&mut r, a))));
        }
    }

    #[test]
    fn mixup_and_cutmix_targets_are_distributions_matching_the_mixture() {
        let chw = [1, 4, 4];
        let n = 4;
        let labels = [0usize, 1, 2, 1];
        // image i is the constant i + 1
        let x0: Vec<f32> = (0..n).flat_map(|i| vec![(i + 1) as f32; 16]).collect();
        for spec in ["mixup:1.0", "cutmix:1.0"] {
            let cfg = AugmentConfig::parse(spec).unwrap();
            let mut x = x0.clone();
            let q = mix_batch(&cfg, &mut x, chw, &labels, 3, &mut Rng::new(9)).unwrap();
            for i in 0..n {
                let row = &q[i * 3..(i + 1) * 3];
                assert!(
                    (row.iter().sum::<f32>() - 1.0).abs() < 1e-5,
                    "{spec}: {row:?}"
                );
                // the mean pixel equals the label-weighted mean of the constants: check via weights
                let mean: f32 = x[i * 16..(i + 1) * 16].iter().sum::<f32>() / 16.0;
                assert!(mean >= 1.0 - 1e-5 && mean <= n as f32 + 1e-5);
            }
        }
        assert!(
            mix_batch(
                &AugmentConfig::default(),
                &mut x0.clone(),
                chw,
                &labels,
                3,
                &mut Rng::new(0)
            )
            .is_none()
        );
    }

    #[test]
    fn cutmix_weight_equals_the_pasted_area() {
        let chw = [1, 8, 8];
        let labels = [0usize, 1];
        let x0: Vec<f32> = [vec![0f32; 64], vec![1f32; 64]].concat();
        let cfg = AugmentConfig::parse("cutmix:1.0").unwrap();
        for seed in 0..20 {
            let mut x = x0.clone();
            let q = mix_batch(&cfg, &mut x, chw, &labels, 2, &mut Rng::new(seed)).unwrap();
            // image 0 (zeros): the fraction of ones pasted equals the weight of the partner's label
            let pasted = x[..64].iter().sum::<f32>() / 64.0;
            let partner_is_other = q[1] > 0.0 || pasted == 0.0;
            if partner_is_other {
                assert!(
                    (q[1] - pasted).abs() < 1e-6,
                    "seed {seed}: {q:?} vs {pasted}"
                );
            }
        }
    }

    #[test]
    fn autoaugment_ops_keep_shape_and_identity_cases_hold() {
        let chw = [3, 8, 8];
        let img: Vec<u8> = (0..192).map(|i| (i * 13 % 256) as u8).collect();
        let mut s = Vec::new();
        for op in [
            ShearX, ShearY, TranslateX, TranslateY, Rotate, Brightness, Color, Contrast, Sharpness,
        ] {
            let mut x = img.clone();
            apply_op(&mut x, chw, op, 0, false, &mut s);
            assert_eq!(x, img, "{op:?} at magnitude 0 must be the identity");
        }
        let mut x = img.clone();
        apply_op(&mut x, chw, Invert, 0, false, &mut s);
        apply_op(&mut x, chw, Invert, 0, false, &mut s);
        assert_eq!(x, img);
        let mut x = img.clone();
        apply_op(&mut x, chw, Posterize, 9, false, &mut s);
        assert!(x.iter().all(|p| p & 0x0F == 0));
        let mut x = vec![10u8, 20, 30, 40];
        apply_op(&mut x, [1, 2, 2], AutoContrast, 0, false, &mut s);
        assert_eq!(x, vec![0, 85, 170, 255]);
        let mut x = img.clone();
        apply_op(&mut x, chw, Rotate, 9, false, &mut s);
        assert_ne!(x, img);
        assert_eq!(CIFAR10_POLICY.len(), 25);
        assert_eq!(IMAGENET_POLICY.len(), 25);
    }
}
