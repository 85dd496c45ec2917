//! Unlearning: remove memorized sequences from a model's MLP weights.
//!
//! [`balanced_subnet`] implements BalancedSubnet (spec §4.1, §4.3): learn scores over every MLP
//! weight matrix so that masking the lowest-scoring `ratio` of each matrix raises the loss on
//! the forget set while keeping it low on the retain set, then zero those weights. Nothing but
//! the scores is trained and the input model is never mutated: the result is a new model that
//! shares every other tensor with the input.
//!
//! Two sampling modes:
//! - [`Mode::Paper`]: each epoch is one shuffled pass over forget ∪ retain in batches of
//!   `batch_size` (most batches hold no forget row; that group's term is then dropped, as
//!   PyTorch's gradient of an empty mean would be).
//! - [`Mode::Balanced`]: every batch carries up to `forget_per_batch` forget rows alongside
//!   sampled retain rows; it stops as soon as no forget sequence is extractable any more
//!   (checked every `check_every` steps) or after `max_steps`.
//!
//! Jobs are cooperative: [`JobControl`] carries a cancel flag checked between steps and a
//! progress record a server can read.

pub mod cli;
pub mod durable;
pub mod mask;
pub mod search;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::audit::{self, AuditItem};
use crate::error::{Error, Result};
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
        let masked = scores.masked(&base)?;
        let (loss, lf, lr) = batch_loss(model, &masked, &batch, w)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
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
            let candidate = model.with_mlp_weights(&scores.apply(&base)?)?;
            let (_, summary) = audit::audit(&candidate, None, forget_items, 64)?;
            if summary.memorized == 0 {
                stopped_early = true;
                break;
            }
        }
    }
    let mlp = scores.apply(&base)?;
    let zeros_per_matrix = base
        .0
        .iter()
        .map(|(a, b)| {
            (
                mask::zeros_for(a.elem_count(), cfg.ratio),
                mask::zeros_for(b.elem_count(), cfg.ratio),
            )
        })
        .collect();
    Ok(Outcome {
        model: model.with_mlp_weights(&mlp)?,
        mlp,
        zeros_per_matrix,
        steps,
        seconds: start.elapsed().as_secs_f64(),
        stopped_early,
    })
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
    let mut ids = Vec::with_capacity(batch.len() * width);
    let mut lens = Vec::with_capacity(batch.len());
    for e in batch {
        ids.extend(
            e.ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, width - e.ids.len())),
        );
        lens.push(e.ids.len());
    }
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
