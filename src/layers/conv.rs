//! Full-precision 2-D convolution (the stem of every architecture, EMPF.md §9) and the convolution
//! core it shares with [`BinaryConv2d`](crate::layers::binary::BinaryConv2d).
//!
//! # Equation
//! For an input `x` of shape `N x C x H x W`, weights `W` of shape `O x C x k x k`, stride `s` and
//! zero padding `p`:
//!
//! ```text
//! y[n, o, i, j] = b[o] + Σ_{c, u, v} W[o, c, u, v] · x[n, c, s·i + u − p, s·j + v − p]
//! ```
//!
//! (out-of-range input pixels read 0), output `N x O x OH x OW`, `OH = (H + 2p − k)/s + 1`.
//!
//! # How it is computed
//! Per sample, `im2col` lays the receptive fields out as the columns of `col` (`K x P`, `K = C·k·k`,
//! `P = OH·OW`), and the convolution is the GEMM `Y_n = W · col_n` (`O x K` times `K x P`).
//! The batch is split into `tensor::chunks(N, workers())` contiguous chunks run in parallel with
//! rayon. Inside a chunk, up to `sb` samples are laid side by side (`col` is `K x sb·P`) so each
//! GEMM is wide even for small feature maps (7x7, 14x14); `sb` keeps one chunk's im2col block under
//! [`COL_BUDGET`] elements. All scratch buffers live in the layer and are reused across steps: no
//! allocation in the hot loop besides the output tensor.
//!
//! # Backward (derived term by term)
//! With `G = dL/dy` laid out like `Y` (`O x P` per sample):
//! * `dL/dW[o, r] = Σ_n Σ_q G_n[o, q] · col_n[r, q]`, i.e. `dW += Σ_n G_n · col_nᵀ`. Each chunk
//!   accumulates into its own `O x K` buffer, and the buffers are then added into `W.grad` in chunk
//!   order, so the result is deterministic for a given thread count.
//! * `dL/db[o] = Σ_n Σ_q G_n[o, q]` (the bias is added to every output position).
//! * `dL/dcol_n = Wᵀ · G_n` (`K x P`): each column entry `col_n[r, q]` is a copy of one input pixel
//!   (or a padding zero), so `dL/dx_n = col2im(dL/dcol_n)` adds each entry back into the pixel it
//!   was copied from (the adjoint of im2col; padding positions are dropped).
//!
//! # What the cache holds
//! The input `x` (`N·C·H·W` values) rather than the im2col buffer (`N·C·k²·OH·OW` values, 9x larger
//! for a 3x3 stride-1 conv): backward recomputes im2col, which costs a memory pass, against a GEMM
//! of `2·O·K·P` flops per sample. Memory per cached step matters more (BPTT keeps `T` caches).

use crate::error::{Error, Result};
use crate::layers::{Cache, Layer, Param, ParamKind, State, StepCtx, check_shape};
use crate::rng::Rng;
use crate::tensor::{ConvGeom, Real, Tensor, as_slice, chunks, from_vec, gemm, workers};
use rayon::prelude::*;

/// Largest im2col block (in elements) one worker lays out before calling the GEMM: 256 Ki elements
/// (1 MiB in f32, about one core's L2). Several samples share one GEMM while their columns fit
/// (`benches/conv.rs` sweeps this: 1 sample to 4 MiB blocks are within 5% of each other).
pub const COL_BUDGET: usize = 1 << 18;

/// Hyper-parameters of a square-kernel 2-D convolution (NCHW).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    /// Input channels `C`.
    pub in_ch: usize,
    /// Output channels `O`.
    pub out_ch: usize,
    /// Kernel size `k` (the kernel is `k x k`).
    pub kernel: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub padding: usize,
}

impl ConvSpec {
    /// A `k x k` convolution `in_ch -> out_ch` with stride 1 and no padding.
    pub fn new(in_ch: usize, out_ch: usize, kernel: usize) -> Self {
        ConvSpec {
            in_ch,
            out_ch,
            kernel,
            stride: 1,
            padding: 0,
        }
    }
    /// The same with another stride.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    /// The same with another padding.
    pub fn padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }
    /// Fan-in of one output unit: `C·k·k`.
    pub fn fan_in(&self) -> usize {
        self.in_ch * self.kernel * self.kernel
    }
    /// Weight shape `O x C x k x k`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.out_ch, self.in_ch, self.kernel, self.kernel]
    }
    /// The window geometry over an `in_ch x h x w` image.
    pub fn geom(&self, h: usize, w: usize) -> ConvGeom {
        ConvGeom {
            c: self.in_ch,
            h,
            w,
            kh: self.kernel,
            kw: self.kernel,
            stride: self.stride,
            pad: self.padding,
        }
    }
    fn describe(&self) -> String {
        format!(
            "{} -> {}, {k}x{k}, stride {}, padding {}",
            self.in_ch,
            self.out_ch,
            self.stride,
            self.padding,
            k = self.kernel
        )
    }
}

