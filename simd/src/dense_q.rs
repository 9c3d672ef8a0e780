//! Dense k-bit convolution by 8-bit dot products (AVX-512 VNNI `vpdpbusd`), for inputs where too
//! many levels are non-zero for the sparse kernels to pay.
//!
//! `vpdpbusd` adds to each 32-bit lane the four products of unsigned bytes (the levels `q`, up to
//! 8 bits) and signed bytes (the weights, ±1): one instruction does 64 multiply-adds, exact in
//! integers. The input band is repacked as `[channel group of 4][row][column][4 channels]` with
//! the zero padding written out, so the 16 output pixels of a row block read, for one tap and one
//! channel group, 64 contiguous bytes (the 16 pixels' 4 channels); the weights of 8 outputs for
//! that tap and group are 8 dwords, each broadcast to all lanes. A tile of up to 3 pixel blocks x
//! 8 outputs (24 accumulators) walks all taps and channel groups in registers, then gets the
//! epilogue `y = scale·dot + shift` (as `sparse::epilogue_q`: a multiply, then an add) and is
//! stored straight into the output planes, 16 pixels of one output per store. Stride 1 only.
//!
//! The fused variant ([`conv_empf`], for `Simd::conv_q_empf`) packs all T steps of a sample and
//! takes tiles of one pixel block x 4 outputs x up to 4 steps (16 accumulators), so that the EM-PF
//! neuron after the convolution runs through the steps in the epilogue with its potentials in
//! registers (and its 2x2 pool over pairs of rows of the same task); an EM-PF neuron in front of
//! the convolution runs in the packing ([`pack_band_neuron`]). Its planes and images are an odd
//! number of cache lines apart: at power-of-two strides the 4 steps' loads of one tap fell in the
//! same L1 sets, and a micro-benchmark of the tile ran at about 60 % of its speed.

#![allow(clippy::needless_range_loop)] // register tiles read clearest as indexed loops

use crate::QuantConvWeights;
use crate::sparse::{Band, Out};
use std::arch::x86_64::*;

/// Outputs per weight block (the accumulators of one pixel block).
const OB: usize = 8;
/// Pixel blocks (of 16 output pixels of a row) per tile.
const PB: usize = 3;
/// Bytes a block load can read past the last packed pixel.
const SLACK: usize = 64;

/// The ±1 weights as signed bytes for `vpdpbusd`: `[o / 8][tap][c / 4][o % 8]`, one dword of the
/// four channels `4g..4g + 4` each (0 for channels `≥ C` and outputs `≥ O`). `plus(t, c, o)` tells
/// whether weight `(o, c, tap t)` is +1.
pub(crate) fn dots(
    out_ch: usize,
    in_ch: usize,
    taps: usize,
    plus: impl Fn(usize, usize, usize) -> bool,
) -> Vec<i32> {
    let (nob, cg) = (out_ch.div_ceil(OB), in_ch.div_ceil(4));
    let mut d = vec![0i32; nob * taps * cg * OB];
    for o in 0..out_ch {
        for t in 0..taps {
            for c in 0..in_ch {
                let b: i8 = if plus(t, c, o) { 1 } else { -1 };
                let at = ((o / OB * taps + t) * cg + c / 4) * OB + o % OB;
                d[at] |= i32::from(b as u8) << (8 * (c % 4));
            }
        }
    }
    d
}

/// The input of a dense task: levels, or float spikes quantised as they are packed (by the
/// quantiser of every level: `clamp(round(x / step), 0, 2^bits − 1)`).
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    Levels(&'a [u8]),
    Spikes(&'a [f32], f32),
}

impl Src<'_> {
    /// The non-zero inputs (for spikes: an estimate, the spikes of at least half a step).
    fn nonzero(self) -> usize {
        // SAFETY (both): only called from `takes`, after AVX-512F/BW were checked.
        match self {
            Src::Levels(x) => unsafe { count_nonzero_u8(x) },
            Src::Spikes(x, step) => unsafe { count_levels_f32(x, 0.5 * step) },
        }
    }
    fn len(self) -> usize {
        match self {
            Src::Levels(x) => x.len(),
            Src::Spikes(x, _) => x.len(),
        }
    }
}

