//! Tensors: NCHW (or NF) arrays of a [`Real`] scalar over ndarray, im2col/col2im, and the one float
//! GEMM call every layer goes through.
//!
//! Everything is generic over [`Real`] so that the fast path runs in `f32` while finite-difference
//! gradient checks run the very same code in `f64`.

use ndarray::{ArrayD, ArrayView2, ArrayViewMut2, IxDyn, LinalgScalar, ScalarOperand};
use num_traits::{Float, FromPrimitive};
use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// The float scalar of a tensor: `f32` for training and inference, `f64` for gradient checks.
pub trait Real:
    Float
    + FromPrimitive
    + LinalgScalar
    + ScalarOperand
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + 'static
{
    /// "f32" or "f64".
    const NAME: &'static str;
    /// Convert from f64 (rounding for f32).
    fn of(x: f64) -> Self;
    /// Convert to f64.
    fn f64(self) -> f64;
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}

/// A dense tensor in standard (row-major, C-contiguous) layout: NCHW for images, NF for features.
pub type Tensor<R> = ArrayD<R>;

/// A zero tensor of the given shape.
pub fn zeros<R: Real>(shape: &[usize]) -> Tensor<R> {
    ArrayD::zeros(IxDyn(shape))
}

/// A tensor from a shape and its row-major data. Panics if the lengths differ (internal use).
pub fn from_vec<R: Real>(shape: &[usize], data: Vec<R>) -> Tensor<R> {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("from_vec: data length matches shape")
}

/// Row-major contiguous slice of a tensor, copying only when it is not in standard layout.
pub fn as_slice<R: Real>(t: &Tensor<R>) -> std::borrow::Cow<'_, [R]> {
    match t.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.iter().copied().collect()),
    }
}

/// Make a tensor standard-layout (a no-op when it already is).
pub fn standard<R: Real>(t: Tensor<R>) -> Tensor<R> {
    if t.is_standard_layout() {
        t
    } else {
        t.as_standard_layout().into_owned()
    }
}

/// `C = alpha * op(A) * op(B) + beta * C`, all row-major; `op(A)` is `m x k`, `op(B)` is `k x n`.
///
/// `ta`/`tb` mean the stored matrix is the transpose (`A` stored `k x m`, `B` stored `n x k`).
/// This is the single float GEMM entry point of the library (matrixmultiply through ndarray's
/// `general_mat_mul`, which picks `sgemm`/`dgemm` and handles the transposed strides).
#[allow(clippy::too_many_arguments)]
pub fn gemm<R: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: R,
    a: &[R],
    ta: bool,
    b: &[R],
    tb: bool,
    beta: R,
    c: &mut [R],
) {
    debug_assert_eq!(a.len(), m * k, "gemm: A length");
    debug_assert_eq!(b.len(), k * n, "gemm: B length");
    debug_assert_eq!(c.len(), m * n, "gemm: C length");
    let av = if ta {
        ArrayView2::from_shape((k, m), a)
            .expect("gemm A")
            .reversed_axes()
    } else {
        ArrayView2::from_shape((m, k), a).expect("gemm A")
    };
    let bv = if tb {
        ArrayView2::from_shape((n, k), b)
            .expect("gemm B")
            .reversed_axes()
    } else {
        ArrayView2::from_shape((k, n), b).expect("gemm B")
    };
    let mut cv = ArrayViewMut2::from_shape((m, n), c).expect("gemm C");
    ndarray::linalg::general_mat_mul(alpha, &av, &bv, beta, &mut cv);
}

/// Geometry of a 2-D convolution or pooling window over one `C x H x W` image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub pad: usize,
}

