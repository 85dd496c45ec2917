//! `lethe unlearn`: run an unlearning method on a model and write the edited model with a
//! report.
//!
//! Invariants:
//! - The default (`--method balanced-subnet --mode controller`) is [`pipeline::run`], what the
//!   server's worker runs. Whatever the method, the result is held to the same gates as
//!   `lethe serve` (`--perplexity-budget` 0.02, `--accuracy-budget` 0.005) against the input.
//! - Once the method has run, `report.json` is written into `--out` whether the gates pass or
//!   not (and printed on stdout): memorization of the forget set before and after, accuracy per
//!   TinyMem test task (or perplexity on held-out text) before and after, weights zeroed,
//!   seconds, the gates and what failed them.
//! - The model (`model.safetensors`, with `config.json`, `tokenizer.json` and the TinyMem card
//!   copied from the input when it has them) is written only when the gates pass or
//!   `--no-gates` is given; otherwise the command exits non-zero with the failures.
//! - Every file is written atomically; the input directory is only read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::controller::ControllerConfig;
use super::finetune::FtData;
use super::greedy::GreedyConfig;
use super::method::{Attributions, MethodData, MethodSpec};
use super::neurons::{NeuronConfig, NeuronMethod};
use super::pipeline::{self, Baseline, Datasets, Evaluation, Gates, PipelineConfig, Target};
use super::quality::{mean_accuracy, quality, Quality};
use super::search::{paper_grid, search, Candidate};
use super::sou::SouConfig;
use super::{BalancedSubnetConfig, JobControl, Method, Mode, Outcome};
use crate::audit::cli::read_rows;
use crate::audit::{AuditItem, Definition};
use crate::loader::{LoadedModel, ModelArgs};
use crate::models::Model;
use crate::tinymem::data::{Dataset, Role, Split};
use crate::tinymem::lang::{LangCard, LANG_CARD_FILE, LANG_DATA_FILE};
use crate::tinymem::train::{Card, CARD_FILE};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MethodArg {
    BalancedSubnet,
    Subnet,
    /// Spec §4.5: one shot, zero the largest accumulated forget-set gradients per MLP tensor.
    Durable,
    /// Durable with the top entries taken over all MLP parameters together.
    DurableAgg,
    /// Spec §4.5: zero the one MLP entry with the largest θ·∂L/∂θ per batch, for
    /// ⌊ratio · parameters⌋ batches.
    Greedy,
    /// Spec §4.5: Second-Order Unlearning, zero the MLP entries with the largest OBS saliency
    /// under the forget set's empirical Fisher.
    Sou,
    /// Spec §4.5 (neuron-level): silence the neurons whose removal raises the forget loss most.
    ZeroOut,
    /// Spec §4.6: silence the neurons with the largest |mean activation| · ‖output weights‖.
    Activations,
    /// Spec §4.6: silence the neurons whose L1-penalised coefficients stay largest.
    Slimming,
    /// Spec §4.6: silence the neurons whose L0 hard-concrete gates stay most open.
    HardConcrete,
    /// Spec §4.6: silence the neurons with the largest integrated gradient of the memorized
    /// tokens' probability.
    IntegratedGradients,
    /// Spec §4.8: continue training on the clean versions of the artifact rows.
    FtClean,
    /// Spec §4.8: continue training on every training row but the artifact rows.
    FtExtra,
    /// Spec §4.8: continue training on both.
    FtBoth,
}