/// Whether the dense kernel runs this task at this host: stride 1, AVX-512 VNNI, and (under
/// [`crate::DenseQ::Auto`]) fewer estimated cycles than the sparse kernels for the share of
/// non-zero inputs of `src`.
pub(crate) fn takes<X>(t: &QTaskOf<'_, X>, src: Src<'_>) -> bool {
    let b = &t.band;
    if b.stride != 1
        || !(std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl"))
    {
        return false;
    }
    match crate::dense_q() {
        crate::DenseQ::Always => return true,
        crate::DenseQ::Never => return false,
        crate::DenseQ::Auto => {}
    }
    // the band's share of the image's non-zero inputs
    let (wt, rows) = (t.weights, b.oy1 - b.oy0);
    let oh = b.h + 2 * b.pad + 1 - wt.kh;
    dense_pays(b, wt, || src.nonzero() * rows / oh.max(1))
}

/// Whether the dense kernel is estimated to take fewer cycles than the sparse kernels on band `b`
/// with `nonzero()` non-zero input levels (only evaluated when the inputs decide).
fn dense_pays(b: &Band, wt: &QuantConvWeights, nonzero: impl FnOnce() -> usize) -> bool {
    let (rows, taps) = (b.oy1 - b.oy0, wt.kh * wt.kw);
    // in units of one `vpdpbusd`, measured on mnist-cnn's two binary convolutions (see
    // `examples/conv_kernels.rs`): the sparse kernels cost about 55 per output pixel, tap and
    // block of 64 outputs (lists, taps, flush) plus 2.4 per non-zero input, tap and block
    let dense =
        rows * b.ow.div_ceil(16) * taps * wt.in_ch.div_ceil(4) * wt.out_ch.div_ceil(OB) * OB;
    let blocks = taps * wt.out_ch.div_ceil(64);
    let fixed5 = blocks * 275 * rows * b.ow;
    // (whatever the inputs when the fixed costs alone exceed the dense kernel's)
    fixed5 >= 5 * dense || 5 * dense <= fixed5 + blocks * 12 * nonzero()
}

/// The non-zero bytes of `x`.
#[target_feature(enable = "avx512f,avx512bw")]
fn count_nonzero_u8(x: &[u8]) -> usize {
    let mut n = 0usize;
    let mut chunks = x.chunks_exact(64);
    for c in &mut chunks {
        // SAFETY: `c` is 64 bytes.
        let v = unsafe { _mm512_loadu_si512(c.as_ptr().cast()) };
        n += _mm512_test_epi8_mask(v, v).count_ones() as usize;
    }
    n + chunks.remainder().iter().filter(|&&v| v != 0).count()
}

/// The values of `x` at least `half`.
#[target_feature(enable = "avx512f")]
fn count_levels_f32(x: &[f32], half: f32) -> usize {
    let mut n = 0usize;
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        // SAFETY: `c` is 16 floats.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        n += _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, _mm512_set1_ps(half)).count_ones() as usize;
    }
    n + chunks.remainder().iter().filter(|&&v| v >= half).count()
}

/// A k-bit task over inputs `X` (levels, or float spikes).
pub(crate) type QTaskOf<'a, X> = crate::sparse::SparseTask<'a, X, crate::QuantConvWeights>;

