//! aarch64 Advanced SIMD kernels: `cnt` (per-byte popcount) on two 128-bit vectors per 256-bit
//! step, byte sums (at most 16 per byte) widened with pairwise add-accumulate (`uadalp`) into u32
//! lanes; 2x4 register tile.

#![allow(clippy::needless_range_loop)] // register tiles read clearest as indexed loops

use crate::Binarize;
use std::arch::aarch64::*;

const MR: usize = 2;
const NR: usize = 4;

fn check() {
    assert!(
        crate::Isa::Neon.is_available(),
        "neon kernel called on a CPU without it"
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

#[target_feature(enable = "neon")]
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

#[target_feature(enable = "neon")]
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

#[target_feature(enable = "neon")]
#[inline]
unsafe fn tile<const XOR: bool, const R: usize, const C: usize>(
    a: *const u64,
    b: *const u64,
    kw: usize,
    out: *mut u32,
    ldo: usize,
) {
    let mut acc = [[vdupq_n_u32(0); C]; R];
    let mut k = 0;
    while k < kw {
        let mut av = [[vdupq_n_u8(0); 2]; R];
        for (r, v) in av.iter_mut().enumerate() {
            for (q, x) in v.iter_mut().enumerate() {
                // SAFETY: row r of A has kw words and k + 4 <= kw.
                *x = unsafe { vld1q_u8(a.add(r * kw + k + 2 * q).cast()) };
            }
        }
        for c in 0..C {
            let mut bv = [vdupq_n_u8(0); 2];
            for (q, x) in bv.iter_mut().enumerate() {
                // SAFETY: row c of the B tile has kw words and k + 4 <= kw.
                *x = unsafe { vld1q_u8(b.add(c * kw + k + 2 * q).cast()) };
            }
            for r in 0..R {
                let mut s = vdupq_n_u8(0);
                for q in 0..2 {
                    let x = if XOR {
                        veorq_u8(av[r][q], bv[q])
                    } else {
                        vandq_u8(av[r][q], bv[q])
                    };
                    s = vaddq_u8(s, vcntq_u8(x));
                }
                acc[r][c] = vpadalq_u16(acc[r][c], vpaddlq_u8(s));
            }
        }
        k += 4;
    }
    for (r, row) in acc.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            // SAFETY: output element (r, c) of the tile is inside `out[..m*n]`.
            unsafe { *out.add(r * ldo + c) = vaddvq_u32(*v) };
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

#[target_feature(enable = "neon")]
#[inline]
unsafe fn pack64(p: *const f32, mode: Binarize) -> u64 {
    let zero = vdupq_n_f32(0.0);
    let weights: [u32; 4] = [1, 2, 4, 8];
    // SAFETY: `weights` has 4 u32.
    let wv = unsafe { vld1q_u32(weights.as_ptr()) };
    let mut w = 0u64;
    for q in 0..16 {
        // SAFETY: p points at 64 readable floats.
        let v = unsafe { vld1q_f32(p.add(4 * q)) };
        let m = match mode {
            Binarize::Positive => vcgtq_f32(v, zero),
            Binarize::Sign => vcgeq_f32(v, zero),
        };
        let nib = vaddvq_u32(vandq_u32(m, wv));
        w |= u64::from(nib) << (4 * q);
    }
    w
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

#[target_feature(enable = "neon")]
#[inline]
unsafe fn gemv_row(x: *const f32, w: *const u64, kw: usize) -> f32 {
    let weights: [u32; 4] = [1, 2, 4, 8];
    // SAFETY: `weights` has 4 u32.
    let bits = unsafe { vld1q_u32(weights.as_ptr()) };
    let mut acc = [vdupq_n_f32(0.0); 4];
    for wi in 0..kw {
        // SAFETY: wi < kw.
        let word = unsafe { *w.add(wi) };
        for q in 0..16 {
            let nib = vdupq_n_u32(((word >> (4 * q)) & 0xf) as u32);
            let mask = vtstq_u32(nib, bits);
            // SAFETY: x has kw*64 floats.
            let xv = unsafe { vld1q_f32(x.add(wi * 64 + 4 * q)) };
            let sel = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(xv), mask));
            acc[q & 3] = vaddq_f32(acc[q & 3], sel);
        }
    }
    vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ))
}
