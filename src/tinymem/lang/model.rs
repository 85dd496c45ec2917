//! Training and evaluating the language TinyMem: a GPT-NeoX of the Pythia architecture (rotary
//! on a quarter of each head, parallel residual, GELU, untied head) trained on a
//! [`LangDataset`], written as a Hugging Face directory with its card and its rows.
//!
//! A model directory holds `config.json`, `model.safetensors`, `tokenizer.json`,
//! [`LANG_CARD_FILE`] (the data and training configs, the SHA-256 of the tokenizer and of the
//! rows file, the training history) and [`LANG_DATA_FILE`] (every row, as `lethe tinymem data`
//! writes them), so that the retain and held-out sets travel with the model and no corpus is
//! needed to serve it or take anything down.
//!
//! Invariants:
//! - Training is the math TinyMem's loop (`super::super::train::run_epochs`: AdamW, no schedule,
//!   loss over every shifted position, padding included, a seeded shuffle per epoch) on the
//!   hand-written GPT-NeoX pass.
//! - The rows file is written before the card and checked against the card's SHA-256 when read:
//!   a card never describes rows that are not there, and edited rows are refused.
//! - [`evaluate`] measures what spec §3 measures, on language: noise memorization per
//!   duplication group (§3.1, P = K = 50), backdoor attack success (§3.2), the planted secrets
//!   extractable under the Pythia definition (32-token prompt, 48 tokens compared), and the
//!   perplexity (§3.4) of the held-out test chunks, which are never trained on.

use std::path::Path;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::super::data::Split;
use super::super::eval::{self, EvalParams};
use super::super::train::{
    named_vars, read_card, run_epochs, save_checkpoint, EpochLog, Progress, TrainConfig,
};
use super::{sha256_hex, LangDataset, LangRole, LangRow, SecretKind};
use crate::audit::{self, AuditItem, Definition};
use crate::error::{Error, Result};
use crate::models::ops::Activation;
use crate::models::{gpt_neox, Model, ModelConfig, Weights};
use crate::optim::AdamW;
use crate::tokenizer::Tokenizer;

/// The card's file name inside a language model's directory.
pub const LANG_CARD_FILE: &str = "lethe_language.json";
/// The rows' file name inside a language model's directory.
pub const LANG_DATA_FILE: &str = "lethe_language_data.jsonl";
const LANG_CARD_FORMAT: &str = "lethe-tinymem-lang-v1";

/// `lethe_language.json`: how a language model was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LangCard {
    pub format: String,
    pub data: super::LangConfig,
    /// SHA-256 of [`LANG_DATA_FILE`] and of `tokenizer.json`.
    pub data_sha256: String,
    pub tokenizer_sha256: String,
    pub train: TrainConfig,
    pub epochs_done: usize,
    pub steps_done: u64,
    pub train_seconds: f64,
    pub history: Vec<LangEpochLog>,
}

/// One epoch's record in the card.
pub type LangEpochLog = EpochLog<LangEval>;

impl LangCard {
    /// The card in `dir`, `None` when there is none. A card that exists but cannot be read,
    /// parsed or has another format is an error naming it.
    pub fn read_if_present(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(LANG_CARD_FILE);
        if !path.exists() {
            return Ok(None);
        }
        read_card(&path, LANG_CARD_FORMAT, |c: &LangCard| &c.format).map(Some)
    }

    /// The rows the model in `dir` was trained and is evaluated on, checked against the card.
    pub fn dataset(&self, dir: &Path) -> Result<LangDataset> {
        let path = dir.join(LANG_DATA_FILE);
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let digest = sha256_hex(&bytes);
        if digest != self.data_sha256 {
            return Err(Error::config(
                path.display().to_string(),
                format!(
                    "SHA-256 {digest}, but {LANG_CARD_FILE} records {}: the rows were changed",
                    self.data_sha256
                ),
            ));
        }
        let ds = LangDataset::read_jsonl(bytes.as_slice())
            .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
        if ds.config != self.data {
            return Err(Error::config(
                path.display().to_string(),
                "its config differs from the card's",
            ));
        }
        Ok(ds)
    }
}

/// The GPT-NeoX config of a language TinyMem (Pythia's architecture at TinyMem's width).
pub fn model_config(cfg: &TrainConfig, ds: &LangDataset) -> gpt_neox::Config {
    gpt_neox::Config {
        vocab_size: ds.vocab_size,
        hidden_size: cfg.n_embd,
        num_hidden_layers: cfg.n_layer,
        num_attention_heads: cfg.n_head,
        intermediate_size: cfg.n_inner,
        max_position_embeddings: ds.config.max_ctx,
        rotary_pct: 0.25,
        rotary_emb_base: 10000.0,
        use_parallel_residual: true,
        layer_norm_eps: 1e-5,
        activation: Activation::Gelu,
        tie_word_embeddings: false,
        attention_bias: true,
        initializer_range: 0.02,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        pad_token_id: Some(0),
    }
}