thread_local! {
    /// The repacked band, kept per thread from call to call: no allocation, no page faults and
    /// no clearing (every byte a tile reads is written first: levels, or zero padding).
    static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs the band of `t` for the image `src` into `y` (`O x rows x OW`). Only called after
/// [`takes`] (AVX-512F/BW/VL/VNNI present, stride 1).
pub(crate) fn run<X>(t: &QTaskOf<'_, X>, src: Src<'_>, y: &mut [Out]) {
    assert!(
        t.band.stride == 1
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl"),
        "dense k-bit kernel called without stride 1 and AVX-512 VNNI"
    );
    // SAFETY: the CPU features were checked just above.
    PACKED.with_borrow_mut(|packed| unsafe { run_vnni(t, src, packed, y) })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn run_vnni<X>(t: &QTaskOf<'_, X>, src: Src<'_>, packed: &mut Vec<u8>, y: &mut [Out]) {
    let wt = t.weights;
    let b = &t.band;
    let (c, kh, kw) = (wt.in_ch, wt.kh, wt.kw);
    let (h, w, ow, pad) = (b.h, b.w, b.ow, b.pad);
    let rows = b.oy1 - b.oy0;
    let (cg, taps) = (c.div_ceil(4), kh * kw);
    // the packed band: rows `oy0 − pad ..` of the padded input, `wp` pixels each
    let (pr, wp) = (rows + kh - 1, w + 2 * pad);
    let plane = pr * wp * 4;
    assert!(
        src.len() == c * h * w
            && y.len() >= wt.out_ch * rows * ow
            && wp + 1 == ow + kw
            && wt.dots.len() == wt.out_ch.div_ceil(OB) * taps * cg * OB
            && t.scale.len() >= wt.out_ch
            && t.shift.len() >= wt.out_ch,
        "dense k-bit kernel: shapes do not match"
    );
    if packed.len() < cg * plane + SLACK {
        packed.resize(cg * plane + SLACK, 0);
    }
    pack_band(wt, b, src, &mut packed[..cg * plane], plane);
    let offs = tap_offsets(taps, cg, kw, wp, plane);
    // pixel blocks: (output row within the band, first column, columns)
    let blocks: Vec<(usize, usize, usize)> = (0..rows)
        .flat_map(|r| {
            (0..ow)
                .step_by(16)
                .map(move |x0| (r, x0, (ow - x0).min(16)))
        })
        .collect();
    let geom = Geom {
        a: packed.as_ptr(),
        wp,
        offs: &offs,
        oplane: rows * ow,
        ow,
    };
    let ep = (wt.out_ch, t.scale, t.shift);
    for tile in blocks.chunks(PB) {
        for ob in 0..wt.out_ch.div_ceil(OB) {
            let wb = &wt.dots[ob * taps * cg * OB..][..taps * cg * OB];
            match tile.len() {
                3 => tile_run::<3>(&geom, tile, wb, ep, ob, y),
                2 => tile_run::<2>(&geom, tile, wb, ep, ob, y),
                _ => tile_run::<1>(&geom, tile, wb, ep, ob, y),
            }
        }
    }
}

/// Packs the rows of image `src` (`C x H x W`) that band `b`'s outputs read, zero padding
/// included, into `dst`: `⌈C/4⌉` planes of `plane ≥ pr·wp·4` bytes, each `[row][column][4
/// channels]` (`pr = rows + kh − 1` rows of `wp = W + 2·pad` pixels); levels as they are, or
/// spikes quantised.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn pack_band(wt: &QuantConvWeights, b: &Band, src: Src<'_>, dst: &mut [u8], plane: usize) {
    let (c, kh) = (wt.in_ch, wt.kh);
    let (h, w, pad) = (b.h, b.w, b.pad);
    let (cg, pr, wp) = (c.div_ceil(4), b.oy1 - b.oy0 + kh - 1, w + 2 * pad);
    assert!(
        src.len() == c * h * w && plane >= pr * wp * 4 && dst.len() >= cg * plane,
        "dense k-bit kernel: packing shapes do not match"
    );
    let max = ((1u32 << wt.bits) - 1) as f32;
    let recip = match src {
        Src::Spikes(_, step) => crate::sparse::exact_reciprocal(step),
        Src::Levels(_) => None,
    };
    for g in 0..cg {
        let chans = (c - 4 * g).min(4);
        for r in 0..pr {
            let iy = (b.oy0 + r).wrapping_sub(pad);
            let row = &mut dst[g * plane + r * wp * 4..][..wp * 4];
            if iy >= h {
                row.fill(0); // a padding row
                continue;
            }
            row[..pad * 4].fill(0);
            row[(pad + w) * 4..].fill(0);
            let dst = &mut row[pad * 4..][..w * 4];
            let row0 = (4 * g * h + iy) * w;
            let rows4: [usize; 4] = [row0, row0 + h * w, row0 + 2 * h * w, row0 + 3 * h * w];
            match src {
                Src::Levels(x) => pack_row(dst, chans, |j, x0, m| {
                    // SAFETY: the mask covers the row's remaining pixels, inside `x` (asserted
                    // `x.len() = C·H·W`; channel `j < chans` exists).
                    unsafe {
                        _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                            m,
                            x[rows4[j] + x0..].as_ptr().cast(),
                        ))
                    }
                }),
                Src::Spikes(x, step) => pack_row(dst, chans, |j, x0, m| {
                    // SAFETY: as above, for the floats of `x`.
                    let v = unsafe { _mm512_maskz_loadu_ps(m, x[rows4[j] + x0..].as_ptr()) };
                    quantise16(v, step, recip, max)
                }),
            }
        }
    }
}

/// The packed band's geometry.
struct Geom<'a> {
    a: *const u8,
    wp: usize,
    /// The byte offset of each (tap, channel group) from a pixel's origin.
    offs: &'a [usize],
    oplane: usize,
    ow: usize,
}

