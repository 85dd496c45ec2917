//! `lethe bench unlearn` and `lethe bench audit`: the BalancedSubnet step and audit throughput
//! on a TinyMem-shaped model (4 layers, 128 wide, vocab 14, 150 tokens).
//!
//! Invariants:
//! - `bench unlearn` times [`step`], the step every unlearning run takes (the path it took is
//!   reported as `step_path`), on random weights with `--batch` rows, half forget and half
//!   retain: the median over `--steps` timed steps after `--warmup` untimed ones.
//! - `bench audit` times [`audit::audit`] under the `tinymem` definition (50-token prompts, 50
//!   compared) on random weights or `--model`'s: the median over `--runs` after one warm-up.
//! - The token ids are seeded, so every invocation feeds the same rows; each timed step or run
//!   ends with the device's work done.
//! - Each prints one JSON object on stdout.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use clap::Args;

use super::{at_least_one, bench_model, median, shape_config, Shape};
use crate::audit::{self, AuditItem};
use crate::optim::{Sgd, SgdParams};
use crate::unlearn::mask::Scores;
use crate::unlearn::Example;
use crate::unlearn::{step, StepWorkspace};

#[derive(Debug, Args)]
pub struct UnlearnBenchArgs {
    /// Rows per step (half forget, half retain).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tokens per row (at most the model's context).
    #[arg(long, default_value_t = 150, value_parser = at_least_one)]
    pub seq_len: usize,
    /// Blocks of the random TinyMem-shaped model (without `--shape` or `--model`).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// A random model of this shape instead of TinyMem's.
    #[arg(long, value_enum)]
    pub shape: Option<Shape>,
    /// A model directory (any supported checkpoint) instead of a random model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Fraction of each MLP matrix masked.
    #[arg(long, default_value_t = 0.3)]
    pub ratio: f64,
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Accepted for symmetry; the output is JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AuditBenchArgs {
    /// Model directory whose weights replace the random TinyMem-shaped ones.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences per audit batch.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Sequences audited per run.
    #[arg(long, default_value_t = 128)]
    pub sequences: usize,
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub runs: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Accepted for symmetry; the output is JSON.
    #[arg(long)]
    pub json: bool,
}

/// `n` rows of pseudo-random TinyMem token ids; row `r` has `len(r)` tokens.
fn rows(n: usize, len: impl Fn(usize) -> usize, seed: u64) -> Vec<Vec<u32>> {
    crate::util::token_rows(n, len, seed, 14)
}

fn tinymem(layers: usize, device: &Device) -> anyhow::Result<crate::models::Model> {
    let mut config = shape_config(Shape::Tinymem);
    if let crate::models::ModelConfig::Gpt2(c) = &mut config {
        c.n_layer = layers;
    }
    Ok(crate::models::Model::random(&config, device)?)
}

/// One BalancedSubnet step (masked forward, loss, backward, SGD on the scores), timed.
pub fn unlearn(a: UnlearnBenchArgs) -> anyhow::Result<()> {
    let device = crate::runtime::parse_device(&a.device)?;
    let (model, label) = match (&a.model, a.shape) {
        (Some(dir), _) => (
            bench_model(Shape::Tinymem, Some(dir), &device)?,
            dir.display().to_string(),
        ),
        (None, Some(shape)) => (
            bench_model(shape, None, &device)?,
            format!("{shape:?}").to_lowercase(),
        ),
        (None, None) => (
            tinymem(a.layers, &device)?,
            format!("tinymem-{}-layers", a.layers),
        ),
    };
    let spec = model.spec().clone();
    if a.seq_len > spec.context_length {
        anyhow::bail!(
            "--seq-len {} is longer than the model's context ({})",
            a.seq_len,
            spec.context_length
        );
    }
    let base = model.mlp_weights();
    let scores = Scores::init(&model, a.ratio, 0)?;
    let mut opt = Sgd::new(
        scores.all_vars(),
        SgdParams {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
        },
    );
    let data = crate::util::token_rows(a.batch, |_| a.seq_len, 1, spec.vocab_size as u64);
    let batch: Vec<Example> = data
        .iter()
        .enumerate()
        .map(|(i, ids)| Example {
            ids,
            forget: i < a.batch / 2,
        })
        .collect();
    let mut ws = StepWorkspace::default();
    let mut times = Vec::new();
    for i in 0..a.warmup + a.steps {
        let t = Instant::now();
        step(&model, &scores, &base, &batch, 0.9, &mut opt, &mut ws)?;
        // The step ends with the optimiser's asynchronous updates on a GPU; wait for them.
        device.synchronize()?;
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let v = serde_json::json!({
        "benchmark": "unlearn",
        "implementation": "lethe",
        "method": "balanced-subnet",
        "model": label,
        "layers": spec.num_layers,
        "mlp_parameters": 2 * spec.num_layers * spec.hidden_size * spec.intermediate_size,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "ratio": a.ratio,
        "device": a.device,
        "step_path": if crate::unlearn::fast_step_applies(&model, &scores) {
            "hand-written backward"
        } else {
            "autograd"
        },
        "steps": times.len(),
        "tokens_per_second": (a.batch * a.seq_len) as f64 / median(times.clone()),
        "seconds_per_step": median(times),
        "peak_rss_bytes": crate::util::peak_rss_bytes(),
        "statistic": "median over timed steps",
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    println!("{v}");
    Ok(())
}

/// Audit throughput: the `tinymem` definition (50-token prompt, 50 compared), batched.
pub fn audit_bench(a: AuditBenchArgs) -> anyhow::Result<()> {
    let device = crate::runtime::parse_device(&a.device)?;
    let model = match &a.model {
        Some(dir) => bench_model(Shape::Tinymem, Some(dir), &device)?,
        None => tinymem(4, &device)?,
    };
    let items: Vec<AuditItem> = rows(a.sequences, |_| 100, 2)
        .into_iter()
        .map(|r| AuditItem {
            prompt: r[..50].to_vec(),
            target: r[50..].to_vec(),
        })
        .collect();
    audit::audit(&model, None, &items, a.batch)?;
    let mut times = Vec::new();
    let mut memorized = 0;
    for _ in 0..a.runs.max(1) {
        let t = Instant::now();
        let (_, summary) = audit::audit(&model, None, &items, a.batch)?;
        times.push(t.elapsed().as_secs_f64());
        memorized = summary.memorized;
    }
    let secs = median(times.clone());
    let v = serde_json::json!({
        "benchmark": "audit",
        "implementation": "lethe",
        "model": a.model.as_ref().map(|d| d.display().to_string()),
        "definition": "tinymem",
        "batch": a.batch,
        "sequences": a.sequences,
        "device": a.device,
        "runs": times.len(),
        "median_seconds": secs,
        "sequences_per_second": a.sequences as f64 / secs,
        "memorized": memorized,
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    println!("{v}");
    Ok(())
}
