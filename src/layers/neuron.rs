//! Spiking neurons (EMPF.md §1, §3, §5, §6): the EM-PF neuron in its three versions, its folded
//! inference form, and the LIF baseline.
//!
//! All neurons take `N x F` or `N x C x H x W` inputs (the input current `I[t]`), return the spike
//! tensor of the same shape, and carry the residual potential `v[t]` in their [`State`]
//! (`State::Empty` = `v[0] = 0`). Per-step parameters are one scalar per layer per time-step, so
//! the constructors take `T` and `StepCtx::t` indexes them.
//!
//! Gradient modes (see `layers` module docs): in [`GradMode::Online`] the charging uses
//! `sg(v[t−1])`, so the backward covers the step alone (it still yields `dL/dλ[t] = Σ dL/dm·v[t−1]`,
//! `v[t−1]` being a constant input of the step); in [`GradMode::Bptt`] `dstate` brings `dL/dv[t]` in
//! and takes `dL/dv[t−1] = λ[t]·dL/dm[t]` out.

use crate::error::{Error, Result};
use crate::layers::batchnorm::{BatchNorm, BnCache, BnGeom};
use crate::layers::{Cache, CacheBytes, GradMode, Layer, Param, ParamKind, State, StepCtx};
use crate::tensor::{Real, Tensor, as_slice, from_vec};
use rayon::prelude::*;

/// `1 / (1 + e^{−x})`.
#[inline]
pub fn sigmoid<R: Real>(x: R) -> R {
    R::one() / (R::one() + (-x).exp())
}

/// A packed bit per element (`H(m − θ)`, "fired"): what most neuron backwards need.
#[derive(Clone, Debug, Default)]
pub struct BitMask {
    words: Vec<u64>,
    len: usize,
}

impl BitMask {
    /// Clear to `len` zero bits (reusing the allocation).
    pub fn reset(&mut self, len: usize) {
        self.words.clear();
        self.words.resize(len.div_ceil(64), 0);
        self.len = len;
    }
    /// Set bit `i`.
    #[inline]
    pub fn set(&mut self, i: usize) {
        self.words[i >> 6] |= 1u64 << (i & 63);
    }
    /// Bit `i`.
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        (self.words[i >> 6] >> (i & 63)) & 1 == 1
    }
    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether there are no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CacheBytes for BitMask {
    fn cache_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

fn check_neuron_shape(layer: &str, shape: &[usize]) -> Result<()> {
    if matches!(shape.len(), 2 | 4) && shape.iter().all(|&d| d > 0) {
        Ok(())
    } else {
        Err(Error::shape(
            layer,
            "expected N x F or N x C x H x W",
            shape,
        ))
    }
}

fn step_index(layer: &str, ctx: &StepCtx, steps: usize) -> Result<usize> {
    if ctx.t < steps {
        Ok(ctx.t)
    } else {
        Err(Error::Config(format!(
            "layer `{layer}`: time-step {} out of range (built for T = {steps})",
            ctx.t
        )))
    }
}

/// Take `v[t−1]` out of the state (None = zero), checking it is shaped like the input.
fn take_prev<R: Real>(
    layer: &str,
    state: &mut State<R>,
    shape: &[usize],
) -> Result<Option<Tensor<R>>> {
    match std::mem::take(state) {
        State::Empty => Ok(None),
        State::Tensor(v) if v.shape() == shape => Ok(Some(crate::tensor::standard(v))),
        State::Tensor(v) => Err(Error::shape(
            layer,
            format!("residual potential shaped like the input {shape:?}"),
            v.shape(),
        )),
        State::Children(_) => Err(Error::shape(
            layer,
            "a single residual-potential tensor, got a composite state",
            shape,
        )),
    }
}

/// `dL/dv[t]` from `dstate` in BPTT mode (None = zero), shape-checked.
fn take_dv<R: Real>(
    layer: &str,
    ctx: &StepCtx,
    dstate: &mut State<R>,
    shape: &[usize],
) -> Result<Option<Tensor<R>>> {
    if ctx.grad == GradMode::Bptt {
        take_prev(layer, dstate, shape)
    } else {
        *dstate = State::Empty;
        Ok(None)
    }
}

fn param_t<R: Real>(p: &Param<R>, t: usize) -> R {
    p.value.as_slice().expect("standard")[t]
}

fn add_grad<R: Real>(p: &mut Param<R>, t: usize, g: f64) {
    p.grad.as_slice_mut().expect("standard")[t] += R::of(g);
}

fn step_param<R: Real>(name: &str, suffix: &str, steps: usize) -> Param<R> {
    Param::new(
        format!("{name}.{suffix}"),
        ParamKind::Neuron,
        from_vec(&[steps], vec![R::zero(); steps]),
    )
}

/// Elements per parallel work item: a multiple of 64 so that each item owns whole mask words. The
/// split is fixed, so reductions (per-item partial sums added in item order) do not depend on the
/// number of threads.
const PAR_CHUNK: usize = 1 << 14;

/// The EM-PF fire-and-reset kernel. On entry `s` holds `m`; on exit `s = ReLU(m − θ)`,
/// `v = min(m, θ)` and the mask is `H(m − θ)` (strict `m > θ`). Branch-free, in parallel over
/// [`PAR_CHUNK`] items.
fn fire<R: Real>(th: R, s: &mut [R], v: &mut [R], mask: &mut BitMask) {
    mask.reset(s.len());
    s.par_chunks_mut(PAR_CHUNK)
        .zip(v.par_chunks_mut(PAR_CHUNK))
        .zip(mask.words.par_chunks_mut(PAR_CHUNK / 64))
        .for_each(|((sc, vc), mc)| {
            for ((sw, vw), word) in sc.chunks_mut(64).zip(vc.chunks_mut(64)).zip(mc) {
                let mut bits = 0u64;
                for (k, (o, vo)) in sw.iter_mut().zip(vw.iter_mut()).enumerate() {
                    let m = *o;
                    bits |= u64::from(m > th) << k;
                    *vo = m.min(th);
                    *o = (m - th).max(R::zero());
                }
                *word = bits;
            }
        });
}

/// Where [`charge_fire`] takes `v[t−1]` from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChargeFrom {
    /// No `v[t−1]` (`v[0] = 0`): `m = I`.
    Zero,
    /// `v[t−1]` is in the `v` buffer and is overwritten by `v[t]`.
    InPlace,
    /// `v[t−1]` is the `prev` slice (kept), `v[t]` goes to `v`.
    Separate,
}

/// The whole Version I forward in one pass over the data: charge `m = λ·p + I` (`m = I` without
/// `p = v[t−1]`), then fire as [`fire`] (`s = ReLU(m − θ)`, `v = min(m, θ)`, mask `H(m − θ)`), and
/// when `fired` is given gather `p` at the fired positions as [`FiredValues::gather`] does. Same
/// arithmetic, element by element, as the separate passes (so bit-identical results); in parallel
/// over [`PAR_CHUNK`] items.
#[allow(clippy::too_many_arguments)]
fn charge_fire<R: Real>(
    lam: R,
    th: R,
    x: &[R],
    prev: Option<&[R]>,
    from: ChargeFrom,
    v: &mut [R],
    s: &mut [R],
    mask: &mut BitMask,
    fired: Option<&mut FiredValues<R>>,
) {
    let n = x.len();
    debug_assert!(v.len() == n && s.len() == n);
    debug_assert_eq!(from == ChargeFrom::Separate, prev.is_some());
    mask.reset(n);
    let gather = fired.is_some() && from == ChargeFrom::InPlace;
    let items = n.div_ceil(PAR_CHUNK);
    let mut none = FiredValues::default();
    let fv = match fired {
        Some(f) => f,
        None => &mut none,
    };
    fv.parts.resize_with(items, Default::default);
    fv.parts.truncate(items);
    let common = fv.common;
    s.par_chunks_mut(PAR_CHUNK)
        .zip(v.par_chunks_mut(PAR_CHUNK))
        .zip(mask.words.par_chunks_mut(PAR_CHUNK / 64))
        .zip(fv.parts.par_iter_mut())
        .enumerate()
        .for_each(|(k, (((sc, vc), mc), part))| {
            let lo = k * PAR_CHUNK;
            let xc = &x[lo..lo + sc.len()];
            let pc = prev.map(|p| &p[lo..lo + sc.len()]);
            empf_simd::vectorized(ChargeFireItem {
                lam,
                th,
                xc,
                pc,
                from,
                gather,
                common,
                s: sc,
                v: vc,
                mask: mc,
                part,
            })
        });
}

/// One [`PAR_CHUNK`] item of [`charge_fire`], compiled for the host's vector extension.
struct ChargeFireItem<'a, R> {
    lam: R,
    th: R,
    xc: &'a [R],
    pc: Option<&'a [R]>,
    from: ChargeFrom,
    gather: bool,
    common: Option<R>,
    /// Outputs: spikes, potentials, firing-mask words, fired values.
    s: &'a mut [R],
    v: &'a mut [R],
    mask: &'a mut [u64],
    part: &'a mut FiredPart<R>,
}

impl<R: Real> empf_simd::VectorWork for ChargeFireItem<'_, R> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let ChargeFireItem {
            lam,
            th,
            xc,
            pc,
            from,
            gather,
            common,
            s: sc,
            v: vc,
            mask: mc,
            part,
        } = self;
        let FiredPart { eq, vals: out } = part;
        out.clear();
        eq.clear();
        if gather {
            eq.resize(mc.len(), 0);
            if out.capacity() == 0 {
                // one allocation (trimmed below), not a doubling series, on the first step
                out.reserve_exact(sc.len());
            }
        }
        let mut pbuf = [R::zero(); 64];
        for (w, word) in mc.iter_mut().enumerate() {
            let r = w * 64..(w * 64 + 64).min(sc.len());
            let (sw, vw, xw) = (&mut sc[r.clone()], &mut vc[r.clone()], &xc[r.clone()]);
            let mut bits = 0u64;
            match (from, pc) {
                (ChargeFrom::Separate, Some(pc)) => {
                    let pw = &pc[r];
                    for (j, (((o, vo), &i), &p)) in
                        sw.iter_mut().zip(vw.iter_mut()).zip(xw).zip(pw).enumerate()
                    {
                        let m = lam * p + i;
                        bits |= u64::from(m > th) << j;
                        *vo = m.min(th);
                        *o = (m - th).max(R::zero());
                    }
                }
                (ChargeFrom::InPlace, _) => {
                    for (j, ((o, vo), &i)) in sw.iter_mut().zip(vw.iter_mut()).zip(xw).enumerate() {
                        let p = *vo;
                        pbuf[j] = p;
                        let m = lam * p + i;
                        bits |= u64::from(m > th) << j;
                        *vo = m.min(th);
                        *o = (m - th).max(R::zero());
                    }
                    if gather {
                        eq[w] = gather_word(bits, &pbuf, common, out);
                    }
                }
                _ => {
                    for (j, ((o, vo), &m)) in sw.iter_mut().zip(vw.iter_mut()).zip(xw).enumerate() {
                        bits |= u64::from(m > th) << j;
                        *vo = m.min(th);
                        *o = (m - th).max(R::zero());
                    }
                }
            }
            *word = bits;
        }
        // bound the slack a high-firing step leaves behind (memory must not creep with T)
        if out.capacity() > 2 * out.len() + 1024 {
            out.shrink_to(out.len() + out.len() / 4);
        }
    }
}