/// Packs one row of a channel group: `dst[4·i + j] = level(j, i)` for the `chans ≤ 4` channels
/// (zero for the others), where `load(j, x0, mask)` gives the levels of channel `j`'s pixels `x0..`
/// under `mask` (16 lanes of 32 bits, zero outside the mask).
#[inline(always)]
fn pack_row(dst: &mut [u8], chans: usize, load: impl Fn(usize, usize, __mmask16) -> __m512i) {
    let n = dst.len() / 4;
    let mut x0 = 0;
    while x0 < n {
        let m: __mmask16 = ((1u32 << (n - x0).min(16)) - 1) as u16;
        // SAFETY: `dst` has `4·n` bytes; the mask covers the dwords of pixels `x0..n`. The target
        // features are the caller's (inlined into `run_vnni`).
        unsafe {
            let mut v = load(0, x0, m);
            for j in 1..chans {
                v = _mm512_or_si512(
                    v,
                    _mm512_sllv_epi32(load(j, x0, m), _mm512_set1_epi32(8 * j as i32)),
                );
            }
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(4 * x0).cast(), m, v);
        }
        x0 += 16;
    }
}

/// The levels `clamp(round(v / step), 0, max)` of 16 spikes as 32-bit lanes, the values of
/// `sparse::quantise_body` (`recip`: the step's exact reciprocal, if any, as there; round half
/// away from zero as `trunc` plus one where the exact remainder is at least ½; NaN and values ≤ 0
/// give 0).
#[inline(always)]
fn quantise16(v: __m512, step: f32, recip: Option<f32>, max: f32) -> __m512i {
    // SAFETY: AVX-512F is enabled by the caller (inlined into `run_vnni`).
    unsafe {
        // a power-of-two step: the product by its exact reciprocal is the quotient, bit for bit
        let q = match recip {
            Some(r) => _mm512_mul_ps(v, _mm512_set1_ps(r)),
            None => _mm512_div_ps(v, _mm512_set1_ps(step)),
        };
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(q);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_sub_ps(q, t), _mm512_set1_ps(0.5));
        let r = _mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0));
        let pos = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(r, _mm512_setzero_ps());
        _mm512_cvttps_epi32(_mm512_maskz_min_ps(pos, r, _mm512_set1_ps(max)))
    }
}

/// One tile: `P` pixel blocks x the 8 outputs of block `ob`, all taps and channel groups summed in
/// registers, then the epilogue and masked stores into `y`.
#[inline(always)]
fn tile_run<const P: usize>(
    g: &Geom<'_>,
    tile: &[(usize, usize, usize)],
    wb: &[i32],
    (out_ch, scale, shift): (usize, &[f32], &[f32]),
    ob: usize,
    y: &mut [Out],
) {
    let org: [usize; P] = std::array::from_fn(|p| (tile[p].0 * g.wp + tile[p].1) * 4);
    // SAFETY (loads): a block's origin plus a (tap, group)'s offset is at most the band's last
    // packed pixel (`(pr − 1)·wp + wp − 1`, as `wp = ow + kw − 1`) of the group's plane, and 64
    // bytes from there stay within the next plane, or the last plus `SLACK`; `wb` holds
    // `taps·cg·8` dwords (checked by the caller's assert).
    let ap: [*const u8; P] = std::array::from_fn(|p| g.a.wrapping_add(org[p]));
    let acc = unsafe { sum_dots::<P, OB>(ap, g.offs, wb.as_ptr()) };
    for p in 0..P {
        let (r, x0, n) = tile[p];
        let m: __mmask16 = ((1u32 << n) - 1) as u16;
        for j in 0..OB {
            let o = ob * OB + j;
            if o >= out_ch {
                break;
            }
            let at = o * g.oplane + r * g.ow + x0;
            assert!(at + n <= y.len());
            // SAFETY: the mask covers `n` lanes, `at + n ≤ y.len()` checked above; the target
            // features are enabled by the caller (inlined into `run_vnni`).
            unsafe {
                let v = _mm512_add_ps(
                    _mm512_mul_ps(_mm512_set1_ps(scale[o]), _mm512_cvtepi32_ps(acc[p][j])),
                    _mm512_set1_ps(shift[o]),
                );
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(at).cast(), m, v);
            }
        }
    }
}

/// The byte offset of each (tap, channel group) from a pixel's origin in a packed band (planes of
/// `plane` bytes, rows of `wp` pixels), in the weights' order: one flat loop of dot products per
/// tile (no short inner loop over the groups).
fn tap_offsets(taps: usize, cg: usize, kw: usize, wp: usize, plane: usize) -> Vec<usize> {
    (0..taps * cg)
        .map(|i| {
            let (tp, gi) = (i / cg, i % cg);
            gi * plane + ((tp / kw) * wp + tp % kw) * 4
        })
        .collect()
}

