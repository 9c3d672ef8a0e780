//! The deployable model file (`.empfm`): a documented, versioned little-endian binary layout.
//!
//! ```text
//! file    = magic "EMPFMODL" (8 bytes) · version u32 (= 1) · steps u32 · input C, H, W u32 ·
//!           classes u32 · ops · checksum u64 (FNV-1a 64 of every preceding byte)
//! ops     = count u32 · op*
//! op      = tag u8 · name (u16 length ≤ 256, UTF-8 bytes) · fields of the tag
//! floats  = f32 little-endian, all finite (NaN / ±Inf rejected); counts come from the op's dims
//! bits    = ceil(count / 8) bytes: value i at byte i/8, bit i%8 (LSB first), 1 ↔ +1, 0 ↔ −1;
//!           unused high bits of the last byte are zero
//!
//! tag  op            fields
//!  1   Conv          in, out, kernel, stride, pad u32 · has_bias u8 · weight f32[out·in·k·k] ·
//!                    bias f32[out]?           (full-precision stem, OIHW)
//!  2   BinConv       in, out, kernel, stride, pad u32 · flags u8 (bit 0: input is binary spikes) ·
//!                    signs bits[out·in·k·k] · scale f32[out] · shift f32[out]
//!                    (y = scale ⊙ (sign(W) ⊛ x) + shift: α and the folded BatchNorm)
//!  3   Linear        in, out u32 · has_bias u8 · weight f32[out·in] · bias f32[out]?
//!  4   BinLinear     in, out u32 · flags u8 · signs bits[out·in] · scale f32[out] · shift f32[out]
//!  5   Affine        channels u32 · scale f32[c] · shift f32[c]  (a BatchNorm with nothing to fold into)
//!  6   Empf          steps u32 · channels u32 (1 = shared) · has_input u8 · leak f32[T·ch] ·
//!                    threshold f32[T] · (in_scale f32[T·ch] · in_shift f32[T·ch])?
//!                    Version I; a Version II neuron arrives reparameterised (EMPF.md §5):
//!                    m = leak[t]·v + (in_scale[t] ⊙ I + in_shift[t]), s = ReLU(m − θ), v = min(m, θ)
//!  7   Parallel      steps u32 · threshold f32[T]   (Version III: run over all T at once)
//!  8   Lif           leak, threshold, gamma f32 · reset u8 (0 soft, 1 hard) · spike u8 (0 Heaviside,
//!                    1 smooth triangle)
//!  9   AvgPool       kernel, stride, pad u32
//! 10   MaxPool       kernel, stride, pad u32
//! 11   GlobalAvgPool (no fields)
//! 12   Flatten       (no fields)
//! 13   Residual      body ops · has_shortcut u8 · shortcut ops?   (out = body(x) + shortcut(x))
//!                    A ResNet `BasicBlock` (Fig. 3(b)) is written as nested Residuals (see
//!                    `infer::export`): no block op is needed, so the version stays 1.
//! 14   Seca          k u32 · weight f32[k] · bias f32   (SECA_I, EMPF.md §8)
//! 15   SpikeQuant    bits u32 (1..=8) · step f32 (> 0): x ↦ clamp(round(x/step), 0, 2^bits−1)·step
//! ```
//!
//! The reader validates before allocating: every declared count is multiplied with overflow checks
//! and compared with the bytes left in the file, dimensions are bounded (`MAX_DIM`), residual
//! nesting is bounded (`MAX_DEPTH`), and the checksum is verified first. Errors name the file, the
//! byte offset and the op.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// File magic.
pub const MAGIC: &[u8; 8] = b"EMPFMODL";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
/// Largest accepted dimension (channels, features, pixels, steps...).
pub const MAX_DIM: usize = 1 << 20;
/// Deepest accepted residual nesting.
pub const MAX_DEPTH: usize = 16;
const MAX_NAME: usize = 256;

/// Convolution geometry of a stored conv op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding.
    pub pad: usize,
}

impl ConvDims {
    /// Weights per output channel.
    pub fn fan_in(&self) -> usize {
        self.in_ch * self.kernel * self.kernel
    }
}

/// Signs of binary weights, packed 1 bit each (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signs {
    /// Number of weights.
    pub len: usize,
    /// `ceil(len/8)` bytes.
    pub bytes: Vec<u8>,
}

