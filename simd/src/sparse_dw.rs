//! Weight gradient of a stride-1 convolution from sparse inputs ("sparse-input dW").
//!
//! For inputs `x` (`N x C x H x W`) and output gradients `G` (`N x O x OH x OW`) of a stride-1
//! convolution with a `k x k` kernel and zero padding `p ≤ k − 1`:
//!
//! ```text
//! dW[o][c][i][j] = Σ_n Σ_{y,x} x[n][c][y][x] · G[n][o][y + p − i][x + p − j]   (G outside the map = 0)
//! ```
//!
//! The sum visits only the non-zero `x` (spikes are mostly zero), so it does `density ×` the
//! multiply-adds of the im2col GEMM `dW = G · colᵀ`, and it needs no im2col buffer.
//!
//! # How
//! Per image, `G_n` is transposed into pixel-major rows of `O` values (padded to a multiple of 16
//! lanes) with a zero border of `k − 1 − p` pixels, so every tap of every input pixel reads a whole
//! row, with no range checks: `row(y, x, i, j) = (y + k − 1 − i)·(W + k − 1) + (x + k − 1 − j)`.
//! Then, per stripe of input rows (sized so the rows of `G` it reads stay in L1) and per input
//! channel `c`, the non-zero entries are listed (row offset, value) once; for each tap and each
//! block of up to 64 output channels the accumulators `dwt[c][tap][block]` are loaded into
//! registers, receive `fma(x, G row, acc)` for the entries in order, and are stored back. That is
//! the accumulation routine of the sparse forward (`Accum::f32_acc`, one image) with fused
//! multiply-adds at every level, so every level adds the same terms in the same order and the
//! results are bit-identical across levels.
//!
//! The images are split into `rayon::current_num_threads()` contiguous chunks (each owns its
//! accumulators, added in chunk order afterwards): deterministic for a given thread count.
//!
//! # Input gradient at the non-zero inputs ("sparse dX")
//! Optionally, with the weights laid out as `wt[c][tap][o]` (`C x k² x op`), the same pass gives
//! the input gradient at the listed (non-zero) inputs only:
//!
//! ```text
//! dx[n][c][y][x] = Σ_tap Σ_o wt[c][tap][o] · Gᵀ[row(y, x, tap)][o]     where x[n][c][y][x] ≠ 0
//! dx[n][c][y][x] = 0                                                  elsewhere
//! ```
//!
//! That is all a consumer needs when it ignores the gradient where its output was zero (an EM-PF
//! neuron's `ds/dm = H(m − θ)` is zero exactly where `s = 0`). Per channel, the entries are taken
//! eight at a time: each of the eight dot products keeps one 16-lane accumulator (`fma` over the
//! taps and 16-lane blocks of `O` in order; two 8-lane registers at AVX2), its two halves are
//! added lane by lane, then the lanes are summed by the fixed tree
//! `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`: the same at every level.

use crate::sparse::{Accum, Portable};

/// One chunk of images of a sparse-input dW.
pub(crate) struct DwTask<'a> {
    /// Inputs of the chunk, `ns x C x H x W`.
    pub x: &'a [f32],
    /// Output gradients of the chunk, `ns x O x OH x OW`.
    pub g: &'a [f32],
    pub ns: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub k: usize,
    pub pad: usize,
    /// For the input gradient: the weights `wt[c][tap][o]` (`C x k² x op`, zero lanes `o ≥ O`).
    pub wt: Option<&'a [f32]>,
}

impl DwTask<'_> {
    /// Output channels padded to whole 16-lane blocks (the row length of the transposed `G`).
    pub fn op(&self) -> usize {
        self.o.div_ceil(16) * 16
    }
    /// Output map `OH x OW`.
    pub fn out_hw(&self) -> (usize, usize) {
        (
            self.h + 2 * self.pad + 1 - self.k,
            self.w + 2 * self.pad + 1 - self.k,
        )
    }
    /// Transposed, bordered map `(H + k − 1) x (W + k − 1)`.
    pub fn padded_hw(&self) -> (usize, usize) {
        (self.h + self.k - 1, self.w + self.k - 1)
    }
}

/// Buffers of one chunk (reused across its images).
#[derive(Default)]
pub(crate) struct DwScratch {
    /// `G_n` transposed: `(H + k − 1)·(W + k − 1)` rows of `op` values, zero border.
    gt: Vec<f32>,
    /// Row offsets (in values) of the listed non-zero inputs.
    idx: Vec<u32>,
    /// Their values.
    val: Vec<f32>,
    /// Where the entries of input row `(c, y)` start (`C·H + 1` offsets).
    starts: Vec<usize>,
    /// Positions (`y·W + x`) of the listed entries (only for the input gradient).
    pos: Vec<u32>,
}

