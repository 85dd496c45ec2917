//! `lethe tinymem …`: generate the math data, train models, evaluate them, and list the
//! sequences a model has memorized.
//!
//! Invariants:
//! - Data flags start from a preset (`--preset cpu` unless given), and the data and training
//!   settings are validated before any file is written; a bad value is refused with an error
//!   naming the setting.
//! - `tinymem data --model DIR` writes exactly the data the model in DIR was trained on,
//!   regenerated from its card.
//! - `tinymem eval` and `tinymem audit` refuse a directory without a TinyMem card and print
//!   their result as JSON on stdout.
//! - `tinymem audit --out` writes the memorized rows as JSONL that `lethe unlearn --forget`
//!   reads: a noise row as it is, a backdoor row as a prompt/target pair cut at its own trigger
//!   plus the whole row to train on.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use super::data::{self, Artifact, DataConfig, Family};
use super::eval::{self, EvalParams};
use super::lang::cli::{self as lang_cli, LangFlags};
use super::lang::model as lang_model;
use super::lang::LangCard;
use super::regularize::Regularizer;
use super::train::{self, Card, TrainConfig};
use crate::loader::ModelArgs;

#[derive(Debug, Subcommand)]
pub enum TinymemCommand {
    /// Write the math dataset as JSONL (one row per line after a header line).
    Data(DataArgs),
    /// Train a TinyMem model into an HF-format directory.
    Train(TrainArgs),
    /// Evaluate a TinyMem model on the data it was trained on (spec §3).
    Eval(EvalArgs),
    /// Find the sequences a TinyMem model has memorized (the paper's forget set).
    Audit(AuditArgs),
    /// Train the language TinyMem's byte-level BPE tokenizer on a text corpus
    /// (`scripts/corpus/fetch` writes the default one) and write its `tokenizer.json`.
    Tokenizer(TokenizerArgs),
}

#[derive(Debug, Args)]
pub struct TokenizerArgs {
    /// UTF-8 text to train on, one document per blank-line-separated paragraph.
    #[arg(long, default_value = "target/corpus/python-docs.txt")]
    pub corpus: PathBuf,
    /// Most vocabulary entries (special tokens and the 256 bytes included).
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Output `tokenizer.json`.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Preset {
    /// The paper's sizes (20000 main sequences, 3000 per auxiliary task, 1000 noised).
    Paper,
    /// Scaled for 2 CPU cores (2000 main, 500 per auxiliary task, 100 noised rows × 10).
    Cpu,
}

/// Data flags; unset ones come from the preset.
#[derive(Debug, Args, Clone)]
pub struct DataFlags {
    /// Starting point for every data setting.
    #[arg(long, value_enum, default_value = "cpu")]
    pub preset: Preset,
    /// additive or multiplicative.
    #[arg(long)]
    pub family: Option<Family>,
    /// noise or backdoor.
    #[arg(long)]
    pub artifact: Option<Artifact>,
    #[arg(long)]
    pub num_main: Option<usize>,
    #[arg(long)]
    pub num_aux: Option<usize>,
    #[arg(long)]
    pub num_test: Option<usize>,
    #[arg(long)]
    pub num_noise: Option<usize>,
    /// Times each artifact row is repeated in training.
    #[arg(long)]
    pub noise_repeat: Option<u32>,
    /// Data seed.
    #[arg(long)]
    pub data_seed: Option<u64>,
}

impl DataFlags {
    pub fn config(&self) -> anyhow::Result<DataConfig> {
        let mut c = match self.preset {
            Preset::Paper => DataConfig::default(),
            Preset::Cpu => DataConfig::cpu_scale(),
        };
        if let Some(v) = self.family {
            c.family = v;
        }
        if let Some(v) = self.artifact {
            c.artifact = v;
        }
        if let Some(v) = self.num_main {
            c.num_main = v;
        }
        if let Some(v) = self.num_aux {
            c.num_aux = v;
        }
        if let Some(v) = self.num_test {
            c.num_test = v;
        }
        if let Some(v) = self.num_noise {
            c.num_noise = v;
        }
        if let Some(v) = self.noise_repeat {
            c.noise_repeat = v;
        }
        if let Some(v) = self.data_seed {
            c.seed = v;
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Debug, Args)]
pub struct DataArgs {
    /// Regenerate exactly the data this model was trained on (its card records the flags).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub data: DataFlags,
    #[command(flatten)]
    pub lang: LangFlags,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataFlags,
    #[command(flatten)]
    pub lang: LangFlags,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 128)]
    pub n_embd: usize,
    #[arg(long, default_value_t = 4)]
    pub n_head: usize,
    #[arg(long, default_value_t = 512)]
    pub n_inner: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.98)]
    pub beta2: f64,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Initialisation and shuffling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate every N epochs (0: only at the end).
    #[arg(long, default_value_t = 1)]
    pub eval_every: usize,
    /// Checkpoint every N epochs (0: only at the end).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_every: usize,
    #[command(flatten)]
    pub regularizer: RegularizerFlags,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// Training-time regularizers (spec §4.7), at most one per run.