impl Signs {
    /// Pack `true` ↔ +1.
    pub fn pack(positive: &[bool]) -> Self {
        let mut bytes = vec![0u8; positive.len().div_ceil(8)];
        for (i, &p) in positive.iter().enumerate() {
            if p {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        Signs {
            len: positive.len(),
            bytes,
        }
    }
    /// Weight `i` as ±1.
    pub fn get(&self, i: usize) -> f32 {
        if self.bytes[i / 8] >> (i % 8) & 1 == 1 {
            1.0
        } else {
            -1.0
        }
    }
    /// All weights as ±1 floats.
    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.len).map(|i| self.get(i)).collect()
    }
}

/// One operation of the deployed graph (module docs give the semantics).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Full-precision convolution.
    Conv {
        /// Name.
        name: String,
        /// Geometry.
        dims: ConvDims,
        /// OIHW weights.
        weight: Vec<f32>,
        /// Bias.
        bias: Option<Vec<f32>>,
    },
    /// Binary convolution with a per-channel epilogue.
    BinConv {
        /// Name.
        name: String,
        /// Geometry.
        dims: ConvDims,
        /// Whether the input is known to be binary spikes {0, 1} (LIF).
        binary_input: bool,
        /// Signs, OIHW.
        signs: Signs,
        /// Per-channel scale (α · BN scale).
        scale: Vec<f32>,
        /// Per-channel shift (BN shift).
        shift: Vec<f32>,
    },
    /// Full-precision linear layer.
    Linear {
        /// Name.
        name: String,
        /// Inputs.
        in_f: usize,
        /// Outputs.
        out_f: usize,
        /// `out x in` weights.
        weight: Vec<f32>,
        /// Bias.
        bias: Option<Vec<f32>>,
    },
    /// Binary linear layer with a per-output epilogue.
    BinLinear {
        /// Name.
        name: String,
        /// Inputs.
        in_f: usize,
        /// Outputs.
        out_f: usize,
        /// Whether the input is known to be binary spikes.
        binary_input: bool,
        /// Signs, `out x in`.
        signs: Signs,
        /// Per-output scale.
        scale: Vec<f32>,
        /// Per-output shift.
        shift: Vec<f32>,
    },
    /// Per-channel affine (an unfolded BatchNorm).
    Affine {
        /// Name.
        name: String,
        /// Scale.
        scale: Vec<f32>,
        /// Shift.
        shift: Vec<f32>,
    },
    /// EM-PF Version I neuron (Version II reparameterised into it).
    Empf {
        /// Name.
        name: String,
        /// Channels of the per-channel values (1 = one value shared by all channels).
        channels: usize,
        /// `λ[t][ch]`, `T x channels`.
        leak: Vec<f32>,
        /// `θ[t]`.
        threshold: Vec<f32>,
        /// Input affine `(scale, shift)`, each `T x channels` (folded Version II).
        input: Option<(Vec<f32>, Vec<f32>)>,
    },
    /// EM-PF Version III neuron: all T steps at once.
    Parallel {
        /// Name.
        name: String,
        /// `θ[t]`.
        threshold: Vec<f32>,
    },
    /// LIF neuron.
    Lif {
        /// Name.
        name: String,
        /// λ.
        leak: f32,
        /// θ.
        threshold: f32,
        /// Surrogate width (smooth spikes only).
        gamma: f32,
        /// Hard reset (`v = m(1 − s)`) instead of soft (`v = m − θs`).
        hard_reset: bool,
        /// Smooth-triangle spikes instead of Heaviside.
        smooth: bool,
    },
    /// Average pooling.
    AvgPool {
        /// Name.
        name: String,
        /// Kernel.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Padding.
        pad: usize,
    },
    /// Max pooling.
    MaxPool {
        /// Name.
        name: String,
        /// Kernel.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Padding.
        pad: usize,
    },
    /// Global average pooling to `N x C`.
    GlobalAvgPool {
        /// Name.
        name: String,
    },
    /// Flatten to `N x F`.
    Flatten {
        /// Name.
        name: String,
    },
    /// `body(x) + shortcut(x)` (identity shortcut when `None`).
    Residual {
        /// Name.
        name: String,
        /// Main branch.
        body: Vec<Op>,
        /// Projection shortcut.
        shortcut: Option<Vec<Op>>,
    },
    /// SECA_I channel attention.
    Seca {
        /// Name.
        name: String,
        /// Conv1d weights (`k`, odd).
        weight: Vec<f32>,
        /// Conv1d bias.
        bias: f32,
    },
    /// k-bit spike quantiser.
    SpikeQuant {
        /// Name.
        name: String,
        /// Bits (1..=8).
        bits: u32,
        /// Step.
        step: f32,
    },
}