/// The fixed summation order of the per-word sums below: 8 interleaved partial sums (value `j`
/// into lane `j mod 8`), added as `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`. Eight
/// independent chains (and vector lanes) instead of one serial chain of float adds, whose latency
/// bounded the neuron backward.
#[inline(always)]
fn tree8<R: Real>(l: [R; 8]) -> R {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// `o[j] = y[j]` where bit `j` of `bits` is set, `0` elsewhere (a word of at most 64 values);
/// returns `Σ o` in the order of [`tree8`].
#[inline(always)]
fn mask_word<R: Real>(bits: u64, y: &[R], o: &mut [R]) -> R {
    let mut l = [R::zero(); 8];
    for (c, (oc, yc)) in o.chunks_mut(8).zip(y.chunks(8)).enumerate() {
        let b = bits >> (8 * c);
        for (k, (o, &y)) in oc.iter_mut().zip(yc).enumerate() {
            *o = if (b >> k) & 1 == 1 { y } else { R::zero() };
            l[k] += *o;
        }
    }
    tree8(l)
}

/// `Σ a[j]·b[j]` over a word (at most 64 values) in the order of [`tree8`].
#[inline(always)]
fn dot_word<R: Real>(a: &[R], b: &[R]) -> R {
    let mut l = [R::zero(); 8];
    for (ac, bc) in a.chunks(8).zip(b.chunks(8)) {
        for (k, (&x, &y)) in ac.iter().zip(bc).enumerate() {
            l[k] += x * y;
        }
    }
    tree8(l)
}

/// `out[i] = f(a[i], b[i])` in parallel over [`PAR_CHUNK`] items.
fn par_zip_map<R: Real>(out: &mut [R], a: &[R], b: &[R], f: impl Fn(R, R) -> R + Sync) {
    out.par_chunks_mut(PAR_CHUNK)
        .zip(a.par_chunks(PAR_CHUNK))
        .zip(b.par_chunks(PAR_CHUNK))
        .for_each(|((oc, ac), bc)| {
            for ((o, &x), &y) in oc.iter_mut().zip(ac).zip(bc) {
                *o = f(x, y);
            }
        });
}

/// Backward of [`fire`]: `dm = dy·H + dv·(1 − H)` into `dm`; returns `Σ (dv − dy)·H` (dL/dθ) and,
/// when `p` is given, `Σ dm·p` (dL/dλ with `p = v[t−1]`). Per-item partial sums added in order.
fn fire_back<R: Real>(
    dy: &[R],
    dv: Option<&[R]>,
    mask: &BitMask,
    p: Option<&[R]>,
    dm: &mut [R],
) -> (f64, f64) {
    let parts: Vec<(f64, f64)> = dm
        .par_chunks_mut(PAR_CHUNK)
        .zip(mask.words.par_chunks(PAR_CHUNK / 64))
        .enumerate()
        .map(|(k, (dc, mc))| {
            let base = k * PAR_CHUNK;
            let r = base..base + dc.len();
            empf_simd::vectorized(FireBackItem {
                dyc: &dy[r.clone()],
                dvc: dv.map(|d| &d[r.clone()]),
                pc: p.map(|p| &p[r]),
                mc,
                dc,
            })
        })
        .collect();
    parts
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y))
}

/// One [`PAR_CHUNK`] item of [`fire_back`], compiled for the host's vector extension.
struct FireBackItem<'a, R> {
    dyc: &'a [R],
    dvc: Option<&'a [R]>,
    pc: Option<&'a [R]>,
    mc: &'a [u64],
    dc: &'a mut [R],
}

impl<R: Real> empf_simd::VectorWork for FireBackItem<'_, R> {
    type Output = (f64, f64);
    #[inline(always)]
    fn run(self) -> (f64, f64) {
        let FireBackItem {
            dyc,
            dvc,
            pc,
            mc,
            dc,
        } = self;
        let (mut dth, mut dlam) = (0.0f64, 0.0f64);
        for (w, (dw, &bits)) in dc.chunks_mut(64).zip(mc).enumerate() {
            let lo = w * 64;
            let dyw = &dyc[lo..lo + dw.len()];
            let wsum = match dvc {
                Some(dv) => {
                    let dvw = &dv[lo..lo + dw.len()];
                    let mut l = [R::zero(); 8];
                    for (j, ((o, &y), &d)) in dw.iter_mut().zip(dyw).zip(dvw).enumerate() {
                        let h = (bits >> j) & 1 == 1;
                        *o = if h { y } else { d };
                        l[j % 8] += if h { d - y } else { R::zero() };
                    }
                    tree8(l)
                }
                None => -mask_word(bits, dyw, dw),
            };
            dth += wsum.f64();
            if let Some(p) = pc {
                dlam += dot_word(dw, &p[lo..lo + dw.len()]).f64();
            }
        }
        (dth, dlam)
    }
}

/// `p[i]` at the fired positions only (`H(m − θ) = 1`), in index order, one list per
/// [`PAR_CHUNK`] item. Online training needs `v[t−1]` only where a neuron fired (`dm = dy·H`), so
/// this keeps a fraction (the firing rate) of the full tensor: the cache no longer holds a copy of
/// the state, and online memory stays that of `T = 1`.
///
/// A neuron that fired at `t − 1` (or charged exactly to θ) was reset to `v[t−1] = θ[t−1]`
/// exactly (`min(m, θ)`), and most neurons that fire at `t` fired at `t − 1`. So a fired value
/// equal to one `common` scalar (the caller passes `θ[t−1]`) is stored as one bit (`eq`), and
/// only the others as values. Exact whatever `common` is: it only decides what is compressed.
#[derive(Clone, Debug, Default)]
pub struct FiredValues<R> {
    parts: Vec<FiredPart<R>>,
    common: Option<R>,
}

/// The fired values of one [`PAR_CHUNK`] item.
#[derive(Clone, Debug, Default)]
struct FiredPart<R> {
    /// Bit `j` of word `w`: fired at `64·w + j` with the value `common` (not in `vals`).
    eq: Vec<u64>,
    /// The other fired values, in index order.
    vals: Vec<R>,
}

impl<R: Real> FiredValues<R> {
    /// Gather `p[i]` where `m[i] > th` (the firing condition of [`fire`], taken before it runs),
    /// values equal to `common` as bits, reusing the allocations.
    pub fn gather(&mut self, p: &[R], m: &[R], th: R, common: Option<R>) {
        let items = p.len().div_ceil(PAR_CHUNK);
        self.parts.resize_with(items, Default::default);
        self.parts.truncate(items);
        self.common = common;
        self.parts
            .par_iter_mut()
            .zip(p.par_chunks(PAR_CHUNK))
            .zip(m.par_chunks(PAR_CHUNK))
            .for_each(|((part, pc), mc)| {
                part.vals.clear();
                part.eq.clear();
                part.eq.resize(pc.len().div_ceil(64), 0);
                for (i, (&p, &m)) in pc.iter().zip(mc).enumerate() {
                    if m > th {
                        if Some(p) == common {
                            part.eq[i / 64] |= 1 << (i % 64);
                        } else {
                            part.vals.push(p);
                        }
                    }
                }
            });
    }
    /// The values not merged into `common`, in index order.
    #[cfg(test)]
    fn values(&self) -> Vec<R> {
        self.parts
            .iter()
            .flat_map(|p| p.vals.iter().copied())
            .collect()
    }
    /// The bits of the values merged into `common`, all items' words in order.
    #[cfg(test)]
    fn eq_words(&self) -> Vec<u64> {
        self.parts
            .iter()
            .flat_map(|p| p.eq.iter().copied())
            .collect()
    }
}

/// Push `pbuf[j]` for each set bit `j` of `bits` to `out`, except values equal to `common`, whose
/// bits are returned instead (see [`FiredValues`]).
#[inline]
fn gather_word<R: Real>(bits: u64, pbuf: &[R; 64], common: Option<R>, out: &mut Vec<R>) -> u64 {
    let (mut b, mut eq) = (bits, 0u64);
    while b != 0 {
        let j = b.trailing_zeros() as usize;
        let p = pbuf[j];
        if Some(p) == common {
            eq |= 1 << j;
        } else {
            out.push(p);
        }
        b &= b - 1;
    }
    eq
}

impl<R> CacheBytes for FiredValues<R> {
    fn cache_bytes(&self) -> usize {
        let p = self.parts.iter();
        p.map(|p| p.vals.len() * std::mem::size_of::<R>() + p.eq.len() * 8)
            .sum()
    }
}

/// Online backward of [`fire`] (`dv = 0`): `dm = dy·H`; returns `Σ −dy·H` (dL/dθ) and
/// `Σ dm·v[t−1]` (dL/dλ) with `v[t−1]` given at the fired positions only ([`FiredValues`]).
/// Equals [`fire_back`] given the full `v[t−1]` bit for bit (the same terms in the same order of
/// [`tree8`]; the terms at non-fired positions are zero in both).
fn fire_back_online<R: Real>(
    dy: &[R],
    mask: &BitMask,
    p: Option<&FiredValues<R>>,
    dm: &mut [R],
) -> (f64, f64) {
    let parts: Vec<(f64, f64)> = dm
        .par_chunks_mut(PAR_CHUNK)
        .zip(dy.par_chunks(PAR_CHUNK))
        .zip(mask.words.par_chunks(PAR_CHUNK / 64))
        .enumerate()
        .map(|(k, ((dc, yc), mc))| {
            empf_simd::vectorized(FireBackOnlineItem {
                dc,
                yc,
                mc,
                p: p.map(|p| (&p.parts[k], p.common.unwrap_or(R::zero()))),
            })
        })
        .collect();
    parts
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y))
}

/// One [`PAR_CHUNK`] item of [`fire_back_online`], compiled for the host's vector extension.
struct FireBackOnlineItem<'a, R> {
    dc: &'a mut [R],
    yc: &'a [R],
    mc: &'a [u64],
    /// The item's fired values and the merged value.
    p: Option<(&'a FiredPart<R>, R)>,
}

impl<R: Real> empf_simd::VectorWork for FireBackOnlineItem<'_, R> {
    type Output = (f64, f64);
    #[inline(always)]
    fn run(self) -> (f64, f64) {
        let FireBackOnlineItem { dc, yc, mc, p } = self;
        let (mut dth, mut dlam) = (0.0f64, 0.0f64);
        let mut pi = p.map(|(part, common)| (part.eq.iter(), part.vals.iter(), common));
        for ((dw, yw), &bits) in dc.chunks_mut(64).zip(yc.chunks(64)).zip(mc) {
            dth -= mask_word(bits, yw, dw).f64();
            if let Some((eqs, vals, common)) = pi.as_mut() {
                let eq = *eqs.next().expect("one eq word per mask word");
                // v[t−1] at the fired positions, 0 elsewhere (where dm is 0): the dot
                // product of `fire_back` over the full v[t−1], term for term
                let mut pv = [R::zero(); 64];
                let mut b = bits;
                while b != 0 {
                    let j = b.trailing_zeros() as usize;
                    pv[j] = if (eq >> j) & 1 == 1 {
                        *common
                    } else {
                        *vals.next().expect("one value per fired neuron")
                    };
                    b &= b - 1;
                }
                dlam += dot_word(dw, &pv[..dw.len()]).f64();
            }
        }
        (dth, dlam)
    }
}

fn check_dy<R: Real>(layer: &str, dy: &Tensor<R>, shape: &[usize]) -> Result<()> {
    crate::layers::check_grad_shape(layer, dy.shape(), shape)
}

// ---------------------------------------------------------------------------------------------
// Version I
// ---------------------------------------------------------------------------------------------

