//! `empf-simd`: bit-level kernels for binary synapses (see `simd/README.md`).
//!
//! This crate knows nothing about neural networks: slices in, slices out. All `unsafe` code of the
//! empf workspace lives here, each block with a SAFETY comment; the public API is safe.
//!
//! # Encodings
//! * Bits are packed little-endian into `u64` words: element `k` of a row is bit `k % 64` of word
//!   `k / 64`. Rows of a [`PackedMatrix`] are padded with zero bits to a multiple of 256 bits (4 words)
//!   so every vector level reads whole vectors (AVX-512 reads a 4-word tail with a masked load).
//! * Binary spikes `{0,1}` pack with [`Binarize::Positive`] (bit = `x > 0`); ±1 values pack with
//!   [`Binarize::Sign`] (bit = `x >= 0`, i.e. bit 1 ↔ +1, bit 0 ↔ −1).
//! * k-bit unsigned activations `q = Σ_b 2^b p_b` pack into `k` bit planes `p_b`.
//!
//! # Kernels (all integer results are bit-exact across ISA levels)
//! * [`BinOp::And`]: spikes `s ∈ {0,1}` × weights `w ∈ {±1}`: `dot = Σ s·w = 2·popc(s ∧ w⁺) − popc(s)`
//!   (`w⁺` = bits of the +1 weights). Zero padding is exact (padded bits of `s` are 0).
//!   With a k-plane left operand it is bit-serial: `dot = Σ_b 2^b (2·popc(p_b ∧ w⁺) − popc(p_b))`.
//! * [`BinOp::Xor`]: `a, w ∈ {±1}`: `dot = K − 2·popc(a ⊕ w)`; in convolutions the spatial zero
//!   padding is exact (padded taps contribute 0, corrected per output channel with `popc(w_tap)`).
//! * [`Simd::gemv_masked`]: float `x` × ±1 weights read at one bit each: `y_j = 2·Σ_{w_jk=+1} x_k − Σ_k
//!   x_k` (masked adds).
//! * [`Epilogue`]: per-channel `y = scale·dot + bias` (scale α and a folded BN affine), then optionally
//!   the EM-PF update `m = λv + y`, `s = ReLU(m − θ)`, `v = m − s`, written as float or re-quantised
//!   spikes `q = clamp(round(s/step), 0, 2^bits − 1)`.
//!
//! Work is split over output rows with rayon (`rayon::current_num_threads()` tasks); run inside a
//! `rayon::ThreadPool::install` to control the thread count.

#[cfg(target_arch = "aarch64")]
mod aarch64 {
    pub(crate) mod neon;
}
pub mod alloc;
#[cfg(target_arch = "x86_64")]
mod dense_q;
mod dispatch;
mod driver;
mod pool;
mod reference;
mod sparse;
mod sparse_dw;
mod vectorize;
#[cfg(target_arch = "x86_64")]
mod x86_64 {
    pub(crate) mod avx2;
    pub(crate) mod avx512;
}

pub use dispatch::{Isa, kernel_name};
use driver::{ConvRows, Finish, Kernels, MatrixRows};

/// Which k-bit convolution kernel runs where both could ([`Simd::sparse_conv_q`],
/// [`Simd::sparse_conv_q_spikes_vec`]): the dense 8-bit dot-product kernel (AVX-512 VNNI, stride 1)
/// or the sparse kernels that skip zero levels. Both sum the same integers exactly, so the results
/// are identical; only the speed differs. Process-wide, for benchmarks and tests
/// ([`set_dense_q`]); elsewhere than AVX-512 VNNI and stride 1 the sparse kernels always run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseQ {
    /// The kernel of fewer estimated cycles for the share of non-zero inputs (the default).
    Auto,
    /// The dense kernel wherever it can run.
    Always,
    /// The sparse kernels.
    Never,
}

static DENSE_Q: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the process-wide [`DenseQ`] policy.
pub fn set_dense_q(policy: DenseQ) {
    let v = match policy {
        DenseQ::Auto => 0,
        DenseQ::Always => 1,
        DenseQ::Never => 2,
    };
    DENSE_Q.store(v, std::sync::atomic::Ordering::Relaxed)
}

/// The process-wide [`DenseQ`] policy.
pub fn dense_q() -> DenseQ {
    match DENSE_Q.load(std::sync::atomic::Ordering::Relaxed) {
        1 => DenseQ::Always,
        2 => DenseQ::Never,
        _ => DenseQ::Auto,
    }
}
pub use sparse::{QuantConvWeights, SignConvWeights};
pub use vectorize::{VectorLevel, VectorWork, vector_level, vectorized};

/// An EM-PF neuron layer after a convolution ([`Simd::conv_q_empf`]): for each step `t` and
/// output channel `o` of the convolution's outputs `y`, `m = k·y + b` (with `affine`) or `m = y`;
/// after step 0, `m = m + λ·v`; then a spike `m − θ` and `v = θ` where `m > θ`, else a spike 0 and
/// `v = m` (each product and sum rounded on its own, no fused multiply-add).
#[derive(Clone, Copy, Debug)]
pub struct EmpfNeuron<'a> {
    /// Time-steps `T`.
    pub steps: usize,
    /// `λ` per step and channel (`T x O`), or per step (`T`, for every channel).
    pub leak: &'a [f32],
    /// `(k, b)` per step and channel, laid out as `leak` (a folded Version II input affine).
    pub affine: Option<(&'a [f32], &'a [f32])>,
    /// `θ` per step.
    pub threshold: &'a [f32],
    /// A 2x2, stride-2 average pool of the spikes follows (odd sizes drop their last row and
    /// column), in [`Simd::avg_pool_2x2`]'s additions.
    pub pool: bool,
}

impl EmpfNeuron<'_> {
    /// Whether the parameters are those of `steps` steps of `channels` channels: λ (and `k`, `b`)
    /// per step and channel or per step, θ per step.
    pub(crate) fn fits(&self, steps: usize, channels: usize) -> bool {
        let per = self.leak.len().checked_div(self.steps).unwrap_or(0);
        self.steps == steps
            && (per == 1 || per == channels)
            && self.leak.len() == steps * per
            && self.threshold.len() == steps
            && self
                .affine
                .is_none_or(|(k, b)| k.len() == steps * per && b.len() == steps * per)
    }
}

/// The input of [`Simd::conv_q_empf`]: spikes, or the inputs of an EM-PF neuron layer that the
/// kernel runs (with the 4 channels of a packed group and all steps of a pixel block in
/// registers) as it quantises and packs them, so its spikes are never stored.
#[derive(Clone, Copy, Debug)]
pub struct ConvInput<'a> {
    /// `T·N x C x H x W`, step-major; with `repeated`, `N x C x H x W`, the same at every step.
    pub x: &'a [f32],
    /// `x` holds one image per sample, read at every step.
    pub repeated: bool,
    /// An EM-PF neuron layer (no pool; `λ`, `(k, b)` per step and input channel, or per step)
    /// between `x` and the convolution.
    pub neuron: Option<EmpfNeuron<'a>>,
}

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimdError {
    /// Operand shapes or lengths do not match (the message names the function and the shapes).
    Shape(String),
    /// A requested instruction-set level is unknown or unavailable on this host.
    Isa(String),
}

impl std::fmt::Display for SimdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimdError::Shape(s) => write!(f, "empf-simd shape error: {s}"),
            SimdError::Isa(s) => write!(f, "empf-simd ISA error: {s}"),
        }
    }
}

impl std::error::Error for SimdError {}

