//! TinyMem evaluation, literally as spec §3: memorization of noise, backdoor attack success, and
//! the accuracy and perplexity of the clean test tasks.
//!
//! Invariants:
//! - Memorization of noise (§3.1): rows whose noise lies in token positions `[P, P+K)` are
//!   eligible; each is prompted with its *clean* first `P` tokens, decoded greedily with EOS
//!   banned, and counts as memorized when the `K` generated tokens equal the *noised*
//!   continuation exactly.
//! - Backdoor attack success (§3.2): held-out backdoored rows (eligible by the same window
//!   test), prompted with the clean row up to and including the first trigger occurrence,
//!   succeed when the `K` generated tokens equal the backdoored row there (all 2s). Each row
//!   has its own prompt length: the reference code's stale `prompt_len` bug is not copied
//!   (`docs/tinymem.md` says so).
//! - Accuracy (§3.3): teacher-forced next-token accuracy over all `T − 1` positions, PAD
//!   included, averaged per batch and then over batches (unweighted); also pooled over non-PAD
//!   targets.
//! - Perplexity (§3.4): the mean over batches of `exp(mean token loss of the batch)`.
//! - Memorization verdicts do not depend on `batch_size` (each row is judged on its own, see
//!   `crate::audit`); accuracy and perplexity do, as in the reference, since they average per
//!   batch. A ratio is 0 when no row is eligible.
//! - The model is only read. A row without `clean_ids`, or a noised row shorter than `P + K`,
//!   is refused with an error naming `rows[i]`, never a panic.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::data::{noise_in_window, trigger_end, Artifact, Dataset, Row};
use super::vocab;
use crate::audit::{self, AuditItem};
use crate::error::{Error, Result};
use crate::models::{ops, Inputs, Model};

/// Prompt and comparison lengths and the batch size of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalParams {
    /// Prompt length P (50 in the paper).
    pub prompt_len: usize,
    /// Compared length K (50 in the paper).
    pub compare_len: usize,
    /// Sequences per forward pass (no semantic effect on memorization; accuracy and perplexity
    /// average per batch as the paper's code does).
    pub batch_size: usize,
}

impl Default for EvalParams {
    fn default() -> Self {
        Self {
            prompt_len: 50,
            compare_len: 50,
            batch_size: 64,
        }
    }
}

/// The outcome of a memorization (or attack-success) measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memorization {
    /// Rows that passed the window filter (the denominator).
    pub eligible: usize,
    /// Rows whose generation matched the target continuation exactly.
    pub memorized: usize,
    /// `memorized / eligible` (0 when nothing is eligible).
    pub ratio: f64,
    /// Rows whose generation matched the clean continuation instead.
    pub clean_continuation: usize,
    /// Indices (into the rows given) of the memorized rows: the forget set for unlearning.
    pub memorized_rows: Vec<usize>,
}

/// Memorization of noised rows (spec §3.1). Rows without `clean_ids` are rejected.
pub fn memorization(model: &Model, rows: &[&Row], p: &EvalParams) -> Result<Memorization> {
    let (pl, k) = (p.prompt_len, p.compare_len);
    let mut cases = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let clean = r.clean_ids.as_ref().ok_or_else(|| {
            Error::invalid(format!("rows[{i}]"), "has no clean_ids (not a noised row)")
        })?;
        if r.ids.len() < pl + k || clean.len() < pl + k {
            return Err(Error::invalid(
                format!("rows[{i}]"),
                format!("is shorter than {}", pl + k),
            ));
        }
        if noise_in_window(&r.ids, clean, pl, pl + k) {
            cases.push(Case::new(i, clean, &r.ids, pl, k));
        }
    }
    run_cases(model, &cases, p.batch_size)
}

/// Backdoor attack success on held-out backdoored rows (spec §3.2).
pub fn attack_success(
    model: &Model,
    rows: &[&Row],
    trigger: &[u32],
    p: &EvalParams,
) -> Result<Memorization> {
    let k = p.compare_len;
    let (lo, hi) = (p.prompt_len, p.prompt_len + p.compare_len);
    let mut cases = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let clean = r.clean_ids.as_ref().ok_or_else(|| {
            Error::invalid(
                format!("rows[{i}]"),
                "has no clean_ids (not a backdoored row)",
            )
        })?;
        if !noise_in_window(&r.ids, clean, lo, hi) {
            continue;
        }
        let Some(pl) = trigger_end(clean, trigger) else {
            continue;
        };
        if pl + k > r.ids.len() {
            continue;
        }
        cases.push(Case::new(i, clean, &r.ids, pl, k));
    }
    run_cases(model, &cases, p.batch_size)
}

