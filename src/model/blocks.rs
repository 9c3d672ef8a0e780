//! The residual block of Fig. 3(b) ("vanilla parallel computation block", EMPF.md §6, §8).
//!
//! Pre-activation, the residual stream carries real-valued currents:
//!
//! ```text
//! u1 = N1(x)                        N1: Version I or II (Version III when "all parallel")
//! c1 = BN1(BConv3x3_s(u1))          stride s
//! y1 = A1(x, c1)                    identity | SECA_I(c1) | SECA_II(x, c1) = SECA_I(x + c1)
//! u2 = N2(y1)                       N2: Version III
//! c2 = BN2(BConv3x3(u2))
//! o  = A2(y1, c2)                   identity | SECA_I(c2) | SECA_II(y1, c2) = SECA_I(y1 + c2)
//! out = o + shortcut(x)             identity, or BN_s(BConv1x1_s(x)) when stride or width changes
//! ```
//!
//! SECA_II's `I_prev` is the current that fed the neuron whose spikes produced the attended current:
//! `x` feeds N1 whose spikes make `c1`; `y1` feeds N2 whose spikes make `c2`. Placement (§8): SECA_II
//! everywhere except the down-sampling conv (the first conv of a block with a projection shortcut,
//! where `x` and `c1` differ in shape), which takes SECA_I. No neuron after the addition.
//!
//! Backward (hand-derived, given `G = dL/dout` and, in BPTT, the neurons' `dL/dv` in `dstate`):
//! * `dL/do = G`; `dL/dx ⊇ G` (identity) or `shortcut.backward(G)` (projection).
//! * A2: identity: `dc2 = G`. SECA_I: `dc2 = seca2.backward(G)`. SECA_II: with `g =
//!   seca2.backward_pair(G)` (the gradient w.r.t. the sum `y1 + c2`), `dc2 = g` and `dy1 ⊇ g`.
//! * `du2 = conv2.backward(bn2.backward(dc2))`; `dy1 ⊇ N2.backward(du2)`.
//! * A1 the same way with `(x, c1)` in place of `(y1, c2)`: `dc1`, and `dx ⊇ g` for SECA_II.
//! * `du1 = conv1.backward(bn1.backward(dc1))`; `dx ⊇ N1.backward(du1)`.
//!
//! Every child keeps its own [`State`] and [`Cache`] (children of this layer's), so the block runs
//! in the trainer's time loop unchanged (online, random BP, BPTT).

use crate::error::{Error, Result};
use crate::layers::batchnorm::BatchNorm;
use crate::layers::{
    BinaryConv2d, BinaryInit, Cache, ConvSpec, Layer, Param, Seca, State, StepCtx,
};
use crate::model::zoo::neuron;
use crate::model::{ChildCaches, NeuronKind, Sequential};
use crate::rng::Rng;
use crate::tensor::{Real, Tensor};

/// Channel attention after a BN in a block (EMPF.md §8).
pub enum Attention<R: Real> {
    /// No attention.
    None,
    /// `SECA_I(I) = A(I) ⊙ I`.
    SecaI(Seca<R>),
    /// `SECA_II(I_prev, I) = A(I_prev + I) ⊙ (I_prev + I)`.
    SecaII(Seca<R>),
}

/// Which attention the blocks of a network use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SecaMode {
    /// No attention.
    #[default]
    None,
    /// SECA_I after every BN of a block.
    I,
    /// SECA_II everywhere except the down-sampling convs (SECA_I), as in the paper (§8).
    II,
}

impl SecaMode {
    /// `none`, `i`, `ii`.
    pub fn name(&self) -> &'static str {
        match self {
            SecaMode::None => "none",
            SecaMode::I => "i",
            SecaMode::II => "ii",
        }
    }
    /// Parse [`SecaMode::name`].
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "none" | "off" | "" => Ok(SecaMode::None),
            "i" | "1" | "seca1" | "seca_i" => Ok(SecaMode::I),
            "ii" | "2" | "seca2" | "seca_ii" => Ok(SecaMode::II),
            _ => Err(Error::Config(format!(
                "unknown seca `{s}` (expected none, i or ii)"
            ))),
        }
    }
}