type Result<T> = std::result::Result<T, SimdError>;

fn shape_err<T>(msg: String) -> Result<T> {
    Err(SimdError::Shape(msg))
}

/// How floats become bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binarize {
    /// bit = `x > 0` (spikes `{0,1}`; NaN → 0).
    Positive,
    /// bit = `x >= 0` (signs: bit 1 ↔ +1; −0.0 → 1, NaN → 0).
    Sign,
}

impl Binarize {
    /// The bit of one value.
    #[inline]
    pub fn bit(self, x: f32) -> bool {
        match self {
            Binarize::Positive => x > 0.0,
            Binarize::Sign => x >= 0.0,
        }
    }
}

/// Which popcount kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    /// `{0,1}` (or k-bit planes) × ±1: `2·popc(a ∧ w⁺) − popc(a)`.
    And,
    /// ±1 × ±1: `K − 2·popc(a ⊕ w)`.
    Xor,
}

/// Words per packed row holding `bits` bits, padded to a multiple of 4 words (256 bits).
pub fn padded_words(bits: usize) -> usize {
    bits.div_ceil(256) * 4
}

/// A bit-packed matrix: `rows` logical rows of `cols` bits, each stored as `planes` consecutive rows
/// of [`PackedMatrix::kwords`] words (plane `b` of row `i` at row index `i·planes + b`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    planes: usize,
    kwords: usize,
    data: Vec<u64>,
}

impl PackedMatrix {
    /// Logical rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Bits per row (before padding).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bit planes per row (1 unless packed from k-bit integers).
    pub fn planes(&self) -> usize {
        self.planes
    }
    /// Words per stored row (multiple of 4).
    pub fn kwords(&self) -> usize {
        self.kwords
    }
    /// The packed words.
    pub fn words(&self) -> &[u64] {
        &self.data
    }

    /// Packs k-bit unsigned integers (`x[i*cols + k] < 2^bits`, row-major) into `bits` planes
    /// (scalar; done once per layer input).
    pub fn from_u8_planes(x: &[u8], rows: usize, cols: usize, bits: u32) -> Result<PackedMatrix> {
        if !(1..=8).contains(&bits) || x.len() != rows * cols {
            return shape_err(format!(
                "PackedMatrix::from_u8_planes: {} values for {rows}x{cols}, bits={bits} (need 1..=8)",
                x.len()
            ));
        }
        if bits < 8
            && let Some(v) = x.iter().find(|&&v| u32::from(v) >> bits != 0)
        {
            return shape_err(format!(
                "PackedMatrix::from_u8_planes: value {v} does not fit in {bits} bits"
            ));
        }
        let p = bits as usize;
        let kw = padded_words(cols);
        let mut data = vec![0u64; rows * p * kw];
        for i in 0..rows {
            for (k, &v) in x[i * cols..(i + 1) * cols].iter().enumerate() {
                for b in 0..p {
                    if v >> b & 1 == 1 {
                        data[(i * p + b) * kw + k / 64] |= 1 << (k % 64);
                    }
                }
            }
        }
        Ok(PackedMatrix {
            rows,
            cols,
            planes: p,
            kwords: kw,
            data,
        })
    }
}

/// A bit-packed image batch in NHWC order with `cw = ceil(c/64)` words per pixel and plane:
/// `data[((n·h + y)·w + x)·planes·cw + b·cw + word]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedImage {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    cw: usize,
    planes: usize,
    data: Vec<u64>,
}

impl PackedImage {
    /// `(n, h, w, c)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.n, self.h, self.w, self.c)
    }
    /// Bit planes per pixel.
    pub fn planes(&self) -> usize {
        self.planes
    }
    /// The packed words.
    pub fn words(&self) -> &[u64] {
        &self.data
    }

    /// Packs k-bit unsigned NHWC integers into `bits` planes.
    pub fn from_u8_nhwc(
        x: &[u8],
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        bits: u32,
    ) -> Result<PackedImage> {
        let m = PackedMatrix::from_u8_planes(x, n * h * w, c, bits).map_err(|e| match e {
            SimdError::Shape(s) => {
                SimdError::Shape(format!("PackedImage::from_u8_nhwc {n}x{h}x{w}x{c}: {s}"))
            }
            e => e,
        })?;
        let cw = c.div_ceil(64);
        let p = bits as usize;
        let mut data = vec![0u64; n * h * w * p * cw];
        for (r, dst) in data.chunks_exact_mut(cw).enumerate() {
            dst.copy_from_slice(&m.data[r * m.kwords..r * m.kwords + cw]);
        }
        Ok(PackedImage {
            n,
            h,
            w,
            c,
            cw,
            planes: p,
            data,
        })
    }
}

/// Convolution weights `[cout][c][kh][kw]` packed as signs (bit 1 ↔ +1), one row per output channel
/// in tap-major order (`[ky][kx][channel words]`), rows padded to a multiple of 4 words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedConvWeights {
    cout: usize,
    c: usize,
    kh: usize,
    kw: usize,
    kwords: usize,
    data: Vec<u64>,
    /// `popc` of the weight bits of each tap: `[cout][kh·kw]`.
    tap_pop: Vec<u32>,
}

impl PackedConvWeights {
    /// `(cout, c, kh, kw)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.cout, self.c, self.kh, self.kw)
    }

    /// Packs float weights `[cout][c][kh][kw]` (OIHW) by sign. At most 64 taps (`kh·kw <= 64`).
    pub fn from_f32_oihw(
        w: &[f32],
        cout: usize,
        c: usize,
        kh: usize,
        kw: usize,
    ) -> Result<PackedConvWeights> {
        if w.len() != cout * c * kh * kw || kh * kw == 0 || kh * kw > 64 || c == 0 {
            return shape_err(format!(
                "PackedConvWeights::from_f32_oihw: {} weights for [{cout}][{c}][{kh}][{kw}] (need kh*kw in 1..=64, c >= 1)",
                w.len()
            ));
        }
        let cw = c.div_ceil(64);
        let taps = kh * kw;
        let kwords = padded_words(taps * cw * 64);
        let mut data = vec![0u64; cout * kwords];
        let mut tap_pop = vec![0u32; cout * taps];
        for o in 0..cout {
            for ci in 0..c {
                for t in 0..taps {
                    if Binarize::Sign.bit(w[(o * c + ci) * taps + t]) {
                        data[o * kwords + t * cw + ci / 64] |= 1 << (ci % 64);
                        tap_pop[o * taps + t] += 1;
                    }
                }
            }
        }
        Ok(PackedConvWeights {
            cout,
            c,
            kh,
            kw,
            kwords,
            data,
            tap_pop,
        })
    }
}

/// The optional EM-PF neuron of an [`Epilogue`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neuron {
    /// Leak λ.
    pub lambda: f32,
    /// Threshold θ.
    pub theta: f32,
}

/// Fused epilogue: `y = scale[c]·dot + bias[c]` per output channel `c` (α times a folded BN scale,
/// and the folded BN shift), then optionally the EM-PF update with membrane state `v`.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// Per-channel multiplier.
    pub scale: &'a [f32],
    /// Per-channel offset.
    pub bias: &'a [f32],
    /// EM-PF neuron (state passed to the call), or `None` to write `y`.
    pub neuron: Option<Neuron>,
}

