//! AVX-512F/BW + VPOPCNTDQ kernels: one `vpopcntq` per 512 bits, 4x4 register tile of `u64x8`
//! accumulators, B rows blocked to stay L1-resident.

#![allow(clippy::needless_range_loop)] // register tiles read clearest as indexed loops

use crate::Binarize;
use std::arch::x86_64::*;

const MR: usize = 4;
const NR: usize = 4;

fn check() {
    assert!(
        crate::Isa::Avx512.is_available(),
        "avx512 kernel called on a CPU without it"
    );
}

/// See [`crate::reference::popc`]; `kw` must be a multiple of 4. The "horizontal" kernel: 8 words of
/// one row per vector, one shuffle-tree reduction per 8 outputs (used for long rows).
pub(crate) fn popc(
    xor: bool,
    a: &[u64],
    m: usize,
    b: &[u64],
    n: usize,
    kw: usize,
    out: &mut [u32],
) {
    check();
    assert!(kw.is_multiple_of(4) && a.len() >= m * kw && b.len() >= n * kw && out.len() >= m * n);
    // SAFETY: the CPU features were checked above; every pointer access of `popc_impl` stays in
    // `a[..m*kw]`, `b[..n*kw]`, `out[..m*n]`, whose lengths were asserted above.
    unsafe {
        if xor {
            popc_impl::<true>(a.as_ptr(), m, b.as_ptr(), n, kw, out.as_mut_ptr());
        } else {
            popc_impl::<false>(a.as_ptr(), m, b.as_ptr(), n, kw, out.as_mut_ptr());
        }
    }
}

/// The "vertical" kernel: `bt` is B transposed into panels of 8 columns
/// ([`crate::driver::transpose_panels`]); one broadcast A word meets 8 columns per instruction, the
/// accumulator lanes are output columns (no horizontal reduction) and only the first `klen` words of
/// each A row are read (word-granular K). Same result as [`popc`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn vertical_popc(
    xor: bool,
    a: &[u64],
    m: usize,
    bt: &[u64],
    n: usize,
    kw: usize,
    klen: usize,
    out: &mut [u32],
) {
    check();
    assert!(
        klen <= kw
            && a.len() >= m * kw
            && bt.len() >= n.div_ceil(8) * klen * 8
            && out.len() >= m * n
    );
    // SAFETY: the CPU features were checked above; `vertical` reads `a[..m*kw]` (first `klen`
    // words of each row), `bt` (n/8 rounded up panels of klen×8 words) and writes `out[..m*n]`
    // (columns < n only).
    unsafe {
        if xor {
            vertical::<true>(a.as_ptr(), m, bt, n, kw, klen, out.as_mut_ptr());
        } else {
            vertical::<false>(a.as_ptr(), m, bt, n, kw, klen, out.as_mut_ptr());
        }
    }
}

/// Panels (of 8 output columns) per vertical tile.
const VP: usize = 4;

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vpopcntdq")]
unsafe fn vertical<const XOR: bool>(
    a: *const u64,
    m: usize,
    bt: &[u64],
    n: usize,
    kw: usize,
    klen: usize,
    out: *mut u32,
) {
    let np = n.div_ceil(8);
    let bp = bt.as_ptr();
    let mut p0 = 0;
    while p0 < np {
        let pw = (np - p0).min(VP);
        let mut i = 0;
        while i < m {
            let four = i + MR <= m;
            // SAFETY (all calls below): rows i..i+4 (or i) < m of A and of the output, panels
            // p0..p0+pw <= np of bt.
            unsafe {
                let (ap, op) = (a.add(i * kw), out.add(i * n));
                match (four, pw == VP) {
                    (true, true) => {
                        vtile::<XOR, MR, VP>(ap, bp.add(p0 * klen * 8), kw, klen, op, n, p0)
                    }
                    (false, true) => {
                        vtile::<XOR, 1, VP>(ap, bp.add(p0 * klen * 8), kw, klen, op, n, p0)
                    }
                    (true, false) => {
                        for p in p0..p0 + pw {
                            vtile::<XOR, MR, 1>(ap, bp.add(p * klen * 8), kw, klen, op, n, p);
                        }
                    }
                    (false, false) => {
                        for p in p0..p0 + pw {
                            vtile::<XOR, 1, 1>(ap, bp.add(p * klen * 8), kw, klen, op, n, p);
                        }
                    }
                }
            }
            i += if four { MR } else { 1 };
        }
        p0 += pw;
    }
}

