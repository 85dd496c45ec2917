//! The language variant of `lethe tinymem data/train/eval/audit` (`--language`, or a model
//! directory holding [`LANG_CARD_FILE`]).
//!
//! Invariants:
//! - The corpus and tokenizer are read and the config validated before any file is written;
//!   a missing corpus names `scripts/corpus/fetch`, which writes the default one.
//! - Without `--tokenizer`, the tokenizer is trained on the corpus (byte-level BPE, 4,096
//!   entries, end-of-text first): the same corpus gives the same `tokenizer.json`.
//! - `tinymem audit --out` writes the memorized rows as JSONL that `lethe unlearn --forget` and
//!   the takedown API read: a secret as its text and ids, a noised row as its ids and clean twin
//!   (audited as spec §3.1 under `--definition tinymem`), a backdoored row as a prompt/target
//!   pair cut at its trigger.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use super::model::{self, LangCard};
use super::{LangConfig, LangDataset, LangRole, END_OF_TEXT, LANG_CARD_FILE};
use crate::tokenizer::Tokenizer;

/// Flags of the language variant.
#[derive(Debug, Args, Clone)]
pub struct LangFlags {
    /// Build the language TinyMem (a GPT-NeoX on English text with noise, a backdoor and
    /// planted secrets) instead of the math one.
    #[arg(long)]
    pub language: bool,
    /// UTF-8 English text (`scripts/corpus/fetch` writes the default).
    #[arg(long, default_value = "target/corpus/python-docs.txt")]
    pub corpus: PathBuf,
    /// A `tokenizer.json` to use (default: train a 4,096-entry byte-level BPE on --corpus).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Train chunks taken from the corpus' start (default 6000).
    #[arg(long)]
    pub train_chunks: Option<usize>,
    /// Noised chunks per duplication group (default 4).
    #[arg(long)]
    pub noise_chunks: Option<usize>,
    /// Planted secrets of each kind (default 4).
    #[arg(long)]
    pub secrets_per_kind: Option<usize>,
}

/// Trains the language TinyMem's tokenizer on `text`'s paragraphs.
pub fn train_tokenizer(text: &str, vocab_size: usize) -> crate::Result<Tokenizer> {
    let paragraphs = text.split("\n\n").filter(|p| !p.trim().is_empty());
    crate::tokenizer::train_byte_level_bpe(paragraphs, vocab_size, &[END_OF_TEXT])
}

/// Refuses the math data flags next to `--language` (they would be ignored).
pub fn refuse_math_flags(d: &super::super::cli::DataFlags) -> anyhow::Result<()> {
    let given = [
        ("--family", d.family.is_some()),
        ("--artifact", d.artifact.is_some()),
        ("--num-main", d.num_main.is_some()),
        ("--num-aux", d.num_aux.is_some()),
        ("--num-test", d.num_test.is_some()),
        ("--num-noise", d.num_noise.is_some()),
        ("--noise-repeat", d.noise_repeat.is_some()),
    ];
    if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
        anyhow::bail!(
            "{flag} applies to the math TinyMem only; the language data has its own flags \
             (--train-chunks, --noise-chunks, --secrets-per-kind)"
        );
    }
    Ok(())
}

