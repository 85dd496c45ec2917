//! The takedown controller: one BalancedSubnet run (the paper's loss, scores, straight-through
//! mask and SGD) whose mask ratio and forget rows are chosen per request from audits taken while
//! it runs, and which ends as soon as the gates pass.
//!
//! One run, one set of scores, one optimiser state, from start to finish:
//! - every batch holds each *active* forget sequence once (at most `forget_per_batch`, cycling
//!   when there are more) and `batch_size − forget_per_batch` retain rows; at the start every
//!   sequence is active;
//! - every `check_every` steps the sequences are audited under their definitions on the masked
//!   model; the active set becomes the sequences still extractable, so the forget term stops
//!   pushing on what is already gone (an unbounded `−L_forget` there only costs accuracy);
//! - when `patience` checks in a row remove nothing more, the mask ratio is raised by
//!   `ratio_growth` (up to `max_ratio`), continuing from the same scores: the newly masked
//!   entries are the ones whose scores were already lowest;
//! - when a check finds nothing extractable, the gates are measured on the masked model and the
//!   run ends if they pass. If they fail, the steps go on retain-only (repair), measuring the
//!   gates again after 2, 4, 8, … times `check_every` steps (at most 16 times) while nothing is
//!   extractable; sequences that come back re-enter the active set;
//! - the time or step budget ends a run without a passing model ([`Ending::Budget`],
//!   [`Ending::Steps`]: the last masked model is returned); a cancellation ends it with
//!   [`Error::Cancelled`].
//!
//! Invariants:
//! - The gates only ever see a candidate on which no forget sequence is extractable, and
//!   [`Ending::Passed`] returns exactly the candidate they passed. Every check, with its gate
//!   failures, is kept for the report.
//! - The inputs are never mutated. Every candidate is the root's MLP weights (without a root,
//!   the model's own) with some entries zeroed: no weight takes a value its source lacks.
//! - The ratio never decreases within a run and never exceeds `max_ratio` on top of the weights
//!   that were already zero; the mask never covers more than 95 % of a matrix.
//! - Bad settings, an empty or mismatched forget set, an empty retain set and a root whose MLP
//!   shapes differ are refused before the first step with an error naming the field.
//! - The initial scores and the batch order come from `seed`; where the time budget ends a run
//!   depends on the machine.
//! - It deviates from the paper on purpose, as `docs/unlearning.md` ("The takedown controller")
//!   says: the ratio grows during the run, the forget term covers the extractable sequences
//!   only, and the run stops on the gates instead of after a fixed number of epochs.
//!
//! How the defaults were chosen is in `docs/unlearning.md` ("How the defaults were chosen");
//! what they achieve is in `docs/benchmarks.md` ("Takedown success (issue #15)").

use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::mask::{self, Scores};
use super::{step, Example, JobControl, Progress, StepWorkspace};
use crate::audit::{self, AuditItem};
use crate::error::{Error, Result};
use crate::models::{MlpWeights, Model};
use crate::optim::{Sgd, SgdParams};

/// The controller's settings; the defaults are what `lethe serve`, `lethe unlearn` and
/// `lethe bench takedowns` use.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// Mask ratio at the start (fraction of each MLP matrix zeroed).
    pub start_ratio: f64,
    /// Mask ratio added at the start of a job on a lineage (the mask is over the root's
    /// weights and starts at the parent's zeros, see [`run`]): smaller than `start_ratio`,
    /// since the earlier takedowns' mask already covers much of what the new sequences need.
    pub lineage_start_ratio: f64,
    /// The ratio is never raised above this.
    pub max_ratio: f64,
    /// Factor applied to the ratio when progress stalls.
    pub ratio_growth: f64,
    /// Retain weight w in −(1 − w)·L_forget + w·L_retain.
    pub w: f64,
    /// Audit the forget sequences every this many steps.
    pub check_every: usize,
    /// Checks in a row without a sequence removed before the ratio is raised.
    pub patience: usize,
    /// Most steps in one run.
    pub max_steps: usize,
    /// Wall-time budget of one run, in seconds (checked between steps).
    pub budget_seconds: f64,
    /// Most forget rows per batch: each extractable sequence once, cycling when there are more.
    pub forget_per_batch: usize,
    /// A batch holds `batch_size − forget_per_batch` retain rows.
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Checks count a sequence as extractable by the risk measures too (discoverable by
    /// sampling, extracted from a perturbed prompt): the pipeline sets it from the risk gate, so
    /// the forget term keeps working on what that gate would fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub risk: Option<crate::audit::RiskOptions>,
    /// Checks also audit the candidate with int8-rounded matrices (from the quantized gate).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub quantized: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            start_ratio: 0.1,
            lineage_start_ratio: 0.025,
            max_ratio: 0.5,
            ratio_growth: 1.5,
            w: 0.9,
            check_every: 10,
            patience: 3,
            max_steps: 2000,
            budget_seconds: 600.0,
            forget_per_batch: 16,
            batch_size: 32,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            seed: 0,
            risk: None,
            quantized: false,
        }
    }
}