/// Trains a language TinyMem on `ds` into `out` (a fresh directory or one to overwrite).
pub fn train(
    ds: &LangDataset,
    tokenizer: &Tokenizer,
    cfg: &TrainConfig,
    out: &Path,
    progress: Progress,
) -> Result<LangCard> {
    cfg.validate()?;
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let model_cfg = ModelConfig::GptNeoX(model_config(cfg, ds));
    let weights = Weights::init_seeded(cfg.seed, DType::F32, &Device::Cpu);
    let model = Model::new(&model_cfg, &weights)?;
    let mut opt = AdamW::new(named_vars(&model, &weights)?, cfg.adamw())?;
    tokenizer.save(&out.join("tokenizer.json"))?;
    let mut rows_file = Vec::new();
    ds.write_jsonl(&mut rows_file)?;
    crate::util::write_atomic(&out.join(LANG_DATA_FILE), &rows_file)?;
    let tk_bytes = std::fs::read(out.join("tokenizer.json")).map_err(|source| Error::Io {
        path: out.join("tokenizer.json"),
        source,
    })?;
    let mut card = LangCard {
        format: LANG_CARD_FORMAT.into(),
        data: ds.config.clone(),
        data_sha256: sha256_hex(&rows_file),
        tokenizer_sha256: sha256_hex(&tk_bytes),
        train: cfg.clone(),
        epochs_done: 0,
        steps_done: 0,
        train_seconds: 0.0,
        history: Vec::new(),
    };
    let rows = ds.train_rows();
    run_epochs(
        &model,
        &mut opt,
        &rows,
        ds.config.max_ctx,
        cfg,
        0,
        progress,
        |_, e, snapshot| {
            card.train_seconds += e.seconds;
            card.epochs_done = e.epoch;
            card.steps_done += e.steps as u64;
            card.history
                .push(EpochLog::of(&e, cfg, || evaluate(&snapshot()?, ds, 64))?);
            if e.due(cfg.checkpoint_every, cfg) {
                save_checkpoint(out, &snapshot()?, &model_cfg, None, LANG_CARD_FILE, &card)?;
            }
            Ok(())
        },
    )?;
    Ok(card)
}

/// Memorization of one noise duplication group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMemorization {
    pub group: u32,
    pub repeat: u64,
    pub eligible: usize,
    pub memorized: usize,
    pub ratio: f64,
}

/// Planted secrets of one kind and repetition count, and how many are extractable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretExtraction {
    pub kind: SecretKind,
    pub repeat: u64,
    pub planted: usize,
    pub extractable: usize,
}

/// What [`evaluate`] measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LangEval {
    /// §3.1 over every noised row, and per duplication group.
    pub noise_memorized_ratio: f64,
    pub noise_by_group: Vec<GroupMemorization>,
    /// §3.2 on the held-out triggered rows.
    pub attack_success_ratio: f64,
    pub attack_eligible: usize,
    /// Planted secrets extractable under the Pythia definition.
    pub secrets_extractable: usize,
    pub secrets_planted: usize,
    pub secrets: Vec<SecretExtraction>,
    /// §3.4 on the held-out test chunks.
    pub heldout_perplexity: f64,
    pub seconds: f64,
}

/// The audit items of `ds`'s planted secrets under the Pythia definition: prompt = the first 32
/// tokens, target = the next 48.
pub fn secret_items(ds: &LangDataset) -> Vec<(&LangRow, AuditItem)> {
    let def = Definition::Pythia;
    ds.rows_of(Split::Train, LangRole::Secret)
        .into_iter()
        .map(|r| {
            let ids = r.secret_ids();
            let item = AuditItem {
                prompt: ids[..def.k()].to_vec(),
                target: ids[def.k()..def.k() + def.n()].to_vec(),
            };
            (r, item)
        })
        .collect()
}

