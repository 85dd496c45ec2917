//! Unlearning: remove memorized sequences from a model's MLP weights. [`balanced_subnet`] runs
//! BalancedSubnet and Subnet (spec §4.1–4.3): it learns scores over every MLP weight matrix so
//! that masking the lowest-scoring `ratio` of each matrix raises the loss on the forget set
//! while keeping it low on the retain set, then zeroes those weights. [`step`] is the training
//! step it shares with [`controller`].
//!
//! Invariants:
//! - The input model is never mutated and nothing but the scores is trained: the result is a
//!   new model that shares every tensor but the MLP weight matrices with the input.
//! - Exactly `⌊ratio·numel⌋` entries of each MLP weight matrix are masked ([`mask`]); biases,
//!   attention, embeddings and LayerNorms are never touched.
//! - The loss is the paper's `−(1 − w)·L_forget + w·L_retain`; a group with no row in the batch
//!   is dropped (spec §4.3: PyTorch's empty mean contributes no gradient), never turned into
//!   NaN. A row's loss is the mean over its own `len − 1` predictions, so the right padding
//!   that batches rows of unequal length never counts (TinyMem rows, all `max_ctx` long, keep
//!   their PAD tokens in the loss, as the paper does).
//! - [`Mode::Paper`] is the paper's schedule: `epochs` shuffled passes over forget ∪ retain
//!   (Subnet: the forget set alone, unshuffled). [`Mode::Balanced`] deviates on purpose (up to
//!   `forget_per_batch` forget rows in every batch, stopping once an audit finds nothing
//!   extractable), as `docs/unlearning.md` ("Sampling modes") says.
//! - The initial scores and the order of the batches are drawn from `seed` alone.
//! - Bad settings, an empty forget set and (but for Subnet) an empty retain set are refused
//!   before the first step with an error naming the field, never a panic;
//!   [`JobControl::cancel`] stops a run at its next step boundary with [`Error::Cancelled`].
//! - The hand-written GPT-2 backward ([`fast_step_applies`]) and candle's autograd agree: group
//!   losses within 1e-5 relative, score gradients within 1e-4 relative L2 (this module's tests).

pub mod cli;
pub mod compare;
mod compare_report;
pub mod controller;
pub mod durable;
pub mod finetune;
pub mod greedy;
mod ig;
pub mod mask;
pub mod method;
pub mod neurons;
pub mod pipeline;
pub mod quality;
pub mod search;
pub mod sou;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditItem};
use crate::error::{Error, Result};
use crate::models::pass::{HandWrittenPass, MlpGradWorkspace};
use crate::models::{Inputs, MlpWeights, Model};
use crate::optim::{Sgd, SgdParams};
use mask::Scores;

/// How batches are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Paper,
    Balanced,
}

/// Which score-mask method runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Spec §4.3: forget and retain sets, loss `−(1 − w)·L_forget + w·L_retain`.
    BalancedSubnet,
    /// Spec §4.2: the forget set alone, unshuffled, loss `−L_forget` (gradient ascent).
    Subnet,
}

/// BalancedSubnet settings. Defaults: the paper's optimiser (SGD lr 0.1, momentum 0.9,
/// weight decay 5e-4, batch 32) with ratio 0.3 and w 0.9.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalancedSubnetConfig {
    pub method: Method,
    /// Fraction of each MLP matrix that is zeroed.
    pub ratio: f64,
    /// Retain weight: loss = −(1 − w)·L_forget + w·L_retain.
    pub w: f64,
    pub mode: Mode,
    /// Paper mode: passes over forget ∪ retain.
    pub epochs: usize,
    /// Balanced mode: step budget.
    pub max_steps: usize,
    /// Balanced mode: forget rows per batch (the rest of the batch is retain rows).
    pub forget_per_batch: usize,
    /// Balanced mode: audit the forget set every this many steps (0: never stop early).
    pub check_every: usize,
    /// Balanced mode: never stop before this many steps (the retain term keeps repairing the
    /// pruned weights after the forget set stops being extractable).
    pub min_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for BalancedSubnetConfig {
    fn default() -> Self {
        Self {
            method: Method::BalancedSubnet,
            ratio: 0.3,
            w: 0.9,
            mode: Mode::Paper,
            epochs: 1,
            max_steps: 200,
            forget_per_batch: 16,
            check_every: 25,
            min_steps: 0,
            batch_size: 32,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            seed: 0,
        }
    }
}

