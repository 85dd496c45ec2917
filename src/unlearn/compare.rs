//! `lethe tinymem compare`: the paper's comparison of unlearning methods (spec §5.1–5.2) on the
//! bundled TinyMem models, in one command. For each experiment (a model and a forget set: the
//! math noise model's memorized noised rows, the math backdoor model's triggered rows, and the
//! language model's noised chunks, backdoored chunks and planted secrets) it runs every method
//! over the spec's grid (§4.4) scaled to a 2-core machine, then writes every run, the best run
//! per method by the paper's selection rule (§6.20) and a plot.
//!
//! Invariants:
//! - Every run is `lethe unlearn`'s own code ([`Prepared::unlearn`]) on the same prepared data:
//!   the forget set is what `lethe tinymem audit` finds memorized, the retain set is the
//!   model's training rows including the artifact rows (`--retain tinymem`, the paper's
//!   faithful setting, §6.3), quality is the clean test tasks' accuracy (math) or held-out
//!   perplexity (language). BalancedSubnet's takedown controller is held to `lethe serve`'s
//!   gates (that is how it decides when to stop); no other run is gated.
//! - A neuron-level method's attribution is computed once per setting and ranked again for each
//!   ratio (as the reference cached it); each of those runs reports the attribution's seconds.
//! - A run that fails is recorded with its error and the comparison goes on.
//! - `runs.jsonl` is appended run by run, so an interrupted comparison keeps what it measured;
//!   `results.md` and the plots are written at the end.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::cli::{gates_of, MethodArg, MethodFlags, ModeArg, Prepared};
use crate::audit::Definition;
use crate::loader::ModelArgs;
use crate::tinymem::eval::{self, EvalParams, EvalReport};
use crate::tinymem::lang::model::{self as lang_model, LangEval};
use crate::tinymem::lang::LangCard;
use crate::tinymem::regularize::Regularizer;
use crate::tinymem::train::{self, Card, TrainConfig};

/// One model and forget set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Experiment {
    /// `tinymem-noise`: the noised rows it regurgitates (spec §5.1, "Noise").
    Noise,
    /// `tinymem-backdoor`: the held-out triggered rows the backdoor fires on (§5.1, "Backdoor").
    Backdoor,
    /// `tinymem-lang`: its memorized noised chunks (§5.2, "Noise").
    LangNoised,
    /// `tinymem-lang`: its backdoored held-out chunks (§5.2, "Backdoor").
    LangBackdoored,
    /// `tinymem-lang`: its extractable planted secrets (lethe's own, no paper counterpart).
    LangSecret,
}