/// EM-PF Version I (EMPF.md §3, Eq. 5): learnable leak and threshold, float spikes.
///
/// ```text
/// λ[t] = sigmoid(a[t]),  θ[t] = sigmoid(b[t])          (a = b = 0 at init)
/// m[t] = λ[t]·sg(v[t−1]) + I[t]
/// s[t] = ReLU(m[t] − θ[t])                               (output)
/// v[t] = m[t] − s[t] = min(m[t], θ[t])                   (state)
/// ```
/// Backward, with `H = H(m − θ)` (strict: `m > θ`), `dy = dL/ds[t]`, `dv = dL/dv[t]` (BPTT only,
/// from `dstate`; 0 online):
/// * `ds/dm = H`, `dv/dm = 1 − H`  ⇒  `dm = dy·H + dv·(1 − H)`; `dL/dI = dm`.
/// * `ds/dθ = −H`, `dv/dθ = H`  ⇒  `dL/dθ[t] = Σ (dv − dy)·H` (the `dv` part is the θ exception of
///   Theorem 4.2: it only exists in BPTT).
/// * `dm/dλ = v[t−1]`  ⇒  `dL/dλ[t] = Σ dm·v[t−1]` (both modes; `v[t−1]` is kept in the cache).
/// * `dm/dv[t−1] = λ`  ⇒  BPTT returns `dL/dv[t−1] = λ·dm` in `dstate`.
/// * chain through the sigmoids: `dL/da = dL/dλ·λ(1 − λ)`, `dL/db = dL/dθ·θ(1 − θ)`.
pub struct EmpfV1<R: Real> {
    name: String,
    /// Time-steps `T` the per-step parameters cover.
    pub steps: usize,
    /// `a[t]`, λ = sigmoid(a), shape `[T]`.
    pub a: Param<R>,
    /// `b[t]`, θ = sigmoid(b), shape `[T]`.
    pub b: Param<R>,
}

/// V1 backward needs which neurons fired and `v[t−1]` (absent at `t = 0`): the whole tensor in
/// BPTT (`dm` is non-zero everywhere there), only its fired entries online ([`FiredValues`]).
#[derive(Default)]
pub struct EmpfV1Cache<R: Real> {
    fired: BitMask,
    v_prev: Option<Tensor<R>>,
    v_prev_fired: Option<FiredValues<R>>,
    shape: Vec<usize>,
}
crate::impl_cache!(EmpfV1Cache<R> { fired, v_prev, v_prev_fired });

impl<R: Real> EmpfV1<R> {
    /// `a = b = 0` (λ = θ = 0.5) for `steps` time-steps.
    pub fn new(name: &str, steps: usize) -> Self {
        EmpfV1 {
            name: name.to_string(),
            steps,
            a: step_param(name, "a", steps),
            b: step_param(name, "b", steps),
        }
    }
    /// `λ[t]`.
    pub fn leak(&self, t: usize) -> R {
        sigmoid(param_t(&self.a, t))
    }
    /// `θ[t]`.
    pub fn threshold(&self, t: usize) -> R {
        sigmoid(param_t(&self.b, t))
    }
}

impl<R: Real> Layer<R> for EmpfV1<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfV1"
    }
    fn describe(&self) -> String {
        format!("EmpfV1(T = {})", self.steps)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_neuron_shape(&self.name, input)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let (lam, th) = (self.leak(t), self.threshold(t));
        let prev = take_prev(&self.name, state, x.shape())?;
        let xs = as_slice(x);
        let mut c = cache.map(|c| c.get_or_default::<EmpfV1Cache<R>>());
        let mut scratch = BitMask::default();
        // BPTT keeps the whole v[t−1]; online keeps it where the neuron fires, and v[t] reuses
        // v[t−1]'s buffer.
        let keep_full = c.is_some() && ctx.grad == GradMode::Bptt;
        let (mut v, prev, from) = match prev {
            None => (vec![R::zero(); xs.len()], None, ChargeFrom::Zero),
            Some(p) if keep_full => (vec![R::zero(); xs.len()], Some(p), ChargeFrom::Separate),
            Some(p) => (p.into_raw_vec_and_offset().0, None, ChargeFrom::InPlace),
        };
        let mut fired = match c.as_mut() {
            Some(c) if from == ChargeFrom::InPlace => c.v_prev_fired.take().unwrap_or_default(),
            Some(c) => {
                c.v_prev_fired = None;
                FiredValues::default()
            }
            None => FiredValues::default(),
        };
        let gather = c.is_some() && from == ChargeFrom::InPlace;
        // fired at t − 1 ⇒ v[t−1] = θ[t−1]: kept as a bit (see `FiredValues`); ±0 never merged
        fired.common = (t > 0)
            .then(|| self.threshold(t - 1))
            .filter(|&c| c != R::zero());
        let mut s = vec![R::zero(); xs.len()];
        let mask = match c.as_mut() {
            Some(c) => &mut c.fired,
            None => &mut scratch,
        };
        charge_fire(
            lam,
            th,
            &xs,
            prev.as_ref().map(|p| p.as_slice().expect("standard")),
            from,
            &mut v,
            &mut s,
            mask,
            gather.then_some(&mut fired),
        );
        if let (Some(c), true) = (c.as_mut(), gather) {
            c.v_prev_fired = Some(fired);
        }
        if let Some(c) = c {
            c.v_prev = prev;
            c.shape = x.shape().to_vec();
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<EmpfV1Cache<R>>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let (lam, th) = (self.leak(t), self.threshold(t));
        let dv = take_dv(&self.name, ctx, dstate, &c.shape)?;
        let dvs = dv.as_ref().map(|d| d.as_slice().expect("standard"));
        let pv = c.v_prev.as_ref().map(|p| p.as_slice().expect("standard"));
        let dys = as_slice(dy);
        let mut dm = vec![R::zero(); dys.len()];
        let (dth, dlam) = match (&c.v_prev_fired, dvs) {
            (Some(pf), None) => fire_back_online(&dys, &c.fired, Some(pf), &mut dm),
            (Some(_), Some(_)) => {
                return Err(Error::Config(format!(
                    "layer `{}`: BPTT backward of a step run forward in online mode",
                    self.name
                )));
            }
            (None, _) => fire_back(&dys, dvs, &c.fired, pv, &mut dm),
        };
        add_grad(&mut self.a, t, dlam * (lam * (R::one() - lam)).f64());
        add_grad(&mut self.b, t, dth * (th * (R::one() - th)).f64());
        *dstate = if ctx.grad == GradMode::Bptt && pv.is_some() {
            State::Tensor(from_vec(&c.shape, dm.iter().map(|&d| lam * d).collect()))
        } else {
            State::Empty
        };
        Ok(from_vec(&c.shape, dm))
    }
    fn output_facts(&self, _input: crate::layers::Facts) -> crate::layers::Facts {
        // s = ReLU(m − θ); the backward uses dL/ds only through H(m − θ), zero where s = 0
        crate::layers::Facts::EMPF_SPIKES
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.a);
        f(&mut self.b);
    }
}

// ---------------------------------------------------------------------------------------------
// Version II (membrane-potential BatchNorm) and its fold
// ---------------------------------------------------------------------------------------------

/// EM-PF Version II (EMPF.md §5, Eqs. 6-8): membrane-potential BatchNorm, one BN per time-step.
///
/// ```text
/// m[t]  = λ[t]·sg(v[t−1]) + I[t]
/// m̂[t] = α1[t]·BN_t(m[t]) + α2[t]·m[t],     α1 = sigmoid(c[t]), α2 = sigmoid(d[t])
/// s[t]  = ReLU(m̂[t] − θ[t]),                 v[t] = m̂[t] − s[t] = min(m̂[t], θ[t])
/// ```
/// Backward, `H = H(m̂ − θ)`, `dy = dL/ds`, `dv = dL/dv[t]` (BPTT only):
/// * `dm̂ = dy·H + dv·(1 − H)`; `dL/dθ = Σ (dv − dy)·H`;
/// * `dL/dα1 = Σ dm̂·BN_t(m)`, `dL/dα2 = Σ dm̂·m`;
/// * `dm = BN_t.backward(α1·dm̂) + α2·dm̂` (train: full batch-statistics derivative; eval: `γ s`),
///   which also adds `dγ`, `dβ` of `BN_t`; `dL/dI = dm`;
/// * `dL/dλ = Σ dm·v[t−1]`; BPTT: `dL/dv[t−1] = λ·dm`;
/// * chain through the sigmoids of a, b, c, d.
///
/// Parameters `{name}.a`, `.b`, `.c`, `.d` (shape `[T]`) and BN `{name}.bn{t}.weight|bias|
/// running_mean|running_var`.
pub struct EmpfV2<R: Real> {
    name: String,
    /// Channels (features) of the input.
    pub channels: usize,
    /// Time-steps `T`.
    pub steps: usize,
    /// λ = sigmoid(a).
    pub a: Param<R>,
    /// θ = sigmoid(b).
    pub b: Param<R>,
    /// α1 = sigmoid(c).
    pub c: Param<R>,
    /// α2 = sigmoid(d).
    pub d: Param<R>,
    /// One BatchNorm per time-step.
    pub bns: Vec<BatchNorm<R>>,
}

/// V2 backward needs the firing mask, `v[t−1]`, `m` (for α2) and the BN cache (x̂, s).
#[derive(Default)]
pub struct EmpfV2Cache<R: Real> {
    fired: BitMask,
    v_prev: Option<Tensor<R>>,
    m: Vec<R>,
    bn: BnCache<R>,
    shape: Vec<usize>,
}
crate::impl_cache!(EmpfV2Cache<R> { fired, v_prev, m, bn });

impl<R: Real> EmpfV2<R> {
    /// a = b = c = d = 0, fresh BatchNorms, for `channels` channels and `steps` time-steps.
    pub fn new(name: &str, channels: usize, steps: usize) -> Self {
        EmpfV2 {
            name: name.to_string(),
            channels,
            steps,
            a: step_param(name, "a", steps),
            b: step_param(name, "b", steps),
            c: step_param(name, "c", steps),
            d: step_param(name, "d", steps),
            bns: (0..steps)
                .map(|t| BatchNorm::new(&format!("{name}.bn{t}"), channels))
                .collect(),
        }
    }

    /// The exact inference fold of the eval-mode step `t` (per channel):
    /// `k = α1·γ/sqrt(σ² + eps) + α2`, `b = α1·(β − γ·μ/sqrt(σ² + eps))`, so `m̂ = k ⊙ m + b`.
    /// Returns `(k[t][ch], b[t][ch])`.
    pub fn fold(&self) -> (Vec<Vec<R>>, Vec<Vec<R>>) {
        let mut ks = Vec::with_capacity(self.steps);
        let mut bs = Vec::with_capacity(self.steps);
        for t in 0..self.steps {
            let a1 = sigmoid(param_t(&self.c, t));
            let a2 = sigmoid(param_t(&self.d, t));
            let (scale, shift) = self.bns[t].fold_affine();
            ks.push(scale.iter().map(|&k| a1 * k + a2).collect());
            bs.push(shift.iter().map(|&b| a1 * b).collect());
        }
        (ks, bs)
    }

    /// The folded inference neuron: `λ̂[t][ch] = k·λ[t]`, `Î = k ⊙ I + b`, `θ̂ = θ`.
    pub fn to_folded(&self) -> EmpfFolded<R> {
        let (k, b) = self.fold();
        let leak = (0..self.steps)
            .map(|t| {
                let lam = sigmoid(param_t(&self.a, t));
                k[t].iter().map(|&k| k * lam).collect()
            })
            .collect();
        EmpfFolded {
            name: self.name.clone(),
            channels: self.channels,
            leak,
            scale: k,
            shift: b,
            threshold: (0..self.steps)
                .map(|t| sigmoid(param_t(&self.b, t)))
                .collect(),
        }
    }
}

