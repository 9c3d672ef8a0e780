//! The epoch loop: data order, batches, the per-batch time loop, optimiser updates, evaluation,
//! metrics, checkpoints and exact resume.
//!
//! Reproducible by construction: the data order of epoch `e` comes from `Rng::derive(seed, e)`, the
//! random BP steps of batch `b` of epoch `e` from `Rng::derive(seed, e, b)`, so a run resumed from a
//! checkpoint (taken at an epoch end or every `checkpoint_every` batches) continues exactly where it
//! stopped. Reductions inside layers happen in a fixed order for a given thread count, so the same
//! seed and thread count give the same weights.

use crate::data::loader::{Batch, BatchInput};
use crate::error::{Error, Result};
use crate::layers::{Layer, Param};
use crate::metrics::{MetricsLog, Progress, Record};
use crate::model::{ModelConfig, Sequential};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::train::optim::{OptimConfig, Optimizer, Schedule, zero_grads};
use crate::train::step::{BpMode, StepInput, eval_batch, train_batch};
use std::path::PathBuf;
use std::time::Instant;

/// A labelled dataset the trainer can draw batches from.
pub trait BatchSource: Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Samples `idx` as an N x C x H x W f32 tensor (normalised) and their labels.
    fn batch(&self, idx: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)>;
    /// Training batch `bi` of epoch `epoch` holding samples `idx`: augmented (seeded by epoch and
    /// index), possibly with soft targets or per-step frames. Default: [`batch`](Self::batch).
    fn train_batch(&self, idx: &[usize], epoch: usize, bi: usize) -> Result<Batch> {
        let _ = (epoch, bi);
        let (x, y) = self.batch(idx)?;
        Ok(Batch::hard(x, y))
    }
    /// Evaluation batch (no augmentation; frames for event data). Default: [`batch`](Self::batch).
    fn eval_batch(&self, idx: &[usize]) -> Result<Batch> {
        let (x, y) = self.batch(idx)?;
        Ok(Batch::hard(x, y))
    }
}

impl BatchSource for crate::data::Dataset {
    fn len(&self) -> usize {
        crate::data::Dataset::len(self)
    }
    fn batch(&self, idx: &[usize]) -> Result<(Tensor<f32>, Vec<usize>)> {
        crate::data::Dataset::batch(self, idx)
    }
}

/// Everything about a training run except the model architecture.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Epochs to train.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Batch size for evaluation.
    pub eval_batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up epochs (may be fractional).
    pub warmup_epochs: f64,
    /// Cosine annealing to 0 over the run.
    pub cosine: bool,
    /// Optimiser.
    pub optim: OptimConfig,
    /// Gradient mode over time.
    pub bp: BpMode,
    /// Update the weights after every back-propagated step instead of once per batch.
    pub per_step_update: bool,
    /// Master seed.
    pub seed: u64,
    /// Output directory (metrics, plots, checkpoints).
    pub out: PathBuf,
    /// Also checkpoint every this many batches (0: only at epoch ends).
    pub checkpoint_every: usize,
    /// Log a step record every this many batches.
    pub log_every: usize,
    /// No progress line.
    pub quiet: bool,
    /// Stop after this many batches in total (for tests of resume; 0 = no limit).
    pub stop_after_batches: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            batch: 64,
            eval_batch: 256,
            lr: 0.01,
            warmup_epochs: 0.0,
            cosine: true,
            optim: OptimConfig::default(),
            bp: BpMode::Online,
            per_step_update: false,
            seed: 0,
            out: PathBuf::from("runs/default"),
            checkpoint_every: 0,
            log_every: 50,
            quiet: false,
            stop_after_batches: 0,
        }
    }
}

/// Where a run stands (saved in checkpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Completed epochs.
    pub epoch: usize,
    /// Completed batches of the current epoch.
    pub batch: usize,
    /// Completed optimiser steps over the run.
    pub global_step: u64,
}

/// Evaluation of a dataset.
#[derive(Clone, Debug, Default)]
pub struct EvalResult {
    /// Mean loss of Σ_t O[t] / T.
    pub loss: f64,
    /// Top-1 accuracy (%) of argmax Σ_t O[t].
    pub acc: f64,
    /// Accuracy (%) of argmax Σ_{τ ≤ t} O[τ], for t = 1..T.
    pub acc_per_t: Vec<f64>,
    /// Samples evaluated.
    pub n: usize,
    /// Seconds taken.
    pub secs: f64,
}