/// The sparse-input dW of one ISA level over one chunk: adds into `dwt` (`C x k² x op`,
/// channel-major, output channel fastest); with `t.wt`, also writes the input gradient at the
/// non-zero inputs into `dx` (`ns x C x H x W`, zeros on entry, which stay at the zero inputs).
pub(crate) type DwFn = fn(&DwTask<'_>, &mut DwScratch, &mut [f32], &mut [f32]);

/// Bytes of transposed `G` rows one stripe of input rows reads. With a 32 KiB L1 data cache
/// (Zen 3), 16 KiB: at spike densities above 0.2 the L1 hits outweigh the longer entry lists of
/// larger stripes (48 and 96 KiB were up to 20 % and 50 % slower at a density of 0.4, a few
/// percent faster at 0.1). With a larger L1 (48 KiB on Zen 5), 5/6 of it: `mnist-cnn` online
/// training (`empf bench train --steps 4 --modes online --batches 16 --data bundled`, two rounds)
/// measured 371/399 images/s at 16 KiB, 377/401 at 24, 379–413 at 32, 417/417 at 40, 405/413 at
/// 48, 402/411 at 64 and 389/387 at 96 KiB.
fn stripe_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| match l1d_bytes() {
        Some(l1) if l1 > 32 << 10 => l1 * 5 / 6,
        _ => 16 << 10,
    })
}

/// The L1 data cache of CPU 0, from Linux's sysfs (`None` elsewhere or when unreadable).
fn l1d_bytes() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..8).find_map(|i| {
        let read = |f: &str| std::fs::read_to_string(dir.join(format!("index{i}/{f}"))).ok();
        if read("level")?.trim() != "1" || read("type")?.trim() != "Data" {
            return None;
        }
        let size = read("size")?;
        let size = size.trim();
        let (num, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
        let n: usize = num.parse().ok()?;
        match unit {
            "K" => Some(n << 10),
            "M" => Some(n << 20),
            _ => None,
        }
    })
}

/// The portable level (scalar; NEON on aarch64, where `mul_add` is one instruction).
pub(crate) fn dw_generic(t: &DwTask<'_>, sc: &mut DwScratch, dwt: &mut [f32], dx: &mut [f32]) {
    dw_run(Portable::<true>, t, sc, dwt, dx)
}