/// The dot products of `P` pixel blocks (packed origins `ap`) with `J` outputs whose weight
/// dwords start at `w`, [`OB`] dwords apart from one (tap, group) offset of `offs` to the next.
///
/// # Safety
/// AVX-512F/VNNI enabled by the caller (inlined into it); every `ap[p] + off` has 64 readable
/// bytes, and `w` holds `offs.len()` blocks of `OB` dwords (the first `J` of each read).
#[inline(always)]
unsafe fn sum_dots<const P: usize, const J: usize>(
    ap: [*const u8; P],
    offs: &[usize],
    mut w: *const i32,
) -> [[__m512i; J]; P] {
    // SAFETY: as promised by the caller.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); J]; P];
        for &off in offs {
            let mut av = [_mm512_setzero_si512(); P];
            for p in 0..P {
                av[p] = _mm512_loadu_si512(ap[p].add(off).cast());
            }
            for j in 0..J {
                let wj = _mm512_set1_epi32(*w.add(j));
                for p in 0..P {
                    acc[p][j] = _mm512_dpbusd_epi32(acc[p][j], av[p], wj);
                }
            }
            w = w.add(OB);
        }
        acc
    }
}

/// Outputs per tile of the fused kernel (half a weight block of [`OB`]).
const FO: usize = 4;
/// Time-steps per tile of the fused kernel (its pixel blocks: one per step).
const FP: usize = 4;

/// `bytes` rounded up to an odd number of cache lines: planes and images at such strides fall in
/// different L1 sets (at powers of two, the same tap of every channel group and step would evict
/// each other).
fn odd_lines(bytes: usize) -> usize {
    (bytes.div_ceil(64) | 1) * 64
}

/// The output of the fused kernel, written by the tasks of disjoint output rows at once.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks of `conv_empf` write disjoint elements (their own sample's rows of their own
// band) and read only the elements they wrote themselves.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The convolution of `conv_empf` on one sample's band, and the neuron after it.
struct Fused<'a> {
    wt: &'a QuantConvWeights,
    band: Band,
    /// The images of `x` (`steps · n`, step-major, or `n` used at every step when `rep`), the
    /// samples `n` and this task's sample.
    x: &'a [f32],
    rep: bool,
    n: usize,
    sample: usize,
    /// An EM-PF neuron that turns `x` into the spikes as they are packed.
    pre: Option<&'a crate::EmpfNeuron<'a>>,
    step: f32,
    scale: &'a [f32],
    shift: &'a [f32],
    neuron: &'a crate::EmpfNeuron<'a>,
    /// Output rows and columns of a plane (pooled, if the neuron pools).
    ph: usize,
    pw: usize,
}

/// [`crate::Simd::conv_q_empf`] on AVX-512 VNNI: `None` when this host has no VNNI, the stride is
/// not 1, the policy ([`crate::DenseQ`]) forbids the dense kernel, or (under `Auto`) the sparse
/// kernels would be faster. The caller checked every shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_empf(
    input: &crate::ConvInput<'_>,
    step: f32,
    (rows, h, w): (usize, usize, usize),
    wt: &QuantConvWeights,
    stride: usize,
    pad: usize,
    scale: &[f32],
    shift: &[f32],
    neuron: &crate::EmpfNeuron<'_>,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    let oh = (h + 2 * pad + 1).checked_sub(wt.kh)?;
    let ow = (w + 2 * pad + 1).checked_sub(wt.kw)?;
    let band = Band {
        h,
        w,
        ow,
        stride,
        pad,
        oy0: 0,
        oy1: oh,
    };
    let steps = neuron.steps;
    if stride != 1
        || steps == 0
        || !(std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl"))
    {
        return None;
    }
    let x = input.x;
    let pays = match crate::dense_q() {
        crate::DenseQ::Always => true,
        crate::DenseQ::Never => false,
        // spikes still to come from a neuron: only where the dense kernel wins whatever they are
        crate::DenseQ::Auto if input.neuron.is_some() => dense_pays(&band, wt, || 0),
        // the non-zero inputs of an average image
        // SAFETY: AVX-512F/BW were checked above.
        crate::DenseQ::Auto => dense_pays(&band, wt, || unsafe {
            count_levels_f32(x, 0.5 * step) / rows.max(1)
        }),
    };
    if !pays {
        return None;
    }
    let n = if input.repeated { rows } else { rows / steps };
    let len = n
        * steps
        * wt.out_ch
        * if neuron.pool {
            (oh / 2) * (ow / 2)
        } else {
            oh * ow
        };
    let (ph, pw) = if neuron.pool {
        (oh / 2, ow / 2)
    } else {
        (oh, ow)
    };
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // bands of output rows, so that all threads work at batch 1; even for a pool (both rows of
    // each pooled row in one task), and none of the rows a pool drops
    let live = if neuron.pool { 2 * ph } else { oh };
    // (one band per thread: every band repacks its `kh − 1` halo rows)
    let bands = rayon::current_num_threads()
        .div_ceil(n.max(1))
        .clamp(1, live.max(1));
    let mut brows = live.div_ceil(bands).max(1);
    if neuron.pool {
        brows = brows.next_multiple_of(2);
    }
    let tasks: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..live).step_by(brows).map(move |r| (i, r)))
        .collect();
    let out = OutPtr(y.as_mut_ptr());
    tasks.into_par_iter().for_each(|(i, oy0)| {
        let f = Fused {
            wt,
            band: Band {
                oy0,
                oy1: (oy0 + brows).min(live),
                ..band
            },
            x,
            rep: input.repeated,
            n,
            sample: i,
            pre: input.neuron.as_ref(),
            step,
            scale,
            shift,
            neuron,
            ph,
            pw,
        };
        // SAFETY: the CPU features were checked above; the task writes its own rows (see `OutPtr`).
        PACKED.with_borrow_mut(|packed| unsafe { run_fused(&f, packed, out, len) });
    });
    // SAFETY: the tasks wrote every element: every sample, every band of the live rows, every
    // output channel, step and (pooled) column (see `run_fused`).
    unsafe { y.set_len(len) };
    Some(y)
}