/// Initialisation of a full-precision weight tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum WeightInit {
    /// Kaiming (He) normal with fan-in: `N(0, 2 / fan_in)` (ReLU gain).
    #[default]
    KaimingNormal,
    /// Uniform on `[lo, hi)`.
    Uniform {
        /// Lower bound.
        lo: f64,
        /// Upper bound (excluded).
        hi: f64,
    },
}

impl WeightInit {
    /// `len` values for a tensor whose units have the given fan-in.
    pub fn sample<R: Real>(&self, fan_in: usize, len: usize, rng: &mut Rng) -> Vec<R> {
        match *self {
            WeightInit::KaimingNormal => {
                let std = (2.0 / fan_in.max(1) as f64).sqrt();
                (0..len).map(|_| R::of(std * rng.normal())).collect()
            }
            WeightInit::Uniform { lo, hi } => {
                (0..len).map(|_| R::of(rng.uniform_range(lo, hi))).collect()
            }
        }
    }
}

/// What a convolution's (or any layer's) backward needs when it is only the input.
#[derive(Default)]
pub struct InputCache<R: Real> {
    /// The input of the step, standard layout.
    pub x: Option<Tensor<R>>,
}
crate::impl_cache!(InputCache<R> { x });

impl<R: Real> InputCache<R> {
    /// Store `x`, reusing the previous allocation when the shape is unchanged.
    pub fn store(&mut self, x: &Tensor<R>) {
        match &mut self.x {
            Some(t) if t.shape() == x.shape() => t.assign(x),
            slot => *slot = Some(x.as_standard_layout().into_owned()),
        }
    }
    /// The cached input, or an error naming the layer.
    pub fn input(&self, layer: &str) -> Result<&Tensor<R>> {
        self.x.as_ref().ok_or_else(|| {
            Error::Internal(format!(
                "layer `{layer}`: backward called without a cached input"
            ))
        })
    }
}

/// Per-worker scratch buffers, kept in the layer and reused every step.
#[derive(Default, Clone)]
struct Scratch<R> {
    /// im2col block `K x sb·P` (also reused for `dL/dcol` in backward).
    col: Vec<R>,
    /// Output block `O x sb·P` (forward) / gathered `dL/dy` block (backward).
    buf: Vec<R>,
    /// This chunk's `dL/dW` (`O x K`).
    dw: Vec<R>,
    /// This chunk's `dL/db` (`O`).
    db: Vec<R>,
}

fn grow<R: Real>(v: &mut Vec<R>, n: usize) {
    if v.len() < n {
        v.resize(n, R::zero());
    }
}

/// The convolution machinery shared by [`Conv2d`] and `BinaryConv2d`: shape checks, the batched
/// im2col + GEMM forward and the backward, with per-worker scratch buffers.
#[derive(Clone, Debug)]
pub(crate) struct ConvCore<R: Real> {
    pub spec: ConvSpec,
    /// Largest im2col block per GEMM, in elements (see [`COL_BUDGET`]; tests lower it).
    pub col_budget: usize,
    scratch: Vec<Scratch<R>>,
}

impl<R: Real> std::fmt::Debug for Scratch<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scratch({} values)", self.col.len() + self.buf.len())
    }
}

impl<R: Real> ConvCore<R> {
    pub fn new(spec: ConvSpec) -> Self {
        ConvCore {
            spec,
            col_budget: COL_BUDGET,
            scratch: Vec::new(),
        }
    }

    /// Output shape `N x O x OH x OW`, or an [`Error::Shape`] naming `layer`.
    pub fn output_shape(&self, layer: &str, input: &[usize]) -> Result<Vec<usize>> {
        let s = &self.spec;
        check_shape(
            layer,
            input,
            &[None, Some(s.in_ch), None, None],
            &format!("N x {} x H x W", s.in_ch),
        )?;
        let g = s.geom(input[2], input[3]);
        if !g.valid() {
            return Err(Error::shape(
                layer,
                format!(
                    "an input of at least {k}x{k} after padding {} for a {k}x{k} kernel (stride {})",
                    s.padding,
                    s.stride,
                    k = s.kernel
                ),
                input,
            ));
        }
        Ok(vec![input[0], s.out_ch, g.oh(), g.ow()])
    }

    fn prepare(&mut self, n: usize, g: &ConvGeom) -> (Vec<std::ops::Range<usize>>, usize) {
        let parts = chunks(n, workers());
        if self.scratch.len() < parts.len() {
            self.scratch.resize(parts.len(), Scratch::default());
        }
        let per = g.col_rows() * g.col_cols();
        let largest = parts.iter().map(|r| r.len()).max().unwrap_or(1);
        let sb = (self.col_budget / per.max(1)).clamp(1, largest.max(1));
        (parts, sb)
    }