impl MethodArg {
    pub fn name(self) -> &'static str {
        match self {
            Self::BalancedSubnet => "balanced-subnet",
            Self::Subnet => "subnet",
            Self::Durable => "durable",
            Self::DurableAgg => "durable-agg",
            Self::Greedy => "greedy",
            Self::Sou => "sou",
            Self::ZeroOut => "zero-out",
            Self::Activations => "activations",
            Self::Slimming => "slimming",
            Self::HardConcrete => "hard-concrete",
            Self::IntegratedGradients => "integrated-gradients",
            Self::FtClean => "ft-clean",
            Self::FtExtra => "ft-extra",
            Self::FtBoth => "ft-both",
        }
    }

    fn ft(self) -> Option<FtData> {
        match self {
            Self::FtClean => Some(FtData::Clean),
            Self::FtExtra => Some(FtData::Extra),
            Self::FtBoth => Some(FtData::Both),
            _ => None,
        }
    }

    fn neuron(self) -> Option<NeuronMethod> {
        match self {
            Self::ZeroOut => Some(NeuronMethod::ZeroOut),
            Self::Activations => Some(NeuronMethod::Activations),
            Self::Slimming => Some(NeuronMethod::Slimming),
            Self::HardConcrete => Some(NeuronMethod::HardConcrete),
            Self::IntegratedGradients => Some(NeuronMethod::IntegratedGradients),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// The takedown controller (what `lethe serve` runs): ratio raised only while sequences
    /// stay extractable, forget term on the extractable ones, stops once the gates pass.
    Controller,
    /// The paper's schedule: shuffled passes over forget ∪ retain.
    Paper,
    /// Fixed-size balanced batches with early stopping.
    Balanced,
}

/// Which method runs, and its settings.
#[derive(Debug, Clone, Args)]
pub struct MethodFlags {
    #[arg(long, value_enum, default_value = "balanced-subnet")]
    pub method: MethodArg,
    #[arg(long, value_enum, default_value = "controller")]
    pub mode: ModeArg,
    /// Fraction of each MLP matrix zeroed (controller: at the start); for the neuron-level
    /// methods the fraction of each block's neurons silenced, for Greedy the iterations per
    /// parameter (default 0.1 for the controller, 0.01 neuron-level, 1e-4 Greedy, 0.3
    /// otherwise).
    #[arg(long)]
    pub ratio: Option<f64>,
    /// Controller: the highest mask ratio it may reach.
    #[arg(long, default_value_t = 0.5)]
    pub max_ratio: f64,
    /// Retain weight w in −(1 − w)·L_forget + w·L_retain.
    #[arg(long, default_value_t = 0.9)]
    pub w: f64,
    /// Passes over the data: paper mode and the neuron-level methods (default 1), fine-tuning
    /// (default 5, the paper's).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Step budget (controller: default 2000; balanced mode: default 200).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Balanced mode: minimum steps before stopping early.
    #[arg(long, default_value_t = 0)]
    pub min_steps: usize,
    /// Rows per batch (default 32; 64 for Greedy and the neuron-level methods, as the
    /// reference).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Slimming and HardConcrete: weight of the sparsity penalty.
    #[arg(long, default_value_t = 1000.0)]
    pub l1: f64,
    /// Integrated Gradients: values of the activation's scale, evenly over [0, 1].
    #[arg(long, default_value_t = 20)]
    pub ig_steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Search the paper's grid (ratio × epochs × w, spec §4.4) and keep the best run by the
    /// paper's selection score (§3.6).
    #[arg(long)]
    pub search: bool,
    /// Wall-time budget in seconds of the controller's run, or of --search (no new candidate
    /// starts after it).
    #[arg(long, default_value_t = 600.0)]
    pub budget_seconds: f64,
}

impl MethodFlags {
    /// Rows per batch: `--batch-size`, else 64 for Greedy and the neuron-level methods (as
    /// the reference), 32 otherwise.
    pub fn batch_size(&self) -> usize {
        let wide = self.method.neuron().is_some() || matches!(self.method, MethodArg::Greedy);
        self.batch_size.unwrap_or(if wide { 64 } else { 32 })
    }

    /// The masking methods' settings (BalancedSubnet or Subnet; paper mode unless balanced).
    fn masked(&self) -> BalancedSubnetConfig {
        BalancedSubnetConfig {
            method: match self.method {
                MethodArg::Subnet => Method::Subnet,
                _ => Method::BalancedSubnet,
            },
            mode: match self.mode {
                ModeArg::Balanced => Mode::Balanced,
                _ => Mode::Paper,
            },
            ratio: self.ratio.unwrap_or(0.3),
            w: self.w,
            epochs: self.epochs.unwrap_or(1),
            max_steps: self.max_steps.unwrap_or(200),
            min_steps: self.min_steps,
            batch_size: self.batch_size(),
            seed: self.seed,
            ..BalancedSubnetConfig::default()
        }
    }

    /// The method these flags run once (`None`: BalancedSubnet's takedown controller, which
    /// `pipeline::run` drives). `prompt_len` is the forget set's definition's prompt length
    /// (what Activations averages after).
    pub fn spec(&self, prompt_len: usize) -> Option<MethodSpec> {
        let ratio = |default| self.ratio.unwrap_or(default);
        let batch_size = self.batch_size();
        Some(match self.method {
            MethodArg::BalancedSubnet if self.mode == ModeArg::Controller => return None,
            MethodArg::BalancedSubnet | MethodArg::Subnet => MethodSpec::Masked(self.masked()),
            MethodArg::Durable | MethodArg::DurableAgg => MethodSpec::Durable {
                ratio: ratio(0.3),
                aggregate: matches!(self.method, MethodArg::DurableAgg),
                batch_size: 64,
            },
            MethodArg::Greedy => MethodSpec::Greedy(GreedyConfig {
                ratio: ratio(1e-4),
                batch_size,
                seed: self.seed,
            }),
            MethodArg::Sou => MethodSpec::Sou(SouConfig {
                ratio: ratio(0.01),
                seed: self.seed,
                ..SouConfig::default()
            }),
            MethodArg::FtClean | MethodArg::FtExtra | MethodArg::FtBoth => MethodSpec::FineTune {
                data: self.method.ft().expect("a fine-tuning method"),
                epochs: self.epochs.unwrap_or(5),
            },
            MethodArg::ZeroOut
            | MethodArg::Activations
            | MethodArg::Slimming
            | MethodArg::HardConcrete
            | MethodArg::IntegratedGradients => MethodSpec::Neuron {
                neuron: self.method.neuron().expect("a neuron-level method"),
                config: NeuronConfig {
                    ratio: ratio(0.01),
                    epochs: self.epochs.unwrap_or(1),
                    batch_size,
                    l1: self.l1,
                    ig_steps: self.ig_steps,
                    prompt_len,
                    seed: self.seed,
                    ..NeuronConfig::default()
                },
            },
        })
    }

    /// `method` with every other setting at its command-line default.
    pub fn of(method: MethodArg) -> Self {
        use clap::FromArgMatches;
        let cmd = <Self as Args>::augment_args(clap::Command::new("flags"));
        let mut flags =
            Self::from_arg_matches(&cmd.get_matches_from(["flags"])).expect("the defaults parse");
        flags.method = method;
        flags
    }
}

#[derive(Debug, Args)]
pub struct UnlearnArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL forget set (rows as `lethe audit` reads them; `lethe tinymem audit --out` writes one).
    #[arg(long)]
    pub forget: PathBuf,
    /// Retain set: a JSONL file, `tinymem-clean` (the model's clean training rows, what
    /// `lethe serve` uses) or `tinymem` (its training rows, noised ones included, as the paper
    /// does); for the language TinyMem, its clean train chunks or all its distinct train rows.
    #[arg(long, default_value = "tinymem-clean")]
    pub retain: String,
    /// Held-out text for perplexity (non-TinyMem models; no row may also be a retain row;
    /// default: one retain row in ten, at most 256, set aside and not trained on).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    #[command(flatten)]
    pub method: MethodFlags,
    /// Memorization definition for the forget set's audit (default: pythia for GPT-NeoX,
    /// tinymem for GPT-2).
    #[arg(long)]
    pub definition: Option<Definition>,
    /// Gate: largest relative held-out perplexity increase (0.02 = +2 %), as `lethe serve`.
    #[arg(long, default_value_t = 0.02)]
    pub perplexity_budget: f64,
    /// Gate (TinyMem): largest drop of mean relative test accuracy (0.005 = 0.5 %).
    #[arg(long, default_value_t = 0.005)]
    pub accuracy_budget: f64,
    /// Write the model whatever the gates say, and exit 0 (the controller then only waits for
    /// nothing to be extractable).
    #[arg(long)]
    pub no_gates: bool,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// `report.json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub method: &'static str,
    pub mode: &'static str,
    /// The memorization definition the forget set was audited under.
    pub definition: String,
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
    /// The gates' budgets and what failed them (empty: passed).
    pub gates: Gates,
    pub gates_failed: Vec<String>,
    /// Controller mode: the pipeline's report (every check, the ratio reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<serde_json::Value>,
}