/// The options of one [`BasicBlock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels.
    pub out_ch: usize,
    /// Stride of the first conv (and of the projection shortcut).
    pub stride: usize,
    /// N1's version (V1 or V2; V3 for "all parallel").
    pub n1: NeuronKind,
    /// N2's version (V3 in the paper).
    pub n2: NeuronKind,
    /// Attention placement.
    pub seca: SecaMode,
    /// Time-steps (per-step neuron parameters).
    pub steps: usize,
}

impl<R: Real> Attention<R> {
    fn params(&mut self) -> Option<&mut Seca<R>> {
        match self {
            Attention::None => None,
            Attention::SecaI(s) | Attention::SecaII(s) => Some(s),
        }
    }
    fn describe(&self) -> &'static str {
        match self {
            Attention::None => "",
            Attention::SecaI(_) => "SECA_I",
            Attention::SecaII(_) => "SECA_II",
        }
    }
    /// `y = A(prev, c)`.
    fn forward(
        &mut self,
        prev: &Tensor<R>,
        c: Tensor<R>,
        ctx: &StepCtx,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        match self {
            Attention::None => Ok(c),
            Attention::SecaI(s) => s.forward(&c, ctx, &mut State::Empty, cache),
            Attention::SecaII(s) => s.forward_pair(prev, &c, cache),
        }
    }
    /// `(dL/dc, extra dL/dprev)`.
    fn backward(
        &mut self,
        dy: Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
    ) -> Result<(Tensor<R>, Option<Tensor<R>>)> {
        match self {
            Attention::None => Ok((dy, None)),
            Attention::SecaI(s) => Ok((s.backward(&dy, ctx, cache, &mut State::Empty)?, None)),
            Attention::SecaII(s) => {
                let g = s.backward_pair(&dy, cache)?;
                Ok((g.clone(), Some(g)))
            }
        }
    }
}

/// Child indices (state and cache slots).
const N1: usize = 0;
const CONV1: usize = 1;
const BN1: usize = 2;
const A1: usize = 3;
const N2: usize = 4;
const CONV2: usize = 5;
const BN2: usize = 6;
const A2: usize = 7;
const SHORTCUT: usize = 8;
const CHILDREN: usize = 9;

/// The residual block of Fig. 3(b) (module docs).
pub struct BasicBlock<R: Real> {
    name: String,
    spec: BlockSpec,
    /// First neuron (Version I/II, or III when all parallel).
    pub n1: Box<dyn Layer<R>>,
    /// 3x3 binary conv, stride `s`.
    pub conv1: BinaryConv2d<R>,
    /// BN after conv1.
    pub bn1: BatchNorm<R>,
    /// Attention after bn1.
    pub a1: Attention<R>,
    /// Second neuron (Version III).
    pub n2: Box<dyn Layer<R>>,
    /// 3x3 binary conv, stride 1.
    pub conv2: BinaryConv2d<R>,
    /// BN after conv2.
    pub bn2: BatchNorm<R>,
    /// Attention after bn2.
    pub a2: Attention<R>,
    /// BN(BConv1x1_s) when stride or width changes; identity when `None`.
    pub shortcut: Option<Sequential<R>>,
}

