//! 2x2, stride-2 average pooling of float planes, in the additions of the library's `AvgPool2d`
//! forward: `y = ((((0 + a0) + a1) + b0) + b1)·0.25` for the two inputs `a0, a1` of the upper row
//! and `b0, b1` of the lower row (odd heights and widths drop their last row and column). Every
//! level does these IEEE operations in this order, so every level gives the same floats.

/// `y` (`planes x H/2 x W/2`) from `x` (`planes x H x W`); the caller checked the lengths.
pub(crate) type Pool2Fn = fn(&[f32], (usize, usize), &mut [f32]);

/// The portable pool (the scalar reference).
pub(crate) fn pool2_generic(x: &[f32], hw: (usize, usize), y: &mut [f32]) {
    pool2_body(x, hw, y)
}

#[inline(always)]
fn pool2_body(x: &[f32], (h, w): (usize, usize), y: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    if oh * ow == 0 {
        return;
    }
    for (xp, yp) in x.chunks_exact(h * w).zip(y.chunks_exact_mut(oh * ow)) {
        for (i, yr) in yp.chunks_exact_mut(ow).enumerate() {
            let r0 = &xp[2 * i * w..][..2 * ow];
            let r1 = &xp[(2 * i + 1) * w..][..2 * ow];
            for ((o, a), b) in yr
                .iter_mut()
                .zip(r0.chunks_exact(2))
                .zip(r1.chunks_exact(2))
            {
                *o = (0.0 + a[0] + a[1] + b[0] + b[1]) * 0.25;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The portable pool compiled for AVX2 (8-lane even/odd shuffles).
    pub(crate) fn pool2_avx2(x: &[f32], hw: (usize, usize), y: &mut [f32]) {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was just checked; the body is safe code.
            unsafe { pool2_avx2_body(x, hw, y) }
        } else {
            super::pool2_generic(x, hw, y)
        }
    }

    #[target_feature(enable = "avx2")]
    fn pool2_avx2_body(x: &[f32], hw: (usize, usize), y: &mut [f32]) {
        super::pool2_body(x, hw, y)
    }

    /// The pool at the AVX-512 level: 16 outputs per step from two pairs of (masked) 16-float
    /// loads, split into even and odd columns by one two-source permute each.
    pub(crate) fn pool2_avx512(x: &[f32], hw: (usize, usize), y: &mut [f32]) {
        if crate::Isa::Avx512.is_available() && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was just checked.
            unsafe { pool2_avx512_body(x, hw, y) }
        } else {
            super::pool2_generic(x, hw, y)
        }
    }

    #[target_feature(enable = "avx512f")]
    fn pool2_avx512_body(x: &[f32], (h, w): (usize, usize), y: &mut [f32]) {
        let (oh, ow) = (h / 2, w / 2);
        if oh * ow == 0 {
            return;
        }
        let planes = x.len() / (h * w);
        assert!(x.len() == planes * h * w && y.len() == planes * oh * ow);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let zero = _mm512_setzero_ps();
        let quarter = _mm512_set1_ps(0.25);
        // whole steps of 16 outputs, then a tail of `n` under masks (of the 2n inputs of each
        // row: the first 16 and the rest), all fixed for the call
        let (full, n) = (ow / 16, ow % 16);
        let lo = (2 * n).min(16);
        let (mlo, mhi, mout) = (mask(lo), mask(2 * n - lo), mask(n));
        let pool = |a0: __m512, a1: __m512, b0: __m512, b1: __m512| {
            let s = _mm512_add_ps(zero, _mm512_permutex2var_ps(a0, even, a1));
            let s = _mm512_add_ps(s, _mm512_permutex2var_ps(a0, odd, a1));
            let s = _mm512_add_ps(s, _mm512_permutex2var_ps(b0, even, b1));
            let s = _mm512_add_ps(s, _mm512_permutex2var_ps(b0, odd, b1));
            _mm512_mul_ps(s, quarter)
        };
        for row in 0..planes * oh {
            let (p, i) = (row / oh, row % oh);
            // SAFETY: rows `2i` and `2i + 1` of plane `p` are inside `x` and output row `row`
            // inside `y` (lengths asserted above): the loads read `2·ow ≤ w` floats of each input
            // row (the tail's masked-off lanes are not read) and the stores write `ow` floats.
            unsafe {
                let pa = x.as_ptr().add((p * h + 2 * i) * w);
                let pb = pa.add(w);
                let o = y.as_mut_ptr().add(row * ow);
                for j in 0..full {
                    let (a, b) = (pa.add(32 * j), pb.add(32 * j));
                    let v = pool(
                        _mm512_loadu_ps(a),
                        _mm512_loadu_ps(a.add(16)),
                        _mm512_loadu_ps(b),
                        _mm512_loadu_ps(b.add(16)),
                    );
                    _mm512_storeu_ps(o.add(16 * j), v);
                }
                if n > 0 {
                    let (a, b) = (pa.add(32 * full), pb.add(32 * full));
                    let v = pool(
                        _mm512_maskz_loadu_ps(mlo, a),
                        // (wrapping: with no lanes past 16 the address may be past `x`)
                        _mm512_maskz_loadu_ps(mhi, a.wrapping_add(16)),
                        _mm512_maskz_loadu_ps(mlo, b),
                        _mm512_maskz_loadu_ps(mhi, b.wrapping_add(16)),
                    );
                    _mm512_mask_storeu_ps(o.add(16 * full), mout, v);
                }
            }
        }
    }

    /// The lowest `n` (at most 16) lanes.
    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
}
