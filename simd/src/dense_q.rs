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

#![allow(clippy::needless_range_loop)] // register tiles read clearest as indexed loops

use crate::sparse::Out;
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
    let wt = t.weights;
    let (rows, taps) = (b.oy1 - b.oy0, wt.kh * wt.kw);
    // in units of one `vpdpbusd`, measured on mnist-cnn's two binary convolutions (see
    // `examples/conv_kernels.rs`): the sparse kernels cost about 55 per output pixel, tap and
    // block of 64 outputs (lists, taps, flush) plus 2.4 per non-zero input, tap and block
    let dense =
        rows * b.ow.div_ceil(16) * taps * wt.in_ch.div_ceil(4) * wt.out_ch.div_ceil(OB) * OB;
    let blocks = taps * wt.out_ch.div_ceil(64);
    let fixed5 = blocks * 275 * rows * b.ow;
    if fixed5 >= 5 * dense {
        return true; // whatever the inputs
    }
    // the band's share of the image's non-zero inputs
    let oh = b.h + 2 * b.pad + 1 - wt.kh;
    let nz = src.nonzero() * rows / oh.max(1);
    5 * dense <= fixed5 + blocks * 12 * nz
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
    let max = ((1u32 << wt.bits) - 1) as f32;
    let recip = match src {
        Src::Spikes(_, step) => crate::sparse::exact_reciprocal(step),
        Src::Levels(_) => None,
    };
    for g in 0..cg {
        let chans = (c - 4 * g).min(4);
        for r in 0..pr {
            let iy = (b.oy0 + r).wrapping_sub(pad);
            let row = &mut packed[(g * pr + r) * wp * 4..][..wp * 4];
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
    // the byte offset of each (tap, channel group) from a pixel's origin, in the weights' order:
    // one flat loop of dot products per tile (no short inner loop over the groups)
    let offs: Vec<usize> = (0..taps * cg)
        .map(|i| {
            let (tp, gi) = (i / cg, i % cg);
            gi * plane + ((tp / kw) * wp + tp % kw) * 4
        })
        .collect();
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
    let acc = unsafe { sum_tile::<P>(g, org, wb) };
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

/// The dot products of `P` pixel blocks (origins `org`, bytes) with the 8 outputs of `wb`.
#[inline(always)]
unsafe fn sum_tile<const P: usize>(
    g: &Geom<'_>,
    org: [usize; P],
    wb: &[i32],
) -> [[__m512i; OB]; P] {
    // SAFETY: see `tile_run`; AVX-512F/VNNI enabled by the caller (inlined into `run_vnni`).
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); OB]; P];
        let mut wp = wb.as_ptr();
        let ap: [*const u8; P] = std::array::from_fn(|p| g.a.add(org[p]));
        for &off in g.offs {
            let mut av = [_mm512_setzero_si512(); P];
            for p in 0..P {
                av[p] = _mm512_loadu_si512(ap[p].add(off).cast());
            }
            for j in 0..OB {
                let w = _mm512_set1_epi32(*wp.add(j));
                for p in 0..P {
                    acc[p][j] = _mm512_dpbusd_epi32(acc[p][j], av[p], w);
                }
            }
            wp = wp.add(OB);
        }
        acc
    }
}