/// Per-step loss: softmax cross-entropy of `O[t]` against the labels, mean over the batch; returns the
/// loss and its gradient with respect to the logits.
pub type LossFn<'a> = &'a (dyn Fn(&Tensor<f32>, &[usize]) -> Result<(f64, Tensor<f32>)> + Sync);

/// The trainer of one run.
pub struct Trainer {
    /// Run settings.
    pub cfg: TrainConfig,
    /// What was built.
    pub model_cfg: ModelConfig,
    /// The network.
    pub net: Sequential<f32>,
    /// Optimiser and its state.
    pub opt: Optimizer,
    /// Where the run stands.
    pub pos: Position,
    /// Called at each epoch end with the network and the epoch record, before it is logged.
    pub epoch_hook: Option<EpochHook>,
    /// Data parallelism over processes (one process by default; see [`crate::dist`]).
    pub dist: crate::dist::DataParallel,
}

/// An epoch-end hook: may add fields to the epoch record (`empf train --track-separability`).
pub type EpochHook = Box<dyn FnMut(&mut Sequential<f32>, Record) -> Result<Record> + Send>;

impl Trainer {
    /// A trainer for a built network.
    pub fn new(cfg: TrainConfig, model_cfg: ModelConfig, net: Sequential<f32>) -> Self {
        let opt = Optimizer::new(cfg.optim.clone());
        Trainer {
            cfg,
            model_cfg,
            net,
            opt,
            pos: Position::default(),
            epoch_hook: None,
            dist: Default::default(),
        }
    }

    /// Batches per epoch for `n` samples (a last batch of a single sample is dropped: BatchNorm
    /// needs two).
    pub fn batches_per_epoch(&self, n: usize) -> usize {
        let b = self.cfg.batch;
        let full = n / b;
        if n % b >= 2 * self.dist.size() {
            full + 1
        } else {
            full.max(1)
        }
    }

    /// The learning-rate schedule for `n` training samples.
    pub fn schedule(&self, n: usize) -> Schedule {
        let per = self.batches_per_epoch(n) as u64;
        let updates_per_batch = if self.cfg.per_step_update {
            match self.cfg.bp {
                BpMode::Online => self.model_cfg.steps as u64,
                BpMode::Random { k } => k.min(self.model_cfg.steps) as u64,
                BpMode::Bptt => 1,
            }
        } else {
            1
        };
        Schedule {
            base: self.cfg.lr,
            min: 0.0,
            total: per * self.cfg.epochs as u64 * updates_per_batch,
            warmup: (self.cfg.warmup_epochs * per as f64) as u64 * updates_per_batch,
            cosine: self.cfg.cosine,
        }
    }

    /// The sample order of epoch `e`.
    pub fn epoch_order(&self, n: usize, e: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        Rng::derive(self.cfg.seed, 0x0DA7_A000 + e as u64).shuffle(&mut idx);
        idx
    }

    /// Train one batch (`bi`-th of epoch `e`; under data parallelism this rank's shard of it);
    /// returns (loss, correct predictions) over the whole (global) batch.
    pub fn train_one_batch(
        &mut self,
        x: &Tensor<f32>,
        y: &[usize],
        e: usize,
        bi: usize,
        sched: &Schedule,
        loss: LossFn<'_>,
    ) -> Result<(f64, usize)> {
        self.train_one_input(StepInput::Static(x), y, None, e, bi, sched, loss)
    }

    /// Train one batch given as a [`Batch`] (static images or frames, hard or soft targets).
    pub fn train_one(
        &mut self,
        b: &Batch,
        e: usize,
        bi: usize,
        sched: &Schedule,
        loss: LossFn<'_>,
    ) -> Result<(f64, usize)> {
        let input = match &b.x {
            BatchInput::Static(x) => StepInput::Static(x),
            BatchInput::Frames(f) => StepInput::Frames(f),
        };
        self.train_one_input(input, &b.labels, b.soft.as_ref(), e, bi, sched, loss)
    }

