//! Pooling layers over NCHW tensors: [`AvgPool2d`], [`MaxPool2d`] and [`GlobalAvgPool`]
//! (EMPF.md §9: `AvgPool2d(2)` in VGG-SNN, the 3x3/s2 max-pool of the ImageNet stem, the global
//! average pool of every head). None has parameters or state; each works plane by plane
//! (one `n, c` image plane is independent of every other), so the batch-parallel split below needs
//! no reduction and is deterministic for any thread count.

use crate::error::{Error, Result};
use crate::layers::{Cache, Layer, Param, State, StepCtx, check_shape};
use crate::tensor::{Real, Tensor, as_slice, from_vec};
use rayon::prelude::*;

/// Tensors below this many input elements are processed on the calling thread: pooling is
/// memory-bound and rayon's fork/join costs more than it saves on small tensors.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;

/// Planes per work item: all of them (one item, the calling thread) for small tensors, otherwise
/// `⌈planes / workers⌉`, i.e. the contiguous split of [`crate::tensor::chunks`]-like granularity.
fn planes_per_item(planes: usize, elems: usize) -> usize {
    let w = crate::tensor::workers();
    if elems < PAR_MIN_ELEMS || w <= 1 {
        planes.max(1)
    } else {
        planes.div_ceil(w).max(1)
    }
}

/// Run `f(input_plane, output_plane)` over matching planes (`input.len() / in_plane` of them).
/// Planes are independent, so the result does not depend on the thread count.
pub(crate) fn for_planes<A: Sync, B: Send>(
    input: &[A],
    in_plane: usize,
    out: &mut [B],
    out_plane: usize,
    f: impl Fn(&[A], &mut [B]) + Send + Sync,
) {
    if in_plane == 0 || out_plane == 0 {
        return;
    }
    let ppi = planes_per_item(input.len() / in_plane, input.len().max(out.len()));
    out.par_chunks_mut(ppi * out_plane)
        .zip(input.par_chunks(ppi * in_plane))
        .for_each(|(o, i)| {
            o.chunks_exact_mut(out_plane)
                .zip(i.chunks_exact(in_plane))
                .for_each(|(o, i)| f(i, o))
        });
}

/// [`for_planes`] with two inputs: `f(a_plane, b_plane, output_plane)`.
pub(crate) fn for_planes_2in<A: Sync, C: Sync, B: Send>(
    a: &[A],
    a_plane: usize,
    b: &[C],
    b_plane: usize,
    out: &mut [B],
    out_plane: usize,
    f: impl Fn(&[A], &[C], &mut [B]) + Send + Sync,
) {
    if a_plane == 0 || b_plane == 0 || out_plane == 0 {
        return;
    }
    let ppi = planes_per_item(a.len() / a_plane, a.len().max(out.len()));
    out.par_chunks_mut(ppi * out_plane)
        .zip(a.par_chunks(ppi * a_plane))
        .zip(b.par_chunks(ppi * b_plane))
        .for_each(|((o, a), b)| {
            o.chunks_exact_mut(out_plane)
                .zip(a.chunks_exact(a_plane))
                .zip(b.chunks_exact(b_plane))
                .for_each(|((o, a), b)| f(a, b, o))
        });
}

/// [`for_planes`] with two outputs: `f(input_plane, out1_plane, out2_plane)`.
fn for_planes_2out<A: Sync, B: Send, D: Send>(
    input: &[A],
    in_plane: usize,
    o1: &mut [B],
    o2: &mut [D],
    out_plane: usize,
    f: impl Fn(&[A], &mut [B], &mut [D]) + Send + Sync,
) {
    if in_plane == 0 || out_plane == 0 {
        return;
    }
    let ppi = planes_per_item(input.len() / in_plane, input.len().max(o1.len()));
    o1.par_chunks_mut(ppi * out_plane)
        .zip(o2.par_chunks_mut(ppi * out_plane))
        .zip(input.par_chunks(ppi * in_plane))
        .for_each(|((o1, o2), i)| {
            o1.chunks_exact_mut(out_plane)
                .zip(o2.chunks_exact_mut(out_plane))
                .zip(i.chunks_exact(in_plane))
                .for_each(|((o1, o2), i)| f(i, o1, o2))
        });
}