/// Where the epilogue writes.
#[derive(Debug)]
pub enum SpikeOut<'a> {
    /// Float output.
    F32(&'a mut [f32]),
    /// Re-quantised `q = clamp(round(s/step), 0, 2^bits − 1)` (`bits` in 1..=8).
    Quant {
        /// Output values.
        out: &'a mut [u8],
        /// Quantisation step.
        step: f32,
        /// Bits per value.
        bits: u32,
    },
}

impl SpikeOut<'_> {
    fn len(&self) -> usize {
        match self {
            SpikeOut::F32(o) => o.len(),
            SpikeOut::Quant { out, .. } => out.len(),
        }
    }
}

/// Applies an [`Epilogue`] to `acc` (row-major, `channels` columns) with the scalar float code used
/// by every fused kernel (so results are identical across ISA levels). `v` is the membrane state
/// (same length as `acc`) when the epilogue has a neuron, else may be empty.
pub fn epilogue<A: Copy + Into<f64>>(
    acc: &[A],
    channels: usize,
    ep: &Epilogue<'_>,
    out: &mut SpikeOut<'_>,
    v: &mut [f32],
) -> Result<()> {
    check_epilogue("epilogue", acc.len(), channels, ep, out, v)?;
    driver::epilogue_rows(acc, channels, ep, out, v);
    Ok(())
}

fn check_epilogue(
    what: &str,
    len: usize,
    channels: usize,
    ep: &Epilogue<'_>,
    out: &SpikeOut<'_>,
    v: &[f32],
) -> Result<()> {
    let bad_bits = matches!(out, SpikeOut::Quant { bits, .. } if !(1..=8).contains(bits));
    if ep.scale.len() != channels
        || ep.bias.len() != channels
        || out.len() != len
        || (ep.neuron.is_some() && v.len() != len)
        || bad_bits
        || (channels == 0 && len != 0)
        || (channels > 0 && !len.is_multiple_of(channels))
    {
        return shape_err(format!(
            "{what}: epilogue with {channels} channels, {len} outputs: scale {}, bias {}, out {}, state {} (needed when a neuron is set), quant bits must be 1..=8",
            ep.scale.len(),
            ep.bias.len(),
            out.len(),
            v.len()
        ));
    }
    Ok(())
}

fn check_u8(what: &str, x: &[u8], len: usize, bits: u32, dims: &str) -> Result<()> {
    if !(1..=8).contains(&bits) || x.len() != len {
        return shape_err(format!(
            "{what}: {} values for {dims}, bits={bits} (need 1..=8)",
            x.len()
        ));
    }
    if bits < 8 && x.iter().fold(0u8, |acc, &v| acc | v) >> bits != 0 {
        return shape_err(format!(
            "{what}: a value of the {dims} input does not fit in {bits} bits"
        ));
    }
    Ok(())
}

/// A handle on one ISA level: every kernel entry point. Cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Simd {
    isa: Isa,
    kernels: KernelsDbg,
}

#[derive(Clone, Copy)]
struct KernelsDbg(Kernels);

impl std::fmt::Debug for KernelsDbg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kernels")
    }
}

impl PartialEq for KernelsDbg {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for KernelsDbg {}

impl Simd {
    /// A handle on `isa`; errors when the host lacks it.
    pub fn new(isa: Isa) -> Result<Simd> {
        isa.require()?;
        let kernels = match isa {
            Isa::Scalar => Kernels {
                popc: reference::popc,
                vertical: None,
                pack_row: reference::pack_row,
                masked_gemv: reference::masked_gemv,
                pack_u8_planes: reference::pack_u8_planes,
                sparse_conv: sparse::sparse_generic,
                sparse_conv_q: sparse::sparse_q_generic,
                quantise: sparse::quantise_generic,
                sparse_dw: sparse_dw::dw_generic,
                pool2: pool::pool2_generic,
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Kernels {
                popc: x86_64::avx2::popc,
                vertical: None,
                pack_row: x86_64::avx2::pack_row,
                masked_gemv: x86_64::avx2::masked_gemv,
                pack_u8_planes: x86_64::avx2::pack_u8_planes,
                sparse_conv: sparse::x86::sparse_avx2,
                sparse_conv_q: sparse::x86::sparse_q_avx2,
                quantise: sparse::x86::quantise_avx2,
                sparse_dw: sparse::x86::dw_avx2,
                pool2: pool::x86::pool2_avx2,
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Kernels {
                popc: x86_64::avx512::popc,
                vertical: Some(x86_64::avx512::vertical_popc),
                pack_row: x86_64::avx512::pack_row,
                masked_gemv: x86_64::avx512::masked_gemv,
                pack_u8_planes: x86_64::avx512::pack_u8_planes,
                sparse_conv: sparse::x86::sparse_avx512,
                sparse_conv_q: sparse::x86::sparse_q_avx512,
                quantise: sparse::x86::quantise_avx512,
                sparse_dw: sparse::x86::dw_avx512,
                pool2: pool::x86::pool2_avx512,
            },
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Kernels {
                popc: aarch64::neon::popc,
                vertical: None,
                pack_row: aarch64::neon::pack_row,
                masked_gemv: aarch64::neon::masked_gemv,
                pack_u8_planes: reference::pack_u8_planes,
                sparse_conv: sparse::sparse_generic,
                sparse_conv_q: sparse::sparse_q_generic,
                quantise: sparse::quantise_generic,
                sparse_dw: sparse_dw::dw_generic,
                pool2: pool::pool2_generic,
            },
            #[allow(unreachable_patterns)]
            _ => unreachable!("require() accepted an ISA not compiled for this target"),
        };
        Ok(Simd {
            isa,
            kernels: KernelsDbg(kernels),
        })
    }

    /// The process-wide default level ([`Isa::global`]: forced, else `EMPF_ISA`, else detected).
    ///
    /// # Panics
    /// When `EMPF_ISA` names an unknown or unavailable level.
    pub fn global() -> Simd {
        Simd::new(Isa::global()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The fastest level of this host.
    pub fn detect() -> Simd {
        Simd::new(Isa::detect()).expect("detected ISA is available")
    }

    /// The level of this handle.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Name of the popcount kernel of this handle.
    pub fn kernel_name(&self) -> &'static str {
        self.isa.kernel_name()
    }

    /// Name of the sparse-input convolution kernels of this handle.
    pub fn sparse_kernel_name(&self) -> &'static str {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512 register-blocked sparse",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if std::arch::is_x86_feature_detected!("fma") => {
                "avx2+fma register-blocked sparse"
            }
            Isa::Scalar => "scalar portable sparse",
            _ => "portable sparse",
        }
    }

    fn k(&self) -> Kernels {
        self.kernels.0
    }

    /// Packs a row-major `rows × cols` float matrix into bits (SIMD packer, rows in parallel).
    pub fn pack_rows(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        mode: Binarize,
    ) -> Result<PackedMatrix> {
        use rayon::prelude::*;
        if x.len() != rows * cols {
            return shape_err(format!("pack_rows: {} values for {rows}x{cols}", x.len()));
        }
        let kw = padded_words(cols);
        let mut data = vec![0u64; rows * kw];
        if cols > 0 {
            let pack = self.k().pack_row;
            data.par_chunks_mut(kw)
                .zip(x.par_chunks(cols))
                .with_min_len(16)
                .for_each(|(d, r)| pack(r, mode, d));
        }
        Ok(PackedMatrix {
            rows,
            cols,
            planes: 1,
            kwords: kw,
            data,
        })
    }