    /// Train one batch; with `soft` targets (Mixup / CutMix) the per-step loss is the soft
    /// cross-entropy and `y` (the unmixed labels) only counts the accuracy.
    #[allow(clippy::too_many_arguments)]
    pub fn train_one_input(
        &mut self,
        input: StepInput<'_, f32>,
        y: &[usize],
        soft: Option<&Tensor<f32>>,
        e: usize,
        bi: usize,
        sched: &Schedule,
        loss: LossFn<'_>,
    ) -> Result<(f64, usize)> {
        let steps = self.model_cfg.steps;
        let mut rng = Rng::derive(
            self.cfg.seed,
            ((e as u64) << 32) ^ (bi as u64) ^ 0xB0_0000_0000_0000,
        );
        zero_grads(&mut self.net);
        let per_step = self.cfg.per_step_update;
        let opt = &mut self.opt;
        let pos = &mut self.pos;
        let dist = &mut self.dist;
        let mut after = |net: &mut dyn Layer<f32>| -> Result<()> {
            if per_step {
                dist.sync_grads(net, y.len(), &mut []);
                opt.update(net, sched.lr(pos.global_step));
                pos.global_step += 1;
                zero_grads(net);
            }
            Ok(())
        };
        let res = train_batch(
            &mut self.net,
            input,
            steps,
            self.cfg.bp,
            &mut rng,
            &mut |_, o| match soft {
                Some(q) => crate::loss::cross_entropy(o, crate::loss::Targets::Soft(q), 0.0),
                None => loss(o, y),
            },
            if per_step { Some(&mut after) } else { None },
        )?;
        if !res.loss.is_finite() {
            return Err(Error::Config(format!(
                "training diverged: loss is {} at epoch {} batch {bi} (lower the learning rate)",
                res.loss,
                e + 1
            )));
        }
        // loss·n and correct predictions, summed over the ranks (in the gradient bucket)
        let mut stats = [
            res.loss * y.len() as f64,
            count_correct(&res.outputs, y) as f64,
        ];
        let n = if per_step {
            let mut s = [stats[0], stats[1], y.len() as f64];
            self.dist.sum(&mut s);
            stats = [s[0], s[1]];
            s[2]
        } else {
            let n = self.dist.sync_grads(&mut self.net, y.len(), &mut stats);
            self.opt
                .update(&mut self.net, sched.lr(self.pos.global_step));
            self.pos.global_step += 1;
            n as f64
        };
        Ok((stats[0] / n, stats[1].round() as usize))
    }

    /// Evaluate on a dataset (eval mode: BatchNorm running statistics; sharded over the ranks).
    pub fn evaluate(&mut self, data: &dyn BatchSource, loss: LossFn<'_>) -> Result<EvalResult> {
        self.dist.evaluate(
            &mut self.net,
            self.model_cfg.steps,
            self.cfg.eval_batch,
            data,
            loss,
        )
    }