/// Lanes of one dot-product accumulator, summed by the tree every level uses.
#[inline(always)]
pub(crate) fn lane_sum(l: &[f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// The portable eight dot products of the sparse dX: `out[j] = Σ_tap Σ_o w[tap·op + o] ·
/// g[rows[j] + goff[tap] + o]` (`op` a multiple of 16), one 16-lane `fma` accumulator per entry
/// over the taps and 16-lane blocks in order, its halves added lane by lane, then the 8 lanes
/// summed by [`lane_sum`].
#[inline(always)]
pub(crate) fn dot8_portable(
    w: &[f32],
    g: &[f32],
    rows: &[usize; 8],
    goff: &[usize],
    op: usize,
) -> [f32; 8] {
    let mut acc = [[0f32; 16]; 8];
    for (tap, &off) in goff.iter().enumerate() {
        let wr = &w[tap * op..][..op];
        for ob in (0..op).step_by(16) {
            let wv: &[f32; 16] = wr[ob..ob + 16].try_into().expect("16 lanes");
            for (a, &r) in acc.iter_mut().zip(rows) {
                let gv: &[f32; 16] = g[r + off + ob..][..16].try_into().expect("16 lanes");
                for l in 0..16 {
                    a[l] = wv[l].mul_add(gv[l], a[l]);
                }
            }
        }
    }
    acc.map(|a| lane_sum(&std::array::from_fn(|l| a[l] + a[l + 8])))
}

/// The driver every level shares; `acc` is the level's accumulation.
#[inline(always)]
pub(crate) fn dw_run<K: Accum>(
    acc: K,
    t: &DwTask<'_>,
    sc: &mut DwScratch,
    dwt: &mut [f32],
    dx: &mut [f32],
) {
    let (k, c, h, w, o) = (t.k, t.c, t.h, t.w, t.o);
    let (oh, ow) = t.out_hw();
    let (hp, wp) = t.padded_hw();
    let (op, taps, m) = (t.op(), k * k, k - 1 - t.pad);
    assert_eq!(dwt.len(), c * taps * op, "dw accumulators");
    let xs = c * h * w;
    if let Some(wt) = t.wt {
        assert_eq!(wt.len(), c * taps * op, "dx weights");
        assert_eq!(dx.len(), t.ns * xs, "dx");
    }
    // the border and the padding lanes stay zero: only the interior rows' first `o` lanes are
    // rewritten per image
    sc.gt.clear();
    sc.gt.resize(hp * wp * op, 0.0);
    let stripe = (stripe_bytes() / (wp * op * 4).max(1))
        .saturating_sub(k - 1)
        .clamp(1, h.max(1));
    let gs = o * oh * ow;
    // row offsets of the taps in the transposed G
    let goff: Vec<usize> = (0..taps)
        .map(|tap| ((k - 1 - tap / k) * wp + (k - 1 - tap % k)) * op)
        .collect();
    for i in 0..t.ns {
        let gi = &t.g[i * gs..(i + 1) * gs];
        // 8 x 8 blocks, 8 channel planes at a time (8 sequential streams for the prefetchers);
        // a partial last block overlaps the one before (copies: writing twice is harmless)
        let row0 = |oy: usize| ((oy + m) * wp + m) * op;
        if o >= 8 && ow >= 8 {
            let blocks = |n: usize| {
                (0..n - 7)
                    .step_by(8)
                    .chain((!n.is_multiple_of(8)).then_some(n - 8))
            };
            for oc0 in blocks(o) {
                for oy in 0..oh {
                    let rows = &mut sc.gt[row0(oy)..][..ow * op];
                    for ox0 in blocks(ow) {
                        let src = &gi[(oc0 * oh + oy) * ow + ox0..];
                        acc.transpose8(src, oh * ow, &mut rows[ox0 * op + oc0..], op);
                    }
                }
            }
        } else {
            for oc in 0..o {
                for oy in 0..oh {
                    let src = &gi[(oc * oh + oy) * ow..][..ow];
                    let rows = &mut sc.gt[row0(oy)..][..ow * op];
                    for (row, &v) in rows.chunks_exact_mut(op).zip(src) {
                        row[oc] = v;
                    }
                }
            }
        }
        // list the non-zero inputs of the image in memory order (branch-free: every value is
        // written, the count advances on non-zeros); rows (c, y) start at `starts[c·H + y]`
        let xi = &t.x[i * xs..(i + 1) * xs];
        sc.idx.resize(xs, 0);
        sc.val.resize(xs, 0.0);
        sc.starts.clear();
        let mut len = 0;
        if t.wt.is_some() {
            sc.pos.resize(xs, 0);
        }
        for (cy, r) in xi.chunks_exact(w).enumerate() {
            sc.starts.push(len);
            let y = cy % h;
            if t.wt.is_some() {
                for (x, &v) in r.iter().enumerate() {
                    sc.idx[len] = ((y * wp + x) * op) as u32;
                    sc.val[len] = v;
                    sc.pos[len] = (y * w + x) as u32;
                    len += usize::from(v != 0.0);
                }
            } else {
                for (x, &v) in r.iter().enumerate() {
                    sc.idx[len] = ((y * wp + x) * op) as u32;
                    sc.val[len] = v;
                    len += usize::from(v != 0.0);
                }
            }
        }
        sc.starts.push(len);
        for y0 in (0..h).step_by(stripe) {
            let y1 = (y0 + stripe).min(h);
            for ci in 0..c {
                let (e0, e1) = (sc.starts[ci * h + y0], sc.starts[ci * h + y1]);
                if e0 == e1 {
                    continue;
                }
                let (idx, val) = (&sc.idx[e0..e1], &sc.val[e0..e1]);
                for tap in 0..taps {
                    let g = &sc.gt[goff[tap]..];
                    let a = &mut dwt[(ci * taps + tap) * op..][..op];
                    let mut ob = 0;
                    while ob < op {
                        let (g, a) = (&g[ob..], &mut a[ob..]);
                        ob += match op - ob {
                            r if r >= 128 && K::F32_LANES >= 128 => {
                                acc.f32_acc::<1, 128>(g, idx, val, a);
                                128
                            }
                            r if r >= 64 => {
                                acc.f32_acc::<1, 64>(g, idx, val, a);
                                64
                            }
                            r if r >= 32 => {
                                acc.f32_acc::<1, 32>(g, idx, val, a);
                                32
                            }
                            r if r >= 16 => {
                                acc.f32_acc::<1, 16>(g, idx, val, a);
                                16
                            }
                            _ => {
                                acc.f32_acc::<1, 8>(g, idx, val, a);
                                8
                            }
                        };
                    }
                }
            }
        }
        if let Some(wt) = t.wt {
            let dxi = &mut dx[i * xs..(i + 1) * xs];
            for (ci, dxc) in dxi.chunks_exact_mut(h * w).enumerate() {
                let (e0, e1) = (sc.starts[ci * h], sc.starts[ci * h + h]);
                let wc = &wt[ci * taps * op..][..taps * op];
                for b0 in (e0..e1).step_by(8) {
                    let nb = (e1 - b0).min(8);
                    // a short last block repeats its last entry (its sums are dropped)
                    let rows: [usize; 8] =
                        std::array::from_fn(|j| sc.idx[b0 + j.min(nb - 1)] as usize);
                    let d = acc.f32_dot8(wc, &sc.gt, &rows, &goff, op);
                    for (j, &v) in d[..nb].iter().enumerate() {
                        dxc[sc.pos[b0 + j] as usize] = v;
                    }
                }
            }
        }
    }
}
