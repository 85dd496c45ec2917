//! Training TinyMem models (spec §2) and writing them as Hugging Face checkpoints.
//!
//! A model directory holds `config.json`, `model.safetensors` and `tokenizer.json` (what
//! `--model` and transformers' `GPT2LMHeadModel` load), plus `lethe_tinymem.json` (the card: the
//! data and training configs, so the exact data can be regenerated, and the training history)
//! and `optimizer.safetensors` (AdamW state, for `--resume`).
//!
//! Invariants:
//! - The model and optimiser are the paper's (spec §2.1–2.2): a ReLU GPT-2 with tied embeddings
//!   and initializer range `0.8/√n_embd`, AdamW with no schedule, and a loss over every shifted
//!   position, PAD included. `TrainConfig::default()` is the paper's shape and optimiser.
//! - Each file is replaced atomically and the card is written last, so it never claims an epoch
//!   whose weights are not on disk.
//! - Initial weights come from `seed`, each epoch's shuffle from `seed` and the epoch number, so
//!   a resumed run continues the same sequence of batches and ends with the same weights as an
//!   uninterrupted one (tested).
//! - Settings are validated before any file is written. Resuming with other data or model
//!   settings, and a non-finite loss (divergence), are refused with an error, never a panic.
//! - Epoch E in the card is the state after E passes over the training set (the reference's
//!   newer loop names that state E − 1; spec §2.2).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::data::{self, DataConfig, Dataset};
use super::eval::{self, EvalParams, EvalReport};
use super::regularize::{Regularize, Regularizer};
use super::vocab;
use crate::error::{Error, Result};
use crate::models::ops::{self, Activation};
use crate::models::pass::{HandWrittenPass, MlpGradWorkspace};
use crate::models::weights::{read_safetensors, write_safetensors};
use crate::models::{gpt2, Inputs, Model, ModelConfig, Weights};
use crate::optim::{AdamW, AdamWParams};

/// The card's file name inside a model directory.
pub const CARD_FILE: &str = "lethe_tinymem.json";
const CARD_FORMAT: &str = "lethe-tinymem-v1";

/// Model shape and optimisation settings. Defaults are the paper's (spec §2.1–2.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub batch_size: usize,
    /// Passes over the training set.
    pub epochs: usize,
    /// Weight-initialisation and shuffling seed.
    pub seed: u64,
    /// Evaluate every this many epochs (0: only after the last).
    pub eval_every: usize,
    /// Write a checkpoint every this many epochs (0: only after the last).
    pub checkpoint_every: usize,
    /// A training-time regularizer (spec §4.7); `None`: the paper's plain training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regularizer: Option<Regularizer>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            n_layer: 4,
            n_embd: 128,
            n_head: 4,
            n_inner: 512,
            lr: 1e-3,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            batch_size: 128,
            epochs: 10,
            seed: 0,
            eval_every: 1,
            checkpoint_every: 1,
            regularizer: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_inner", self.n_inner),
            ("batch_size", self.batch_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::invalid(name, "must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::invalid("n_head", "must divide n_embd"));
        }
        for (name, v) in [("lr", self.lr), ("eps", self.eps)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::invalid(name, "must be a positive number"));
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(name, "must be in [0, 1)"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid("weight_decay", "must be >= 0"));
        }
        self.regularizer
            .as_ref()
            .map_or(Ok(()), Regularizer::validate)
    }

    /// The optimiser these settings train with.
    pub fn adamw(&self) -> AdamWParams {
        AdamWParams {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The GPT-2 config of the model this trains (spec §2.1).
    pub fn model_config(&self, data: &DataConfig) -> gpt2::Config {
        gpt2::Config {
            vocab_size: vocab::VOCAB_SIZE,
            n_positions: data.max_ctx,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_inner: self.n_inner,
            activation: Activation::Relu,
            layer_norm_epsilon: 1e-5,
            tie_word_embeddings: true,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            initializer_range: 0.8 / (self.n_embd as f64).sqrt(),
            bos_token_id: Some(vocab::BOS),
            eos_token_id: Some(vocab::EOS),
            pad_token_id: Some(vocab::PAD),
        }
    }
}

/// One epoch's record in a card; `E` is the card's evaluation (the math TinyMem's
/// [`EvalReport`], the language TinyMem's `LangEval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog<E = EvalReport> {
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub loss: f64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub eval: Option<E>,
}