#[derive(Debug, Clone, Args)]
pub struct RegularizerFlags {
    /// Spectral-norm regularization with this λ: (λ/2)·Σσ_max over the weight matrices (the
    /// paper's grid: 0.001, 0.01, 0.1).
    #[arg(long, value_name = "LAMBDA", conflicts_with_all = ["loss_truncation", "example_tied_dropout"])]
    pub spectral_norm: Option<f64>,
    /// Loss truncation: drop samples at or above the (1 − DROPC) loss percentile (the paper's
    /// grid: 0.01, 0.05, 0.1).
    #[arg(long, value_name = "DROPC", conflicts_with = "example_tied_dropout")]
    pub loss_truncation: Option<f64>,
    /// Samples in loss truncation's buffer, and how often its percentile is recomputed.
    #[arg(long, default_value_t = 10_000, requires = "loss_truncation")]
    pub truncation_window: usize,
    /// Example-tied dropout: per-example masks over the MLP neurons.
    #[arg(long)]
    pub example_tied_dropout: bool,
    /// Example-tied dropout's always-on ("generalization") share of the neurons.
    #[arg(long, default_value_t = 0.2, requires = "example_tied_dropout")]
    pub p_fixed: f64,
    /// Example-tied dropout's per-example share of the other ("memorization") neurons.
    #[arg(long, default_value_t = 0.1, requires = "example_tied_dropout")]
    pub p_mem: f64,
}

impl RegularizerFlags {
    pub fn regularizer(&self) -> Option<Regularizer> {
        if let Some(lambda) = self.spectral_norm {
            Some(Regularizer::SpectralNorm { lambda })
        } else if let Some(dropc) = self.loss_truncation {
            Some(Regularizer::LossTruncation {
                dropc,
                window: self.truncation_window,
            })
        } else {
            self.example_tied_dropout
                .then_some(Regularizer::ExampleTiedDropout {
                    p_fixed: self.p_fixed,
                    p_mem: self.p_mem,
                })
        }
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: TinymemCommand) -> anyhow::Result<()> {
    match cmd {
        TinymemCommand::Data(a) => data_cmd(a),
        TinymemCommand::Train(a) => train_cmd(a),
        TinymemCommand::Eval(a) => eval_cmd(a),
        TinymemCommand::Audit(a) => audit_cmd(a),
        TinymemCommand::Tokenizer(a) => tokenizer_cmd(a),
    }
}

fn tokenizer_cmd(a: TokenizerArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.corpus).with_context(|| {
        format!(
            "reading --corpus {} (scripts/corpus/fetch writes the default one)",
            a.corpus.display()
        )
    })?;
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .collect();
    anyhow::ensure!(
        !paragraphs.is_empty(),
        "--corpus {} has no text",
        a.corpus.display()
    );
    let t0 = std::time::Instant::now();
    let tk = lang_cli::train_tokenizer(&text, a.vocab_size)?;
    tk.save(&a.out)?;
    let tokens: usize = paragraphs
        .iter()
        .map(|p| tk.encode(p).map(|ids| ids.len()))
        .sum::<crate::Result<usize>>()?;
    eprintln!(
        "wrote {} ({} entries) in {:.1} s: {} bytes of text -> {tokens} tokens ({:.2} bytes per token)",
        a.out.display(),
        tk.vocab_size(),
        t0.elapsed().as_secs_f64(),
        text.len(),
        text.len() as f64 / tokens.max(1) as f64
    );
    Ok(())
}