    /// Train for the configured epochs from the current position, evaluating on `test` after each
    /// epoch, writing metrics and checkpoints through `save`.
    pub fn fit(
        &mut self,
        train: &dyn BatchSource,
        test: Option<&dyn BatchSource>,
        loss: LossFn<'_>,
        log: &mut MetricsLog,
        save: &mut dyn FnMut(&mut Trainer, &str) -> Result<()>,
    ) -> Result<Option<EvalResult>> {
        let n = train.len();
        if n < 2 {
            return Err(Error::Config(format!(
                "the training set has {n} samples; need at least 2"
            )));
        }
        self.dist.check_batch(self.cfg.batch)?;
        let root = self.dist.is_root();
        let sched = self.schedule(n);
        let per = self.batches_per_epoch(n);
        let mut last_eval = None;
        let mut done_batches: u64 = 0;
        while self.pos.epoch < self.cfg.epochs {
            let e = self.pos.epoch;
            let order = self.epoch_order(n, e);
            let mut prog = Progress::new(
                &format!("epoch {}/{}", e + 1, self.cfg.epochs),
                per * self.cfg.batch.min(n),
                self.cfg.quiet || !root,
            );
            let t0 = Instant::now();
            let (mut lsum, mut csum, mut seen, mut nb) = (0.0, 0usize, 0usize, 0usize);
            // batches come ready from a background thread (augmentation off the training cores)
            let (start, bsz, order) = (self.pos.batch, self.cfg.batch, &order);
            let (rank, size) = (self.dist.comm.rank(), self.dist.size());
            let stopped = std::thread::scope(|s| -> Result<bool> {
                let feed = crate::data::loader::prefetch(
                    s,
                    crate::data::loader::PREFETCH_DEPTH,
                    per - start,
                    move |k| {
                        let bi = start + k;
                        let idx = &order[bi * bsz..((bi + 1) * bsz).min(n)];
                        train.train_batch(crate::dist::shard(idx, rank, size), e, bi)
                    },
                );
                while self.pos.batch < per {
                    let bi = self.pos.batch;
                    let b = crate::data::loader::next(&feed)?;
                    // the global batch (all ranks): counts are summed over the ranks
                    let global = ((bi + 1) * bsz).min(n) - bi * bsz;
                    let (l, c) = self.train_one(&b, e, bi, &sched, loss)?;
                    lsum += l;
                    csum += c;
                    seen += global;
                    nb += 1;
                    self.pos.batch += 1;
                    done_batches += 1;
                    prog.inc(
                        global,
                        &format!(
                            "loss {:.4} acc {:.2}%",
                            lsum / nb as f64,
                            100.0 * csum as f64 / seen as f64
                        ),
                    );
                    if root && self.cfg.log_every > 0 && (bi + 1) % self.cfg.log_every == 0 {
                        log.step(
                            Record::new()
                                .int("step", self.pos.global_step as i64)
                                .num("epoch", e as f64 + (bi + 1) as f64 / per as f64)
                                .num("loss", l)
                                .num("acc", 100.0 * c as f64 / global as f64)
                                .num("lr", sched.lr(self.pos.global_step.saturating_sub(1))),
                        )?;
                    }
                    if self.cfg.checkpoint_every > 0
                        && self.pos.batch % self.cfg.checkpoint_every == 0
                        && self.pos.batch < per
                    {
                        self.dist.average_buffers(&mut self.net);
                        save(self, "last")?;
                    }
                    if self.cfg.stop_after_batches > 0
                        && done_batches >= self.cfg.stop_after_batches
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            })?;
            if stopped {
                prog.finish();
                return Ok(last_eval);
            }
            let (secs, ips) = prog.finish();
            let train_secs = t0.elapsed().as_secs_f64().max(secs);
            self.pos.epoch += 1;
            self.pos.batch = 0;
            self.dist.average_buffers(&mut self.net);
            let mut rec = Record::new()
                .int("epoch", self.pos.epoch as i64)
                .int("step", self.pos.global_step as i64)
                .num("lr", sched.lr(self.pos.global_step.saturating_sub(1)))
                .num("train_loss", lsum / nb.max(1) as f64)
                .num("train_acc", 100.0 * csum as f64 / seen.max(1) as f64)
                .num("train_secs", train_secs)
                .num("train_img_per_s", ips);
            let (comm_secs, comm_n) = self.dist.take_comm_stats();
            if self.dist.size() > 1 {
                rec = rec.int("ranks", self.dist.size() as i64).num(
                    "allreduce_ms_per_update",
                    1e3 * comm_secs / comm_n.max(1) as f64,
                );
            }
            if let Some(test) = test {
                let ev = self.evaluate(test, loss)?;
                // the epoch line is the run's log: printed even with `quiet` (which hides the progress line)
                if root {
                    eprintln!(
                        "epoch {}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}% (per t: {}) | {:.1}s, {:.0} img/s",
                        self.pos.epoch,
                        lsum / nb.max(1) as f64,
                        100.0 * csum as f64 / seen.max(1) as f64,
                        ev.loss,
                        ev.acc,
                        ev.acc_per_t
                            .iter()
                            .map(|a| format!("{a:.2}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        train_secs,
                        ips
                    );
                }
                rec = rec
                    .num("test_loss", ev.loss)
                    .num("test_acc", ev.acc)
                    .list("test_acc_per_t", ev.acc_per_t.clone());
                last_eval = Some(ev);
            }
            if let Some(rss) = crate::metrics::peak_rss_bytes() {
                rec = rec.int("peak_rss_bytes", rss as i64);
            }
            if let Some(h) = self.epoch_hook.as_mut() {
                rec = h(&mut self.net, rec)?;
            }
            if root {
                log.epoch(rec)?;
            }
            save(self, "last")?;
        }
        Ok(last_eval)
    }

    /// All parameters and buffers as (name, shape, data).
    pub fn named_tensors(&mut self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        named_tensors(&mut self.net)
    }
}

/// All parameters and buffers of a network as (name, shape, data), in visiting order.
pub fn named_tensors(net: &mut dyn Layer<f32>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    net.visit_params(&mut |p: &mut Param<f32>| {
        out.push((
            p.name.clone(),
            p.value.shape().to_vec(),
            p.value.iter().copied().collect(),
        ))
    });
    out
}

/// Looks a tensor up by parameter name: (shape, data).
pub type TensorLookup<'a> = dyn Fn(&str) -> Option<(Vec<usize>, Vec<f32>)> + 'a;

/// Load parameters and buffers by name; every parameter of the network must be present with its shape.
pub fn load_named_tensors(
    net: &mut dyn Layer<f32>,
    get: &TensorLookup<'_>,
    source: &str,
) -> Result<()> {
    let mut err = None;
    net.visit_params(&mut |p: &mut Param<f32>| {
        if err.is_some() {
            return;
        }
        match get(&p.name) {
            None => {
                err = Some(Error::format(
                    source,
                    format!("entry `{}` is missing", p.name),
                ))
            }
            Some((shape, data)) => {
                if shape != p.value.shape() || data.len() != p.value.len() {
                    err = Some(Error::format(
                        source,
                        format!(
                            "entry `{}` has shape {shape:?}, the model needs {:?}",
                            p.name,
                            p.value.shape()
                        ),
                    ));
                } else if data.iter().any(|v| !v.is_finite()) {
                    err = Some(Error::format(
                        source,
                        format!("entry `{}` holds NaN or infinite values", p.name),
                    ));
                } else {
                    p.value
                        .as_slice_mut()
                        .expect("standard layout")
                        .copy_from_slice(&data);
                }
            }
        }
    });
    err.map_or(Ok(()), Err)
}

/// argmax of each row of an N x K tensor.
pub fn argmax_rows(o: &Tensor<f32>) -> Vec<usize> {
    let k = o.shape()[1];
    let s = o.as_slice().expect("standard layout");
    s.chunks_exact(k)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv { (i, v) } else { (bi, bv) }
                })
                .0
        })
        .collect()
}