impl<R: Real> BasicBlock<R> {
    /// A block named `name` (its parameters are `name.conv1.weight`, ...).
    pub fn new(name: &str, spec: BlockSpec, rng: &mut Rng) -> Result<Self> {
        if spec.stride == 0 || spec.in_ch == 0 || spec.out_ch == 0 {
            return Err(Error::Config(format!(
                "block `{name}`: stride and widths must be positive, got {spec:?}"
            )));
        }
        let n = |s: &str| format!("{name}.{s}");
        let projection = spec.stride != 1 || spec.in_ch != spec.out_ch;
        let mut seca = |s: &str, pair: bool| -> Result<Attention<R>> {
            Ok(match spec.seca {
                SecaMode::None => Attention::None,
                SecaMode::I => Attention::SecaI(Seca::for_channels(&n(s), spec.out_ch, rng)?),
                SecaMode::II if pair => {
                    Attention::SecaII(Seca::for_channels(&n(s), spec.out_ch, rng)?)
                }
                SecaMode::II => Attention::SecaI(Seca::for_channels(&n(s), spec.out_ch, rng)?),
            })
        };
        // SECA_II needs I_prev of the same shape: not at the down-sampling conv (§8)
        let a1 = seca("seca1", !projection)?;
        let a2 = seca("seca2", true)?;
        let conv1 = BinaryConv2d::new(
            &n("conv1"),
            ConvSpec::new(spec.in_ch, spec.out_ch, 3)
                .stride(spec.stride)
                .padding(1),
            BinaryInit::Kaiming,
            rng,
        );
        let conv2 = BinaryConv2d::new(
            &n("conv2"),
            ConvSpec::new(spec.out_ch, spec.out_ch, 3).padding(1),
            BinaryInit::Kaiming,
            rng,
        );
        let shortcut = projection.then(|| {
            let mut s = Sequential::new(&n("shortcut"));
            s.push(BinaryConv2d::new(
                &n("shortcut.conv"),
                ConvSpec::new(spec.in_ch, spec.out_ch, 1).stride(spec.stride),
                BinaryInit::Kaiming,
                rng,
            ));
            s.push(BatchNorm::new(&n("shortcut.bn"), spec.out_ch));
            s
        });
        Ok(BasicBlock {
            name: name.to_string(),
            spec,
            n1: neuron(spec.n1, &n("sn1"), spec.in_ch, spec.steps),
            conv1,
            bn1: BatchNorm::new(&n("bn1"), spec.out_ch),
            a1,
            n2: neuron(spec.n2, &n("sn2"), spec.out_ch, spec.steps),
            conv2,
            bn2: BatchNorm::new(&n("bn2"), spec.out_ch),
            a2,
            shortcut,
        })
    }

    /// The block's options.
    pub fn spec(&self) -> BlockSpec {
        self.spec
    }
}