impl<E> EpochLog<E> {
    /// The record of epoch `e`, evaluated by `evaluate` when `cfg.eval_every` (or the last
    /// epoch) makes an evaluation due.
    pub(super) fn of(
        e: &EpochDone,
        cfg: &TrainConfig,
        evaluate: impl FnOnce() -> Result<E>,
    ) -> Result<Self> {
        Ok(Self {
            epoch: e.epoch,
            loss: e.mean_loss,
            seconds: e.seconds,
            tokens_per_second: e.tokens as f64 / e.seconds,
            eval: e.due(cfg.eval_every, cfg).then(evaluate).transpose()?,
        })
    }
}

/// Reads and parses the card at `path` and checks its format (`format_of` reads it); every
/// error names the file.
pub(super) fn read_card<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: &str,
    format_of: impl Fn(&T) -> &str,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let card: T = serde_json::from_str(&text)
        .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
    if format_of(&card) != expected {
        return Err(Error::config(
            path.display().to_string(),
            format!("format {:?}, expected {expected:?}", format_of(&card)),
        ));
    }
    Ok(card)
}

/// `lethe_tinymem.json`: how a model was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Card {
    pub format: String,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub epochs_done: usize,
    pub steps_done: u64,
    pub train_seconds: f64,
    pub history: Vec<EpochLog>,
}

impl Card {
    /// Reads the card of a model directory.
    pub fn read(dir: &Path) -> Result<Self> {
        read_card(&dir.join(CARD_FILE), CARD_FORMAT, |c: &Card| &c.format)
    }

