//! Spikes × ±1 weights, skipping zero spikes ("sparse-input" convolution).
//!
//! EM-PF spikes `s = ReLU(m − θ)` are mostly zero, so a convolution that visits only the non-zero
//! inputs does `density ×` the multiply-adds of a dense one. Per image: every input pixel gets the
//! list of its non-zero channels (offsets into the weights, values); then each output row is walked
//! tap by tap (so the weights of one tap stay in L1), and each output pixel adds, for the tapped
//! pixel's entries, `x · w[tap][c][..]` into a block of output channels held in registers, loaded
//! from and stored to a pixel-major row tile. Weights are tap-major `[tap][c][o]` with `o` padded,
//! so a block of outputs is one contiguous row. The tile gets the epilogue `y = scale·acc + shift`
//! (the same scalar code at every level) and is written to the channel planes.
//!
//! Two element types:
//! * float spikes ([`SignConvWeights`], ±1 `f32` rows): `x·(±1)` is exact, so `acc + x·w` and
//!   `fma(x, w, acc)` round identically;
//! * k-bit spike levels `q ∈ 0..2^k` ([`QuantConvWeights`], integer masks): `Σ q·w = 2·Σ_{w=+1} q −
//!   Σ q`, accumulated as `acc += q & mask` (mask all-ones for +1, zero for −1) in `i16` lanes when
//!   `taps·C·(2^k − 1)` fits, else `i32`: twice the lanes of `f32` per vector and half the weight
//!   bytes, and exact integers, so the result equals the bit-serial popcount convolution's.
//!   At the AVX-512 level, levels of at most [`MASK_ADD_MAX_BITS`] bits with 16-bit sums take a
//!   second walk, output pixel by output pixel: all taps of a pixel add into registers, each entry
//!   one 8-bit add of the level under a 64-bit mask of sign bits (1 bit per weight, not 16) per
//!   64 outputs, the 8-bit sums widened into 16-bit ones before any lane can pass 255. Where too
//!   many levels are non-zero for skipping to pay, the AVX-512 level runs the dense 8-bit
//!   dot-product kernel of `crate::dense_q` instead (VNNI, stride 1; a cycle model chooses).
//!
//! Every level adds the same terms in the same order (portable code, auto-vectorised, or AVX2+FMA
//! intrinsics for the accumulation), hence results are bit-identical across levels.

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

/// The integer lanes of a [`QuantConvWeights`] table.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum MaskTable {
    /// `taps·C·(2^k − 1) ≤ i16::MAX`.
    I16(Vec<i16>),
    I32(Vec<i32>),
}

/// ±1 convolution weights as integer masks for k-bit spike levels, for
/// [`crate::Simd::sparse_conv_q`].
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConvWeights {
    pub(crate) out_ch: usize,
    pub(crate) in_ch: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    /// `out_ch` rounded up to a multiple of 16.
    pub(crate) opad: usize,
    /// Bits per input level.
    pub(crate) bits: u32,
    /// `[tap][c][opad]`: all ones for +1, 0 for −1 and padding.
    pub(crate) table: MaskTable,
    /// The same signs at one bit per weight: bit `(tap·C + c)·opad + o` (little-endian bytes) is
    /// set for +1; [`MASK_PAD`] zero bytes follow, so a block read past the last row stays inside.
    pub(crate) signs: Vec<u8>,
    /// The signs as bytes for the dense 8-bit dot-product kernel (`crate::dense_q::dots`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) dots: Vec<i32>,
}

/// Zero bytes after [`QuantConvWeights::signs`]: the widest block of sign bits one read takes.
pub(crate) const MASK_PAD: usize = 16;

/// The most bits per level for which the AVX-512 kernel sums in 8-bit lanes under sign masks
/// (`⌊255 / (2^k − 1)⌋ ≥ 4` entries between widenings; above, the 16-bit `and` path is as fast).
#[cfg(target_arch = "x86_64")]
pub(crate) const MASK_ADD_MAX_BITS: u32 = 6;

impl QuantConvWeights {
    /// The masks of `w` for inputs of `bits` bits (1..=8): `i16` lanes when no sum can overflow
    /// them, else `i32`.
    pub fn new(w: &SignConvWeights, bits: u32) -> Result<Self> {
        if !(1..=8).contains(&bits) {
            return shape_err(format!("QuantConvWeights: {bits} bits (1..=8)"));
        }
        let taps = w.kh * w.kw;
        let worst = (taps * w.in_ch) as u64 * ((1u64 << bits) - 1);
        if worst > i32::MAX as u64 {
            return shape_err(format!(
                "QuantConvWeights: {} inputs of {bits} bits may overflow 32-bit sums",
                taps * w.in_ch
            ));
        }
        let opad = w.out_ch.div_ceil(16) * 16;
        let mask = |t: usize, c: usize, o: usize| -> bool {
            o < w.out_ch && w.w[(t * w.in_ch + c) * w.opad + o] > 0.0
        };
        let rows = taps * w.in_ch;
        let table = if worst <= i16::MAX as u64 {
            MaskTable::I16(
                (0..rows * opad)
                    .map(|i| -i16::from(mask(i / opad / w.in_ch, i / opad % w.in_ch, i % opad)))
                    .collect(),
            )
        } else {
            MaskTable::I32(
                (0..rows * opad)
                    .map(|i| -i32::from(mask(i / opad / w.in_ch, i / opad % w.in_ch, i % opad)))
                    .collect(),
            )
        };
        let mut signs = vec![0u8; rows * opad / 8 + MASK_PAD];
        for i in 0..rows * opad {
            if mask(i / opad / w.in_ch, i / opad % w.in_ch, i % opad) {
                signs[i / 8] |= 1 << (i % 8);
            }
        }
        Ok(QuantConvWeights {
            #[cfg(target_arch = "x86_64")]
            dots: crate::dense_q::dots(w.out_ch, w.in_ch, taps, mask),
            out_ch: w.out_ch,
            in_ch: w.in_ch,
            kh: w.kh,
            kw: w.kw,
            opad,
            bits,
            table,
            signs,
        })
    }
    /// `(out_ch, in_ch, kh, kw)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.out_ch, self.in_ch, self.kh, self.kw)
    }
    /// Bits per input level.
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Whether sums run in 16-bit lanes.
    pub fn narrow(&self) -> bool {
        matches!(self.table, MaskTable::I16(_))
    }
}

/// The output-row band of one image that a task computes, and the convolution's geometry.
#[derive(Clone, Copy)]
pub(crate) struct Band {
    pub h: usize,
    pub w: usize,
    pub ow: usize,
    pub stride: usize,
    pub pad: usize,
    pub oy0: usize,
    pub oy1: usize,
}

impl Band {
    /// The input pixels `p0..p1` (flat, row-major) of the rows that output rows `oy0..oy1` of a
    /// kernel `kh` rows high tap.
    #[inline(always)]
    fn input_pixels(&self, kh: usize) -> (usize, usize) {
        let iy0 = (self.oy0 * self.stride).saturating_sub(self.pad);
        let iy1 = ((self.oy1 - 1) * self.stride + kh)
            .saturating_sub(self.pad)
            .min(self.h);
        (iy0 * self.w, iy1.max(iy0) * self.w)
    }
}

/// One task of a sparse convolution: one image of inputs `X` (or two that share the weight loads:
/// `x2`), with the weights `W`.
pub(crate) struct SparseTask<'a, X, W> {
    /// The image, `C x H x W`.
    pub x: &'a [X],
    /// A second image of the same shape run along (its non-zero lists are merged with `x`'s).
    pub x2: Option<&'a [X]>,
    pub band: Band,
    pub weights: &'a W,
    pub scale: &'a [f32],
    pub shift: &'a [f32],
}

impl<X, W> SparseTask<'_, X, W> {
    /// The `IMG` images run together: `[x]`, or `[x, x2]`.
    #[inline(always)]
    fn images<const IMG: usize>(&self) -> [&[X]; IMG] {
        let mut imgs = [self.x; IMG];
        imgs[IMG - 1] = self.x2.unwrap_or(self.x);
        imgs
    }
}

/// A float sparse convolution task.
pub(crate) type Task<'a> = SparseTask<'a, f32, SignConvWeights>;
/// A k-bit sparse convolution task (levels).
pub(crate) type QTask<'a> = SparseTask<'a, u8, QuantConvWeights>;

/// Per-worker buffers: the non-zero lists (`IMG` values per entry).
pub(crate) struct Lists<V> {
    /// The taps of the current output row: `(ox, base, p)`.
    taps: Vec<[usize; 3]>,
    /// The taps of the current output row pixel by pixel, `(sign byte offset, e0, e1)` (the
    /// masked-add kernel), and where each output pixel's taps start (`ow + 1` values).
    #[cfg(target_arch = "x86_64")]
    pix: Vec<[u32; 3]>,
    #[cfg(target_arch = "x86_64")]
    starts: Vec<usize>,
    /// Per listed input pixel and image, the sum of the values.
    sums: Vec<i32>,
    /// Per output pixel of the row and image, the sum of its inputs.
    totals: Vec<i32>,
    /// Outputs (and float sums) of one output row, pixel-major, before they go to their planes.
    tile: Vec<f32>,
    /// Integer sums of one output row, pixel-major.
    tile16: Vec<i16>,
    /// The masked-add kernel's entries: `1 + IMG` words each, the sign byte offset of the
    /// channel's row and each image's level times 64 (the offset of its splat vector).
    #[cfg(target_arch = "x86_64")]
    ent: Vec<u32>,
    /// Per pixel of a block of 64, per block of 64 channels, the non-zero channels as bits.
    #[cfg(target_arch = "x86_64")]
    bits: Vec<u64>,
    tile32: Vec<i32>,
    off: Vec<u32>,
    idx: Vec<u32>,
    val: Vec<V>,
}

