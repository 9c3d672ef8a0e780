//! `empf export`: a training checkpoint → a deployable model file (`src/infer/format.rs`).

use crate::error::Result;
use crate::infer::format::{Model, Op};
use clap::Args;
use std::path::PathBuf;

/// `empf export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint (.npz) written by `empf train`; or a recipe or architecture name (e.g.
    /// `cifar10-resnet18`), exported from its seeded initialisation (for sizes and benchmarks).
    pub checkpoint: PathBuf,
    /// Output model file (default: the checkpoint path with extension `.empfm`).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// (binary weights, other stored values) of a model.
pub fn stored_counts(ops: &[Op]) -> (usize, usize) {
    let (mut bits, mut vals) = (0, 0);
    for op in ops {
        match op {
            Op::Conv { weight, bias, .. } | Op::Linear { weight, bias, .. } => {
                vals += weight.len() + bias.as_ref().map_or(0, |b| b.len())
            }
            Op::BinConv {
                signs,
                scale,
                shift,
                ..
            }
            | Op::BinLinear {
                signs,
                scale,
                shift,
                ..
            } => {
                bits += signs.len;
                vals += scale.len() + shift.len();
            }
            Op::Affine { scale, shift, .. } => vals += scale.len() + shift.len(),
            Op::Empf {
                leak,
                threshold,
                input,
                ..
            } => {
                vals += leak.len()
                    + threshold.len()
                    + input.as_ref().map_or(0, |(a, b)| a.len() + b.len())
            }
            Op::Parallel { threshold, .. } => vals += threshold.len(),
            Op::Lif { .. } => vals += 3,
            Op::Seca { weight, .. } => vals += weight.len() + 1,
            Op::SpikeQuant { .. } => vals += 2,
            Op::Residual { body, shortcut, .. } => {
                let (b, v) = stored_counts(body);
                let (sb, sv) = stored_counts(shortcut.as_deref().unwrap_or(&[]));
                bits += b + sb;
                vals += v + sv;
            }
            Op::AvgPool { .. }
            | Op::MaxPool { .. }
            | Op::GlobalAvgPool { .. }
            | Op::Flatten { .. } => {}
        }
    }
    (bits, vals)
}

/// Run `empf export`.
pub fn run(a: ExportArgs) -> Result<()> {
    let seeded = !a.checkpoint.exists();
    let (cfg, mut net) = if seeded {
        let name = a.checkpoint.to_string_lossy().to_string();
        let (cfg, _) = super::recipes::info_model(&name).map_err(|e| {
            crate::error::Error::Config(format!(
                "{}: no such checkpoint file, and {e}",
                a.checkpoint.display()
            ))
        })?;
        let net = crate::model::zoo::build::<f32>(&cfg, &mut crate::rng::Rng::new(0))?;
        (cfg, net)
    } else {
        crate::train::checkpoint::load_model(&a.checkpoint)?
    };
    let model: Model = crate::infer::export(&cfg, &net)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.checkpoint.with_extension("empfm"));
    model.save(&out)?;
    let size = model.to_bytes().len();
    let (bits, vals) = stored_counts(&model.ops);
    let ideal = bits as f64 / 8.0 + 4.0 * vals as f64;
    println!(
        "{}: {} ops, T = {}, input {:?}, {} classes{}",
        out.display(),
        model.ops.len(),
        model.steps,
        model.input,
        model.classes,
        cfg.spike_quant
            .map(|q| format!(", {}-bit spikes (QAT, step {})", q.bits, q.step))
            .unwrap_or_default()
    );
    println!(
        "size {size} B = {:.3}x (1 bit x {bits} binary weights + 4 B x {vals} other values = {ideal:.0} B)",
        size as f64 / ideal.max(1.0)
    );
    let (two, one) = crate::model::zoo::param_memory(&mut net);
    println!(
        "Param.(B) of the network (EMPF.md §9, BN and neuron parameters excluded): {:.2} MB at 2 bits \
         per binary weight (the paper's rule), {:.2} MB at 1 bit{}",
        two / 1e6,
        one / 1e6,
        if seeded {
            " (seeded initialisation: the sizes do not depend on the weights)"
        } else {
            ""
        }
    );
    Ok(())
}
