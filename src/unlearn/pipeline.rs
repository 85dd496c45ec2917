//! The unlearning pipeline that every takedown goes through, whoever starts it: the server's
//! worker, `lethe unlearn` and `lethe bench takedowns` call [`run`] with the same defaults.
//!
//! forget set → audit and quality before → the controller ([`controller`]: BalancedSubnet with
//! its ratio and forget focus chosen while it runs) → the gates, measured whenever nothing is
//! extractable any more → a gate-passing model and a report, or a rejection with the report.
//!
//! Invariants:
//! - [`run`] never mutates the input model and never touches the disk: writing the model (a
//!   version directory, or `lethe unlearn --out`) is the caller's.
//! - A [`Decision`] that `passed` holds a model on which none of the request's sequences (nor,
//!   on a lineage re-masked from its root, any earlier takedown's) is extractable, and whose
//!   held-out perplexity (and, where they apply, TinyMem test accuracy and canary perplexity)
//!   is within the [`Gates`] budgets against both its parent (the model the job started from)
//!   and the lineage's root (the base model before any takedown), so drifts within budget per
//!   takedown cannot add up unseen over many takedowns.
//! - NaN (a diverged model) fails every gate ([`gate_failures`]).
//! - A rejection comes with the full report too: the configuration, every check, the
//!   before/after/root numbers and a verdict per sequence.
//! - [`read_sequences`] refuses a bad line with an error naming the file and line.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::controller::{self, Check, Controlled, ControllerConfig, Ending};
use super::method::{MethodData, MethodSpec};
use super::neurons::NeuronConfig;
use super::quality::{mean_accuracy, quality, Quality};
use super::JobControl;
use crate::audit::{self, AuditItem, AuditResult, RiskOptions};
use crate::error::Result;
use crate::models::Model;
use crate::tinymem::data::{Dataset, Role, Split};
use crate::tinymem::lang::LangCard;
use crate::tinymem::train::Card;
use crate::tokenizer::Tokenizer;

/// The data the pipeline trains and validates with.
pub struct Datasets {
    /// Rows to keep working (the retain set).
    pub retain: Vec<Vec<u32>>,
    /// Held-out rows for the perplexity gate (ignored for TinyMem, which uses its test tasks).
    pub heldout: Vec<Vec<u32>>,
    /// Optional canaries whose perplexity must not move beyond budget.
    pub canary: Vec<Vec<u32>>,
    /// The TinyMem dataset, when the model has a TinyMem card.
    pub tinymem: Option<Dataset>,
}

impl Datasets {
    /// The data for the model in `dir`, whose context is `context` tokens. TinyMem defaults
    /// from the model's card: retain = the clean training rows, held-out = the test tasks. The
    /// language TinyMem's card ([`LangCard`]): retain = its clean train chunks, held-out = its
    /// test chunks. Other models need `retain` from a file.
    ///
    /// Every row longer than the context is cut into consecutive windows of it. The held-out
    /// rows are never rows the step trains on: given ones that equal a retain row are refused
    /// (an error naming how many), and without them one retain row in ten (at most 256, at
    /// least 1) is set aside as the held-out set and taken out of the retain set. A non-empty
    /// retain set of one row with no held-out rows is refused: the perplexity gate would have
    /// nothing to measure.
    pub fn for_model(
        dir: &Path,
        retain: Option<Vec<Vec<u32>>>,
        heldout: Option<Vec<Vec<u32>>>,
        canary: Vec<Vec<u32>>,
        context: usize,
    ) -> Result<Self> {
        let tinymem = Card::read_if_present(dir)?
            .map(|c| c.dataset())
            .transpose()?;
        // The language TinyMem's card carries its rows: the clean train chunks to retain and
        // the held-out test chunks, which nothing trains on.
        let language = LangCard::read_if_present(dir)?
            .map(|c| c.dataset(dir))
            .transpose()?;
        let heldout = heldout.or_else(|| language.as_ref().map(|ds| ds.heldout()));
        let retain = match (retain, &tinymem, &language) {
            (Some(r), _, _) => r,
            (None, Some(ds), _) => ds
                .rows
                .iter()
                .filter(|r| r.split == Split::Train && r.role == Role::Clean)
                .map(|r| r.ids.clone())
                .collect(),
            (None, None, Some(ds)) => ds.retain(),
            (None, None, None) => Vec::new(),
        };
        let retain = windowed(retain, context);
        let (retain, heldout) = match heldout.map(|h| windowed(h, context)) {
            Some(h) => {
                let trained: std::collections::HashSet<&[u32]> =
                    retain.iter().map(Vec::as_slice).collect();
                let shared = h.iter().filter(|r| trained.contains(r.as_slice())).count();
                if shared > 0 {
                    return Err(crate::Error::invalid(
                        "held-out data",
                        format!(
                            "{shared} of its {} rows are also retain rows; the perplexity gate \
                             must be measured on rows unlearning never trains on",
                            h.len()
                        ),
                    ));
                }
                (retain, h)
            }
            // TinyMem's gates measure its test tasks (`quality`), never these rows.
            None if tinymem.is_some() => (retain, Vec::new()),
            None => set_aside_heldout(retain)?,
        };
        Ok(Self {
            retain,
            heldout,
            canary: windowed(canary, context),
            tinymem,
        })
    }
}