/// Correct predictions of argmax Σ_t O[t].
pub fn count_correct(outputs: &[Tensor<f32>], y: &[usize]) -> usize {
    let Some(first) = outputs.first() else {
        return 0;
    };
    let mut sum = first.clone();
    for o in &outputs[1..] {
        sum += o;
    }
    argmax_rows(&sum)
        .iter()
        .zip(y)
        .filter(|(a, b)| a == b)
        .count()
}

/// Evaluate a network: argmax Σ_t O[t], accuracy at every t (cumulative), loss of the mean output.
pub fn evaluate(
    net: &mut dyn Layer<f32>,
    steps: usize,
    batch: usize,
    data: &dyn BatchSource,
    loss: LossFn<'_>,
) -> Result<EvalResult> {
    let t0 = Instant::now();
    let n = data.len();
    let mut correct_t = vec![0usize; steps];
    let mut lsum = 0.0;
    let mut nb = 0;
    let idx: Vec<usize> = (0..n).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let b = data.eval_batch(chunk)?;
        let y = &b.labels;
        let outs = match &b.x {
            BatchInput::Static(x) => eval_batch(net, StepInput::Static(x), steps)?,
            BatchInput::Frames(f) => eval_batch(net, StepInput::Frames(f), steps)?,
        };
        let mut sum = outs[0].clone();
        for (t, o) in outs.iter().enumerate() {
            if t > 0 {
                sum += o;
            }
            correct_t[t] += argmax_rows(&sum)
                .iter()
                .zip(y)
                .filter(|(a, b)| a == b)
                .count();
        }
        let mean = sum.mapv(|v| v / steps as f32);
        lsum += loss(&mean, y)?.0 * y.len() as f64;
        nb += y.len();
    }
    let acc_per_t: Vec<f64> = correct_t
        .iter()
        .map(|&c| 100.0 * c as f64 / n.max(1) as f64)
        .collect();
    Ok(EvalResult {
        loss: lsum / nb.max(1) as f64,
        acc: *acc_per_t.last().unwrap_or(&0.0),
        acc_per_t,
        n,
        secs: t0.elapsed().as_secs_f64(),
    })
}