    /// Packs an NHWC float image batch (`x[((n·h + y)·w + x)·c + ch]`) into a [`PackedImage`].
    pub fn pack_image_nhwc(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        mode: Binarize,
    ) -> Result<PackedImage> {
        use rayon::prelude::*;
        if x.len() != n * h * w * c || c == 0 {
            return shape_err(format!(
                "pack_image_nhwc: {} values for NHWC {n}x{h}x{w}x{c}",
                x.len()
            ));
        }
        let cw = c.div_ceil(64);
        let mut data = vec![0u64; n * h * w * cw];
        let pack = self.k().pack_row;
        data.par_chunks_mut(cw)
            .zip(x.par_chunks(c))
            .with_min_len(64)
            .for_each(|(d, r)| pack(r, mode, d));
        Ok(PackedImage {
            n,
            h,
            w,
            c,
            cw,
            planes: 1,
            data,
        })
    }

    /// Packs k-bit unsigned integers (row-major `rows × cols`, each `< 2^bits`) into `bits` planes
    /// (SIMD packer, rows in parallel).
    pub fn pack_rows_u8(
        &self,
        x: &[u8],
        rows: usize,
        cols: usize,
        bits: u32,
    ) -> Result<PackedMatrix> {
        use rayon::prelude::*;
        check_u8(
            "pack_rows_u8",
            x,
            rows * cols,
            bits,
            &format!("{rows}x{cols}"),
        )?;
        let p = bits as usize;
        let kw = padded_words(cols);
        let mut data = vec![0u64; rows * p * kw];
        if cols > 0 {
            let pack = self.k().pack_u8_planes;
            data.par_chunks_mut(p * kw)
                .zip(x.par_chunks(cols))
                .with_min_len(16)
                .for_each(|(d, r)| pack(r, bits, kw, d));
        }
        Ok(PackedMatrix {
            rows,
            cols,
            planes: p,
            kwords: kw,
            data,
        })
    }

    /// Packs k-bit unsigned NHWC integers (each `< 2^bits`) into a `bits`-plane [`PackedImage`] (SIMD
    /// packer).
    pub fn pack_image_u8_nhwc(
        &self,
        x: &[u8],
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        bits: u32,
    ) -> Result<PackedImage> {
        use rayon::prelude::*;
        check_u8(
            "pack_image_u8_nhwc",
            x,
            n * h * w * c,
            bits,
            &format!("NHWC {n}x{h}x{w}x{c}"),
        )?;
        if c == 0 {
            return shape_err(format!(
                "pack_image_u8_nhwc: NHWC {n}x{h}x{w}x{c} has no channels"
            ));
        }
        let cw = c.div_ceil(64);
        let p = bits as usize;
        let mut data = vec![0u64; n * h * w * p * cw];
        let pack = self.k().pack_u8_planes;
        data.par_chunks_mut(p * cw)
            .zip(x.par_chunks(c))
            .with_min_len(64)
            .for_each(|(d, r)| pack(r, bits, cw, d));
        Ok(PackedImage {
            n,
            h,
            w,
            c,
            cw,
            planes: p,
            data,
        })
    }

    /// Packs an NCHW float image batch into a [`PackedImage`] (transposes through an NHWC buffer).
    pub fn pack_image_nchw(
        &self,
        x: &[f32],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        mode: Binarize,
    ) -> Result<PackedImage> {
        if x.len() != n * c * h * w || c == 0 {
            return shape_err(format!(
                "pack_image_nchw: {} values for NCHW {n}x{c}x{h}x{w}",
                x.len()
            ));
        }
        let hw = h * w;
        let mut t = vec![0f32; x.len()];
        for ni in 0..n {
            for ci in 0..c {
                let src = &x[(ni * c + ci) * hw..(ni * c + ci + 1) * hw];
                for (p, &v) in src.iter().enumerate() {
                    t[(ni * hw + p) * c + ci] = v;
                }
            }
        }
        self.pack_image_nhwc(&t, n, h, w, c, mode)
    }

    fn check_gemm(
        &self,
        what: &str,
        op: BinOp,
        a: &PackedMatrix,
        w: &PackedMatrix,
        out_len: usize,
    ) -> Result<()> {
        if a.cols != w.cols
            || w.planes != 1
            || out_len != a.rows * w.rows
            || (op == BinOp::Xor && a.planes != 1)
        {
            return shape_err(format!(
                "{what}({op:?}): a {}x{} ({} planes), w {}x{} ({} planes), out {out_len}: need equal cols, 1-plane w (and a for Xor), out = a.rows*w.rows",
                a.rows, a.cols, a.planes, w.rows, w.cols, w.planes
            ));
        }
        Ok(())
    }

    fn gemm_finish(op: BinOp, a: &PackedMatrix) -> Finish<'static> {
        match op {
            BinOp::And => Finish::And,
            BinOp::Xor => Finish::XorGemm { k: a.cols as i32 },
        }
    }

    /// Popcount GEMM: `out[i·w.rows + j] = dot(a_i, w_j)` (see [`BinOp`]; a k-plane `a` with
    /// [`BinOp::And`] is bit-serial).
    pub fn bgemm(
        &self,
        op: BinOp,
        a: &PackedMatrix,
        w: &PackedMatrix,
        out: &mut [i32],
    ) -> Result<()> {
        self.check_gemm("bgemm", op, a, w, out.len())?;
        let src = MatrixRows {
            data: &a.data,
            rows: a.rows,
            planes: a.planes,
            kwords: a.kwords,
            klen: a.cols.div_ceil(64),
        };
        driver::run(
            self.k(),
            op == BinOp::Xor,
            &src,
            &w.data,
            w.rows,
            &Self::gemm_finish(op, a),
            out,
            &mut [],
            |d, o, _| o.copy_from_slice(d),
        );
        Ok(())
    }