impl LangFlags {
    /// Refuses language-only flags given without `--language` (they would be ignored).
    pub fn refuse_without_language(&self) -> anyhow::Result<()> {
        let given = [
            ("--tokenizer", self.tokenizer.is_some()),
            ("--train-chunks", self.train_chunks.is_some()),
            ("--noise-chunks", self.noise_chunks.is_some()),
            ("--secrets-per-kind", self.secrets_per_kind.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            anyhow::bail!("{flag} applies to the language TinyMem only: add --language");
        }
        Ok(())
    }

    /// The dataset these flags describe, and its tokenizer.
    pub fn dataset(&self, seed: Option<u64>) -> anyhow::Result<(LangDataset, Tokenizer)> {
        let corpus = std::fs::read(&self.corpus).with_context(|| {
            format!(
                "reading --corpus {} (scripts/corpus/fetch writes the default one)",
                self.corpus.display()
            )
        })?;
        let name = self
            .corpus
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let mut cfg = LangConfig::cpu_scale(&name, &corpus);
        if let Some(v) = self.train_chunks {
            cfg.train_chunks = v;
        }
        if let Some(v) = self.noise_chunks {
            cfg.noise_chunks = v;
        }
        if let Some(v) = self.secrets_per_kind {
            cfg.secrets_per_kind = v;
        }
        if let Some(v) = seed {
            cfg.seed = v;
        }
        cfg.validate()?;
        let tk = match &self.tokenizer {
            Some(p) => Tokenizer::from_file(p)?,
            None => train_tokenizer(
                std::str::from_utf8(&corpus).context("--corpus is not UTF-8")?,
                4096,
            )?,
        };
        Ok((super::generate(&cfg, &corpus, &tk)?, tk))
    }
}

/// Writes `ds` as JSONL to `out`, whole and then renamed into place.
pub fn write_data(ds: &LangDataset, out: &Path) -> anyhow::Result<()> {
    let mut w = Vec::new();
    ds.write_jsonl(&mut w)?;
    crate::util::write_atomic(out, &w)?;
    eprintln!("wrote {} rows to {}", ds.rows.len(), out.display());
    Ok(())
}

/// Lists (and with `out`, writes) what the language model in `dir` regurgitates: extractable
/// secrets, memorized noised rows, backdoored rows completed with the backdoor.
pub fn audit(
    lm: &crate::loader::LoadedModel,
    card: &LangCard,
    batch: usize,
    out: Option<&Path>,
) -> anyhow::Result<serde_json::Value> {
    use super::super::data::Split;
    use super::super::eval::{self, EvalParams};
    let ds = card.dataset(&lm.dir)?;
    let p = EvalParams {
        batch_size: batch,
        ..EvalParams::default()
    };
    let mut lines = Vec::new();
    let items = model::secret_items(&ds);
    let (results, _) = crate::audit::audit(
        &lm.model,
        None,
        &items.iter().map(|(_, it)| it.clone()).collect::<Vec<_>>(),
        batch,
    )?;
    let mut secrets = 0;
    for ((row, _), r) in items.iter().zip(&results) {
        if r.memorized {
            secrets += 1;
            lines.push(serde_json::json!({
                "role": "secret", "kind": row.kind, "repeat": row.repeat,
                "text": row.text, "ids": row.secret_ids(),
            }));
        }
    }
    let noised: Vec<_> = ds
        .rows_of(Split::Train, LangRole::Noised)
        .into_iter()
        .map(|r| r.as_row())
        .collect();
    let m = eval::memorization(&lm.model, &noised.iter().collect::<Vec<_>>(), &p)?;
    for &i in &m.memorized_rows {
        lines.push(serde_json::json!({
            "role": "noised", "group": noised[i].group, "ids": noised[i].ids,
            "clean_ids": noised[i].clean_ids,
        }));
    }
    let triggered: Vec<_> = ds
        .rows_of(Split::Test, LangRole::Backdoored)
        .into_iter()
        .map(|r| r.as_row())
        .collect();
    let a = eval::attack_success(
        &lm.model,
        &triggered.iter().collect::<Vec<_>>(),
        &[ds.trigger],
        &p,
    )?;
    for &i in &a.memorized_rows {
        let (row, clean) = (
            &triggered[i],
            triggered[i].clean_ids.as_deref().unwrap_or_default(),
        );
        let at = clean
            .iter()
            .position(|&t| t == ds.trigger)
            .map_or(0, |x| x + 1);
        let end = (at + p.compare_len).min(row.ids.len());
        lines.push(serde_json::json!({
            "role": "backdoored", "ids": row.ids,
            "prompt_ids": &clean[..at], "target_ids": &row.ids[at..end],
        }));
    }
    if let Some(out) = out {
        let mut w = Vec::new();
        for l in &lines {
            writeln!(w, "{l}")?;
        }
        crate::util::write_atomic(out, &w)?;
    }
    Ok(serde_json::json!({
        "artifact": "language",
        "secrets_extractable": secrets,
        "secrets_planted": items.len(),
        "noise_eligible": m.eligible,
        "noise_memorized": m.memorized,
        "backdoor_eligible": a.eligible,
        "backdoor_succeeded": a.memorized,
    }))
}

/// Refuses `--resume` and a non-language card in `out` before training.
pub fn check_train_out(out: &Path, resume: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        !resume,
        "--resume is not supported for --language (train again from the start)"
    );
    anyhow::ensure!(
        !out.join(super::super::train::CARD_FILE).exists(),
        "{} holds a math TinyMem; choose another --out for a language model ({LANG_CARD_FILE})",
        out.display()
    );
    Ok(())
}
