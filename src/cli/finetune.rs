//! `lethe finetune`: trains a checkpoint on JSONL rows ([`crate::tinymem::finetune`]) and writes
//! the result as a Hugging Face directory; one JSON report on stdout, progress on stderr.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use clap::Args;

use crate::loader::ModelArgs;
use crate::tinymem::finetune::{fine_tune, FineTuneConfig};

#[derive(Debug, Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training rows: JSONL of {"text"} or {"ids"}.
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory (the source's config and tokenizer, the new `model.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per batch row; each starts at a data row, short rows are continued by others.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: FinetuneArgs) -> anyhow::Result<()> {
    let lm = a.model.load()?;
    anyhow::ensure!(
        matches!(lm.model.device(), Device::Cpu),
        "lethe finetune runs on the CPU (--device cpu)"
    );
    let rows = crate::unlearn::pipeline::read_sequences(&a.data, &lm.tokenizer)
        .with_context(|| format!("reading {}", a.data.display()))?;
    let cfg = FineTuneConfig {
        steps: a.steps,
        batch: a.batch,
        seq_len: a.seq_len,
        lr: a.lr,
        weight_decay: a.weight_decay,
        seed: a.seed,
    };
    let every = (a.steps / 20).max(1);
    let report = fine_tune(
        &lm.model,
        &lm.dir,
        &rows,
        &cfg,
        &a.out,
        |step, steps, loss| {
            if step % every == 0 || step == steps {
                eprintln!("step {step}/{steps} loss {loss:.4}");
            }
        },
    )?;
    let v = serde_json::json!({"out": a.out.display().to_string(), "rows": rows.len(), "report": report});
    writeln!(std::io::stdout().lock(), "{v}")?;
    Ok(())
}