impl<R: Real> Layer<R> for BasicBlock<R> {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn kind(&self) -> &'static str {
        "BasicBlock"
    }
    fn describe(&self) -> String {
        let s = &self.spec;
        let att = [self.a1.describe(), self.a2.describe()]
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| a.to_string())
            .collect::<Vec<_>>();
        format!(
            "Block({}->{}, s{}, {}+{}{}{})",
            s.in_ch,
            s.out_ch,
            s.stride,
            s.n1,
            s.n2,
            if self.shortcut.is_some() {
                ", proj"
            } else {
                ""
            },
            if att.is_empty() {
                String::new()
            } else {
                format!(", {}", att.join("/"))
            }
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let s = self.n1.output_shape(input)?;
        let s = self.conv1.output_shape(&s)?;
        let s = self.n2.output_shape(&s)?;
        let out = self.conv2.output_shape(&s)?;
        let sc = match &self.shortcut {
            Some(p) => p.output_shape(input)?,
            None => input.to_vec(),
        };
        if sc != out {
            return Err(Error::shape(
                &self.name,
                format!("body output {out:?} and shortcut output {sc:?} must match"),
                input,
            ));
        }
        Ok(out)
    }
    fn forward(
        &mut self,
        x: &Tensor<R>,
        ctx: &StepCtx,
        state: &mut State<R>,
        cache: Option<&mut Cache>,
    ) -> Result<Tensor<R>> {
        let st = state.children_mut(CHILDREN);
        let mut cs = cache.map(|c| c.get_or_default::<ChildCaches>().resize(CHILDREN));
        macro_rules! c {
            ($i:expr) => {
                cs.as_mut().map(|c| &mut c[$i])
            };
        }
        let u1 = self.n1.forward(x, ctx, &mut st[N1], c!(N1))?;
        let c1 = self.conv1.forward(&u1, ctx, &mut st[CONV1], c!(CONV1))?;
        drop(u1);
        let c1 = self.bn1.forward(&c1, ctx, &mut st[BN1], c!(BN1))?;
        let y1 = self.a1.forward(x, c1, ctx, c!(A1))?;
        let u2 = self.n2.forward(&y1, ctx, &mut st[N2], c!(N2))?;
        let c2 = self.conv2.forward(&u2, ctx, &mut st[CONV2], c!(CONV2))?;
        drop(u2);
        let c2 = self.bn2.forward(&c2, ctx, &mut st[BN2], c!(BN2))?;
        let mut out = self.a2.forward(&y1, c2, ctx, c!(A2))?;
        match &mut self.shortcut {
            Some(p) => {
                let s = p.forward(x, ctx, &mut st[SHORTCUT], c!(SHORTCUT))?;
                if s.shape() != out.shape() {
                    return Err(Error::shape(
                        &self.name,
                        format!("shortcut output {:?} to match the body", s.shape()),
                        out.shape(),
                    ));
                }
                out += &s;
            }
            None => {
                if x.shape() != out.shape() {
                    return Err(Error::shape(
                        &self.name,
                        format!("an identity shortcut to keep the shape {:?}", x.shape()),
                        out.shape(),
                    ));
                }
                out += x;
            }
        }
        Ok(out)
    }
    fn backward(
        &mut self,
        dy: &Tensor<R>,
        ctx: &StepCtx,
        cache: &Cache,
        dstate: &mut State<R>,
    ) -> Result<Tensor<R>> {
        let cs = cache.get::<ChildCaches>(&self.name)?;
        let ds = dstate.children_mut(CHILDREN);
        // out = o + shortcut(x)
        let mut dx = match &mut self.shortcut {
            Some(p) => p.backward(dy, ctx, cs.get(SHORTCUT), &mut ds[SHORTCUT])?,
            None => dy.clone(),
        };
        // o = A2(y1, c2)
        let (dc2, dy1_extra) = self.a2.backward(dy.clone(), ctx, cs.get(A2))?;
        let g = self.bn2.backward(&dc2, ctx, cs.get(BN2), &mut ds[BN2])?;
        let g = self
            .conv2
            .backward(&g, ctx, cs.get(CONV2), &mut ds[CONV2])?;
        let mut dy1 = self.n2.backward(&g, ctx, cs.get(N2), &mut ds[N2])?;
        if let Some(e) = dy1_extra {
            dy1 += &e;
        }
        // y1 = A1(x, c1)
        let (dc1, dx_extra) = self.a1.backward(dy1, ctx, cs.get(A1))?;
        let g = self.bn1.backward(&dc1, ctx, cs.get(BN1), &mut ds[BN1])?;
        let g = self
            .conv1
            .backward(&g, ctx, cs.get(CONV1), &mut ds[CONV1])?;
        dx += &self.n1.backward(&g, ctx, cs.get(N1), &mut ds[N1])?;
        if let Some(e) = dx_extra {
            dx += &e;
        }
        Ok(dx)
    }
    fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param<R>)) {
        self.n1.visit_params(f);
        self.conv1.visit_params(f);
        self.bn1.visit_params(f);
        if let Some(s) = self.a1.params() {
            s.visit_params(f);
        }
        self.n2.visit_params(f);
        self.conv2.visit_params(f);
        self.bn2.visit_params(f);
        if let Some(s) = self.a2.params() {
            s.visit_params(f);
        }
        if let Some(s) = &mut self.shortcut {
            s.visit_params(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOpts, check_unrolled};
    use crate::layers::GradMode;
    use crate::tensor::from_vec;

    fn check(spec: BlockSpec, input: [usize; 4], seed: u64) {
        let mut rng = Rng::new(seed);
        let mut b = BasicBlock::<f64>::new("blk", spec, &mut rng).unwrap();
        let n: usize = input.iter().product();
        let xs: Vec<_> = (0..spec.steps)
            .map(|_| from_vec(&input, (0..n).map(|_| rng.normal()).collect()))
            .collect();
        for mode in [GradMode::Online, GradMode::Bptt] {
            let opts = GradCheckOpts {
                seed,
                // latent binary weights train through the clipped STE, not a true derivative
                skip_params: vec![
                    "conv1.weight".into(),
                    "conv2.weight".into(),
                    "shortcut.conv.weight".into(),
                ],
                ..Default::default()
            };
            check_unrolled(&mut b, &xs, true, mode, &opts)
                .unwrap()
                .assert_ok(&opts, &format!("block {spec:?} {mode:?}"));
        }
    }

    fn spec(
        in_ch: usize,
        out_ch: usize,
        stride: usize,
        n1: NeuronKind,
        seca: SecaMode,
    ) -> BlockSpec {
        BlockSpec {
            in_ch,
            out_ch,
            stride,
            n1,
            n2: NeuronKind::V3,
            seca,
            steps: 3,
        }
    }

    #[test]
    fn identity_block_backward_matches_finite_differences() {
        check(
            spec(4, 4, 1, NeuronKind::V1, SecaMode::None),
            [2, 4, 4, 4],
            3,
        );
    }

    #[test]
    fn projection_block_with_v2_and_seca_i_matches_finite_differences() {
        check(spec(3, 5, 2, NeuronKind::V2, SecaMode::I), [2, 3, 6, 6], 5);
    }

    #[test]
    fn seca_ii_block_backward_matches_finite_differences() {
        check(spec(4, 4, 1, NeuronKind::V1, SecaMode::II), [2, 4, 4, 4], 7);
        // down-sampling block: SECA_I at conv1, SECA_II at conv2
        check(spec(3, 6, 2, NeuronKind::V1, SecaMode::II), [2, 3, 4, 4], 8);
    }

    #[test]
    fn all_parallel_block_backward_matches_finite_differences() {
        check(spec(4, 4, 1, NeuronKind::V3, SecaMode::II), [2, 4, 4, 4], 9);
    }

    #[test]
    fn seca_ii_placement_follows_the_paper() {
        let mut rng = Rng::new(1);
        let b = BasicBlock::<f32>::new("b", spec(4, 8, 2, NeuronKind::V1, SecaMode::II), &mut rng)
            .unwrap();
        assert!(matches!(b.a1, Attention::SecaI(_)));
        assert!(matches!(b.a2, Attention::SecaII(_)));
        assert!(b.shortcut.is_some());
        let b = BasicBlock::<f32>::new("b", spec(4, 4, 1, NeuronKind::V1, SecaMode::II), &mut rng)
            .unwrap();
        assert!(matches!(b.a1, Attention::SecaII(_)));
        assert!(b.shortcut.is_none());
        assert_eq!(b.output_shape(&[2, 4, 8, 8]).unwrap(), vec![2, 4, 8, 8]);
    }

    #[test]
    fn seca_ii_changes_the_output_of_an_identity_block() {
        // SECA_II attends over x + c1, not c1: with the same weights the outputs differ
        let x = from_vec(
            &[2, 4, 4, 4],
            (0..128).map(|i| (i as f64 * 0.37).sin()).collect(),
        );
        let run = |mode| {
            let mut rng = Rng::new(2);
            let mut b =
                BasicBlock::<f64>::new("b", spec(4, 4, 1, NeuronKind::V1, mode), &mut rng).unwrap();
            b.forward(&x, &StepCtx::eval(0, 3), &mut State::Empty, None)
                .unwrap()
        };
        let (y1, y2) = (run(SecaMode::I), run(SecaMode::II));
        assert!((&y1 - &y2).iter().any(|d| d.abs() > 1e-9));
    }
}