impl<V> Default for Lists<V> {
    fn default() -> Self {
        Lists {
            taps: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            pix: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            starts: Vec::new(),
            sums: Vec::new(),
            totals: Vec::new(),
            tile: Vec::new(),
            tile16: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            ent: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            bits: Vec::new(),
            tile32: Vec::new(),
            off: Vec::new(),
            idx: Vec::new(),
            val: Vec::new(),
        }
    }
}

/// An output value: the kernels write every output once, so outputs need not be initialised first
/// (see `Simd::sparse_conv_vec`).
pub(crate) type Out = std::mem::MaybeUninit<f32>;

/// Float kernel buffers.
pub(crate) type Scratch = Lists<f32>;
/// k-bit kernel buffers.
pub(crate) type QScratch = Lists<u8>;

/// The float kernel of one ISA level: fills `y` (and `y2` for `x2`), the band `O x (oy1 − oy0) x OW`
/// of the output image.
pub(crate) type SparseFn = KernelFn<f32, SignConvWeights, Scratch>;
/// The k-bit kernel of one ISA level: fills `y`, the band of the output image.
pub(crate) type SparseQFn = KernelFn<u8, QuantConvWeights, QScratch>;
/// A sparse-convolution kernel of one ISA level over inputs `X`, weights `W`, buffers `S`.
pub(crate) type KernelFn<X, W, S> = fn(&SparseTask<'_, X, W>, &mut S, &mut [Out], &mut [Out]);

/// The portable float kernel (scalar level; NEON level on aarch64, where NEON is the baseline).
pub(crate) fn sparse_generic(t: &Task<'_>, sc: &mut Scratch, y: &mut [Out], y2: &mut [Out]) {
    dispatch(Portable::<false>, t, sc, y, y2)
}

/// The portable k-bit kernel.
pub(crate) fn sparse_q_generic(t: &QTask<'_>, sc: &mut QScratch, y: &mut [Out], y2: &mut [Out]) {
    dispatch_q(Portable::<false>, t, sc, y, y2)
}

#[inline(always)]
fn dispatch<K: Accum>(k: K, t: &Task<'_>, sc: &mut Scratch, y: &mut [Out], y2: &mut [Out]) {
    if t.x2.is_some() {
        run::<K, 2>(k, t, sc, [y, y2])
    } else {
        run::<K, 1>(k, t, sc, [y])
    }
}

/// Builds the non-zero lists of the input rows that output rows `oy0..oy1` tap: entry `(c·opad,
/// values of the `imgs` at channel c)` for every channel where one of them is non-zero. Returns the
/// first input pixel listed.
#[inline(always)]
fn build<V: Copy + PartialEq + Default, const IMG: usize>(
    b: &Band,
    (c, kh, opad): (usize, usize, usize),
    imgs: [&[V]; IMG],
    sc: &mut Lists<V>,
) -> usize {
    let hw = b.h * b.w;
    let (p0, p1) = b.input_pixels(kh);
    sc.off.clear();
    sc.off.push(0);
    // branch-free: every candidate entry is written, the count advances on non-zeros (the lists
    // only grow; entries past the last offset are stale and never read)
    let most = (p1 - p0) * c;
    if sc.idx.len() < most {
        sc.idx.resize(most, 0);
        sc.val.resize(most * IMG, V::default());
    }
    let zero = V::default();
    let mut len = 0;
    // the lists as local slices: the stores through them cannot alias the `Vec` headers, so the
    // pointers stay in registers
    let (idx, val) = (&mut sc.idx[..most], &mut sc.val[..most * IMG]);
    for p in p0..p1 {
        for ci in 0..c {
            let mut nz = false;
            for k in 0..IMG {
                let v = imgs[k][ci * hw + p];
                val[len * IMG + k] = v;
                nz |= v != zero;
            }
            idx[len] = (ci * opad) as u32;
            len += usize::from(nz);
        }
        sc.off.push(len as u32);
    }
    p0
}

/// Lists in `out`, as `(ox, base, p)`, the taps of output row `oy` that fall inside the image, in
/// the order tap, then output pixel `ox`: `base` is the tap's offset into the `[tap][c][opad]`
/// table, `p` the tapped input pixel (counted from the first listed, `p0`). Every output pixel
/// sees its taps in the order `(ky, kx)`. A list, not a callback: a closure would not inherit the
/// caller's target features.
#[inline(always)]
fn row_taps(
    b: &Band,
    (c, kh, kw, opad): (usize, usize, usize, usize),
    p0: usize,
    oy: usize,
    out: &mut Vec<[usize; 3]>,
) {
    out.clear();
    let (h, w) = (b.h as isize, b.w as isize);
    for ky in 0..kh {
        let iy = (oy * b.stride + ky) as isize - b.pad as isize;
        if iy < 0 || iy >= h {
            continue;
        }
        for kx in 0..kw {
            let base = (ky * kw + kx) * c * opad;
            for ox in 0..b.ow {
                let ix = (ox * b.stride + kx) as isize - b.pad as isize;
                if ix < 0 || ix >= w {
                    continue;
                }
                out.push([ox, base, (iy * w + ix) as usize - p0]);
            }
        }
    }
}

/// The width of the output block at `ob`: `max`, halved down to `min` while it passes `opad`.
#[inline(always)]
fn width(opad: usize, ob: usize, max: usize, min: usize) -> usize {
    let mut width = max;
    while width > min && opad - ob < width {
        width /= 2;
    }
    width
}

#[inline(always)]
fn run<K: Accum, const IMG: usize>(k: K, t: &Task<'_>, sc: &mut Scratch, mut y: [&mut [Out]; IMG]) {
    let wt = t.weights;
    let p0 = build::<f32, IMG>(&t.band, (wt.in_ch, wt.kh, wt.opad), t.images(), sc);
    // at most 8 vector accumulators per image (16 registers in all at AVX2 and below, of 32 at
    // AVX-512)
    let max = if IMG == 1 {
        K::F32_LANES
    } else {
        K::F32_PAIR_LANES
    };
    let mut ob = 0;
    while ob < wt.out_ch {
        let width = width(wt.opad, ob, max, 8);
        match width {
            128 => block::<K, IMG, 128>(k, t, sc, p0, ob, &mut y),
            64 => block::<K, IMG, 64>(k, t, sc, p0, ob, &mut y),
            32 => block::<K, IMG, 32>(k, t, sc, p0, ob, &mut y),
            16 => block::<K, IMG, 16>(k, t, sc, p0, ob, &mut y),
            _ => block::<K, IMG, 8>(k, t, sc, p0, ob, &mut y),
        }
        ob += width;
    }
}

#[inline(always)]
fn block<K: Accum, const IMG: usize, const OB: usize>(
    k: K,
    t: &Task<'_>,
    sc: &mut Scratch,
    p0: usize,
    ob: usize,
    y: &mut [&mut [Out]; IMG],
) {
    let wt = t.weights;
    let b = &t.band;
    let geom = (wt.in_ch, wt.kh, wt.kw, wt.opad);
    let nout = (wt.out_ch - ob).min(OB);
    let (scale, shift) = (&t.scale[ob..ob + nout], &t.shift[ob..ob + nout]);
    let px = IMG * OB;
    for oy in b.oy0..b.oy1 {
        row_taps(b, geom, p0, oy, &mut sc.taps);
        sc.tile.clear();
        sc.tile.resize(b.ow * px, 0.0);
        for &[ox, base, p] in &sc.taps {
            let (e0, e1) = (sc.off[p] as usize, sc.off[p + 1] as usize);
            if e0 < e1 {
                k.f32_acc::<IMG, OB>(
                    &wt.w[base + ob..],
                    &sc.idx[e0..e1],
                    &sc.val[e0 * IMG..e1 * IMG],
                    &mut sc.tile[ox * px..][..px],
                );
            }
        }
        for v in sc.tile.chunks_exact_mut(OB) {
            for j in 0..nout {
                v[j] = scale[j] * v[j] + shift[j];
            }
        }
        k.flush::<IMG>(&sc.tile, b, oy, ob, nout, OB, y);
    }
}

/// Copies the tile of output row `oy` (`OW x IMG x rows`, pixel-major, for channels `ob..ob +
/// nout`) into the channel planes of the band outputs `y`.
#[inline(always)]
fn flush<const IMG: usize>(
    tile: &[f32],
    b: &Band,
    oy: usize,
    ob: usize,
    nout: usize,
    rows: usize,
    y: &mut [&mut [Out]; IMG],
) {
    let (ow, plane) = (b.ow, (b.oy1 - b.oy0) * b.ow);
    let at = (oy - b.oy0) * ow;
    for (i, yk) in y.iter_mut().enumerate() {
        // read the tile in order; the writes go to `nout` output rows, each a few cache lines
        // (a strided read of the tile would map onto a few L1 sets)
        // 8 pixels at a time: one 32-byte store per output row instead of eight 4-byte ones
        let mut ox = 0;
        while ox + 8 <= ow {
            for j in 0..nout {
                let mut v = [Out::uninit(); 8];
                for (k, v) in v.iter_mut().enumerate() {
                    *v = Out::new(tile[((ox + k) * IMG + i) * rows + j]);
                }
                yk[(ob + j) * plane + at + ox..][..8].copy_from_slice(&v);
            }
            ox += 8;
        }
        for ox in ox..ow {
            let src = &tile[(ox * IMG + i) * rows..][..nout];
            for (j, &v) in src.iter().enumerate() {
                yk[(ob + j) * plane + at + ox] = Out::new(v);
            }
        }
    }
}

/// The accumulation of the entries of one tapped input pixel into one output pixel, per ISA level:
/// `acc[i·OB + j] += Σ_e val[e·IMG + i]·w[idx[e] + j]` for `j < OB` and the `IMG` images, entries in
/// order (so every level sums identically). `w` starts at the tap's row of channel 0 and block `ob`.
/// Integer levels: `val & mask`.
pub(crate) trait Accum: Copy {
    /// Widest block of f32 lanes [`Accum::f32_acc`] takes for one image (8 vector accumulators);
    /// the lanes are independent sums, so the block width never changes a result.
    const F32_LANES: usize = 64;
    /// The same for an image pair (16 vector accumulators in all).
    const F32_PAIR_LANES: usize = 32;
    /// `dst[j·ds + i] = src[i·ss + j]` for `i, j < 8` (an 8 x 8 block transposed; a copy, so the
    /// same at every level).
    #[inline(always)]
    fn transpose8(self, src: &[f32], ss: usize, dst: &mut [f32], ds: usize) {
        for i in 0..8 {
            let row = &src[i * ss..][..8];
            for (j, &v) in row.iter().enumerate() {
                dst[j * ds + i] = v;
            }
        }
    }
    /// [`flush`]: the row tile into the channel planes (a copy, so the same at every level).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn flush<const IMG: usize>(
        self,
        tile: &[f32],
        b: &Band,
        oy: usize,
        ob: usize,
        nout: usize,
        rows: usize,
        y: &mut [&mut [Out]; IMG],
    ) {
        flush::<IMG>(tile, b, oy, ob, nout, rows, y)
    }
    /// The eight dot products of the sparse dX (`crate::sparse_dw::dot8_portable`).
    #[inline(always)]
    fn f32_dot8(
        self,
        w: &[f32],
        g: &[f32],
        rows: &[usize; 8],
        goff: &[usize],
        op: usize,
    ) -> [f32; 8] {
        crate::sparse_dw::dot8_portable(w, g, rows, goff, op)
    }
    fn f32_acc<const IMG: usize, const OB: usize>(
        self,
        w: &[f32],
        idx: &[u32],
        val: &[f32],
        acc: &mut [f32],
    );
    fn i16_acc<const IMG: usize, const OB: usize>(
        self,
        m: &[i16],
        idx: &[u32],
        val: &[u8],
        acc: &mut [i16],
    );
    fn i32_acc<const IMG: usize, const OB: usize>(
        self,
        m: &[i32],
        idx: &[u32],
        val: &[u8],
        acc: &mut [i32],
    );
}