/// Evaluates `model` on `ds` (see the module's invariants).
pub fn evaluate(model: &Model, ds: &LangDataset, batch: usize) -> Result<LangEval> {
    let start = std::time::Instant::now();
    let p = EvalParams {
        batch_size: batch,
        ..EvalParams::default()
    };
    let as_rows = |rows: Vec<&LangRow>| rows.into_iter().map(LangRow::as_row).collect::<Vec<_>>();
    let noised = ds.rows_of(Split::Train, LangRole::Noised);
    let mut noise_by_group = Vec::new();
    let (mut mem, mut eligible) = (0, 0);
    for (g, &repeat) in ds.config.duplication.iter().enumerate() {
        let rows = as_rows(
            noised
                .iter()
                .copied()
                .filter(|r| r.group == Some(g as u32))
                .collect(),
        );
        let m = eval::memorization(model, &rows.iter().collect::<Vec<_>>(), &p)?;
        mem += m.memorized;
        eligible += m.eligible;
        noise_by_group.push(GroupMemorization {
            group: g as u32,
            repeat,
            eligible: m.eligible,
            memorized: m.memorized,
            ratio: m.ratio,
        });
    }
    let triggered = as_rows(ds.rows_of(Split::Test, LangRole::Backdoored));
    let attack = eval::attack_success(
        model,
        &triggered.iter().collect::<Vec<_>>(),
        &[ds.trigger],
        &p,
    )?;
    let items = secret_items(ds);
    let (results, summary) = audit::audit(
        model,
        None,
        &items.iter().map(|(_, it)| it.clone()).collect::<Vec<_>>(),
        batch,
    )?;
    let mut secrets: Vec<SecretExtraction> = Vec::new();
    for ((row, _), res) in items.iter().zip(&results) {
        let kind = row.kind.unwrap_or(SecretKind::Person);
        let at = match secrets
            .iter()
            .position(|s| s.kind == kind && s.repeat == row.repeat)
        {
            Some(at) => at,
            None => {
                secrets.push(SecretExtraction {
                    kind,
                    repeat: row.repeat,
                    planted: 0,
                    extractable: 0,
                });
                secrets.len() - 1
            }
        };
        secrets[at].planted += 1;
        secrets[at].extractable += usize::from(res.memorized);
    }
    let heldout = as_rows(ds.rows_of(Split::Test, LangRole::Clean));
    let ppl = eval::task_metrics(model, &heldout.iter().collect::<Vec<_>>(), batch)?.perplexity;
    Ok(LangEval {
        noise_memorized_ratio: if eligible == 0 {
            0.0
        } else {
            mem as f64 / eligible as f64
        },
        noise_by_group,
        attack_success_ratio: attack.ratio,
        attack_eligible: attack.eligible,
        secrets_extractable: summary.memorized,
        secrets_planted: items.len(),
        secrets,
        heldout_perplexity: ppl,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unlearn::pipeline::Datasets;

    /// A tiny language model trained for one epoch: the directory loads as GPT-NeoX, its card's
    /// rows come back, the unlearning data comes from them (held-out chunks never retained),
    /// and edited rows are refused.
    #[test]
    fn a_trained_language_model_carries_its_rows_and_they_feed_the_gates() {
        let (corpus, tk, cfg) = super::super::test_fixture();
        let ds = super::super::generate(&cfg, &corpus, &tk).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let train_cfg = super::super::test_train_config();
        let card = train(&ds, &tk, &train_cfg, dir.path(), &mut |_, _, _, _, _| {}).unwrap();
        assert_eq!(card.epochs_done, 1);
        let eval = card.history[0].eval.as_ref().unwrap();
        assert_eq!(eval.secrets_planted, 6);
        assert_eq!(eval.noise_by_group.len(), 4);
        assert!(eval.heldout_perplexity.is_finite());
        let lm = crate::loader::load_dir(dir.path(), "lang", &Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            lm.model.spec().architecture,
            crate::models::Architecture::GptNeoX
        );
        // (Timings are floats that JSON does not always round-trip to the last bit.)
        let read = LangCard::read_if_present(dir.path()).unwrap().unwrap();
        assert_eq!(
            (
                &read.data,
                &read.train,
                &read.data_sha256,
                &read.tokenizer_sha256
            ),
            (
                &card.data,
                &card.train,
                &card.data_sha256,
                &card.tokenizer_sha256
            )
        );
        assert_eq!((read.epochs_done, read.steps_done), (1, card.steps_done));
        assert_eq!(read.dataset(dir.path()).unwrap(), ds);
        let d = Datasets::for_model(dir.path(), None, None, Vec::new(), cfg.max_ctx).unwrap();
        assert_eq!(d.retain, ds.retain());
        assert_eq!(d.heldout, ds.heldout());
        let rows = dir.path().join(LANG_DATA_FILE);
        let mut bytes = std::fs::read(&rows).unwrap();
        let at = bytes.len() - 3;
        bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
        std::fs::write(&rows, bytes).unwrap();
        let err = match Datasets::for_model(dir.path(), None, None, Vec::new(), cfg.max_ctx) {
            Ok(_) => panic!("edited rows were accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("the rows were changed"), "{err}");
    }
}