impl ControllerConfig {
    /// These settings with the job's starting ratio set to `ratio`; a lineage's starting ratio
    /// is kept at most `ratio` (a start of 0.01 is not refused for being under the lineage
    /// default).
    pub fn with_start_ratio(self, ratio: f64) -> Self {
        Self {
            start_ratio: ratio,
            lineage_start_ratio: self.lineage_start_ratio.min(ratio),
            ..self
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.start_ratio > 0.0 && self.start_ratio < 1.0) {
            return Err(Error::invalid("start_ratio", "must be in (0, 1)"));
        }
        if !(self.lineage_start_ratio > 0.0 && self.lineage_start_ratio <= self.start_ratio) {
            return Err(Error::invalid(
                "lineage_start_ratio",
                "must be in (0, start_ratio]",
            ));
        }
        if !(self.max_ratio >= self.start_ratio && self.max_ratio < 1.0) {
            return Err(Error::invalid("max_ratio", "must be in [start_ratio, 1)"));
        }
        if !(self.ratio_growth.is_finite() && self.ratio_growth >= 1.0) {
            return Err(Error::invalid("ratio_growth", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.w) {
            return Err(Error::invalid("w", "must be in [0, 1)"));
        }
        if self.check_every == 0 || self.max_steps == 0 {
            return Err(Error::invalid(
                "check_every",
                "check_every and max_steps must be at least 1",
            ));
        }
        if self.forget_per_batch == 0 || self.forget_per_batch >= self.batch_size {
            return Err(Error::invalid(
                "forget_per_batch",
                "must be in 1..batch_size (the rest of the batch is retain rows)",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid("lr", "must be positive"));
        }
        if !(self.budget_seconds.is_finite() && self.budget_seconds >= 0.0) {
            return Err(Error::invalid(
                "budget_seconds",
                "must be a finite number >= 0",
            ));
        }
        Ok(())
    }
}

/// One audit of the forget sequences during the run.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub step: usize,
    pub seconds: f64,
    pub ratio: f64,
    /// Forget sequences still extractable.
    pub extractable: usize,
    /// Gate failures when the gates were measured at this check (empty: they passed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gates_failed: Option<Vec<String>>,
}

/// The mask never covers more than this fraction of a matrix.
const MAX_TOTAL_RATIO: f64 = 0.95;

/// Makes the entries that are exactly 0 in `start` (pruned by an earlier takedown on the
/// lineage) the first the mask covers, and returns the smallest fraction of such entries over
/// the matrices (what a mask covers at no cost in every matrix).
///
/// `movable: None` (the weights trained are `start`'s own, so those entries are zero for good):
/// their scores become 0, below every other; their straight-through gradient is 0, so they stay
/// masked. `movable: Some(extra)` (the mask is over the root's weights, where those entries are
/// not zero): each score becomes a random fraction of half the magnitude below which the
/// `extra` lowest other scores lie, with a random sign. The first mask is still `start`'s zeros
/// plus those lowest others, but an entry the retain loss wants back sits as near the threshold
/// as the others around it, and its gradient is not 0.
fn mark_pruned(
    scores: &Scores,
    start: &MlpWeights,
    movable: Option<f64>,
    seed: u64,
) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9);
    let mut least = 1.0f64;
    for ((w1, w2), (s1, s2)) in start.0.iter().zip(&scores.vars) {
        for (w, s) in [(w1, s1), (w2, s2)] {
            let wv: Vec<f32> = w
                .flatten_all()?
                .to_device(&candle_core::Device::Cpu)?
                .to_vec1()?;
            let zeros = wv.iter().filter(|x| **x == 0.0).count();
            least = least.min(zeros as f64 / wv.len().max(1) as f64);
            if zeros == 0 {
                continue;
            }
            let mut sv: Vec<f32> = s
                .as_tensor()
                .flatten_all()?
                .to_device(&candle_core::Device::Cpu)?
                .to_vec1()?;
            let near = match movable {
                None => 0.0,
                Some(extra) => {
                    let others: Vec<f32> = sv
                        .iter()
                        .zip(&wv)
                        .filter(|(_, w)| **w != 0.0)
                        .map(|(s, _)| *s)
                        .collect();
                    let k = mask::zeros_for(wv.len(), extra).clamp(1, others.len().max(1));
                    let below = mask::smallest_abs(&others, k);
                    below
                        .iter()
                        .map(|&i| others[i].abs())
                        .fold(0.0f32, f32::max)
                        * 0.5
                }
            };
            for (s, w) in sv.iter_mut().zip(&wv) {
                if *w == 0.0 {
                    let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                    *s = sign * near * rng.random::<f32>();
                }
            }
            let t =
                candle_core::Tensor::from_vec(sv, s.as_tensor().dims(), s.as_tensor().device())?;
            s.set(&t)?;
        }
    }
    // Scores on the device must stay in their dtype (f32, as Scores::init makes them).
    Ok(least.min(MAX_TOTAL_RATIO))
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The gates passed; the model is the one they passed on.
    Passed,
    /// The time budget ran out.
    Budget,
    /// The step budget ran out.
    Steps,
    /// A one-shot method's (`lethe serve --unlearn-method`) only candidate failed the gates.
    GatesFailed,
}