    /// `y = conv(x, w) (+ b)`; `shape` is the input shape, already checked by [`Self::output_shape`].
    pub fn forward(&mut self, x: &[R], shape: &[usize], w: &[R], b: Option<&[R]>) -> Vec<R> {
        let n = shape[0];
        let g = self.spec.geom(shape[2], shape[3]);
        let o = self.spec.out_ch;
        let (xs, ys) = (g.c * g.h * g.w, o * g.col_cols());
        let mut y = vec![R::zero(); n * ys];
        let (parts, sb) = self.prepare(n, &g);
        let mut jobs = Vec::with_capacity(parts.len());
        let mut rest = y.as_mut_slice();
        for (r, sc) in parts.iter().zip(self.scratch.iter_mut()) {
            let (head, tail) = rest.split_at_mut(r.len() * ys);
            rest = tail;
            jobs.push((r.clone(), head, sc));
        }
        jobs.into_par_iter().for_each(|(r, yc, sc)| {
            forward_chunk(
                &g,
                o,
                &x[r.start * xs..r.end * xs],
                r.len(),
                w,
                b,
                yc,
                sc,
                sb,
            )
        });
        y
    }

    /// Backward: `dw += dL/dW`, `db += dL/db` (each when given); returns `dL/dx` (zeros, not
    /// computed, when `want_dx` is false). Without `dw` no im2col is laid out.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        x: &[R],
        shape: &[usize],
        w: &[R],
        dy: &[R],
        dw: Option<&mut [R]>,
        db: Option<&mut [R]>,
        want_dx: bool,
    ) -> Vec<R> {
        let n = shape[0];
        let g = self.spec.geom(shape[2], shape[3]);
        let o = self.spec.out_ch;
        let (xs, ys) = (g.c * g.h * g.w, o * g.col_cols());
        let mut dx = vec![R::zero(); n * xs];
        let (parts, sb) = self.prepare(n, &g);
        let used = parts.len();
        let mut jobs = Vec::with_capacity(used);
        let mut rest = dx.as_mut_slice();
        for (r, sc) in parts.iter().zip(self.scratch.iter_mut()) {
            let (head, tail) = rest.split_at_mut(r.len() * xs);
            rest = tail;
            jobs.push((r.clone(), head, sc));
        }
        let (want_dw, want_db) = (dw.is_some(), db.is_some());
        jobs.into_par_iter().for_each(|(r, dxc, sc)| {
            backward_chunk(
                &g,
                o,
                &x[r.start * xs..r.end * xs],
                r.len(),
                w,
                &dy[r.start * ys..r.end * ys],
                dxc,
                sc,
                sb,
                [want_dw, want_db, want_dx],
            )
        });
        // reduce the per-chunk gradients in chunk order (deterministic)
        if let Some(dw) = dw {
            for sc in &self.scratch[..used] {
                for (g, &d) in dw.iter_mut().zip(&sc.dw) {
                    *g += d;
                }
            }
        }
        if let Some(db) = db {
            for sc in &self.scratch[..used] {
                for (g, &d) in db.iter_mut().zip(&sc.db) {
                    *g += d;
                }
            }
        }
        dx
    }
}

/// Forward over one chunk of `ns` samples: `x` holds them (`ns·C·H·W`), `y` receives `ns·O·P`.
#[allow(clippy::too_many_arguments)]
fn forward_chunk<R: Real>(
    g: &ConvGeom,
    o: usize,
    x: &[R],
    ns: usize,
    w: &[R],
    b: Option<&[R]>,
    y: &mut [R],
    sc: &mut Scratch<R>,
    sb: usize,
) {
    let (k, p) = (g.col_rows(), g.col_cols());
    let xs = g.c * g.h * g.w;
    let mut s = 0;
    while s < ns {
        let nb = sb.min(ns - s);
        let ld = nb * p;
        grow(&mut sc.col, k * ld);
        let col = &mut sc.col[..k * ld];
        for i in 0..nb {
            im2col_ld(g, &x[(s + i) * xs..(s + i + 1) * xs], &mut col[i * p..], ld);
        }
        if nb == 1 {
            // one sample: the GEMM writes straight into the output, bias pre-filled
            let ys = &mut y[s * o * p..(s + 1) * o * p];
            if let Some(b) = b {
                for (row, &bo) in ys.chunks_exact_mut(p).zip(b) {
                    row.fill(bo);
                }
            }
            let beta = if b.is_some() { R::one() } else { R::zero() };
            gemm(o, k, p, R::one(), w, false, col, false, beta, ys);
        } else {
            grow(&mut sc.buf, o * ld);
            let out = &mut sc.buf[..o * ld];
            gemm(o, k, ld, R::one(), w, false, col, false, R::zero(), out);
            // scatter O x (nb·P) back to nb x O x P, adding the bias
            for i in 0..nb {
                for oc in 0..o {
                    let dst = &mut y[((s + i) * o + oc) * p..((s + i) * o + oc + 1) * p];
                    let src = &out[oc * ld + i * p..oc * ld + (i + 1) * p];
                    match b {
                        Some(b) => {
                            let bo = b[oc];
                            for (d, &v) in dst.iter_mut().zip(src) {
                                *d = v + bo;
                            }
                        }
                        None => dst.copy_from_slice(src),
                    }
                }
            }
        }
        s += nb;
    }
}

