//! `lethe bench …`: the measurements behind `docs/benchmarks.md`. Not tests: they are run by
//! hand.
//!
//! Invariants:
//! - Results go to stdout as JSON: one object per invocation of `decode`, `score`, `train`,
//!   `unlearn`, `audit` and `guard`; one line per takedown for `takedowns`, whose summary goes
//!   to stderr.
//! - The timed benchmarks report the median of their timed runs; `decode`, `score`, `train`,
//!   `unlearn` and `audit` do untimed warm-up work first, and each timed run ends with the
//!   device's work done.
//! - Token ids are seeded, so every invocation feeds the same inputs; random weights come from
//!   the architecture's own initialiser (not seeded), and `--model` replaces them where offered.
//! - Nothing is written to disk.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod takedowns;
mod unlearn;

use crate::engine::{self, GenerateRequest};
use crate::loader::WeightDtype;
use crate::models::{fused, gpt2, gpt_neox, Inputs, Model, ModelConfig, Weights};
use crate::optim::{AdamW, AdamWParams};
use crate::tinymem::train::{train_step, train_step_autograd, StepReport, StepWorkspace};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Greedy decode throughput on a random-weight model of a given shape, or on `--model`.
    Decode(DecodeArgs),
    /// Scoring throughput (teacher-forced log-likelihood of full sequences, batched).
    Score(ScoreBenchArgs),
    /// Training-step throughput (forward + `lm_loss` + backward + AdamW) on a TinyMem-shaped
    /// GPT-2 initialised from scratch.
    Train(TrainArgs),
    /// One BalancedSubnet step (32 rows × 150 tokens) on a TinyMem-shaped model.
    Unlearn(unlearn::UnlearnBenchArgs),
    /// Audit throughput (tinymem definition) on a TinyMem-shaped model.
    Audit(unlearn::AuditBenchArgs),
    /// Takedown success rate, wall time and drift through the unlearning pipeline (seeded
    /// random requests of the model's memorized sequences, then sequential takedowns).
    Takedowns(takedowns::TakedownBenchArgs),
    /// Regurgitation-guard cost per generated token (1,000 protected 64-token sequences).
    Guard(GuardArgs),
}

#[derive(Debug, Args)]
pub struct GuardArgs {
    /// Guard window (tokens).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Generated tokens checked per run.
    #[arg(long, default_value_t = 1_000_000)]
    pub tokens: usize,
    /// Runs (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub runs: usize,
}

/// Model shapes the benchmarks use.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shape {
    /// TinyMem: GPT-2, 4 layers, 128 wide, 4 heads, vocab 14, context 150.
    Tinymem,
    /// Pythia-70m: GPT-NeoX, 6 layers, 512 wide, 8 heads, vocab 50304.
    Pythia70m,
    /// Pythia-160m: GPT-NeoX, 12 layers, 768 wide, 12 heads, MLP 3072.
    Pythia160m,
    /// Pythia-410m: GPT-NeoX, 24 layers, 1024 wide, 16 heads, MLP 4096.
    Pythia410m,
    /// Pythia-1b: GPT-NeoX, 16 layers, 2048 wide, 8 heads, MLP 8192.
    Pythia1b,
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[arg(long, value_enum, default_value = "tinymem")]
    pub shape: Shape,
    /// Precision the weights are held in, as `lethe serve --dtype` (random weights are
    /// rounded to it; `auto` keeps them f32).
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    /// Model directory (config.json, model.safetensors, tokenizer.json) whose weights replace
    /// the random ones; `--shape` is then ignored.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 100)]
    pub new_tokens: usize,
    /// Timed runs (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub runs: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON (the only output format; accepted for symmetry with other commands).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ScoreBenchArgs {
    #[arg(long, value_enum, default_value = "tinymem")]
    pub shape: Shape,
    /// Precision the weights are held in, as `lethe serve --dtype` (random weights are
    /// rounded to it; `auto` keeps them f32).
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    /// Model directory whose weights replace the random ones; `--shape` is then ignored.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Sequences scored per run (pseudo-random ids, `bench_unlearn::token_rows` seed 3).
    #[arg(long, default_value_t = 256)]
    pub sequences: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 150)]
    pub seq_len: usize,
    /// Timed runs (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub runs: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON (the only output format; accepted for symmetry with other commands).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Transformer blocks (TinyMem uses 2, 4, 8 or 16) of the random TinyMem-shaped model.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// A model directory (any supported checkpoint, f32 on the device) trained instead of a
    /// random TinyMem-shaped model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tokens per sequence (at most the context length, 150).
    #[arg(long, default_value_t = 150)]
    pub seq_len: usize,
    /// Timed steps; the median step time is reported.
    #[arg(long, default_value_t = 20, value_parser = at_least_one)]
    pub steps: usize,
    /// Untimed steps first (allocator and thread pools warm up).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Seed of the token ids and of nothing else (the weights use candle's own RNG).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print JSON (the only output format; accepted for symmetry with other commands).
    #[arg(long)]
    pub json: bool,
    /// Take the candle-autograd step even where the hand-written backward applies.
    #[arg(long)]
    pub autograd: bool,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Decode(a) => decode(a),
        BenchCommand::Score(a) => score(a),
        BenchCommand::Train(a) => train(a),
        BenchCommand::Unlearn(a) => unlearn::unlearn(a),
        BenchCommand::Audit(a) => unlearn::audit_bench(a),
        BenchCommand::Takedowns(a) => takedowns::run(a),
        BenchCommand::Guard(a) => {
            let mut ns: Vec<f64> = (0..a.runs.max(1))
                .map(|_| crate::takedown::guard::bench_overhead(a.window, a.tokens))
                .collect();
            ns.sort_by(f64::total_cmp);
            let json = serde_json::json!({
                "window": a.window, "tokens": a.tokens, "runs": ns,
                "ns_per_token_median": ns[ns.len() / 2],
            });
            println!("{json}");
            Ok(())
        }
    }
}