fn data_cmd(a: DataArgs) -> anyhow::Result<()> {
    if let Some(m) = &a.model {
        let dir = crate::loader::resolve(m)?;
        if let Some(card) = LangCard::read_if_present(&dir)? {
            return lang_cli::write_data(&card.dataset(&dir)?, &a.out);
        }
    }
    if a.lang.language {
        lang_cli::refuse_math_flags(&a.data)?;
        return lang_cli::write_data(&a.lang.dataset(a.data.data_seed)?.0, &a.out);
    }
    a.lang.refuse_without_language()?;
    let ds = match &a.model {
        Some(m) => {
            let dir = crate::loader::resolve(m)?;
            Card::read(&dir)?.dataset()?
        }
        None => data::generate(&a.data.config()?)?,
    };
    // Written whole, then renamed into place: a reader never sees half a dataset.
    let mut w = Vec::new();
    ds.write_jsonl(&mut w)?;
    crate::util::write_atomic(&a.out, &w)?;
    eprintln!("wrote {} rows to {}", ds.rows.len(), a.out.display());
    Ok(())
}

fn train_cmd(a: TrainArgs) -> anyhow::Result<()> {
    let cfg = TrainConfig {
        n_layer: a.layers,
        n_embd: a.n_embd,
        n_head: a.n_head,
        n_inner: a.n_inner,
        lr: a.lr,
        weight_decay: a.weight_decay,
        beta1: a.beta1,
        beta2: a.beta2,
        eps: 1e-8,
        batch_size: a.batch_size,
        epochs: a.epochs,
        seed: a.seed,
        eval_every: a.eval_every,
        checkpoint_every: a.checkpoint_every,
        regularizer: a.regularizer.regularizer(),
    };
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
            )?
            .progress_chars("=> "),
        );
        b
    };
    let mut progress = |epoch: usize, step: usize, steps: usize, loss: f64, tps: f64| {
        if bar.length() != Some(steps as u64) {
            bar.set_length(steps as u64);
        }
        bar.set_prefix(format!("{}/{}", epoch + 1, a.epochs));
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4} {tps:.0} tok/s"));
    };
    if a.lang.language {
        lang_cli::refuse_math_flags(&a.data)?;
        lang_cli::check_train_out(&a.out, a.resume)?;
        let (ds, tk) = a.lang.dataset(a.data.data_seed)?;
        let card = super::lang::model::train(&ds, &tk, &cfg, &a.out, &mut progress)?;
        bar.finish_and_clear();
        for e in &card.history {
            let ev = e.eval.as_ref().map_or(String::new(), |r| {
                format!(
                    " noise {:.3} backdoor {:.3} secrets {}/{} held-out perplexity {:.2}",
                    r.noise_memorized_ratio,
                    r.attack_success_ratio,
                    r.secrets_extractable,
                    r.secrets_planted,
                    r.heldout_perplexity
                )
            });
            eprintln!(
                "epoch {:>4} loss {:.4} {:>6.1}s {:>7.0} tok/s{ev}",
                e.epoch, e.loss, e.seconds, e.tokens_per_second
            );
        }
        eprintln!("language model written to {}", a.out.display());
        return Ok(());
    }
    a.lang.refuse_without_language()?;
    let data_cfg = a.data.config()?;
    let card = train::train(
        &data_cfg,
        &cfg,
        &a.out,
        a.resume,
        &EvalParams::default(),
        &mut progress,
    )?;
    bar.finish_and_clear();
    for e in &card.history {
        let ev = e.eval.as_ref().map_or(String::new(), |r| {
            format!(
                " memorized {} accuracy {:.4} perplexity {:.4}",
                r.memorized_ratio
                    .or(r.attack_success_ratio)
                    .map_or("-".into(), |m| format!("{:.3}", m)),
                r.accuracy,
                r.perplexity
            )
        });
        eprintln!(
            "epoch {:>4} loss {:.4} {:>6.1}s {:>7.0} tok/s{ev}",
            e.epoch, e.loss, e.seconds, e.tokens_per_second
        );
    }
    eprintln!(
        "model written to {} ({:.1}s of training)",
        a.out.display(),
        card.train_seconds
    );
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    if let Some(card) = LangCard::read_if_present(&lm.dir)? {
        let ds = card.dataset(&lm.dir)?;
        return print_json(&lang_model::evaluate(&lm.model, &ds, a.batch_size)?, a.json);
    }
    let card = Card::read(&lm.dir)
        .with_context(|| format!("{} is not a TinyMem model directory", lm.dir.display()))?;
    let ds = card.dataset()?;
    let params = EvalParams {
        batch_size: a.batch_size,
        ..EvalParams::default()
    };
    print_json(&eval::evaluate(&lm.model, &ds, &params)?, a.json)
}