/// `R` rows of A against `P` panels (8 columns each) starting at panel index `pidx`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vpopcntdq")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn vtile<const XOR: bool, const R: usize, const P: usize>(
    a: *const u64,
    bt: *const u64,
    kw: usize,
    klen: usize,
    out: *mut u32,
    ldo: usize,
    pidx: usize,
) {
    let mut acc = [[_mm512_setzero_si512(); P]; R];
    for k in 0..klen {
        let mut bv = [_mm512_setzero_si512(); P];
        for (p, v) in bv.iter_mut().enumerate() {
            // SAFETY: panel p has klen×8 words and k < klen.
            *v = unsafe { _mm512_loadu_si512(bt.add((p * klen + k) * 8).cast()) };
        }
        for r in 0..R {
            // SAFETY: row r of A has kw >= klen words.
            let av = _mm512_set1_epi64(unsafe { *a.add(r * kw + k) } as i64);
            for p in 0..P {
                let x = if XOR {
                    _mm512_xor_si512(av, bv[p])
                } else {
                    _mm512_and_si512(av, bv[p])
                };
                acc[r][p] = _mm512_add_epi64(acc[r][p], _mm512_popcnt_epi64(x));
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (p, v) in row.iter().enumerate() {
            let col = (pidx + p) * 8;
            let valid = (ldo - col).min(8);
            let mask: __mmask8 = if valid == 8 { 0xff } else { (1u8 << valid) - 1 };
            // SAFETY: only the `valid` columns col..col+valid < ldo of output row r are written.
            unsafe {
                _mm256_mask_storeu_epi32(
                    out.add(r * ldo + col).cast(),
                    mask,
                    _mm512_cvtepi64_epi32(*v),
                )
            };
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq")]
unsafe fn popc_impl<const XOR: bool>(
    a: *const u64,
    m: usize,
    b: *const u64,
    n: usize,
    kw: usize,
    out: *mut u32,
) {
    // Block the B rows so a block (about 16 KiB) stays in L1 while all A rows stream past it.
    let nb = ((16384 / (kw * 8)).max(NR) / NR) * NR;
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + nb).min(n);
        let mut i = 0;
        while i + MR <= m {
            // SAFETY: rows i..i+MR < m and j0..j1 <= n are in bounds (caller contract).
            unsafe { row_block::<XOR, MR>(a.add(i * kw), b, j0, j1, n, kw, out.add(i * n)) };
            i += MR;
        }
        while i < m {
            // SAFETY: as above, one row.
            unsafe { row_block::<XOR, 1>(a.add(i * kw), b, j0, j1, n, kw, out.add(i * n)) };
            i += 1;
        }
        j0 = j1;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq")]
#[inline]
unsafe fn row_block<const XOR: bool, const R: usize>(
    a: *const u64,
    b: *const u64,
    j0: usize,
    j1: usize,
    ldo: usize,
    kw: usize,
    out: *mut u32,
) {
    let mut j = j0;
    while j + NR <= j1 {
        // SAFETY: B rows j..j+NR < n, output columns j..j+NR < ldo.
        unsafe { tile::<XOR, R, NR>(a, b.add(j * kw), kw, out.add(j), ldo) };
        j += NR;
    }
    while j < j1 {
        // SAFETY: as above, one column.
        unsafe { tile::<XOR, R, 1>(a, b.add(j * kw), kw, out.add(j), ldo) };
        j += 1;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq")]
#[inline]
unsafe fn tile<const XOR: bool, const R: usize, const C: usize>(
    a: *const u64,
    b: *const u64,
    kw: usize,
    out: *mut u32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_si512(); C]; R];
    let mut k = 0;
    while k < kw {
        // Whole 8-word vectors, then (kw being a multiple of 4) possibly one 4-word tail read with a
        // masked load (masked-off lanes are not accessed and read as zero).
        let mask: __mmask8 = if k + 8 <= kw { 0xff } else { 0x0f };
        let mut av = [_mm512_setzero_si512(); R];
        for (r, v) in av.iter_mut().enumerate() {
            // SAFETY: row r of A has kw words; the lanes enabled by `mask` lie in k..kw.
            *v = unsafe { _mm512_maskz_loadu_epi64(mask, a.add(r * kw + k).cast()) };
        }
        for c in 0..C {
            // SAFETY: row c of the B tile has kw words; the lanes enabled by `mask` lie in k..kw.
            let bv = unsafe { _mm512_maskz_loadu_epi64(mask, b.add(c * kw + k).cast()) };
            for r in 0..R {
                let x = if XOR {
                    _mm512_xor_si512(av[r], bv)
                } else {
                    _mm512_and_si512(av[r], bv)
                };
                acc[r][c] = _mm512_add_epi64(acc[r][c], _mm512_popcnt_epi64(x));
            }
        }
        k += 8;
    }
    if R.is_multiple_of(2) && C == 4 {
        // Full tile: reduce eight accumulators at once (rows r, r+1) with a shuffle tree.
        for r in (0..R).step_by(2) {
            let v = [
                acc[r][0],
                acc[r][1],
                acc[r][2],
                acc[r][3],
                acc[r + 1][0],
                acc[r + 1][1],
                acc[r + 1][2],
                acc[r + 1][3],
            ];
            let sums = _mm512_cvtepi64_epi32(hsum8(v));
            // SAFETY: output elements (r, 0..4) and (r+1, 0..4) of the tile are inside `out[..m*n]`.
            unsafe {
                _mm_storeu_si128(out.add(r * ldo).cast(), _mm256_castsi256_si128(sums));
                _mm_storeu_si128(
                    out.add((r + 1) * ldo).cast(),
                    _mm256_extracti128_si256::<1>(sums),
                );
            }
        }
    } else {
        for (r, row) in acc.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                // SAFETY: output element (r, c) of the tile is inside `out[..m*n]`.
                unsafe { *out.add(r * ldo + c) = _mm512_reduce_add_epi64(*v) as u32 };
            }
        }
    }
}

/// Horizontal sums of eight `u64x8` vectors: lane `i` of the result is the sum of the lanes of `v[i]`.
#[target_feature(enable = "avx512f")]
#[inline]
fn hsum8(v: [__m512i; 8]) -> __m512i {
    // Level 1: each 128-bit lane L of p(a, b) holds (a[2L] + a[2L+1], b[2L] + b[2L+1]).
    let p = |a, b| _mm512_add_epi64(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    // Levels 2-3: add 128-bit lanes (L0+L1, L2+L3) of a and b, results [a.01, a.23, b.01, b.23].
    let q = |a, b| {
        _mm512_add_epi64(
            _mm512_shuffle_i64x2::<0b10_00_10_00>(a, b),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(a, b),
        )
    };
    let (s01, s23, s45, s67) = (p(v[0], v[1]), p(v[2], v[3]), p(v[4], v[5]), p(v[6], v[7]));
    q(q(s01, s23), q(s45, s67))
}

/// See [`crate::reference::pack_row`].
pub(crate) fn pack_row(x: &[f32], mode: Binarize, out: &mut [u64]) {
    check();
    assert!(out.len() * 64 >= x.len());
    let full = x.len() / 64;
    for (wi, chunk) in x.chunks_exact(64).enumerate() {
        // SAFETY: features checked above; `chunk` has exactly 64 floats.
        out[wi] = unsafe { pack64(chunk.as_ptr(), mode) };
    }
    let rest = &x[full * 64..];
    crate::reference::pack_row(rest, mode, &mut out[full..]);
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pack64(p: *const f32, mode: Binarize) -> u64 {
    let zero = _mm512_setzero_ps();
    let mut w = 0u64;
    for q in 0..4 {
        // SAFETY: p points at 64 readable floats.
        let v = unsafe { _mm512_loadu_ps(p.add(16 * q)) };
        let m = match mode {
            Binarize::Positive => _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, zero),
            Binarize::Sign => _mm512_cmp_ps_mask::<_CMP_GE_OQ>(v, zero),
        };
        w |= u64::from(m) << (16 * q);
    }
    w
}

/// See [`crate::reference::pack_u8_planes`].
pub(crate) fn pack_u8_planes(x: &[u8], bits: u32, cw: usize, out: &mut [u64]) {
    check();
    let p = bits as usize;
    assert!(cw * 64 >= x.len() && out.len() >= p * cw && p <= 8);
    for wi in 0..cw {
        let lo = (wi * 64).min(x.len());
        let len = (x.len() - lo).min(64);
        let mask: __mmask64 = if len == 64 {
            u64::MAX
        } else {
            (1u64 << len) - 1
        };
        // SAFETY: features checked above; only the `len` bytes x[lo..lo+len] are enabled by `mask`.
        let v = unsafe { load_u8(mask, x.as_ptr().add(lo)) };
        for b in 0..p {
            // SAFETY: the CPU features were checked above.
            out[b * cw + wi] = unsafe { test_bit(v, b as u32) };
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load_u8(mask: __mmask64, p: *const u8) -> __m512i {
    // SAFETY: the caller guarantees the bytes enabled by `mask` are readable.
    unsafe { _mm512_maskz_loadu_epi8(mask, p.cast()) }
}

#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn test_bit(v: __m512i, b: u32) -> u64 {
    _mm512_test_epi8_mask(v, _mm512_set1_epi8((1u8 << b) as i8))
}

/// See [`crate::reference::masked_gemv`].
pub(crate) fn masked_gemv(x: &[f32], w: &[u64], n: usize, kw: usize, sel: &mut [f32]) {
    check();
    assert!(x.len() == kw * 64 && w.len() >= n * kw && sel.len() >= n);
    for (j, s) in sel[..n].iter_mut().enumerate() {
        // SAFETY: features checked above; row j has kw words, x has kw*64 floats.
        *s = unsafe { gemv_row(x.as_ptr(), w.as_ptr().add(j * kw), kw) };
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gemv_row(x: *const f32, w: *const u64, kw: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    for wi in 0..kw {
        // SAFETY: wi < kw.
        let word = unsafe { *w.add(wi) };
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: x has kw*64 floats.
            let xv = unsafe { _mm512_loadu_ps(x.add(wi * 64 + 16 * q)) };
            *a = _mm512_mask_add_ps(*a, (word >> (16 * q)) as u16, *a, xv);
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(s)
}