impl Op {
    /// The op's name.
    pub fn name(&self) -> &str {
        match self {
            Op::Conv { name, .. }
            | Op::BinConv { name, .. }
            | Op::Linear { name, .. }
            | Op::BinLinear { name, .. }
            | Op::Affine { name, .. }
            | Op::Empf { name, .. }
            | Op::Parallel { name, .. }
            | Op::Lif { name, .. }
            | Op::AvgPool { name, .. }
            | Op::MaxPool { name, .. }
            | Op::GlobalAvgPool { name }
            | Op::Flatten { name }
            | Op::Residual { name, .. }
            | Op::Seca { name, .. }
            | Op::SpikeQuant { name, .. } => name,
        }
    }
    fn tag(&self) -> u8 {
        match self {
            Op::Conv { .. } => 1,
            Op::BinConv { .. } => 2,
            Op::Linear { .. } => 3,
            Op::BinLinear { .. } => 4,
            Op::Affine { .. } => 5,
            Op::Empf { .. } => 6,
            Op::Parallel { .. } => 7,
            Op::Lif { .. } => 8,
            Op::AvgPool { .. } => 9,
            Op::MaxPool { .. } => 10,
            Op::GlobalAvgPool { .. } => 11,
            Op::Flatten { .. } => 12,
            Op::Residual { .. } => 13,
            Op::Seca { .. } => 14,
            Op::SpikeQuant { .. } => 15,
        }
    }
}

/// A deployable model: the op graph and what it expects.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// Time-steps T.
    pub steps: usize,
    /// Input `C x H x W`.
    pub input: [usize; 3],
    /// Classes (logit width).
    pub classes: usize,
    /// The ops, in order.
    pub ops: Vec<Op>,
}

/// FNV-1a 64-bit hash (the file checksum).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

// ------------------------------------------------------------------------------------------------
// writer
// ------------------------------------------------------------------------------------------------

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: usize) {
        self.0.extend_from_slice(&(v as u32).to_le_bytes());
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        for &x in v {
            self.f32(x);
        }
    }
    fn name(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn conv(&mut self, d: &ConvDims) {
        for v in [d.in_ch, d.out_ch, d.kernel, d.stride, d.pad] {
            self.u32(v);
        }
    }
    fn ops(&mut self, ops: &[Op]) {
        self.u32(ops.len());
        for op in ops {
            self.op(op);
        }
    }
    fn op(&mut self, op: &Op) {
        self.u8(op.tag());
        self.name(op.name());
        match op {
            Op::Conv {
                dims, weight, bias, ..
            } => {
                self.conv(dims);
                self.u8(bias.is_some() as u8);
                self.f32s(weight);
                if let Some(b) = bias {
                    self.f32s(b);
                }
            }
            Op::BinConv {
                dims,
                binary_input,
                signs,
                scale,
                shift,
                ..
            } => {
                self.conv(dims);
                self.u8(*binary_input as u8);
                self.0.extend_from_slice(&signs.bytes);
                self.f32s(scale);
                self.f32s(shift);
            }
            Op::Linear {
                in_f,
                out_f,
                weight,
                bias,
                ..
            } => {
                self.u32(*in_f);
                self.u32(*out_f);
                self.u8(bias.is_some() as u8);
                self.f32s(weight);
                if let Some(b) = bias {
                    self.f32s(b);
                }
            }
            Op::BinLinear {
                in_f,
                out_f,
                binary_input,
                signs,
                scale,
                shift,
                ..
            } => {
                self.u32(*in_f);
                self.u32(*out_f);
                self.u8(*binary_input as u8);
                self.0.extend_from_slice(&signs.bytes);
                self.f32s(scale);
                self.f32s(shift);
            }
            Op::Affine { scale, shift, .. } => {
                self.u32(scale.len());
                self.f32s(scale);
                self.f32s(shift);
            }
            Op::Empf {
                channels,
                leak,
                threshold,
                input,
                ..
            } => {
                self.u32(threshold.len());
                self.u32(*channels);
                self.u8(input.is_some() as u8);
                self.f32s(leak);
                self.f32s(threshold);
                if let Some((s, h)) = input {
                    self.f32s(s);
                    self.f32s(h);
                }
            }
            Op::Parallel { threshold, .. } => {
                self.u32(threshold.len());
                self.f32s(threshold);
            }
            Op::Lif {
                leak,
                threshold,
                gamma,
                hard_reset,
                smooth,
                ..
            } => {
                self.f32(*leak);
                self.f32(*threshold);
                self.f32(*gamma);
                self.u8(*hard_reset as u8);
                self.u8(*smooth as u8);
            }
            Op::AvgPool {
                kernel,
                stride,
                pad,
                ..
            }
            | Op::MaxPool {
                kernel,
                stride,
                pad,
                ..
            } => {
                self.u32(*kernel);
                self.u32(*stride);
                self.u32(*pad);
            }
            Op::GlobalAvgPool { .. } | Op::Flatten { .. } => {}
            Op::Residual { body, shortcut, .. } => {
                self.ops(body);
                self.u8(shortcut.is_some() as u8);
                if let Some(s) = shortcut {
                    self.ops(s);
                }
            }
            Op::Seca { weight, bias, .. } => {
                self.u32(weight.len());
                self.f32s(weight);
                self.f32(*bias);
            }
            Op::SpikeQuant { bits, step, .. } => {
                self.u32(*bits as usize);
                self.f32(*step);
            }
        }
    }
}

