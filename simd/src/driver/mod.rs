//! ISA-independent loops: splitting output rows into tasks (rayon), im2col over packed bits, turning raw
//! popcounts into dot products, and the fused epilogue. The ISA enters only through [`Kernels`].

use crate::{Binarize, Epilogue, SpikeOut};
use rayon::prelude::*;

/// Raw popcount GEMM kernel: `(xor, a, m, b, n, kw, out)`, see [`crate::reference::popc`].
pub(crate) type PopcFn = fn(bool, &[u64], usize, &[u64], usize, usize, &mut [u32]);

/// Popcount GEMM against a B transposed into panels of 8 columns: `(xor, a, m, bt, n, kw, klen, out)`.
pub(crate) type VerticalFn = fn(bool, &[u64], usize, &[u64], usize, usize, usize, &mut [u32]);

/// Rows of at most this many words use the vertical kernel when the ISA has one (its B panel block
/// of 4 panels stays within L1).
pub(crate) const VERTICAL_MAX_K: usize = 128;

/// Transposes the first `klen` words of the `n` rows of `b` (row length `kw`) into panels of 8
/// columns: `bt[((j/8)·klen + k)·8 + j%8] = b[j·kw + k]`, missing columns zero.
pub(crate) fn transpose_panels(b: &[u64], n: usize, kw: usize, klen: usize) -> Vec<u64> {
    let mut bt = vec![0u64; n.div_ceil(8) * klen * 8];
    for j in 0..n {
        for (k, &v) in b[j * kw..j * kw + klen].iter().enumerate() {
            bt[((j / 8) * klen + k) * 8 + j % 8] = v;
        }
    }
    bt
}

/// B prepared once per call for the per-task kernels.
pub(crate) enum PreparedB<'a> {
    Rows(&'a [u64]),
    Panels(VerticalFn, Vec<u64>),
}

impl Kernels {
    pub(crate) fn prepare<'a>(
        &self,
        b: &'a [u64],
        n: usize,
        kw: usize,
        klen: usize,
    ) -> PreparedB<'a> {
        match self.vertical {
            Some(f) if klen <= VERTICAL_MAX_K => {
                PreparedB::Panels(f, transpose_panels(b, n, kw, klen))
            }
            _ => PreparedB::Rows(b),
        }
    }

    /// Raw popcounts of `a` (m rows of `kw` words, first `klen` meaningful) against prepared B.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn popc_prepared(
        &self,
        xor: bool,
        a: &[u64],
        m: usize,
        b: &PreparedB<'_>,
        n: usize,
        kw: usize,
        klen: usize,
        out: &mut [u32],
    ) {
        match b {
            PreparedB::Rows(b) => (self.popc)(xor, a, m, b, n, kw, out),
            PreparedB::Panels(f, bt) => f(xor, a, m, bt, n, kw, klen, out),
        }
    }
}

/// The per-ISA kernels (same contract as the functions of [`crate::reference`]).
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    pub popc: PopcFn,
    pub vertical: Option<VerticalFn>,
    pub pack_row: fn(&[f32], Binarize, &mut [u64]),
    pub masked_gemv: fn(&[f32], &[u64], usize, usize, &mut [f32]),
    pub pack_u8_planes: fn(&[u8], u32, usize, &mut [u64]),
    pub sparse_conv: crate::sparse::SparseFn,
    pub sparse_conv_q: crate::sparse::SparseQFn,
    pub quantise: crate::sparse::QuantiseFn,
    pub sparse_dw: crate::sparse_dw::DwFn,
    pub pool2: crate::pool::Pool2Fn,
}

/// How the rows of the left operand of a popcount GEMM are produced for a range of output rows.
pub(crate) trait RowSource: Sync {
    /// Output rows (M).
    fn rows(&self) -> usize;
    /// Bit planes per output row (1 for binary operands).
    fn planes(&self) -> usize;
    /// Words per packed row (multiple of 4).
    fn kwords(&self) -> usize;
    /// Leading words of each row that may be non-zero (the rest are zero padding).
    fn klen(&self) -> usize;
    /// Writes rows `m0..m1` (each `planes` rows of `kwords` words, plane-minor) into `buf` and, per
    /// output row, the padding information into `pad`; returns the rows (may borrow `self` instead).
    fn fill<'a>(
        &'a self,
        m0: usize,
        m1: usize,
        buf: &'a mut Vec<u64>,
        pad: &mut Vec<PadInfo>,
    ) -> &'a [u64];
}

/// Padding of one output row of a convolution: number of taps inside the image and a bit mask of the
/// taps that fell into the zero padding (used by the XOR correction).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PadInfo {
    pub valid_taps: u32,
    pub pad_mask: u64,
}