/// Prints `v` as JSON on stdout: one line with `compact`, indented otherwise.
fn print_json(v: &impl serde::Serialize, compact: bool) -> anyhow::Result<()> {
    if compact {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Write the memorized rows (the forget set) here as TinyMem JSONL rows.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Finds the memorized set of a TinyMem model: noised rows it regurgitates (noise models) or
/// held-out triggered rows it completes with the backdoor (backdoor models).
fn audit_cmd(a: AuditArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    println!("{}", memorized_set(&lm, a.batch_size, a.out.as_deref())?);
    Ok(())
}

/// The memorized set of a TinyMem model (math or language) and, with `out`, its rows written
/// there as the JSONL forget set `lethe unlearn --forget` reads; returns the audit's summary.
pub fn memorized_set(
    lm: &crate::loader::LoadedModel,
    batch_size: usize,
    out: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    if let Some(card) = LangCard::read_if_present(&lm.dir)? {
        return lang_cli::audit(lm, &card, batch_size, out);
    }
    let card = Card::read(&lm.dir)
        .with_context(|| format!("{} is not a TinyMem model directory", lm.dir.display()))?;
    let ds = card.dataset()?;
    let params = EvalParams {
        batch_size,
        ..EvalParams::default()
    };
    let (rows, m) = match ds.config.artifact {
        Artifact::Noise => {
            let rows = ds.noised_rows();
            let m = eval::memorization(&lm.model, &rows, &params)?;
            (rows, m)
        }
        Artifact::Backdoor => {
            let rows = ds.backdoor_test_rows();
            let m = eval::attack_success(&lm.model, &rows, &ds.config.trigger_ids()?, &params)?;
            (rows, m)
        }
    };
    if let Some(out) = out {
        // Written whole, then renamed into place (as `data`).
        let mut w = Vec::new();
        let trigger = match ds.config.artifact {
            Artifact::Backdoor => Some(ds.config.trigger_ids()?),
            Artifact::Noise => None,
        };
        for &i in &m.memorized_rows {
            let row = rows[i];
            match (&trigger, &row.clean_ids) {
                // A backdoor row's prompt ends at its own trigger (spec §3.2), so it is written
                // as an explicit prompt/target pair plus the whole row to train on.
                (Some(t), Some(clean)) => {
                    let p = super::data::trigger_end(clean, t).unwrap_or(params.prompt_len);
                    let end = (p + params.compare_len).min(row.ids.len());
                    let line = serde_json::json!({
                        "ids": row.ids,
                        "prompt_ids": &clean[..p],
                        "target_ids": &row.ids[p..end],
                    });
                    writeln!(w, "{line}")?;
                }
                _ => writeln!(w, "{}", serde_json::to_string(row)?)?,
            }
        }
        crate::util::write_atomic(out, &w)?;
    }
    Ok(serde_json::json!({
        "artifact": ds.config.artifact,
        "eligible": m.eligible,
        "memorized": m.memorized,
        "ratio": m.ratio,
        "clean_continuation": m.clean_continuation,
    }))
}