/// Token sequences, one per row.
type Rows = Vec<Vec<u32>>;

/// `rows` with every row longer than `context` tokens cut into consecutive windows of it (a
/// last window under 2 tokens, which predicts nothing, is dropped).
fn windowed(rows: Vec<Vec<u32>>, context: usize) -> Vec<Vec<u32>> {
    if context < 2 || rows.iter().all(|r| r.len() <= context) {
        return rows;
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if r.len() <= context {
            out.push(r);
        } else {
            out.extend(
                r.chunks(context)
                    .filter(|w| w.len() >= 2)
                    .map(<[u32]>::to_vec),
            );
        }
    }
    out
}

/// Splits a held-out set off `retain`: every `stride`-th row, one in ten (at most 256, at
/// least 1), spread over the file rather than its end; the retain set keeps no row equal to
/// one of them. `(retain, held-out)`; empty stays empty; one row is refused.
fn set_aside_heldout(retain: Rows) -> Result<(Rows, Rows)> {
    match retain.len() {
        0 => return Ok((retain, Vec::new())),
        1 => {
            return Err(crate::Error::invalid(
                "retain data",
                "has one row: give at least 2 (one in ten is held out for the perplexity gate) \
                 or a separate held-out file",
            ))
        }
        _ => {}
    }
    let count = (retain.len() / 10).clamp(1, 256);
    let stride = retain.len() / count;
    let (mut keep, mut heldout) = (Vec::new(), Vec::new());
    for (i, r) in retain.into_iter().enumerate() {
        if i % stride == stride - 1 && heldout.len() < count {
            heldout.push(r);
        } else {
            keep.push(r);
        }
    }
    let held: std::collections::HashSet<&[u32]> = heldout.iter().map(Vec::as_slice).collect();
    keep.retain(|r| !held.contains(r.as_slice()));
    Ok((keep, heldout))
}

/// Reads a JSONL file of `{"text"}`, `{"ids"}` or `{"prompt_ids", "target_ids"}` rows (a TinyMem
/// data header line is skipped) into token sequences: the one reader of retain, held-out and
/// canary files for the server and `lethe unlearn`. Errors name the file and line.
pub fn read_sequences(path: &Path, tk: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| crate::Error::invalid(at(), e.to_string()))?;
        if v.get("format").is_some() {
            continue;
        }
        let ids = if let Some(ids) = v.get("ids") {
            serde_json::from_value::<Vec<u32>>(ids.clone())
                .map_err(|e| crate::Error::invalid(at(), format!("ids: {e}")))?
        } else if let (Some(p), Some(t)) = (v.get("prompt_ids"), v.get("target_ids")) {
            // An audit row: the whole sequence is its prompt and target.
            let part = |x: &Value, name: &str| {
                serde_json::from_value::<Vec<u32>>(x.clone())
                    .map_err(|e| crate::Error::invalid(at(), format!("{name}: {e}")))
            };
            let mut ids = part(p, "prompt_ids")?;
            ids.extend(part(t, "target_ids")?);
            ids
        } else if let Some(t) = v.get("text").and_then(Value::as_str) {
            tk.encode(t)?
        } else {
            return Err(crate::Error::invalid(
                at(),
                "expected {\"text\"}, {\"ids\"} or {\"prompt_ids\", \"target_ids\"}",
            ));
        };
        if ids.len() >= 2 {
            out.push(ids);
        }
    }
    Ok(out)
}