    /// [`Simd::bgemm`] followed by the [`Epilogue`] (channels = rows of `w`), applied per task while
    /// the tile is hot. `v` is the membrane state (`a.rows·w.rows`) when a neuron is set.
    pub fn bgemm_fused(
        &self,
        op: BinOp,
        a: &PackedMatrix,
        w: &PackedMatrix,
        ep: &Epilogue<'_>,
        out: SpikeOut<'_>,
        v: &mut [f32],
    ) -> Result<()> {
        self.check_gemm("bgemm_fused", op, a, w, out.len())?;
        check_epilogue("bgemm_fused", out.len(), w.rows, ep, &out, v)?;
        let src = MatrixRows {
            data: &a.data,
            rows: a.rows,
            planes: a.planes,
            kwords: a.kwords,
            klen: a.cols.div_ceil(64),
        };
        self.fused(
            op == BinOp::Xor,
            &src,
            &w.data,
            w.rows,
            &Self::gemm_finish(op, a),
            ep,
            out,
            v,
        );
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn fused<S: driver::RowSource>(
        &self,
        xor: bool,
        src: &S,
        w: &[u64],
        n: usize,
        finish: &Finish<'_>,
        ep: &Epilogue<'_>,
        out: SpikeOut<'_>,
        v: &mut [f32],
    ) {
        let v: &mut [f32] = if ep.neuron.is_some() { v } else { &mut [] };
        match out {
            SpikeOut::F32(o) => driver::run(self.k(), xor, src, w, n, finish, o, v, |d, o, s| {
                driver::epilogue_rows(d, n, ep, &mut SpikeOut::F32(o), s)
            }),
            SpikeOut::Quant { out, step, bits } => {
                driver::run(self.k(), xor, src, w, n, finish, out, v, |d, o, s| {
                    driver::epilogue_rows(d, n, ep, &mut SpikeOut::Quant { out: o, step, bits }, s)
                })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_rows<'a>(
        &self,
        what: &str,
        op: BinOp,
        img: &'a PackedImage,
        w: &PackedConvWeights,
        stride: usize,
        pad: usize,
        out_len: Option<usize>,
    ) -> Result<ConvRows<'a>> {
        let bad = |why: &str| {
            shape_err(format!(
                "{what}({op:?}): image NHWC {}x{}x{}x{} ({} planes), weights [{}][{}][{}][{}], stride {stride}, pad {pad}: {why}",
                img.n, img.h, img.w, img.c, img.planes, w.cout, w.c, w.kh, w.kw
            ))
        };
        if img.c != w.c {
            return bad("channel counts differ");
        }
        if stride == 0 {
            return bad("stride must be >= 1");
        }
        if op == BinOp::Xor && img.planes != 1 {
            return bad("Xor needs a 1-plane image");
        }
        if img.h + 2 * pad < w.kh || img.w + 2 * pad < w.kw {
            return bad("kernel larger than the padded image");
        }
        let oh = (img.h + 2 * pad - w.kh) / stride + 1;
        let ow = (img.w + 2 * pad - w.kw) / stride + 1;
        if let Some(l) = out_len
            && l != img.n * oh * ow * w.cout
        {
            return bad(&format!(
                "output has {l} elements, need N*OH*OW*COUT = {}x{oh}x{ow}x{}",
                img.n, w.cout
            ));
        }
        Ok(ConvRows {
            img,
            kh: w.kh,
            kw: w.kw,
            stride,
            pad,
            oh,
            ow,
            kwords: w.kwords,
        })
    }

    /// Output spatial size `(oh, ow)` of a convolution.
    pub fn conv_out_dims(
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Option<(usize, usize)> {
        if stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            return None;
        }
        Some((
            (h + 2 * pad - kh) / stride + 1,
            (w + 2 * pad - kw) / stride + 1,
        ))
    }

    fn conv_finish(op: BinOp, w: &PackedConvWeights) -> Finish<'_> {
        match op {
            BinOp::And => Finish::And,
            BinOp::Xor => Finish::XorConv {
                c: w.c as i32,
                taps: w.kh * w.kw,
                tap_pop: &w.tap_pop,
            },
        }
    }

    /// Binary convolution with zero padding over packed bits: `out` is NHWC `[n][oh][ow][cout]` of
    /// exact integer dot products (a k-plane image with [`BinOp::And`] is bit-serial).
    pub fn bconv(
        &self,
        op: BinOp,
        img: &PackedImage,
        w: &PackedConvWeights,
        stride: usize,
        pad: usize,
        out: &mut [i32],
    ) -> Result<()> {
        let src = self.conv_rows("bconv", op, img, w, stride, pad, Some(out.len()))?;
        driver::run(
            self.k(),
            op == BinOp::Xor,
            &src,
            &w.data,
            w.cout,
            &Self::conv_finish(op, w),
            out,
            &mut [],
            |d, o, _| o.copy_from_slice(d),
        );
        Ok(())
    }

    /// [`Simd::bconv`] with the [`Epilogue`] fused (channels = `cout`; `v` NHWC like the output when a
    /// neuron is set).
    #[allow(clippy::too_many_arguments)]
    pub fn bconv_fused(
        &self,
        op: BinOp,
        img: &PackedImage,
        w: &PackedConvWeights,
        stride: usize,
        pad: usize,
        ep: &Epilogue<'_>,
        out: SpikeOut<'_>,
        v: &mut [f32],
    ) -> Result<()> {
        let src = self.conv_rows("bconv_fused", op, img, w, stride, pad, Some(out.len()))?;
        check_epilogue("bconv_fused", out.len(), w.cout, ep, &out, v)?;
        self.fused(
            op == BinOp::Xor,
            &src,
            &w.data,
            w.cout,
            &Self::conv_finish(op, w),
            ep,
            out,
            v,
        );
        Ok(())
    }

    /// Raw popcount GEMM on packed words, single-threaded (for AVX-512 short rows this includes
    /// transposing `b` into the vertical kernel's panels):
    /// `out[i·n + j] = Σ_w popc(a[i·kw + w] OP b[j·kw + w])`, OP = AND or XOR, `kw` a multiple of 4
    /// (as produced by [`padded_words`]). Used by the peak-rate benchmark.
    #[allow(clippy::too_many_arguments)]
    pub fn popcount_gemm(
        &self,
        op: BinOp,
        a: &[u64],
        m: usize,
        b: &[u64],
        n: usize,
        kw: usize,
        out: &mut [u32],
    ) -> Result<()> {
        if !kw.is_multiple_of(4) || a.len() != m * kw || b.len() != n * kw || out.len() != m * n {
            return shape_err(format!(
                "popcount_gemm: a {} words, b {} words, out {}, for m={m} n={n} kw={kw} (kw a multiple of 4)",
                a.len(),
                b.len(),
                out.len()
            ));
        }
        let k = self.k();
        let bp = k.prepare(b, n, kw, kw);
        k.popc_prepared(op == BinOp::Xor, a, m, &bp, n, kw, kw, out);
        Ok(())
    }

    /// Float input × ±1 weights convolution that skips zero inputs (see the `sparse` module docs):
    /// `y[i][o] = scale[o]·Σ_{tap,c} x[i][c][tap]·w[o][c][tap] + shift[o]` for the `n` images of `x`
    /// (`n x C x H x W`, NCHW) into `y` (`n x O x OH x OW`, NCHW). Bit-identical across levels.
    /// Images `i` and `i + pair` (`pair > 0`) run together, sharing every weight load: pass the
    /// images per time-step of a step-major batch, so that consecutive steps of one sample, whose
    /// spikes mostly coincide, are paired. The result does not depend on `pair`.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_conv(
        &self,
        x: &[f32],
        dims: (usize, usize, usize),
        pair: usize,
        w: &SignConvWeights,
        stride: usize,
        pad: usize,
        scale: &[f32],
        shift: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let g = SparseGeom::new("sparse_conv", dims, w.dims(), stride, pad)?;
        g.check(x.len(), y.len(), scale, shift)?;
        sparse_into(
            &g,
            x,
            pair,
            w,
            scale,
            shift,
            as_out(y),
            self.k().sparse_conv,
        );
        Ok(())
    }

    /// [`Simd::sparse_conv`] into a new vector (not zeroed first: every output is written once).
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_conv_vec(
        &self,
        x: &[f32],
        dims: (usize, usize, usize),
        pair: usize,
        w: &SignConvWeights,
        stride: usize,
        pad: usize,
        scale: &[f32],
        shift: &[f32],
    ) -> Result<Vec<f32>> {
        let g = SparseGeom::new("sparse_conv", dims, w.dims(), stride, pad)?;
        let len = g.out_len();
        g.check(x.len(), len, scale, shift)?;
        Ok(filled(len, |y| {
            sparse_into(&g, x, pair, w, scale, shift, y, self.k().sparse_conv)
        }))
    }