/// Backward over one chunk: fills `sc.dw` and `sc.db` with this chunk's parameter gradients and
/// adds `dL/dx` into `dx` (zero on entry), each when asked (`want = [dw, db, dx]`).
#[allow(clippy::too_many_arguments)]
fn backward_chunk<R: Real>(
    g: &ConvGeom,
    o: usize,
    x: &[R],
    ns: usize,
    w: &[R],
    dy: &[R],
    dx: &mut [R],
    sc: &mut Scratch<R>,
    sb: usize,
    [want_dw, want_db, want_dx]: [bool; 3],
) {
    let (k, p) = (g.col_rows(), g.col_cols());
    let xs = g.c * g.h * g.w;
    let Scratch { col, buf, dw, db } = sc;
    dw.clear();
    if want_dw {
        dw.resize(o * k, R::zero());
    }
    db.clear();
    db.resize(o, R::zero());
    let mut s = 0;
    while s < ns {
        let nb = sb.min(ns - s);
        let ld = nb * p;
        // G: dL/dy of the block laid out O x (nb·P)
        let gblk: &[R] = if nb == 1 {
            &dy[s * o * p..(s + 1) * o * p]
        } else {
            grow(buf, o * ld);
            for i in 0..nb {
                for oc in 0..o {
                    let src = &dy[((s + i) * o + oc) * p..((s + i) * o + oc + 1) * p];
                    buf[oc * ld + i * p..oc * ld + (i + 1) * p].copy_from_slice(src);
                }
            }
            &buf[..o * ld]
        };
        if want_db {
            // db[o] += Σ_q G[o, q]
            for (d, row) in db.iter_mut().zip(gblk.chunks_exact(ld)) {
                *d += row.iter().copied().sum::<R>();
            }
        }
        grow(col, k * ld);
        let colb = &mut col[..k * ld];
        if want_dw {
            for i in 0..nb {
                im2col_ld(
                    g,
                    &x[(s + i) * xs..(s + i + 1) * xs],
                    &mut colb[i * p..],
                    ld,
                );
            }
            // dW += G · colᵀ   (O x ld) · (ld x K)
            gemm(o, ld, k, R::one(), gblk, false, colb, true, R::one(), dw);
        }
        if want_dx {
            // dcol = Wᵀ · G   (K x O) · (O x ld), written over the im2col block
            gemm(k, o, ld, R::one(), w, true, gblk, false, R::zero(), colb);
            for i in 0..nb {
                col2im_add_ld(
                    g,
                    &colb[i * p..],
                    ld,
                    &mut dx[(s + i) * xs..(s + i + 1) * xs],
                );
            }
        }
        s += nb;
    }
}

/// Range of output columns `oj` (stride 1) whose input column `oj − p + kj` lies in `0..w`.
#[inline]
fn valid_cols(ow: usize, w: usize, p: usize, kj: usize) -> (usize, usize) {
    let lo = p.saturating_sub(kj).min(ow);
    let hi = (w + p).saturating_sub(kj).min(ow).max(lo);
    (lo, hi)
}