impl Model {
    /// The file bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = W(Vec::new());
        w.0.extend_from_slice(MAGIC);
        w.u32(VERSION as usize);
        w.u32(self.steps);
        for d in self.input {
            w.u32(d);
        }
        w.u32(self.classes);
        w.ops(&self.ops);
        let h = fnv1a(&w.0);
        w.0.extend_from_slice(&h.to_le_bytes());
        w.0
    }

    /// Write the file atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_bytes();
        crate::io::atomic_write(path, |f| f.write_all(&bytes))
    }

    /// Read and validate a model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Model::from_bytes(&bytes, path)
    }

    /// Parse and validate file bytes (`path` names the source in errors).
    pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let err = |m: String| Error::format(&path, m);
        if bytes.len() < MAGIC.len() + 4 {
            return Err(err(format!(
                "not an empf model file: {} bytes is shorter than the header",
                bytes.len()
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(err("not an empf model file (bad magic)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(err(format!(
                "model format version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        if bytes.len() < 12 + 8 {
            return Err(err("truncated: no checksum".into()));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        let want = u64::from_le_bytes(tail.try_into().expect("8 bytes"));
        if fnv1a(body) != want {
            return Err(err(
                "checksum mismatch: the file is truncated or corrupted".into()
            ));
        }
        Model::parse_body(body, path)
    }

    /// Parse validated-checksum bytes (everything before the checksum). Public for the fuzz target,
    /// which exercises the structural checks without having to forge checksums.
    #[doc(hidden)]
    pub fn parse_body(body: &[u8], path: PathBuf) -> Result<Model> {
        let mut r = R {
            b: body,
            pos: 0,
            path,
            op: String::new(),
        };
        let magic = r.take(8)?;
        if magic != MAGIC {
            return Err(r.err("not an empf model file (bad magic)"));
        }
        let version = r.u32()?;
        if version != VERSION as usize {
            return Err(r.err(&format!(
                "model format version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        let steps = r.dim("steps")?;
        if steps > 4096 {
            return Err(r.err(&format!("steps {steps} out of range 1..=4096")));
        }
        let input = [r.dim("input C")?, r.dim("input H")?, r.dim("input W")?];
        let classes = r.dim("classes")?;
        let ops = r.ops(steps, 0)?;
        if r.pos != r.b.len() {
            return Err(r.err(&format!(
                "{} trailing bytes after the last op",
                r.b.len() - r.pos
            )));
        }
        if ops.is_empty() {
            return Err(r.err("the model has no ops"));
        }
        Ok(Model {
            steps,
            input,
            classes,
            ops,
        })
    }
}

// ------------------------------------------------------------------------------------------------
// reader
// ------------------------------------------------------------------------------------------------

struct R<'a> {
    b: &'a [u8],
    pos: usize,
    path: PathBuf,
    /// The op being read (for errors).
    op: String,
}

impl R<'_> {
    fn err(&self, msg: &str) -> Error {
        let at = if self.op.is_empty() {
            String::new()
        } else {
            format!(" in op `{}`", self.op)
        };
        Error::format(&self.path, format!("at byte {}{at}: {msg}", self.pos))
    }
    fn left(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if n > self.left() {
            return Err(self.err(&format!("truncated: need {n} bytes, {} left", self.left())));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self, what: &str) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.err(&format!("{what}: flag must be 0 or 1, got {v}"))),
        }
    }
    fn u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    /// A dimension in 1..=MAX_DIM.
    fn dim(&mut self, what: &str) -> Result<usize> {
        let v = self.u32()?;
        if v == 0 || v > MAX_DIM {
            return Err(self.err(&format!("{what} = {v} out of range 1..={MAX_DIM}")));
        }
        Ok(v)
    }
    fn f32(&mut self, what: &str) -> Result<f32> {
        let v = f32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        if !v.is_finite() {
            return Err(self.err(&format!("{what}: non-finite value {v}")));
        }
        Ok(v)
    }
    /// The product of dims, checked for overflow.
    fn count(&self, dims: &[usize], what: &str) -> Result<usize> {
        dims.iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.err(&format!("{what}: size {dims:?} overflows")))
    }
    /// `n` finite floats; the byte count is checked against the file before allocating.
    fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>> {
        let bytes = n
            .checked_mul(4)
            .filter(|&b| b <= self.left())
            .ok_or_else(|| {
                self.err(&format!(
                    "{what}: {n} values declared but only {} bytes left",
                    self.left()
                ))
            })?;
        let raw = self.take(bytes)?;
        let v: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.err(&format!("{what}: non-finite value {} at index {i}", v[i])));
        }
        Ok(v)
    }
    fn signs(&mut self, n: usize, what: &str) -> Result<Signs> {
        let nb = n.div_ceil(8);
        if nb > self.left() {
            return Err(self.err(&format!(
                "{what}: {n} sign bits declared but only {} bytes left",
                self.left()
            )));
        }
        let bytes = self.take(nb)?.to_vec();
        if n % 8 != 0 && bytes[nb - 1] >> (n % 8) != 0 {
            return Err(self.err(&format!(
                "{what}: padding bits of the last byte are not zero"
            )));
        }
        Ok(Signs { len: n, bytes })
    }
    fn name(&mut self) -> Result<String> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        if n > MAX_NAME {
            return Err(self.err(&format!("op name of {n} bytes (at most {MAX_NAME})")));
        }
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| self.err("op name is not UTF-8"))
    }
    fn conv_dims(&mut self) -> Result<ConvDims> {
        let d = ConvDims {
            in_ch: self.dim("in channels")?,
            out_ch: self.dim("out channels")?,
            kernel: self.dim("kernel")?,
            stride: self.dim("stride")?,
            pad: self.u32()?,
        };
        if d.kernel > 64 || d.stride > 64 || d.pad > 64 {
            return Err(self.err(&format!(
                "kernel {}, stride {}, pad {}: each must be at most 64",
                d.kernel, d.stride, d.pad
            )));
        }
        self.count(&[d.out_ch, d.in_ch, d.kernel, d.kernel], "conv weights")?;
        Ok(d)
    }
    fn ops(&mut self, steps: usize, depth: usize) -> Result<Vec<Op>> {
        if depth > MAX_DEPTH {
            return Err(self.err(&format!("residual nesting deeper than {MAX_DEPTH}")));
        }
        let n = self.u32()?;
        // every op takes at least 3 bytes (tag, name length)
        if n > self.left() / 3 {
            return Err(self.err(&format!(
                "{n} ops declared but only {} bytes left",
                self.left()
            )));
        }
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            ops.push(self.op(steps, depth)?);
        }
        Ok(ops)
    }
    fn op(&mut self, steps: usize, depth: usize) -> Result<Op> {
        let tag = self.u8()?;
        self.op.clear();
        let name = self.name()?;
        self.op = name.clone();
        let op = match tag {
            1 => {
                let dims = self.conv_dims()?;
                let has_bias = self.flag("has_bias")?;
                let n = dims.out_ch * dims.fan_in();
                let weight = self.f32s(n, "weight")?;
                let bias = if has_bias {
                    Some(self.f32s(dims.out_ch, "bias")?)
                } else {
                    None
                };
                Op::Conv {
                    name,
                    dims,
                    weight,
                    bias,
                }
            }
            2 => {
                let dims = self.conv_dims()?;
                let binary_input = self.flag("flags")?;
                let signs = self.signs(dims.out_ch * dims.fan_in(), "signs")?;
                let scale = self.f32s(dims.out_ch, "scale")?;
                let shift = self.f32s(dims.out_ch, "shift")?;
                Op::BinConv {
                    name,
                    dims,
                    binary_input,
                    signs,
                    scale,
                    shift,
                }
            }
            3 | 4 => {
                let in_f = self.dim("in features")?;
                let out_f = self.dim("out features")?;
                let n = self.count(&[in_f, out_f], "weights")?;
                if tag == 3 {
                    let has_bias = self.flag("has_bias")?;
                    let weight = self.f32s(n, "weight")?;
                    let bias = if has_bias {
                        Some(self.f32s(out_f, "bias")?)
                    } else {
                        None
                    };
                    Op::Linear {
                        name,
                        in_f,
                        out_f,
                        weight,
                        bias,
                    }
                } else {
                    let binary_input = self.flag("flags")?;
                    let signs = self.signs(n, "signs")?;
                    let scale = self.f32s(out_f, "scale")?;
                    let shift = self.f32s(out_f, "shift")?;
                    Op::BinLinear {
                        name,
                        in_f,
                        out_f,
                        binary_input,
                        signs,
                        scale,
                        shift,
                    }
                }
            }
            5 => {
                let c = self.dim("channels")?;
                let scale = self.f32s(c, "scale")?;
                let shift = self.f32s(c, "shift")?;
                Op::Affine { name, scale, shift }
            }
            6 => {
                let t = self.dim("steps")?;
                if t != steps {
                    return Err(
                        self.err(&format!("neuron built for T = {t}, model has T = {steps}"))
                    );
                }
                let channels = self.dim("channels")?;
                let has_input = self.flag("has_input")?;
                let n = self.count(&[t, channels], "leak")?;
                let leak = self.f32s(n, "leak")?;
                let threshold = self.f32s(t, "threshold")?;
                let input = if has_input {
                    Some((self.f32s(n, "input scale")?, self.f32s(n, "input shift")?))
                } else {
                    None
                };
                Op::Empf {
                    name,
                    channels,
                    leak,
                    threshold,
                    input,
                }
            }
            7 => {
                let t = self.dim("steps")?;
                if t != steps {
                    return Err(
                        self.err(&format!("neuron built for T = {t}, model has T = {steps}"))
                    );
                }
                let threshold = self.f32s(t, "threshold")?;
                Op::Parallel { name, threshold }
            }
            8 => {
                let leak = self.f32("leak")?;
                let threshold = self.f32("threshold")?;
                let gamma = self.f32("gamma")?;
                let hard_reset = self.flag("reset")?;
                let smooth = self.flag("spike")?;
                if smooth && gamma <= 0.0 {
                    return Err(self.err(&format!("gamma {gamma} must be positive")));
                }
                Op::Lif {
                    name,
                    leak,
                    threshold,
                    gamma,
                    hard_reset,
                    smooth,
                }
            }
            9 | 10 => {
                let kernel = self.dim("kernel")?;
                let stride = self.dim("stride")?;
                let pad = self.u32()?;
                if kernel > 64 || stride > 64 || 2 * pad > kernel {
                    return Err(self.err(&format!(
                        "pool kernel {kernel}, stride {stride}, pad {pad}: need kernel, stride <= 64 and pad <= kernel/2"
                    )));
                }
                if tag == 9 {
                    Op::AvgPool {
                        name,
                        kernel,
                        stride,
                        pad,
                    }
                } else {
                    Op::MaxPool {
                        name,
                        kernel,
                        stride,
                        pad,
                    }
                }
            }
            11 => Op::GlobalAvgPool { name },
            12 => Op::Flatten { name },
            13 => {
                let body = self.ops(steps, depth + 1)?;
                self.op = name.clone();
                let shortcut = if self.flag("has_shortcut")? {
                    let s = self.ops(steps, depth + 1)?;
                    self.op = name.clone();
                    Some(s)
                } else {
                    None
                };
                Op::Residual {
                    name,
                    body,
                    shortcut,
                }
            }
            14 => {
                let k = self.dim("kernel")?;
                if k % 2 == 0 || k > 63 {
                    return Err(self.err(&format!("SECA kernel {k} must be odd and at most 63")));
                }
                let weight = self.f32s(k, "weight")?;
                let bias = self.f32("bias")?;
                Op::Seca { name, weight, bias }
            }
            15 => {
                let bits = self.u32()?;
                if !(1..=8).contains(&bits) {
                    return Err(self.err(&format!("spike bits {bits} out of range 1..=8")));
                }
                let step = self.f32("step")?;
                if step <= 0.0 {
                    return Err(self.err(&format!("spike step {step} must be positive")));
                }
                Op::SpikeQuant {
                    name,
                    bits: bits as u32,
                    step,
                }
            }
            t => return Err(self.err(&format!("unknown op tag {t}"))),
        };
        Ok(op)
    }
}
