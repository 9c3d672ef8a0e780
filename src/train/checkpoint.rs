//! Training checkpoints and model files on top of the versioned `.npz` container (`io::checkpoint`).
//!
//! Entries: `model.config` (the [`ModelConfig`] text), `param.<name>` for every parameter and buffer,
//! and in training checkpoints `optim.m.<name>` / `optim.v.<name>` (optimiser moments),
//! `train.position` (`[epoch, batch, global_step, optimiser steps]`) and `train.seed`.

use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::model::{ModelConfig, Sequential};
use crate::rng::Rng;
use crate::tensor::from_vec;
use crate::train::trainer::{Position, Trainer, load_named_tensors, named_tensors};
use std::path::Path;

fn put_model(ck: &mut Checkpoint, t: &mut Trainer) {
    ck.put_str("model.config", t.model_cfg.to_text());
    for (name, shape, data) in named_tensors(&mut t.net) {
        ck.put_tensor(format!("param.{name}"), from_vec(&shape, data));
    }
}

/// Write a full training checkpoint atomically (parameters, optimiser state, position, seed).
pub fn save_training(path: &Path, t: &mut Trainer) -> Result<()> {
    let mut ck = Checkpoint::new();
    ck.put_str("kind", "training");
    put_model(&mut ck, t);
    for (name, data) in t.opt.state_tensors() {
        let n = data.len();
        ck.put_tensor(name, from_vec(&[n], data));
    }
    ck.put_u64s(
        "train.position",
        &[
            t.pos.epoch as u64,
            t.pos.batch as u64,
            t.pos.global_step,
            t.opt.step,
        ],
    );
    ck.put_u64s("train.seed", &[t.cfg.seed]);
    ck.put_str("train.bp", t.cfg.bp.name());
    ck.save(path)
}

/// Write the trained model only (parameters and buffers, no optimiser state).
pub fn save_model(path: &Path, t: &mut Trainer) -> Result<()> {
    let mut ck = Checkpoint::new();
    ck.put_str("kind", "model");
    put_model(&mut ck, t);
    ck.save(path)
}

/// The model configuration stored in a checkpoint or model file.
pub fn model_config_of(ck: &Checkpoint, path: &Path) -> Result<ModelConfig> {
    ModelConfig::from_text(ck.str("model.config")?)
        .map_err(|e| Error::format(path, format!("entry `model.config`: {e}")))
}

fn load_params(ck: &Checkpoint, net: &mut Sequential<f32>, path: &Path) -> Result<()> {
    let get = |name: &str| -> Option<(Vec<usize>, Vec<f32>)> {
        let t = ck.tensor(&format!("param.{name}")).ok()?;
        Some((t.shape().to_vec(), t.iter().copied().collect()))
    };
    load_named_tensors(net, &get, &path.display().to_string())
}

/// Restore a trainer (built from the checkpoint's own model configuration) from a training checkpoint.
pub fn load_training(path: &Path, t: &mut Trainer) -> Result<()> {
    let ck = Checkpoint::load(path)?;
    if ck.str("kind").ok() != Some("training") {
        return Err(Error::format(
            path,
            "not a training checkpoint (no optimiser state); `last.npz` in the run directory is one",
        ));
    }
    let mc = model_config_of(&ck, path)?;
    if mc != t.model_cfg {
        return Err(Error::format(
            path,
            format!(
                "the checkpoint's model ({}) differs from the one requested ({})",
                mc.to_text().replace('\n', " "),
                t.model_cfg.to_text().replace('\n', " ")
            ),
        ));
    }
    load_params(&ck, &mut t.net, path)?;
    for name in ck
        .names()
        .filter(|n| n.starts_with("optim."))
        .map(str::to_string)
        .collect::<Vec<_>>()
    {
        let v: Vec<f32> = ck.tensor(&name)?.iter().copied().collect();
        t.opt
            .load_state_tensor(&name, v)
            .map_err(|e| Error::format(path, e.to_string()))?;
    }
    let pos = ck.u64s("train.position")?;
    if pos.len() != 4 {
        return Err(Error::format(
            path,
            format!(
                "entry `train.position`: expected 4 numbers, got {}",
                pos.len()
            ),
        ));
    }
    t.pos = Position {
        epoch: pos[0] as usize,
        batch: pos[1] as usize,
        global_step: pos[2],
    };
    t.opt.step = pos[3];
    let seed = ck.u64s("train.seed")?;
    if seed.first() != Some(&t.cfg.seed) {
        eprintln!(
            "warning: {}: resuming with --seed {} but the run used seed {:?}; the data order changes",
            path.display(),
            t.cfg.seed,
            seed.first()
        );
    }
    Ok(())
}

/// Read the model configuration and build the network with the stored parameters (a model file or
/// a training checkpoint).
pub fn load_model(path: &Path) -> Result<(ModelConfig, Sequential<f32>)> {
    let ck = Checkpoint::load(path)?;
    let mc = model_config_of(&ck, path)?;
    let mut net = crate::model::zoo::build::<f32>(&mc, &mut Rng::new(0))?;
    load_params(&ck, &mut net, path)?;
    Ok((mc, net))
}

/// Only the model configuration of a checkpoint (to rebuild the network before resuming).
pub fn peek_model_config(path: &Path) -> Result<ModelConfig> {
    let ck = Checkpoint::load(path)?;
    model_config_of(&ck, path)
}