/// im2col of one image into a block whose rows have stride `ld` (`col[r·ld + q]`, `q < OH·OW`):
/// the same values as [`crate::tensor::im2col`], so several samples can sit side by side.
pub(crate) fn im2col_ld<R: Real>(g: &ConvGeom, x: &[R], col: &mut [R], ld: usize) {
    let (oh, ow) = (g.oh(), g.ow());
    let (s, p) = (g.stride, g.pad);
    let mut row = 0;
    for c in 0..g.c {
        let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let dst = &mut col[row * ld..row * ld + oh * ow];
                for oi in 0..oh {
                    let drow = &mut dst[oi * ow..(oi + 1) * ow];
                    let i = (oi * s + ki) as isize - p as isize;
                    if i < 0 || i >= g.h as isize {
                        drow.fill(R::zero());
                        continue;
                    }
                    let xrow = &xc[i as usize * g.w..(i as usize + 1) * g.w];
                    if s == 1 {
                        let (lo, hi) = valid_cols(ow, g.w, p, kj);
                        drow[..lo].fill(R::zero());
                        drow[hi..].fill(R::zero());
                        // j = oj − p + kj
                        let j0 = lo + kj - p;
                        drow[lo..hi].copy_from_slice(&xrow[j0..j0 + (hi - lo)]);
                    } else {
                        for (oj, d) in drow.iter_mut().enumerate() {
                            let j = (oj * s + kj) as isize - p as isize;
                            *d = if j >= 0 && j < g.w as isize {
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

/// The adjoint of [`im2col_ld`]: adds each entry of the block back into the pixel it came from.
pub(crate) fn col2im_add_ld<R: Real>(g: &ConvGeom, col: &[R], ld: usize, dx: &mut [R]) {
    let (oh, ow) = (g.oh(), g.ow());
    let (s, p) = (g.stride, g.pad);
    let mut row = 0;
    for c in 0..g.c {
        let dxc = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let src = &col[row * ld..row * ld + oh * ow];
                for oi in 0..oh {
                    let i = (oi * s + ki) as isize - p as isize;
                    if i < 0 || i >= g.h as isize {
                        continue;
                    }
                    let srow = &src[oi * ow..(oi + 1) * ow];
                    let xrow = &mut dxc[i as usize * g.w..(i as usize + 1) * g.w];
                    if s == 1 {
                        let (lo, hi) = valid_cols(ow, g.w, p, kj);
                        let j0 = lo + kj - p;
                        for (d, &v) in xrow[j0..j0 + (hi - lo)].iter_mut().zip(&srow[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for (oj, &v) in srow.iter().enumerate() {
                            let j = (oj * s + kj) as isize - p as isize;
                            if j >= 0 && j < g.w as isize {
                                xrow[j as usize] += v;
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Full-precision 2-D convolution, NCHW, square kernel, optional bias (see the module docs for the
/// equation, its backward and the cache).
///
/// Parameters: `{name}.weight` (`O x C x k x k`, Kaiming-normal by default) and `{name}.bias` (`O`,
/// zero-initialised).
#[derive(Debug)]
pub struct Conv2d<R: Real> {
    name: String,
    /// `W`, shape `O x C x k x k`.
    pub weight: Param<R>,
    /// `b`, shape `O` (absent when built without bias).
    pub bias: Option<Param<R>>,
    core: ConvCore<R>,
    input_grad: bool,
}

impl<R: Real> Conv2d<R> {
    /// A convolution with Kaiming-normal weights (fan-in) and, when `bias`, a zero bias.
    pub fn new(name: &str, spec: ConvSpec, bias: bool, rng: &mut Rng) -> Self {
        Self::with_init(name, spec, bias, WeightInit::KaimingNormal, rng)
    }

    /// A convolution with the given weight initialisation.
    pub fn with_init(
        name: &str,
        spec: ConvSpec,
        bias: bool,
        init: WeightInit,
        rng: &mut Rng,
    ) -> Self {
        let shape = spec.weight_shape();
        let w = init.sample(spec.fan_in(), shape.iter().product(), rng);
        Conv2d {
            name: name.to_string(),
            weight: Param::new(
                format!("{name}.weight"),
                ParamKind::Weight,
                from_vec(&shape, w),
            ),
            bias: bias.then(|| {
                Param::new(
                    format!("{name}.bias"),
                    ParamKind::Bias,
                    crate::tensor::zeros(&[spec.out_ch]),
                )
            }),
            core: ConvCore::new(spec),
            input_grad: true,
        }
    }

    /// The hyper-parameters.
    pub fn spec(&self) -> ConvSpec {
        self.core.spec
    }

    /// Whether backward computes `dL/dx` (default true). A stem fed with images has no use for it:
    /// turning it off skips the `Wᵀ·dY` GEMM and col2im, and backward returns zeros.
    pub fn set_input_grad(&mut self, on: bool) {
        self.input_grad = on;
    }

    /// Largest im2col block per GEMM in elements (default [`COL_BUDGET`]); lower values trade GEMM
    /// width for scratch memory. Results agree to rounding for every value.
    pub fn set_col_budget(&mut self, elements: usize) {
        self.core.col_budget = elements.max(1);
    }
}

impl<R: Real> Layer<R> for Conv2d<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Conv2d"
    }
    fn describe(&self) -> String {
        format!(
            "Conv2d({}{})",
            self.core.spec.describe(),
            if self.bias.is_some() { "" } else { ", no bias" }
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.core.output_shape(&self.name, input)
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let out = self.output_shape(x.shape())?;
        let xs = as_slice(x);
        let w = self.weight.value.as_slice().expect("standard layout");
        let b = self
            .bias
            .as_ref()
            .map(|b| b.value.as_slice().expect("standard layout"));
        let y = self.core.forward(&xs, x.shape(), w, b);
        if let Some(c) = cache {
            c.get_or_default::<InputCache<R>>().store(x);
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
        let x = cache.get::<InputCache<R>>(&self.name)?.input(&self.name)?;
        let out = self.output_shape(x.shape())?;
        crate::layers::check_grad_shape(&self.name, dy.shape(), &out)?;
        let dys = as_slice(dy);
        let dx = self.core.backward(
            x.as_slice().expect("standard layout"),
            x.shape(),
            self.weight.value.as_slice().expect("standard layout"),
            &dys,
            Some(self.weight.grad.as_slice_mut().expect("standard layout")),
            self.bias
                .as_mut()
                .map(|b| b.grad.as_slice_mut().expect("standard layout")),
            self.input_grad,
        );
        Ok(from_vec(x.shape(), dx))
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.weight);
        if let Some(b) = &mut self.bias {
            f(b);
        }
    }
}

/// Naive direct convolution (the obvious six nested loops), the oracle of the tests.
#[cfg(test)]
pub(crate) fn naive_conv<R: Real>(
    spec: &ConvSpec,
    x: &[R],
    shape: &[usize],
    w: &[R],
    b: Option<&[R]>,
) -> Vec<R> {
    let (n, c, h, wd) = (shape[0], shape[1], shape[2], shape[3]);
    let g = spec.geom(h, wd);
    let (oh, ow, k, o) = (g.oh(), g.ow(), spec.kernel, spec.out_ch);
    let mut y = vec![R::zero(); n * o * oh * ow];
    for s in 0..n {
        for oc in 0..o {
            for i in 0..oh {
                for j in 0..ow {
                    let mut acc = b.map_or(R::zero(), |b| b[oc]);
                    for ci in 0..c {
                        for u in 0..k {
                            for v in 0..k {
                                let ii = (i * spec.stride + u) as isize - spec.padding as isize;
                                let jj = (j * spec.stride + v) as isize - spec.padding as isize;
                                if ii >= 0 && jj >= 0 && (ii as usize) < h && (jj as usize) < wd {
                                    acc += w[((oc * c + ci) * k + u) * k + v]
                                        * x[((s * c + ci) * h + ii as usize) * wd + jj as usize];
                                }
                            }
                        }
                    }
                    y[((s * o + oc) * oh + i) * ow + j] = acc;
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step};
    use crate::layers::GradMode;
    use crate::rng::Rng;
    use crate::tensor::{im2col, zeros};
    use proptest::prelude::*;

    fn rand_input(rng: &mut Rng, shape: &[usize]) -> Tensor<f64> {
        from_vec(
            shape,
            (0..shape.iter().product()).map(|_| rng.normal()).collect(),
        )
    }

    /// Random conv geometries: batch 1..3, odd and even sizes, kernel 1 or 3, stride 1 or 2,
    /// padding 0 or 1, with and without bias.
    fn spec_strategy() -> impl Strategy<Value = (usize, ConvSpec, usize, usize, bool)> {
        (
            1usize..4,
            1usize..4,
            1usize..5,
            prop::sample::select(vec![1usize, 3]),
            1usize..3,
            0usize..2,
            1usize..8,
            1usize..8,
            any::<bool>(),
        )
            .prop_map(|(n, c, o, k, s, p, h, w, bias)| {
                let spec = ConvSpec::new(c, o, k).stride(s).padding(p);
                // keep the window inside the padded input
                let min = k.saturating_sub(2 * p).max(1);
                (n, spec, h.max(min), w.max(min), bias)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn conv2d_backward_matches_finite_differences(
            (n, spec, h, w, bias) in spec_strategy(),
            budget in prop::sample::select(vec![1usize, 50, COL_BUDGET]),
            seed in 0u64..1000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = Conv2d::<f64>::new("stem", spec, bias, &mut rng);
            if let Some(b) = &mut l.bias {
                b.value.mapv_inplace(|_| rng.normal());
            }
            l.set_col_budget(budget);
            let x = rand_input(&mut rng, &[n, spec.in_ch, h, w]);
            let opts = GradCheckOpts { seed, ..Default::default() };
            let rep = check_step(&mut l, &x, &StepCtx::train(0, 1, GradMode::Online), &State::Empty, &opts).unwrap();
            prop_assert!(rep.checked > 0);
            rep.assert_ok(&opts, "Conv2d");
        }

        #[test]
        fn conv2d_forward_equals_naive_convolution(
            (n, spec, h, w, bias) in spec_strategy(),
            budget in prop::sample::select(vec![1usize, 50, COL_BUDGET]),
            seed in 0u64..1000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = Conv2d::<f64>::new("stem", spec, bias, &mut rng);
            if let Some(b) = &mut l.bias {
                b.value.mapv_inplace(|_| rng.normal());
            }
            l.set_col_budget(budget);
            let shape = [n, spec.in_ch, h, w];
            let x = rand_input(&mut rng, &shape);
            let y = l.forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None).unwrap();
            let yr = naive_conv(
                &spec,
                x.as_slice().unwrap(),
                &shape,
                l.weight.value.as_slice().unwrap(),
                l.bias.as_ref().map(|b| b.value.as_slice().unwrap()),
            );
            prop_assert_eq!(y.len(), yr.len());
            for (a, b) in y.iter().zip(&yr) {
                prop_assert!((a - b).abs() < 1e-12 * (1.0 + b.abs()), "{} vs {}", a, b);
            }
        }
    }

    #[test]
    fn conv2d_gradients_match_on_every_kernel_stride_padding_combination() {
        // the proptest samples these at random; this grid makes sure each one is always seen
        let mut rng = Rng::new(31);
        for k in [1, 3] {
            for s in [1, 2] {
                for p in [0, 1] {
                    let spec = ConvSpec::new(3, 2, k).stride(s).padding(p);
                    let mut l = Conv2d::<f64>::new("grid", spec, true, &mut rng);
                    if let Some(b) = &mut l.bias {
                        b.value.mapv_inplace(|_| rng.normal());
                    }
                    let x = rand_input(&mut rng, &[3, 3, 7, 5]);
                    let opts = GradCheckOpts {
                        full_max: 128,
                        ..Default::default()
                    };
                    let ctx = StepCtx::train(0, 1, GradMode::Online);
                    let rep = check_step(&mut l, &x, &ctx, &State::Empty, &opts).unwrap();
                    assert!(rep.checked > 0);
                    rep.assert_ok(&opts, &format!("Conv2d k{k} s{s} p{p}"));
                }
            }
        }
    }

    #[test]
    fn conv2d_unrolled_gradients_match_in_bptt_and_online_with_one_cache_per_step() {
        // T forwards before T backwards: each step's cache must keep its own input while the
        // layer's scratch buffers are reused by every call.
        let mut rng = Rng::new(21);
        let spec = ConvSpec::new(2, 3, 3).padding(1).stride(2);
        let mut l = Conv2d::<f64>::new("c", spec, true, &mut rng);
        let xs: Vec<Tensor<f64>> = (0..3)
            .map(|_| rand_input(&mut rng, &[2, 2, 5, 4]))
            .collect();
        for mode in [GradMode::Bptt, GradMode::Online] {
            let opts = GradCheckOpts::default();
            let rep = crate::gradcheck::check_unrolled(&mut l, &xs, true, mode, &opts).unwrap();
            assert!(rep.checked > 0);
            rep.assert_ok(&opts, "Conv2d unrolled");
        }
    }

    #[test]
    fn strided_im2col_lays_samples_side_by_side() {
        let mut rng = Rng::new(9);
        for &(c, h, w, k, s, p) in &[(2, 5, 7, 3, 1, 1), (3, 6, 5, 3, 2, 0), (1, 4, 4, 1, 2, 0)] {
            let g = ConvGeom {
                c,
                h,
                w,
                kh: k,
                kw: k,
                stride: s,
                pad: p,
            };
            let (kk, pp) = (g.col_rows(), g.col_cols());
            let xs: Vec<Vec<f64>> = (0..3)
                .map(|_| (0..c * h * w).map(|_| rng.normal()).collect())
                .collect();
            let mut wide = vec![f64::NAN; kk * 3 * pp];
            for (i, x) in xs.iter().enumerate() {
                im2col_ld(&g, x, &mut wide[i * pp..], 3 * pp);
            }
            for (i, x) in xs.iter().enumerate() {
                let mut col = vec![0.0; kk * pp];
                im2col(&g, x, &mut col);
                for r in 0..kk {
                    assert_eq!(
                        &wide[r * 3 * pp + i * pp..r * 3 * pp + (i + 1) * pp],
                        &col[r * pp..(r + 1) * pp]
                    );
                }
                // and col2im_add_ld is its adjoint: <im2col(x), q> == <x, col2im(q)>
                let q: Vec<f64> = (0..kk * 3 * pp).map(|_| rng.normal()).collect();
                let mut dx = vec![0.0; x.len()];
                col2im_add_ld(&g, &q[i * pp..], 3 * pp, &mut dx);
                let lhs: f64 = (0..kk)
                    .flat_map(|r| (0..pp).map(move |j| (r, j)))
                    .map(|(r, j)| col[r * pp + j] * q[r * 3 * pp + i * pp + j])
                    .sum();
                let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
                assert!((lhs - rhs).abs() < 1e-10 * (1.0 + lhs.abs()));
            }
        }
    }

    /// Forward and all gradients of a conv under a rayon pool of `threads` threads.
    fn run_with_threads(threads: usize, budget: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut rng = Rng::new(11);
            let spec = ConvSpec::new(3, 5, 3).padding(1);
            let mut l = Conv2d::<f64>::new("c", spec, true, &mut rng);
            l.set_col_budget(budget);
            let x = rand_input(&mut rng, &[7, 3, 6, 5]);
            let mut cache = Cache::new();
            let ctx = StepCtx::train(0, 1, GradMode::Online);
            let y = l
                .forward(&x, &ctx, &mut State::Empty, Some(&mut cache))
                .unwrap();
            let dy = y.mapv(|v| v.sin());
            let dx = l.backward(&dy, &ctx, &cache, &mut State::Empty).unwrap();
            (
                y.into_raw_vec_and_offset().0,
                dx.into_raw_vec_and_offset().0,
                l.weight.grad.iter().copied().collect(),
                l.bias.unwrap().grad.iter().copied().collect(),
            )
        })
    }

    #[test]
    fn conv2d_is_deterministic_and_thread_count_only_changes_rounding() {
        let a = run_with_threads(3, 1 << 20);
        let b = run_with_threads(3, 1 << 20);
        assert_eq!(a, b, "same thread count must give bit-identical results");
        for (threads, budget) in [(1, 1 << 20), (2, 1), (3, 100)] {
            let c = run_with_threads(threads, budget);
            for (u, v) in [(&a.0, &c.0), (&a.1, &c.1), (&a.2, &c.2), (&a.3, &c.3)] {
                for (p, q) in u.iter().zip(v) {
                    assert!((p - q).abs() < 1e-12 * (1.0 + p.abs()), "{p} vs {q}");
                }
            }
        }
    }

    #[test]
    fn gradcheck_catches_a_wrong_weight_gradient() {
        // drop the contribution of the first tap of every filter
        let broken =
            |l: &mut Conv2d<f64>, dy: &Tensor<f64>, c: &StepCtx, k: &Cache, s: &mut State<f64>| {
                let r = l.backward(dy, c, k, s);
                for o in 0..l.spec().out_ch {
                    l.weight.grad[[o, 0, 0, 0].as_ref()] = 0.0;
                }
                r
            };
        let mut rng = Rng::new(3);
        let mut l = crate::gradcheck::Tampered {
            inner: Conv2d::new("c", ConvSpec::new(2, 2, 3).padding(1), false, &mut rng),
            backward: broken,
        };
        let x = rand_input(&mut rng, &[2, 2, 4, 4]);
        let opts = GradCheckOpts::default();
        let rep = check_step(
            &mut l,
            &x,
            &StepCtx::train(0, 1, GradMode::Online),
            &State::Empty,
            &opts,
        )
        .unwrap();
        assert!(!rep.passed(&opts));
        assert!(
            rep.failures.iter().all(|f| f.contains("weight")),
            "{:?}",
            rep.failures
        );
    }

    #[test]
    fn bad_shapes_name_the_layer() {
        let mut rng = Rng::new(3);
        let mut l = Conv2d::<f32>::new("stem", ConvSpec::new(3, 4, 3), true, &mut rng);
        for shape in [
            vec![2, 2, 8, 8],
            vec![2, 3, 2, 8],
            vec![3, 8, 8],
            vec![0, 3, 8, 8],
        ] {
            let x = zeros::<f32>(&shape);
            let e = l
                .forward(&x, &StepCtx::eval(0, 1), &mut State::Empty, None)
                .unwrap_err();
            assert!(matches!(e, Error::Shape { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("stem") && msg.contains(&format!("{shape:?}")),
                "{msg}"
            );
        }
        // a wrong output gradient is a shape error as well
        let x = zeros::<f32>(&[1, 3, 5, 5]);
        let mut cache = Cache::new();
        let ctx = StepCtx::train(0, 1, GradMode::Online);
        l.forward(&x, &ctx, &mut State::Empty, Some(&mut cache))
            .unwrap();
        let e = l
            .backward(&zeros(&[1, 4, 5, 5]), &ctx, &cache, &mut State::Empty)
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("stem"));
    }

    #[test]
    fn f32_and_f64_forward_agree() {
        let spec = ConvSpec::new(8, 16, 3).padding(1).stride(2);
        let l64 = Conv2d::<f64>::new("c", spec, true, &mut Rng::new(5));
        let mut l32 = Conv2d::<f32>::new("c", spec, true, &mut Rng::new(5));
        let mut l64 = l64;
        let mut rng = Rng::new(6);
        let x64 = rand_input(&mut rng, &[3, 8, 9, 9]);
        let x32 = x64.mapv(|v| v as f32);
        // identical weights: f32 rounding of the f64 ones
        l32.weight.value = l64.weight.value.mapv(|v| v as f32);
        l64.weight.value = l32.weight.value.mapv(|v| v as f64);
        let y64 = l64
            .forward(
                &x64.mapv(|v| v as f32 as f64),
                &StepCtx::eval(0, 1),
                &mut State::Empty,
                None,
            )
            .unwrap();
        let y32 = l32
            .forward(&x32, &StepCtx::eval(0, 1), &mut State::Empty, None)
            .unwrap();
        crate::gradcheck::assert_f32_matches_f64(&y64, &y32, 1e-5);
    }

    #[test]
    fn stem_without_input_grad_keeps_parameter_gradients_and_returns_zeros() {
        let spec = ConvSpec::new(2, 3, 3).padding(1);
        let mut rng = Rng::new(12);
        let mut a = Conv2d::<f64>::new("stem", spec, true, &mut Rng::new(4));
        let mut b = Conv2d::<f64>::new("stem", spec, true, &mut Rng::new(4));
        b.set_input_grad(false);
        let x = rand_input(&mut rng, &[3, 2, 5, 6]);
        let ctx = StepCtx::train(0, 1, GradMode::Online);
        let (mut ca, mut cb) = (Cache::new(), Cache::new());
        let y = a
            .forward(&x, &ctx, &mut State::Empty, Some(&mut ca))
            .unwrap();
        b.forward(&x, &ctx, &mut State::Empty, Some(&mut cb))
            .unwrap();
        let dy = y.mapv(|v| v.cos());
        let dxa = a.backward(&dy, &ctx, &ca, &mut State::Empty).unwrap();
        let dxb = b.backward(&dy, &ctx, &cb, &mut State::Empty).unwrap();
        assert!(dxa.iter().any(|&v| v != 0.0));
        assert!(dxb.iter().all(|&v| v == 0.0) && dxb.shape() == x.shape());
        assert_eq!(a.weight.grad, b.weight.grad);
        assert_eq!(a.bias.unwrap().grad, b.bias.unwrap().grad);
    }

    #[test]
    fn kaiming_init_has_fan_in_variance_and_cache_holds_only_the_input() {
        let spec = ConvSpec::new(16, 64, 3);
        let mut l = Conv2d::<f64>::new("c", spec, false, &mut Rng::new(1));
        let n = l.weight.value.len() as f64;
        let var = l.weight.value.iter().map(|v| v * v).sum::<f64>() / n;
        let want = 2.0 / 144.0;
        assert!((var / want - 1.0).abs() < 0.05, "{var} vs {want}");
        let x = zeros::<f64>(&[2, 16, 6, 6]);
        let mut cache = Cache::new();
        l.forward(
            &x,
            &StepCtx::train(0, 1, GradMode::Online),
            &mut State::Empty,
            Some(&mut cache),
        )
        .unwrap();
        assert_eq!(cache.bytes(), x.len() * 8);
    }
}
