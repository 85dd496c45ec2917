//! The `lethe` command line: argument definitions and the commands they run.
//!
//! Invariants:
//! - `--threads`, the model-loading flags (`--model`, `--device`), `lethe generate
//!   --max-tokens` and every `lethe serve` flag can also be set through a `LETHE_…` environment
//!   variable (`docs/operations.md` lists the server's); the other flags are command-line only.
//! - Commands print their results on stdout (JSON where asked, `--json`) and log to stderr; a
//!   failing command returns its error, which the binary prints to stderr before exiting
//!   non-zero.
//! - `lethe score` checks every line (UTF-8, at least 2 tokens, within the context length)
//!   before scoring any, naming the file and line of a bad one.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::engine::{self, GenerateRequest, SamplingParams};
use crate::loader::ModelArgs;
use crate::runtime;

mod bench;
mod finetune;

/// lethe: serve a language model and make it forget memorized sequences.
#[derive(Debug, Parser)]
#[command(name = "lethe", version, about)]
pub struct Cli {
    /// Compute threads (default: the CPUs this process may use; 0: leave candle's and rayon's
    /// own defaults, for comparison).
    #[arg(long, global = true, env = "LETHE_THREADS")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the model over HTTP (OpenAI-compatible completions, audits, metrics).
    Serve(Box<crate::server::ServeArgs>),
    /// Continue a prompt.
    Generate(GenerateArgs),
    /// Per-line mean negative log-likelihood and perplexity of a text file.
    Score(ScoreArgs),
    /// Print a model's architecture, size, dtype and context length.
    Inspect(InspectArgs),
    /// Audit sequences for verbatim regurgitation ((k, n)-extractable memorization).
    Audit(crate::audit::cli::AuditArgs),
    /// Remove memorized sequences from a model's weights (BalancedSubnet and the paper's other
    /// unlearning methods).
    Unlearn(crate::unlearn::cli::UnlearnArgs),
    /// Fine-tune a checkpoint on JSONL rows (e.g. to make a model that regurgitates them).
    Finetune(finetune::FinetuneArgs),
    /// TinyMem: data, training, evaluation, the paper's comparison.
    #[command(subcommand)]
    Tinymem(TinymemCli),
    /// Benchmarks (run by hand; results go to docs/benchmarks.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 32, env = "LETHE_MAX_TOKENS")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sampling seed (same seed, same output).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Never generate the EOS token.
    #[arg(long)]
    pub ban_eos: bool,
    /// Print a JSON object instead of plain text.
    #[arg(long)]
    pub json: bool,
    /// The prompt text.
    pub prompt: String,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object per line (otherwise a table).
    #[arg(long)]
    pub json: bool,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Text file; each line is one sequence ("-" for stdin).
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the parsed command line.
/// `lethe tinymem …`: the TinyMem commands, and `compare`, which runs the unlearning methods
/// (a layer above `tinymem`).
// Parsed once per process: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum TinymemCli {
    #[command(flatten)]
    Other(crate::tinymem::cli::TinymemCommand),
    /// Run every unlearning method over the spec's grid on the bundled models and write the
    /// comparison (tables and plots) to a directory.
    Compare(crate::unlearn::compare::CompareArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    runtime::configure_threads(cli.threads);
    match cli.command {
        Command::Serve(a) => crate::server::run(*a),
        Command::Generate(a) => generate(a),
        Command::Score(a) => score(a),
        Command::Inspect(a) => inspect(a),
        Command::Audit(a) => crate::audit::cli::run(a),
        Command::Unlearn(a) => crate::unlearn::cli::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Tinymem(TinymemCli::Compare(a)) => crate::unlearn::compare::run(a),
        Command::Tinymem(TinymemCli::Other(t)) => crate::tinymem::cli::run(t),
        Command::Bench(b) => bench::run(b),
    }
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    let prompt = lm.tokenizer.encode(&a.prompt)?;
    let mut req = GenerateRequest::greedy(prompt.clone(), a.max_tokens);
    req.sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    req.stop = a.stop;
    if a.ban_eos {
        req.banned_ids.extend(lm.model.spec().eos_token_id);
    }
    let out = engine::generate(&lm.model, Some(&lm.tokenizer), &[req])?.remove(0);
    let text = out.text.clone().unwrap_or_default();
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    if a.json {
        let v = serde_json::json!({
            "prompt": a.prompt,
            "prompt_tokens": prompt.len(),
            "text": text,
            "tokens": out.tokens,
            "finish_reason": out.finish_reason.as_str(),
        });
        writeln!(w, "{v}")?;
    } else {
        writeln!(w, "{}{}", a.prompt, text)?;
    }
    Ok(())
}

fn score(a: ScoreArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    let reader: Box<dyn BufRead> = if a.file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(&a.file)
            .with_context(|| format!("opening {}", a.file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut seqs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| {
            format!(
                "{}: line {} is not valid UTF-8 text",
                a.file.display(),
                i + 1
            )
        })?;
        let line = line.strip_suffix('\r').unwrap_or(&line);
        let ids = lm.tokenizer.encode(line)?;
        if ids.len() < 2 {
            bail!(
                "{}: line {} has {} token(s); scoring needs at least 2",
                a.file.display(),
                i + 1,
                ids.len()
            );
        }
        let ctx = lm.model.spec().context_length;
        if ids.len() > ctx {
            bail!(
                "{}: line {} has {} tokens, more than the model's context length {ctx}",
                a.file.display(),
                i + 1,
                ids.len()
            );
        }
        seqs.push(ids);
    }
    let scores = engine::score(&lm.model, &seqs, a.batch_size)?;
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    if !a.json {
        writeln!(
            w,
            "{:>6} {:>7} {:>10} {:>12}",
            "line", "tokens", "nll", "perplexity"
        )?;
    }
    for (i, s) in scores.iter().enumerate() {
        if a.json {
            let v = serde_json::json!({"line": i + 1, "tokens": s.tokens, "nll": s.nll, "perplexity": s.perplexity});
            writeln!(w, "{v}")?;
        } else {
            writeln!(
                w,
                "{:>6} {:>7} {:>10.5} {:>12.4}",
                i + 1,
                s.tokens,
                s.nll,
                s.perplexity
            )?;
        }
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    let spec = lm.model.spec();
    let v = serde_json::json!({
        "source": lm.source,
        "dir": lm.dir.display().to_string(),
        "architecture": spec.architecture.model_type(),
        "parameters": lm.model.num_parameters(),
        "stored_dtype": lm.stored_dtype,
        "compute_dtype": format!("{:?}", lm.model.dtype()).to_lowercase(),
        "context_length": spec.context_length,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "heads": spec.num_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "tokenizer_vocab_size": lm.tokenizer.vocab_size(),
        "eos_token_id": spec.eos_token_id,
    });
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    if a.json {
        writeln!(w, "{v}")?;
    } else {
        for (k, val) in v.as_object().into_iter().flatten() {
            writeln!(w, "{k:>22}: {}", val.to_string().trim_matches('"'))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    /// A benchmark asked for zero runs, steps or requests is refused by the parser with a
    /// message naming the flag, instead of panicking on an empty median later.
    #[test]
    fn zero_runs_steps_or_requests_are_refused() {
        for line in [
            "bench unlearn --steps 0",
            "bench decode --runs 0",
            "bench audit --runs 0",
            "bench train --steps 0",
            "bench takedowns --requests 0",
        ] {
            let args = std::iter::once("lethe").chain(line.split_whitespace());
            let e = Cli::try_parse_from(args).expect_err(line).to_string();
            assert!(e.contains("at least 1"), "{line}: {e}");
        }
    }

    /// Every `lethe` command line that `bench/gpu_check.sh` runs parses (the script cannot be run
    /// without a GPU, so its flags are pinned here).
    #[test]
    fn the_gpu_check_command_lines_parse() {
        let lines = [
            "bench decode --device cuda:0 --shape tinymem --runs 3",
            "bench decode --device cuda:0 --shape tinymem --batch 16 --runs 3",
            "bench decode --device cuda:0 --shape pythia70m --batch 8 --runs 3",
            "bench decode --device cpu --shape tinymem --runs 3",
            "bench unlearn --device cuda:0 --steps 10 --warmup 2",
            "bench unlearn --device cpu --steps 5 --warmup 1",
            "bench audit --device cuda:0 --runs 2",
            "bench train --device cuda:0 --steps 2",
            "serve --bind 127.0.0.1:18080 --data-dir d --device cuda:0",
            "serve --bind 0.0.0.0:8080 --data-dir /var/lib/lethe --device cuda:0",
            "tinymem audit --device cuda:0 --out f.jsonl",
            "unlearn --device cuda:0 --forget f.jsonl --retain tinymem --method balanced-subnet \
             --mode balanced --ratio 0.3 --w 0.9 --min-steps 100 --max-steps 200 --out o",
        ];
        for line in lines {
            let argv = std::iter::once("lethe").chain(line.split_whitespace());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("`lethe {line}`: {e}");
            }
        }
    }
}