/// The gates' budgets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// Largest allowed relative perplexity increase on held-out data (0.02 = +2 %).
    pub perplexity_budget: f64,
    /// TinyMem: largest allowed drop of mean relative test accuracy (0.005 = 0.5 %).
    pub accuracy_budget: f64,
    /// Largest allowed relative perplexity change of the canary set.
    pub canary_budget: f64,
    /// Extraction risk that must be gone too: a sequence (n, p)-discoverable by sampling or
    /// extracted from a perturbed prompt counts as extractable (`None`: greedy only).
    #[serde(default)]
    pub risk: Option<RiskOptions>,
    /// Audit the candidate again with its matrices rounded to int8 (`Model::fake_quantized`);
    /// a sequence extractable there counts as extractable. Int4 is audited and reported too,
    /// not gated.
    #[serde(default)]
    pub quantized: bool,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            perplexity_budget: 0.02,
            accuracy_budget: 0.005,
            canary_budget: 0.02,
            risk: None,
            quantized: false,
        }
    }
}

/// One sequence's audit in a report: the audit (with its risk when the gates measure it) and,
/// with the quantized gate, whether int8- and int4-rounded weights still regurgitate it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SequenceAudit {
    #[serde(flatten)]
    pub audit: AuditResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int8_memorized: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int4_memorized: Option<bool>,
}

impl SequenceAudit {
    /// Extractable by what the gates measure: greedy, the risk measures, int8 rounding.
    pub fn extractable(&self) -> bool {
        self.audit.extractable() || self.int8_memorized == Some(true)
    }
}

/// Everything the pipeline is configured with.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PipelineConfig {
    pub controller: ControllerConfig,
    pub gates: Gates,
    /// The method a takedown runs once instead of the controller (`lethe serve
    /// --unlearn-method`); `None`: the controller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodSpec>,
}

/// One sequence to forget, parsed under its definition.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Where it came from: a takedown id, or a file.
    pub takedown: String,
    /// Its index there.
    pub index: usize,
    pub sha256: String,
    /// The whole sequence (what unlearning trains on).
    #[serde(skip)]
    pub sequence: Vec<u32>,
    /// Its audit under the definition (prompt, target).
    #[serde(skip)]
    pub item: AuditItem,
}

impl Target {
    pub fn new(
        takedown: impl Into<String>,
        index: usize,
        sequence: Vec<u32>,
        item: AuditItem,
    ) -> Self {
        Self {
            takedown: takedown.into(),
            index,
            sha256: sequence_sha256(&sequence),
            sequence,
            item,
        }
    }
}

