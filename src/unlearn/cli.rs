//! `lethe unlearn`: run an unlearning method on a model and write the edited model with a
//! report.
//!
//! The output directory is a complete model (`config.json` and `tokenizer.json` copied from the
//! input, the edited `model.safetensors`, a TinyMem card when the input had one) plus
//! `report.json`: memorization of the forget set before and after, accuracy per TinyMem test
//! task (or perplexity on held-out text) before and after, weights zeroed, seconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::durable::durable;
use super::search::{paper_grid, search, Candidate, Quality};
use super::{balanced_subnet, BalancedSubnetConfig, JobControl, Method, Mode, Outcome};
use crate::audit::cli::read_rows;
use crate::audit::{self, AuditItem, Definition};
use crate::cli::ModelArgs;
use crate::engine;
use crate::models::Model;
use crate::tinymem::data::{Dataset, Role, Split};
use crate::tinymem::eval::{self, EvalParams};
use crate::tinymem::train::{Card, CARD_FILE};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MethodArg {
    BalancedSubnet,
    Subnet,
    /// Spec §4.5: one shot, zero the largest accumulated forget-set gradients per MLP tensor.
    Durable,
    /// Durable with the top entries taken over all MLP parameters together.
    DurableAgg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Paper,
    Balanced,
}

#[derive(Debug, Args)]
pub struct UnlearnArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL forget set (rows as `lethe audit` reads them; `lethe tinymem audit --out` writes one).
    #[arg(long)]
    pub forget: PathBuf,
    /// Retain set: a JSONL file, `tinymem` (the model's training rows, noised ones included, as
    /// the paper does) or `tinymem-clean` (its clean training rows only).
    #[arg(long, default_value = "tinymem")]
    pub retain: String,
    /// Held-out text for perplexity (non-TinyMem models; default: the first 256 retain rows).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "balanced-subnet")]
    pub method: MethodArg,
    #[arg(long, value_enum, default_value = "paper")]
    pub mode: ModeArg,
    /// Fraction of each MLP matrix zeroed.
    #[arg(long, default_value_t = 0.3)]
    pub ratio: f64,
    /// Retain weight w in −(1 − w)·L_forget + w·L_retain.
    #[arg(long, default_value_t = 0.9)]
    pub w: f64,
    /// Paper mode: passes over the data.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Balanced mode: step budget.
    #[arg(long, default_value_t = 200)]
    pub max_steps: usize,
    /// Balanced mode: minimum steps before stopping early.
    #[arg(long, default_value_t = 0)]
    pub min_steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Memorization definition for the forget set's audit.
    #[arg(long, default_value = "tinymem")]
    pub definition: Definition,
    /// Search the paper's grid (ratio × epochs × w, spec §4.4) and keep the best run by the
    /// paper's selection score (§3.6).
    #[arg(long)]
    pub search: bool,
    /// Wall-time budget of --search in seconds (no new candidate starts after it).
    #[arg(long, default_value_t = 600.0)]
    pub budget_seconds: f64,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// `report.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub method: &'static str,
    pub mode: Mode,
    pub ratio: f64,
    pub w: f64,
    pub epochs: usize,
    pub steps: usize,
    pub stopped_early: bool,
    pub forget_sequences: usize,
    pub retain_sequences: usize,
    pub memorized_before: f64,
    pub memorized_after: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_before: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_after: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_by_task_before: Option<BTreeMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_by_task_after: Option<BTreeMap<String, f64>>,
    /// Mean over test tasks of (after − before) / before (spec §3.6).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relative_accuracy_change: Option<f64>,
    pub perplexity_before: f64,
    pub perplexity_after: f64,
    pub weights_zeroed: usize,
    pub zeros_per_matrix: Vec<(usize, usize)>,
    pub seconds: f64,
    /// With --search: every candidate tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<Candidate>>,
}

/// Held-out quality: TinyMem test-task accuracies (and their §3.4 perplexity), or the mean
/// perplexity of held-out sequences.
pub fn quality(
    model: &Model,
    tinymem: Option<&Dataset>,
    heldout: &[Vec<u32>],
) -> crate::Result<Quality> {
    if let Some(ds) = tinymem {
        let r = eval::evaluate(model, ds, &EvalParams::default())?;
        return Ok(Quality {
            accuracy_by_task: r.accuracy_by_task.into_iter().collect(),
            perplexity: r.perplexity,
        });
    }
    let scores = engine::score(model, heldout, 32)?;
    let ppl = scores.iter().map(|s| s.perplexity).sum::<f64>() / scores.len().max(1) as f64;
    Ok(Quality {
        accuracy_by_task: Vec::new(),
        perplexity: ppl,
    })
}

pub fn mean_accuracy(q: &Quality) -> Option<f64> {
    (!q.accuracy_by_task.is_empty()).then(|| {
        q.accuracy_by_task.iter().map(|(_, a)| a).sum::<f64>() / q.accuracy_by_task.len() as f64
    })
}

fn by_task(q: &Quality) -> Option<BTreeMap<String, f64>> {
    (!q.accuracy_by_task.is_empty()).then(|| q.accuracy_by_task.iter().cloned().collect())
}