/// Plain Rust (auto-vectorised) accumulation; `FMA`: fused multiply-add for floats (the same
/// result: products with ±1 are exact).
#[derive(Clone, Copy)]
pub(crate) struct Portable<const FMA: bool>;

impl<const FMA: bool> Accum for Portable<FMA> {
    #[inline(always)]
    fn f32_acc<const IMG: usize, const OB: usize>(
        self,
        w: &[f32],
        idx: &[u32],
        val: &[f32],
        acc: &mut [f32],
    ) {
        for (e, &ix) in idx.iter().enumerate() {
            let row: &[f32; OB] = w[ix as usize..][..OB].try_into().expect("weight row");
            for i in 0..IMG {
                let v = val[e * IMG + i];
                let a: &mut [f32; OB] = (&mut acc[i * OB..][..OB]).try_into().expect("acc");
                for j in 0..OB {
                    a[j] = if FMA {
                        v.mul_add(row[j], a[j])
                    } else {
                        a[j] + v * row[j]
                    };
                }
            }
        }
    }
    #[inline(always)]
    fn i16_acc<const IMG: usize, const OB: usize>(
        self,
        m: &[i16],
        idx: &[u32],
        val: &[u8],
        acc: &mut [i16],
    ) {
        int_acc::<i16, IMG, OB>(m, idx, val, acc)
    }
    #[inline(always)]
    fn i32_acc<const IMG: usize, const OB: usize>(
        self,
        m: &[i32],
        idx: &[u32],
        val: &[u8],
        acc: &mut [i32],
    ) {
        int_acc::<i32, IMG, OB>(m, idx, val, acc)
    }
}

#[inline(always)]
fn int_acc<A: Lane, const IMG: usize, const OB: usize>(
    m: &[A],
    idx: &[u32],
    val: &[u8],
    acc: &mut [A],
) {
    for (e, &ix) in idx.iter().enumerate() {
        let row: &[A; OB] = m[ix as usize..][..OB].try_into().expect("mask row");
        for i in 0..IMG {
            let v = A::from_u8(val[e * IMG + i]);
            let a: &mut [A; OB] = (&mut acc[i * OB..][..OB]).try_into().expect("acc");
            for j in 0..OB {
                a[j] = a[j].and_add(v, row[j]);
            }
        }
    }
}

/// An integer accumulator lane.
trait Lane: Copy + Default {
    /// [`Accum::i16_acc`] or [`Accum::i32_acc`].
    fn acc<K: Accum, const IMG: usize, const OB: usize>(
        k: K,
        m: &[Self],
        idx: &[u32],
        val: &[u8],
        acc: &mut [Self],
    );
    /// The row tile of this lane type.
    fn tile(sc: &mut QScratch) -> &mut Vec<Self>;
    fn and_add(self, v: Self, mask: Self) -> Self;
    fn from_u8(v: u8) -> Self;
    fn wide(self) -> i32;
}

macro_rules! lane {
    ($t:ty, $acc:ident, $tile:ident) => {
        impl Lane for $t {
            #[inline(always)]
            fn acc<K: Accum, const IMG: usize, const OB: usize>(
                k: K,
                m: &[$t],
                idx: &[u32],
                val: &[u8],
                acc: &mut [$t],
            ) {
                k.$acc::<IMG, OB>(m, idx, val, acc)
            }
            #[inline(always)]
            fn tile(sc: &mut QScratch) -> &mut Vec<$t> {
                &mut sc.$tile
            }
            #[inline(always)]
            fn and_add(self, v: $t, mask: $t) -> $t {
                self.wrapping_add(v & mask)
            }
            #[inline(always)]
            fn from_u8(v: u8) -> $t {
                <$t>::from(v)
            }
            #[inline(always)]
            fn wide(self) -> i32 {
                i32::from(self)
            }
        }
    };
}
lane!(i16, i16_acc, tile16);
lane!(i32, i32_acc, tile32);

/// `q = clamp(round(x / step), 0, 2^bits − 1)` (round half away from zero; NaN ↦ 0), element-wise.
#[inline(always)]
pub(crate) fn quantise_body(x: &[f32], step: f32, bits: u32, q: &mut [u8]) {
    match exact_reciprocal(step) {
        // `v / step` and `v · (1/step)` round the same real number: bit-identical, no division
        Some(r) => quantise_loop(x, |v| v * r, bits, q),
        None => quantise_loop(x, |v| v / step, bits, q),
    }
}

/// `1 / step` when both are normal powers of two: then `v · (1/step)` and `v / step` are the same
/// real number, so they round to the same float for every `v` (overflow, underflow, NaN included).
#[inline(always)]
pub(crate) fn exact_reciprocal(step: f32) -> Option<f32> {
    let r = 1.0 / step;
    (step > 0.0 && step.is_normal() && r.is_normal() && step.to_bits() & 0x007f_ffff == 0)
        .then_some(r)
}

#[inline(always)]
fn quantise_loop(x: &[f32], scaled: impl Fn(f32) -> f32, bits: u32, q: &mut [u8]) {
    let max = ((1u32 << bits) - 1) as f32;
    for (d, &v) in q.iter_mut().zip(x) {
        let r = scaled(v).round();
        // `clamp(0, max) as u8` without the saturating cast (which does not vectorise): NaN and
        // values ≤ 0 give 0, like the cast of a NaN
        let r = if r > 0.0 { r.min(max) } else { 0.0 };
        // SAFETY: `r` is finite, in [0, max] ⊂ [0, 255].
        *d = unsafe { r.to_int_unchecked::<u8>() };
    }
}

/// The quantiser of one ISA level.
pub(crate) type QuantiseFn = fn(&[f32], f32, u32, &mut [u8]);

/// Buffers of a k-bit convolution task on float spikes: the levels of its (up to two) images, and
/// the level kernels' buffers.
#[derive(Default)]
pub(crate) struct SpikeScratch {
    q: QScratch,
    levels: [Vec<u8>; 2],
}