impl<R: Real> Layer<R> for EmpfV2<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfV2"
    }
    fn describe(&self) -> String {
        format!("EmpfV2({} channels, T = {})", self.channels, self.steps)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        BnGeom::of(&self.name, input, self.channels)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let g = BnGeom::of(&self.name, x.shape(), self.channels)?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let lam = sigmoid(param_t(&self.a, t));
        let th = sigmoid(param_t(&self.b, t));
        let a1 = sigmoid(param_t(&self.c, t));
        let a2 = sigmoid(param_t(&self.d, t));
        let prev = take_prev(&self.name, state, x.shape())?;
        let xs = as_slice(x);
        let m: Vec<R> = match prev.as_ref() {
            Some(p) => p
                .as_slice()
                .expect("standard")
                .iter()
                .zip(xs.iter())
                .map(|(&v, &i)| lam * v + i)
                .collect(),
            None => xs.to_vec(),
        };
        let mut c = cache.map(|c| c.get_or_default::<EmpfV2Cache<R>>());
        let bn = self.bns[t].forward_slice(&m, g, ctx.train, c.as_mut().map(|c| &mut c.bn))?;
        let mut s = vec![R::zero(); m.len()];
        let mut v = vec![R::zero(); m.len()];
        let mut scratch = BitMask::default();
        let mask = match c.as_mut() {
            Some(c) => &mut c.fired,
            None => &mut scratch,
        };
        par_zip_map(&mut s, &bn, &m, |b, m| a1 * b + a2 * m);
        fire(th, &mut s, &mut v, mask);
        if let Some(c) = c {
            c.v_prev = prev;
            c.m = m;
            c.shape = x.shape().to_vec();
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<EmpfV2Cache<R>>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let g = BnGeom::of(&self.name, &c.shape, self.channels)?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let lam = sigmoid(param_t(&self.a, t));
        let th = sigmoid(param_t(&self.b, t));
        let a1 = sigmoid(param_t(&self.c, t));
        let a2 = sigmoid(param_t(&self.d, t));
        let dv = take_dv(&self.name, ctx, dstate, &c.shape)?;
        let dvs = dv.as_ref().map(|d| d.as_slice().expect("standard"));
        let dys = as_slice(dy);
        let xhat = c.bn.xhat();
        let gamma = self.bns[t].weight.value.as_slice().expect("standard");
        let beta = self.bns[t].bias.value.as_slice().expect("standard");
        let mut dmh = vec![R::zero(); dys.len()];
        let (dth, _) = fire_back(&dys, dvs, &c.fired, None, &mut dmh);
        // dL/dα1 = Σ dm̂·(γ x̂ + β), dL/dα2 = Σ dm̂·m: per sample (fixed items), per channel run
        let block = g.c * g.hw;
        let parts: Vec<(f64, f64)> = dmh
            .par_chunks(block)
            .zip(xhat.par_chunks(block))
            .zip(c.m.par_chunks(block))
            .map(|((db, xb), mb)| {
                let (mut s1, mut s2) = (0.0f64, 0.0f64);
                for ch in 0..g.c {
                    let r = ch * g.hw..(ch + 1) * g.hw;
                    let (mut a, mut b) = (R::zero(), R::zero());
                    for ((&d, &xh), &m) in db[r.clone()].iter().zip(&xb[r.clone()]).zip(&mb[r]) {
                        a += d * (gamma[ch] * xh + beta[ch]);
                        b += d * m;
                    }
                    s1 += a.f64();
                    s2 += b.f64();
                }
                (s1, s2)
            })
            .collect();
        let (da1, da2) = parts
            .iter()
            .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
        let dbn: Vec<R> = dmh.par_iter().map(|&d| a1 * d).collect();
        let mut dm = self.bns[t].backward_slice(&dbn, g, &c.bn)?;
        let pv = c.v_prev.as_ref().map(|p| p.as_slice().expect("standard"));
        let parts: Vec<f64> = dm
            .par_chunks_mut(PAR_CHUNK)
            .enumerate()
            .map(|(k, dc)| {
                let base = k * PAR_CHUNK;
                let mut dlam = 0.0f64;
                for (j, o) in dc.iter_mut().enumerate() {
                    *o += a2 * dmh[base + j];
                    if let Some(p) = pv {
                        dlam += (*o * p[base + j]).f64();
                    }
                }
                dlam
            })
            .collect();
        let dlam: f64 = parts.iter().sum();
        let sd = |x: R| (x * (R::one() - x)).f64();
        add_grad(&mut self.a, t, dlam * sd(lam));
        add_grad(&mut self.b, t, dth * sd(th));
        add_grad(&mut self.c, t, da1 * sd(a1));
        add_grad(&mut self.d, t, da2 * sd(a2));
        *dstate = if ctx.grad == GradMode::Bptt && pv.is_some() {
            State::Tensor(from_vec(&c.shape, dm.iter().map(|&d| lam * d).collect()))
        } else {
            State::Empty
        };
        Ok(from_vec(&c.shape, dm))
    }
    fn output_facts(&self, _input: crate::layers::Facts) -> crate::layers::Facts {
        // s = ReLU(m − θ); the backward uses dL/ds only through H(m − θ), zero where s = 0
        crate::layers::Facts::EMPF_SPIKES
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.a);
        f(&mut self.b);
        f(&mut self.c);
        f(&mut self.d);
        for bn in &mut self.bns {
            bn.visit_params(f);
        }
    }
}

/// The folded Version II neuron for inference (EMPF.md §5): a Version I neuron with a per-channel
/// leak and an input affine,
/// ```text
/// m[t] = λ̂[t][ch]·v[t−1] + k[t][ch]·I[t] + b[t][ch],   s = ReLU(m − θ[t]),   v = min(m, θ[t])
/// ```
/// equal to the eval-mode [`EmpfV2`] it was folded from. The input affine `(k, b)` is kept apart so
/// that a deployment can fold it into the preceding BatchNorm. Inference only: `backward` errors.
pub struct EmpfFolded<R: Real> {
    name: String,
    /// Channels.
    pub channels: usize,
    /// `λ̂[t][ch] = k[t][ch]·λ[t]`.
    pub leak: Vec<Vec<R>>,
    /// Input scale `k[t][ch]`.
    pub scale: Vec<Vec<R>>,
    /// Input shift `b[t][ch]`.
    pub shift: Vec<Vec<R>>,
    /// `θ[t]`.
    pub threshold: Vec<R>,
}

impl<R: Real> EmpfFolded<R> {
    /// Compose step `t`'s input affine with a preceding per-channel affine `u = scale ⊙ x + shift`
    /// (e.g. [`BatchNorm::fold_affine`] of the BN producing `I`): returns `(k·scale, k·shift + b)`,
    /// so that `Î = k ⊙ u + b = (k·scale) ⊙ x + (k·shift + b)`. Setting them as
    /// `self.scale[t]`/`self.shift[t]` makes the neuron take the pre-BN tensor directly.
    pub fn compose_input_affine(&self, t: usize, scale: &[R], shift: &[R]) -> (Vec<R>, Vec<R>) {
        let (k, b) = (&self.scale[t], &self.shift[t]);
        let s = k.iter().zip(scale).map(|(&k, &a)| k * a).collect();
        let h = k
            .iter()
            .zip(shift)
            .zip(b)
            .map(|((&k, &c), &b)| k * c + b)
            .collect();
        (s, h)
    }
}

impl<R: Real> Layer<R> for EmpfFolded<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfFolded"
    }
    fn describe(&self) -> String {
        format!(
            "EmpfFolded({} channels, T = {})",
            self.channels,
            self.threshold.len()
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        BnGeom::of(&self.name, input, self.channels)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        _cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let g = BnGeom::of(&self.name, x.shape(), self.channels)?;
        let t = step_index(&self.name, ctx, self.threshold.len())?;
        let th = self.threshold[t];
        let (leak, k, b) = (&self.leak[t], &self.scale[t], &self.shift[t]);
        let prev = take_prev(&self.name, state, x.shape())?;
        let pv = prev.as_ref().map(|p| p.as_slice().expect("standard"));
        let xs = as_slice(x);
        let mut s = vec![R::zero(); xs.len()];
        let mut v = vec![R::zero(); xs.len()];
        for i in 0..xs.len() {
            let ch = (i / g.hw) % g.c;
            let mut m = k[ch] * xs[i] + b[ch];
            if let Some(p) = pv {
                m += leak[ch] * p[i];
            }
            if m > th {
                s[i] = m - th;
                v[i] = th;
            } else {
                v[i] = m;
            }
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        _dy: &Tensor<R>,
        _ctx: &StepCtx,
        _cache: &Cache,
        _dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        Err(Error::Config(format!(
            "layer `{}`: the folded EM-PF neuron is inference-only (train the EmpfV2 it came from)",
            self.name
        )))
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

// ---------------------------------------------------------------------------------------------
// Version III (parallel)
// ---------------------------------------------------------------------------------------------

/// EM-PF Version III (EMPF.md §6): the parallel neuron, `s[t] = ReLU(I[t] − θ[t])`, `θ = sigmoid(b[t])`.
///
/// No leak and no membrane state, so all `T` steps are independent and can run as one batched call
/// ([`EmpfV3::forward_all`] / [`EmpfV3::backward_all`]). Backward: `dL/dI = dy·H(I − θ)`,
/// `dL/dθ[t] = −Σ dy·H(I − θ)`, `dL/db = dL/dθ·θ(1 − θ)`; `dstate` stays empty in both modes.
pub struct EmpfV3<R: Real> {
    name: String,
    /// Time-steps `T`.
    pub steps: usize,
    /// θ = sigmoid(b), shape `[T]`.
    pub b: Param<R>,
}

/// V3 backward needs only the firing mask.
#[derive(Default)]
pub struct EmpfV3Cache {
    fired: StepMasks,
    shape: Vec<usize>,
    /// Time-steps covered by the cache (1 for a step-wise forward, T for `forward_all`) and the
    /// first step index.
    steps: usize,
    t0: usize,
}
crate::impl_cache!(EmpfV3Cache { fired });

/// One firing mask per time-step covered (so a batched call keeps each step's mask word-aligned).
#[derive(Default)]
struct StepMasks(Vec<BitMask>);

impl CacheBytes for StepMasks {
    fn cache_bytes(&self) -> usize {
        self.0.iter().map(|m| m.cache_bytes()).sum()
    }
}

/// `s = ReLU(x − θ)` and the mask `H(x − θ)`, in parallel over [`PAR_CHUNK`] items.
fn relu_fire<R: Real>(x: &[R], th: R, s: &mut [R], mask: &mut BitMask) {
    mask.reset(x.len());
    s.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .zip(mask.words.par_chunks_mut(PAR_CHUNK / 64))
        .for_each(|((sc, xc), mc)| {
            for (w, word) in mc.iter_mut().enumerate() {
                let lo = w * 64;
                let hi = (lo + 64).min(sc.len());
                let mut bits = 0u64;
                for j in lo..hi {
                    let f = xc[j] > th;
                    sc[j] = if f { xc[j] - th } else { R::zero() };
                    bits |= u64::from(f) << (j - lo);
                }
                *word = bits;
            }
        });
}

/// Backward of [`relu_fire`]: `dx = dy·H` into `dx`; returns `Σ dy·H` (branch-free over mask
/// words; per-item partial sums added in order).
fn relu_back<R: Real>(dy: &[R], mask: &BitMask, dx: &mut [R]) -> f64 {
    let parts: Vec<f64> = dx
        .par_chunks_mut(PAR_CHUNK)
        .zip(dy.par_chunks(PAR_CHUNK))
        .zip(mask.words.par_chunks(PAR_CHUNK / 64))
        .map(|((dc, yc), mc)| {
            let mut sum = 0.0f64;
            for ((dw, yw), &bits) in dc.chunks_mut(64).zip(yc.chunks(64)).zip(mc) {
                sum += mask_word(bits, yw, dw).f64();
            }
            sum
        })
        .collect();
    parts.iter().sum()
}

impl<R: Real> EmpfV3<R> {
    /// `b = 0` (θ = 0.5) for `steps` time-steps.
    pub fn new(name: &str, steps: usize) -> Self {
        EmpfV3 {
            name: name.to_string(),
            steps,
            b: step_param(name, "b", steps),
        }
    }

    /// Forward over `nsteps` consecutive equal slices of `x`, slice `j` using `θ[t0 + j]` (each
    /// slice exactly as a step-wise call would process it).
    fn run(&self, x: &[R], t0: usize, nsteps: usize, fired: Option<&mut StepMasks>) -> Vec<R> {
        let per = x.len() / nsteps;
        let mut s = vec![R::zero(); x.len()];
        let mut scratch = StepMasks::default();
        let masks = &mut fired.unwrap_or(&mut scratch).0;
        masks.resize_with(nsteps, BitMask::default);
        masks.truncate(nsteps);
        for (j, (sj, mj)) in s.chunks_mut(per).zip(masks.iter_mut()).enumerate() {
            let th = sigmoid(param_t(&self.b, t0 + j));
            relu_fire(&x[j * per..(j + 1) * per], th, sj, mj);
        }
        s
    }

    fn run_back(&mut self, dy: &[R], c: &EmpfV3Cache) -> Vec<R> {
        let per = dy.len() / c.steps;
        let mut dx = vec![R::zero(); dy.len()];
        for (j, (dxj, mj)) in dx.chunks_mut(per).zip(&c.fired.0).enumerate() {
            let t = c.t0 + j;
            let th = sigmoid(param_t(&self.b, t));
            let sum = relu_back(&dy[j * per..(j + 1) * per], mj, dxj);
            add_grad(&mut self.b, t, -sum * (th * (R::one() - th)).f64());
        }
        dx
    }

    /// All `T` steps in one call. Layout: `x` is `[T·N, ...]` in **step-major** order — rows
    /// `t·N..(t+1)·N` are step `t` (the step tensors concatenated along axis 0). Returns the spikes
    /// in the same layout; fills `cache` for [`EmpfV3::backward_all`].
    pub fn forward_all(&mut self, x: &Tensor<R>, cache: Option<&mut Cache>) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        if x.shape()[0] % self.steps != 0 {
            return Err(Error::shape(
                &self.name,
                format!(
                    "a batch of T·N rows (T = {}) in step-major order",
                    self.steps
                ),
                x.shape(),
            ));
        }
        let xs = as_slice(x);
        let c = cache.map(|c| c.get_or_default::<EmpfV3Cache>());
        let s = match c {
            Some(c) => {
                c.shape = x.shape().to_vec();
                c.steps = self.steps;
                c.t0 = 0;
                self.run(&xs, 0, self.steps, Some(&mut c.fired))
            }
            None => self.run(&xs, 0, self.steps, None),
        };
        Ok(from_vec(x.shape(), s))
    }

    /// Backward of [`EmpfV3::forward_all`]: `dy` in the same `[T·N, ...]` layout; returns `dL/dI`
    /// and adds into `b`'s gradient (bit-identical to running the steps one by one).
    pub fn backward_all(&mut self, dy: &Tensor<R>, cache: &Cache) -> Result<Tensor<R>> {
        let c = cache.get::<EmpfV3Cache>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let dys = as_slice(dy);
        let dx = self.run_back(&dys, c);
        Ok(from_vec(&c.shape, dx))
    }
}

impl<R: Real> Layer<R> for EmpfV3<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "EmpfV3"
    }
    fn describe(&self) -> String {
        format!("EmpfV3(T = {}, parallel)", self.steps)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_neuron_shape(&self.name, input)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        _state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        let t = step_index(&self.name, ctx, self.steps)?;
        let xs = as_slice(x);
        let c = cache.map(|c| c.get_or_default::<EmpfV3Cache>());
        let s = match c {
            Some(c) => {
                c.shape = x.shape().to_vec();
                c.steps = 1;
                c.t0 = t;
                self.run(&xs, t, 1, Some(&mut c.fired))
            }
            None => self.run(&xs, t, 1, None),
        };
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        _ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        *dstate = State::Empty;
        self.backward_all(dy, cache)
    }
    fn output_facts(&self, _input: crate::layers::Facts) -> crate::layers::Facts {
        // s = ReLU(m − θ); the backward uses dL/ds only through H(m − θ), zero where s = 0
        crate::layers::Facts::EMPF_SPIKES
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        f(&mut self.b);
    }
}