/// The config of a benchmark shape.
pub fn shape_config(shape: Shape) -> ModelConfig {
    match shape {
        Shape::Tinymem => ModelConfig::Gpt2(gpt2::Config {
            vocab_size: 14,
            n_positions: 150,
            n_embd: 128,
            n_layer: 4,
            n_head: 4,
            n_inner: 512,
            activation: crate::models::ops::Activation::Relu,
            layer_norm_epsilon: 1e-5,
            tie_word_embeddings: true,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            initializer_range: 0.8 / 128f64.sqrt(),
            bos_token_id: Some(10),
            eos_token_id: Some(11),
            pad_token_id: Some(13),
        }),
        Shape::Pythia70m => pythia((6, 512, 8)),
        Shape::Pythia160m => pythia((12, 768, 12)),
        Shape::Pythia410m => pythia((24, 1024, 16)),
        Shape::Pythia1b => pythia((16, 2048, 8)),
    }
}

/// EleutherAI's Pythia config at `(layers, width, heads)`: MLP 4× wide, vocab 50304, rotary on
/// a quarter of each head, parallel residual, exact GELU, untied head.
fn pythia((layers, width, heads): (usize, usize, usize)) -> ModelConfig {
    ModelConfig::GptNeoX(gpt_neox::Config {
        vocab_size: 50304,
        hidden_size: width,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 4 * width,
        max_position_embeddings: 2048,
        rotary_pct: 0.25,
        rotary_emb_base: 10000.0,
        use_parallel_residual: true,
        layer_norm_eps: 1e-5,
        activation: crate::models::ops::Activation::Gelu,
        tie_word_embeddings: false,
        attention_bias: true,
        initializer_range: 0.02,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        pad_token_id: None,
    })
}

/// The model a benchmark runs: the weights in `dir` when given, else random weights of `shape`.
pub(crate) fn bench_model(
    shape: Shape,
    dir: Option<&Path>,
    device: &Device,
) -> anyhow::Result<Model> {
    bench_model_in(shape, dir, device, WeightDtype::F32)
}

/// [`bench_model`] with its weights held in `dtype`.
fn bench_model_in(
    shape: Shape,
    dir: Option<&Path>,
    device: &Device,
    dtype: WeightDtype,
) -> anyhow::Result<Model> {
    match dir {
        Some(dir) => {
            let source = dir.display().to_string();
            let dtype = dtype.resolve(dir)?;
            Ok(crate::loader::load_dir(dir, &source, device, dtype)?.model)
        }
        None => {
            let random = Model::random(&shape_config(shape), device)?;
            Ok(match dtype.resolve_random() {
                DType::F32 => random,
                half => random.rounded_as(DType::F32, half)?,
            })
        }
    }
}