fn by_task(q: &Quality) -> Option<BTreeMap<String, f64>> {
    (!q.accuracy_by_task.is_empty()).then(|| q.accuracy_by_task.iter().cloned().collect())
}

/// Everything a method runs on, loaded and measured once: the model, the forget set (audited
/// under its definition), the retain and held-out data, and the evaluation before.
pub struct Prepared {
    pub lm: LoadedModel,
    dataset: Option<Dataset>,
    def: Definition,
    targets: Vec<Target>,
    forget: Vec<Vec<u32>>,
    items: Vec<AuditItem>,
    data: Datasets,
    retain_len: usize,
    gates: Gates,
    pub before: Evaluation,
    /// Neuron attributions already computed, by method and settings (ratio aside), with the
    /// seconds and steps they took: a sweep over ratios ranks them again instead.
    attributions: Attributions,
}

impl Prepared {
    /// Loads `model` and its data; `retain_arg` as `--retain`, `eval` as `--eval`.
    pub fn load(
        model: &ModelArgs,
        forget_file: &Path,
        retain_arg: &str,
        eval: Option<PathBuf>,
        definition: Option<Definition>,
        gates: Gates,
    ) -> anyhow::Result<Self> {
        let lm = model.load()?;
        let card = Card::read_if_present(&lm.dir)?;
        let dataset = card.as_ref().map(Card::dataset).transpose()?;
        let language = LangCard::read_if_present(&lm.dir)?
            .map(|c| c.dataset(&lm.dir))
            .transpose()?;
        let def =
            definition.unwrap_or_else(|| Definition::default_for(lm.model.spec().architecture));
        let forget_rows = read_rows(forget_file, def, &lm.tokenizer)?;
        if forget_rows.is_empty() {
            bail!("{}: the forget set is empty", forget_file.display());
        }
        let source = forget_file.display().to_string();
        let targets: Vec<Target> = forget_rows
            .into_iter()
            .enumerate()
            .map(|(i, p)| Target::new(source.clone(), i, p.sequence, p.item))
            .collect();
        let forget: Vec<Vec<u32>> = targets.iter().map(|t| t.sequence.clone()).collect();
        let items: Vec<AuditItem> = targets.iter().map(|t| t.item.clone()).collect();
        let retain: Vec<Vec<u32>> = match retain_arg {
            "tinymem" | "tinymem-clean" if language.is_some() => {
                // The language TinyMem: its clean train chunks, or every distinct train row.
                let ds = language.as_ref().expect("checked");
                if retain_arg == "tinymem-clean" {
                    ds.retain()
                } else {
                    ds.rows
                        .iter()
                        .filter(|r| r.split == Split::Train)
                        .map(|r| r.ids.clone())
                        .collect()
                }
            }
            "tinymem" | "tinymem-clean" => {
                let ds = dataset.as_ref().with_context(|| {
                    format!(
                        "--retain {} needs a TinyMem model (no {CARD_FILE} in {})",
                        retain_arg,
                        lm.dir.display()
                    )
                })?;
                let clean_only = retain_arg == "tinymem-clean";
                ds.rows
                    .iter()
                    .filter(|r| r.split == Split::Train && (!clean_only || r.role == Role::Clean))
                    .map(|r| r.ids.clone())
                    .collect()
            }
            file => pipeline::read_sequences(Path::new(file), &lm.tokenizer)?,
        };
        let heldout = match &eval {
            Some(f) => Some(pipeline::read_sequences(f, &lm.tokenizer)?),
            None => None,
        };
        let context = lm.model.spec().context_length;
        let data = Datasets::for_model(&lm.dir, Some(retain), heldout, Vec::new(), context)?;
        let retain_len = data.retain.len();
        let (before, _) = pipeline::evaluate(&lm.model, None, &targets, &data, None, &gates)?;
        Ok(Self {
            lm,
            dataset,
            def,
            targets,
            forget,
            items,
            data,
            retain_len,
            gates,
            before,
            attributions: Attributions::default(),
        })
    }