impl ConvGeom {
    /// Output height.
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    /// Output width.
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Rows of the im2col matrix: `c * kh * kw`.
    pub fn col_rows(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Columns of the im2col matrix: `oh * ow`.
    pub fn col_cols(&self) -> usize {
        self.oh() * self.ow()
    }
    /// Whether the window fits (kernel no larger than the padded input, stride > 0).
    pub fn valid(&self) -> bool {
        self.stride > 0
            && self.kh > 0
            && self.kw > 0
            && self.h + 2 * self.pad >= self.kh
            && self.w + 2 * self.pad >= self.kw
    }
}

/// im2col for one image: `x` is `c*h*w`, `col` is `(c*kh*kw) x (oh*ow)` row-major; padding reads 0.
pub fn im2col<R: Real>(g: &ConvGeom, x: &[R], col: &mut [R]) {
    let (oh, ow) = (g.oh(), g.ow());
    debug_assert_eq!(x.len(), g.c * g.h * g.w);
    debug_assert_eq!(col.len(), g.col_rows() * oh * ow);
    let (h, w, s, p) = (
        g.h as isize,
        g.w as isize,
        g.stride as isize,
        g.pad as isize,
    );
    let mut row = 0;
    for c in 0..g.c {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh as isize {
            for kj in 0..g.kw as isize {
                let dst = &mut col[row * oh * ow..(row + 1) * oh * ow];
                for oi in 0..oh as isize {
                    let i = oi * s - p + ki;
                    let drow = &mut dst[oi as usize * ow..(oi as usize + 1) * ow];
                    if i < 0 || i >= h {
                        drow.fill(R::zero());
                        continue;
                    }
                    let xrow = &xc[i as usize * g.w..(i as usize + 1) * g.w];
                    if s == 1 {
                        // contiguous run: j = oj - p + kj
                        for (oj, d) in drow.iter_mut().enumerate() {
                            let j = oj as isize - p + kj;
                            *d = if j >= 0 && j < w {
                                xrow[j as usize]
                            } else {
                                R::zero()
                            };
                        }
                    } else {
                        for (oj, d) in drow.iter_mut().enumerate() {
                            let j = oj as isize * s - p + kj;
                            *d = if j >= 0 && j < w {
                                xrow[j as usize]
                            } else {
                                R::zero()
                            };
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// col2im for one image: adds the columns of `col` back into `dx` (`c*h*w`); the adjoint of [`im2col`].
pub fn col2im_add<R: Real>(g: &ConvGeom, col: &[R], dx: &mut [R]) {
    let (oh, ow) = (g.oh(), g.ow());
    debug_assert_eq!(dx.len(), g.c * g.h * g.w);
    debug_assert_eq!(col.len(), g.col_rows() * oh * ow);
    let (h, w, s, p) = (
        g.h as isize,
        g.w as isize,
        g.stride as isize,
        g.pad as isize,
    );
    let mut row = 0;
    for c in 0..g.c {
        let dxc = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh as isize {
            for kj in 0..g.kw as isize {
                let src = &col[row * oh * ow..(row + 1) * oh * ow];
                for oi in 0..oh as isize {
                    let i = oi * s - p + ki;
                    if i < 0 || i >= h {
                        continue;
                    }
                    let srow = &src[oi as usize * ow..(oi as usize + 1) * ow];
                    let xrow = &mut dxc[i as usize * g.w..(i as usize + 1) * g.w];
                    for (oj, &v) in srow.iter().enumerate() {
                        let j = oj as isize * s - p + kj;
                        if j >= 0 && j < w {
                            xrow[j as usize] += v;
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Split `0..n` into at most `parts` contiguous chunks of near-equal size (deterministic for a given
/// `parts`): the unit of data parallelism, so that reductions happen in a fixed order.
pub fn chunks(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for i in 0..parts {
        let len = base + usize::from(i < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Number of worker chunks to use for data-parallel loops: the rayon pool size.
pub fn workers() -> usize {
    rayon::current_num_threads().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive_conv(g: &ConvGeom, x: &[f64], wt: &[f64], cout: usize) -> Vec<f64> {
        let (oh, ow) = (g.oh(), g.ow());
        let mut y = vec![0.0; cout * oh * ow];
        for o in 0..cout {
            for oi in 0..oh {
                for oj in 0..ow {
                    let mut acc = 0.0;
                    for c in 0..g.c {
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                let i = (oi * g.stride + ki) as isize - g.pad as isize;
                                let j = (oj * g.stride + kj) as isize - g.pad as isize;
                                if i >= 0 && j >= 0 && (i as usize) < g.h && (j as usize) < g.w {
                                    acc += x[(c * g.h + i as usize) * g.w + j as usize]
                                        * wt[((o * g.c + c) * g.kh + ki) * g.kw + kj];
                                }
                            }
                        }
                    }
                    y[(o * oh + oi) * ow + oj] = acc;
                }
            }
        }
        y
    }

    #[test]
    fn im2col_gemm_equals_naive_conv_and_col2im_is_its_adjoint() {
        let mut rng = Rng::new(5);
        for &(c, h, w, k, s, p) in &[
            (1, 5, 5, 3, 1, 1),
            (3, 7, 6, 3, 2, 1),
            (2, 4, 9, 1, 1, 0),
            (4, 6, 5, 3, 2, 0),
        ] {
            let g = ConvGeom {
                c,
                h,
                w,
                kh: k,
                kw: k,
                stride: s,
                pad: p,
            };
            let cout = 3;
            let x: Vec<f64> = (0..c * h * w).map(|_| rng.normal()).collect();
            let wt: Vec<f64> = (0..cout * g.col_rows()).map(|_| rng.normal()).collect();
            let mut col = vec![0.0; g.col_rows() * g.col_cols()];
            im2col(&g, &x, &mut col);
            let mut y = vec![0.0; cout * g.col_cols()];
            gemm(
                cout,
                g.col_rows(),
                g.col_cols(),
                1.0,
                &wt,
                false,
                &col,
                false,
                0.0,
                &mut y,
            );
            let yr = naive_conv(&g, &x, &wt, cout);
            for (a, b) in y.iter().zip(&yr) {
                assert!((a - b).abs() < 1e-12);
            }
            // <im2col(x), r> == <x, col2im(r)>
            let r: Vec<f64> = (0..col.len()).map(|_| rng.normal()).collect();
            let lhs: f64 = col.iter().zip(&r).map(|(a, b)| a * b).sum();
            let mut dx = vec![0.0; x.len()];
            col2im_add(&g, &r, &mut dx);
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-9 * (1.0 + lhs.abs()));
        }
    }

    #[test]
    fn gemm_transposes() {
        // A = [[1,2],[3,4]], B = [[5,6],[7,8]]
        let a = [1.0f32, 2.0, 3.0, 4.0];
        let b = [5.0f32, 6.0, 7.0, 8.0];
        let mut c = [0.0f32; 4];
        gemm(2, 2, 2, 1.0, &a, false, &b, false, 0.0, &mut c);
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        gemm(2, 2, 2, 1.0, &a, true, &b, false, 0.0, &mut c); // A^T B
        assert_eq!(c, [26.0, 30.0, 38.0, 44.0]);
        gemm(2, 2, 2, 1.0, &a, false, &b, true, 0.0, &mut c); // A B^T
        assert_eq!(c, [17.0, 23.0, 39.0, 53.0]);
        gemm(2, 2, 2, 1.0, &a, false, &b, false, 1.0, &mut c); // accumulate
        assert_eq!(c, [36.0, 45.0, 82.0, 103.0]);
    }

    #[test]
    fn chunks_cover_exactly() {
        for n in 0..20 {
            for p in 1..6 {
                let cs = chunks(n, p);
                let total: usize = cs.iter().map(|r| r.len()).sum();
                assert_eq!(total, n);
                for w in cs.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
    }
}