/// sha256 of a token sequence (little-endian u32s), hex.
pub fn sequence_sha256(seq: &[u32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in seq {
        h.update(t.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A model's numbers on the targets and the held-out data.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Greedily extractable.
    pub memorized: Vec<bool>,
    /// Extractable by anything the gates measure ([`SequenceAudit::extractable`]).
    pub extractable: Vec<bool>,
    pub matched_prefix: Vec<usize>,
    pub accuracy: Option<f64>,
    /// Held-out perplexity and per-task accuracies (serialized flat: `perplexity`, ...).
    #[serde(flatten)]
    pub quality: Quality,
    pub canary_perplexity: Option<f64>,
}

/// The quality a lineage started from, carried in every version's report as `root`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    #[serde(flatten)]
    pub quality: Quality,
    pub canary_perplexity: Option<f64>,
}

impl Baseline {
    /// The parent's numbers as a baseline.
    pub fn of(e: &Evaluation) -> Self {
        Self {
            quality: e.quality.clone(),
            canary_perplexity: e.canary_perplexity,
        }
    }

    /// The `root` recorded in a version's report, if it has one.
    pub fn from_report(report: &Value) -> Option<Self> {
        serde_json::from_value(report.get("root")?.clone()).ok()
    }
}

/// The held-out quality and canary perplexity of `model`: what the gates compare. A pure
/// function of the weights, so callers may cache it per version.
pub fn measure(model: &Model, data: &Datasets) -> Result<Baseline> {
    let quality = quality(model, data.tinymem.as_ref(), &data.heldout)?;
    let canary_perplexity = if data.canary.is_empty() {
        None
    } else {
        let s = crate::engine::score(model, &data.canary, 32)?;
        Some(s.iter().map(|x| x.perplexity).sum::<f64>() / s.len() as f64)
    };
    Ok(Baseline {
        quality,
        canary_perplexity,
    })
}

/// Audits `targets` on `model` as the gates ask (with extraction risk, and int8/int4 rounding,
/// when they measure them) and measures its held-out quality and canaries (or takes them from
/// `known`, measured earlier on the same weights).
pub fn evaluate(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    targets: &[Target],
    data: &Datasets,
    known: Option<&Baseline>,
    gates: &Gates,
) -> Result<(Evaluation, Vec<SequenceAudit>)> {
    let items: Vec<AuditItem> = targets.iter().map(|t| t.item.clone()).collect();
    let opts = audit::AuditOptions {
        risk: gates.risk.clone(),
        ..audit::AuditOptions::greedy(64)
    };
    let (audits, _) = audit::audit_with(model, tokenizer, &items, &opts)?;
    let quantized = |bits| -> Result<Option<Vec<AuditResult>>> {
        if !gates.quantized {
            return Ok(None);
        }
        let q = model.fake_quantized(bits)?;
        Ok(Some(audit::audit(&q, None, &items, 64)?.0))
    };
    let (int8, int4) = (quantized(8)?, quantized(4)?);
    let results: Vec<SequenceAudit> = audits
        .into_iter()
        .enumerate()
        .map(|(i, audit)| SequenceAudit {
            audit,
            int8_memorized: int8.as_ref().map(|r| r[i].memorized),
            int4_memorized: int4.as_ref().map(|r| r[i].memorized),
        })
        .collect();
    let b = match known {
        Some(b) => b.clone(),
        None => measure(model, data)?,
    };
    Ok((
        Evaluation {
            memorized: results.iter().map(|r| r.audit.memorized).collect(),
            extractable: results.iter().map(SequenceAudit::extractable).collect(),
            matched_prefix: results.iter().map(|r| r.audit.matched_prefix).collect(),
            accuracy: mean_accuracy(&b.quality),
            quality: b.quality,
            canary_perplexity: b.canary_perplexity,
        },
        results,
    ))
}

/// The gates: the reasons `after` fails against its parent `before` and the lineage's `root`
/// (empty = it passes). NaN (a diverged model) fails every gate.
pub fn gate_failures(
    g: &Gates,
    before: &Evaluation,
    root: &Baseline,
    after: &Evaluation,
) -> Vec<String> {
    let mut why = Vec::new();
    let still = after.extractable.iter().filter(|m| **m).count();
    if still > 0 {
        why.push(format!(
            "{still} of {} sequences are still extractable",
            after.extractable.len()
        ));
    }
    let parent = Baseline::of(before);
    let root_is_parent = *root == parent;
    for (base, from) in [(&parent, ""), (root, " from the root")] {
        if from.is_empty() || !root_is_parent {
            why.extend(drift_failures(g, base, after, from));
        }
    }
    why
}

fn drift_failures(g: &Gates, base: &Baseline, after: &Evaluation, from: &str) -> Vec<String> {
    let mut why = Vec::new();
    let drift = after.quality.perplexity / base.quality.perplexity - 1.0;
    if drift.is_nan() || drift > g.perplexity_budget {
        why.push(format!(
            "perplexity drift{from} {:+.3}% is over the budget of {:+.3}%",
            drift * 100.0,
            g.perplexity_budget * 100.0
        ));
    }
    if let Some(rel) = base.quality.relative_accuracy_change(&after.quality) {
        if rel.is_nan() || rel < -g.accuracy_budget {
            why.push(format!(
                "mean relative accuracy change{from} {:+.3}% is below −{:.3}%",
                rel * 100.0,
                g.accuracy_budget * 100.0
            ));
        }
    }
    if let (Some(b), Some(a)) = (base.canary_perplexity, after.canary_perplexity) {
        let d = (a / b - 1.0).abs();
        if d.is_nan() || d > g.canary_budget {
            why.push(format!(
                "canary perplexity moved {:.3}%{from}, over the budget of {:.3}%",
                d * 100.0,
                g.canary_budget * 100.0
            ));
        }
    }
    why
}

/// What is already known about the model a job starts from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lineage<'a> {
    /// The starting model's own quality, measured earlier on the same weights (`None`: measure
    /// it now).
    pub parent: Option<&'a Baseline>,
    /// The lineage root's quality (`None`: the starting model is the root).
    pub root: Option<&'a Baseline>,
    /// The lineage root's weights (the unedited model the starting model is a masked copy
    /// of): when given, the controller's mask is over them and may give back what earlier
    /// takedowns pruned (see [`controller::run`]). `None`: the mask is over the starting
    /// model's weights, its zeros kept for good.
    pub root_model: Option<&'a Model>,
    /// The sequences earlier takedowns on the lineage removed. With `root_model` they join
    /// the forget set (trained on while extractable, audited at every check), so a mask that
    /// gives back pruned weights never brings one of them back.
    pub earlier: &'a [Target],
}

/// What the pipeline decided.
pub struct Decision {
    /// Whether `model` passed the gates.
    pub passed: bool,
    /// The gate-passing model, or (rejected) the model the run ended with.
    pub model: Model,
    /// The quality of `model` as the last gate measurement found it (for a cache keyed by the
    /// version it becomes); `None` when no gate measurement ran.
    pub quality: Option<Baseline>,
    /// Why it was rejected (the last gate failures, or what ended the run).
    pub rejection: Option<String>,
    /// The full report: configuration, every check, before/after/root, per-sequence verdicts.
    pub report: Value,
    /// Nothing was extractable from the starting model: `model` is it, unmasked, and no gate
    /// ran (there was nothing to unlearn).
    pub unchanged: bool,
}

/// Runs the pipeline on `model` (never mutated), with what `lineage` already knows about it.
/// `on_phase` hears "auditing", "unlearning" and "validating" as the run
/// moves between them.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    targets: &[Target],
    data: &Datasets,
    lineage: Lineage,
    cfg: &PipelineConfig,
    ctl: &JobControl,
    on_phase: &dyn Fn(&str),
) -> Result<Decision> {
    on_phase("auditing");
    let t0 = std::time::Instant::now();
    let (before, before_results) =
        evaluate(model, tokenizer, targets, data, lineage.parent, &cfg.gates)?;
    let before_seconds = t0.elapsed().as_secs_f64();
    if !before.extractable.iter().any(|&m| m) {
        // No sequence of the request is extractable: masking would change the weights for
        // nothing, so the starting model stays (the caller keeps the sequences guarded).
        let sequences: Vec<Value> = targets
            .iter()
            .zip(&before_results)
            .map(|(t, b)| {
                json!({
                    "takedown": t.takedown, "index": t.index, "sha256": t.sha256,
                    "before": b,
                    "after": Value::Null,
                })
            })
            .collect();
        return Ok(Decision {
            passed: true,
            model: model.clone(),
            quality: None,
            rejection: None,
            report: json!({
                "config": cfg,
                "ending": "nothing_extractable",
                "steps": 0,
                "before_seconds": before_seconds,
                "before": before,
                "sequences": sequences,
            }),
            unchanged: true,
        });
    }
    let mut gate_seconds = Vec::new();
    let root = lineage
        .root
        .cloned()
        .unwrap_or_else(|| Baseline::of(&before));
    // This request's sequences, then (on a lineage re-masked from its root) the earlier
    // takedowns' ones that are not among them.
    let mut all: Vec<&Target> = targets.iter().collect();
    if lineage.root_model.is_some() {
        for e in lineage.earlier {
            if !all.iter().any(|t| t.item == e.item) {
                all.push(e);
            }
        }
    }
    let forget: Vec<Vec<u32>> = all.iter().map(|t| t.sequence.clone()).collect();
    let items: Vec<AuditItem> = all.iter().map(|t| t.item.clone()).collect();
    // The last gate measurement: (evaluation, per-sequence audits, failures).
    let mut last: Option<(Evaluation, Vec<SequenceAudit>, Vec<String>)> = None;
    let mut gates = |candidate: &Model| -> Result<Vec<String>> {
        on_phase("validating");
        let t = std::time::Instant::now();
        let (after, results) = evaluate(candidate, tokenizer, targets, data, None, &cfg.gates)?;
        gate_seconds.push(t.elapsed().as_secs_f64());
        let failed = gate_failures(&cfg.gates, &before, &root, &after);
        last = Some((after, results, failed.clone()));
        on_phase("unlearning");
        Ok(failed)
    };
    on_phase("unlearning");
    // The controller's checks count as extractable what the gates will.
    let controller_cfg = ControllerConfig {
        risk: cfg.gates.risk.clone(),
        quantized: cfg.gates.quantized,
        ..cfg.controller.clone()
    };
    let out = match &cfg.method {
        None => controller::run(
            model,
            lineage.root_model,
            &forget,
            &items,
            &data.retain,
            &controller_cfg,
            ctl,
            &mut gates,
        )?,
        Some(spec) => {
            let mut out = one_shot(model, spec, &forget, &items, &data.retain, ctl, &mut gates)?;
            if let (Some(check), Some((after, _, _))) = (out.checks.last_mut(), &last) {
                check.extractable = after.extractable.iter().filter(|&&m| m).count();
            }
            out
        }
    };
    let passed = out.ending == Ending::Passed;
    let rejection = match (passed, &last) {
        (true, _) => None,
        (false, Some((_, _, failed))) if out.ending == Ending::GatesFailed => Some(format!(
            "{} ({} candidate after {} steps, {:.0} s)",
            failed.join("; "),
            cfg.method.as_ref().map_or("the method's", MethodSpec::name),
            out.steps,
            out.seconds
        )),
        (false, Some((_, _, failed))) => Some(format!(
            "{} ({} after {} steps, {:.0} s; the last candidate with nothing extractable failed the gates)",
            failed.join("; "),
            ending_text(out.ending),
            out.steps,
            out.seconds
        )),
        (false, None) => {
            // Counted over the controller's forget set: this request's sequences plus, on a
            // lineage, the earlier takedowns' ones.
            let left = out.checks.last().map_or(all.len(), |c| c.extractable);
            Some(format!(
                "{left} of {} sequences are still extractable ({} after {} steps, {:.0} s, mask ratio {:.3})",
                all.len(),
                ending_text(out.ending),
                out.steps,
                out.seconds,
                out.ratio
            ))
        }
    };
    let after = last.as_ref();
    let report = json!({
        "config": cfg,
        "ending": out.ending,
        "steps": out.steps,
        "unlearn_seconds": out.seconds,
        "before_seconds": before_seconds,
        "gate_seconds": gate_seconds,
        "ratio": out.ratio,
        "total_ratio": out.total_ratio,
        "weights_zeroed": out.zeros_per_matrix.iter().map(|(a, b)| a + b).sum::<usize>(),
        "checks": out.checks,
        "before": before,
        "after": after.map(|(e, _, _)| e),
        "root": root,
        "lineage": {
            "masked_from_root": lineage.root_model.is_some(),
            "earlier_sequences": all.len() - targets.len(),
        },
        "gates_failed": after.map(|(_, _, f)| f),
        "sequences": targets.iter().enumerate().map(|(i, t)| {
            let b = &before_results[i];
            let a = after.map(|(_, r, _)| &r[i]);
            json!({
                "takedown": t.takedown, "index": t.index, "sha256": t.sha256,
                "before": b,
                "after": a,
            })
        }).collect::<Vec<_>>(),
    });
    let quality = last.as_ref().map(|(e, _, _)| Baseline::of(e));
    Ok(Decision {
        passed,
        model: out.model,
        quality,
        rejection,
        report,
        unchanged: false,
    })
}