/// One task of [`conv_empf`]: packs the band of the sample's `T` images, then, per block of 16
/// output pixels of a row and [`FO`] outputs, sums the dot products of up to [`FP`] steps at once
/// and runs the neuron through the steps in registers (the potentials `v` carried from chunk to
/// chunk), storing the spikes, or pooling them: an even row stores its column pairs' sums
/// `(0 + a0) + a1`, the odd row below adds `b0`, then `b1`, and scales by ¼ (the pool's order).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn run_fused(f: &Fused<'_>, packed: &mut Vec<u8>, out: OutPtr, len: usize) {
    let (wt, b, nr) = (f.wt, &f.band, f.neuron);
    let (c, kh, kw, o_ch) = (wt.in_ch, wt.kh, wt.kw, wt.out_ch);
    let (w, ow) = (b.w, b.ow);
    let rows = b.oy1 - b.oy0;
    let steps = nr.steps;
    let (cg, taps) = (c.div_ceil(4), kh * kw);
    let (pr, wp) = (rows + kh - 1, w + 2 * b.pad);
    let plane = odd_lines(pr * wp * 4);
    let img = odd_lines(cg * plane);
    let xs = c * b.h * w;
    assert!(
        f.x.len() == f.n * if f.rep { 1 } else { steps } * xs
            && wp + 1 == ow + kw
            && wt.dots.len() == o_ch.div_ceil(OB) * taps * cg * OB
            && f.scale.len() >= o_ch
            && f.shift.len() >= o_ch
            && nr.fits(steps, o_ch)
            && len == f.n * steps * o_ch * f.ph * f.pw
            && b.oy1 <= if nr.pool { 2 * f.ph } else { f.ph },
        "fused dense k-bit kernel: shapes do not match"
    );
    if packed.len() < steps * img + SLACK {
        packed.resize(steps * img + SLACK, 0);
    }
    match f.pre {
        Some(pre) => pack_band_neuron(f, pre, &mut packed[..steps * img], plane, img),
        None => {
            for t in 0..steps {
                let xi = &f.x[f.image(t) * xs..][..xs];
                pack_band(
                    wt,
                    b,
                    Src::Spikes(xi, f.step),
                    &mut packed[t * img..][..img],
                    plane,
                );
            }
        }
    }
    let offs = tap_offsets(taps, cg, kw, wp, plane);
    let opl = f.ph * f.pw;
    for r in 0..rows {
        let ry = b.oy0 + r;
        for x0 in (0..ow).step_by(16) {
            let np = (ow - x0).min(16);
            // SAFETY: the block's origin plus any (tap, group) offset is inside its step's image
            // (as in `tile_run`), and 64 bytes from there inside the next image or `SLACK`.
            let org = unsafe { packed.as_ptr().add((r * wp + x0) * 4) };
            for ob in 0..o_ch.div_ceil(FO) {
                let wb = &wt.dots[ob / 2 * taps * cg * OB..][..taps * cg * OB];
                let mut v = [_mm512_setzero_ps(); FO];
                let mut t0 = 0;
                while t0 < steps {
                    let at = Cell {
                        org,
                        img,
                        ry,
                        x0,
                        np,
                        ob,
                        t0,
                    };
                    t0 += match steps - t0 {
                        1 => fused_chunk::<1>(f, &at, &offs, wb, &mut v, out, opl),
                        2 => fused_chunk::<2>(f, &at, &offs, wb, &mut v, out, opl),
                        3 => fused_chunk::<3>(f, &at, &offs, wb, &mut v, out, opl),
                        _ => fused_chunk::<FP>(f, &at, &offs, wb, &mut v, out, opl),
                    };
                }
            }
        }
    }
}

