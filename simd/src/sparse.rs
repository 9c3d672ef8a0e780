//! Float spikes × ±1 weights, skipping zero spikes ("sparse-input" convolution).
//!
//! EM-PF spikes `s = ReLU(m − θ)` are mostly zero, so a convolution that visits only the non-zero
//! inputs does `density ×` the multiply-adds of a dense one. Per image: every input pixel gets the
//! list of its non-zero channels (offsets into the weights, values), then every output pixel sums,
//! over the taps inside the image and the non-zero channels of the tapped pixel, `x · w[tap][c][..]`
//! into a register block of output channels. Weights are ±1 floats, tap-major `[tap][c][o]` with `o`
//! padded to a multiple of 8, so a block of outputs is one contiguous row.
//!
//! Exactness: `x·(±1)` is exact, so `acc + x·w` and `fma(x, w, acc)` round identically; every level
//! runs the same generic code (only the instruction set it is compiled for differs), hence results
//! are bit-identical across levels. The epilogue `y = scale·acc + shift` is the same scalar code.

#![allow(clippy::needless_range_loop)] // register blocks read clearest as indexed loops

use crate::{Result, shape_err};

/// ±1 convolution weights laid out for [`crate::Simd::sparse_conv`].
#[derive(Clone, Debug, PartialEq)]
pub struct SignConvWeights {
    pub(crate) out_ch: usize,
    pub(crate) in_ch: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    /// `out_ch` rounded up to a multiple of 8.
    pub(crate) opad: usize,
    /// `[tap][c][opad]`, ±1 (padding 0).
    pub(crate) w: Vec<f32>,
}

impl SignConvWeights {
    /// From OIHW floats: weight `≥ 0` (and −0.0) ↦ +1, else −1 (NaN ↦ −1), as [`crate::Binarize::Sign`].
    pub fn from_f32_oihw(
        w: &[f32],
        out_ch: usize,
        in_ch: usize,
        kh: usize,
        kw: usize,
    ) -> Result<Self> {
        let taps = kh * kw;
        if out_ch == 0 || in_ch == 0 || taps == 0 || w.len() != out_ch * in_ch * taps {
            return shape_err(format!(
                "SignConvWeights::from_f32_oihw: {} values for {out_ch}x{in_ch}x{kh}x{kw}",
                w.len()
            ));
        }
        let opad = out_ch.div_ceil(8) * 8;
        let mut out = vec![0f32; taps * in_ch * opad];
        for o in 0..out_ch {
            for c in 0..in_ch {
                for t in 0..taps {
                    let v = w[(o * in_ch + c) * taps + t];
                    out[(t * in_ch + c) * opad + o] = if crate::Binarize::Sign.bit(v) {
                        1.0
                    } else {
                        -1.0
                    };
                }
            }
        }
        Ok(SignConvWeights {
            out_ch,
            in_ch,
            kh,
            kw,
            opad,
            w: out,
        })
    }
    /// `(out_ch, in_ch, kh, kw)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.out_ch, self.in_ch, self.kh, self.kw)
    }
}

/// One task of a sparse convolution: one image (or two that share the weight loads: `x2`), output
/// rows `oy0..oy1`.
pub(crate) struct Task<'a> {
    /// The image, `C x H x W`.
    pub x: &'a [f32],
    /// A second image of the same shape run along (its non-zero lists are merged with `x`'s).
    pub x2: Option<&'a [f32]>,
    pub h: usize,
    pub w: usize,
    pub ow: usize,
    pub stride: usize,
    pub pad: usize,
    pub oy0: usize,
    pub oy1: usize,
    pub weights: &'a SignConvWeights,
    pub scale: &'a [f32],
    pub shift: &'a [f32],
}