    /// The number of forget sequences.
    pub fn forget_len(&self) -> usize {
        self.forget.len()
    }

    /// Runs `m` and evaluates the result against the gates: the report and the edited model.
    pub fn unlearn(&self, m: &MethodFlags) -> anyhow::Result<(Report, Model)> {
        let Self {
            lm,
            dataset,
            def,
            targets,
            forget,
            items,
            data,
            retain_len,
            gates,
            before,
            attributions,
        } = self;
        let (def, retain_len) = (*def, *retain_len);
        let parent = Baseline::of(before);
        let controller_mode = m.mode == ModeArg::Controller
            && !m.search
            && matches!(m.method, MethodArg::BalancedSubnet);
        if m.search && !matches!(m.method, MethodArg::BalancedSubnet | MethodArg::Subnet) {
            bail!(
                "--search sweeps the grid of balanced-subnet and subnet only, not {}",
                m.method.name()
            );
        }
        let batch_size = m.batch_size();
        let cfg = m.masked();
        let ctl = JobControl::new();
        // Durable also zeroes biases; the subnet methods zero weight-matrix entries only.
        let mut zeroed_total: Option<usize> = None;
        let mut controller_report = None;
        let mut controller_quality = None;
        let (out, cfg, candidates) = if controller_mode {
            let defaults = ControllerConfig::default();
            let pcfg = PipelineConfig {
                controller: ControllerConfig {
                    max_ratio: m.max_ratio,
                    w: m.w,
                    max_steps: m.max_steps.unwrap_or(defaults.max_steps),
                    budget_seconds: m.budget_seconds,
                    batch_size,
                    seed: m.seed,
                    ..defaults.clone()
                }
                .with_start_ratio(m.ratio.unwrap_or(defaults.start_ratio)),
                gates: gates.clone(),
                method: None,
            };
            let d = pipeline::run(
                &lm.model,
                None,
                targets,
                data,
                pipeline::Lineage {
                    parent: Some(&parent),
                    ..pipeline::Lineage::default()
                },
                &pcfg,
                &ctl,
                &|_| {},
            )?;
            let ratio = d.report["total_ratio"]
                .as_f64()
                .unwrap_or(pcfg.controller.start_ratio);
            // The last gate measurement is of the returned model only when the gates passed.
            controller_quality = if d.passed { d.quality.clone() } else { None };
            let zeros_per_matrix = super::mask::zeros_per_matrix(&lm.model.mlp_weights(), ratio);
            let out = Outcome {
                mlp: d.model.mlp_weights(),
                model: d.model,
                zeros_per_matrix,
                steps: d.report["steps"].as_u64().unwrap_or(0) as usize,
                seconds: d.report["unlearn_seconds"].as_f64().unwrap_or(0.0),
                stopped_early: d.passed,
            };
            let cfg = BalancedSubnetConfig { ratio, ..cfg };
            controller_report = Some(d.report);

            (out, cfg, None)
        } else if m.search {
            let grid = paper_grid(&cfg);
            let q = |m: &Model| quality(m, dataset.as_ref(), &data.heldout);
            let res = search(
                &lm.model,
                forget,
                &data.retain,
                items,
                &grid,
                m.budget_seconds,
                &ctl,
                &q,
            )?;
            let (i, out) = res
                .best
                .context("the search budget ran out before any candidate finished")?;
            let cfg = res.candidates[i].config.clone();
            (out, cfg, Some(res.candidates))
        } else {
            let spec = m
                .spec(def.k())
                .expect("every method but the controller has a spec");
            let r = spec.run(
                &lm.model,
                &MethodData {
                    forget,
                    retain: &data.retain,
                    items,
                    dir: Some(&lm.dir),
                },
                Some(attributions),
                &ctl,
            )?;
            if let Some(note) = &r.note {
                eprintln!("{note}");
            }
            zeroed_total = Some(r.weights_zeroed);
            (
                r.outcome,
                BalancedSubnetConfig {
                    ratio: spec.ratio(),
                    epochs: spec.epochs(),
                    ..cfg
                },
                None,
            )
        };
        // The controller's last gate measurement is of the model it returns.
        let (after, _) = pipeline::evaluate(
            &out.model,
            None,
            targets,
            data,
            controller_quality.as_ref(),
            gates,
        )?;
        let gates_failed = pipeline::gate_failures(gates, before, &Baseline::of(before), &after);
        let rate = |e: &pipeline::Evaluation| {
            e.memorized.iter().filter(|m| **m).count() as f64 / e.memorized.len().max(1) as f64
        };
        let report = Report {
            method: m.method.name(),
            mode: if controller_mode {
                "controller"
            } else {
                match cfg.mode {
                    Mode::Paper => "paper",
                    Mode::Balanced => "balanced",
                }
            },
            definition: def.to_string(),
            ratio: cfg.ratio,
            w: cfg.w,
            epochs: cfg.epochs,
            steps: out.steps,
            stopped_early: out.stopped_early,
            forget_sequences: forget.len(),
            retain_sequences: retain_len,
            memorized_before: rate(before),
            memorized_after: rate(&after),
            accuracy_before: mean_accuracy(&before.quality),
            accuracy_after: mean_accuracy(&after.quality),
            accuracy_by_task_before: by_task(&before.quality),
            accuracy_by_task_after: by_task(&after.quality),
            relative_accuracy_change: before.quality.relative_accuracy_change(&after.quality),
            perplexity_before: before.quality.perplexity,
            perplexity_after: after.quality.perplexity,
            weights_zeroed: zeroed_total
                .unwrap_or_else(|| out.zeros_per_matrix.iter().map(|(x, y)| x + y).sum()),
            zeros_per_matrix: out.zeros_per_matrix.clone(),
            seconds: out.seconds,
            search: candidates,
            gates: gates.clone(),
            gates_failed: gates_failed.clone(),
            controller: controller_report,
        };
        Ok((report, out.model))
    }
}