/// A k-bit convolution task on float spikes `t.x` (and `t.x2`): the dense kernel where it takes
/// the task (quantising as it packs; only with `dense`, the AVX-512 level), else the images
/// quantised by `quantise` into levels for the level kernel `kernel`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spikes_task(
    t: &SparseTask<'_, f32, QuantConvWeights>,
    step: f32,
    dense: bool,
    quantise: QuantiseFn,
    kernel: SparseQFn,
    sc: &mut SpikeScratch,
    y: &mut [Out],
    y2: &mut [Out],
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = dense;
    #[cfg(target_arch = "x86_64")]
    {
        use crate::dense_q::{Src, run, takes};
        if dense && takes(t, Src::Spikes(t.x, step)) {
            run(t, Src::Spikes(t.x, step), y);
            if let Some(x2) = t.x2 {
                run(t, Src::Spikes(x2, step), y2);
            }
            return;
        }
    }
    let bits = t.weights.bits;
    let [l1, l2] = &mut sc.levels;
    l1.resize(t.x.len(), 0);
    quantise(t.x, step, bits, l1);
    if let Some(x2) = t.x2 {
        l2.resize(x2.len(), 0);
        quantise(x2, step, bits, l2);
    }
    let task = SparseTask {
        x: &l1[..],
        x2: t.x2.map(|_| &l2[..]),
        band: t.band,
        weights: t.weights,
        scale: t.scale,
        shift: t.shift,
    };
    kernel(&task, &mut sc.q, y, y2)
}

/// The portable quantiser.
pub(crate) fn quantise_generic(x: &[f32], step: f32, bits: u32, q: &mut [u8]) {
    quantise_body(x, step, bits, q)
}

#[inline(always)]
fn dispatch_q<K: Accum>(k: K, t: &QTask<'_>, sc: &mut QScratch, y: &mut [Out], y2: &mut [Out]) {
    if t.x2.is_some() {
        run_q::<K, 2>(k, t, sc, [y, y2])
    } else {
        run_q::<K, 1>(k, t, sc, [y])
    }
}

#[inline(always)]
fn run_q<K: Accum, const IMG: usize>(
    k: K,
    t: &QTask<'_>,
    sc: &mut QScratch,
    mut y: [&mut [Out]; IMG],
) {
    let wt = t.weights;
    let p0 = build::<u8, IMG>(&t.band, (wt.in_ch, wt.kh, wt.opad), t.images(), sc);
    // Σ q per listed input pixel and image, for `dot = 2·Σ_{w=+1} q − Σ q`
    sc.sums.clear();
    for p in 0..sc.off.len() - 1 {
        let mut s = [0i32; IMG];
        for e in sc.off[p] as usize..sc.off[p + 1] as usize {
            for k in 0..IMG {
                s[k] += i32::from(sc.val[e * IMG + k]);
            }
        }
        sc.sums.extend_from_slice(&s);
    }
    let max = if IMG == 1 { 128 } else { 64 };
    let mut ob = 0;
    while ob < wt.out_ch {
        // at most 8 vectors of 16 lanes (AVX2), or of 8 (NEON)
        let width = match &wt.table {
            MaskTable::I16(m) => {
                let width = width(wt.opad, ob, max, 16);
                match width {
                    128 => block_q::<K, i16, IMG, 128>(k, t, m, sc, p0, ob, &mut y),
                    64 => block_q::<K, i16, IMG, 64>(k, t, m, sc, p0, ob, &mut y),
                    32 => block_q::<K, i16, IMG, 32>(k, t, m, sc, p0, ob, &mut y),
                    _ => block_q::<K, i16, IMG, 16>(k, t, m, sc, p0, ob, &mut y),
                }
                width
            }
            MaskTable::I32(m) => {
                let width = width(wt.opad, ob, max / 2, 16);
                match width {
                    64 => block_q::<K, i32, IMG, 64>(k, t, m, sc, p0, ob, &mut y),
                    32 => block_q::<K, i32, IMG, 32>(k, t, m, sc, p0, ob, &mut y),
                    _ => block_q::<K, i32, IMG, 16>(k, t, m, sc, p0, ob, &mut y),
                }
                width
            }
        };
        ob += width;
    }
}

#[inline(always)]
fn block_q<K: Accum, A: Lane, const IMG: usize, const OB: usize>(
    k: K,
    t: &QTask<'_>,
    m: &[A],
    sc: &mut QScratch,
    p0: usize,
    ob: usize,
    y: &mut [&mut [Out]; IMG],
) {
    let wt = t.weights;
    let b = &t.band;
    let geom = (wt.in_ch, wt.kh, wt.kw, wt.opad);
    let nout = (wt.out_ch - ob).min(OB);
    let (scale, shift) = (&t.scale[ob..ob + nout], &t.shift[ob..ob + nout]);
    let px = IMG * OB;
    let mut tile = std::mem::take(A::tile(sc));
    for oy in b.oy0..b.oy1 {
        row_taps(b, geom, p0, oy, &mut sc.taps);
        tile.clear();
        tile.resize(b.ow * px, A::default());
        sc.totals.clear();
        sc.totals.resize(b.ow * IMG, 0);
        for &[ox, base, p] in &sc.taps {
            for i in 0..IMG {
                sc.totals[ox * IMG + i] += sc.sums[p * IMG + i];
            }
            let (e0, e1) = (sc.off[p] as usize, sc.off[p + 1] as usize);
            if e0 < e1 {
                A::acc::<K, IMG, OB>(
                    k,
                    &m[base + ob..],
                    &sc.idx[e0..e1],
                    &sc.val[e0 * IMG..e1 * IMG],
                    &mut tile[ox * px..][..px],
                );
            }
        }
        // every value below is overwritten
        if sc.tile.len() < b.ow * px {
            sc.tile.resize(b.ow * px, 0.0);
        }
        for ((out, a), &total) in sc
            .tile
            .chunks_exact_mut(OB)
            .zip(tile.chunks_exact(OB))
            .zip(&sc.totals)
        {
            epilogue_q(a, total, scale, shift, &mut out[..nout]);
        }
        k.flush::<IMG>(&sc.tile, b, oy, ob, nout, OB, y);
    }
    *A::tile(sc) = tile;
}

/// The masked-add k-bit kernel (AVX-512 level): the sums `Σ_{w=+1} q` of one output pixel for a
/// block of `OB` outputs and `IMG` images, `acc[i·OB + j]`, from its taps `(sign byte offset of
/// the tap's row of channel 0 and the block, e0, e1)`.
#[cfg(target_arch = "x86_64")]
pub(crate) type MaskPixelFn<const IMG: usize, const OB: usize> =
    fn(signs: &[u8], span: usize, taps: &[[u32; 3]], ent: &[u32], chunk: usize, acc: &mut [i16]);

/// Lists in `sc.pix` the taps of output row `oy` pixel by pixel (`sc.starts[ox]..sc.starts[ox +
/// 1]`), each as `(byte offset of its sign row, e0, e1)`, leaving out taps of no entries, and in
/// `sc.totals` each pixel's `Σ q` per image.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn pixel_taps<const IMG: usize>(
    b: &Band,
    wt: &QuantConvWeights,
    p0: usize,
    oy: usize,
    sc: &mut QScratch,
) {
    let (c, kh, kw, opad) = (wt.in_ch, wt.kh, wt.kw, wt.opad);
    // the kernel rows (and, per pixel, columns) inside the image: `0 ≤ o·stride + k − pad < size`
    let inside = |o: usize, size: usize, k: usize| {
        let at = o * b.stride;
        (
            b.pad.saturating_sub(at),
            (size + b.pad).saturating_sub(at).min(k),
        )
    };
    let (ky0, ky1) = inside(oy, b.h, kh);
    sc.pix.clear();
    sc.pix.reserve(b.ow * kh * kw);
    sc.starts.clear();
    sc.totals.clear();
    sc.totals.resize(b.ow * IMG, 0);
    let (off, sums, totals) = (&sc.off[..], &sc.sums[..], &mut sc.totals[..]);
    for ox in 0..b.ow {
        sc.starts.push(sc.pix.len());
        let (kx0, kx1) = inside(ox, b.w, kw);
        let mut tot = [0i32; IMG];
        for ky in ky0..ky1 {
            let iy = oy * b.stride + ky - b.pad;
            for kx in kx0..kx1 {
                let p = iy * b.w + ox * b.stride + kx - b.pad - p0;
                for i in 0..IMG {
                    tot[i] += sums[p * IMG + i];
                }
                let (e0, e1) = (off[p], off[p + 1]);
                if e0 < e1 {
                    let byte = (ky * kw + kx) * c * opad / 8;
                    sc.pix.push([byte as u32, e0, e1]);
                }
            }
        }
        totals[ox * IMG..][..IMG].copy_from_slice(&tot);
    }
    sc.starts.push(sc.pix.len());
}

/// Entries between two widenings of 8-bit sums of levels of `bits` bits: no lane passes 255.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn mask_chunk(bits: u32) -> usize {
    255 / ((1usize << bits) - 1)
}

/// The non-zero bytes of `x` (at most 64) as the bits of a word, bit `i` for `x[i]`.
#[cfg(target_arch = "x86_64")]
pub(crate) type NonzeroFn = fn(&[u8]) -> u64;

/// Transposes the 64 x 64 bit matrix `a` (row `i` = `a[i]`, column `j` = bit `j`): swaps the
/// off-diagonal halves of ever smaller blocks (32, 16, ..., 1).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn transpose64(a: &mut [u64; 64]) {
    let mut j = 32;
    let mut mask: u64 = 0x0000_0000_FFFF_FFFF;
    while j != 0 {
        let mut k = 0;
        while k < 64 {
            for i in k..k + j {
                let t = ((a[i] >> j) ^ a[i + j]) & mask;
                a[i] ^= t << j;
                a[i + j] ^= t;
            }
            k += 2 * j;
        }
        j >>= 1;
        mask ^= mask << j;
    }
}

