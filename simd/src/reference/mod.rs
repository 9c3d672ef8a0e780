//! Scalar reference kernels: plain obvious Rust, no `unsafe`, the oracle every SIMD level is tested
//! against (bit-exactly for integer outputs).

use crate::Binarize;

/// Raw popcount GEMM: `out[i*n + j] = Σ_w popcnt(a[i*kw + w] OP b[j*kw + w])`, OP = AND or XOR.
pub(crate) fn popc(
    xor: bool,
    a: &[u64],
    m: usize,
    b: &[u64],
    n: usize,
    kw: usize,
    out: &mut [u32],
) {
    assert!(a.len() >= m * kw && b.len() >= n * kw && out.len() >= m * n);
    for i in 0..m {
        let ar = &a[i * kw..(i + 1) * kw];
        for j in 0..n {
            let br = &b[j * kw..(j + 1) * kw];
            let mut c = 0u32;
            for (x, y) in ar.iter().zip(br) {
                c += if xor {
                    (x ^ y).count_ones()
                } else {
                    (x & y).count_ones()
                };
            }
            out[i * n + j] = c;
        }
    }
}

/// Packs one row of floats into bits (bit `k` of the row is bit `k % 64` of word `k / 64`); every word
/// of `out` is written, bits past `x.len()` are zero.
pub(crate) fn pack_row(x: &[f32], mode: Binarize, out: &mut [u64]) {
    assert!(out.len() * 64 >= x.len());
    out.fill(0);
    for (k, &v) in x.iter().enumerate() {
        if mode.bit(v) {
            out[k / 64] |= 1u64 << (k % 64);
        }
    }
}

/// Packs one row of k-bit integers into `bits` planes of `cw` words each (plane-major in `out`):
/// bit `k % 64` of word `b·cw + k/64` is bit `b` of `x[k]`. Every word of `out[..bits·cw]` is written.
pub(crate) fn pack_u8_planes(x: &[u8], bits: u32, cw: usize, out: &mut [u64]) {
    let p = bits as usize;
    assert!(cw * 64 >= x.len() && out.len() >= p * cw);
    out[..p * cw].fill(0);
    for (k, &v) in x.iter().enumerate() {
        for b in 0..p {
            out[b * cw + k / 64] |= u64::from(v >> b & 1) << (k % 64);
        }
    }
}

/// Masked-add GEMV core: `sel[j] = Σ_{k : bit k of row j set} x[k]`, rows of `kw` words, `x.len() ==
/// kw * 64`. Summation in index order.
pub(crate) fn masked_gemv(x: &[f32], w: &[u64], n: usize, kw: usize, sel: &mut [f32]) {
    assert!(x.len() == kw * 64 && w.len() >= n * kw && sel.len() >= n);
    for j in 0..n {
        let mut s = 0.0f32;
        for (wi, &word) in w[j * kw..(j + 1) * kw].iter().enumerate() {
            for bit in 0..64 {
                if word >> bit & 1 == 1 {
                    s += x[wi * 64 + bit];
                }
            }
        }
        sel[j] = s;
    }
}