    /// The card in `dir`, `None` when there is none (not a TinyMem model). A card that exists
    /// but cannot be read or parsed is an error naming it, never "not TinyMem": that would
    /// silently drop a TinyMem model's retain set and test-task gates.
    pub fn read_if_present(dir: &Path) -> Result<Option<Self>> {
        if dir.join(CARD_FILE).exists() {
            Self::read(dir).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Regenerates the exact dataset the model was trained on.
    pub fn dataset(&self) -> Result<Dataset> {
        data::generate(&self.data).map_err(|e| Error::invalid("data", e.to_string()))
    }
}

/// Progress callback: (epoch, step in epoch, steps per epoch, last loss, tokens/s).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, usize, f64, f64);

/// Trains (or resumes training of) a TinyMem model into `out`.
pub fn train(
    data_cfg: &DataConfig,
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    eval_params: &EvalParams,
    progress: Progress,
) -> Result<Card> {
    cfg.validate()?;
    let ds = data::generate(data_cfg).map_err(|e| Error::invalid("data", e.to_string()))?;
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let model_cfg = ModelConfig::Gpt2(cfg.model_config(data_cfg));
    let dev = Device::Cpu;
    let resuming = resume && out.join(CARD_FILE).is_file();
    if resuming && cfg.regularizer.is_some() {
        return Err(Error::invalid(
            "resume",
            "a regularized run cannot be resumed: the regularizer's state (power-iteration \
             vectors, loss buffer, example masks) is not checkpointed",
        ));
    }
    let (weights, mut card) = if resuming {
        let card = Card::read(out)?;
        if &card.data != data_cfg {
            return Err(Error::invalid(
                "resume",
                "the data config differs from the checkpoint's",
            ));
        }
        let same_model = TrainConfig {
            epochs: cfg.epochs,
            eval_every: cfg.eval_every,
            checkpoint_every: cfg.checkpoint_every,
            ..card.train.clone()
        };
        if &same_model != cfg {
            return Err(Error::invalid(
                "resume",
                "the model or optimiser settings differ from the checkpoint's",
            ));
        }
        let map = read_safetensors(&out.join("model.safetensors"), DType::F32, &dev)?;
        (
            Weights::vars_from_tensors(map, cfg.seed)?,
            Card {
                train: cfg.clone(),
                ..card
            },
        )
    } else {
        let card = Card {
            format: CARD_FORMAT.into(),
            data: data_cfg.clone(),
            train: cfg.clone(),
            epochs_done: 0,
            steps_done: 0,
            train_seconds: 0.0,
            history: Vec::new(),
        };
        (Weights::init_seeded(cfg.seed, DType::F32, &dev), card)
    };
    let model = Model::new(&model_cfg, &weights)?;
    let vars = named_vars(&model, &weights)?;
    let mut opt = AdamW::new(vars, cfg.adamw())?;
    if resuming {
        opt.load(&out.join("optimizer.safetensors"))?;
    }
    super::tokenizer::write(&out.join("tokenizer.json"))?;

    let rows: Vec<&[u32]> = ds
        .train_rows()
        .into_iter()
        .map(|r| r.ids.as_slice())
        .collect();
    let first = card.epochs_done;
    run_epochs(
        &model,
        &mut opt,
        &rows,
        data_cfg.max_ctx,
        cfg,
        first,
        progress,
        |opt, e, snapshot| {
            card.train_seconds += e.seconds;
            card.epochs_done = e.epoch;
            card.steps_done += e.steps as u64;
            // An untracked copy: it runs the inference kernels, so its evaluation equals what
            // `lethe tinymem eval` computes on the written checkpoint.
            card.history.push(EpochLog::of(&e, cfg, || {
                eval::evaluate(&snapshot()?, &ds, eval_params)
            })?);
            if e.due(cfg.checkpoint_every, cfg) {
                save_checkpoint(out, &snapshot()?, &model_cfg, Some(opt), CARD_FILE, &card)?;
            }
            Ok(())
        },
    )?;
    if card.epochs_done >= cfg.epochs && !out.join("model.safetensors").is_file() {
        save_checkpoint(out, &model, &model_cfg, Some(&opt), CARD_FILE, &card)?;
    }
    Ok(card)
}

/// What [`continue_training`] did.
pub struct Continued {
    /// The trained model, untracked.
    pub model: Model,
    pub steps: usize,
    pub seconds: f64,
    /// Whether the AdamW state came from the checkpoint's `optimizer.safetensors` (else it
    /// started from zero moments).
    pub optimizer_resumed: bool,
}

/// Continues training `model` (trained with `cfg`) for `epochs` more passes over `rows`
/// (each `t` tokens) with `cfg`'s optimiser, batch size and seed, no regularizer: the
/// fine-tuning baselines (spec §4.8). The AdamW state is read from `optimizer` when that file
/// exists (what `lethe tinymem train` writes beside its checkpoints), else it starts from
/// zero. `model` is not changed.
pub fn continue_training(
    model: &Model,
    optimizer: Option<&Path>,
    cfg: &TrainConfig,
    rows: &[&[u32]],
    t: usize,
    epochs: usize,
) -> Result<Continued> {
    if rows.is_empty() {
        return Err(Error::invalid("rows", "no rows to fine-tune on"));
    }
    if let Some(r) = rows.iter().find(|r| r.len() != t) {
        return Err(Error::invalid(
            "rows",
            format!("a row of {} tokens, expected {t}", r.len()),
        ));
    }
    let (trained, weights) = model.trainable_copy(cfg.seed)?;
    let mut opt = AdamW::new(named_vars(&trained, &weights)?, cfg.adamw())?;
    let resumed = match optimizer {
        Some(path) if path.is_file() => {
            opt.load(path)?;
            true
        }
        _ => false,
    };
    let cfg = TrainConfig {
        epochs,
        regularizer: None,
        ..cfg.clone()
    };
    let started = Instant::now();
    let mut steps = 0;
    run_epochs(
        &trained,
        &mut opt,
        rows,
        t,
        &cfg,
        0,
        &mut |_, _, _, _, _| {},
        |_, e, _| {
            steps += e.steps;
            Ok(())
        },
    )?;
    Ok(Continued {
        model: trained.detached("fine-tuned")?,
        steps,
        seconds: started.elapsed().as_secs_f64(),
        optimizer_resumed: resumed,
    })
}

/// One finished epoch of [`run_epochs`].
pub(super) struct EpochDone {
    /// Epochs done (1-based).
    pub epoch: usize,
    pub mean_loss: f64,
    pub seconds: f64,
    pub tokens: usize,
    pub steps: usize,
}

impl EpochDone {
    /// Whether something done every `every` epochs (0: only after the last) is due now.
    pub fn due(&self, every: usize, cfg: &TrainConfig) -> bool {
        self.epoch == cfg.epochs || (every > 0 && self.epoch.is_multiple_of(every))
    }
}

/// Epochs `first..cfg.epochs` over `rows` (each `t` tokens): every epoch a fresh shuffle seeded
/// by `cfg.seed` and the epoch number (so a resumed run continues the same batches), one
/// [`train_step`] per batch of `cfg.batch_size` (with `cfg.regularizer`, its regularized step),
/// then `after_epoch` with a builder of the model as evaluated and written (an untracked copy;
/// example-tied dropout's evaluation weights). A non-finite loss stops the run with an error
/// naming the epoch.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_epochs(
    model: &Model,
    opt: &mut AdamW,
    rows: &[&[u32]],
    t: usize,
    cfg: &TrainConfig,
    first: usize,
    progress: Progress,
    mut after_epoch: impl FnMut(&AdamW, EpochDone, &dyn Fn() -> Result<Model>) -> Result<()>,
) -> Result<()> {
    let steps_per_epoch = rows.len().div_ceil(cfg.batch_size);
    let mut ws = StepWorkspace::default();
    let mut reg = cfg
        .regularizer
        .map(|r| Regularize::new(r, model, cfg.seed))
        .transpose()?;
    for epoch in first..cfg.epochs {
        let started = Instant::now();
        let mut order: Vec<usize> = (0..rows.len()).collect();
        let mut rng =
            StdRng::seed_from_u64(cfg.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
        let (mut loss_sum, mut tokens) = (0.0, 0usize);
        for (step, batch) in order.chunks(cfg.batch_size).enumerate() {
            let flat: Vec<u32> = batch
                .iter()
                .flat_map(|&i| rows[i].iter().copied())
                .collect();
            let bt = (batch.len(), t);
            let l = match &mut reg {
                Some(r) => r.step(model, opt, &flat, bt, batch, &mut ws)?,
                None => train_step(model, opt, &flat, bt, &mut ws)?,
            }
            .loss;
            if !l.is_finite() {
                return Err(Error::invalid(
                    "lr",
                    format!("training diverged (loss {l}) at epoch {epoch}"),
                ));
            }
            loss_sum += l;
            tokens += batch.len() * t;
            progress(
                epoch,
                step + 1,
                steps_per_epoch,
                l,
                tokens as f64 / started.elapsed().as_secs_f64(),
            );
        }
        // Built at most once per epoch: the evaluation and the checkpoint share it.
        let built = std::cell::RefCell::new(None::<Model>);
        let snapshot = || -> Result<Model> {
            if let Some(m) = built.borrow().as_ref() {
                return Ok(m.clone());
            }
            let m = match &reg {
                Some(r) => r.evaluated(model),
                None => model.detached("training snapshot"),
            }?;
            *built.borrow_mut() = Some(m.clone());
            Ok(m)
        };
        after_epoch(
            opt,
            EpochDone {
                epoch: epoch + 1,
                mean_loss: loss_sum / steps_per_epoch as f64,
                seconds: started.elapsed().as_secs_f64(),
                tokens,
                steps: steps_per_epoch,
            },
            &snapshot,
        )?;
    }
    Ok(())
}

/// Buffers that [`train_step`] reuses from one step to the next.
#[derive(Default)]
pub struct StepWorkspace {
    pub(super) grad: MlpGradWorkspace,
}

/// What one [`train_step`] did.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// The batch's [`ops::lm_loss`] before the update.
    pub loss: f64,
    /// Seconds in the forward and backward passes, and in the optimiser.
    pub grad_seconds: f64,
    pub optimizer_seconds: f64,
    /// Whether the hand-written backward ([`gpt2::Gpt2::train_grads`]) ran.
    pub fast: bool,
}

/// One training step on `ids` (`[b, t]` row-major, every row `t` tokens): the gradient of
/// [`ops::lm_loss`] with respect to every parameter, then one step of `opt` (whose variables
/// are named as in [`Model::named_tensors`]).
///
/// GPT-2 and GPT-NeoX, f32 on the CPU, take the hand-written forward and backward
/// ([`crate::models::pass::HandWrittenPass::train_grads`], pinned to autograd by this module's
/// tests and `gpt_neox::grad`'s); any other model goes through candle's autograd
/// ([`train_step_autograd`]).
pub fn train_step(
    model: &Model,
    opt: &mut AdamW,
    ids: &[u32],
    (b, t): (usize, usize),
    ws: &mut StepWorkspace,
) -> Result<StepReport> {
    let t0 = Instant::now();
    let out = match model {
        Model::Gpt2(gpt) if gpt.mlp_grads_supported() => {
            gpt.train_grads(ids, (b, t), &mut ws.grad)?
        }
        Model::GptNeoX(neox) if neox.mlp_grads_supported() => {
            neox.train_grads(ids, (b, t), &mut ws.grad)?
        }
        _ => return train_step_autograd(model, opt, ids, (b, t)),
    };
    apply_grads(model, opt, |i| out.grads[i], out.loss, t0)
}

/// One step of `opt` with `grad(i)`, the gradient of `model.named_tensors()[i]`, after the
/// hand-written pass that started at `t0` and found `loss`: what [`train_step`] and the
/// regularized step report.
pub(super) fn apply_grads<'g>(
    model: &Model,
    opt: &mut AdamW,
    grad: impl Fn(usize) -> &'g [f32] + Sync,
    loss: f64,
    t0: Instant,
) -> Result<StepReport> {
    let t1 = Instant::now();
    let index: HashMap<&str, usize> = model
        .named_tensors()
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    opt.step_slices(|name| index.get(name).map(|&i| grad(i)))?;
    Ok(StepReport {
        loss,
        grad_seconds: (t1 - t0).as_secs_f64(),
        optimizer_seconds: t1.elapsed().as_secs_f64(),
        fast: true,
    })
}