/// The gates `lethe unlearn` holds a result to: `lethe serve`'s budgets, or none at all.
pub fn gates_of(no_gates: bool, perplexity_budget: f64, accuracy_budget: f64) -> Gates {
    if no_gates {
        Gates {
            perplexity_budget: f64::INFINITY,
            accuracy_budget: f64::INFINITY,
            canary_budget: f64::INFINITY,
            ..Gates::default()
        }
    } else {
        Gates {
            perplexity_budget,
            accuracy_budget,
            ..Gates::default()
        }
    }
}

pub fn run(a: UnlearnArgs) -> anyhow::Result<()> {
    let gates = gates_of(a.no_gates, a.perplexity_budget, a.accuracy_budget);
    let p = Prepared::load(
        &a.model,
        &a.forget,
        &a.retain,
        a.eval.clone(),
        a.definition,
        gates,
    )?;
    let (report, model) = p.unlearn(&a.method)?;
    let gates_failed = report.gates_failed.clone();
    let lm = &p.lm;
    let json = serde_json::to_string_pretty(&report)?;
    println!("{}", serde_json::to_string(&report)?);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    crate::util::write_atomic(&a.out.join("report.json"), json.as_bytes())?;
    if !gates_failed.is_empty() && !a.no_gates {
        bail!(
            "the gates failed: {}; no model written (report in {}; --no-gates writes it anyway)",
            gates_failed.join("; "),
            a.out.join("report.json").display()
        );
    }
    write_model_dir(&lm.dir, &a.out, &model)?;
    eprintln!(
        "gates {}: {} of {} sequences extractable after, perplexity {:.4} → {:.4}{}",
        if a.no_gates {
            "not applied (--no-gates)"
        } else {
            "passed"
        },
        (report.memorized_after * report.forget_sequences as f64).round(),
        report.forget_sequences,
        report.perplexity_before,
        report.perplexity_after,
        report
            .relative_accuracy_change
            .map(|r| format!(", relative accuracy {:+.2}%", r * 100.0))
            .unwrap_or_default()
    );
    Ok(())
}

/// Writes `model` as a complete model directory, copying the input's config, tokenizer and
/// TinyMem card (the language TinyMem's card and rows too).
pub fn write_model_dir(input: &Path, out: &Path, model: &Model) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::models::weights::write_safetensors(
        model.named_tensors(),
        DType::F32,
        &out.join("model.safetensors"),
    )?;
    for f in [
        "config.json",
        "tokenizer.json",
        CARD_FILE,
        LANG_CARD_FILE,
        LANG_DATA_FILE,
    ] {
        let src = input.join(f);
        if src.is_file() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            crate::util::write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(())
}