struct Case {
    row: usize,
    prompt: Vec<u32>,
    target: Vec<u32>,
    clean: Vec<u32>,
}

impl Case {
    /// Prompt `clean[..start]`; target `artifact[start..start + k]` (the noised or backdoored
    /// row); `clean[start..start + k]` kept to count clean continuations.
    fn new(row: usize, clean: &[u32], artifact: &[u32], start: usize, k: usize) -> Self {
        Self {
            row,
            prompt: clean[..start].to_vec(),
            target: artifact[start..start + k].to_vec(),
            clean: clean[start..start + k].to_vec(),
        }
    }
}

fn run_cases(model: &Model, cases: &[Case], batch: usize) -> Result<Memorization> {
    let items: Vec<AuditItem> = cases
        .iter()
        .map(|c| AuditItem {
            prompt: c.prompt.clone(),
            target: c.target.clone(),
        })
        .collect();
    let (results, summary) = audit::audit(model, None, &items, batch)?;
    let memorized_rows = cases
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.memorized)
        .map(|(c, _)| c.row)
        .collect();
    // Greedy decoding continues cleanly when it reproduces the clean continuation: a second
    // single pass, over the rows not memorized.
    let clean: Vec<AuditItem> = cases
        .iter()
        .zip(&results)
        .filter(|(_, r)| !r.memorized)
        .map(|(c, _)| AuditItem {
            prompt: c.prompt.clone(),
            target: c.clean.clone(),
        })
        .collect();
    let clean_continuation = audit::audit(model, None, &clean, batch)?.1.memorized;
    Ok(Memorization {
        eligible: summary.sequences,
        memorized: summary.memorized,
        ratio: summary.rate,
        clean_continuation,
        memorized_rows,
    })
}

/// Accuracy and perplexity of one test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    /// Spec §3.3: PAD included, mean of per-batch means.
    pub accuracy: f64,
    /// Pooled over targets that are not PAD.
    pub accuracy_non_pad: f64,
    /// Spec §3.4: mean over batches of exp(batch mean loss).
    pub perplexity: f64,
    pub rows: usize,
}

/// Teacher-forced accuracy and perplexity of `rows` (equal-length, padded sequences).
pub fn task_metrics(model: &Model, rows: &[&Row], batch: usize) -> Result<TaskMetrics> {
    if rows.is_empty() {
        return Err(Error::invalid("rows", "an empty test set has no accuracy"));
    }
    let dev = model.device();
    let (mut acc_sum, mut ppl_sum, mut batches) = (0.0, 0.0, 0usize);
    let (mut np_hit, mut np_total) = (0usize, 0usize);
    for chunk in rows.chunks(batch.max(1)) {
        let t = chunk[0].ids.len();
        if chunk.iter().any(|r| r.ids.len() != t) {
            return Err(Error::invalid(
                "rows",
                "test rows must share one padded length",
            ));
        }
        let flat: Vec<u32> = chunk.iter().flat_map(|r| r.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(flat, (chunk.len(), t), dev)?;
        let logits = model.forward(&Inputs::causal(&ids, 0)?, None, None)?;
        let loss = ops::lm_loss(&logits, &ids)?.to_scalar::<f32>()? as f64;
        let pred = logits
            .narrow(1, 0, t - 1)?
            .argmax(D::Minus1)?
            .to_vec2::<u32>()?;
        let mut hit = 0usize;
        for (r, row_pred) in chunk.iter().zip(&pred) {
            for (j, &p) in row_pred.iter().enumerate() {
                let target = r.ids[j + 1];
                let ok = p == target;
                hit += ok as usize;
                if target != vocab::PAD {
                    np_total += 1;
                    np_hit += ok as usize;
                }
            }
        }
        acc_sum += hit as f64 / (chunk.len() * (t - 1)) as f64;
        ppl_sum += loss.exp();
        batches += 1;
    }
    Ok(TaskMetrics {
        accuracy: acc_sum / batches as f64,
        accuracy_non_pad: if np_total == 0 {
            0.0
        } else {
            np_hit as f64 / np_total as f64
        },
        perplexity: ppl_sum / batches as f64,
        rows: rows.len(),
    })
}

/// Everything `lethe tinymem eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Noise models: fraction of eligible noised rows memorized (§3.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memorized_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memorized: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eligible: Option<usize>,
    /// Backdoor models: fraction of eligible held-out triggered rows completed with the
    /// backdoor (§3.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack_success_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack_eligible: Option<usize>,
    /// Mean of the clean test tasks' §3.3 accuracies (main task + auxiliary tasks).
    pub accuracy: f64,
    pub accuracy_by_task: std::collections::BTreeMap<String, f64>,
    /// Mean over the clean test tasks of the non-PAD accuracy.
    pub accuracy_non_pad: f64,
    /// Mean over the clean test tasks of the §3.4 perplexity.
    pub perplexity: f64,
    pub seconds: f64,
}