/// Runs `spec` once on `model` (the takedown's sequences as its forget set; Activations
/// averages after the shortest prompt of `items`) and measures the gates on its model: the
/// run as the controller would report it, with one check.
fn one_shot(
    model: &Model,
    spec: &MethodSpec,
    forget: &[Vec<u32>],
    items: &[AuditItem],
    retain: &[Vec<u32>],
    ctl: &JobControl,
    gates: &mut dyn FnMut(&Model) -> Result<Vec<String>>,
) -> Result<Controlled> {
    let spec = match spec {
        MethodSpec::Neuron { neuron, config } => MethodSpec::Neuron {
            neuron: *neuron,
            config: NeuronConfig {
                prompt_len: items
                    .iter()
                    .map(|i| i.prompt.len())
                    .min()
                    .unwrap_or(1)
                    .max(1),
                ..config.clone()
            },
        },
        other => other.clone(),
    };
    let data = MethodData {
        forget,
        retain,
        items,
        dir: None,
    };
    let r = spec.run(model, &data, None, ctl)?;
    let failed = gates(&r.outcome.model)?;
    let o = r.outcome;
    let mlp: (usize, usize) = o.mlp.0.iter().fold((0, 0), |(z, n), (a, b)| {
        let zeros = |t: &candle_core::Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_or(0, |v| v.iter().filter(|&&x| x == 0.0).count())
        };
        (z + zeros(a) + zeros(b), n + a.elem_count() + b.elem_count())
    });
    Ok(Controlled {
        model: o.model,
        ending: if failed.is_empty() {
            Ending::Passed
        } else {
            Ending::GatesFailed
        },
        checks: vec![Check {
            step: o.steps,
            seconds: o.seconds,
            ratio: spec.ratio(),
            extractable: 0,
            gates_failed: Some(failed),
        }],
        steps: o.steps,
        seconds: o.seconds,
        ratio: spec.ratio(),
        total_ratio: mlp.0 as f64 / mlp.1.max(1) as f64,
        zeros_per_matrix: o.zeros_per_matrix,
    })
}