/// Per-worker buffers: the non-zero lists.
#[derive(Default)]
pub(crate) struct Scratch {
    off: Vec<u32>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

/// The kernel of one ISA level: fills `y` (and `y2` for `x2`), the band `O x (oy1 − oy0) x OW` of
/// the output image.
pub(crate) type SparseFn = fn(&Task<'_>, &mut Scratch, &mut [f32], &mut [f32]);

/// The portable kernel (scalar level; NEON level on aarch64, where NEON is the baseline).
pub(crate) fn sparse_generic(t: &Task<'_>, sc: &mut Scratch, y: &mut [f32], y2: &mut [f32]) {
    dispatch::<false>(t, sc, y, y2)
}

#[inline(always)]
fn dispatch<const FMA: bool>(t: &Task<'_>, sc: &mut Scratch, y: &mut [f32], y2: &mut [f32]) {
    if t.x2.is_some() {
        run::<FMA, 2>(t, sc, [y, y2])
    } else {
        run::<FMA, 1>(t, sc, [y])
    }
}

/// Builds the non-zero lists of the input rows that output rows `oy0..oy1` tap.
#[inline(always)]
fn build<const IMG: usize>(t: &Task<'_>, sc: &mut Scratch) -> (usize, usize) {
    let (c, h, w) = (t.weights.in_ch, t.h, t.w);
    let kh = t.weights.kh;
    let hw = h * w;
    let iy0 = (t.oy0 * t.stride).saturating_sub(t.pad);
    let iy1 = ((t.oy1 - 1) * t.stride + kh).saturating_sub(t.pad).min(h);
    let (p0, p1) = (iy0 * w, iy1.max(iy0) * w);
    sc.off.clear();
    sc.idx.clear();
    sc.val.clear();
    sc.off.push(0);
    let opad = t.weights.opad as u32;
    let x2 = t.x2.unwrap_or(t.x);
    for p in p0..p1 {
        for ci in 0..c {
            let v = t.x[ci * hw + p];
            if IMG == 1 {
                if v != 0.0 {
                    sc.idx.push(ci as u32 * opad);
                    sc.val.push(v);
                }
            } else {
                let v2 = x2[ci * hw + p];
                if v != 0.0 || v2 != 0.0 {
                    sc.idx.push(ci as u32 * opad);
                    sc.val.push(v);
                    sc.val.push(v2);
                }
            }
        }
        sc.off.push(sc.idx.len() as u32);
    }
    (p0, p1)
}

#[inline(always)]
fn run<const FMA: bool, const IMG: usize>(
    t: &Task<'_>,
    sc: &mut Scratch,
    mut y: [&mut [f32]; IMG],
) {
    let (p0, _) = build::<IMG>(t, sc);
    let wt = t.weights;
    let mut ob = 0;
    // at most 8 vector accumulators of 8 lanes
    while ob < wt.out_ch {
        let left = wt.opad - ob;
        if left >= 64 && IMG == 1 {
            block::<FMA, IMG, 64>(t, sc, p0, ob, &mut y);
            ob += 64;
        } else if left >= 32 {
            block::<FMA, IMG, 32>(t, sc, p0, ob, &mut y);
            ob += 32;
        } else if left >= 16 {
            block::<FMA, IMG, 16>(t, sc, p0, ob, &mut y);
            ob += 16;
        } else {
            block::<FMA, IMG, 8>(t, sc, p0, ob, &mut y);
            ob += 8;
        }
    }
}

#[inline(always)]
fn block<const FMA: bool, const IMG: usize, const OB: usize>(
    t: &Task<'_>,
    sc: &Scratch,
    p0: usize,
    ob: usize,
    y: &mut [&mut [f32]; IMG],
) {
    let wt = t.weights;
    let (c, kh, kw, opad) = (wt.in_ch, wt.kh, wt.kw, wt.opad);
    let (h, w) = (t.h as isize, t.w as isize);
    let plane = (t.oy1 - t.oy0) * t.ow;
    let nout = (wt.out_ch - ob).min(OB);
    for oy in t.oy0..t.oy1 {
        for ox in 0..t.ow {
            // separate arrays, not `[[f32; OB]; IMG]`: LLVM keeps these in registers
            let mut a0 = [0f32; OB];
            let mut a1 = [0f32; OB];
            for ky in 0..kh {
                let iy = (oy * t.stride + ky) as isize - t.pad as isize;
                if iy < 0 || iy >= h {
                    continue;
                }
                for kx in 0..kw {
                    let ix = (ox * t.stride + kx) as isize - t.pad as isize;
                    if ix < 0 || ix >= w {
                        continue;
                    }
                    let p = (iy * w + ix) as usize - p0;
                    let base = (ky * kw + kx) * c * opad + ob;
                    let (e0, e1) = (sc.off[p] as usize, sc.off[p + 1] as usize);
                    for e in e0..e1 {
                        let row: &[f32; OB] = wt.w[base + sc.idx[e] as usize..][..OB]
                            .try_into()
                            .expect("weight row");
                        let vs: &[f32; IMG] =
                            sc.val[e * IMG..e * IMG + IMG].try_into().expect("values");
                        axpy::<FMA, OB>(vs[0], row, &mut a0);
                        if IMG == 2 {
                            axpy::<FMA, OB>(vs[IMG - 1], row, &mut a1);
                        }
                    }
                }
            }
            let px = (oy - t.oy0) * t.ow + ox;
            for (yk, a) in y.iter_mut().zip([&a0, &a1]) {
                for j in 0..nout {
                    let o = ob + j;
                    yk[o * plane + px] = t.scale[o] * a[j] + t.shift[o];
                }
            }
        }
    }
}

/// `a += v·row`, lane by lane.
#[inline(always)]
fn axpy<const FMA: bool, const OB: usize>(v: f32, row: &[f32; OB], a: &mut [f32; OB]) {
    for j in 0..OB {
        a[j] = if FMA {
            v.mul_add(row[j], a[j])
        } else {
            a[j] + v * row[j]
        };
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Scratch, Task, dispatch};

    /// AVX2 (+FMA when the CPU has it) instantiation of the generic kernel.
    pub(crate) fn sparse_avx2(t: &Task<'_>, sc: &mut Scratch, y: &mut [f32], y2: &mut [f32]) {
        assert!(
            crate::Isa::Avx2.is_available(),
            "avx2 kernel called on a CPU without it"
        );
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were checked just above; the function is safe code otherwise.
            unsafe { avx2_fma(t, sc, y, y2) }
        } else {
            // SAFETY: AVX2 was checked above; the function is safe code otherwise.
            unsafe { avx2(t, sc, y, y2) }
        }
    }

    /// AVX-512 instantiation (512-bit registers hold 16 outputs).
    pub(crate) fn sparse_avx512(t: &Task<'_>, sc: &mut Scratch, y: &mut [f32], y2: &mut [f32]) {
        assert!(
            crate::Isa::Avx512.is_available() && std::arch::is_x86_feature_detected!("fma"),
            "avx512 kernel called on a CPU without it"
        );
        // SAFETY: AVX-512F and FMA were checked just above; the function is safe code otherwise.
        unsafe { avx512(t, sc, y, y2) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2_fma(t: &Task<'_>, sc: &mut Scratch, y: &mut [f32], y2: &mut [f32]) {
        dispatch::<true>(t, sc, y, y2)
    }

    #[target_feature(enable = "avx2")]
    fn avx2(t: &Task<'_>, sc: &mut Scratch, y: &mut [f32], y2: &mut [f32]) {
        dispatch::<false>(t, sc, y, y2)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512(t: &Task<'_>, sc: &mut Scratch, y: &mut [f32], y2: &mut [f32]) {
        dispatch::<true>(t, sc, y, y2)
    }
}