/// What a controlled run produced.
pub struct Controlled {
    /// The gate-passing model when the gates passed, else the masked model at the end (shares
    /// every non-MLP tensor with the input).
    pub model: Model,
    pub ending: Ending,
    /// Every check, in order.
    pub checks: Vec<Check>,
    pub steps: usize,
    pub seconds: f64,
    /// The mask ratio the controller reached, on top of the weights that were already zero.
    pub ratio: f64,
    /// The mask ratio including those (the fraction of each MLP matrix that is zero after).
    pub total_ratio: f64,
    /// Zeroed entries per matrix at the end, `(input projection, output projection)` per block.
    pub zeros_per_matrix: Vec<(usize, usize)>,
}

/// Runs the controller from `model`. `forget[i]` is trained on and `items[i]` is its audit
/// under its definition; `gates` measures a candidate whose forget sequences are all
/// non-extractable and returns the reasons it fails (empty: it passes).
///
/// Without `root`, the mask is over `model`'s own weights: entries already zero (an earlier
/// takedown) are masked first and for good, and the ratio starts at `start_ratio` on top of
/// them. With `root` (the lineage's unedited model, of which `model` is a masked copy), the
/// mask is over the root's weights: it starts at `model`'s zeros plus `lineage_start_ratio`,
/// and an earlier takedown's pruned entries may come back where the retain loss wants them
/// (the forget set then holds the lineage's earlier sequences too, so none of them returns
/// unseen). Candidates are always `root` (or `model`) with masked MLP weights.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &Model,
    root: Option<&Model>,
    forget: &[Vec<u32>],
    items: &[AuditItem],
    retain: &[Vec<u32>],
    cfg: &ControllerConfig,
    ctl: &JobControl,
    gates: &mut dyn FnMut(&Model) -> Result<Vec<String>>,
) -> Result<Controlled> {
    cfg.validate()?;
    if forget.is_empty() || forget.len() != items.len() {
        return Err(Error::invalid(
            "forget",
            "the forget set is empty or does not match its audit items",
        ));
    }
    if retain.is_empty() {
        return Err(Error::invalid("retain", "the retain set is empty"));
    }
    let start = Instant::now();
    let from = root.unwrap_or(model);
    let base = from.mlp_weights();
    let own = model.mlp_weights();
    let shapes = |w: &MlpWeights| -> Vec<Vec<usize>> {
        w.0.iter()
            .flat_map(|(a, b)| [a.dims().to_vec(), b.dims().to_vec()])
            .collect()
    };
    if shapes(&base) != shapes(&own) {
        return Err(Error::invalid(
            "root",
            "the lineage's root does not have the model's MLP shapes",
        ));
    }
    let mut extra = if root.is_some() {
        cfg.lineage_start_ratio
    } else {
        cfg.start_ratio
    };
    let mut scores = Scores::init(from, extra, cfg.seed)?;
    // Weights an earlier takedown on this lineage zeroed are masked first; the ratio the
    // controller chooses is on top of them (see `mark_pruned`).
    let already = mark_pruned(&scores, &own, root.map(|_| extra), cfg.seed)?;
    scores.ratio = (already + extra).min(MAX_TOTAL_RATIO);
    let mut opt = Sgd::new(
        scores.all_vars(),
        SgdParams {
            lr: cfg.lr,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
        },
    );
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let mut ws = StepWorkspace::default();
    let mut active: Vec<usize> = (0..forget.len()).collect();
    let mut retain_order: Vec<usize> = (0..retain.len()).collect();
    let (mut f_pos, mut r_pos) = (active.len(), retain.len());
    let mut checks = Vec::new();
    // Fewest extractable sequences seen at the current ratio, and checks since it fell.
    let mut best_at_ratio = usize::MAX;
    let mut stalled = 0;
    let mut steps = 0;
    // Steps before which the gates are not measured again, and the last wait.
    let mut next_gate = 0;
    let mut gate_wait = cfg.check_every;
    let ending = loop {
        if ctl.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if steps >= cfg.max_steps {
            break Ending::Steps;
        }
        if start.elapsed().as_secs_f64() >= cfg.budget_seconds {
            break Ending::Budget;
        }
        // Each active sequence once (identical rows add nothing to a mean but compute); the
        // retain rows fill the rest of a full batch's retain share.
        let nf = active.len().min(cfg.forget_per_batch);
        let mut batch = Vec::with_capacity(nf + cfg.batch_size - cfg.forget_per_batch);
        for _ in 0..nf {
            if f_pos >= active.len() {
                active.shuffle(&mut rng);
                f_pos = 0;
            }
            batch.push(Example {
                ids: &forget[active[f_pos]],
                forget: true,
            });
            f_pos += 1;
        }
        for _ in cfg.forget_per_batch..cfg.batch_size {
            if r_pos == retain.len() {
                retain_order.shuffle(&mut rng);
                r_pos = 0;
            }
            batch.push(Example {
                ids: &retain[retain_order[r_pos]],
                forget: false,
            });
            r_pos += 1;
        }
        let (lf, lr) = step(from, &scores, &base, &batch, cfg.w, &mut opt, &mut ws)?;
        steps += 1;
        ctl.set(Progress {
            step: steps,
            total_steps: cfg.max_steps,
            forget_loss: lf,
            retain_loss: lr,
        });
        // The last step of the step budget is a check too.
        if steps % cfg.check_every != 0 && steps < cfg.max_steps {
            continue;
        }
        // The candidate's MLP weights take the place of the step's masked copy until the
        // next step (the memory bound in docs/unlearning.md).
        ws.release_masked();
        let candidate = from.with_mlp_weights(&scores.apply(&base)?)?;
        let opts = audit::AuditOptions {
            risk: cfg.risk.clone(),
            ..audit::AuditOptions::greedy(64)
        };
        let (results, _) = audit::audit_with(&candidate, None, items, &opts)?;
        let int8 = if cfg.quantized {
            Some(audit::audit(&candidate.fake_quantized(8)?, None, items, 64)?.0)
        } else {
            None
        };
        let extractable: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(i, r)| r.extractable() || int8.as_ref().is_some_and(|q| q[*i].memorized))
            .map(|(i, _)| i)
            .collect();
        let mut check = Check {
            step: steps,
            seconds: start.elapsed().as_secs_f64(),
            ratio: extra,
            extractable: extractable.len(),
            gates_failed: None,
        };
        if extractable.is_empty() && steps >= next_gate {
            let failed = gates(&candidate)?;
            let passed = failed.is_empty();
            check.gates_failed = Some(failed);
            tracing::debug!(?check, "controller check");
            checks.push(check);
            if passed {
                return Ok(finish(
                    candidate,
                    Ending::Passed,
                    checks,
                    steps,
                    start,
                    extra,
                    &scores,
                    &base,
                ));
            }
            // A gate measurement costs as much as dozens of steps: while repairing, measure
            // again after twice as many steps as the last wait (20, 40, 80, … at most 160).
            gate_wait = (gate_wait * 2).min(16 * cfg.check_every);
            next_gate = steps + gate_wait;
        } else if extractable.is_empty() {
            tracing::debug!(?check, "controller check (repairing)");
            checks.push(check);
        } else {
            tracing::debug!(?check, "controller check");
            checks.push(check);
            if extractable.len() < best_at_ratio {
                best_at_ratio = extractable.len();
                stalled = 0;
            } else {
                stalled += 1;
            }
            if stalled >= cfg.patience && extra < cfg.max_ratio {
                extra = (extra * cfg.ratio_growth).min(cfg.max_ratio);
                scores.ratio = (already + extra).min(MAX_TOTAL_RATIO);
                best_at_ratio = usize::MAX;
                stalled = 0;
            }
        }
        active = extractable;
        f_pos = active.len();
    };
    drop((ws, opt));
    let last = from.with_mlp_weights(&scores.apply(&base)?)?;
    Ok(finish(
        last, ending, checks, steps, start, extra, &scores, &base,
    ))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    model: Model,
    ending: Ending,
    checks: Vec<Check>,
    steps: usize,
    start: Instant,
    extra: f64,
    scores: &Scores,
    base: &MlpWeights,
) -> Controlled {
    let zeros_per_matrix = mask::zeros_per_matrix(base, scores.ratio);
    Controlled {
        model,
        ending,
        checks,
        steps,
        seconds: start.elapsed().as_secs_f64(),
        ratio: extra,
        total_ratio: scores.ratio,
        zeros_per_matrix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_start_ratio_under_the_lineage_default_is_accepted() {
        let c = ControllerConfig::default().with_start_ratio(0.01);
        c.validate().unwrap();
        assert_eq!((c.start_ratio, c.lineage_start_ratio), (0.01, 0.01));
        let c = ControllerConfig::default().with_start_ratio(0.2);
        assert_eq!(
            c.lineage_start_ratio,
            ControllerConfig::default().lineage_start_ratio
        );
    }

    fn model() -> Model {
        let cfg = crate::test_util::relu_gpt2((14, 64, 24, 3), 2, true, false);
        Model::random(&cfg, &Device::Cpu).unwrap()
    }

    /// Items the model regurgitates by construction: the target is its own greedy continuation.
    fn extractable(
        model: &Model,
        prompts: &[Vec<u32>],
        n: usize,
    ) -> (Vec<Vec<u32>>, Vec<AuditItem>) {
        let probe: Vec<AuditItem> = prompts
            .iter()
            .map(|p| AuditItem {
                prompt: p.clone(),
                target: vec![0; n],
            })
            .collect();
        let reqs: Vec<_> = probe.iter().map(|it| audit::request(it, None)).collect();
        let outs = crate::engine::generate(model, None, &reqs).unwrap();
        let items: Vec<AuditItem> = prompts
            .iter()
            .zip(outs)
            .map(|(p, g)| AuditItem {
                prompt: p.clone(),
                target: g.tokens[..n].to_vec(),
            })
            .collect();
        let forget = items
            .iter()
            .map(|it| it.prompt.iter().chain(&it.target).copied().collect())
            .collect();
        (forget, items)
    }

    fn retain() -> Vec<Vec<u32>> {
        crate::test_util::rows(24, |_| 30, 7)
    }

    fn quick() -> ControllerConfig {
        ControllerConfig {
            check_every: 5,
            patience: 1,
            max_steps: 200,
            ..ControllerConfig::default()
        }
    }

    #[test]
    fn it_stops_at_the_first_check_where_nothing_is_extractable_and_the_gates_pass() {
        let m = model();
        let (forget, items) = extractable(&m, &[vec![1, 2, 3, 4, 5, 6], vec![6, 5, 4, 3, 2, 1]], 8);
        let (_, s) = audit::audit(&m, None, &items, 8).unwrap();
        assert_eq!(s.memorized, 2, "extractable by construction");
        let mut calls = 0;
        let out = run(
            &m,
            None,
            &forget,
            &items,
            &retain(),
            &quick(),
            &JobControl::new(),
            &mut |c| {
                calls += 1;
                let (_, s) = audit::audit(c, None, &items, 8).unwrap();
                assert_eq!(
                    s.memorized, 0,
                    "the gates only see candidates with nothing extractable"
                );
                Ok(Vec::new())
            },
        )
        .unwrap();
        assert_eq!(out.ending, Ending::Passed);
        assert_eq!(calls, 1);
        let last = out.checks.last().unwrap();
        assert_eq!((last.extractable, last.step), (0, out.steps));
        assert_eq!(last.gates_failed.as_deref(), Some(&[][..]));
        assert!(out.checks[..out.checks.len() - 1]
            .iter()
            .all(|c| c.extractable > 0));
        let (_, s) = audit::audit(&out.model, None, &items, 8).unwrap();
        assert_eq!(s.memorized, 0);
        // The ratio never goes down.
        assert!(out.checks.windows(2).all(|w| w[1].ratio >= w[0].ratio));
    }

    #[test]
    fn failing_gates_keep_it_repairing_until_they_pass_or_the_steps_run_out() {
        let m = model();
        let (forget, items) = extractable(&m, &[vec![3, 1, 4, 1, 5, 9]], 8);
        let mut calls = 0;
        let out = run(
            &m,
            None,
            &forget,
            &items,
            &retain(),
            &quick(),
            &JobControl::new(),
            &mut |_| {
                calls += 1;
                Ok(if calls < 3 {
                    vec!["too much drift".into()]
                } else {
                    Vec::new()
                })
            },
        )
        .unwrap();
        assert_eq!(out.ending, Ending::Passed);
        assert_eq!(calls, 3);
        let gated: Vec<&Check> = out
            .checks
            .iter()
            .filter(|c| c.gates_failed.is_some())
            .collect();
        assert_eq!(gated.len(), 3);
        assert_eq!(gated[0].gates_failed.as_ref().unwrap()[0], "too much drift");
        // Never passing: the step budget ends it, with the last model returned.
        let cfg = ControllerConfig {
            max_steps: 30,
            ..quick()
        };
        let out = run(
            &m,
            None,
            &forget,
            &items,
            &retain(),
            &cfg,
            &JobControl::new(),
            &mut |_| Ok(vec!["no".into()]),
        )
        .unwrap();
        assert_eq!((out.ending, out.steps), (Ending::Steps, 30));
    }

    #[test]
    fn weights_already_zero_are_masked_first_and_the_ratio_counts_on_top() {
        let m = model();
        // Zero the first 20 % of every MLP matrix, as an earlier takedown would have.
        let w = m.mlp_weights();
        let zeroed = MlpWeights(
            w.0.iter()
                .map(|(a, b)| {
                    let z = |t: &candle_core::Tensor| {
                        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                        let k = mask::zeros_for(v.len(), 0.2);
                        v[..k].iter_mut().for_each(|x| *x = 0.0);
                        candle_core::Tensor::from_vec(v, t.dims(), t.device()).unwrap()
                    };
                    (z(a), z(b))
                })
                .collect(),
        );
        let m = m.with_mlp_weights(&zeroed).unwrap();
        let scores = Scores::init(&m, 0.1, 1).unwrap();
        let already = mark_pruned(&scores, &m.mlp_weights(), None, 0).unwrap();
        assert!((0.19..=0.2).contains(&already), "{already}");
        let mut masked = scores;
        masked.ratio = already;
        let after = masked.apply(&m.mlp_weights()).unwrap();
        for ((a, b), (x, y)) in after.0.iter().zip(&m.mlp_weights().0) {
            for (p, q) in [(a, x), (b, y)] {
                let p: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
                let q: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(p, q, "masking the zeros changes nothing");
            }
        }
    }

    #[test]
    fn on_a_lineage_the_mask_is_over_the_root_and_starts_at_the_parents_zeros() {
        let root = model();
        // The parent: the root with 20 % of every MLP matrix zeroed, as an earlier takedown.
        let parent = root
            .with_mlp_weights(
                &Scores::init(&root, 0.2, 9)
                    .unwrap()
                    .apply(&root.mlp_weights())
                    .unwrap(),
            )
            .unwrap();
        let scores = Scores::init(&root, 0.05, 1).unwrap();
        let already = mark_pruned(&scores, &parent.mlp_weights(), Some(0.05), 0).unwrap();
        assert!((0.19..=0.2).contains(&already), "{already}");
        let mut s = scores;
        s.ratio = already + 0.05;
        let first = s.apply(&root.mlp_weights()).unwrap();
        for ((a, b), ((p, q), (sa, sb))) in first
            .0
            .iter()
            .zip(parent.mlp_weights().0.iter().zip(&s.vars))
        {
            for (x, y, sc) in [(a, p, sa), (b, q, sb)] {
                let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                let sc: Vec<f32> = sc.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                for i in 0..x.len() {
                    if y[i] == 0.0 {
                        // Masked at the start, with a score that can move (gradient ≠ 0).
                        assert_eq!(x[i], 0.0, "the parent's zeros are masked first");
                        assert!(sc[i] != 0.0);
                    } else {
                        assert!(
                            x[i] == 0.0 || x[i] == y[i],
                            "unmasked entries are the root's"
                        );
                    }
                }
                let extra = x.iter().zip(&y).filter(|(a, b)| **a == 0.0 && **b != 0.0);
                assert!(extra.count() > 0, "the lineage ratio masks more on top");
            }
        }
        // A run with the root: candidates are the root's weights under a mask (an earlier zero
        // that comes back carries the root's value, never something else).
        let (forget, items) = extractable(&parent, &[vec![1, 2, 3, 4, 5, 6]], 8);
        let from_root = |root: &Model| {
            run(
                &parent,
                Some(root),
                &forget,
                &items,
                &retain(),
                &quick(),
                &JobControl::new(),
                &mut |_| Ok(Vec::new()),
            )
        };
        let out = from_root(&root).unwrap();
        assert_eq!(out.ending, Ending::Passed);
        let (w, r) = (out.model.mlp_weights(), root.mlp_weights());
        for ((a, b), (c, d)) in w.0.iter().zip(&r.0) {
            for (x, y) in [(a, c), (b, d)] {
                let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                assert!(x.iter().zip(&y).all(|(p, q)| *p == 0.0 || p == q));
            }
        }
        // A root of another shape is refused by name.
        let other = Model::random(
            &crate::test_util::relu_gpt2((14, 64, 32, 4), 2, true, false),
            &Device::Cpu,
        )
        .unwrap();
        let e = from_root(&other).err().unwrap().to_string();
        assert!(e.contains("root"), "{e}");
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (cfg, field) in [
            (
                ControllerConfig {
                    start_ratio: 0.0,
                    ..Default::default()
                },
                "start_ratio",
            ),
            (
                ControllerConfig {
                    max_ratio: 0.05,
                    ..Default::default()
                },
                "max_ratio",
            ),
            (
                ControllerConfig {
                    w: 1.0,
                    ..Default::default()
                },
                "w",
            ),
            (
                ControllerConfig {
                    forget_per_batch: 32,
                    ..Default::default()
                },
                "forget_per_batch",
            ),
            (
                ControllerConfig {
                    budget_seconds: f64::NAN,
                    ..Default::default()
                },
                "budget_seconds",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        assert!(ControllerConfig::default().validate().is_ok());
    }
}