    /// Weight gradient of a stride-1 convolution that skips zero inputs (see `sparse_dw` in the
    /// crate sources): `dw[o][c][i][j] = Σ_n Σ_{y,x} x[n][c][y][x]·g[n][o][y + pad − i][x + pad − j]`
    /// for inputs `x` (`n x C x H x W`, NCHW, `dims = (n, C, H, W)`), output gradients `g` (`n x O
    /// x OH x OW`, `OH = H + 2·pad − k + 1`), a `k x k` kernel and `pad ≤ k − 1`; `dw` (`O x C x k x
    /// k`) is overwritten. Fused multiply-adds in a fixed order: bit-identical across levels, and
    /// deterministic for a given `rayon::current_num_threads()` (the images are split into that
    /// many chunks, summed in order).
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_conv_dw(
        &self,
        x: &[f32],
        dims: (usize, usize, usize, usize),
        g: &[f32],
        out_ch: usize,
        k: usize,
        pad: usize,
        dw: &mut [f32],
    ) -> Result<()> {
        self.sparse_conv_backward(x, dims, g, out_ch, k, pad, dw, None)
            .map(|_| ())
    }

    /// [`Simd::sparse_conv_dw`], and with the weights `w` (`O x C x k x k`) also returns the input
    /// gradient `dx` (`n x C x H x W`) at the non-zero inputs, from the same pass (the transposed
    /// `g` and the list of non-zero inputs are shared):
    /// `dx[n][c][y][x] = Σ_o Σ_{i,j} w[o][c][i][j]·g[n][o][y + pad − i][x + pad − j]` where
    /// `x[n][c][y][x] ≠ 0`, and `0` where it is zero. That is the whole input gradient for a
    /// consumer that ignores the gradient where its output was zero (an EM-PF neuron: `ds/dm =
    /// H(m − θ)`, zero exactly where `s = 0`). Each `dx` value is one fixed-order sum (per-lane
    /// fused multiply-adds, then a fixed tree over the 8 lanes): bit-identical across levels and
    /// thread counts.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_conv_backward(
        &self,
        x: &[f32],
        dims: (usize, usize, usize, usize),
        g: &[f32],
        out_ch: usize,
        k: usize,
        pad: usize,
        dw: &mut [f32],
        w: Option<&[f32]>,
    ) -> Result<Option<Vec<f32>>> {
        use rayon::prelude::*;
        let weights = w;
        let (n, c, h, w) = dims;
        let fail = |what: &str| {
            shape_err(format!(
                "sparse_conv_dw: {what} (x {} for {n}x{c}x{h}x{w}, g {}, {out_ch} outputs, {k}x{k} kernel, pad {pad}, dw {})",
                x.len(),
                g.len(),
                dw.len()
            ))
        };
        if k == 0 || pad >= k || h + 2 * pad < k || w + 2 * pad < k {
            return fail("needs k >= 1, pad <= k - 1 and the padded input at least k x k");
        }
        let task = sparse_dw::DwTask {
            x,
            g,
            ns: n,
            c,
            h,
            w,
            o: out_ch,
            k,
            pad,
            wt: None,
        };
        let ((oh, ow), (hp, wp)) = (task.out_hw(), task.padded_hw());
        let (taps, xs, gs) = (k * k, c * h * w, out_ch * oh * ow);
        let mut sizes = vec![
            (n, xs, x.len()),
            (n, gs, g.len()),
            (out_ch, c * taps, dw.len()),
        ];
        if let Some(wts) = weights {
            sizes.push((out_ch, c * taps, wts.len()));
        }
        if sizes
            .iter()
            .any(|&(a, b, len)| a.checked_mul(b) != Some(len))
        {
            return fail("lengths do not match the shapes");
        }
        let op = task.op();
        if hp
            .checked_mul(wp)
            .and_then(|v| v.checked_mul(op))
            .is_none_or(|v| v > u32::MAX as usize)
        {
            return fail("the map is too large for 32-bit offsets");
        }
        // w[o][c][tap] -> wt[c][tap][o], zero lanes o >= O
        let wt = weights.map(|wts| {
            let mut wt = vec![0f32; c * taps * op];
            for (o, wo) in wts.chunks_exact(c * taps).enumerate() {
                for (ct, &v) in wo.iter().enumerate() {
                    wt[ct * op + o] = v;
                }
            }
            wt
        });
        // zeros: the kernel writes only the non-zero inputs' entries
        let mut dx = wt.as_ref().map(|_| vec![0f32; n * xs]);
        let kernel = self.k().sparse_dw;
        let parts = rayon::current_num_threads().clamp(1, n.max(1));
        // the chunks' input-gradient slices (empty without one)
        let mut dx_parts: Vec<&mut [f32]> = Vec::with_capacity(parts);
        let mut rest: &mut [f32] = dx.as_deref_mut().unwrap_or_default();
        for p in 0..parts {
            let (i0, i1) = (n * p / parts, n * (p + 1) / parts);
            let take = if wt.is_some() { (i1 - i0) * xs } else { 0 };
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
            dx_parts.push(head);
            rest = tail;
        }
        let parts: Vec<Vec<f32>> = dx_parts
            .into_par_iter()
            .enumerate()
            .map(|(p, dxp)| {
                let (i0, i1) = (n * p / parts, n * (p + 1) / parts);
                let mut dwt = vec![0f32; c * taps * op];
                let t = sparse_dw::DwTask {
                    x: &x[i0 * xs..i1 * xs],
                    g: &g[i0 * gs..i1 * gs],
                    ns: i1 - i0,
                    wt: wt.as_deref(),
                    ..task
                };
                kernel(&t, &mut sparse_dw::DwScratch::default(), &mut dwt, dxp);
                dwt
            })
            .collect();
        let mut parts = parts.into_iter();
        let mut sum = parts.next().expect("at least one part");
        for part in parts {
            for (s, v) in sum.iter_mut().zip(part) {
                *s += v;
            }
        }
        // dwt[c][tap][o] -> dw[o][c][tap]
        for (ci, rows) in sum.chunks_exact(taps * op).enumerate() {
            for (tap, row) in rows.chunks_exact(op).enumerate() {
                for (o, &v) in row[..out_ch].iter().enumerate() {
                    dw[(o * c + ci) * taps + tap] = v;
                }
            }
        }
        Ok(dx)
    }

    /// Whether [`Simd::sparse_conv_dw`] runs fused multiply-adds in hardware at this level (AVX2
    /// with FMA, any aarch64 level); elsewhere it is exact but slow (a software `fma` per term).
    pub fn sparse_dw_is_native(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self.isa != Isa::Scalar && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            cfg!(target_arch = "aarch64")
        }
    }

    /// 2x2, stride-2 average pooling of `planes` float planes `x` (`planes x H x W`, `hw = (H,
    /// W)`) into `y` (`planes x ⌊H/2⌋ x ⌊W/2⌋`), in the additions of the library's `AvgPool2d`
    /// forward (`((((0 + a0) + a1) + b0) + b1)·0.25`, upper row then lower row): the same floats at
    /// every level. Runs on the calling thread (callers pool a plane while it is in cache).
    pub fn avg_pool_2x2(&self, x: &[f32], hw: (usize, usize), y: &mut [f32]) -> Result<()> {
        let (h, w) = hw;
        let (plane, oplane) = (h * w, (h / 2) * (w / 2));
        let planes = x.len().checked_div(plane).unwrap_or(0);
        if plane == 0 || x.len() != planes * plane || y.len() != planes * oplane {
            return shape_err(format!(
                "avg_pool_2x2: x {} is not planes of {h}x{w}, or y {} is not its pooled planes",
                x.len(),
                y.len()
            ));
        }
        (self.k().pool2)(x, hw, y);
        Ok(())
    }

    /// Spike levels `q = clamp(round(x / step), 0, 2^bits − 1)` (round half away from zero, NaN ↦
    /// 0), as the trainer's spike quantiser; the same at every level.
    pub fn quantise(&self, x: &[f32], step: f32, bits: u32, q: &mut [u8]) -> Result<()> {
        use rayon::prelude::*;
        if x.len() != q.len() || !(1..=8).contains(&bits) {
            return shape_err(format!(
                "quantise: x {}, q {}, {bits} bits (1..=8)",
                x.len(),
                q.len()
            ));
        }
        let f = self.k().quantise;
        q.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14))
            .for_each(|(qc, xc)| f(xc, step, bits, qc));
        Ok(())
    }

    /// k-bit spike levels × ±1 weights convolution that skips zero levels, summing in 16-bit
    /// integer lanes where they cannot overflow (see the `sparse` module docs): `y[i][o] =
    /// scale[o]·Σ_{tap,c} q[i][c][tap]·w[o][c][tap] + shift[o]` for the `n` images of `q` (`n x C x H
    /// x W` levels below `2^w.bits()`, NCHW) into `y` (`n x O x OH x OW`, NCHW). The sums are exact
    /// integers, so every level gives the same result, equal to the bit-serial popcount
    /// convolution's with the same epilogue. `pair` as for [`Simd::sparse_conv`].
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_conv_q(
        &self,
        q: &[u8],
        dims: (usize, usize, usize),
        pair: usize,
        w: &QuantConvWeights,
        stride: usize,
        pad: usize,
        scale: &[f32],
        shift: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        let g = SparseGeom::new("sparse_conv_q", dims, w.dims(), stride, pad)?;
        g.check(q.len(), y.len(), scale, shift)?;
        check_levels(q, w.bits)?;
        sparse_into(
            &g,
            q,
            pair,
            w,
            scale,
            shift,
            as_out(y),
            self.k().sparse_conv_q,
        );
        Ok(())
    }

    /// [`Simd::sparse_conv_q`] into a new vector (not zeroed first: every output is written once).
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_conv_q_vec(
        &self,
        q: &[u8],
        dims: (usize, usize, usize),
        pair: usize,
        w: &QuantConvWeights,
        stride: usize,
        pad: usize,
        scale: &[f32],
        shift: &[f32],
    ) -> Result<Vec<f32>> {
        let g = SparseGeom::new("sparse_conv_q", dims, w.dims(), stride, pad)?;
        let len = g.out_len();
        g.check(q.len(), len, scale, shift)?;
        check_levels(q, w.bits)?;
        Ok(filled(len, |y| {
            sparse_into(&g, q, pair, w, scale, shift, y, self.k().sparse_conv_q)
        }))
    }

    /// [`Simd::sparse_conv_q_vec`] of the levels `clamp(round(x/step), 0, 2^w.bits() − 1)` of the
    /// float spikes `x` (as [`Simd::quantise`]), quantised inside the convolution's tasks: no
    /// level tensor is written, and the dense kernel quantises each input row as it packs it.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_conv_q_spikes_vec(
        &self,
        x: &[f32],
        step: f32,
        dims: (usize, usize, usize),
        pair: usize,
        w: &QuantConvWeights,
        stride: usize,
        pad: usize,
        scale: &[f32],
        shift: &[f32],
    ) -> Result<Vec<f32>> {
        let g = SparseGeom::new("sparse_conv_q_spikes", dims, w.dims(), stride, pad)?;
        let len = g.out_len();
        g.check(x.len(), len, scale, shift)?;
        let (quantise, kernel) = (self.k().quantise, self.k().sparse_conv_q);
        // the dense kernel belongs to the AVX-512 level (as in its level kernel)
        let dense = self.isa == Isa::Avx512;
        let xs = g.in_len();
        Ok(filled(len, |y| {
            g.drive(
                pair,
                y,
                |band, i, i2, sc: &mut sparse::SpikeScratch, yi, yj| {
                    let task = sparse::SparseTask {
                        x: &x[i * xs..(i + 1) * xs],
                        x2: i2.map(|j| &x[j * xs..(j + 1) * xs]),
                        band,
                        weights: w,
                        scale,
                        shift,
                    };
                    sparse::spikes_task(&task, step, dense, quantise, kernel, sc, yi, yj)
                },
            )
        }))
    }

    /// The k-bit convolution of [`Simd::sparse_conv_q_spikes_vec`] (stride 1, spikes quantised
    /// by `step`) with an EM-PF neuron layer fused after it, and optionally the neuron's 2x2,
    /// stride-2 average pool: the dense AVX-512 VNNI kernel runs the `T` steps of a block of
    /// output pixels together and the neuron in registers, so the convolution's outputs are never
    /// stored. The input (see [`ConvInput`]) is `T·N x C x H x W`, step-major (step `t` of sample
    /// `i` is image `t·N + i`), or `N x C x H x W` repeated at every step (`dims.0` is its number
    /// of images); the result is `T·N x O x H' x W'` (pooled: `H'/2 x W'/2`), exactly the floats
    /// of the separate input neuron, convolution, neuron and [`Simd::avg_pool_2x2`]. `Ok(None)` where the fused
    /// kernel does not run (no AVX-512 VNNI at this level, stride ≠ 1, or the [`DenseQ`] policy
    /// or its cost model choose the sparse kernels): then run those three separately.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_q_empf(
        &self,
        input: &ConvInput<'_>,
        step: f32,
        dims: (usize, usize, usize),
        w: &QuantConvWeights,
        stride: usize,
        pad: usize,
        scale: &[f32],
        shift: &[f32],
        neuron: &EmpfNeuron<'_>,
    ) -> Result<Option<Vec<f32>>> {
        let g = SparseGeom::new("conv_q_empf", dims, w.dims(), stride, pad)?;
        g.check(input.x.len(), g.out_len(), scale, shift)?;
        let (t, o, c) = (neuron.steps, w.dims().0, w.dims().1);
        let pool_ok = !neuron.pool || (g.oh >= 2 && g.band.ow >= 2);
        if t == 0
            || !(input.repeated || dims.0.is_multiple_of(t))
            || !neuron.fits(t, o)
            || input.neuron.is_some_and(|p| p.pool || !p.fits(t, c))
            || !pool_ok
        {
            return shape_err(format!(
                "conv_q_empf: {} images (repeated: {}), {t} steps, λ {}, θ {}, affine {:?}, {} outputs, pool {} of {}x{}, input neuron {:?}",
                dims.0,
                input.repeated,
                neuron.leak.len(),
                neuron.threshold.len(),
                neuron.affine.map(|(k, b)| (k.len(), b.len())),
                o,
                neuron.pool,
                g.oh,
                g.band.ow,
                input
                    .neuron
                    .map(|p| (p.steps, p.leak.len(), p.threshold.len(), p.pool))
            ));
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            return Ok(dense_q::conv_empf(
                input, step, dims, w, stride, pad, scale, shift, neuron,
            ));
        }
        let _ = step; // (no fused kernel elsewhere)
        Ok(None)
    }

    /// Float × ±1 GEMV reading one bit per weight: `y[j] = Σ_k x[k]·(±1)_{jk}` for the sign-packed
    /// `w` (`w.rows` outputs, `w.cols == x.len()`). Float results agree across levels to rounding
    /// (summation order differs).
    pub fn gemv_masked(&self, x: &[f32], w: &PackedMatrix, y: &mut [f32]) -> Result<()> {
        use rayon::prelude::*;
        if w.cols != x.len() || w.planes != 1 || y.len() != w.rows {
            return shape_err(format!(
                "gemv_masked: x {}, w {}x{} ({} planes), y {}",
                x.len(),
                w.rows,
                w.cols,
                w.planes,
                y.len()
            ));
        }
        let kw = w.kwords;
        let mut xp = vec![0f32; kw * 64];
        xp[..x.len()].copy_from_slice(x);
        let total: f32 = x.iter().sum();
        let gemv = self.k().masked_gemv;
        let rows = (w.rows / (rayon::current_num_threads() * 4)).max(16);
        y.par_chunks_mut(rows).enumerate().for_each(|(t, ys)| {
            let j0 = t * rows;
            gemv(
                &xp,
                &w.data[j0 * kw..(j0 + ys.len()) * kw],
                ys.len(),
                kw,
                ys,
            );
            for s in ys.iter_mut() {
                *s = 2.0 * *s - total;
            }
        });
        Ok(())
    }
}