/// The label a benchmark's JSON gives its model: the directory, else the shape.
fn model_label(shape: Shape, dir: Option<&Path>) -> String {
    dir.map_or_else(
        || format!("{shape:?}").to_lowercase(),
        |d| d.display().to_string(),
    )
}

/// A count of runs, steps or requests: a whole number of at least 1.
pub(crate) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        // Nothing to take the median of (a group with no applied request): NaN, which the
        // JSON output writes as `null`.
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.batch > 0, "--batch must be positive");
    let device = crate::runtime::parse_device(&a.device)?;
    let (config, weights) = match &a.model {
        // A checkpoint's weights become the variables (copies; the loaded tensors are freed once
        // they are made, so the load briefly holds the weights twice).
        Some(dir) => {
            let loaded = bench_model(Shape::Tinymem, Some(dir), &device)?;
            let map = loaded.named_tensors().iter().cloned().collect();
            (loaded.config(), Weights::vars_from_tensors(map, 0)?)
        }
        None => {
            let mut config = shape_config(Shape::Tinymem);
            let ModelConfig::Gpt2(c) = &mut config else {
                anyhow::bail!("the TinyMem shape is not GPT-2")
            };
            anyhow::ensure!(a.layers > 0, "--layers must be positive");
            c.n_layer = a.layers;
            (config, Weights::init(DType::F32, &device))
        }
    };
    let spec = config.spec();
    anyhow::ensure!(
        (2..=spec.context_length).contains(&a.seq_len),
        "--seq-len must be in 2..={}",
        spec.context_length
    );
    let vocab = spec.vocab_size as u32;
    let model = Model::new(&config, &weights)?;
    let vars = crate::tinymem::train::named_vars(&model, &weights)?;
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    )?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let ids: Vec<u32> = (0..a.batch * a.seq_len)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let shape = (a.batch, a.seq_len);
    let mut ws = StepWorkspace::default();
    let mut step = |opt: &mut AdamW| -> anyhow::Result<StepReport> {
        let report = if a.autograd {
            train_step_autograd(&model, opt, &ids, shape)?
        } else {
            train_step(&model, opt, &ids, shape, &mut ws)?
        };
        // GPU kernels run asynchronously: the step is timed to its end (a no-op on the CPU).
        device.synchronize()?;
        Ok(report)
    };
    let mut first_loss = None;
    for _ in 0..a.warmup {
        let s = step(&mut opt)?;
        first_loss.get_or_insert(s.loss);
    }
    let mut steps = Vec::with_capacity(a.steps.max(1));
    for _ in 0..a.steps.max(1) {
        let t = Instant::now();
        let s = step(&mut opt)?;
        steps.push((t.elapsed().as_secs_f64(), s));
        first_loss.get_or_insert(steps[0].1.loss);
    }
    let ids = Tensor::from_vec(ids, shape, &device)?;
    let inputs = Inputs::causal(&ids, 0)?;
    // The untracked (inference/scoring) forward on the same batch, through the fused kernels
    // and through the composed reference path, to check inference did not get slower.
    let frozen = Model::new(
        &config,
        &Weights::from_tensors(
            model
                .named_tensors()
                .iter()
                .map(|(n, t)| (n.clone(), t.detach()))
                .collect(),
            "bench",
        ),
    )?;
    let time_forward = || -> anyhow::Result<f64> {
        let t = Instant::now();
        frozen.forward(&inputs, None, None)?;
        device.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut infer = Vec::new();
    let mut infer_ref = Vec::new();
    // The inference comparison is the TinyMem shape's (a checkpoint's step is what is asked).
    for _ in 0..if a.model.is_none() { 5 } else { 0 } {
        infer.push(time_forward()?);
        infer_ref.push(fused::with_reference_ops(time_forward)?);
    }
    let phase = |f: fn(&StepReport) -> f64| median(steps.iter().map(|(_, s)| f(s)).collect());
    let secs = median(steps.iter().map(|(t, _)| *t).collect());
    let tokens = (a.batch * a.seq_len) as f64;
    let v = serde_json::json!({
        "benchmark": "train",
        "implementation": "lethe",
        "model": a.model.as_ref().map_or_else(|| format!("tinymem-{}-layers", a.layers), |d| d.display().to_string()),
        "layers": spec.num_layers,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "steps": steps.len(),
        "warmup": a.warmup,
        "seconds_per_step": secs,
        "tokens_per_second": tokens / secs,
        "statistic": "median over timed steps",
        "path": if steps[0].1.fast { "hand-written backward" } else { "autograd" },
        "forward_backward_seconds": phase(|s| s.grad_seconds),
        "optimizer_seconds": phase(|s| s.optimizer_seconds),
        "inference_forward_seconds": (!infer.is_empty()).then(|| median(infer)),
        "inference_forward_reference_seconds": (!infer_ref.is_empty()).then(|| median(infer_ref)),
        "peak_rss_bytes": crate::util::peak_rss_bytes(),
        "device": a.device,
        "first_loss": first_loss,
        "last_loss": steps.last().map(|(_, s)| s.loss),
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    println!("{v}");
    Ok(())
}

fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    let device = crate::runtime::parse_device(&a.device)?;
    let model = bench_model_in(a.shape, a.model.as_deref(), &device, a.dtype)?;
    let spec = model.spec();
    // The prompts `bench/infer_torch.py` rebuilds: row b, position i -> (7b + 3i) mod (vocab - 1).
    let reqs: Vec<GenerateRequest> = (0..a.batch)
        .map(|b| {
            let prompt = (0..a.prompt_tokens)
                .map(|i| ((b * 7 + i * 3) % (spec.vocab_size - 1)) as u32)
                .collect();
            let mut r = GenerateRequest::greedy(prompt, a.new_tokens);
            r.banned_ids.extend(spec.eos_token_id);
            r
        })
        .collect();
    engine::generate(&model, None, &reqs)?;
    let mut times = Vec::new();
    let mut first_row = Vec::new();
    for _ in 0..a.runs.max(1) {
        let t = Instant::now();
        let out = engine::generate(&model, None, &reqs)?;
        times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            out.iter().all(|g| g.tokens.len() == a.new_tokens),
            "short generation"
        );
        first_row = out[0].tokens.clone();
    }
    let secs = median(times.clone());
    let tokens = (a.batch * a.new_tokens) as f64;
    let v = serde_json::json!({
        "benchmark": "decode",
        "implementation": "lethe",
        "shape": model_label(a.shape, a.model.as_deref()),
        "batch": a.batch,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "device": a.device,
        "runs": times.len(),
        "median_seconds": secs,
        "tokens_per_second": tokens / secs,
        "first_row_tokens": first_row,
        "weight_dtype": format!("{:?}", model.weight_dtype()).to_lowercase(),
        "peak_rss_bytes": crate::util::peak_rss_bytes(),
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    println!("{v}");
    Ok(())
}

/// Scoring throughput: `sequences` × `seq_len` tokens through `engine::score`, `batch` rows per
/// forward. `tokens_per_second` counts every token of every sequence.
fn score(a: ScoreBenchArgs) -> anyhow::Result<()> {
    // Scores come back to the host, so each timed call ends with the device's work done.
    let device = crate::runtime::parse_device(&a.device)?;
    let model = bench_model_in(a.shape, a.model.as_deref(), &device, a.dtype)?;
    let vocab = model.spec().vocab_size as u64;
    let seqs = crate::util::token_rows(a.sequences, |_| a.seq_len, 3, vocab);
    engine::score(&model, &seqs, a.batch)?;
    let mut times = Vec::new();
    let mut nll = 0.0;
    for _ in 0..a.runs.max(1) {
        let t = Instant::now();
        let out = engine::score(&model, &seqs, a.batch)?;
        times.push(t.elapsed().as_secs_f64());
        nll = out.iter().map(|s| s.nll).sum::<f64>() / out.len().max(1) as f64;
    }
    let secs = median(times.clone());
    let v = serde_json::json!({
        "benchmark": "score",
        "implementation": "lethe",
        "shape": model_label(a.shape, a.model.as_deref()),
        "batch": a.batch,
        "sequences": a.sequences,
        "seq_len": a.seq_len,
        "device": a.device,
        "runs": times.len(),
        "median_seconds": secs,
        "tokens_per_second": (a.sequences * a.seq_len) as f64 / secs,
        "mean_nll": nll,
        "weight_dtype": format!("{:?}", model.weight_dtype()).to_lowercase(),
        "peak_rss_bytes": crate::util::peak_rss_bytes(),
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    println!("{v}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_zero_are_refused_and_an_empty_median_is_nan() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").unwrap_err().contains("at least 1"));
        assert!(at_least_one("x").is_err());
        assert!(median(Vec::new()).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(
            serde_json::json!(median(Vec::new())),
            serde_json::Value::Null
        );
    }
}