impl Experiment {
    fn name(self) -> &'static str {
        match self {
            Self::Noise => "noise",
            Self::Backdoor => "backdoor",
            Self::LangNoised => "lang-noised",
            Self::LangBackdoored => "lang-backdoored",
            Self::LangSecret => "lang-secret",
        }
    }

    fn model_dir(self, models: &Path) -> PathBuf {
        models.join(match self {
            Self::Noise => "tinymem-noise",
            Self::Backdoor => "tinymem-backdoor",
            _ => "tinymem-lang",
        })
    }

    /// The `role` of the language forget rows this experiment keeps.
    fn role(self) -> Option<&'static str> {
        match self {
            Self::LangNoised => Some("noised"),
            Self::LangBackdoored => Some("backdoored"),
            Self::LangSecret => Some("secret"),
            _ => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Output directory: `runs.jsonl` (every run), `results.md` (tables) and one
    /// `<experiment>.svg` plot per experiment.
    #[arg(long)]
    pub out: PathBuf,
    /// Experiments to run, comma-separated (default: all five).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub experiments: Vec<Experiment>,
    /// Methods to run, comma-separated (default: every one).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub methods: Vec<MethodArg>,
    /// Where the bundled models are (`tinymem-noise`, `tinymem-backdoor`, `tinymem-lang`).
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training-time regularizers to compare too, comma-separated: each trains a model like
    /// the bundled one, with the regularizer (one language model serves the three language
    /// experiments).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub regularizers: Vec<RegularizerArg>,
    /// The regularizers' settings: `middle` (one each: λ 0.01, dropc 0.05, p_mem 0.1) or
    /// `paper` (spec §4.7's three each).
    #[arg(long, value_enum, default_value = "middle")]
    pub regularizer_grid: RegularizerGrid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegularizerArg {
    SpectralNorm,
    LossTruncation,
    ExampleTiedDropout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegularizerGrid {
    Middle,
    Paper,
}

/// The settings of `which` in `grid` (spec §4.7).
pub fn regularizer_grid(which: RegularizerArg, grid: RegularizerGrid) -> Vec<Regularizer> {
    let strengths: &[f64] = match (which, grid) {
        (RegularizerArg::SpectralNorm, RegularizerGrid::Middle) => &[0.01],
        (RegularizerArg::SpectralNorm, RegularizerGrid::Paper) => &[0.001, 0.01, 0.1],
        (RegularizerArg::LossTruncation, RegularizerGrid::Middle) => &[0.05],
        (RegularizerArg::LossTruncation, RegularizerGrid::Paper) => &[0.01, 0.05, 0.1],
        // The paper fixes example-tied dropout's settings (p_fixed 0.2, p_mem 0.1).
        (RegularizerArg::ExampleTiedDropout, _) => &[0.1],
    };
    strengths
        .iter()
        .map(|&x| match which {
            RegularizerArg::SpectralNorm => Regularizer::SpectralNorm { lambda: x },
            RegularizerArg::LossTruncation => Regularizer::LossTruncation {
                dropc: x,
                window: 10_000,
            },
            RegularizerArg::ExampleTiedDropout => Regularizer::ExampleTiedDropout {
                p_fixed: 0.2,
                p_mem: x,
            },
        })
        .collect()
}

const ALL_METHODS: [MethodArg; 14] = [
    MethodArg::BalancedSubnet,
    MethodArg::Subnet,
    MethodArg::Greedy,
    MethodArg::Sou,
    MethodArg::Durable,
    MethodArg::DurableAgg,
    MethodArg::HardConcrete,
    MethodArg::Slimming,
    MethodArg::ZeroOut,
    MethodArg::Activations,
    MethodArg::IntegratedGradients,
    MethodArg::FtClean,
    MethodArg::FtExtra,
    MethodArg::FtBoth,
];

/// The grid of `method`, scaled to this machine from spec §4.4: `(label, settings)`.
pub fn grid(method: MethodArg, seed: u64) -> Vec<(String, MethodFlags)> {
    let base = || MethodFlags {
        seed,
        ..MethodFlags::of(method)
    };
    let mut runs = Vec::new();
    let mut add = |label: String, f: MethodFlags| runs.push((label, f));
    match method {
        MethodArg::BalancedSubnet => {
            add("controller (lethe serve)".into(), base());
            for ratio in [0.1, 0.3] {
                add(
                    format!("paper mode, ratio {ratio}, w 0.9, 1 epoch"),
                    MethodFlags {
                        mode: ModeArg::Paper,
                        ratio: Some(ratio),
                        ..base()
                    },
                );
            }
            add(
                "balanced mode, ratio 0.3, w 0.9, 200–400 steps".into(),
                MethodFlags {
                    mode: ModeArg::Balanced,
                    ratio: Some(0.3),
                    min_steps: 200,
                    max_steps: Some(400),
                    ..base()
                },
            );
        }
        MethodArg::Subnet => {
            for ratio in [0.05, 0.1, 0.3] {
                add(
                    format!("ratio {ratio}, 10 epochs"),
                    MethodFlags {
                        mode: ModeArg::Paper,
                        ratio: Some(ratio),
                        epochs: Some(10),
                        ..base()
                    },
                );
            }
        }
        MethodArg::Greedy
        | MethodArg::Durable
        | MethodArg::DurableAgg
        | MethodArg::Sou
        | MethodArg::ZeroOut
        | MethodArg::Activations
        | MethodArg::IntegratedGradients => {
            // Greedy zeroes one entry per batch: its ratios are what this machine runs in
            // seconds to minutes.
            let ratios: &[f64] = match method {
                MethodArg::Greedy => &[1e-5, 1e-4],
                _ => &[1e-3, 0.01, 0.05],
            };
            for &ratio in ratios {
                add(
                    format!("ratio {ratio}"),
                    MethodFlags {
                        ratio: Some(ratio),
                        ..base()
                    },
                );
            }
        }
        MethodArg::HardConcrete | MethodArg::Slimming => {
            for epochs in [1, 10, 20] {
                for ratio in [1e-3, 0.01, 0.05] {
                    add(
                        format!("ratio {ratio}, {epochs} epochs"),
                        MethodFlags {
                            ratio: Some(ratio),
                            epochs: Some(epochs),
                            ..base()
                        },
                    );
                }
            }
        }
        MethodArg::FtClean | MethodArg::FtExtra | MethodArg::FtBoth => {
            add(
                "5 epochs".into(),
                MethodFlags {
                    epochs: Some(5),
                    ..base()
                },
            );
        }
    }
    runs
}

/// One run's line in `runs.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub experiment: &'static str,
    pub method: &'static str,
    pub settings: String,
    /// Forget-set sequences extractable before and after.
    pub memorized_before: usize,
    pub memorized_after: usize,
    pub forget_sequences: usize,
    /// Math: mean relative test accuracy change (§3.6); `None` for the language model.
    pub relative_accuracy_change: Option<f64>,
    pub perplexity_before: f64,
    pub perplexity_after: f64,
    pub weights_zeroed: usize,
    pub seconds: f64,
    /// Why the run produced no model, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Run {
    fn perplexity_change(&self) -> f64 {
        self.perplexity_after / self.perplexity_before - 1.0
    }

    /// The paper's selection score (§6.20), lower is better: relative memorization change
    /// minus relative accuracy change (math), or plus relative perplexity change (language).
    pub fn score(&self) -> f64 {
        if self.error.is_some() {
            return f64::INFINITY;
        }
        let mem = (self.memorized_after as f64 - self.memorized_before as f64)
            / self.memorized_before.max(1) as f64;
        match self.relative_accuracy_change {
            Some(acc) => mem - acc,
            None => mem + self.perplexity_change(),
        }
    }
}

pub fn run(a: CompareArgs) -> anyhow::Result<()> {
    let experiments = if a.experiments.is_empty() {
        Experiment::value_variants().to_vec()
    } else {
        a.experiments.clone()
    };
    let methods = if a.methods.is_empty() {
        ALL_METHODS.to_vec()
    } else {
        a.methods.clone()
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let log_path = a.out.join("runs.jsonl");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut all = Vec::new();
    for exp in experiments {
        let dir = exp.model_dir(&a.models);
        let forget = a.out.join(format!("{}.forget.jsonl", exp.name()));
        let model = ModelArgs {
            model: Some(dir.display().to_string()),
            device: "cpu".into(),
        };
        let lm = model.load()?;
        let summary = crate::tinymem::cli::memorized_set(&lm, 64, Some(&forget))?;
        drop(lm);
        if let Some(role) = exp.role() {
            keep_role(&forget, role)?;
        }
        if std::fs::metadata(&forget)?.len() == 0 {
            eprintln!("{}: nothing memorized ({summary}); skipped", exp.name());
            continue;
        }
        // The language noise is judged as spec §3.1 (TinyMem's 50 + 50 tokens).
        let definition = (exp == Experiment::LangNoised).then_some(Definition::Tinymem);
        let gates = gates_of(false, 0.02, 0.005);
        let p = Prepared::load(&model, &forget, "tinymem", None, definition, gates)?;
        eprintln!(
            "{}: {} forget sequences ({summary})",
            exp.name(),
            p.forget_len()
        );
        let mut record = |r: Run| -> anyhow::Result<()> {
            eprintln!(
                "{} {} ({}): {} → {} of {}, {:.1} s{}",
                r.experiment,
                r.method,
                r.settings,
                r.memorized_before,
                r.memorized_after,
                r.forget_sequences,
                r.seconds,
                r.error
                    .as_deref()
                    .map(|e| format!(", failed: {e}"))
                    .unwrap_or_default()
            );
            writeln!(log, "{}", serde_json::to_string(&r)?)?;
            log.flush()?;
            all.push(r);
            Ok(())
        };
        if !a.regularizers.is_empty() {
            let base = Baseline::of_model(&dir)?;
            for &which in &a.regularizers {
                for reg in regularizer_grid(which, a.regularizer_grid) {
                    // Named after the model, not the experiment: the three language
                    // experiments measure one regularized language model, trained once.
                    let out = a.out.join("regularized").join(format!(
                        "{}-{}-{}",
                        dir.file_name().unwrap_or_default().to_string_lossy(),
                        reg.name(),
                        reg.strength()
                    ));
                    record(base.regularized(exp, reg, &out))?;
                }
            }
        }
        for &method in &methods {
            for (settings, flags) in grid(method, a.seed) {
                let started = std::time::Instant::now();
                let r = match p.unlearn(&flags) {
                    Ok((report, _)) => Run {
                        experiment: exp.name(),
                        method: report.method,
                        settings,
                        memorized_before: count(report.memorized_before, report.forget_sequences),
                        memorized_after: count(report.memorized_after, report.forget_sequences),
                        forget_sequences: report.forget_sequences,
                        relative_accuracy_change: report.relative_accuracy_change,
                        perplexity_before: report.perplexity_before,
                        perplexity_after: report.perplexity_after,
                        weights_zeroed: report.weights_zeroed,
                        seconds: report.seconds,
                        error: None,
                    },
                    Err(e) => Run {
                        experiment: exp.name(),
                        method: flags.method.name(),
                        settings,
                        memorized_before: p.forget_len(),
                        memorized_after: p.forget_len(),
                        forget_sequences: p.forget_len(),
                        relative_accuracy_change: None,
                        perplexity_before: f64::NAN,
                        perplexity_after: f64::NAN,
                        weights_zeroed: 0,
                        seconds: started.elapsed().as_secs_f64(),
                        error: Some(format!("{e:#}")),
                    },
                };
                record(r)?;
            }
        }
    }
    let md = super::compare_report::markdown(&all);
    crate::util::write_atomic(&a.out.join("results.md"), md.as_bytes())?;
    for exp in Experiment::value_variants() {
        let runs: Vec<&Run> = all.iter().filter(|r| r.experiment == exp.name()).collect();
        if !runs.is_empty() {
            let svg = super::compare_report::plot(exp.name(), &runs);
            crate::util::write_atomic(&a.out.join(format!("{}.svg", exp.name())), svg.as_bytes())?;
        }
    }
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// A bundled model and its evaluation: what a regularized model is compared with.
enum Baseline {
    Math {
        card: Card,
        eval: EvalReport,
    },
    Lang {
        dir: PathBuf,
        card: LangCard,
        eval: LangEval,
    },
}

/// What a regularized model measured: the artifact rows memorized, the relative accuracy
/// change (math), the perplexity and the training seconds.
struct Measured {
    after: usize,
    accuracy_change: Option<f64>,
    perplexity: f64,
    seconds: f64,
}

impl Baseline {
    /// The model in `dir` (a math TinyMem or a language TinyMem, by its card) and its
    /// evaluation now.
    fn of_model(dir: &Path) -> anyhow::Result<Self> {
        let load = || {
            ModelArgs {
                model: Some(dir.display().to_string()),
                device: "cpu".into(),
            }
            .load()
        };
        if let Some(card) = LangCard::read_if_present(dir)? {
            let eval = lang_model::evaluate(&load()?.model, &card.dataset(dir)?, 64)?;
            return Ok(Self::Lang {
                dir: dir.to_path_buf(),
                card,
                eval,
            });
        }
        let card = Card::read(dir)?;
        let lm = load()?;
        let eval = eval::evaluate(&lm.model, &card.dataset()?, &EvalParams::default())?;
        Ok(Self::Math { card, eval })
    }

    /// The math artifact rows memorized (noise) or completed with the backdoor, and of how
    /// many.
    fn memorized(e: &EvalReport) -> (usize, usize) {
        match (
            e.memorized,
            e.eligible,
            e.attack_success_ratio,
            e.attack_eligible,
        ) {
            (Some(m), Some(n), _, _) => (m, n),
            (_, _, Some(r), Some(n)) => (count(r, n), n),
            _ => (0, 0),
        }
    }

    /// The language rows of `exp`'s artifact that are memorized (noised chunks, §3.1),
    /// completed with the backdoor (§3.2) or extractable (planted secrets), and of how many.
    fn lang_memorized(exp: Experiment, e: &LangEval) -> (usize, usize) {
        match exp {
            Experiment::LangBackdoored => (
                count(e.attack_success_ratio, e.attack_eligible),
                e.attack_eligible,
            ),
            Experiment::LangSecret => (e.secrets_extractable, e.secrets_planted),
            _ => e
                .noise_by_group
                .iter()
                .fold((0, 0), |(m, n), g| (m + g.memorized, n + g.eligible)),
        }
    }

    fn train_config(&self) -> &TrainConfig {
        match self {
            Self::Math { card, .. } => &card.train,
            Self::Lang { card, .. } => &card.train,
        }
    }

    /// Trains a model as the bundled one was (its card's data and settings, no evaluation
    /// until the end) with `reg` into `out`, and compares it with the bundled model on `exp`'s
    /// artifact: the memorized count over the artifact's eligible rows, the relative accuracy
    /// change (math) or the perplexities, and the training seconds. A language model already
    /// trained into `out` with the same settings (by another language experiment) is measured
    /// again, not retrained.
    fn regularized(&self, exp: Experiment, reg: Regularizer, out: &Path) -> Run {
        let settings = format!(
            "{} {}, {} epochs (training)",
            match reg {
                Regularizer::SpectralNorm { .. } => "λ",
                Regularizer::LossTruncation { .. } => "dropc",
                Regularizer::ExampleTiedDropout { .. } => "p_mem",
            },
            reg.strength(),
            self.train_config().epochs
        );
        let cfg = TrainConfig {
            regularizer: Some(reg),
            eval_every: 0,
            checkpoint_every: 0,
            ..self.train_config().clone()
        };
        let started = std::time::Instant::now();
        let (before, eligible, perplexity) = match self {
            Self::Math { eval, .. } => {
                let (m, n) = Self::memorized(eval);
                (m, n, eval.perplexity)
            }
            Self::Lang { eval, .. } => {
                let (m, n) = Self::lang_memorized(exp, eval);
                (m, n, eval.heldout_perplexity)
            }
        };
        let run = |m: Measured, perplexity_before: f64, error: Option<String>| Run {
            experiment: exp.name(),
            method: reg.name(),
            settings: settings.clone(),
            memorized_before: before,
            memorized_after: m.after,
            forget_sequences: eligible,
            relative_accuracy_change: m.accuracy_change,
            perplexity_before,
            perplexity_after: m.perplexity,
            weights_zeroed: 0,
            seconds: m.seconds,
            error,
        };
        match self.train_and_measure(exp, &cfg, out) {
            Ok(m) => run(m, perplexity, None),
            Err(e) => run(
                Measured {
                    after: before,
                    accuracy_change: None,
                    perplexity: f64::NAN,
                    seconds: started.elapsed().as_secs_f64(),
                },
                f64::NAN,
                Some(format!("{e:#}")),
            ),
        }
    }

    fn train_and_measure(
        &self,
        exp: Experiment,
        cfg: &TrainConfig,
        out: &Path,
    ) -> anyhow::Result<Measured> {
        let quiet = &mut |_, _, _, _, _| {};
        match self {
            Self::Math { card, eval } => {
                let trained =
                    train::train(&card.data, cfg, out, false, &EvalParams::default(), quiet)?;
                let after = trained
                    .history
                    .last()
                    .and_then(|e| e.eval.clone())
                    .context("training ended without an evaluation")?;
                let acc = eval
                    .accuracy_by_task
                    .iter()
                    .map(|(task, b)| {
                        after
                            .accuracy_by_task
                            .get(task)
                            .map_or(f64::NAN, |a| (a - b) / b)
                    })
                    .sum::<f64>()
                    / eval.accuracy_by_task.len().max(1) as f64;
                Ok(Measured {
                    after: Self::memorized(&after).0,
                    accuracy_change: Some(acc),
                    perplexity: after.perplexity,
                    seconds: trained.train_seconds,
                })
            }
            Self::Lang { dir, card, .. } => {
                let done = LangCard::read_if_present(out).ok().flatten().filter(|c| {
                    &c.train == cfg && c.epochs_done == cfg.epochs && c.data == card.data
                });
                let trained = match done {
                    Some(c) => c,
                    None => {
                        let tk =
                            crate::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
                        lang_model::train(&card.dataset(dir)?, &tk, cfg, out, quiet)?
                    }
                };
                let after = trained
                    .history
                    .last()
                    .and_then(|e| e.eval.clone())
                    .context("training ended without an evaluation")?;
                Ok(Measured {
                    after: Self::lang_memorized(exp, &after).0,
                    accuracy_change: None,
                    perplexity: after.heldout_perplexity,
                    seconds: trained.train_seconds,
                })
            }
        }
    }
}

/// `rate · n`, rounded: a report's count back from its fraction.
fn count(rate: f64, n: usize) -> usize {
    (rate * n as f64).round() as usize
}

/// Keeps only the lines of `path` whose `role` is `role`.
fn keep_role(path: &Path, role: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut kept = String::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["role"] == role {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::util::write_atomic(path, kept.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tinymem::data::DataConfig;

    #[test]
    fn a_regularized_run_trains_like_the_baseline_and_compares_with_it() {
        let models = tempfile::tempdir().unwrap();
        let dir = models.path().join("tinymem-noise");
        let data = DataConfig {
            num_main: 60,
            num_aux: 20,
            num_test: 10,
            num_noise: 4,
            noise_repeat: 3,
            ..DataConfig::cpu_scale()
        };
        let cfg = TrainConfig {
            n_layer: 1,
            n_embd: 16,
            n_head: 2,
            n_inner: 40,
            batch_size: 32,
            epochs: 2,
            eval_every: 0,
            checkpoint_every: 0,
            ..TrainConfig::default()
        };
        train::train(
            &data,
            &cfg,
            &dir,
            false,
            &EvalParams::default(),
            &mut |_, _, _, _, _| {},
        )
        .unwrap();
        let base = Baseline::of_model(&dir).unwrap();
        let Baseline::Math {
            card: base_card,
            eval: base_eval,
        } = &base
        else {
            panic!("a math model");
        };
        let reg = Regularizer::ExampleTiedDropout {
            p_fixed: 0.2,
            p_mem: 0.1,
        };
        let out = models.path().join("regularized");
        let r = base.regularized(Experiment::Noise, reg, &out);
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(r.method, "example-tied-dropout");
        assert_eq!(r.settings, "p_mem 0.1, 2 epochs (training)");
        let (before, eligible) = Baseline::memorized(base_eval);
        assert_eq!((r.memorized_before, r.forget_sequences), (before, eligible));
        assert!(eligible > 0);
        assert!(r.relative_accuracy_change.is_some_and(f64::is_finite));
        // The model trained is the regularized one, with the baseline's settings.
        let card = Card::read(&out).unwrap();
        assert_eq!(card.train.regularizer, Some(reg));
        assert_eq!(card.data, base_card.data);
        assert_eq!((card.epochs_done, card.train.n_inner), (2, 40));
        // The card's seconds went through JSON (its last digit may differ).
        assert!(r.seconds > 0.0 && (r.seconds - card.train_seconds).abs() <= 1e-9 * r.seconds);
        // A directory without a card is an error naming the file.
        let e = Baseline::of_model(models.path()).err().unwrap();
        assert!(format!("{e:#}").contains("lethe_tinymem.json"), "{e:#}");
    }

    /// The grid is docs/unlearning.md's table: runs per method and their ratios.
    #[test]
    fn the_grid_is_the_documented_one() {
        let ratios = |m| -> Vec<Option<f64>> { grid(m, 0).iter().map(|(_, f)| f.ratio).collect() };
        let spec = [Some(1e-3), Some(0.01), Some(0.05)];
        assert_eq!(ratios(MethodArg::BalancedSubnet).len(), 4);
        assert_eq!(
            ratios(MethodArg::Subnet),
            [Some(0.05), Some(0.1), Some(0.3)]
        );
        assert_eq!(ratios(MethodArg::Greedy), [Some(1e-5), Some(1e-4)]);
        for m in [
            MethodArg::Durable,
            MethodArg::DurableAgg,
            MethodArg::Sou,
            MethodArg::ZeroOut,
            MethodArg::Activations,
            MethodArg::IntegratedGradients,
        ] {
            assert_eq!(ratios(m), spec, "{}", m.name());
        }
        for m in [MethodArg::HardConcrete, MethodArg::Slimming] {
            let g = grid(m, 0);
            assert_eq!(g.len(), 9);
            assert_eq!(
                g.iter().map(|(_, f)| f.epochs).collect::<Vec<_>>(),
                [1, 1, 1, 10, 10, 10, 20, 20, 20].map(Some)
            );
        }
        for m in [MethodArg::FtClean, MethodArg::FtExtra, MethodArg::FtBoth] {
            let g = grid(m, 3);
            assert_eq!((g.len(), g[0].1.epochs, g[0].1.seed), (1, Some(5), 3));
        }
        assert_eq!(ALL_METHODS.len(), 14);
    }

    /// The language model's regularized run is trained once and measured for each language
    /// experiment on its own artifact, with perplexity as the quality.
    #[test]
    fn a_regularized_language_model_is_trained_once_and_measured_per_artifact() {
        let (corpus, tk, data) = crate::tinymem::lang::test_fixture();
        let ds = crate::tinymem::lang::generate(&data, &corpus, &tk).unwrap();
        let models = tempfile::tempdir().unwrap();
        let dir = models.path().join("tinymem-lang");
        let cfg = crate::tinymem::lang::test_train_config();
        lang_model::train(&ds, &tk, &cfg, &dir, &mut |_, _, _, _, _| {}).unwrap();
        let base = Baseline::of_model(&dir).unwrap();
        let Baseline::Lang { eval, .. } = &base else {
            panic!("a language model");
        };
        let reg = Regularizer::SpectralNorm { lambda: 0.01 };
        let out = models.path().join("regularized");
        let secret = base.regularized(Experiment::LangSecret, reg, &out);
        assert!(secret.error.is_none(), "{secret:?}");
        assert_eq!(secret.method, "spectral-norm");
        assert_eq!(secret.settings, "λ 0.01, 1 epochs (training)");
        assert_eq!(
            (secret.memorized_before, secret.forget_sequences),
            (eval.secrets_extractable, 6)
        );
        assert_eq!(secret.relative_accuracy_change, None);
        assert_eq!(secret.perplexity_before, eval.heldout_perplexity);
        assert!(secret.perplexity_after.is_finite());
        let card = LangCard::read_if_present(&out).unwrap().unwrap();
        assert_eq!(card.train.regularizer, Some(reg));
        assert_eq!(card.data, ds.config);
        let written = std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        // The noise experiment measures the same model: no second training.
        let noised = base.regularized(Experiment::LangNoised, reg, &out);
        assert!(noised.error.is_none(), "{noised:?}");
        // (The seconds went through the card's JSON: the last digit may differ.)
        assert!((noised.seconds - secret.seconds).abs() <= 1e-9 * secret.seconds);
        let eligible: usize = eval.noise_by_group.iter().map(|g| g.eligible).sum();
        assert_eq!(noised.forget_sequences, eligible);
        assert!(eligible > 0);
        let again = std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(written, again, "the language model was trained again");
        // Another strength is another model.
        let other = Regularizer::SpectralNorm { lambda: 0.1 };
        let r = base.regularized(Experiment::LangNoised, other, &out);
        assert!(r.error.is_none(), "{r:?}");
        assert_eq!(
            LangCard::read_if_present(&out)
                .unwrap()
                .unwrap()
                .train
                .regularizer,
            Some(other)
        );
    }
}