impl BalancedSubnetConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.ratio) {
            return Err(Error::invalid("ratio", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.w) {
            return Err(Error::invalid("w", "must be in [0, 1]"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be positive"));
        }
        if self.mode == Mode::Balanced
            && (self.forget_per_batch == 0 || self.forget_per_batch > self.batch_size)
        {
            return Err(Error::invalid(
                "forget_per_batch",
                "must be in 1..=batch_size",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid("lr", "must be positive"));
        }
        Ok(())
    }
}

/// A job's progress, readable while it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub forget_loss: Option<f64>,
    pub retain_loss: Option<f64>,
}

/// Cancellation and progress shared between a job and whoever started it.
#[derive(Debug, Clone, Default)]
pub struct JobControl {
    cancel: Arc<AtomicBool>,
    progress: Arc<Mutex<Progress>>,
}

impl JobControl {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the job to stop at its next step boundary.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn progress(&self) -> Progress {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn set(&self, p: Progress) {
        if let Ok(mut g) = self.progress.lock() {
            *g = p;
        }
    }
}

/// What an unlearning run produced.
pub struct Outcome {
    /// The edited model (shares every non-MLP tensor with the input).
    pub model: Model,
    /// The edited MLP matrices.
    pub mlp: MlpWeights,
    /// Zeroed entries per matrix, `(input projection, output projection)` per block.
    pub zeros_per_matrix: Vec<(usize, usize)>,
    pub steps: usize,
    pub seconds: f64,
    /// Balanced mode: whether it stopped because nothing was extractable any more.
    pub stopped_early: bool,
}

/// Refuses (naming `field`) a row of fewer than 2 tokens or more than `context`: what every
/// method on the hand-written pass checks before any work.
pub(crate) fn check_rows(field: &str, rows: &[Vec<u32>], context: usize) -> Result<()> {
    match rows.iter().find(|s| s.len() < 2 || s.len() > context) {
        Some(s) => Err(Error::invalid(
            field,
            format!(
                "a sequence of {} tokens; each needs 2..={context} (the context)",
                s.len()
            ),
        )),
        None => Ok(()),
    }
}

/// Whether `model` runs on the hand-written pass (f32 weights on the CPU).
pub(crate) fn on_hand_written_pass(model: &Model) -> bool {
    match model {
        Model::Gpt2(m) => m.mlp_grads_supported(),
        Model::GptNeoX(m) => m.mlp_grads_supported(),
    }
}

/// Rows right-padded with id 0 to the longest one: what the hand-written pass takes.
pub(crate) struct Padded {
    /// `[b, t]` row-major.
    pub ids: Vec<u32>,
    pub bt: (usize, usize),
    pub lens: Vec<usize>,
}

impl Padded {
    pub(crate) fn rows<'a>(rows: impl Iterator<Item = &'a [u32]> + Clone) -> Self {
        let t = rows.clone().map(<[u32]>::len).max().unwrap_or(0);
        let (mut ids, mut lens) = (Vec::new(), Vec::new());
        for r in rows {
            ids.extend(r.iter().copied().chain(std::iter::repeat_n(0, t - r.len())));
            lens.push(r.len());
        }
        Self {
            bt: (lens.len(), t),
            ids,
            lens,
        }
    }
}

/// One training row: token ids and whether it belongs to the forget set.
#[derive(Debug, Clone, Copy)]
pub struct Example<'a> {
    pub ids: &'a [u32],
    pub forget: bool,
}

/// Runs BalancedSubnet. `forget` and `retain` are token sequences; `forget_items` (the forget
/// set as audit prompt/target pairs) is used by balanced mode to stop early.
pub fn balanced_subnet(
    model: &Model,
    forget: &[Vec<u32>],
    retain: &[Vec<u32>],
    forget_items: &[AuditItem],
    cfg: &BalancedSubnetConfig,
    ctl: &JobControl,
) -> Result<Outcome> {
    cfg.validate()?;
    if forget.is_empty() {
        return Err(Error::invalid("forget", "the forget set is empty"));
    }
    let subnet = cfg.method == Method::Subnet;
    if retain.is_empty() && !subnet {
        return Err(Error::invalid("retain", "the retain set is empty"));
    }
    if subnet && cfg.mode == Mode::Balanced {
        return Err(Error::invalid(
            "mode",
            "Subnet uses the forget set alone; use paper mode",
        ));
    }
    let w = if subnet { 0.0 } else { cfg.w };
    let start = Instant::now();
    let base = model.mlp_weights();
    let scores = Scores::init(model, cfg.ratio, cfg.seed)?;
    let mut opt = Sgd::new(
        scores.all_vars(),
        SgdParams {
            lr: cfg.lr,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
        },
    );
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let batches: Vec<Vec<Example>> = match cfg.mode {
        Mode::Paper => {
            let mut all: Vec<Example> = forget
                .iter()
                .map(|s| Example {
                    ids: s,
                    forget: true,
                })
                .chain(retain.iter().filter(|_| !subnet).map(|s| Example {
                    ids: s,
                    forget: false,
                }))
                .collect();
            let mut out = Vec::new();
            for _ in 0..cfg.epochs {
                if !subnet {
                    all.shuffle(&mut rng);
                }
                out.extend(all.chunks(cfg.batch_size).map(<[Example]>::to_vec));
            }
            out
        }
        Mode::Balanced => Vec::new(),
    };
    let total = match cfg.mode {
        Mode::Paper => batches.len(),
        Mode::Balanced => cfg.max_steps,
    };
    let mut ws = StepWorkspace::default();
    tracing::debug!(
        device = ?model.device(),
        hand_written_backward = fast_step_applies(model, &scores),
        "unlearning step path"
    );
    let mut steps = 0;
    let mut stopped_early = false;
    let mut forget_order: Vec<usize> = (0..forget.len()).collect();
    let mut retain_order: Vec<usize> = (0..retain.len()).collect();
    let (mut f_pos, mut r_pos) = (forget.len(), retain.len());
    while steps < total {
        if ctl.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let batch: Vec<Example> = match cfg.mode {
            Mode::Paper => batches[steps].clone(),
            Mode::Balanced => {
                let nf = cfg.forget_per_batch.min(forget.len());
                let mut b = Vec::with_capacity(cfg.batch_size);
                for _ in 0..nf {
                    if f_pos == forget.len() {
                        forget_order.shuffle(&mut rng);
                        f_pos = 0;
                    }
                    b.push(Example {
                        ids: &forget[forget_order[f_pos]],
                        forget: true,
                    });
                    f_pos += 1;
                }
                for _ in nf..cfg.batch_size {
                    if r_pos == retain.len() {
                        retain_order.shuffle(&mut rng);
                        r_pos = 0;
                    }
                    b.push(Example {
                        ids: &retain[retain_order[r_pos]],
                        forget: false,
                    });
                    r_pos += 1;
                }
                b
            }
        };
        let (lf, lr) = step(model, &scores, &base, &batch, w, &mut opt, &mut ws)?;
        steps += 1;
        ctl.set(Progress {
            step: steps,
            total_steps: total,
            forget_loss: lf,
            retain_loss: lr,
        });
        if cfg.mode == Mode::Balanced
            && steps >= cfg.min_steps
            && cfg.check_every > 0
            && steps % cfg.check_every == 0
            && !forget_items.is_empty()
        {
            ws.release_masked();
            let candidate = model.with_mlp_weights(&scores.apply(&base)?)?;
            let (_, summary) = audit::audit(&candidate, None, forget_items, 64)?;
            if summary.memorized == 0 {
                stopped_early = true;
                break;
            }
        }
    }
    drop((ws, opt));
    let mlp = scores.apply(&base)?;
    let zeros_per_matrix = mask::zeros_per_matrix(&base, cfg.ratio);
    Ok(Outcome {
        model: model.with_mlp_weights(&mlp)?,
        mlp,
        zeros_per_matrix,
        steps,
        seconds: start.elapsed().as_secs_f64(),
        stopped_early,
    })
}

/// Buffers that [`step`] reuses from one step to the next: with the scores and the
/// optimiser's momentum, 16 bytes per MLP parameter in all on the hand-written path.
#[derive(Default)]
pub struct StepWorkspace {
    /// The pass's buffers; its MLP gradient sums double as the mask selection's scratch and
    /// become the scores' gradients in place.
    grad: MlpGradWorkspace,
    /// The masked MLP weights `(c_fc, c_proj)` per block.
    eff: Vec<(Vec<f32>, Vec<f32>)>,
}

impl StepWorkspace {
    /// Frees the masked weights between steps (the next step allocates them again), so that a
    /// candidate model built from the scores does not sit beside them.
    pub fn release_masked(&mut self) {
        self.eff = Vec::new();
    }
}

/// One BalancedSubnet step: the loss of [`batch_loss`] through the scores' straight-through
/// mask, its gradient with respect to the scores, and one optimiser step. Returns the two group
/// means (for progress reports).
///
/// GPT-2 models with a ReLU MLP on the CPU take [`crate::models::gpt2::Gpt2::mlp_grads`], a hand-written backward
/// that produces only the MLP weights' gradient; the scores' gradient is then the
/// straight-through one, `(∂L/∂W_eff ⊙ W) · sign(s)`, exactly what autograd through
/// [`Scores::masked`] gives. Every other model goes through candle's autograd.
pub fn step(
    model: &Model,
    scores: &Scores,
    base: &MlpWeights,
    batch: &[Example],
    w: f64,
    opt: &mut Sgd,
    ws: &mut StepWorkspace,
) -> Result<(Option<f64>, Option<f64>)> {
    if let Some((lf, lr)) = fast_score_grads(model, scores, base, batch, w, ws)? {
        let grads = ws.grad.mlp_grads_mut();
        opt.step_slices(|i| grads.get(i).map(|g| g.as_slice()))?;
        return Ok((lf, lr));
    }
    let masked = scores.masked(base)?;
    let (loss, lf, lr) = batch_loss(model, &masked, batch, w)?;
    let grads = loss.backward()?;
    opt.step(&grads)?;
    Ok((lf, lr))
}

/// Whether [`step`] takes the hand-written backward for `model` and `scores`: weights f32 on
/// the CPU, GPT-2 or GPT-NeoX, scores in the weights' own layout. On any other device (CUDA)
/// or dtype the step runs through candle's autograd on the model's own device.
pub fn fast_step_applies(model: &Model, scores: &Scores) -> bool {
    match model {
        Model::Gpt2(gpt) => gpt.mlp_grads_supported() && !scores.linear_layout(),
        Model::GptNeoX(neox) => neox.mlp_grads_supported() && scores.linear_layout(),
    }
}

/// `f` of a CPU f32 tensor's values, without a copy where the tensor is contiguous.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (guard, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*guard, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// Score gradients into `ws.ds` (in [`Scores::all_vars`] order) and the group means, through
/// [`crate::models::gpt2::Gpt2::mlp_grads`]; `None` when the model does not qualify.
fn fast_score_grads(
    model: &Model,
    scores: &Scores,
    base: &MlpWeights,
    batch: &[Example],
    w: f64,
    ws: &mut StepWorkspace,
) -> Result<Option<(Option<f64>, Option<f64>)>> {
    if !fast_step_applies(model, scores) {
        return Ok(None);
    }
    let width = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if width < 2 {
        return Err(Error::invalid("sequences", "need at least 2 tokens each"));
    }
    let Padded { ids, lens, .. } = Padded::rows(batch.iter().map(|e| e.ids));
    let count = |f: bool| batch.iter().filter(|e| e.forget == f).count();
    let (nf, nr) = (count(true), count(false));
    let (wf, wr) = (-(1.0 - w), w);
    let (use_f, use_r) = (nf > 0 && wf != 0.0, nr > 0 && wr != 0.0);
    if !use_f && !use_r {
        return Err(Error::invalid("w", "both loss terms have zero weight"));
    }
    let row_weight: Vec<f32> = batch
        .iter()
        .map(|e| match e.forget {
            true if use_f => (wf / nf as f64) as f32,
            false if use_r => (wr / nr as f64) as f32,
            _ => 0.0,
        })
        .collect();
    let pairs: Vec<(&Tensor, &candle_core::Var)> = base
        .0
        .iter()
        .zip(&scores.vars)
        .flat_map(|((w1, w2), (s1, s2))| [(w1, s1), (w2, s2)])
        .collect();
    ws.eff.resize_with(pairs.len() / 2, Default::default);
    // The masked weights W ⊙ hard, one matrix per task, into the workspace's buffers.
    let ratio = scores.ratio;
    let mut eff: Vec<&mut Vec<f32>> = ws.eff.iter_mut().flat_map(|(a, b)| [a, b]).collect();
    eff.par_iter_mut()
        .zip(pairs.par_iter())
        .try_for_each(|(eff, (wt, s))| {
            with_values(wt, |wv| {
                with_values(s.as_tensor(), |sv| {
                    mask::masked_copy(wv, sv, mask::zeros_for(sv.len(), ratio), eff)
                })
            })
            .and_then(|r| r)
        })?;
    let shape = (batch.len(), width);
    let row_loss = match model {
        Model::Gpt2(gpt) => {
            gpt.mlp_grads(&ids, shape, &lens, &row_weight, &ws.eff, &mut ws.grad)?
                .row_loss
        }
        Model::GptNeoX(neox) => {
            neox.mlp_grads(&ids, shape, &lens, &row_weight, &ws.eff, &mut ws.grad)?
                .row_loss
        }
    };
    // Straight-through, in place: ∂L/∂s = (∂L/∂W_eff ⊙ W) · sign(s), with sign(0) = +1 as
    // candle's abs.
    ws.grad
        .mlp_grads_mut()
        .into_par_iter()
        .zip(pairs.par_iter())
        .try_for_each(|(g, (wt, s))| {
            with_values(wt, |wv| {
                with_values(s.as_tensor(), |sv| {
                    g.iter_mut()
                        .zip(wv)
                        .zip(sv)
                        .for_each(|((g, w), s)| *g = (*g * w) * if *s >= 0.0 { 1.0 } else { -1.0 });
                })
            })
            .and_then(|r| r)
        })?;
    let mean = |f: bool| -> Option<f64> {
        let v: Vec<f64> = row_loss
            .iter()
            .zip(batch)
            .filter(|(_, e)| e.forget == f)
            .map(|(l, _)| *l)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let lf = if use_f { mean(true) } else { None };
    let lr = if use_r { mean(false) } else { None };
    Ok(Some((lf, lr)))
}

/// `−(1 − w)·L_forget + w·L_retain` over one batch, dropping a group with no rows (spec §4.3).
/// Returns the loss and the two group means (for progress reports).
pub fn batch_loss(
    model: &Model,
    mlp: &MlpWeights,
    batch: &[Example],
    w: f64,
) -> Result<(Tensor, Option<f64>, Option<f64>)> {
    let dev = model.device();
    let width = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if width < 2 {
        return Err(Error::invalid("sequences", "need at least 2 tokens each"));
    }
    let Padded { ids, lens, .. } = Padded::rows(batch.iter().map(|e| e.ids));
    let ids = Tensor::from_vec(ids, (batch.len(), width), dev)?;
    let logits = model.forward(&Inputs::causal(&ids, 0)?, None, Some(mlp))?;
    let per_row = per_sequence_loss(&logits, &ids, &lens)?;
    let mut terms = Vec::new();
    let (mut lf, mut lr) = (None, None);
    for (forget, weight) in [(true, -(1.0 - w)), (false, w)] {
        let idx: Vec<u32> = batch
            .iter()
            .enumerate()
            .filter(|(_, e)| e.forget == forget)
            .map(|(i, _)| i as u32)
            .collect();
        if idx.is_empty() || weight == 0.0 {
            continue;
        }
        let mean = per_row
            .index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?
            .mean_all()?;
        let v = mean.to_scalar::<f32>()? as f64;
        if forget {
            lf = Some(v);
        } else {
            lr = Some(v);
        }
        terms.push((mean * weight)?);
    }
    let loss = match terms.len() {
        0 => return Err(Error::invalid("w", "both loss terms have zero weight")),
        1 => terms.remove(0),
        _ => (&terms[0] + &terms[1])?,
    };
    Ok((loss, lf, lr))
}

/// Mean next-token cross-entropy of each row over its own `len − 1` predictions (right padding
/// excluded). Equal lengths take the shared fast path.
fn per_sequence_loss(logits: &Tensor, ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    if lens.iter().all(|&l| l == t) {
        return Ok(crate::models::ops::per_sequence_lm_loss(logits, ids)?);
    }
    let nll = crate::models::ops::token_nll(logits, ids)?;
    let mask: Vec<f32> = lens
        .iter()
        .flat_map(|&l| (0..t - 1).map(move |j| if j + 1 < l { 1.0 / (l - 1) as f32 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t - 1), logits.device())?;
    Ok((nll * mask)?.sum(1)?)
}

#[cfg(test)]
mod tests {
    //! The fast step against autograd: [`fast_score_grads`] (the hand-written pass) and
    //! candle's backward through [`Scores::masked`] + [`batch_loss`] agree on the group losses
    //! (relative 1e-5) and on every score gradient (relative L2 error ≤ 1e-4).
    use super::*;
    use crate::models::ops::Activation;
    use crate::models::ModelConfig;
    use crate::test_util::rows;
    use candle_core::Device;

    fn config(tied: bool, inverse_idx: bool, n_layer: usize) -> ModelConfig {
        crate::test_util::relu_gpt2((14, 64, 24, 3), n_layer, tied, inverse_idx)
    }

    fn config_with(act: Activation, tied: bool, inverse_idx: bool, n_layer: usize) -> ModelConfig {
        crate::test_util::gpt2_with(act, (14, 64, 24, 3), n_layer, tied, inverse_idx)
    }

    use crate::test_util::rel_l2;

    /// A small GPT-NeoX (vocab 14, 64 positions, width 24, 3 heads, MLP 40) for the fast step.
    fn neox(
        layers: usize,
        rotary_pct: f64,
        parallel: bool,
        act: Activation,
        bias: bool,
    ) -> ModelConfig {
        crate::test_util::neox(
            (14, 64, 24, 3, 40),
            layers,
            rotary_pct,
            parallel,
            act,
            bias,
            false,
        )
    }

    #[test]
    fn fast_step_matches_autograd_through_the_masked_model() {
        // (tied head, 1/(layer+1) attention scale, layers, row lengths, forget rows, w):
        // lengths across several attention blocks (32 rows each), right padding, empty groups.
        let long = |_: usize| 45;
        let mixed = |r: usize| [45, 7, 33, 2, 40][r % 5];
        // Rows too short to predict anything count in their group's mean with loss 0.
        let short = |r: usize| [9, 1, 0, 6, 2][r % 5];
        // Every MLP activation the loader accepts.
        use Activation::{Gelu, GeluTanh, Relu, Silu};
        type Case<'a> = (ModelConfig, &'a dyn Fn(usize) -> usize, usize, f64);
        let gpt2 = config_with;
        let cases: Vec<Case> = vec![
            (gpt2(Relu, true, false, 3), &long, 3, 0.9),
            (gpt2(Relu, false, true, 2), &mixed, 2, 0.5),
            (gpt2(Relu, true, false, 1), &mixed, 0, 0.9),
            (gpt2(Relu, true, false, 2), &long, 5, 0.0),
            (gpt2(Relu, false, false, 2), &short, 3, 0.7),
            (gpt2(Gelu, false, true, 2), &mixed, 2, 0.5),
            (gpt2(GeluTanh, true, false, 2), &long, 3, 0.9),
            (gpt2(Silu, false, false, 1), &mixed, 3, 0.7),
            // GPT-NeoX: partial and full rotary, parallel and sequential residual, biases or not.
            (neox(2, 0.25, true, Gelu, true), &mixed, 2, 0.5),
            (neox(2, 1.0, false, Gelu, false), &long, 3, 0.9),
            (neox(1, 0.5, true, GeluTanh, true), &short, 3, 0.7),
        ];
        for (ci, (cfg, len, nf, w)) in cases.into_iter().enumerate() {
            let model = Model::random(&cfg, &Device::Cpu).unwrap();
            let data = rows(5, len, ci as u64 + 1);
            let batch: Vec<Example> = data
                .iter()
                .enumerate()
                .map(|(i, ids)| Example {
                    ids,
                    forget: i < nf,
                })
                .collect();
            let base = model.mlp_weights();
            let scores = Scores::init(&model, 0.3, ci as u64).unwrap();
            let mut ws = StepWorkspace::default();
            // Twice: the second call reuses the workspace's buffers.
            for _ in 0..2 {
                let (flf, flr) = fast_score_grads(&model, &scores, &base, &batch, w, &mut ws)
                    .unwrap()
                    .expect("f32 on the CPU takes the fast path");
                let masked = scores.masked(&base).unwrap();
                let (loss, lf, lr) = batch_loss(&model, &masked, &batch, w).unwrap();
                let grads = loss.backward().unwrap();
                for (got, want) in [(flf, lf), (flr, lr)] {
                    match (got, want) {
                        (Some(a), Some(b)) => {
                            assert!((a - b).abs() <= 1e-5 * b.abs(), "case {ci}: {a} vs {b}")
                        }
                        (a, b) => assert_eq!(a.is_some(), b.is_some(), "case {ci}"),
                    }
                }
                let ds = ws.grad.mlp_grads_mut();
                assert_eq!(ds.len(), scores.all_vars().len());
                for (got, var) in ds.iter().zip(scores.all_vars()) {
                    let want = crate::test_util::grad_values(&grads, var.as_tensor());
                    assert!(want.iter().any(|&x| x != 0.0), "case {ci}: zero gradient");
                    let e = rel_l2(got, &want);
                    assert!(e <= 1e-4, "case {ci}: relative gradient error {e}");
                }
            }
        }
    }

    #[test]
    fn fast_step_rejects_bad_rows_without_panicking() {
        let model = Model::random(&config(true, false, 1), &Device::Cpu).unwrap();
        let base = model.mlp_weights();
        let scores = Scores::init(&model, 0.3, 0).unwrap();
        let mut ws = StepWorkspace::default();
        let too_long = vec![1u32; 65];
        let bad_id = vec![1u32, 99, 2];
        let short = vec![3u32];
        for ids in [&too_long, &bad_id, &short] {
            let batch = [Example { ids, forget: true }];
            assert!(fast_score_grads(&model, &scores, &base, &batch, 0.5, &mut ws).is_err());
        }
    }
}