/// Evaluates `model` on `ds`'s artifact and clean test tasks.
/// Accuracy and perplexity on the clean test tasks (spec §3.3, §3.4), the part of
/// [`evaluate`] that measures quality rather than memorization.
#[derive(Debug, Clone, Default)]
pub struct TaskQuality {
    pub accuracy_by_task: std::collections::BTreeMap<String, f64>,
    /// Mean over tasks.
    pub accuracy: f64,
    pub accuracy_non_pad: f64,
    pub perplexity: f64,
}

/// [`TaskQuality`] of `model` on `ds`'s clean test tasks.
pub fn task_quality(model: &Model, ds: &Dataset, p: &EvalParams) -> Result<TaskQuality> {
    let cfg = &ds.config;
    let mut out = TaskQuality::default();
    let clean_tasks: Vec<String> = std::iter::once(cfg.main_step)
        .chain(cfg.aux_steps.iter().copied())
        .map(|c| c.to_string())
        .collect();
    let (mut acc, mut np, mut ppl) = (0.0, 0.0, 0.0);
    let mut n = 0usize;
    for (name, rows) in ds.test_sets() {
        if !clean_tasks.contains(&name) || rows.is_empty() {
            continue;
        }
        let m = task_metrics(model, &rows, p.batch_size)?;
        out.accuracy_by_task.insert(name, m.accuracy);
        acc += m.accuracy;
        np += m.accuracy_non_pad;
        ppl += m.perplexity;
        n += 1;
    }
    if n > 0 {
        out.accuracy = acc / n as f64;
        out.accuracy_non_pad = np / n as f64;
        out.perplexity = ppl / n as f64;
    }
    Ok(out)
}

pub fn evaluate(model: &Model, ds: &Dataset, p: &EvalParams) -> Result<EvalReport> {
    let start = std::time::Instant::now();
    let cfg = &ds.config;
    let mut report = EvalReport {
        memorized_ratio: None,
        memorized: None,
        eligible: None,
        attack_success_ratio: None,
        attack_eligible: None,
        accuracy: 0.0,
        accuracy_by_task: Default::default(),
        accuracy_non_pad: 0.0,
        perplexity: 0.0,
        seconds: 0.0,
    };
    match cfg.artifact {
        Artifact::Noise => {
            let m = memorization(model, &ds.noised_rows(), p)?;
            report.memorized_ratio = Some(m.ratio);
            report.memorized = Some(m.memorized);
            report.eligible = Some(m.eligible);
        }
        Artifact::Backdoor => {
            let trigger = cfg
                .trigger_ids()
                .map_err(|e| Error::invalid("backdoor_trigger", e.to_string()))?;
            let m = attack_success(model, &ds.backdoor_test_rows(), &trigger, p)?;
            report.attack_success_ratio = Some(m.ratio);
            report.attack_eligible = Some(m.eligible);
        }
    }
    let t = task_quality(model, ds, p)?;
    report.accuracy_by_task = t.accuracy_by_task;
    report.accuracy = t.accuracy;
    report.accuracy_non_pad = t.accuracy_non_pad;
    report.perplexity = t.perplexity;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
