//! AVX2 kernels: popcount by nibble lookup (`vpshufb`), byte counts accumulated for up to 31 steps
//! of 256 bits (at most 31·8 = 248 per byte) before a `vpsadbw` widening; 2x4 register tile.

#![allow(clippy::needless_range_loop)] // register tiles read clearest as indexed loops

use crate::Binarize;
use std::arch::x86_64::*;

const MR: usize = 2;
const NR: usize = 4;
/// k-steps (4 words each) between widenings of the byte accumulators.
const FLUSH: usize = 31;

fn check() {
    assert!(
        crate::Isa::Avx2.is_available(),
        "avx2 kernel called on a CPU without it"
    );
}

/// See [`crate::reference::popc`]; `kw` must be a multiple of 4.
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

#[target_feature(enable = "avx2")]
unsafe fn popc_impl<const XOR: bool>(
    a: *const u64,
    m: usize,
    b: *const u64,
    n: usize,
    kw: usize,
    out: *mut u32,
) {
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

#[target_feature(enable = "avx2")]
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

#[target_feature(enable = "avx2")]
#[inline]
fn cnt8(v: __m256i, lut: __m256i, low: __m256i) -> __m256i {
    let lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low));
    let hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
    _mm256_add_epi8(lo, hi)
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn tile<const XOR: bool, const R: usize, const C: usize>(
    a: *const u64,
    b: *const u64,
    kw: usize,
    out: *mut u32,
    ldo: usize,
) {
    let lut = _mm256_setr_epi8(
        0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3,
        3, 4,
    );
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut acc64 = [[zero; C]; R];
    let steps = kw / 4;
    let mut s = 0;
    while s < steps {
        let end = (s + FLUSH).min(steps);
        let mut acc8 = [[zero; C]; R];
        while s < end {
            let k = s * 4;
            let mut av = [zero; R];
            for (r, v) in av.iter_mut().enumerate() {
                // SAFETY: row r of A has kw words and k + 4 <= kw.
                *v = unsafe { _mm256_loadu_si256(a.add(r * kw + k).cast()) };
            }
            for c in 0..C {
                // SAFETY: row c of the B tile has kw words and k + 4 <= kw.
                let bv = unsafe { _mm256_loadu_si256(b.add(c * kw + k).cast()) };
                for r in 0..R {
                    let x = if XOR {
                        _mm256_xor_si256(av[r], bv)
                    } else {
                        _mm256_and_si256(av[r], bv)
                    };
                    acc8[r][c] = _mm256_add_epi8(acc8[r][c], cnt8(x, lut, low));
                }
            }
            s += 1;
        }
        for r in 0..R {
            for c in 0..C {
                acc64[r][c] = _mm256_add_epi64(acc64[r][c], _mm256_sad_epu8(acc8[r][c], zero));
            }
        }
    }
    for (r, row) in acc64.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let h = _mm_add_epi64(
                _mm256_castsi256_si128(*v),
                _mm256_extracti128_si256::<1>(*v),
            );
            let t = _mm_cvtsi128_si64(h) + _mm_extract_epi64::<1>(h);
            // SAFETY: output element (r, c) of the tile is inside `out[..m*n]`.
            unsafe { *out.add(r * ldo + c) = t as u32 };
        }
    }
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
    crate::reference::pack_row(&x[full * 64..], mode, &mut out[full..]);
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pack64(p: *const f32, mode: Binarize) -> u64 {
    let zero = _mm256_setzero_ps();
    let mut w = 0u64;
    for q in 0..8 {
        // SAFETY: p points at 64 readable floats.
        let v = unsafe { _mm256_loadu_ps(p.add(8 * q)) };
        let m = match mode {
            Binarize::Positive => _mm256_cmp_ps::<_CMP_GT_OQ>(v, zero),
            Binarize::Sign => _mm256_cmp_ps::<_CMP_GE_OQ>(v, zero),
        };
        w |= u64::from(_mm256_movemask_ps(m) as u8) << (8 * q);
    }
    w
}

/// See [`crate::reference::pack_u8_planes`].
pub(crate) fn pack_u8_planes(x: &[u8], bits: u32, cw: usize, out: &mut [u64]) {
    check();
    let p = bits as usize;
    assert!(cw * 64 >= x.len() && out.len() >= p * cw && p <= 8);
    let full = x.len() / 64;
    for (wi, chunk) in x.chunks_exact(64).enumerate() {
        for b in 0..p {
            // SAFETY: features checked above; `chunk` has exactly 64 bytes.
            out[b * cw + wi] = unsafe { plane64(chunk.as_ptr(), b as i32) };
        }
    }
    if full < cw {
        let mut tail = vec![0u64; p];
        crate::reference::pack_u8_planes(&x[full * 64..], bits, 1, &mut tail);
        for b in 0..p {
            out[b * cw + full] = tail[b];
            out[b * cw + full + 1..(b + 1) * cw].fill(0);
        }
    }
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn plane64(p: *const u8, b: i32) -> u64 {
    let sh = _mm_cvtsi32_si128(7 - b);
    // SAFETY: p points at 64 readable bytes.
    let (v0, v1) = unsafe {
        (
            _mm256_loadu_si256(p.cast()),
            _mm256_loadu_si256(p.add(32).cast()),
        )
    };
    let lo = _mm256_movemask_epi8(_mm256_sll_epi16(v0, sh)) as u32;
    let hi = _mm256_movemask_epi8(_mm256_sll_epi16(v1, sh)) as u32;
    u64::from(lo) | u64::from(hi) << 32
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

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn gemv_row(x: *const f32, w: *const u64, kw: usize) -> f32 {
    // Lane l of group q selects bit 8q + l of a 32-bit half word: shift it into the sign bit and
    // blend on it.
    let sh = [0, 8, 16, 24].map(|b| {
        _mm256_setr_epi32(
            31 - b,
            30 - b,
            29 - b,
            28 - b,
            27 - b,
            26 - b,
            25 - b,
            24 - b,
        )
    });
    let zero = _mm256_setzero_ps();
    let mut acc = [zero; 4];
    for wi in 0..kw {
        // SAFETY: wi < kw.
        let word = unsafe { *w.add(wi) };
        for half in 0..2 {
            let w32 = _mm256_set1_epi32((word >> (32 * half)) as u32 as i32);
            for q in 0..4 {
                let m = _mm256_castsi256_ps(_mm256_sllv_epi32(w32, sh[q]));
                // SAFETY: x has kw*64 floats.
                let xv = unsafe { _mm256_loadu_ps(x.add(wi * 64 + 32 * half + 8 * q)) };
                acc[q] = _mm256_add_ps(acc[q], _mm256_blendv_ps(zero, xv, m));
            }
        }
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
    _mm_cvtss_f32(h)
}
