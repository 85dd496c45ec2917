//! Fine-tuning any supported checkpoint (GPT-2 or GPT-NeoX) on token rows and writing the result
//! as a Hugging Face directory: how the tests and benchmarks make a Pythia-architecture model
//! that regurgitates chosen sequences, so that a takedown has something real to remove.
//!
//! Invariants:
//! - Every step runs [`train_step`]: the hand-written forward and backward for GPT-2 and
//!   GPT-NeoX in f32 on the CPU, autograd otherwise. AdamW updates every parameter.
//! - Batches are seeded: the same rows, settings and seed give the same weights.
//! - Every batch row starts at the start of a data row (memorized sequences are learnt from
//!   their first token, as an audit prompts them); a row shorter than `seq_len` is followed by
//!   further drawn rows, a longer one is cut at `seq_len`.
//! - Settings and rows are validated before anything is written; a non-finite loss stops the run
//!   with an error. The output directory gets the source's files (config, tokenizer, generation
//!   config) except its weights and lethe's TinyMem card, then `model.safetensors` (f32), each
//!   replaced atomically.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::train::{named_vars, train_step, StepWorkspace, CARD_FILE};
use crate::error::{Error, Result};
use crate::models::weights::write_safetensors;
use crate::models::{Model, Weights};
use crate::optim::{AdamW, AdamWParams};

/// Fine-tuning settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTuneConfig {
    pub steps: usize,
    pub batch: usize,
    /// Tokens per batch row (at most the model's context length).
    pub seq_len: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for FineTuneConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch: 8,
            seq_len: 128,
            lr: 1e-3,
            weight_decay: 0.0,
            seed: 0,
        }
    }
}

/// What a fine-tuning run did.
#[derive(Debug, Clone, Serialize)]
pub struct FineTuneReport {
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Whether the hand-written backward ran (false: candle autograd).
    pub fast: bool,
}

/// Fine-tunes `model` (loaded from `source_dir`) on `rows` and writes the result to `out`.
/// `progress` sees (step, steps, loss) after every step.
pub fn fine_tune(
    model: &Model,
    source_dir: &Path,
    rows: &[Vec<u32>],
    cfg: &FineTuneConfig,
    out: &Path,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<FineTuneReport> {
    validate(model, rows, cfg)?;
    // The checkpoint's tensors become the variables (copies, on the CPU in f32).
    let map: HashMap<_, _> = model
        .named_tensors()
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let weights = Weights::vars_from_tensors(map, cfg.seed)?;
    let model = Model::new(&model.config(), &weights)?;
    let vars = named_vars(&model, &weights)?;
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            lr: cfg.lr,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut ws = StepWorkspace::default();
    let (mut first_loss, mut last_loss, mut fast) = (f64::NAN, f64::NAN, true);
    let started = Instant::now();
    for step in 0..cfg.steps {
        let ids = batch(rows, cfg, &mut rng);
        let r = train_step(&model, &mut opt, &ids, (cfg.batch, cfg.seq_len), &mut ws)?;
        if !r.loss.is_finite() {
            return Err(Error::invalid(
                "lr",
                format!("fine-tuning diverged (loss {}) at step {step}", r.loss),
            ));
        }
        if step == 0 {
            first_loss = r.loss;
        }
        last_loss = r.loss;
        fast &= r.fast;
        progress(step + 1, cfg.steps, r.loss);
    }
    let seconds = started.elapsed().as_secs_f64();
    write_dir(source_dir, out, &model)?;
    Ok(FineTuneReport {
        steps: cfg.steps,
        first_loss,
        last_loss,
        seconds,
        tokens_per_second: (cfg.steps * cfg.batch * cfg.seq_len) as f64 / seconds,
        fast,
    })
}

fn validate(model: &Model, rows: &[Vec<u32>], cfg: &FineTuneConfig) -> Result<()> {
    let spec = model.config().spec();
    if cfg.steps == 0 || cfg.batch == 0 {
        return Err(Error::invalid(
            "fine-tune",
            "steps and batch must be positive",
        ));
    }
    if !(2..=spec.context_length).contains(&cfg.seq_len) {
        return Err(Error::invalid(
            "seq_len",
            format!(
                "must be in 2..={} (the model's context)",
                spec.context_length
            ),
        ));
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0 && cfg.weight_decay.is_finite()) {
        return Err(Error::invalid(
            "lr",
            "lr must be positive and weight decay finite",
        ));
    }
    if rows.is_empty() || rows.iter().any(Vec::is_empty) {
        return Err(Error::invalid("data", "needs at least one row, none empty"));
    }
    let vocab = spec.vocab_size as u32;
    if let Some((i, &id)) = rows
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.iter().find(|&&id| id >= vocab).map(|id| (i, id)))
    {
        return Err(Error::invalid(
            "data",
            format!("row {i} has token id {id}, outside the model's vocabulary of {vocab}"),
        ));
    }
    Ok(())
}

/// One seeded batch, `[batch, seq_len]` row-major: each row starts at a drawn data row and is
/// continued by further drawn rows until it is full.
fn batch(rows: &[Vec<u32>], cfg: &FineTuneConfig, rng: &mut StdRng) -> Vec<u32> {
    let mut ids = Vec::with_capacity(cfg.batch * cfg.seq_len);
    for _ in 0..cfg.batch {
        let end = ids.len() + cfg.seq_len;
        while ids.len() < end {
            let row = &rows[rng.random_range(0..rows.len())];
            let take = row.len().min(end - ids.len());
            ids.extend_from_slice(&row[..take]);
        }
    }
    ids
}

/// Copies `source`'s files except weights and lethe's TinyMem card into `out`, then writes the
/// fine-tuned weights.
fn write_dir(source: &Path, out: &Path, model: &Model) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    for entry in std::fs::read_dir(source).map_err(io(source))? {
        let entry = entry.map_err(io(source))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".index.json")
            || name == CARD_FILE;
        if weights || !entry.path().is_file() {
            continue;
        }
        let bytes = std::fs::read(entry.path()).map_err(io(&entry.path()))?;
        crate::util::write_atomic(&out.join(&name), &bytes)?;
    }
    write_safetensors(
        model.named_tensors(),
        DType::F32,
        &out.join("model.safetensors"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_start_at_rows_and_are_continued_by_rows() {
        let rows = vec![vec![1, 2, 3], vec![7; 10]];
        let cfg = FineTuneConfig {
            batch: 16,
            seq_len: 5,
            ..FineTuneConfig::default()
        };
        let ids = batch(&rows, &cfg, &mut StdRng::seed_from_u64(1));
        assert_eq!(ids.len(), 80);
        for r in ids.chunks(5) {
            assert!(
                r == [1, 2, 3, 1, 2] || r == [1, 2, 3, 7, 7] || r == [7; 5],
                "{r:?}"
            );
        }
        let again = batch(&rows, &cfg, &mut StdRng::seed_from_u64(1));
        assert_eq!(ids, again, "seeded");
    }
}