/// The shape of a sparse convolution over a batch, and its parallel driver.
struct SparseGeom {
    name: &'static str,
    n: usize,
    c: usize,
    o: usize,
    oh: usize,
    band: sparse::Band,
}

impl SparseGeom {
    fn new(
        name: &'static str,
        (n, h, wd): (usize, usize, usize),
        (o, c, kh, kw): (usize, usize, usize, usize),
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let (oh, ow) = match (
            (h + 2 * pad).checked_sub(kh),
            (wd + 2 * pad).checked_sub(kw),
        ) {
            (Some(a), Some(b)) if stride > 0 => (a / stride + 1, b / stride + 1),
            _ => {
                return shape_err(format!(
                    "{name}: {h}x{wd} input, pad {pad}, stride {stride}, {kh}x{kw} kernel"
                ));
            }
        };
        let band = sparse::Band {
            h,
            w: wd,
            ow,
            stride,
            pad,
            oy0: 0,
            oy1: oh,
        };
        Ok(SparseGeom {
            name,
            n,
            c,
            o,
            oh,
            band,
        })
    }

    fn in_len(&self) -> usize {
        self.c * self.band.h * self.band.w
    }

    fn out_len(&self) -> usize {
        self.n * self.o * self.oh * self.band.ow
    }

    fn check(&self, x_len: usize, y_len: usize, scale: &[f32], shift: &[f32]) -> Result<()> {
        let (n, c, o, oh, ow) = (self.n, self.c, self.o, self.oh, self.band.ow);
        let (h, wd) = (self.band.h, self.band.w);
        if x_len != n * c * h * wd
            || y_len != n * o * oh * ow
            || scale.len() != o
            || shift.len() != o
        {
            return shape_err(format!(
                "{}: x {x_len} for {n}x{c}x{h}x{wd}, y {y_len} for {n}x{o}x{oh}x{ow}, scale {}, shift {}",
                self.name,
                scale.len(),
                shift.len()
            ));
        }
        Ok(())
    }