fn ending_text(e: Ending) -> &'static str {
    match e {
        Ending::Passed => "gates passed",
        Ending::Budget => "the time budget ran out",
        Ending::Steps => "the step budget ran out",
        Ending::GatesFailed => "the method's candidate failed the gates",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held-out rows are never retain rows: given ones that are refused, and the default set
    /// aside (one in ten, spread over the file) and taken out of the retain set, duplicates
    /// included; rows longer than the context are cut into windows of it.
    #[test]
    fn held_out_rows_are_never_trained_on_and_rows_fit_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<Vec<u32>> = (0..40u32).map(|i| vec![i, i + 1, i + 2]).collect();
        let d = Datasets::for_model(dir.path(), Some(rows.clone()), None, Vec::new(), 8).unwrap();
        assert_eq!(d.heldout.len(), 4);
        assert_eq!(d.retain.len(), 36);
        assert_eq!(d.heldout[0], rows[9], "every tenth row, not the first ones");
        assert!(d.heldout.iter().all(|h| !d.retain.contains(h)));
        // A retain row duplicated elsewhere in the file leaves with its held-out twin.
        let mut dup = rows.clone();
        dup[0] = rows[9].clone();
        let d = Datasets::for_model(dir.path(), Some(dup), None, Vec::new(), 8).unwrap();
        assert_eq!(d.retain.len(), 35);
        assert!(d.heldout.iter().all(|h| !d.retain.contains(h)));
        // Given held-out rows that are also retain rows are refused, naming how many.
        let err = Datasets::for_model(
            dir.path(),
            Some(rows.clone()),
            Some(vec![rows[3].clone(), vec![99, 98]]),
            Vec::new(),
            8,
        )
        .err()
        .expect("overlap refused")
        .to_string();
        assert!(
            err.contains("1 of its 2 rows are also retain rows"),
            "{err}"
        );
        // A TinyMem card that cannot be read is an error naming it, not "no card".
        let bad = tempfile::tempdir().unwrap();
        let card = bad.path().join(crate::tinymem::train::CARD_FILE);
        std::fs::write(&card, "{not json").unwrap();
        let err = Datasets::for_model(bad.path(), Some(rows.clone()), None, Vec::new(), 8)
            .err()
            .expect("a corrupt card is refused")
            .to_string();
        assert!(err.contains(crate::tinymem::train::CARD_FILE), "{err}");
        // One retain row and no held-out file: nothing to gate on.
        assert!(
            Datasets::for_model(dir.path(), Some(vec![vec![1, 2]]), None, Vec::new(), 8).is_err()
        );
        // No retain data at all (a server that refuses takedowns) is not an error.
        let d = Datasets::for_model(dir.path(), None, None, Vec::new(), 8).unwrap();
        assert!(d.retain.is_empty() && d.heldout.is_empty());
        // Windows: 20 tokens with a context of 8 -> 8, 8, 4; a 1-token tail is dropped.
        let long: Vec<u32> = (0..20).collect();
        let d = Datasets::for_model(
            dir.path(),
            Some(vec![long.clone(), (0..17).collect()]),
            Some(vec![(100..109).collect()]),
            vec![long],
            8,
        )
        .unwrap();
        let lens = |rows: &[Vec<u32>]| rows.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(lens(&d.retain), [8, 8, 4, 8, 8]);
        assert_eq!(lens(&d.heldout), [8]);
        assert_eq!(lens(&d.canary), [8, 8, 4]);
    }

    #[test]
    fn a_sequence_extractable_only_by_a_risk_measure_fails_the_gate() {
        let before = eval(&[true, true], 10.0, 0.9, None);
        let mut after = eval(&[false, false], 10.0, 0.9, None);
        assert!(
            gate_failures(&Gates::default(), &before, &Baseline::of(&before), &after).is_empty()
        );
        // Not greedily memorized, but discoverable by sampling (or extracted after int8 rounding).
        after.extractable[1] = true;
        let why = gate_failures(&Gates::default(), &before, &Baseline::of(&before), &after);
        assert_eq!(why, ["1 of 2 sequences are still extractable"]);
    }

    fn eval(memorized: &[bool], ppl: f64, acc: f64, canary: Option<f64>) -> Evaluation {
        Evaluation {
            memorized: memorized.to_vec(),
            extractable: memorized.to_vec(),
            matched_prefix: vec![0; memorized.len()],
            accuracy: Some(acc),
            quality: Quality {
                accuracy_by_task: vec![("7".into(), acc)],
                perplexity: ppl,
            },
            canary_perplexity: canary,
        }
    }

    #[test]
    fn gates_hold_against_the_parent_and_the_root() {
        let g = Gates::default();
        let root = Baseline::of(&eval(&[], 1.00, 0.97, Some(10.0)));
        let parent = eval(&[true, true], 1.015, 0.967, Some(10.1));
        // Within budget of the parent (+1 %) but not of the root (+2.5 %).
        let after = eval(&[false, false], 1.025, 0.966, Some(10.15));
        let f = gate_failures(&g, &parent, &root, &after);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].starts_with("perplexity drift from the root +2.500%"),
            "{f:?}"
        );
        // The accuracy gate from the root too: 0.97 → 0.964 is −0.62 %.
        let after = eval(&[false, true], 1.01, 0.964, Some(10.1));
        let f = gate_failures(&g, &parent, &root, &after);
        assert!(
            f.iter()
                .any(|x| x == "1 of 2 sequences are still extractable"),
            "{f:?}"
        );
        assert!(f
            .iter()
            .any(|x| x.starts_with("mean relative accuracy change from the root")));
        assert!(
            !f.iter()
                .any(|x| x.starts_with("mean relative accuracy change -")),
            "{f:?}"
        );
        // When the parent is the root, each failure is named once.
        let parent_root = Baseline::of(&parent);
        let f = gate_failures(
            &g,
            &parent,
            &parent_root,
            &eval(&[false, false], 1.5, 0.9, Some(10.1)),
        );
        assert_eq!(f.len(), 2, "{f:?}");
        // A diverged model fails every quality gate.
        let f = gate_failures(
            &g,
            &parent,
            &root,
            &eval(&[false, false], f64::NAN, f64::NAN, Some(f64::NAN)),
        );
        assert_eq!(f.len(), 6, "{f:?}");
        assert!(gate_failures(
            &g,
            &parent,
            &root,
            &eval(&[false, false], 1.0, 0.97, Some(10.0))
        )
        .is_empty());
    }

    #[test]
    fn a_report_carries_the_root_for_the_next_job() {
        let root = Baseline::of(&eval(&[], 1.08, 0.97, None));
        let report = json!({ "root": root, "steps": 3 });
        assert_eq!(Baseline::from_report(&report), Some(root));
        assert_eq!(Baseline::from_report(&json!({})), None);
    }
}