impl Fused<'_> {
    /// The image of `x` that step `t` of this task's sample reads.
    fn image(&self, t: usize) -> usize {
        if self.rep {
            self.sample
        } else {
            t * self.n + self.sample
        }
    }
}

/// Packs the band of all `T` steps of the task's sample (image `t` at `dst[t·img..]`, laid out as
/// [`pack_band`]'s) from the inputs of the EM-PF neuron `pre`: per block of 16 pixels of a row
/// and channel group, the neuron runs through the steps with the 4 channels' potentials in
/// registers (the runtime's operations, in its order), and each step's spikes are quantised and
/// packed at once; the spikes are never stored as floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn pack_band_neuron(
    f: &Fused<'_>,
    pre: &crate::EmpfNeuron<'_>,
    dst: &mut [u8],
    plane: usize,
    img: usize,
) {
    let (wt, b) = (f.wt, &f.band);
    let (c, kh) = (wt.in_ch, wt.kh);
    let (h, w, pad) = (b.h, b.w, b.pad);
    let (cg, pr, wp) = (c.div_ceil(4), b.oy1 - b.oy0 + kh - 1, w + 2 * pad);
    let steps = pre.steps;
    let chs = pre.leak.len() / steps;
    let xs = c * h * w;
    assert!(
        plane >= pr * wp * 4
            && img >= cg * plane
            && dst.len() >= steps * img
            && (0..steps).all(|t| (f.image(t) + 1) * xs <= f.x.len())
            && pre.fits(steps, c),
        "fused dense k-bit kernel: input neuron shapes do not match"
    );
    let max = ((1u32 << wt.bits) - 1) as f32;
    let recip = crate::sparse::exact_reciprocal(f.step);
    for g in 0..cg {
        let chans = (c - 4 * g).min(4);
        for r in 0..pr {
            let iy = (b.oy0 + r).wrapping_sub(pad);
            for t in 0..steps {
                let row = &mut dst[t * img + g * plane + r * wp * 4..][..wp * 4];
                if iy >= h {
                    row.fill(0); // a padding row
                } else {
                    row[..pad * 4].fill(0);
                    row[(pad + w) * 4..].fill(0);
                }
            }
            if iy >= h {
                continue;
            }
            let mut x0 = 0;
            while x0 < w {
                let m: __mmask16 = ((1u32 << (w - x0).min(16)) - 1) as u16;
                // SAFETY: AVX-512F/BW/VL are enabled here; the masked loads stay in channel
                // `4g + j < C`'s row `iy` of the step's image (asserted inside `x`), the masked
                // store in the packed row (`4·w` bytes after the padding).
                unsafe {
                    let mut v = [_mm512_setzero_ps(); 4];
                    for t in 0..steps {
                        let base = f.image(t) * xs + (4 * g * h + iy) * w + x0;
                        let mut acc = _mm512_setzero_si512();
                        for j in 0..chans {
                            let ch = 4 * g + j;
                            let pc = t * chs + if chs == 1 { 0 } else { ch };
                            let xv = _mm512_maskz_loadu_ps(m, f.x[base + j * h * w..].as_ptr());
                            let s = fire16(pre, t, pc, xv, &mut v[j]);
                            let q = quantise16(s, f.step, recip, max);
                            acc = _mm512_or_si512(
                                acc,
                                _mm512_sllv_epi32(q, _mm512_set1_epi32(8 * j as i32)),
                            );
                        }
                        let at = t * img + g * plane + (r * wp + pad + x0) * 4;
                        _mm512_mask_storeu_epi32(dst[at..].as_mut_ptr().cast(), m, acc);
                    }
                }
                x0 += 16;
            }
        }
    }
}

