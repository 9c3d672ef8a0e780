//! `empf grad`: dump one batch's parameters, inputs, targets, outputs and both gradients (BPTT and
//! online) to an `.npz`, for cross-checking against another framework (EMPF.md §1, §2).
//!
//! Entries (all little-endian NumPy arrays):
//!
//! | name | dtype, shape | meaning |
//! |---|---|---|
//! | `model.config` | str | the model configuration (as in checkpoints) |
//! | `param.<name>` | f4, parameter shape | every parameter and buffer before the step (checkpoint names) |
//! | `input` | f4, N x C x H x W | normalised images, fed at every step (direct encoding) |
//! | `target` | i8, N | labels |
//! | `steps` | i8, () | T |
//! | `output` | f4, T x N x K | logits O[t] (training-mode forward: BN batch statistics) |
//! | `loss` | f8, () | L = (1/T) Σ_t CE(O[t], target) (mean over the batch) |
//! | `grad.bptt.<name>` | f4, parameter shape | dL/dp by back-propagation through time |
//! | `grad.online.<name>` | f4, parameter shape | dL/dp with the temporal path cut (online training) |
//!
//! `--params FILE.npz` loads every `param.<name>` (f4 or f8) from another file first, so weights
//! trained elsewhere can be compared.

use crate::cli::separability::{BatchArgs, FreshArgs, fresh_model};
use crate::error::{Error, Result};
use crate::io::npz::{NpyArray, read_npz, save_npz};
use crate::separability::gradients;
use crate::tensor::Tensor;
use crate::train::step::StepInput;
use crate::train::trainer::{load_named_tensors, named_tensors};
use clap::Args;
use ndarray::{ArrayD, IxDyn};
use std::path::PathBuf;

/// `empf grad`.
#[derive(Args, Debug)]
pub struct GradArgs {
    /// A checkpoint or model file (.npz); without it a fresh model is built.
    pub checkpoint: Option<PathBuf>,
    /// Load parameters from this .npz (entries `param.<name>`, f4 or f8) before the step.
    #[arg(long)]
    pub params: Option<PathBuf>,
    /// Neuron of a fresh model: v1, v2, v3 or lif.
    #[arg(long, default_value = "v1")]
    pub neuron: String,
    /// Fresh-model settings.
    #[command(flatten)]
    pub model: FreshArgs,
    /// Data settings.
    #[command(flatten)]
    pub batch: BatchArgs,
    /// Output file.
    #[arg(long, short, default_value = "grads.npz")]
    pub out: PathBuf,
}

fn scalar<A: Clone>(v: A) -> ArrayD<A> {
    ArrayD::from_elem(IxDyn(&[]), v)
}

/// Run `empf grad`.
pub fn run(a: GradArgs) -> Result<()> {
    let (x, y, chw, classes) = a.batch.load()?;
    let (mc, mut net) = match &a.checkpoint {
        Some(p) => crate::train::checkpoint::load_model(p)?,
        None => fresh_model(&a.model, &a.neuron, chw, classes)?,
    };
    if mc.input != chw {
        return Err(Error::Config(format!(
            "the model takes {:?} inputs, the data has {chw:?}",
            mc.input
        )));
    }
    if let Some(p) = &a.params {
        let entries = read_npz(p)?;
        let get = |name: &str| -> Option<(Vec<usize>, Vec<f32>)> {
            match entries.get(&format!("param.{name}"))? {
                NpyArray::F32(t) => Some((t.shape().to_vec(), t.iter().copied().collect())),
                NpyArray::F64(t) => {
                    Some((t.shape().to_vec(), t.iter().map(|&v| v as f32).collect()))
                }
                _ => None,
            }
        };
        load_named_tensors(&mut net, &get, &p.display().to_string())?;
    }
    let params = named_tensors(&mut net);
    let steps = mc.steps;
    let mut loss = |_: usize, o: &Tensor<f32>| {
        crate::loss::cross_entropy(o, crate::loss::Targets::Hard(&y), 0.0)
    };
    let g = gradients(&mut net, StepInput::Static(&x), steps, &mut loss)?;
    let mut out: Vec<(String, NpyArray)> =
        vec![("model.config".into(), NpyArray::Str(mc.to_text()))];
    for (name, shape, data) in params {
        let t = ArrayD::from_shape_vec(IxDyn(&shape), data)
            .map_err(|e| Error::Internal(format!("param {name}: {e}")))?;
        out.push((format!("param.{name}"), NpyArray::F32(t)));
    }
    out.push(("input".into(), NpyArray::F32(x.clone())));
    out.push((
        "target".into(),
        NpyArray::I64(
            ArrayD::from_shape_vec(IxDyn(&[y.len()]), y.iter().map(|&v| v as i64).collect())
                .map_err(|e| Error::Internal(e.to_string()))?,
        ),
    ));
    out.push(("steps".into(), NpyArray::I64(scalar(steps as i64))));
    let views: Vec<_> = g.outputs.iter().map(|o| o.view()).collect();
    let stacked = ndarray::stack(ndarray::Axis(0), &views)
        .map_err(|e| Error::Internal(format!("outputs: {e}")))?;
    out.push(("output".into(), NpyArray::F32(stacked)));
    out.push(("loss".into(), NpyArray::F64(scalar(g.loss))));
    for (mode, grads) in [("bptt", &g.bptt), ("online", &g.online)] {
        for (name, t) in g.names.iter().zip(grads.iter()) {
            out.push((format!("grad.{mode}.{name}"), NpyArray::F32(t.clone())));
        }
    }
    save_npz(&a.out, out.iter().map(|(n, a)| (n.as_str(), a)))?;
    let rep = crate::separability::report(
        &net,
        &g,
        Vec::new(),
        steps,
        &format!("{} T = {steps}", mc.neuron),
    );
    println!(
        "{}: {} entries (loss {:.6}); online vs BPTT over weights and BN: cosine {:.6}, relative L2 {:.3e}",
        a.out.display(),
        out.len(),
        g.loss,
        rep.synaptic.cosine,
        rep.synaptic.rel_l2
    );
    Ok(())
}