/// The lists of the masked-add kernel for the input rows the band taps: per input pixel (from
/// the first listed, returned), its entries `(c·opad / 8, 64·q per image)` for the channels where
/// one of the images is non-zero, in channel order, in `sc.ent` (pixel `p`'s from `sc.off[p]`),
/// and its `Σ q` per image in `sc.sums`. Non-zero channels are found 64 pixels x 64 channels at
/// a time: one vector test per channel row of 64 pixels, a bit-matrix transpose, then the set
/// bits of each pixel (no per-channel work for zero inputs).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn mask_lists<const IMG: usize>(
    b: &Band,
    wt: &QuantConvWeights,
    imgs: [&[u8]; IMG],
    sc: &mut QScratch,
    nonzero: NonzeroFn,
) -> usize {
    let (hw, c) = (b.h * b.w, wt.in_ch);
    let opad8 = (wt.opad / 8) as u32;
    let (p0, p1) = b.input_pixels(wt.kh);
    sc.off.clear();
    sc.off.push(0);
    sc.ent.clear();
    sc.sums.clear();
    let blocks = c.div_ceil(64);
    sc.bits.clear();
    sc.bits.resize(blocks * 64, 0);
    let mut m = [0u64; 64];
    let mut len = 0u32;
    let mut pb = p0;
    while pb < p1 {
        let np = (p1 - pb).min(64);
        for cbi in 0..blocks {
            let (cb, nc) = (cbi * 64, (c - cbi * 64).min(64));
            for r in 0..64 {
                m[r] = 0;
                if r < nc {
                    for k in 0..IMG {
                        m[r] |= nonzero(&imgs[k][(cb + r) * hw + pb..][..np]);
                    }
                }
            }
            transpose64(&mut m);
            sc.bits[cb..cb + 64].copy_from_slice(&m);
        }
        for pp in 0..np {
            let p = pb + pp;
            let mut s = [0i32; IMG];
            for cbi in 0..blocks {
                let mut bits = sc.bits[cbi * 64 + pp];
                while bits != 0 {
                    let ci = cbi * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    sc.ent.push(ci as u32 * opad8);
                    for k in 0..IMG {
                        let v = imgs[k][ci * hw + p];
                        s[k] += i32::from(v);
                        sc.ent.push(64 * u32::from(v));
                    }
                    len += 1;
                }
            }
            sc.off.push(len);
            sc.sums.extend_from_slice(&s);
        }
        pb += np;
    }
    p0
}

/// The k-bit kernel walking output pixels (all taps of a pixel summed in registers by `pixel`),
/// for narrow tables of at most [`MASK_ADD_MAX_BITS`] bits; blocks of `OB` outputs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn run_mask<K: Accum, const IMG: usize, const OB: usize>(
    k: K,
    t: &QTask<'_>,
    sc: &mut QScratch,
    mut y: [&mut [Out]; IMG],
    pixel: MaskPixelFn<IMG, OB>,
    nonzero: NonzeroFn,
) {
    let wt = t.weights;
    let b = &t.band;
    // entries at sign byte offsets `c·opad / 8`
    let p0 = mask_lists::<IMG>(b, wt, t.images(), sc, nonzero);
    let chunk = mask_chunk(wt.bits);
    let span = wt.in_ch.saturating_sub(1) * wt.opad / 8 + OB / 8;
    let px = IMG * OB;
    let mut acc = [0i16; 256];
    let acc = &mut acc[..px];
    if sc.tile.len() < b.ow * px {
        sc.tile.resize(b.ow * px, 0.0);
    }
    for oy in b.oy0..b.oy1 {
        pixel_taps::<IMG>(b, wt, p0, oy, sc);
        let mut ob = 0;
        while ob < wt.out_ch {
            let nout = (wt.out_ch - ob).min(OB);
            let (scale, shift) = (&t.scale[ob..ob + nout], &t.shift[ob..ob + nout]);
            let signs = &wt.signs[ob / 8..];
            for ox in 0..b.ow {
                let taps = &sc.pix[sc.starts[ox]..sc.starts[ox + 1]];
                pixel(signs, span, taps, &sc.ent, chunk, acc);
                for i in 0..IMG {
                    let total = sc.totals[ox * IMG + i];
                    let out = &mut sc.tile[(ox * IMG + i) * OB..][..nout];
                    epilogue_q(&acc[i * OB..], total, scale, shift, out);
                }
            }
            k.flush::<IMG>(&sc.tile, b, oy, ob, nout, OB, &mut y);
            ob += OB;
        }
    }
}