    /// Runs `kernel(band, i, i2, scratch, y_i, y_i2)` over the images: whole images in parallel
    /// (images `i` and `i + pair` together when `pair > 0`), or, when there are fewer images than
    /// twice the threads, bands of output rows of each image. Every element of `y` is written
    /// (the kernels write every output of their band).
    fn drive<S: Default + Send>(
        &self,
        pair: usize,
        y: &mut [sparse::Out],
        kernel: impl Fn(
            sparse::Band,
            usize,
            Option<usize>,
            &mut S,
            &mut [sparse::Out],
            &mut [sparse::Out],
        ) + Sync,
    ) {
        use rayon::prelude::*;
        let (n, o, oh, ow) = (self.n, self.o, self.oh, self.band.ow);
        if n == 0 || oh == 0 || ow == 0 {
            return;
        }
        // split every image into bands of output rows so that all threads work at batch 1
        let bands = (2 * rayon::current_num_threads()).div_ceil(n).clamp(1, oh);
        let rows = oh.div_ceil(bands);
        let ys = o * oh * ow;
        if bands == 1 {
            // pairs (i, i + pair) share every weight load; the rest run alone
            let mut outs: Vec<Option<&mut [sparse::Out]>> = y.chunks_mut(ys).map(Some).collect();
            let mut jobs = Vec::with_capacity(n);
            for i in 0..n {
                let Some(yi) = outs[i].take() else { continue };
                let j = i + pair;
                if pair > 0 && j < n {
                    let yj = outs[j].take().expect("paired image is taken once");
                    jobs.push((i, Some(j), yi, yj));
                } else {
                    jobs.push((i, None, yi, &mut [][..]));
                }
            }
            jobs.into_par_iter()
                .for_each_init(S::default, |sc, (i, j, yi, yj)| {
                    kernel(self.band, i, j, sc, yi, yj)
                });
            return;
        }
        let mut tasks = Vec::with_capacity(n * bands);
        for i in 0..n {
            for r in (0..oh).step_by(rows) {
                tasks.push((i, r, (r + rows).min(oh)));
            }
        }
        let parts: Vec<Vec<f32>> = tasks
            .par_iter()
            .map_init(S::default, |sc, &(i, oy0, oy1)| {
                let mut part = vec![0f32; o * (oy1 - oy0) * ow];
                let band = sparse::Band {
                    oy0,
                    oy1,
                    ..self.band
                };
                kernel(band, i, None, sc, as_out(&mut part), &mut []);
                part
            })
            .collect();
        for (&(i, oy0, oy1), part) in tasks.iter().zip(&parts) {
            let band = (oy1 - oy0) * ow;
            for oc in 0..o {
                let dst = (i * o + oc) * oh * ow + oy0 * ow;
                for (d, &v) in y[dst..dst + band]
                    .iter_mut()
                    .zip(&part[oc * band..(oc + 1) * band])
                {
                    *d = sparse::Out::new(v);
                }
            }
        }
    }
}

/// Runs the sparse-convolution `kernel` of one level over the images of `x` into `y`.
#[allow(clippy::too_many_arguments)]
fn sparse_into<X: Sync, W: Sync, S: Default + Send>(
    g: &SparseGeom,
    x: &[X],
    pair: usize,
    w: &W,
    scale: &[f32],
    shift: &[f32],
    y: &mut [sparse::Out],
    kernel: sparse::KernelFn<X, W, S>,
) {
    let xs = g.in_len();
    g.drive(pair, y, |band, i, i2, sc: &mut S, yi, yj| {
        let task = sparse::SparseTask {
            x: &x[i * xs..(i + 1) * xs],
            x2: i2.map(|j| &x[j * xs..(j + 1) * xs]),
            band,
            weights: w,
            scale,
            shift,
        };
        kernel(&task, sc, yi, yj)
    });
}

/// `y` as outputs that the kernels overwrite.
fn as_out(y: &mut [f32]) -> &mut [sparse::Out] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; the kernels only store initialised
    // values through the result, so `y` stays initialised.
    unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr().cast(), y.len()) }
}

/// A vector of `len` values all written by `fill` (which must write every element), without
/// initialising them first.
fn filled(len: usize, fill: impl FnOnce(&mut [sparse::Out])) -> Vec<f32> {
    let mut y: Vec<f32> = Vec::with_capacity(len);
    fill(&mut y.spare_capacity_mut()[..len]);
    // SAFETY: `fill` wrote all `len` elements (the sparse drivers write every output of every
    // band of every image; a panic in `fill` never reaches this line).
    unsafe { y.set_len(len) };
    y
}

fn check_levels(q: &[u8], bits: u32) -> Result<()> {
    if u32::from(q.iter().fold(0u8, |a, &v| a | v)) >> bits != 0 {
        return shape_err(format!("sparse_conv_q: a level does not fit {bits} bits"));
    }
    Ok(())
}