/// How raw popcounts become dot products.
pub(crate) enum Finish<'a> {
    /// `dot = Σ_b 2^b (2·popc(a_b ∧ w) − popc(a_b))` (AND, bit-serial over planes).
    And,
    /// `dot = K − 2·popc(a ⊕ w)` for a GEMM with `k` valid bits per row.
    XorGemm { k: i32 },
    /// XOR convolution with exact zero padding: `dot = valid_taps·c − 2·(popc − Σ_{padded taps t}
    /// popc(w_t))`, `tap_pop[j*taps + t] = popc(w_{j,t})`.
    XorConv {
        c: i32,
        taps: usize,
        tap_pop: &'a [u32],
    },
}

/// Output rows per task: enough tasks for load balance, few enough rows to keep the im2col buffer
/// and the raw tile cache-friendly.
fn rows_per_task(m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    m.div_ceil(threads * 4).clamp(4, 32).div_ceil(4) * 4
}

/// Runs the popcount GEMM of `src` (M rows) against `w` (`n` rows of `src.kwords()` words), and hands
/// every task its dot products (rows `m0..m1`, row-major `n` columns) plus the matching chunks of
/// `out` and `state` (`n` elements per row each; `state` may be empty).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<S: RowSource, O: Send>(
    k: Kernels,
    xor: bool,
    src: &S,
    w: &[u64],
    n: usize,
    finish: &Finish<'_>,
    out: &mut [O],
    state: &mut [f32],
    sink: impl Fn(&[i32], &mut [O], &mut [f32]) + Sync,
) {
    let m = src.rows();
    let p = src.planes();
    let kw = src.kwords();
    assert!(out.len() == m * n && (state.is_empty() || state.len() == m * n) && w.len() >= n * kw);
    if m == 0 || n == 0 {
        return;
    }
    let klen = src.klen();
    let bp = k.prepare(w, n, kw, klen);
    let rpt = rows_per_task(m);
    let task = |(t, (o, s)): (usize, (&mut [O], &mut [f32]))| {
        let m0 = t * rpt;
        let m1 = (m0 + rpt).min(m);
        let rows = m1 - m0;
        let mut buf = Vec::new();
        let mut pad = Vec::new();
        let a = src.fill(m0, m1, &mut buf, &mut pad);
        let mut raw = vec![0u32; rows * p * n];
        k.popc_prepared(xor, a, rows * p, &bp, n, kw, klen, &mut raw);
        let mut dots = vec![0i32; rows * n];
        for i in 0..rows {
            let d = &mut dots[i * n..(i + 1) * n];
            match finish {
                Finish::And => {
                    for b in 0..p {
                        let r = i * p + b;
                        let pa: u32 = a[r * kw..(r + 1) * kw].iter().map(|x| x.count_ones()).sum();
                        let rr = &raw[r * n..(r + 1) * n];
                        for (dj, &c) in d.iter_mut().zip(rr) {
                            *dj += (2 * c as i32 - pa as i32) << b;
                        }
                    }
                }
                Finish::XorGemm { k } => {
                    for (dj, &c) in d.iter_mut().zip(&raw[i * n..(i + 1) * n]) {
                        *dj = k - 2 * c as i32;
                    }
                }
                Finish::XorConv { c, taps, tap_pop } => {
                    let pi = pad[i];
                    let nvalid = pi.valid_taps as i32 * c;
                    for (j, (dj, &cnt)) in d.iter_mut().zip(&raw[i * n..(i + 1) * n]).enumerate() {
                        let mut corr = 0u32;
                        let mut mask = pi.pad_mask;
                        while mask != 0 {
                            let t = mask.trailing_zeros() as usize;
                            corr += tap_pop[j * taps + t];
                            mask &= mask - 1;
                        }
                        *dj = nvalid - 2 * (cnt - corr) as i32;
                    }
                }
            }
        }
        sink(&dots, o, s);
    };
    if state.is_empty() {
        let mut empty: Vec<&mut [f32]> = (0..m.div_ceil(rpt))
            .map(|_| <&mut [f32]>::default())
            .collect();
        out.par_chunks_mut(rpt * n)
            .zip(empty.par_iter_mut())
            .enumerate()
            .for_each(|(t, (o, s))| task((t, (o, std::mem::take(s)))));
    } else {
        out.par_chunks_mut(rpt * n)
            .zip(state.par_chunks_mut(rpt * n))
            .enumerate()
            .for_each(task);
    }
}

/// Rows of an already packed matrix.
pub(crate) struct MatrixRows<'a> {
    pub data: &'a [u64],
    pub rows: usize,
    pub planes: usize,
    pub kwords: usize,
    pub klen: usize,
}