/// Window geometry shared by the two 2-D poolings: square kernel `k`, stride `s`, zero padding
/// `p` on both sides of both axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Kernel size (both axes).
    pub kernel: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Padding (both axes, both sides).
    pub pad: usize,
}

impl PoolGeom {
    fn new(layer: &str, kernel: usize, stride: usize, pad: usize) -> Result<Self> {
        if kernel == 0 || stride == 0 {
            return Err(Error::Config(format!(
                "pooling layer `{layer}`: kernel ({kernel}) and stride ({stride}) must be positive"
            )));
        }
        if 2 * pad > kernel {
            return Err(Error::Config(format!(
                "pooling layer `{layer}`: padding {pad} exceeds half the kernel {kernel} (a window could lie entirely in the padding)"
            )));
        }
        Ok(PoolGeom {
            kernel,
            stride,
            pad,
        })
    }

    /// Output `[N, C, OH, OW]` for an NCHW input, `OH = (H + 2p − k)/s + 1`.
    fn output_shape(&self, layer: &str, input: &[usize]) -> Result<Vec<usize>> {
        check_shape(
            layer,
            input,
            &[None, None, None, None],
            "an N x C x H x W tensor",
        )?;
        let (h, w) = (input[2], input[3]);
        if h + 2 * self.pad < self.kernel || w + 2 * self.pad < self.kernel {
            return Err(Error::shape(
                layer,
                format!(
                    "an image at least {k} x {k} after padding {p} (kernel {k})",
                    k = self.kernel,
                    p = self.pad
                ),
                input,
            ));
        }
        let oh = (h + 2 * self.pad - self.kernel) / self.stride + 1;
        let ow = (w + 2 * self.pad - self.kernel) / self.stride + 1;
        Ok(vec![input[0], input[1], oh, ow])
    }

    /// Input rows (or columns) `lo..hi` covered by output row (or column) `o`, clipped to `0..len`.
    #[inline]
    /// Kernel 2, stride 2, no padding: the common downsampling, with its own fast plane loops.
    fn is_2x2(&self) -> bool {
        self.kernel == 2 && self.stride == 2 && self.pad == 0
    }

    fn span(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.pad as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.kernel as isize).max(0) as usize).min(len);
        (lo, hi)
    }

    fn describe(&self) -> String {
        format!("k={}, s={}, p={}", self.kernel, self.stride, self.pad)
    }
}

/// Backward needs only the input shape (pooling is linear in its input for average pooling).
#[derive(Default)]
pub struct ShapeCache {
    shape: Vec<usize>,
}
crate::impl_cache!(ShapeCache { shape });

fn store_shape(cache: Option<&mut Cache>, shape: &[usize]) {
    if let Some(c) = cache {
        let s = &mut c.get_or_default::<ShapeCache>().shape;
        s.clear();
        s.extend_from_slice(shape);
    }
}

fn check_dy(layer: &str, dy: &Tensor<impl Real>, expect: &[usize]) -> Result<()> {
    if dy.shape() == expect {
        Ok(())
    } else {
        Err(Error::shape(
            layer,
            format!("output gradient of shape {expect:?}"),
            dy.shape(),
        ))
    }
}

/// Average pooling, `count_include_pad` semantics (PyTorch's default):
///
/// `y[n,c,i,j] = (1/k²) Σ_{a,b < k} x̄[n, c, i·s − p + a, j·s − p + b]`, where `x̄` is `x` padded with zeros.
///
/// Backward (the adjoint of that linear map): every input pixel inside output window `(i, j)`
/// receives `dy[n,c,i,j] / k²`, summed over the windows that cover it; padded positions receive nothing.
pub struct AvgPool2d {
    name: String,
    /// Window geometry.
    pub geom: PoolGeom,
}