/// [`train_step`] through candle's autograd, for every model.
pub fn train_step_autograd(
    model: &Model,
    opt: &mut AdamW,
    ids: &[u32],
    (b, t): (usize, usize),
) -> Result<StepReport> {
    let t0 = Instant::now();
    let ids = Tensor::from_slice(ids, (b, t), model.device())?;
    let logits = model.forward(&Inputs::causal(&ids, 0)?, None, None)?;
    let loss = ops::lm_loss(&logits, &ids)?;
    let grads = loss.backward()?;
    let t1 = Instant::now();
    opt.step(&grads)?;
    Ok(StepReport {
        loss: f64::from(loss.to_scalar::<f32>()?),
        grad_seconds: (t1 - t0).as_secs_f64(),
        optimizer_seconds: t1.elapsed().as_secs_f64(),
        fast: false,
    })
}

/// The trainable variables behind `model`'s parameters, by checkpoint name.
pub fn named_vars(model: &Model, weights: &Weights) -> Result<Vec<(String, Var)>> {
    let varmap = weights
        .varmap()
        .ok_or_else(|| Error::invalid("weights", "not trainable"))?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("weights", "poisoned lock"))?;
    model
        .named_tensors()
        .iter()
        .map(|(name, _)| {
            // Checkpoint names equal the names the model asked for (GPT-2 reads with the
            // `transformer.` prefix when training).
            data.get(name)
                .cloned()
                .map(|v| (name.clone(), v))
                .ok_or_else(|| Error::invalid("weights", format!("no variable for {name}")))
        })
        .collect()
}