/// The k-bit epilogue of one output pixel, the same at every level: `out[j] = scale[j]·(2·a[j] −
/// total) + shift[j]` for the `out.len()` outputs (`a[j] = Σ_{w=+1} q`, `total = Σ q`).
#[inline(always)]
fn epilogue_q<A: Lane>(a: &[A], total: i32, scale: &[f32], shift: &[f32], out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let dot = 2 * a[j].wide() - total;
        *o = scale[j] * (dot as f32) + shift[j];
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{Accum, Out, Portable, QScratch, QTask, Scratch, Task, dispatch, dispatch_q};
    use crate::sparse_dw::{DwScratch, DwTask};
    use std::arch::x86_64::*;

    /// AVX2 + FMA accumulation in 256-bit registers (LLVM keeps the portable code's accumulator
    /// arrays in memory). Only constructed after checking the CPU ([`Avx2::detect`]).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        fn detect() -> Option<Avx2> {
            (crate::Isa::Avx2.is_available() && std::arch::is_x86_feature_detected!("fma"))
                .then_some(Avx2(()))
        }
    }

    /// The float kernel at the AVX2 level (portable code without FMA on a CPU without it).
    pub(crate) fn sparse_avx2(t: &Task<'_>, sc: &mut Scratch, y: &mut [Out], y2: &mut [Out]) {
        assert!(
            crate::Isa::Avx2.is_available(),
            "avx2 kernel called on a CPU without it"
        );
        match Avx2::detect() {
            // SAFETY: AVX2 and FMA were checked by `detect`; the function is safe code otherwise.
            Some(k) => unsafe { f32_avx2(k, t, sc, y, y2) },
            // SAFETY: AVX2 was checked above; the function is safe code otherwise.
            None => unsafe { f32_avx2_nofma(t, sc, y, y2) },
        }
    }

    /// The float kernel at the AVX-512 level: 16-lane accumulators, blocks of up to 128 output
    /// channels (each lane is the same sum as at the other levels).
    pub(crate) fn sparse_avx512(t: &Task<'_>, sc: &mut Scratch, y: &mut [Out], y2: &mut [Out]) {
        let k = Avx512::detect().expect("avx512 kernel called on a CPU without avx512f+fma");
        // SAFETY: AVX-512F, AVX2 and FMA were checked by `detect`; safe code otherwise.
        unsafe { f32_avx512(k, t, sc, y, y2) }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn f32_avx512(k: Avx512, t: &Task<'_>, sc: &mut Scratch, y: &mut [Out], y2: &mut [Out]) {
        dispatch(k, t, sc, y, y2)
    }

    /// The sparse-input dW (and dX) at the AVX-512 level.
    pub(crate) fn dw_avx512(t: &DwTask<'_>, sc: &mut DwScratch, dwt: &mut [f32], dx: &mut [f32]) {
        let k = Avx512::detect().expect("avx512 kernel called on a CPU without avx512f+fma");
        // SAFETY: AVX-512F, AVX2 and FMA were checked by `detect`; safe code otherwise.
        unsafe { dw_avx512_body(k, t, sc, dwt, dx) }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    fn dw_avx512_body(
        k: Avx512,
        t: &DwTask<'_>,
        sc: &mut DwScratch,
        dwt: &mut [f32],
        dx: &mut [f32],
    ) {
        crate::sparse_dw::dw_run(k, t, sc, dwt, dx)
    }

    /// AVX-512F accumulation in 512-bit registers for the f32 blocks of 16 lanes or more (the
    /// AVX2 code otherwise). Only constructed after checking the CPU ([`Avx512::detect`]).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(Avx2);

    impl Avx512 {
        fn detect() -> Option<Avx512> {
            let a = Avx2::detect()?;
            (crate::Isa::Avx512.is_available() && std::arch::is_x86_feature_detected!("avx512f"))
                .then_some(Avx512(a))
        }
    }

    impl Accum for Avx512 {
        const F32_LANES: usize = 128;
        const F32_PAIR_LANES: usize = 128;
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn flush<const IMG: usize>(
            self,
            tile: &[f32],
            b: &super::Band,
            oy: usize,
            ob: usize,
            nout: usize,
            rows: usize,
            y: &mut [&mut [Out]; IMG],
        ) {
            if rows.is_multiple_of(16) {
                // SAFETY: an `Avx512` exists only when AVX-512F was detected.
                unsafe { flush_avx512::<IMG>(tile, b, oy, ob, nout, rows, y) }
            } else {
                super::flush::<IMG>(tile, b, oy, ob, nout, rows, y)
            }
        }
        #[inline(always)]
        fn transpose8(self, src: &[f32], ss: usize, dst: &mut [f32], ds: usize) {
            self.0.transpose8(src, ss, dst, ds)
        }
        #[inline(always)]
        fn f32_dot8(
            self,
            w: &[f32],
            g: &[f32],
            rows: &[usize; 8],
            goff: &[usize],
            op: usize,
        ) -> [f32; 8] {
            // SAFETY: an `Avx512` exists only when AVX-512F, AVX2 and FMA were detected.
            unsafe { dot8_avx512(w, g, rows, goff, op) }
        }
        #[inline(always)]
        fn f32_acc<const IMG: usize, const OB: usize>(
            self,
            w: &[f32],
            idx: &[u32],
            val: &[f32],
            acc: &mut [f32],
        ) {
            if OB.is_multiple_of(16) {
                // SAFETY: an `Avx512` exists only when AVX-512F was detected.
                unsafe { f32_acc_avx512::<IMG, OB>(w, idx, val, acc) }
            } else {
                self.0.f32_acc::<IMG, OB>(w, idx, val, acc)
            }
        }
        #[inline(always)]
        fn i16_acc<const IMG: usize, const OB: usize>(
            self,
            m: &[i16],
            idx: &[u32],
            val: &[u8],
            acc: &mut [i16],
        ) {
            if OB.is_multiple_of(32) {
                // SAFETY: an `Avx512` exists only when AVX-512F and BW were detected.
                unsafe { i16_acc_avx512::<IMG, OB>(m, idx, val, acc) }
            } else {
                self.0.i16_acc::<IMG, OB>(m, idx, val, acc)
            }
        }
        #[inline(always)]
        fn i32_acc<const IMG: usize, const OB: usize>(
            self,
            m: &[i32],
            idx: &[u32],
            val: &[u8],
            acc: &mut [i32],
        ) {
            self.0.i32_acc::<IMG, OB>(m, idx, val, acc)
        }
    }

    /// The k-bit kernel at the AVX2 level.
    pub(crate) fn sparse_q_avx2(t: &QTask<'_>, sc: &mut QScratch, y: &mut [Out], y2: &mut [Out]) {
        match Avx2::detect() {
            // SAFETY: AVX2 and FMA were checked by `detect`; the function is safe code otherwise.
            Some(k) => unsafe { q_avx2(k, t, sc, y, y2) },
            None => {
                assert!(
                    crate::Isa::Avx2.is_available(),
                    "avx2 kernel called on a CPU without it"
                );
                // SAFETY: AVX2 was checked just above; the function is safe code otherwise.
                unsafe { q_avx2_portable(t, sc, y, y2) }
            }
        }
    }

    /// The k-bit kernel at the AVX-512 level (16-bit sums in 32-lane registers; exact integers,
    /// so the same results as every level).
    pub(crate) fn sparse_q_avx512(t: &QTask<'_>, sc: &mut QScratch, y: &mut [Out], y2: &mut [Out]) {
        let k = Avx512::detect().expect("avx512 kernel called on a CPU without avx512f+bw+fma");
        // SAFETY: AVX-512F/BW, AVX2 and FMA were checked by `detect`; safe code otherwise.
        unsafe { q_avx512(k, t, sc, y, y2) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    fn q_avx512(k: Avx512, t: &QTask<'_>, sc: &mut QScratch, y: &mut [Out], y2: &mut [Out]) {
        let wt = t.weights;
        use crate::dense_q::{Src, run, takes};
        if takes(t, Src::Levels(t.x)) {
            run(t, Src::Levels(t.x), y);
            if let Some(x2) = t.x2 {
                run(t, Src::Levels(x2), y2);
            }
            return;
        }
        if !(wt.narrow() && wt.bits <= super::MASK_ADD_MAX_BITS) {
            return dispatch_q(k, t, sc, y, y2);
        }
        let wide = wt.out_ch > 64;
        match (t.x2.is_some(), wide) {
            (false, false) => mask_run::<1, 1, 64>(k, t, sc, [y]),
            (false, true) => mask_run::<1, 2, 128>(k, t, sc, [y]),
            (true, false) => mask_run::<2, 1, 64>(k, t, sc, [y, y2]),
            (true, true) => mask_run::<2, 2, 128>(k, t, sc, [y, y2]),
        }
    }

    /// The masked-add kernel for `IMG` images and blocks of `OB = 64·NV` outputs (inlined into
    /// `q_avx512`, so compiled with its features).
    #[inline(always)]
    fn mask_run<const IMG: usize, const NV: usize, const OB: usize>(
        k: Avx512,
        t: &QTask<'_>,
        sc: &mut QScratch,
        y: [&mut [Out]; IMG],
    ) {
        super::run_mask::<_, IMG, OB>(k, t, sc, y, mask_pixel_safe::<IMG, NV, OB>, nonzero_safe)
    }

    /// [`nonzero_avx512`] behind a safe signature (for [`super::NonzeroFn`]).
    fn nonzero_safe(x: &[u8]) -> u64 {
        // SAFETY: only reached from `q_avx512`, which runs after `Avx512::detect` (F and BW).
        unsafe { nonzero_avx512(x) }
    }

    /// The non-zero bytes of `x` (at most 64) as bits: one masked load and one byte test.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn nonzero_avx512(x: &[u8]) -> u64 {
        let n = x.len().min(64);
        let lm = if n == 64 { !0 } else { (1u64 << n) - 1 };
        // SAFETY: the mask covers the first `n ≤ x.len()` bytes only; masked-off bytes are not
        // read (and cannot fault).
        let v = unsafe { _mm512_maskz_loadu_epi8(lm, x.as_ptr().cast()) };
        _mm512_test_epi8_mask(v, v)
    }

    /// [`mask_pixel_avx512`] behind a safe signature (for [`super::MaskPixelFn`]).
    fn mask_pixel_safe<const IMG: usize, const NV: usize, const OB: usize>(
        signs: &[u8],
        span: usize,
        taps: &[[u32; 3]],
        ent: &[u32],
        chunk: usize,
        acc: &mut [i16],
    ) {
        // SAFETY: only reached from `q_avx512`, which runs after `Avx512::detect` (F and BW).
        unsafe { mask_pixel_avx512::<IMG, NV, OB>(signs, span, taps, ent, chunk, acc) }
    }

    /// 64 copies of each level below 64 (the levels of at most [`super::MASK_ADD_MAX_BITS`] bits):
    /// the level's vector is one load, which folds into the masked add (no broadcast shuffle).
    #[repr(align(64))]
    struct Splat([[u8; 64]; 64]);
    static SPLAT: Splat = {
        let mut t = [[0u8; 64]; 64];
        let mut v = 0;
        while v < 64 {
            t[v] = [v as u8; 64];
            v += 1;
        }
        Splat(t)
    };

    /// The sums `Σ_{w=+1} q` of one output pixel over its `taps`, `NV` vectors of 64 outputs per
    /// image (`OB = 64·NV`): per entry, one 8-bit add of the level's vector under the 64-bit sign
    /// mask of each vector, widened into 16-bit sums every `chunk` entries (before a lane can pass
    /// 255); exact integers, so the same as the `and` kernels. `span`: the sign bytes one tap's
    /// entries may read past its offset (`(C − 1)·opad / 8 + 8·NV`).
    #[target_feature(enable = "avx512f,avx512bw")]
    fn mask_pixel_avx512<const IMG: usize, const NV: usize, const OB: usize>(
        signs: &[u8],
        span: usize,
        taps: &[[u32; 3]],
        ent: &[u32],
        chunk: usize,
        acc: &mut [i16],
    ) {
        assert!(NV <= 2 && OB == 64 * NV && acc.len() >= IMG * OB && chunk > 0);
        let z = _mm512_setzero_si512();
        let mut a8 = [[z; 2]; 2];
        let mut a16 = [[z; 4]; 2];
        // a macro, not a closure: the body must be compiled with this function's features
        macro_rules! widen {
            () => {
                for i in 0..IMG {
                    for j in 0..NV {
                        let v = a8[i][j];
                        let lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(v));
                        let hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(v));
                        a16[i][2 * j] = _mm512_add_epi16(a16[i][2 * j], lo);
                        a16[i][2 * j + 1] = _mm512_add_epi16(a16[i][2 * j + 1], hi);
                        a8[i][j] = z;
                    }
                }
            };
        }
        let tab = SPLAT.0.as_ptr().cast::<u8>();
        let mut left = chunk;
        for &[byte, e0, e1] in taps {
            let (mut e, e1, byte) = (e0 as usize, e1 as usize, byte as usize);
            assert!(e <= e1 && e1 * (1 + IMG) <= ent.len());
            assert!(byte + span <= signs.len());
            let row = signs[byte..].as_ptr();
            while e < e1 {
                let end = e + (e1 - e).min(left);
                left -= end - e;
                while e < end {
                    // SAFETY: `(e + 1)·(1 + IMG) ≤ ent.len()` (asserted); the entry's byte
                    // offset is `c·opad / 8` with `c < C` (the lists of `mask_lists`), so the mask
                    // read ends within `span` of `row`, inside `signs` (asserted); levels are
                    // below `2^bits ≤ 64` (checked by the caller), so each splat row exists.
                    unsafe {
                        let en = ent.as_ptr().add(e * (1 + IMG));
                        let ix = *en as usize;
                        let mut mk = [0u64; 2];
                        for j in 0..NV {
                            mk[j] = row.add(ix + 8 * j).cast::<u64>().read_unaligned();
                        }
                        for i in 0..IMG {
                            let v = *en.add(1 + i) as usize;
                            let s = _mm512_load_si512(tab.add(v).cast());
                            for j in 0..NV {
                                a8[i][j] = _mm512_mask_add_epi8(a8[i][j], mk[j], a8[i][j], s);
                            }
                        }
                    }
                    e += 1;
                }
                if left == 0 {
                    widen!();
                    left = chunk;
                }
            }
        }
        widen!();
        for i in 0..IMG {
            for j in 0..2 * NV {
                let p = acc[i * OB + 32 * j..][..32].as_mut_ptr();
                // SAFETY: the slice holds the 32 lanes stored.
                unsafe { _mm512_storeu_si512(p.cast(), a16[i][j]) };
            }
        }
    }

    /// Transposes the 16 x 16 block `r` (row `i` = `r[i]`) in place: 32-bit, then 64-bit
    /// interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles.
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in (0..16).step_by(2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        for i in (0..16).step_by(4) {
            let d = |v: __m512| _mm512_castps_pd(v);
            r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(d(t[i]), d(t[i + 2])));
            r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(d(t[i]), d(t[i + 2])));
            r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(d(t[i + 1]), d(t[i + 3])));
            r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(d(t[i + 1]), d(t[i + 3])));
        }
        for h in [0, 8] {
            for j in 0..4 {
                t[h + j] = _mm512_shuffle_f32x4::<0x88>(r[h + j], r[h + j + 4]);
                t[h + j + 4] = _mm512_shuffle_f32x4::<0xdd>(r[h + j], r[h + j + 4]);
            }
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]);
            r[j + 8] = _mm512_shuffle_f32x4::<0xdd>(t[j], t[j + 8]);
        }
    }

    /// [`super::flush`] by 16 x 16 transposes: 16 pixels x 16 channels of the tile in, 16
    /// channel rows of 16 pixels out (masked at the row's and the block's ends); `rows` is a
    /// multiple of 16. The same values as the scalar copy.
    #[target_feature(enable = "avx512f")]
    fn flush_avx512<const IMG: usize>(
        tile: &[f32],
        b: &super::Band,
        oy: usize,
        ob: usize,
        nout: usize,
        rows: usize,
        y: &mut [&mut [Out]; IMG],
    ) {
        let (ow, plane) = (b.ow, (b.oy1 - b.oy0) * b.ow);
        let at = (oy - b.oy0) * ow;
        assert!(rows.is_multiple_of(16) && nout <= rows && tile.len() >= ow * IMG * rows);
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, yk) in y.iter_mut().enumerate() {
            assert!(nout == 0 || (ob + nout - 1) * plane + at + ow <= yk.len());
            for ox0 in (0..ow).step_by(16) {
                let np = (ow - ox0).min(16);
                let lanes: __mmask16 = if np == 16 { !0 } else { (1 << np) - 1 };
                for j0 in (0..nout).step_by(16) {
                    for (p, v) in r.iter_mut().enumerate().take(np) {
                        let src = &tile[((ox0 + p) * IMG + i) * rows + j0..][..16];
                        // SAFETY: `src` holds 16 values (`j0 + 16 ≤ rows`: both multiples of 16).
                        *v = unsafe { _mm512_loadu_ps(src.as_ptr()) };
                    }
                    transpose16(&mut r);
                    for (c, v) in r.iter().enumerate().take((nout - j0).min(16)) {
                        let at = (ob + j0 + c) * plane + at + ox0;
                        // SAFETY: `at + np ≤ (ob + nout − 1)·plane + at_row + ow ≤ yk.len()`
                        // (asserted above); only the `np` masked lanes are written.
                        unsafe { _mm512_mask_storeu_ps(yk.as_mut_ptr().add(at).cast(), lanes, *v) };
                    }
                }
            }
        }
    }

    /// The quantiser at the AVX2 and AVX-512 levels (rounding inline, not a `roundf` call).
    pub(crate) fn quantise_avx2(x: &[f32], step: f32, bits: u32, q: &mut [u8]) {
        assert!(
            crate::Isa::Avx2.is_available(),
            "avx2 kernel called on a CPU without it"
        );
        // SAFETY: AVX2 was checked just above; the function is safe code otherwise.
        unsafe { quantise_avx2_body(x, step, bits, q) }
    }

    #[target_feature(enable = "avx2")]
    fn quantise_avx2_body(x: &[f32], step: f32, bits: u32, q: &mut [u8]) {
        super::quantise_body(x, step, bits, q)
    }

    /// The quantiser at the AVX-512 level (16 lanes; the same IEEE operations, so the same
    /// levels).
    pub(crate) fn quantise_avx512(x: &[f32], step: f32, bits: u32, q: &mut [u8]) {
        Avx512::detect().expect("avx512 kernel called on a CPU without avx512f+bw+fma");
        // SAFETY: AVX-512F/BW were checked by `detect`; the function is safe code otherwise.
        unsafe { quantise_avx512_body(x, step, bits, q) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    fn quantise_avx512_body(x: &[f32], step: f32, bits: u32, q: &mut [u8]) {
        super::quantise_body(x, step, bits, q)
    }

    /// The sparse-input dW at the AVX2 and AVX-512 levels (the portable fused code on a CPU without
    /// FMA: the same sums).
    pub(crate) fn dw_avx2(t: &DwTask<'_>, sc: &mut DwScratch, dwt: &mut [f32], dx: &mut [f32]) {
        match Avx2::detect() {
            // SAFETY: AVX2 and FMA were checked by `detect`; the function is safe code otherwise.
            Some(k) => unsafe { dw_avx2_fma(k, t, sc, dwt, dx) },
            None => crate::sparse_dw::dw_generic(t, sc, dwt, dx),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn dw_avx2_fma(k: Avx2, t: &DwTask<'_>, sc: &mut DwScratch, dwt: &mut [f32], dx: &mut [f32]) {
        crate::sparse_dw::dw_run(k, t, sc, dwt, dx)
    }

    /// The lane tree of [`crate::sparse_dw::lane_sum`] over eight 8-lane accumulators at once:
    /// lane `j` of the result is the sum of `a[j]`.
    #[target_feature(enable = "avx2")]
    fn lane_sums8(a: &[__m256; 8]) -> [f32; 8] {
        // hadd(x, y) = [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7]
        let b = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let c = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        // lane j of lo: ((l0+l1)+(l2+l3)) of accumulator j; of hi: ((l4+l5)+(l6+l7))
        let lo = _mm256_permute2f128_ps::<0x20>(b, c);
        let hi = _mm256_permute2f128_ps::<0x31>(b, c);
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi)) };
        out
    }

    /// Checks of the dot8 arguments the unchecked loads rely on.
    fn dot8_check(w: &[f32], g: &[f32], rows: &[usize; 8], goff: &[usize], op: usize) {
        assert!(
            op.is_multiple_of(16) && w.len() >= goff.len() * op,
            "dot8 weights"
        );
        let reach = goff.iter().max().copied().unwrap_or(0) + op;
        assert!(
            rows.iter().all(|&r| r + reach <= g.len()),
            "dot8 rows inside G"
        );
    }

    /// [`crate::sparse_dw::dot8_portable`] in registers: four entries at a time, each with two
    /// 8-lane accumulators (the halves of its 16-lane one), the weight vectors loaded once per
    /// four `fma`s.
    #[target_feature(enable = "avx2,fma")]
    fn dot8_avx2(w: &[f32], g: &[f32], rows: &[usize; 8], goff: &[usize], op: usize) -> [f32; 8] {
        dot8_check(w, g, rows, goff, op);
        let mut halves = [_mm256_setzero_ps(); 8];
        for q in 0..2 {
            let mut a = [[_mm256_setzero_ps(); 2]; 4];
            let p: [*const f32; 4] =
                std::array::from_fn(|j| g.as_ptr().wrapping_add(rows[4 * q + j]));
            for (tap, &off) in goff.iter().enumerate() {
                let wr = w.as_ptr().wrapping_add(tap * op);
                for ob in (0..op).step_by(16) {
                    // SAFETY: tap·op + ob + 16 ≤ taps·op ≤ w.len(); rows[j] + off + ob + 16 ≤
                    // rows[j] + reach ≤ g.len() (both checked by `dot8_check`).
                    unsafe {
                        let w0 = _mm256_loadu_ps(wr.add(ob));
                        let w1 = _mm256_loadu_ps(wr.add(ob + 8));
                        for j in 0..4 {
                            let r = p[j].add(off + ob);
                            a[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(r), a[j][0]);
                            a[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(r.add(8)), a[j][1]);
                        }
                    }
                }
            }
            for j in 0..4 {
                halves[4 * q + j] = _mm256_add_ps(a[j][0], a[j][1]);
            }
        }
        lane_sums8(&halves)
    }

    /// [`crate::sparse_dw::dot8_portable`] with one 16-lane register per entry.
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn dot8_avx512(w: &[f32], g: &[f32], rows: &[usize; 8], goff: &[usize], op: usize) -> [f32; 8] {
        dot8_check(w, g, rows, goff, op);
        let mut a = [_mm512_setzero_ps(); 8];
        let p: [*const f32; 8] = rows.map(|r| g.as_ptr().wrapping_add(r));
        for (tap, &off) in goff.iter().enumerate() {
            let wr = w.as_ptr().wrapping_add(tap * op);
            for ob in (0..op).step_by(16) {
                // SAFETY: as in `dot8_avx2`.
                unsafe {
                    let wv = _mm512_loadu_ps(wr.add(ob));
                    for j in 0..8 {
                        a[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p[j].add(off + ob)), a[j]);
                    }
                }
            }
        }
        let mut halves = [_mm256_setzero_ps(); 8];
        for j in 0..8 {
            let lo = _mm512_castps512_ps256(a[j]);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a[j])));
            halves[j] = _mm256_add_ps(lo, hi);
        }
        lane_sums8(&halves)
    }

    #[target_feature(enable = "avx2,fma")]
    fn f32_avx2(k: Avx2, t: &Task<'_>, sc: &mut Scratch, y: &mut [Out], y2: &mut [Out]) {
        dispatch(k, t, sc, y, y2)
    }

    #[target_feature(enable = "avx2")]
    fn f32_avx2_nofma(t: &Task<'_>, sc: &mut Scratch, y: &mut [Out], y2: &mut [Out]) {
        dispatch(Portable::<false>, t, sc, y, y2)
    }

    #[target_feature(enable = "avx2,fma")]
    fn q_avx2(k: Avx2, t: &QTask<'_>, sc: &mut QScratch, y: &mut [Out], y2: &mut [Out]) {
        dispatch_q(k, t, sc, y, y2)
    }

    #[target_feature(enable = "avx2")]
    fn q_avx2_portable(t: &QTask<'_>, sc: &mut QScratch, y: &mut [Out], y2: &mut [Out]) {
        dispatch_q(Portable::<false>, t, sc, y, y2)
    }

    /// Accumulators: at most 8 vectors per image.
    const MAXV: usize = 8;

    /// One accumulation kernel of [`Accum`] in registers: `acc[i][lanes] (+)= val[e][i] (*) row(e)`
    /// for the rows `w[idx[e]..][..OB]` of the entries in order, with at most [`MAXV`] vectors of
    /// `$lanes` per image. `step(a, v, r)` is the lane operation (`fma` for floats, `a + (v & r)`
    /// for integer levels against masks).
    macro_rules! acc_kernel {
        ($(#[$doc:meta])* $name:ident, $feat:literal, $t:ty, $v:ty, $lanes:expr, $zero:expr,
         load |$lp:ident| $load:expr, store |$sp:ident, $sv:ident| $store:expr,
         set1 |$x:ident| $set1:expr, step |$a:ident, $b:ident, $r:ident| $step:expr) => {
            $(#[$doc])*
            #[target_feature(enable = $feat)]
            fn $name<const IMG: usize, const OB: usize>(
                w: &[$t],
                idx: &[u32],
                val: &[$v],
                acc: &mut [$t],
            ) {
                let nv = OB / $lanes;
                assert!(nv * $lanes == OB && nv <= MAXV, "block of {OB} lanes");
                assert!(acc.len() >= IMG * OB && val.len() >= IMG * idx.len());
                let mut a = [[$zero; MAXV]; 2];
                for i in 0..IMG {
                    for j in 0..nv {
                        let $lp = acc.as_ptr().wrapping_add(i * OB + j * $lanes);
                        // SAFETY: `acc` holds IMG·OB values (asserted); vector (i, j) is in it.
                        a[i][j] = unsafe { $load };
                    }
                }
                for (e, &ix) in idx.iter().enumerate() {
                    let row = &w[ix as usize..ix as usize + OB];
                    for i in 0..IMG {
                        let $x = val[e * IMG + i];
                        let v = $set1;
                        for j in 0..nv {
                            let $lp = row.as_ptr().wrapping_add(j * $lanes);
                            // SAFETY: `row` holds OB = nv·lanes values; vector j is in it.
                            let r = unsafe { $load };
                            let ($a, $b, $r) = (a[i][j], v, r);
                            a[i][j] = $step;
                        }
                    }
                }
                for i in 0..IMG {
                    for j in 0..nv {
                        let ($sp, $sv) = (acc.as_mut_ptr().wrapping_add(i * OB + j * $lanes), a[i][j]);
                        // SAFETY: as for the loads above.
                        unsafe { $store };
                    }
                }
            }
        };
    }
    acc_kernel!(
        i16_acc_avx2,
        "avx2",
        i16,
        u8,
        16,
        _mm256_setzero_si256(),
        load | p | _mm256_loadu_si256(p.cast()),
        store | p,
        v | _mm256_storeu_si256(p.cast(), v),
        set1 | x | _mm256_set1_epi16(x as i16),
        step | a,
        v,
        r | _mm256_add_epi16(a, _mm256_and_si256(v, r))
    );
    acc_kernel!(
        i32_acc_avx2,
        "avx2",
        i32,
        u8,
        8,
        _mm256_setzero_si256(),
        load | p | _mm256_loadu_si256(p.cast()),
        store | p,
        v | _mm256_storeu_si256(p.cast(), v),
        set1 | x | _mm256_set1_epi32(x as i32),
        step | a,
        v,
        r | _mm256_add_epi32(a, _mm256_and_si256(v, r))
    );
    acc_kernel!(
        f32_acc_avx2,
        "avx2,fma",
        f32,
        f32,
        8,
        _mm256_setzero_ps(),
        load | p | _mm256_loadu_ps(p),
        store | p,
        v | _mm256_storeu_ps(p, v),
        set1 | x | _mm256_set1_ps(x),
        step | a,
        v,
        r | _mm256_fmadd_ps(v, r, a)
    );
    acc_kernel!(
        /// `i16_acc_avx2` with 32-lane registers (at most 256 lanes per image).
        i16_acc_avx512, "avx512f,avx512bw", i16, u8, 32, _mm512_setzero_si512(),
        load |p| _mm512_loadu_si512(p.cast()), store |p, v| _mm512_storeu_si512(p.cast(), v),
        set1 |x| _mm512_set1_epi16(x as i16),
        step |a, v, r| _mm512_add_epi16(a, _mm512_and_si512(v, r)));
    acc_kernel!(
        /// `f32_acc_avx2` with 16-lane registers (at most 128 lanes per image).
        f32_acc_avx512, "avx512f", f32, f32, 16, _mm512_setzero_ps(),
        load |p| _mm512_loadu_ps(p), store |p, v| _mm512_storeu_ps(p, v),
        set1 |x| _mm512_set1_ps(x), step |a, v, r| _mm512_fmadd_ps(v, r, a));

    #[target_feature(enable = "avx2")]
    fn transpose8_avx2(src: &[f32], ss: usize, dst: &mut [f32], ds: usize) {
        assert!(
            src.len() >= 7 * ss + 8 && dst.len() >= 7 * ds + 8,
            "8 x 8 block"
        );
        // (a loop, not `array::from_fn`: a closure would not inherit the target features)
        let mut r = [_mm256_setzero_ps(); 8];
        for (i, ri) in r.iter_mut().enumerate() {
            // SAFETY: rows i < 8 of `src` start at i·ss and hold 8 floats (asserted).
            *ri = unsafe { _mm256_loadu_ps(src.as_ptr().add(i * ss)) };
        }
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        let o = [
            _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
            _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
            _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
            _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
            _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
        ];
        for (j, v) in o.into_iter().enumerate() {
            // SAFETY: rows j < 8 of `dst` start at j·ds and hold 8 floats (asserted).
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(j * ds), v) };
        }
    }

    impl Accum for Avx2 {
        #[inline(always)]
        fn transpose8(self, src: &[f32], ss: usize, dst: &mut [f32], ds: usize) {
            // SAFETY: an `Avx2` exists only when AVX2 was detected.
            unsafe { transpose8_avx2(src, ss, dst, ds) }
        }
        #[inline(always)]
        fn f32_dot8(
            self,
            w: &[f32],
            g: &[f32],
            rows: &[usize; 8],
            goff: &[usize],
            op: usize,
        ) -> [f32; 8] {
            // SAFETY: an `Avx2` exists only when AVX2 and FMA were detected.
            unsafe { dot8_avx2(w, g, rows, goff, op) }
        }
        #[inline(always)]
        fn f32_acc<const IMG: usize, const OB: usize>(
            self,
            w: &[f32],
            idx: &[u32],
            val: &[f32],
            acc: &mut [f32],
        ) {
            // SAFETY: an `Avx2` exists only when AVX2 and FMA were detected.
            unsafe { f32_acc_avx2::<IMG, OB>(w, idx, val, acc) }
        }
        #[inline(always)]
        fn i16_acc<const IMG: usize, const OB: usize>(
            self,
            m: &[i16],
            idx: &[u32],
            val: &[u8],
            acc: &mut [i16],
        ) {
            // SAFETY: an `Avx2` exists only when AVX2 was detected.
            unsafe { i16_acc_avx2::<IMG, OB>(m, idx, val, acc) }
        }
        #[inline(always)]
        fn i32_acc<const IMG: usize, const OB: usize>(
            self,
            m: &[i32],
            idx: &[u32],
            val: &[u8],
            acc: &mut [i32],
        ) {
            // SAFETY: an `Avx2` exists only when AVX2 was detected.
            unsafe { i32_acc_avx2::<IMG, OB>(m, idx, val, acc) }
        }
    }
}