// ---------------------------------------------------------------------------------------------
// LIF baseline
// ---------------------------------------------------------------------------------------------

/// The spike function of [`Lif`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpikeFn {
    /// `s = H(m − θ) ∈ {0, 1}` (the real LIF); backward uses the triangle surrogate.
    Heaviside,
    /// `s = S(m − θ)`, the antiderivative of the triangle surrogate (`S(−∞) = 0`, `S(+∞) = 1`):
    /// for tests only, so that the surrogate backward is the exact derivative and can be checked
    /// against finite differences through the very same backward code.
    SmoothTriangle,
}

/// The reset of [`Lif`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reset {
    /// `v = m − θ·s` (EMPF.md §1 Decision).
    Soft,
    /// `v = m·(1 − s)`.
    Hard,
}

/// The LIF baseline (EMPF.md §1): fixed leak λ and threshold θ, binary spikes, triangle surrogate.
///
/// ```text
/// m = λ·v[t−1] + I,  s = H(m − θ),  v = m − θ·s (soft) or m·(1 − s) (hard)
/// surrogate ds/dm = g(m) = (1/γ²)·max(γ − |m − θ|, 0)
/// ```
/// Backward, `dy = dL/ds`, `dv = dL/dv[t]` (BPTT only):
/// * `dv/dm = 1 − θ·g` (soft) or `(1 − s) − m·g` (hard);
/// * `dm = dy·g + dv·dv/dm`; `dL/dI = dm`; BPTT: `dL/dv[t−1] = λ·dm`.
///
/// With [`SpikeFn::SmoothTriangle`] `s = S(m − θ)` with `S' = g`, so the same formulas are the
/// exact derivative.
pub struct Lif<R: Real> {
    name: String,
    /// λ (default 0.5).
    pub leak: R,
    /// θ (default 1.0).
    pub threshold: R,
    /// Surrogate width γ (default 1).
    pub gamma: R,
    /// Spike function (default Heaviside).
    pub spike: SpikeFn,
    /// Reset (default soft).
    pub reset: Reset,
}

/// LIF backward needs `m` (for the surrogate and the hard reset) and whether `v[t−1]` existed.
#[derive(Default)]
pub struct LifCache<R: Real> {
    m: Vec<R>,
    has_prev: bool,
    shape: Vec<usize>,
}
crate::impl_cache!(LifCache<R> { m });

impl<R: Real> Lif<R> {
    /// λ = 0.5, θ = 1, γ = 1, Heaviside spikes, soft reset.
    pub fn new(name: &str) -> Self {
        Lif {
            name: name.to_string(),
            leak: R::of(0.5),
            threshold: R::one(),
            gamma: R::one(),
            spike: SpikeFn::Heaviside,
            reset: Reset::Soft,
        }
    }

    /// The spike value for membrane potential `m`.
    pub fn spike_of(&self, m: R) -> R {
        let x = m - self.threshold;
        match self.spike {
            SpikeFn::Heaviside => {
                if x >= R::zero() {
                    R::one()
                } else {
                    R::zero()
                }
            }
            SpikeFn::SmoothTriangle => {
                let g = self.gamma;
                let half = R::of(0.5);
                if x <= -g {
                    R::zero()
                } else if x <= R::zero() {
                    half * (x + g) * (x + g) / (g * g)
                } else if x < g {
                    R::one() - half * (g - x) * (g - x) / (g * g)
                } else {
                    R::one()
                }
            }
        }
    }

    /// The triangle surrogate `g(m) = (1/γ²)·max(γ − |m − θ|, 0)`.
    pub fn surrogate(&self, m: R) -> R {
        let g = self.gamma;
        (g - (m - self.threshold).abs()).max(R::zero()) / (g * g)
    }
}