/// Writes `model.safetensors` (f32), `config.json`, the optimiser state when given (for
/// `--resume`), then the card last as `card_file`, each file replaced atomically.
pub(super) fn save_checkpoint(
    out: &Path,
    model: &Model,
    cfg: &ModelConfig,
    opt: Option<&AdamW>,
    card_file: &str,
    card: &impl Serialize,
) -> Result<()> {
    write_safetensors(
        model.named_tensors(),
        DType::F32,
        &out.join("model.safetensors"),
    )?;
    let config = serde_json::to_string_pretty(&cfg.to_hf_json())
        .map_err(|e| Error::invalid("config", e.to_string()))?;
    crate::util::write_atomic(&out.join("config.json"), config.as_bytes())?;
    if let Some(opt) = opt {
        opt.save(&out.join("optimizer.safetensors"))?;
    }
    let card_json =
        serde_json::to_string_pretty(card).map_err(|e| Error::invalid("card", e.to_string()))?;
    crate::util::write_atomic(&out.join(card_file), card_json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fused;
    use rand::Rng;

    fn config(n_layer: usize, tied: bool, inverse_idx: bool) -> ModelConfig {
        crate::test_util::relu_gpt2((11, 16, 16, 2), n_layer, tied, inverse_idx)
    }

    fn random_ids(seed: u64, n: usize) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..11u32)).collect()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    use crate::test_util::rel_l2;

    #[test]
    fn hand_written_gradients_match_autograd_for_every_parameter() {
        // (activation, layers, tied, inverse layer scaling, rows, length): lengths odd, even, 2
        // and the whole context; every MLP activation the loader accepts.
        use Activation::{Gelu, GeluTanh, Relu, Silu};
        let cases = [
            (Relu, 1, true, false, 3, 9),
            (Relu, 2, false, false, 2, 13),
            (Relu, 2, true, true, 5, 16),
            (Relu, 1, false, false, 4, 2),
            (Relu, 2, true, false, 1, 10),
            (Gelu, 2, false, true, 3, 11),
            (GeluTanh, 1, true, false, 2, 16),
            (Silu, 2, false, false, 2, 7),
        ];
        // One workspace for all cases: buffers left by another shape must not leak in.
        let mut ws = MlpGradWorkspace::default();
        for (case, &(act, nl, tied, inv, b, t)) in cases.iter().enumerate() {
            let weights = Weights::init_seeded(case as u64, DType::F32, &Device::Cpu);
            let cfg = crate::test_util::gpt2_with(act, (11, 16, 16, 2), nl, tied, inv);
            let model = Model::new(&cfg, &weights).unwrap();
            let Model::Gpt2(gpt) = &model else {
                unreachable!()
            };
            assert!(gpt.mlp_grads_supported());
            let ids = random_ids(100 + case as u64, b * t);
            let out = gpt.train_grads(&ids, (b, t), &mut ws).unwrap();
            assert_eq!(out.grads.len(), 2 + 12 * nl + 2 + usize::from(!tied));
            crate::test_util::assert_matches_autograd(
                case,
                &model,
                &weights,
                (&ids, b, t),
                (out.loss, &out.grads),
            );
        }
    }

    #[test]
    fn fast_training_steps_follow_the_autograd_steps() {
        let cfg = config(2, true, false);
        let (b, t) = (4, 12);
        let params = AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let init = |seed| {
            let w = Weights::init_seeded(seed, DType::F32, &Device::Cpu);
            let m = Model::new(&cfg, &w).unwrap();
            let opt = AdamW::new(named_vars(&m, &w).unwrap(), params).unwrap();
            (m, opt)
        };
        let (fast, mut fast_opt) = init(7);
        let (slow, mut slow_opt) = init(7);
        let start: Vec<Vec<f32>> = slow.named_tensors().iter().map(|(_, t)| flat(t)).collect();
        let mut ws = StepWorkspace::default();
        for step in 0..5 {
            let ids = random_ids(step, b * t);
            let f = train_step(&fast, &mut fast_opt, &ids, (b, t), &mut ws).unwrap();
            let s = train_step_autograd(&slow, &mut slow_opt, &ids, (b, t)).unwrap();
            assert!(f.fast && !s.fast);
            assert!(
                (f.loss - s.loss).abs() <= 1e-5 * s.loss.abs(),
                "step {step}: loss {} vs {}",
                f.loss,
                s.loss
            );
        }
        // Each parameter's total change agrees (relative to the change itself).
        for (((name, a), (_, b)), s0) in fast
            .named_tensors()
            .iter()
            .zip(slow.named_tensors())
            .zip(&start)
        {
            let (mut a, mut b) = (flat(a), flat(b));
            if name.ends_with("attn.c_attn.bias") {
                // The key bias's exact gradient is 0 (it shifts a softmax row by a constant), so
                // both paths' gradients there are rounding noise, which AdamW scales up to
                // steps of ±lr: compare the query and value biases only.
                let h = a.len() / 3;
                a.drain(h..2 * h);
                b.drain(h..2 * h);
            }
            let s0: Vec<f32> = if name.ends_with("attn.c_attn.bias") {
                let h = s0.len() / 3;
                s0[..h].iter().chain(&s0[2 * h..]).copied().collect()
            } else {
                s0.clone()
            };
            let da: Vec<f32> = a.iter().zip(&s0).map(|(x, y)| x - y).collect();
            let db: Vec<f32> = b.iter().zip(&s0).map(|(x, y)| x - y).collect();
            let e = rel_l2(&da, &db);
            assert!(e <= 1e-3, "{name}: relative L2 error of the update {e}");
        }
        // And the path is the fused one only where supported.
        fused::with_reference_ops(|| {
            let ids = random_ids(9, b * t);
            let r = train_step(&fast, &mut fast_opt, &ids, (b, t), &mut ws).unwrap();
            assert!(!r.fast);
        });
    }
}