impl RowSource for MatrixRows<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn planes(&self) -> usize {
        self.planes
    }
    fn kwords(&self) -> usize {
        self.kwords
    }
    fn klen(&self) -> usize {
        self.klen
    }
    fn fill<'a>(
        &'a self,
        m0: usize,
        m1: usize,
        _buf: &'a mut Vec<u64>,
        _pad: &mut Vec<PadInfo>,
    ) -> &'a [u64] {
        let r = self.planes * self.kwords;
        &self.data[m0 * r..m1 * r]
    }
}

/// im2col over a packed NHWC image: output row `(img, oy, ox)`, plane `b`, is the concatenation over
/// taps `(ky, kx)` of the `cw` words of pixel `(oy·s + ky − pad, ox·s + kx − pad)` plane `b` (zero
/// words outside the image), zero-padded to `kwords`.
pub(crate) struct ConvRows<'a> {
    pub img: &'a crate::PackedImage,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
    pub kwords: usize,
}

impl RowSource for ConvRows<'_> {
    fn rows(&self) -> usize {
        self.img.n * self.oh * self.ow
    }
    fn planes(&self) -> usize {
        self.img.planes
    }
    fn kwords(&self) -> usize {
        self.kwords
    }
    fn klen(&self) -> usize {
        self.kh * self.kw * self.img.cw
    }
    fn fill<'a>(
        &'a self,
        m0: usize,
        m1: usize,
        buf: &'a mut Vec<u64>,
        pad: &mut Vec<PadInfo>,
    ) -> &'a [u64] {
        let img = self.img;
        let (p, cw, kwd) = (img.planes, img.cw, self.kwords);
        buf.clear();
        buf.resize((m1 - m0) * p * kwd, 0);
        pad.clear();
        for (i, m) in (m0..m1).enumerate() {
            let ni = m / (self.oh * self.ow);
            let oy = m / self.ow % self.oh;
            let ox = m % self.ow;
            let mut info = PadInfo::default();
            for ky in 0..self.kh {
                let iy = (oy * self.stride + ky).wrapping_sub(self.pad);
                // Taps kx0..kx1 of this kernel row fall inside the image.
                let ix0 = (ox * self.stride).wrapping_sub(self.pad);
                let (kx0, kx1) = if iy >= img.h {
                    (0, 0)
                } else {
                    let kx0 = self.pad.saturating_sub(ox * self.stride).min(self.kw);
                    let kx1 = (img.w + self.pad)
                        .saturating_sub(ox * self.stride)
                        .min(self.kw)
                        .max(kx0);
                    (kx0, kx1)
                };
                for kx in (0..kx0).chain(kx1..self.kw) {
                    info.pad_mask |= 1 << (ky * self.kw + kx);
                }
                if kx1 == kx0 {
                    continue;
                }
                info.valid_taps += (kx1 - kx0) as u32;
                let t0 = ky * self.kw + kx0;
                let pix0 = (ni * img.h + iy) * img.w + ix0.wrapping_add(kx0);
                if p == 1 {
                    // Consecutive taps read consecutive pixels: one contiguous block.
                    let len = (kx1 - kx0) * cw;
                    let dst = i * kwd + t0 * cw;
                    buf[dst..dst + len].copy_from_slice(&img.data[pix0 * cw..pix0 * cw + len]);
                } else {
                    for kx in 0..kx1 - kx0 {
                        let pix = (pix0 + kx) * p * cw;
                        for b in 0..p {
                            let dst = (i * p + b) * kwd + (t0 + kx) * cw;
                            buf[dst..dst + cw]
                                .copy_from_slice(&img.data[pix + b * cw..pix + (b + 1) * cw]);
                        }
                    }
                }
            }
            pad.push(info);
        }
        buf
    }
}

/// Applies the epilogue to `rows × n` accumulators (channel = column index).
pub(crate) fn epilogue_rows<A: Copy + Into<f64>>(
    acc: &[A],
    n: usize,
    ep: &Epilogue<'_>,
    out: &mut SpikeOut<'_>,
    v: &mut [f32],
) {
    for (e, &a) in acc.iter().enumerate() {
        let c = e % n;
        let y = ep.scale[c] * (a.into() as f32) + ep.bias[c];
        let s = match ep.neuron {
            Some(nr) => {
                let m = nr.lambda * v[e] + y;
                let s = (m - nr.theta).max(0.0);
                v[e] = m - s;
                s
            }
            None => y,
        };
        match out {
            SpikeOut::F32(o) => o[e] = s,
            SpikeOut::Quant { out, step, bits } => {
                let max = ((1u32 << *bits) - 1) as f32;
                out[e] = (s / *step).round().clamp(0.0, max) as u8;
            }
        }
    }
}