impl AvgPool2d {
    /// `kernel x kernel` average pool with the given stride and padding (padding ≤ kernel/2).
    pub fn new(name: &str, kernel: usize, stride: usize, pad: usize) -> Result<Self> {
        Ok(AvgPool2d {
            name: name.to_string(),
            geom: PoolGeom::new(name, kernel, stride, pad)?,
        })
    }
}

impl<R: Real> Layer<R> for AvgPool2d {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "AvgPool2d"
    }
    fn describe(&self) -> String {
        format!("AvgPool2d({})", self.geom.describe())
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.geom.output_shape(&self.name, input)
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let out = self.geom.output_shape(&self.name, x.shape())?;
        let (h, w, oh, ow) = (x.shape()[2], x.shape()[3], out[2], out[3]);
        let g = self.geom;
        let inv = R::one() / R::of((g.kernel * g.kernel) as f64);
        let xs = as_slice(x);
        let mut y = vec![R::zero(); out.iter().product()];
        for_planes(&xs, h * w, &mut y, oh * ow, |xp, yp| {
            if g.is_2x2() {
                avg_forward_2x2(xp, yp, w, oh, ow, inv)
            } else {
                avg_forward_plane(g, xp, yp, h, w, oh, ow, inv)
            }
        });
        store_shape(cache, x.shape());
        Ok(from_vec(&out, y))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let shape = cache.get::<ShapeCache>(&self.name)?.shape.clone();
        let out = self.geom.output_shape(&self.name, &shape)?;
        check_dy(&self.name, dy, &out)?;
        let (h, w, oh, ow) = (shape[2], shape[3], out[2], out[3]);
        let g = self.geom;
        let inv = R::one() / R::of((g.kernel * g.kernel) as f64);
        let dys = as_slice(dy);
        let mut dx = vec![R::zero(); shape.iter().product()];
        for_planes(&dys, oh * ow, &mut dx, h * w, |dyp, dxp| {
            if g.is_2x2() {
                avg_backward_2x2(dyp, dxp, w, oh, ow, inv)
            } else {
                avg_backward_plane(g, dyp, dxp, h, w, oh, ow, inv)
            }
        });
        Ok(from_vec(&shape, dx))
    }
    fn output_facts(&self, input: crate::layers::Facts) -> crate::layers::Facts {
        crate::layers::Facts::pooled(input)
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

/// Average-pool forward of one `h x w` plane, any geometry (the reference for the fast path).
#[allow(clippy::too_many_arguments)]
fn avg_forward_plane<R: Real>(
    g: PoolGeom,
    xp: &[R],
    yp: &mut [R],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    inv: R,
) {
    for i in 0..oh {
        let (r0, r1) = g.span(i, h);
        for j in 0..ow {
            let (c0, c1) = g.span(j, w);
            let mut acc = R::zero();
            for r in r0..r1 {
                for &v in &xp[r * w + c0..r * w + c1] {
                    acc += v;
                }
            }
            yp[i * ow + j] = acc * inv;
        }
    }
}

/// [`avg_forward_plane`] for kernel 2, stride 2, no padding; the same additions in the same
/// order (row 2i: columns 2j, 2j+1; then row 2i+1), so bit-identical.
fn avg_forward_2x2<R: Real>(xp: &[R], yp: &mut [R], w: usize, oh: usize, ow: usize, inv: R) {
    for (i, yr) in yp.chunks_exact_mut(ow).take(oh).enumerate() {
        let r0 = &xp[2 * i * w..2 * i * w + 2 * ow];
        let r1 = &xp[(2 * i + 1) * w..(2 * i + 1) * w + 2 * ow];
        for ((y, a), b) in yr
            .iter_mut()
            .zip(r0.chunks_exact(2))
            .zip(r1.chunks_exact(2))
        {
            *y = (R::zero() + a[0] + a[1] + b[0] + b[1]) * inv;
        }
    }
}

/// Average-pool backward of one plane, any geometry: `dx += dy·inv` over each window (`dxp`
/// zeroed by the caller).
#[allow(clippy::too_many_arguments)]
fn avg_backward_plane<R: Real>(
    g: PoolGeom,
    dyp: &[R],
    dxp: &mut [R],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    inv: R,
) {
    for i in 0..oh {
        let (r0, r1) = g.span(i, h);
        for j in 0..ow {
            let (c0, c1) = g.span(j, w);
            let d = dyp[i * ow + j] * inv;
            for r in r0..r1 {
                for v in &mut dxp[r * w + c0..r * w + c1] {
                    *v += d;
                }
            }
        }
    }
}

/// [`avg_backward_plane`] for kernel 2, stride 2, no padding: windows do not overlap, so each
/// covered `dx` is `0 + dy·inv`, written directly (bit-identical).
fn avg_backward_2x2<R: Real>(dyp: &[R], dxp: &mut [R], w: usize, oh: usize, ow: usize, inv: R) {
    for (i, dr) in dyp.chunks_exact(ow).take(oh).enumerate() {
        let (top, bottom) = dxp[2 * i * w..(2 * i + 2) * w].split_at_mut(w);
        for ((&d, a), b) in dr
            .iter()
            .zip(top[..2 * ow].chunks_exact_mut(2))
            .zip(bottom[..2 * ow].chunks_exact_mut(2))
        {
            let v = R::zero() + d * inv;
            a[0] = v;
            a[1] = v;
            b[0] = v;
            b[1] = v;
        }
    }
}

/// Max pooling (padding acts as −∞, PyTorch semantics):
///
/// `y[n,c,i,j] = max_{a,b < k, inside the image} x[n, c, i·s − p + a, j·s − p + b]`.
///
/// The forward remembers, per output element, the flat index (within its `H x W` plane, as `u32`)
/// of the input that won (the first one in row-major order on ties). Backward routes all of
/// `dy[n,c,i,j]` to that input: `dx[n,c,argmax] += dy[n,c,i,j]` (the max is locally the identity on
/// the winner and constant in the others; overlapping windows add).
pub struct MaxPool2d {
    name: String,
    /// Window geometry.
    pub geom: PoolGeom,
}

/// Backward needs the winners' indices and the input shape.
#[derive(Default)]
pub struct MaxPoolCache {
    shape: Vec<usize>,
    argmax: Vec<u32>,
}
crate::impl_cache!(MaxPoolCache { shape, argmax });

impl MaxPool2d {
    /// `kernel x kernel` max pool with the given stride and padding (padding ≤ kernel/2).
    pub fn new(name: &str, kernel: usize, stride: usize, pad: usize) -> Result<Self> {
        Ok(MaxPool2d {
            name: name.to_string(),
            geom: PoolGeom::new(name, kernel, stride, pad)?,
        })
    }
}

impl<R: Real> Layer<R> for MaxPool2d {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "MaxPool2d"
    }
    fn describe(&self) -> String {
        format!("MaxPool2d({})", self.geom.describe())
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.geom.output_shape(&self.name, input)
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let out = self.geom.output_shape(&self.name, x.shape())?;
        let (h, w, oh, ow) = (x.shape()[2], x.shape()[3], out[2], out[3]);
        if h * w > u32::MAX as usize {
            return Err(Error::shape(
                &self.name,
                "an image plane of fewer than 2^32 pixels",
                x.shape(),
            ));
        }
        let g = self.geom;
        let xs = as_slice(x);
        let total: usize = out.iter().product();
        let mut y = vec![R::zero(); total];
        let mut arg = vec![0u32; total];
        for_planes_2out(&xs, h * w, &mut y, &mut arg, oh * ow, |xp, yp, ap| {
            for i in 0..oh {
                let (r0, r1) = g.span(i, h);
                for j in 0..ow {
                    let (c0, c1) = g.span(j, w);
                    let mut best = R::neg_infinity();
                    let mut bi = r0 * w + c0;
                    for r in r0..r1 {
                        for (c, &v) in xp[r * w + c0..r * w + c1].iter().enumerate() {
                            // branch-free select (random data would mispredict a branch)
                            let gt = v > best;
                            best = if gt { v } else { best };
                            bi = if gt { r * w + c0 + c } else { bi };
                        }
                    }
                    // all −∞ or NaN: take the first pixel so a NaN propagates visibly
                    if best == R::neg_infinity() {
                        best = xp[bi];
                    }
                    yp[i * ow + j] = best;
                    ap[i * ow + j] = bi as u32;
                }
            }
        });
        if let Some(c) = cache {
            let mc = c.get_or_default::<MaxPoolCache>();
            mc.shape.clear();
            mc.shape.extend_from_slice(x.shape());
            mc.argmax = arg;
        }
        Ok(from_vec(&out, y))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let mc = cache.get::<MaxPoolCache>(&self.name)?;
        let shape = mc.shape.clone();
        let out = self.geom.output_shape(&self.name, &shape)?;
        check_dy(&self.name, dy, &out)?;
        let (h, w, oh, ow) = (shape[2], shape[3], out[2], out[3]);
        let dys = as_slice(dy);
        let mut dx = vec![R::zero(); shape.iter().product()];
        for_planes_2in(
            &dys,
            oh * ow,
            &mc.argmax,
            oh * ow,
            &mut dx,
            h * w,
            |dp, ap, dxp| {
                for (&d, &a) in dp.iter().zip(ap) {
                    dxp[a as usize] += d;
                }
            },
        );
        Ok(from_vec(&shape, dx))
    }
    fn output_facts(&self, input: crate::layers::Facts) -> crate::layers::Facts {
        crate::layers::Facts::pooled(input)
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

/// Global average pool `N x C x H x W -> N x C`: `y[n,c] = (1/HW) Σ_{i,j} x[n,c,i,j]`.
///
/// Backward: `dx[n,c,i,j] = dy[n,c] / HW` (each pixel contributes `1/HW` to its plane's mean).
pub struct GlobalAvgPool {
    name: String,
}

impl GlobalAvgPool {
    /// A global average pool.
    pub fn new(name: &str) -> Self {
        GlobalAvgPool {
            name: name.to_string(),
        }
    }
}

/// `z[p] = mean of plane p` for the `len / plane` contiguous planes of `x` (GAP over NCHW data).
pub(crate) fn plane_means<R: Real>(x: &[R], plane: usize) -> Vec<R> {
    let inv = R::one() / R::of(plane as f64);
    let mut z = vec![R::zero(); x.len() / plane.max(1)];
    for_planes(x, plane, &mut z, 1, |xp, zp| {
        zp[0] = xp.iter().copied().sum::<R>() * inv;
    });
    z
}

impl<R: Real> Layer<R> for GlobalAvgPool {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "GlobalAvgPool"
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_shape(
            &self.name,
            input,
            &[None, None, None, None],
            "an N x C x H x W tensor",
        )?;
        Ok(vec![input[0], input[1]])
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let out = <Self as Layer<R>>::output_shape(self, x.shape())?;
        let plane = x.shape()[2] * x.shape()[3];
        let z = plane_means(&as_slice(x), plane);
        store_shape(cache, x.shape());
        Ok(from_vec(&out, z))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let shape = cache.get::<ShapeCache>(&self.name)?.shape.clone();
        check_dy(&self.name, dy, &shape[..2])?;
        let plane = shape[2] * shape[3];
        let inv = R::one() / R::of(plane as f64);
        let dys = as_slice(dy);
        let mut dx = vec![R::zero(); shape.iter().product()];
        for_planes(&dys, 1, &mut dx, plane, |d, p| p.fill(d[0] * inv));
        Ok(from_vec(&shape, dx))
    }
    fn output_facts(&self, input: crate::layers::Facts) -> crate::layers::Facts {
        crate::layers::Facts::pooled(input)
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn avgpool_2x2_fast_path_is_bit_identical_to_the_general_loops() {
        let g = PoolGeom {
            kernel: 2,
            stride: 2,
            pad: 0,
        };
        let mut rng = crate::rng::Rng::new(11);
        for (h, w) in [(2, 2), (28, 28), (7, 9), (14, 3), (5, 2)] {
            let (oh, ow) = (h / 2, w / 2);
            let x: Vec<f32> = (0..h * w).map(|_| rng.normal() as f32).collect();
            let dy: Vec<f32> = (0..oh * ow).map(|_| rng.normal() as f32).collect();
            let inv = 0.25f32;
            let (mut y1, mut y2) = (vec![0.0; oh * ow], vec![0.0; oh * ow]);
            avg_forward_plane(g, &x, &mut y1, h, w, oh, ow, inv);
            avg_forward_2x2(&x, &mut y2, w, oh, ow, inv);
            assert_eq!(
                y1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let (mut d1, mut d2) = (vec![0.0; h * w], vec![0.0; h * w]);
            avg_backward_plane(g, &dy, &mut d1, h, w, oh, ow, inv);
            avg_backward_2x2(&dy, &mut d2, w, oh, ow, inv);
            assert_eq!(
                d1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                d2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step};
    use crate::layers::GradMode;
    use crate::rng::Rng;
    use crate::tensor::zeros;
    use proptest::prelude::*;

    fn randn(shape: &[usize], rng: &mut Rng) -> Tensor<f64> {
        from_vec(
            shape,
            (0..shape.iter().product()).map(|_| rng.normal()).collect(),
        )
    }

    fn train() -> StepCtx {
        StepCtx::train(0, 1, GradMode::Online)
    }

    /// Naive reference: pool by explicit padded indexing (average includes padding, max skips it).
    fn naive(x: &Tensor<f64>, k: usize, s: usize, p: usize, max: bool) -> Vec<f64> {
        let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let oh = (h + 2 * p - k) / s + 1;
        let ow = (w + 2 * p - k) / s + 1;
        let mut y = Vec::new();
        for b in 0..n {
            for ch in 0..c {
                for i in 0..oh {
                    for j in 0..ow {
                        let mut acc = if max { f64::NEG_INFINITY } else { 0.0 };
                        for a in 0..k {
                            for bb in 0..k {
                                let r = (i * s + a) as isize - p as isize;
                                let q = (j * s + bb) as isize - p as isize;
                                if r >= 0 && q >= 0 && (r as usize) < h && (q as usize) < w {
                                    let v = x[[b, ch, r as usize, q as usize].as_ref()];
                                    if max {
                                        acc = acc.max(v);
                                    } else {
                                        acc += v;
                                    }
                                }
                            }
                        }
                        y.push(if max { acc } else { acc / (k * k) as f64 });
                    }
                }
            }
        }
        y
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn avgpool_matches_naive_and_finite_differences(n in 1usize..3, c in 1usize..4, h in 1usize..8, w in 1usize..8,
                                                        k in 1usize..4, s in 1usize..3, p in 0usize..2, seed in 0u64..1000) {
            let p = p.min(k / 2);
            prop_assume!(h + 2 * p >= k && w + 2 * p >= k);
            let mut rng = Rng::new(seed);
            let mut l = AvgPool2d::new("pool", k, s, p).unwrap();
            let x = randn(&[n, c, h, w], &mut rng);
            let y = l.forward(&x, &train(), &mut State::Empty, None).unwrap();
            for (a, b) in y.iter().zip(naive(&x, k, s, p, false)) {
                prop_assert!((a - b).abs() < 1e-12);
            }
            let opts = GradCheckOpts { seed, ..Default::default() };
            check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap().assert_ok(&opts, "AvgPool2d");
        }

        #[test]
        fn maxpool_matches_naive_and_finite_differences(n in 1usize..3, c in 1usize..4, h in 1usize..8, w in 1usize..8,
                                                        k in 1usize..4, s in 1usize..3, p in 0usize..2, seed in 0u64..1000) {
            let p = p.min(k / 2);
            prop_assume!(h + 2 * p >= k && w + 2 * p >= k);
            let mut rng = Rng::new(seed);
            let mut l = MaxPool2d::new("pool", k, s, p).unwrap();
            let x = randn(&[n, c, h, w], &mut rng);
            let y = l.forward(&x, &train(), &mut State::Empty, None).unwrap();
            for (a, b) in y.iter().zip(naive(&x, k, s, p, true)) {
                prop_assert_eq!(*a, b);
            }
            let opts = GradCheckOpts { seed, ..Default::default() };
            check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap().assert_ok(&opts, "MaxPool2d");
        }

        #[test]
        fn global_avgpool_matches_finite_differences(n in 1usize..4, c in 1usize..6, h in 1usize..7, w in 1usize..7, seed in 0u64..1000) {
            let mut rng = Rng::new(seed);
            let mut l = GlobalAvgPool::new("gap");
            let x = randn(&[n, c, h, w], &mut rng);
            let y = l.forward(&x, &train(), &mut State::Empty, None).unwrap();
            prop_assert_eq!(y.shape(), &[n, c][..]);
            let opts = GradCheckOpts { seed, ..Default::default() };
            check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap().assert_ok(&opts, "GlobalAvgPool");
        }
    }

    #[test]
    fn large_tensors_take_the_parallel_path_and_agree_with_naive() {
        let mut rng = Rng::new(9);
        let x = randn(&[4, 8, 33, 32], &mut rng); // > PAR_MIN_ELEMS
        assert!(x.len() >= PAR_MIN_ELEMS);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            for max in [false, true] {
                let y = if max {
                    let mut l = MaxPool2d::new("mp", 3, 2, 1).unwrap();
                    l.forward(&x, &train(), &mut State::Empty, None).unwrap()
                } else {
                    let mut l = AvgPool2d::new("ap", 3, 2, 1).unwrap();
                    l.forward(&x, &train(), &mut State::Empty, None).unwrap()
                };
                for (a, b) in y.iter().zip(naive(&x, 3, 2, 1, max)) {
                    assert!((a - b).abs() < 1e-12);
                }
            }
        });
    }

    /// Forward + backward (with `dy = sin(y)`) of a layer inside a rayon pool of `threads` threads.
    pub(crate) fn run_in_pool(
        layer: &mut dyn Layer<f64>,
        x: &Tensor<f64>,
        threads: usize,
    ) -> (Tensor<f64>, Tensor<f64>) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut c = Cache::new();
            let y = layer
                .forward(x, &train(), &mut State::Empty, Some(&mut c))
                .unwrap();
            let dy = y.mapv(f64::sin);
            let dx = layer
                .backward(&dy, &train(), &c, &mut State::Empty)
                .unwrap();
            (y, dx)
        })
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = Rng::new(10);
        let x = randn(&[4, 6, 40, 37], &mut rng);
        assert!(x.len() >= PAR_MIN_ELEMS);
        let mut layers: Vec<Box<dyn Layer<f64>>> = vec![
            Box::new(AvgPool2d::new("ap", 3, 2, 1).unwrap()),
            Box::new(MaxPool2d::new("mp", 3, 2, 1).unwrap()),
            Box::new(GlobalAvgPool::new("gap")),
        ];
        for l in layers.iter_mut() {
            let (y1, dx1) = run_in_pool(l.as_mut(), &x, 1);
            let (y3, dx3) = run_in_pool(l.as_mut(), &x, 3);
            assert_eq!(y1, y3, "{}", l.name());
            assert_eq!(dx1, dx3, "{}", l.name());
        }
    }

    #[test]
    fn maxpool_backward_routes_to_the_winner_and_adds_on_overlap() {
        // 1x1x1x3 input [0, 5, 1], kernel 2 stride 1: both windows pick index 1.
        let mut l = MaxPool2d::new("mp", 2, 1, 0).unwrap();
        let x = from_vec(&[1, 1, 1, 3], vec![0.0, 5.0, 1.0]);
        // kernel 2 needs height 2: pad the height by using a 2-row image instead
        let x2 = from_vec(&[1, 1, 2, 3], vec![0.0, 5.0, 1.0, -1.0, -2.0, -3.0]);
        assert!(
            <MaxPool2d as Layer<f64>>::forward(&mut l, &x, &train(), &mut State::Empty, None)
                .is_err()
        );
        let mut cache = Cache::new();
        let y = l
            .forward(&x2, &train(), &mut State::Empty, Some(&mut cache))
            .unwrap();
        assert_eq!(y.as_slice().unwrap(), &[5.0, 5.0]);
        let dy = from_vec(&[1, 1, 1, 2], vec![2.0, 3.0]);
        let dx = l
            .backward(&dy, &train(), &cache, &mut State::Empty)
            .unwrap();
        assert_eq!(dx.as_slice().unwrap(), &[0.0, 5.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn broken_maxpool_backward_fails_the_check() {
        // routing the gradient to the window's first pixel instead of its winner must be caught
        let broken =
            |l: &mut MaxPool2d, dy: &Tensor<f64>, c: &StepCtx, k: &Cache, s: &mut State<f64>| {
                let mut dx = l.backward(dy, c, k, s)?;
                // drop the last pixel's share (a missing term for the windows that pick it)
                if let Some(v) = dx
                    .as_slice_mut()
                    .unwrap()
                    .iter_mut()
                    .rev()
                    .find(|v| **v != 0.0)
                {
                    *v = 0.0;
                }
                Ok(dx)
            };
        let mut rng = Rng::new(4);
        let mut l = crate::gradcheck::Tampered {
            inner: MaxPool2d::new("mp", 2, 2, 0).unwrap(),
            backward: broken,
        };
        let x = randn(&[1, 2, 4, 4], &mut rng);
        let opts = GradCheckOpts::default();
        let rep = check_step(&mut l, &x, &train(), &State::Empty, &opts).unwrap();
        assert!(!rep.passed(&opts));
    }

    #[test]
    fn bad_shapes_and_configs_are_errors_naming_the_layer() {
        let mut a = AvgPool2d::new("avg3", 3, 1, 0).unwrap();
        let e = <AvgPool2d as Layer<f32>>::forward(
            &mut a,
            &zeros::<f32>(&[2, 3, 2, 2]),
            &StepCtx::eval(0, 1),
            &mut State::Empty,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("avg3") && e.contains("[2, 3, 2, 2]"), "{e}");
        let mut m = MaxPool2d::new("mp1", 2, 2, 0).unwrap();
        let e = <MaxPool2d as Layer<f32>>::forward(
            &mut m,
            &zeros::<f32>(&[2, 12]),
            &StepCtx::eval(0, 1),
            &mut State::Empty,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mp1") && e.contains("[2, 12]"), "{e}");
        let mut g = GlobalAvgPool::new("gap9");
        let e = <GlobalAvgPool as Layer<f32>>::forward(
            &mut g,
            &zeros::<f32>(&[2, 3, 4]),
            &StepCtx::eval(0, 1),
            &mut State::Empty,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Shape { ref layer, .. } if layer == "gap9"));
        // gradient of the wrong shape
        let mut cache = Cache::new();
        <GlobalAvgPool as Layer<f64>>::forward(
            &mut g,
            &zeros::<f64>(&[2, 3, 4, 4]),
            &train(),
            &mut State::Empty,
            Some(&mut cache),
        )
        .unwrap();
        let e = <GlobalAvgPool as Layer<f64>>::backward(
            &mut g,
            &zeros::<f64>(&[2, 4]),
            &train(),
            &cache,
            &mut State::Empty,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Shape { ref layer, .. } if layer == "gap9"));
        assert!(matches!(
            MaxPool2d::new("x", 0, 1, 0),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            AvgPool2d::new("x", 2, 0, 0),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            AvgPool2d::new("x", 3, 1, 2),
            Err(Error::Config(_))
        ));
    }
}