impl<R: Real> Layer<R> for Lif<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "Lif"
    }
    fn describe(&self) -> String {
        format!(
            "Lif(λ = {}, θ = {}, {:?} reset)",
            self.leak, self.threshold, self.reset
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        check_neuron_shape(&self.name, input)?;
        Ok(input.to_vec())
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        _ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        check_neuron_shape(&self.name, x.shape())?;
        let prev = take_prev(&self.name, state, x.shape())?;
        let pv = prev.as_ref().map(|p| p.as_slice().expect("standard"));
        let xs = as_slice(x);
        let mut c = cache.map(|c| c.get_or_default::<LifCache<R>>());
        if let Some(c) = c.as_mut() {
            c.m.clear();
            c.has_prev = pv.is_some();
            c.shape = x.shape().to_vec();
        }
        let mut s = vec![R::zero(); xs.len()];
        let mut v = vec![R::zero(); xs.len()];
        for i in 0..xs.len() {
            let m = match pv {
                Some(p) => self.leak * p[i] + xs[i],
                None => xs[i],
            };
            s[i] = self.spike_of(m);
            v[i] = match self.reset {
                Reset::Soft => m - self.threshold * s[i],
                Reset::Hard => m * (R::one() - s[i]),
            };
            if let Some(c) = c.as_mut() {
                c.m.push(m);
            }
        }
        *state = State::Tensor(from_vec(x.shape(), v));
        Ok(from_vec(x.shape(), s))
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let c = cache.get::<LifCache<R>>(&self.name)?;
        check_dy(&self.name, dy, &c.shape)?;
        let dv = take_dv(&self.name, ctx, dstate, &c.shape)?;
        let dvs = dv.as_ref().map(|d| d.as_slice().expect("standard"));
        let dys = as_slice(dy);
        let mut dm = vec![R::zero(); dys.len()];
        for i in 0..dys.len() {
            let m = c.m[i];
            let g = self.surrogate(m);
            let mut d = dys[i] * g;
            if let Some(dv) = dvs {
                let dvdm = match self.reset {
                    Reset::Soft => R::one() - self.threshold * g,
                    Reset::Hard => R::one() - self.spike_of(m) - m * g,
                };
                d += dv[i] * dvdm;
            }
            dm[i] = d;
        }
        *dstate = if ctx.grad == GradMode::Bptt && c.has_prev {
            State::Tensor(from_vec(
                &c.shape,
                dm.iter().map(|&d| self.leak * d).collect(),
            ))
        } else {
            State::Empty
        };
        Ok(from_vec(&c.shape, dm))
    }
    fn output_facts(&self, _input: crate::layers::Facts) -> crate::layers::Facts {
        // spikes in {0, 1}, but the surrogate passes gradient where s = 0 (near θ)
        crate::layers::Facts {
            nonneg: true,
            grad_ignored_at_zero: false,
        }
    }
    fn visit_params(&mut self, _f: &mut dyn FnMut(&mut Param<R>)) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_step, check_unrolled};
    use crate::rng::Rng;
    use proptest::prelude::*;

    fn shape_of(rank4: bool, n: usize, c: usize, h: usize, w: usize) -> Vec<usize> {
        if rank4 { vec![n, c, h, w] } else { vec![n, c] }
    }

    /// Inputs around the thresholds (θ ∈ (0, 1)) at a random scale, so some neurons fire and
    /// some do not.
    fn input(shape: &[usize], scale: f64, rng: &mut Rng) -> Tensor<f64> {
        let n = shape.iter().product();
        from_vec(shape, (0..n).map(|_| scale * rng.normal() + 0.4).collect())
    }

    /// Random a, b, c, d (so λ, θ, α vary) and random BN affine and running statistics.
    fn randomise<R: Real>(layer: &mut dyn Layer<R>, rng: &mut Rng) {
        layer.visit_params(&mut |p| {
            let name = p.name.clone();
            p.value.mapv_inplace(|_| {
                R::of(if name.ends_with("running_var") {
                    rng.uniform_range(0.3, 2.0)
                } else if name.ends_with("weight") {
                    rng.uniform_range(0.5, 1.5)
                } else if name.ends_with("running_mean") || name.ends_with("bias") {
                    0.5 * rng.normal()
                } else {
                    1.5 * rng.normal()
                })
            })
        });
    }

    /// Step checks (online with and without a carried state, BPTT with a carried state so
    /// dL/dstate is checked) and unrolled checks in both modes.
    fn check_all(
        layer: &mut dyn Layer<f64>,
        shape: &[usize],
        steps: usize,
        train: bool,
        scale: f64,
        seed: u64,
    ) {
        let mut rng = Rng::new(seed ^ 0x5eed);
        // A random direction (and a θ perturbation) moves every element, so a single element near
        // its threshold rejects the whole sample; a train-mode BN (V2) even couples every element
        // of every later step. Rejected samples are never passed, only not counted: allow up to
        // 30% of them so that such rare draws do not fail the test.
        let max_rejected_fraction = 0.3;
        let opts = GradCheckOpts {
            seed,
            max_rejected_fraction,
            ..Default::default()
        };
        let t = rng.below(steps);
        let x = input(shape, scale, &mut rng);
        // stateless layers (V3) get no carried state
        let state = if layer.kind() == "EmpfV3" {
            State::Empty
        } else {
            State::Tensor(input(shape, 1.0, &mut rng))
        };
        for (grad, st) in [
            (GradMode::Online, State::Empty),
            (GradMode::Online, state.clone()),
            (GradMode::Bptt, state),
        ] {
            let ctx = StepCtx {
                t,
                steps,
                train,
                grad,
            };
            let what = format!("{} step {grad:?}", layer.kind());
            check_step(layer, &x, &ctx, &st, &opts)
                .unwrap()
                .assert_ok(&opts, &what);
        }
        let xs: Vec<_> = (0..steps).map(|_| input(shape, scale, &mut rng)).collect();
        for grad in [GradMode::Online, GradMode::Bptt] {
            let what = format!("{} unrolled {grad:?}", layer.kind());
            check_unrolled(layer, &xs, train, grad, &opts)
                .unwrap()
                .assert_ok(&opts, &what);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn v1_gradients_match_finite_differences(
            rank4 in any::<bool>(), n in 1usize..4, c in 1usize..4, h in 1usize..4, w in 1usize..4,
            steps in 1usize..5, scale in prop::sample::select(vec![0.3, 1.0, 3.0]), seed in 0u64..10_000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = EmpfV1::<f64>::new("n1", steps);
            randomise(&mut l, &mut rng);
            check_all(&mut l, &shape_of(rank4, n, c, h, w), steps, true, scale, seed);
        }

        #[test]
        fn v2_gradients_match_finite_differences_in_train_and_eval(
            // N ≥ 3: with two values per channel a train-mode BN output is ±1 up to eps, and its
            // tiny gradient is below what central differences resolve
            rank4 in any::<bool>(), n in 3usize..5, c in 1usize..4, h in 1usize..4, w in 1usize..4,
            steps in 1usize..5, train in any::<bool>(), scale in prop::sample::select(vec![0.3, 1.0, 3.0]),
            seed in 0u64..10_000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = EmpfV2::<f64>::new("n2", c, steps);
            randomise(&mut l, &mut rng);
            check_all(&mut l, &shape_of(rank4, n, c, h, w), steps, train, scale, seed);
        }

        #[test]
        fn v3_gradients_match_finite_differences(
            rank4 in any::<bool>(), n in 1usize..4, c in 1usize..4, h in 1usize..4, w in 1usize..4,
            steps in 1usize..5, scale in prop::sample::select(vec![0.3, 1.0, 3.0]), seed in 0u64..10_000,
        ) {
            let mut rng = Rng::new(seed);
            let mut l = EmpfV3::<f64>::new("n3", steps);
            randomise(&mut l, &mut rng);
            check_all(&mut l, &shape_of(rank4, n, c, h, w), steps, true, scale, seed);
        }

        #[test]
        fn lif_surrogate_backward_is_the_exact_derivative_of_the_smooth_spike(
            rank4 in any::<bool>(), n in 1usize..4, c in 1usize..4, h in 1usize..4, w in 1usize..4,
            steps in 1usize..5, hard in any::<bool>(), seed in 0u64..10_000,
        ) {
            let mut l = Lif::<f64>::new("lif");
            l.spike = SpikeFn::SmoothTriangle;
            l.reset = if hard { Reset::Hard } else { Reset::Soft };
            // inputs around θ = 1 so the surrogate is mostly non-zero
            let shape = shape_of(rank4, n, c, h, w);
            let mut rng = Rng::new(seed);
            // S is only C¹: S'' jumps at the triangle's corners, where central differences carry an
            // O(h) error the kink detector cannot see (the quotients stay tiny). A smaller step
            // bounds it by h/4·|r| ≈ 2.5e-7; atol 1e-6 of the largest entry still fails any missing
            // term (those are O(0.1) or more).
            let opts = GradCheckOpts { seed, h: 1e-6, atol: 1e-6, ..Default::default() };
            let xs: Vec<_> = (0..steps).map(|_| input(&shape, 1.0, &mut rng).mapv(|v| v + 0.4)).collect();
            for grad in [GradMode::Online, GradMode::Bptt] {
                let st = State::Tensor(input(&shape, 1.0, &mut rng));
                check_step(&mut l, &xs[0], &StepCtx::train(0, steps, grad), &st, &opts).unwrap().assert_ok(&opts, "Lif step");
                check_unrolled(&mut l, &xs, true, grad, &opts).unwrap().assert_ok(&opts, "Lif unrolled");
            }
        }

        #[test]
        fn v3_batched_equals_stepwise(
            rank4 in any::<bool>(), n in 1usize..4, c in 1usize..5, h in 1usize..4, w in 1usize..4,
            steps in 1usize..5, seed in 0u64..10_000,
        ) {
            let mut rng = Rng::new(seed);
            let shape = shape_of(rank4, n, c, h, w);
            let mut l = EmpfV3::<f64>::new("n3", steps);
            randomise(&mut l, &mut rng);
            let xs: Vec<_> = (0..steps).map(|_| input(&shape, 1.0, &mut rng)).collect();
            let dys: Vec<_> = (0..steps).map(|_| input(&shape, 1.0, &mut rng)).collect();
            let (mut ys, mut dxs) = (Vec::new(), Vec::new());
            for t in 0..steps {
                let ctx = StepCtx::train(t, steps, GradMode::Online);
                let mut cache = Cache::new();
                ys.push(l.forward(&xs[t], &ctx, &mut State::Empty, Some(&mut cache)).unwrap());
                dxs.push(l.backward(&dys[t], &ctx, &cache, &mut State::Empty).unwrap());
            }
            let gstep = l.b.grad.clone();
            l.b.zero_grad();
            let cat = |v: &[Tensor<f64>]| {
                let views: Vec<_> = v.iter().map(|t| t.view()).collect();
                ndarray::concatenate(ndarray::Axis(0), &views).unwrap()
            };
            let mut cache = Cache::new();
            let y = l.forward_all(&cat(&xs), Some(&mut cache)).unwrap();
            let dx = l.backward_all(&cat(&dys), &cache).unwrap();
            prop_assert_eq!(y, cat(&ys));
            prop_assert_eq!(dx, cat(&dxs));
            prop_assert_eq!(&l.b.grad, &gstep);
        }
    }

    #[test]
    fn gradients_match_finite_differences_across_parallel_chunks() {
        // more than two PAR_CHUNK items, with a ragged last one; with this many elements a random
        // direction would cross some threshold, so the inputs are built to keep every m̂ at least
        // 0.05 away from θ
        let shape = [2, 3, 97, 59];
        let len: usize = shape.iter().product();
        assert!(len > 2 * PAR_CHUNK + 1);
        let hw = 97 * 59;
        let mut rng = Rng::new(21);
        let mut v1 = EmpfV1::<f64>::new("n1", 3);
        randomise(&mut v1, &mut rng);
        let mut v2 = EmpfV2::<f64>::new("n2", 3, 3);
        randomise(&mut v2, &mut rng);
        let p = input(&shape, 1.0, &mut rng);
        let st = State::Tensor(p.clone());
        let opts = GradCheckOpts::default();
        let t = 1;
        let target = |th: f64, rng: &mut Rng| {
            let side = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            th + side * (0.05 + rng.normal().abs())
        };
        // V1 (train): m = λ p + x
        let (lam, th) = (v1.leak(t), v1.threshold(t));
        let x1 = from_vec(
            &shape,
            p.iter()
                .map(|&pi| target(th, &mut rng) - lam * pi)
                .collect(),
        );
        let ctx = StepCtx::train(t, 3, GradMode::Bptt);
        check_step(&mut v1, &x1, &ctx, &st, &opts)
            .unwrap()
            .assert_ok(&opts, "V1 large step");
        // V2 (eval): m̂ = k m + b per channel, m = λ p + x
        let (k, b) = v2.fold();
        let (lam, th) = (sigmoid(param_t(&v2.a, t)), sigmoid(param_t(&v2.b, t)));
        let x2 = from_vec(
            &shape,
            p.iter()
                .enumerate()
                .map(|(i, &pi)| {
                    let ch = (i / hw) % 3;
                    (target(th, &mut rng) - b[t][ch]) / k[t][ch] - lam * pi
                })
                .collect(),
        );
        let ctx = StepCtx {
            grad: GradMode::Bptt,
            ..StepCtx::eval(t, 3)
        };
        check_step(&mut v2, &x2, &ctx, &st, &opts)
            .unwrap()
            .assert_ok(&opts, "V2 large step");
    }

    #[test]
    fn v3_batched_equals_stepwise_bit_for_bit_across_parallel_chunks() {
        let (steps, shape) = (3, [3, 5, 61, 59]);
        assert!(shape.iter().product::<usize>() > 3 * PAR_CHUNK);
        let mut rng = Rng::new(17);
        let mut l = EmpfV3::<f32>::new("n3", steps);
        randomise(&mut l, &mut rng);
        let rand = |rng: &mut Rng| input(&shape, 1.0, rng).mapv(|v| v as f32);
        let xs: Vec<_> = (0..steps).map(|_| rand(&mut rng)).collect();
        let dys: Vec<_> = (0..steps).map(|_| rand(&mut rng)).collect();
        let (mut ys, mut dxs) = (Vec::new(), Vec::new());
        for t in 0..steps {
            let ctx = StepCtx::train(t, steps, GradMode::Online);
            let mut cache = Cache::new();
            ys.push(
                l.forward(&xs[t], &ctx, &mut State::Empty, Some(&mut cache))
                    .unwrap(),
            );
            dxs.push(
                l.backward(&dys[t], &ctx, &cache, &mut State::Empty)
                    .unwrap(),
            );
        }
        let gstep = l.b.grad.clone();
        l.b.zero_grad();
        let cat = |v: &[Tensor<f32>]| {
            let views: Vec<_> = v.iter().map(|t| t.view()).collect();
            ndarray::concatenate(ndarray::Axis(0), &views).unwrap()
        };
        let mut cache = Cache::new();
        let y = l.forward_all(&cat(&xs), Some(&mut cache)).unwrap();
        let dx = l.backward_all(&cat(&dys), &cache).unwrap();
        assert_eq!(y, cat(&ys));
        assert_eq!(dx, cat(&dxs));
        assert_eq!(l.b.grad, gstep);
        assert!(gstep.iter().all(|&g| g != 0.0));
    }

    fn v2_eval_equals_folded<R: Real>(seed: u64, rank4: bool, tol: f64) {
        let mut rng = Rng::new(seed);
        let (n, c, steps) = (3, 4, 4);
        let shape = shape_of(rank4, n, c, 3, 2);
        let mut v2 = EmpfV2::<R>::new("n2", c, steps);
        randomise(&mut v2, &mut rng);
        let mut folded = v2.to_folded();
        let (mut s2, mut sf) = (State::Empty, State::Empty);
        let mut fired = 0;
        for t in 0..steps {
            let x = input(&shape, 1.0, &mut rng).mapv(R::of);
            let ctx = StepCtx::eval(t, steps);
            let y2 = v2.forward(&x, &ctx, &mut s2, None).unwrap();
            let yf = folded.forward(&x, &ctx, &mut sf, None).unwrap();
            for (a, b) in y2.iter().zip(yf.iter()) {
                assert!(
                    (a.f64() - b.f64()).abs() <= tol * (1.0 + a.f64().abs()),
                    "t={t}: {a} vs {b}"
                );
                fired += usize::from(a.f64() > 0.0);
            }
            let (v2s, vfs) = (s2.tensor().unwrap(), sf.tensor().unwrap());
            for (a, b) in v2s.iter().zip(vfs.iter()) {
                assert!((a.f64() - b.f64()).abs() <= tol * (1.0 + a.f64().abs()));
            }
        }
        assert!(fired > 0 && fired < steps * shape.iter().product::<usize>());
    }

    #[test]
    fn bn_then_v2_equals_folded_neuron_with_the_bn_composed_into_its_input_affine() {
        let mut rng = Rng::new(31);
        let (c, steps, shape) = (3, 3, [2, 3, 2, 2]);
        let mut bn = BatchNorm::<f64>::new("bn", c);
        randomise(&mut bn, &mut rng);
        let mut v2 = EmpfV2::<f64>::new("n2", c, steps);
        randomise(&mut v2, &mut rng);
        let mut folded = v2.to_folded();
        let (bs, bh) = bn.fold_affine();
        for t in 0..steps {
            let (s, h) = folded.compose_input_affine(t, &bs, &bh);
            folded.scale[t] = s;
            folded.shift[t] = h;
        }
        let (mut s2, mut sf) = (State::Empty, State::Empty);
        for t in 0..steps {
            let x = input(&shape, 2.0, &mut rng);
            let ctx = StepCtx::eval(t, steps);
            let i = bn.forward(&x, &ctx, &mut State::Empty, None).unwrap();
            let y2 = v2.forward(&i, &ctx, &mut s2, None).unwrap();
            let yf = folded.forward(&x, &ctx, &mut sf, None).unwrap();
            for (a, b) in y2.iter().zip(yf.iter()) {
                assert!(
                    (a - b).abs() <= 1e-10 * (1.0 + a.abs()),
                    "t={t}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn v2_eval_equals_folded_v1_in_f64_and_f32() {
        for seed in 0..6 {
            v2_eval_equals_folded::<f64>(seed, seed % 2 == 0, 1e-10);
            v2_eval_equals_folded::<f32>(seed, seed % 2 == 1, 1e-5);
        }
    }

    /// A V1 whose backward is deliberately wrong in one way.
    struct Broken {
        inner: EmpfV1<f64>,
        drop_temporal: bool,
        drop_lambda: bool,
    }
    impl Layer<f64> for Broken {
        fn name(&self) -> &str {
            "broken"
        }
        fn kind(&self) -> &'static str {
            "Broken"
        }
        fn output_shape(&self, i: &[usize]) -> Result<Vec<usize>> {
            self.inner.output_shape(i)
        }
        fn forward(
            &mut self,
            x: &Tensor<f64>,
            c: &StepCtx,
            s: &mut State<f64>,
            k: Option<&mut Cache>,
        ) -> Result<Tensor<f64>> {
            self.inner.forward(x, c, s, k)
        }
        fn backward(
            &mut self,
            dy: &Tensor<f64>,
            c: &StepCtx,
            k: &Cache,
            s: &mut State<f64>,
        ) -> Result<Tensor<f64>> {
            let r = self.inner.backward(dy, c, k, s);
            if self.drop_temporal {
                // forget λ·dL/dm in the gradient passed to step t−1
                s.visit_tensors_mut(&mut |t| t.fill(0.0));
            }
            if self.drop_lambda {
                self.inner.a.zero_grad();
            }
            r
        }
        fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<f64>)) {
            self.inner.visit_params(f)
        }
    }

    #[test]
    fn gradcheck_catches_a_wrong_empf_backward() {
        let mut rng = Rng::new(11);
        let shape = [3, 5];
        let xs: Vec<_> = (0..3).map(|_| input(&shape, 1.0, &mut rng)).collect();
        let opts = GradCheckOpts::default();
        for (drop_temporal, drop_lambda, mode, what) in [
            (true, false, GradMode::Bptt, "x[0]"),
            (false, true, GradMode::Online, "n1.a"),
            (false, true, GradMode::Bptt, "n1.a"),
        ] {
            let mut l = Broken {
                inner: EmpfV1::new("n1", 3),
                drop_temporal,
                drop_lambda,
            };
            randomise(&mut l, &mut Rng::new(4));
            let rep = check_unrolled(&mut l, &xs, true, mode, &opts).unwrap();
            assert!(!rep.passed(&opts), "{what} {mode:?}");
            assert!(
                rep.failures.iter().any(|f| f.contains(what)),
                "{:?}",
                rep.failures
            );
            // the intact layer passes the same check
            check_unrolled(&mut l.inner, &xs, true, mode, &opts)
                .unwrap()
                .assert_ok(&opts, "intact");
        }
    }

    /// Gradients of a T-step V1 run in one mode: (dL/dx[t], a.grad, b.grad).
    fn v1_grads(
        l: &mut EmpfV1<f64>,
        xs: &[Tensor<f64>],
        rs: &[Tensor<f64>],
        grad: GradMode,
    ) -> (Vec<Tensor<f64>>, Tensor<f64>, Tensor<f64>) {
        let steps = xs.len();
        l.a.zero_grad();
        l.b.zero_grad();
        let mut st = State::Empty;
        let mut caches: Vec<Cache> = (0..steps).map(|_| Cache::new()).collect();
        for t in 0..steps {
            l.forward(
                &xs[t],
                &StepCtx::train(t, steps, grad),
                &mut st,
                Some(&mut caches[t]),
            )
            .unwrap();
        }
        let mut dxs = vec![Tensor::zeros(ndarray::IxDyn(&[0])); steps];
        let mut ds = State::Empty;
        for t in (0..steps).rev() {
            if grad == GradMode::Online {
                ds = State::Empty;
            }
            dxs[t] = l
                .backward(&rs[t], &StepCtx::train(t, steps, grad), &caches[t], &mut ds)
                .unwrap();
        }
        (dxs, l.a.grad.clone(), l.b.grad.clone())
    }

    #[test]
    fn theorem_4_2_always_firing_online_equals_bptt_except_threshold() {
        let mut rng = Rng::new(7);
        let steps = 4;
        let shape = [3, 2, 2, 2];
        let mut l = EmpfV1::<f64>::new("n1", steps);
        randomise(&mut l, &mut rng);
        // always firing: I ≥ 1 > θ; always silent: λ v + I < θ with v ≤ θ needs I < (1 − λ) θ
        let fire: Vec<_> = (0..steps)
            .map(|_| input(&shape, 0.2, &mut rng).mapv(|v| v.abs() + 1.0))
            .collect();
        let rs: Vec<_> = (0..steps).map(|_| input(&shape, 1.0, &mut rng)).collect();
        let (dx_o, da_o, db_o) = v1_grads(&mut l, &fire, &rs, GradMode::Online);
        let (dx_b, da_b, db_b) = v1_grads(&mut l, &fire, &rs, GradMode::Bptt);
        assert_eq!(dx_o, dx_b);
        assert_eq!(da_o, da_b);
        // θ[t] reaches m[t+1] through λ[t+1]·v[t] only in BPTT: the last step agrees, earlier differ
        assert_eq!(db_o[[steps - 1]], db_b[[steps - 1]]);
        for t in 0..steps - 1 {
            assert!((db_o[[t]] - db_b[[t]]).abs() > 1e-6, "t={t}");
        }
        let silent: Vec<_> = (0..steps)
            .map(|_| input(&shape, 0.2, &mut rng).mapv(|v| -v.abs() - 0.1))
            .collect();
        for grad in [GradMode::Online, GradMode::Bptt] {
            let (dx, da, db) = v1_grads(&mut l, &silent, &rs, grad);
            assert!(dx.iter().all(|d| d.iter().all(|&v| v == 0.0)));
            assert!(da.iter().chain(db.iter()).all(|&v| v == 0.0));
        }
    }

    /// Gradients of a T-step run of any layer in one mode: dL/dx[t] and every trainable gradient.
    #[allow(clippy::type_complexity)]
    fn run_grads(
        l: &mut dyn Layer<f64>,
        xs: &[Tensor<f64>],
        rs: &[Tensor<f64>],
        grad: GradMode,
    ) -> (Vec<Tensor<f64>>, Vec<(String, Tensor<f64>)>) {
        let steps = xs.len();
        l.visit_params(&mut |p| {
            if p.trainable() {
                p.zero_grad()
            }
        });
        let mut st = State::Empty;
        let mut caches: Vec<Cache> = (0..steps).map(|_| Cache::new()).collect();
        for t in 0..steps {
            let ctx = StepCtx::train(t, steps, grad);
            l.forward(&xs[t], &ctx, &mut st, Some(&mut caches[t]))
                .unwrap();
        }
        let mut dxs = vec![Tensor::zeros(ndarray::IxDyn(&[0])); steps];
        let mut ds = State::Empty;
        for t in (0..steps).rev() {
            if grad == GradMode::Online {
                ds = State::Empty;
            }
            let ctx = StepCtx::train(t, steps, grad);
            dxs[t] = l.backward(&rs[t], &ctx, &caches[t], &mut ds).unwrap();
        }
        let mut gs = Vec::new();
        l.visit_params(&mut |p| {
            if p.trainable() {
                gs.push((p.name.clone(), p.grad.clone()))
            }
        });
        (dxs, gs)
    }

    #[test]
    fn corollary_4_3_always_firing_mpbn_online_equals_bptt_except_threshold() {
        let mut rng = Rng::new(8);
        let (steps, shape) = (3, [4, 2, 3, 1]);
        let mut l = EmpfV2::<f64>::new("n2", 2, steps);
        // α1 = α2 = 1/2, γ = 1, β = 0: |BN(m)| ≤ sqrt(M − 1) < 3.5, so m ≥ 8 gives m̂ > 2 > θ
        l.a.value.mapv_inplace(|_| rng.normal());
        l.b.value.mapv_inplace(|_| rng.normal());
        let xs: Vec<_> = (0..steps)
            .map(|_| input(&shape, 1.0, &mut rng).mapv(|v| 9.0 + v.clamp(-1.0, 1.0)))
            .collect();
        let rs: Vec<_> = (0..steps).map(|_| input(&shape, 1.0, &mut rng)).collect();
        let (dx_o, g_o) = run_grads(&mut l, &xs, &rs, GradMode::Online);
        let (dx_b, g_b) = run_grads(&mut l, &xs, &rs, GradMode::Bptt);
        assert_eq!(dx_o, dx_b);
        for ((name, go), (_, gb)) in g_o.iter().zip(&g_b) {
            if name == "n2.b" {
                assert_eq!(go[[steps - 1]], gb[[steps - 1]]);
                for t in 0..steps - 1 {
                    assert!((go[[t]] - gb[[t]]).abs() > 1e-6, "{name}[{t}]");
                }
            } else {
                assert_eq!(go, gb, "{name}");
            }
        }
    }

    #[test]
    fn lif_heaviside_uses_the_same_surrogate_backward() {
        let shape = [4, 6];
        for reset in [Reset::Soft, Reset::Hard] {
            let mut outs = Vec::new();
            for spike in [SpikeFn::Heaviside, SpikeFn::SmoothTriangle] {
                let mut l = Lif::<f64>::new("lif");
                l.spike = spike;
                l.reset = reset;
                let mut r2 = Rng::new(9);
                let x = input(&shape, 1.0, &mut r2).mapv(|v| v + 0.5);
                let dy = input(&shape, 1.0, &mut r2);
                let ctx = StepCtx::train(0, 1, GradMode::Online);
                let mut cache = Cache::new();
                let y = l
                    .forward(&x, &ctx, &mut State::Empty, Some(&mut cache))
                    .unwrap();
                if spike == SpikeFn::Heaviside {
                    assert!(y.iter().all(|&s| s == 0.0 || s == 1.0));
                    assert!(y.iter().any(|&s| s == 1.0) && y.iter().any(|&s| s == 0.0));
                }
                outs.push(l.backward(&dy, &ctx, &cache, &mut State::Empty).unwrap());
            }
            assert_eq!(outs[0], outs[1]);
        }
        // the surrogate is the triangle of width γ = 1 around θ = 1
        let l = Lif::<f64>::new("lif");
        assert_eq!(l.surrogate(1.0), 1.0);
        assert_eq!(l.surrogate(1.5), 0.5);
        assert_eq!(l.surrogate(-0.25), 0.0);
        assert_eq!(l.surrogate(2.0), 0.0);
        // soft reset subtracts θ, hard reset zeroes
        let mut l = Lif::<f64>::new("lif");
        let mut st = State::Empty;
        let x = from_vec(&[1, 2], vec![1.5, 0.5]);
        l.forward(&x, &StepCtx::eval(0, 1), &mut st, None).unwrap();
        assert_eq!(st.tensor().unwrap().as_slice().unwrap(), &[0.5, 0.5]);
        l.reset = Reset::Hard;
        let mut st = State::Empty;
        l.forward(&x, &StepCtx::eval(0, 1), &mut st, None).unwrap();
        assert_eq!(st.tensor().unwrap().as_slice().unwrap(), &[0.0, 0.5]);
    }

    #[test]
    fn online_caches_keep_only_a_bit_mask_and_the_fired_entries_of_the_previous_potential() {
        let shape = [8, 16, 4, 4];
        let len: usize = shape.iter().product();
        let mut rng = Rng::new(1);
        let x = input(&shape, 1.0, &mut rng).mapv(|v| v as f32);
        let mut l = EmpfV1::<f32>::new("n1", 2);
        let mut cache = Cache::new();
        let mut st = State::Empty;
        l.forward(
            &x,
            &StepCtx::train(0, 2, GradMode::Online),
            &mut st,
            Some(&mut cache),
        )
        .unwrap();
        assert_eq!(cache.bytes(), len / 8, "t = 0 keeps only the mask");
        l.forward(
            &x,
            &StepCtx::train(1, 2, GradMode::Online),
            &mut st,
            Some(&mut cache),
        )
        .unwrap();
        let c = cache.get::<EmpfV1Cache<f32>>("n1").unwrap();
        let fired = (0..len).filter(|&i| c.fired.get(i)).count();
        assert!(fired > 0 && fired < len, "{fired} of {len}");
        // the same input at both steps: what fires at t = 1 fired at t = 0, so sits at θ[0]
        let merged = c.v_prev_fired.as_ref().unwrap().eq_words();
        let merged = merged.iter();
        let merged = merged.map(|w| w.count_ones() as usize).sum::<usize>();
        assert!(merged > fired / 2, "{merged} of {fired} merged");
        assert_eq!(cache.bytes(), 2 * (len / 8) + (fired - merged) * 4);
        let mut l3 = EmpfV3::<f32>::new("n3", 2);
        l3.forward(
            &x,
            &StepCtx::train(1, 2, GradMode::Online),
            &mut st,
            Some(&mut cache),
        )
        .unwrap();
        assert_eq!(cache.bytes(), len / 8);
    }

    /// The one-pass V1 forward kernel gives bit for bit what the separate passes give (charge
    /// `m = λ·p + I`, gather `p` where `m > θ`, fire), in all three state layouts and across
    /// several parallel items with a ragged tail.
    #[test]
    fn fused_charge_fire_equals_the_separate_passes_bit_for_bit() {
        let n = 2 * PAR_CHUNK + 777;
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let (lam, th, common) = (0.6f32, 0.45f32, 0.4f32);
        // a third of the state sits at the previous threshold (neurons that fired at t − 1)
        let p: Vec<f32> = (0..n)
            .map(|i| match i % 3 {
                0 => common,
                _ => (rng.normal() * 0.5) as f32,
            })
            .collect();
        for from in [ChargeFrom::Zero, ChargeFrom::InPlace, ChargeFrom::Separate] {
            // reference: the separate passes
            let mut m = x.clone();
            if from != ChargeFrom::Zero {
                for (o, &q) in m.iter_mut().zip(&p) {
                    *o += lam * q;
                }
            }
            let mut want_fired = FiredValues::default();
            want_fired.gather(&p, &m, th, Some(common));
            let (mut want_s, mut want_v, mut want_mask) = (m, vec![0.0f32; n], BitMask::default());
            fire(th, &mut want_s, &mut want_v, &mut want_mask);
            // fused
            let mut v = match from {
                ChargeFrom::InPlace => p.clone(),
                _ => vec![0.0f32; n],
            };
            let (mut s, mut mask, mut fired) =
                (vec![0.0f32; n], BitMask::default(), FiredValues::default());
            fired.common = Some(common);
            let prev = (from == ChargeFrom::Separate).then_some(p.as_slice());
            charge_fire(
                lam,
                th,
                &x,
                prev,
                from,
                &mut v,
                &mut s,
                &mut mask,
                Some(&mut fired),
            );
            let bits = |a: &[f32]| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&s), bits(&want_s), "{from:?}: spikes");
            assert_eq!(bits(&v), bits(&want_v), "{from:?}: potential");
            assert_eq!(mask.words, want_mask.words, "{from:?}: mask");
            if from == ChargeFrom::InPlace {
                let flat = |f: &FiredValues<f32>| f.values();
                assert_eq!(
                    bits(&flat(&fired)),
                    bits(&flat(&want_fired)),
                    "fired values"
                );
                assert_eq!(
                    fired.eq_words(),
                    want_fired.eq_words(),
                    "values at `common`"
                );
                let merged = want_fired
                    .eq_words()
                    .iter()
                    .map(|w| w.count_ones())
                    .sum::<u32>();
                assert!(merged > 1000, "{merged} fired values merged");
                assert!(fired.cache_bytes() > 0);
            } else {
                assert_eq!(fired.cache_bytes(), 0, "{from:?} gathers nothing");
            }
        }
    }

    /// The online backward keeps `v[t−1]` only where the neuron fired; it must give exactly what
    /// the full-tensor reference path (the BPTT cache, with no `dL/dv[t]` coming in) gives.
    #[test]
    fn v1_online_backward_from_fired_values_equals_the_full_potential_reference() {
        let shape = [4, 8, 9, 9];
        let mut rng = Rng::new(5);
        for big in [false, true] {
            // big: 52272 elements, several PAR_CHUNK items
            let shape: Vec<usize> = if big {
                vec![3, 16, 33, 33]
            } else {
                shape.to_vec()
            };
            let mut on = EmpfV1::<f64>::new("n", 3);
            randomise(&mut on, &mut rng);
            let mut rf = EmpfV1::<f64>::new("n", 3);
            rf.a.value = on.a.value.clone();
            rf.b.value = on.b.value.clone();
            let (mut st_on, mut st_rf) = (State::Empty, State::Empty);
            for t in 0..3 {
                let x = input(&shape, 1.0, &mut rng);
                let dy = input(&shape, 1.0, &mut rng);
                let (c_on, c_rf) = (
                    StepCtx::train(t, 3, GradMode::Online),
                    StepCtx::train(t, 3, GradMode::Bptt),
                );
                let (mut k_on, mut k_rf) = (Cache::new(), Cache::new());
                let y_on = on.forward(&x, &c_on, &mut st_on, Some(&mut k_on)).unwrap();
                let y_rf = rf.forward(&x, &c_rf, &mut st_rf, Some(&mut k_rf)).unwrap();
                assert_eq!(y_on, y_rf);
                assert_eq!(st_on.tensor().unwrap(), st_rf.tensor().unwrap());
                if t > 0 {
                    assert!(k_on.bytes() < k_rf.bytes());
                    // neurons that fired at t − 1 too are kept as bits, not values
                    let f = k_on.get::<EmpfV1Cache<f64>>("n").unwrap();
                    let f = f.v_prev_fired.as_ref().unwrap();
                    let merged: u32 = f.eq_words().iter().map(|w| w.count_ones()).sum();
                    assert!(merged > 0, "t = {t}: no value merged");
                }
                let dx_on = on.backward(&dy, &c_on, &k_on, &mut State::Empty).unwrap();
                let dx_rf = rf.backward(&dy, &c_rf, &k_rf, &mut State::Empty).unwrap();
                assert_eq!(dx_on, dx_rf);
                assert_eq!(on.a.grad, rf.a.grad, "dL/da at t = {t}");
                assert_eq!(on.b.grad, rf.b.grad, "dL/db at t = {t}");
            }
            assert!(on.a.grad.iter().any(|&g| g != 0.0));
        }
    }

    #[test]
    fn bad_shapes_are_shape_errors_naming_the_layer() {
        let ctx = StepCtx::eval(0, 2);
        let mut layers: Vec<Box<dyn Layer<f32>>> = vec![
            Box::new(EmpfV1::new("nA", 2)),
            Box::new(EmpfV2::new("nB", 3, 2)),
            Box::new(EmpfV3::new("nC", 2)),
            Box::new(Lif::new("nD")),
            Box::new(EmpfV2::<f32>::new("nE", 3, 2).to_folded()),
        ];
        for l in &mut layers {
            for shape in [vec![2, 3, 4], vec![6], vec![2, 0]] {
                let x = crate::tensor::zeros::<f32>(&shape);
                let e = l.forward(&x, &ctx, &mut State::Empty, None).unwrap_err();
                assert!(matches!(e, Error::Shape { .. }), "{e}");
                assert!(e.to_string().contains(l.name()), "{e}");
            }
            // a carried state of another shape
            let x = crate::tensor::zeros::<f32>(&[2, 3]);
            let mut st = State::Tensor(crate::tensor::zeros::<f32>(&[2, 4]));
            let e = l.forward(&x, &ctx, &mut st, None);
            if l.kind() != "EmpfV3" {
                assert!(matches!(e.unwrap_err(), Error::Shape { .. }));
            }
        }
        // channel count mismatch for the BN neuron
        let mut v2 = EmpfV2::<f32>::new("nB", 3, 2);
        let e = v2
            .forward(
                &crate::tensor::zeros(&[2, 4, 2, 2]),
                &ctx,
                &mut State::Empty,
                None,
            )
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }));
        // T·N rows for the batched V3
        let mut v3 = EmpfV3::<f32>::new("nC", 2);
        let e = v3
            .forward_all(&crate::tensor::zeros(&[3, 4]), None)
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }));
    }
}