/// Step `t` of an EM-PF neuron on 16 lanes of inputs `x` (the runtime's operations, in its
/// order): `m = k·x + b` (with the affine) or `x`; after step 0, `m = m + λ·v`; returns the spikes
/// `m − θ` where `m > θ` (there `v = θ`), else 0 (and `v = m`). `pc` indexes λ and `(k, b)`.
#[inline(always)]
fn fire16(nr: &crate::EmpfNeuron<'_>, t: usize, pc: usize, x: __m512, v: &mut __m512) -> __m512 {
    // SAFETY: AVX-512F is enabled by the caller (inlined into it).
    unsafe {
        let mut m = match nr.affine {
            Some((k, b)) => _mm512_add_ps(
                _mm512_mul_ps(_mm512_set1_ps(k[pc]), x),
                _mm512_set1_ps(b[pc]),
            ),
            None => x,
        };
        if t > 0 {
            m = _mm512_add_ps(m, _mm512_mul_ps(_mm512_set1_ps(nr.leak[pc]), *v));
        }
        let th = _mm512_set1_ps(nr.threshold[t]);
        let fire = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, th);
        *v = _mm512_mask_blend_ps(fire, m, th);
        _mm512_maskz_sub_ps(fire, m, th)
    }
}

/// Where a chunk of [`run_fused`] works: the block's packed origin in step 0's image and the
/// images' stride, its output row, first column and columns, the output block, the first step.
struct Cell {
    org: *const u8,
    img: usize,
    ry: usize,
    x0: usize,
    np: usize,
    ob: usize,
    t0: usize,
}

/// Steps `t0..t0 + P` of one cell: the dot products, `y = scale·dot + shift`, the neuron (as the
/// runtime's: `m = k·y + b` or `y`; `m = m + λ·v` after step 0; a spike `m − θ` where `m > θ`,
/// then `v = θ`, else 0 and `v = m`), and the stores. Returns `P`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fused_chunk<const P: usize>(
    f: &Fused<'_>,
    at: &Cell,
    offs: &[usize],
    wb: &[i32],
    v: &mut [__m512; FO],
    out: OutPtr,
    opl: usize,
) -> usize {
    let nr = f.neuron;
    let chs = nr.leak.len() / nr.steps;
    // SAFETY (all): AVX-512F/BW/VL/VNNI are enabled by the caller (inlined into `run_fused`);
    // loads as in `tile_run` (each step's image holds the same layout); stores checked below.
    unsafe {
        let ap: [*const u8; P] = std::array::from_fn(|p| at.org.add((at.t0 + p) * at.img));
        let acc = sum_dots::<P, FO>(ap, offs, wb.as_ptr().add(at.ob % 2 * FO));
        let (pool, np) = (nr.pool, at.np);
        let pn = np / 2;
        let even = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 14, 12, 10, 8, 6, 4, 2, 0);
        let odd = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 15, 13, 11, 9, 7, 5, 3, 1);
        let m16: __mmask16 = ((1u32 << np) - 1) as u16;
        let m8: __mmask16 = ((1u32 << pn) - 1) as u16;
        for j in 0..FO {
            let o = at.ob * FO + j;
            if o >= f.wt.out_ch {
                break;
            }
            let ch = if chs == 1 { 0 } else { o };
            let (sc, sh) = (_mm512_set1_ps(f.scale[o]), _mm512_set1_ps(f.shift[o]));
            for p in 0..P {
                let t = at.t0 + p;
                let yv = _mm512_add_ps(_mm512_mul_ps(sc, _mm512_cvtepi32_ps(acc[p][j])), sh);
                let s = fire16(nr, t, t * chs + ch, yv, &mut v[j]);
                let base = ((t * f.n + f.sample) * f.wt.out_ch + o) * opl;
                if !pool {
                    let idx = base + at.ry * f.pw + at.x0;
                    assert!(idx + np <= f.n * nr.steps * f.wt.out_ch * opl);
                    _mm512_mask_storeu_ps(out.0.add(idx), m16, s);
                    continue;
                }
                if pn == 0 {
                    continue;
                }
                let idx = base + at.ry / 2 * f.pw + at.x0 / 2;
                assert!(idx + pn <= f.n * nr.steps * f.wt.out_ch * opl);
                let e = _mm512_permutexvar_ps(even, s);
                let d = _mm512_permutexvar_ps(odd, s);
                let q = if at.ry.is_multiple_of(2) {
                    _mm512_add_ps(_mm512_add_ps(_mm512_setzero_ps(), e), d)
                } else {
                    let a = _mm512_maskz_loadu_ps(m8, out.0.add(idx));
                    _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(a, e), d), _mm512_set1_ps(0.25))
                };
                _mm512_mask_storeu_ps(out.0.add(idx), m8, q);
            }
        }
    }
    P
}