pub fn run(a: UnlearnArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    let card = Card::read(&lm.dir).ok();
    let dataset = card.as_ref().map(Card::dataset).transpose()?;
    let forget_rows = read_rows(&a.forget, a.definition, &lm.tokenizer)?;
    if forget_rows.is_empty() {
        bail!("{}: the forget set is empty", a.forget.display());
    }
    let (forget, items): (Vec<Vec<u32>>, Vec<AuditItem>) = forget_rows
        .into_iter()
        .map(|p| (p.sequence, p.item))
        .unzip();
    let retain: Vec<Vec<u32>> = match a.retain.as_str() {
        "tinymem" | "tinymem-clean" => {
            let ds = dataset.as_ref().with_context(|| {
                format!(
                    "--retain {} needs a TinyMem model (no {CARD_FILE} in {})",
                    a.retain,
                    lm.dir.display()
                )
            })?;
            let clean_only = a.retain == "tinymem-clean";
            ds.rows
                .iter()
                .filter(|r| r.split == Split::Train && (!clean_only || r.role == Role::Clean))
                .map(|r| r.ids.clone())
                .collect()
        }
        file => read_rows(Path::new(file), a.definition, &lm.tokenizer)?
            .into_iter()
            .map(|p| p.sequence)
            .collect(),
    };
    let heldout: Vec<Vec<u32>> = match &a.eval {
        Some(f) => read_rows(f, a.definition, &lm.tokenizer)?
            .into_iter()
            .map(|p| p.sequence)
            .collect(),
        None => retain.iter().take(256).cloned().collect(),
    };

    let (_, before_mem) = audit::audit(&lm.model, None, &items, 64)?;
    let before = quality(&lm.model, dataset.as_ref(), &heldout)?;
    let cfg = BalancedSubnetConfig {
        method: match a.method {
            MethodArg::Subnet => Method::Subnet,
            _ => Method::BalancedSubnet,
        },
        mode: match a.mode {
            ModeArg::Paper => Mode::Paper,
            ModeArg::Balanced => Mode::Balanced,
        },
        ratio: a.ratio,
        w: a.w,
        epochs: a.epochs,
        max_steps: a.max_steps,
        min_steps: a.min_steps,
        batch_size: a.batch_size,
        seed: a.seed,
        ..BalancedSubnetConfig::default()
    };
    let ctl = JobControl::new();
    // Durable also zeroes biases; the subnet methods zero weight-matrix entries only.
    let mut zeroed_total: Option<usize> = None;
    let (out, cfg, candidates) = if a.search {
        let grid = paper_grid(&cfg);
        let q = |m: &Model| quality(m, dataset.as_ref(), &heldout);
        let res = search(
            &lm.model,
            &forget,
            &retain,
            &items,
            &grid,
            a.budget_seconds,
            &ctl,
            &q,
        )?;
        let (i, out) = res
            .best
            .context("the search budget ran out before any candidate finished")?;
        let cfg = res.candidates[i].config.clone();
        (out, cfg, Some(res.candidates))
    } else if let MethodArg::Durable | MethodArg::DurableAgg = a.method {
        let agg = matches!(a.method, MethodArg::DurableAgg);
        let d = durable(&lm.model, &forget, a.ratio, 64, agg)?;
        let by_name: std::collections::HashMap<&str, usize> =
            d.zeros.iter().map(|(n, z)| (n.as_str(), *z)).collect();
        let zeros_per_matrix = lm
            .model
            .mlp_weight_names()
            .iter()
            .map(|(x, y)| (by_name[x.as_str()], by_name[y.as_str()]))
            .collect();
        let out = Outcome {
            mlp: d.model.mlp_weights(),
            model: d.model,
            zeros_per_matrix,
            steps: forget.len().div_ceil(64),
            seconds: d.seconds,
            stopped_early: false,
        };
        zeroed_total = Some(d.zeros.iter().map(|(_, z)| z).sum());
        (out, cfg, None)
    } else {
        (
            balanced_subnet(&lm.model, &forget, &retain, &items, &cfg, &ctl)?,
            cfg,
            None,
        )
    };
    let (_, after_mem) = audit::audit(&out.model, None, &items, 64)?;
    let after = quality(&out.model, dataset.as_ref(), &heldout)?;
    let relative_accuracy_change = before.relative_accuracy_change(&after);
    let report = Report {
        method: match a.method {
            MethodArg::BalancedSubnet => "balanced-subnet",
            MethodArg::Subnet => "subnet",
            MethodArg::Durable => "durable",
            MethodArg::DurableAgg => "durable-agg",
        },
        mode: cfg.mode,
        ratio: cfg.ratio,
        w: cfg.w,
        epochs: cfg.epochs,
        steps: out.steps,
        stopped_early: out.stopped_early,
        forget_sequences: forget.len(),
        retain_sequences: retain.len(),
        memorized_before: before_mem.rate,
        memorized_after: after_mem.rate,
        accuracy_before: mean_accuracy(&before),
        accuracy_after: mean_accuracy(&after),
        accuracy_by_task_before: by_task(&before),
        accuracy_by_task_after: by_task(&after),
        relative_accuracy_change,
        perplexity_before: before.perplexity,
        perplexity_after: after.perplexity,
        weights_zeroed: zeroed_total
            .unwrap_or_else(|| out.zeros_per_matrix.iter().map(|(x, y)| x + y).sum()),
        zeros_per_matrix: out.zeros_per_matrix.clone(),
        seconds: out.seconds,
        search: candidates,
    };
    write_model_dir(&lm.dir, &a.out, &out.model)?;
    let json = serde_json::to_string_pretty(&report)?;
    crate::util::write_atomic(&a.out.join("report.json"), json.as_bytes())?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Writes `model` as a complete model directory, copying the input's config, tokenizer and
/// TinyMem card.
pub fn write_model_dir(input: &Path, out: &Path, model: &Model) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::models::weights::write_safetensors(
        model.named_tensors(),
        DType::F32,
        &out.join("model.safetensors"),
    )?;
    for f in ["config.json", "tokenizer.json", CARD_FILE] {
        let src = input.join(f);
        if src.is_file() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            crate::util::write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(())
}
