//! `lethe bench unlearn` and `lethe bench audit`: the BalancedSubnet step and audit throughput
//! on a TinyMem-shaped model (4 layers, 128 wide, vocab 14, 150 tokens).
//!
//! Invariants:
//! - `bench unlearn` times [`step`], the step every unlearning run takes (the path it took is
//!   reported as `step_path`), on random weights with `--batch` rows, half forget and half
//!   retain: the median over `--steps` timed steps after `--warmup` untimed ones.
//! - `bench audit` times [`audit::audit_with`] on random weights of `--shape` (TinyMem rows
//!   under the `tinymem` definition, 50 + 50; Pythia-70m rows under `pythia`, 32 + 48) or
//!   `--model`'s: the single pass and greedy decoding side by side, alternating, the median of
//!   each over `--runs` after one warm-up of each, and whether their verdicts agree.
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
    /// Model directory whose weights replace the random ones of `--shape`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The random model's shape and the rows' definition: tinymem (50 + 50 tokens of a
    /// 14-token vocabulary, 4 layers) or pythia70m (32 + 48 tokens of 50,304).
    #[arg(long, value_enum, default_value = "tinymem")]
    pub shape: Shape,
    /// Time the single pass only (skip the greedy-decoding audit beside it).
    #[arg(long)]
    pub single_pass_only: bool,
    /// Audit these rows (JSONL, as `lethe audit` reads them, under the shape's definition)
    /// instead of `--sequences` random ones, e.g. rows the model memorized.
    #[arg(long)]
    pub rows: Option<PathBuf>,
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

/// Audit throughput, side by side in one run: the single teacher-forced pass (what every audit
/// runs) and greedy decoding of every target token (what audits ran before, and what
/// `generate` still runs), alternating within each run; and whether their verdicts agree.
pub fn audit_bench(a: AuditBenchArgs) -> anyhow::Result<()> {
    let device = crate::runtime::parse_device(&a.device)?;
    let (model, def, vocab) = match a.shape {
        Shape::Tinymem => (
            match &a.model {
                Some(dir) => bench_model(Shape::Tinymem, Some(dir), &device)?,
                None => tinymem(4, &device)?,
            },
            audit::Definition::Tinymem,
            14,
        ),
        shape => (
            bench_model(shape, a.model.as_deref(), &device)?,
            audit::Definition::Pythia,
            50_304,
        ),
    };
    let items: Vec<AuditItem> = match &a.rows {
        Some(path) => {
            let tk = crate::tinymem::tokenizer::build()?;
            audit::cli::read_rows(path, def, &tk)?
                .into_iter()
                .map(|p| p.item)
                .collect()
        }
        None => crate::util::token_rows(a.sequences, |_| def.span(), 2, vocab)
            .into_iter()
            .map(|r| def.split(&r))
            .collect::<crate::error::Result<_>>()?,
    };
    let sequences = items.len();
    let single = audit::AuditOptions::greedy(a.batch);
    let decoding = audit::AuditOptions {
        generate: true,
        ..single.clone()
    };
    let methods: &[(&str, &audit::AuditOptions)] = if a.single_pass_only {
        &[("single_pass", &single)]
    } else {
        &[("single_pass", &single), ("greedy_decoding", &decoding)]
    };
    let mut times = vec![Vec::new(); methods.len()];
    let mut verdicts = vec![Vec::new(); methods.len()];
    let mut memorized = vec![0; methods.len()];
    // One warm-up of each, then the timed runs, alternating which goes first.
    for run in 0..=a.runs.max(1) {
        for k in 0..methods.len() {
            let m = (k + run) % methods.len();
            let t = Instant::now();
            let (res, summary) = audit::audit_with(&model, None, &items, methods[m].1)?;
            if run > 0 {
                times[m].push(t.elapsed().as_secs_f64());
            }
            memorized[m] = summary.memorized;
            verdicts[m] = res
                .iter()
                .map(|r| (r.memorized, r.matched_prefix))
                .collect();
        }
    }
    let mut v = serde_json::json!({
        "benchmark": "audit",
        "implementation": "lethe",
        "model": a.model.as_ref().map_or_else(|| format!("{:?}", a.shape).to_lowercase(), |d| d.display().to_string()),
        "definition": def,
        "batch": a.batch,
        "sequences": sequences,
        "rows": a.rows.as_ref().map(|p| p.display().to_string()),
        "device": a.device,
        "runs": times[0].len(),
        "statistic": "median over timed runs, methods alternating",
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    for (m, (name, _)) in methods.iter().enumerate() {
        let secs = median(times[m].clone());
        v[*name] = serde_json::json!({
            "median_seconds": secs,
            "sequences_per_second": sequences as f64 / secs,
            "memorized": memorized[m],
        });
    }
    // The peer driver reads the top-level numbers: the single pass, what audits run.
    v["median_seconds"] = v["single_pass"]["median_seconds"].clone();
    v["sequences_per_second"] = v["single_pass"]["sequences_per_second"].clone();
    v["memorized"] = memorized[0].into();
    if methods.len() == 2 {
        v["speedup_over_greedy_decoding"] =
            (median(times[1].clone()) / median(times[0].clone())).into();
        v["same_verdicts"] = (verdicts[0] == verdicts[1]).into();
    }
    println!("{v}");
    Ok(())
}
