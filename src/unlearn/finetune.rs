//! The fine-tuning baselines (spec §4.8): continue training a TinyMem model on data that
//! contradicts or dilutes its artifact, the paper's second class of mitigation (effective,
//! but it retrains).
//!
//! Invariants:
//! - The data comes from the model's card, regenerated exactly (math) or read back checked
//!   (language): Clean-FT trains on the clean versions of the artifact rows (the noised or
//!   backdoored training rows, each once), Extra-FT on every training row that is not an
//!   artifact row (the language model's planted secrets are artifact rows without a clean
//!   version), Both-FT on the union.
//! - Training continues as the model was trained (the card's AdamW settings, batch size and
//!   seed, no regularizer) for `epochs` more passes (the paper's 5), resuming the AdamW state
//!   from `optimizer.safetensors` when the directory has it; the bundled models ship without
//!   it (to keep the repository small), so there the moments start from zero, and the report
//!   says which.
//! - The input model is never mutated; the result is a new model. A model without a TinyMem
//!   card (math or language) is refused with an error naming both.

use std::path::Path;

use crate::error::{Error, Result};
use crate::models::Model;
use crate::tinymem::data::{Dataset, Role, Row, Split};
use crate::tinymem::lang::{LangCard, LangDataset, LangRole};
use crate::tinymem::train::{continue_training, Card};

/// Which rows Fine-tuning trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FtData {
    /// The clean versions of the artifact rows.
    Clean,
    /// Every non-artifact training row.
    Extra,
    /// Both.
    Both,
}

impl FtData {
    pub fn name(self) -> &'static str {
        match self {
            Self::Clean => "ft-clean",
            Self::Extra => "ft-extra",
            Self::Both => "ft-both",
        }
    }
}

/// What a fine-tuning baseline did.
pub struct FtOutcome {
    pub model: Model,
    pub rows: usize,
    pub steps: usize,
    pub seconds: f64,
    pub optimizer_resumed: bool,
}

/// The rows of `data` among training rows given as `(is an artifact row, ids, clean twin)`,
/// repetition applied.
fn select<'a>(
    train: impl Iterator<Item = (bool, &'a [u32], Option<&'a [u32]>)> + Clone,
    data: FtData,
) -> Vec<Vec<u32>> {
    let mut rows = Vec::new();
    if matches!(data, FtData::Clean | FtData::Both) {
        // Each artifact row's twin once (the training set repeats the artifact rows).
        let mut seen = std::collections::HashSet::new();
        for (_, _, clean) in train.clone().filter(|r| r.0) {
            if let Some(clean) = clean {
                if seen.insert(clean) {
                    rows.push(clean.to_vec());
                }
            }
        }
    }
    if matches!(data, FtData::Extra | FtData::Both) {
        rows.extend(train.filter(|r| !r.0).map(|r| r.1.to_vec()));
    }
    rows
}

/// The rows of `data` for the math dataset `ds` (training rows only).
pub fn ft_rows(ds: &Dataset, data: FtData) -> Vec<Vec<u32>> {
    let train = ds.train_rows();
    let artifact = |r: &Row| matches!(r.role, Role::Noised | Role::Backdoored);
    select(
        train
            .into_iter()
            .map(|r| (artifact(r), r.ids.as_slice(), r.clean_ids.as_deref())),
        data,
    )
}

/// The rows of `data` for the language dataset `ds` (training rows only). Its artifact rows
/// are the noised chunks, the backdoored chunks and the planted secrets; a secret has no clean
/// version, so Clean-FT trains on the noised and backdoored chunks' twins only.
pub fn lang_ft_rows(ds: &LangDataset, data: FtData) -> Vec<Vec<u32>> {
    let train = ds.rows.iter().filter(|r| r.split == Split::Train);
    select(
        train.flat_map(|r| {
            std::iter::repeat_n(
                (
                    r.role != LangRole::Clean,
                    r.ids.as_slice(),
                    r.clean_ids.as_deref(),
                ),
                r.repeat as usize,
            )
        }),
        data,
    )
}

/// Fine-tunes the TinyMem model (math or language) in `dir` (`model` is its loaded weights)
/// on `data` for `epochs` passes.
pub fn fine_tune(model: &Model, dir: &Path, data: FtData, epochs: usize) -> Result<FtOutcome> {
    if epochs == 0 {
        return Err(Error::invalid("epochs", "must be positive"));
    }
    let (rows, train, t) = if let Some(card) = LangCard::read_if_present(dir)? {
        let ds = card.dataset(dir)?;
        (lang_ft_rows(&ds, data), card.train, ds.config.max_ctx)
    } else {
        let card = Card::read_if_present(dir)?.ok_or_else(|| {
            Error::invalid(
                "model",
                format!(
                    "{} has no TinyMem card ({} or {}): the fine-tuning baselines retrain on \
                     the card's data",
                    dir.display(),
                    crate::tinymem::train::CARD_FILE,
                    crate::tinymem::lang::LANG_CARD_FILE
                ),
            )
        })?;
        let ds = card.dataset()?;
        (ft_rows(&ds, data), card.train, ds.config.max_ctx)
    };
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let c = continue_training(
        model,
        Some(&dir.join("optimizer.safetensors")),
        &train,
        &refs,
        t,
        epochs,
    )?;
    Ok(FtOutcome {
        model: c.model,
        rows: rows.len(),
        steps: c.steps,
        seconds: c.seconds,
        optimizer_resumed: c.optimizer_resumed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tinymem::data::{generate, DataConfig};

    #[test]
    fn each_variant_takes_its_rows() {
        let ds = generate(&DataConfig {
            num_main: 60,
            num_aux: 20,
            num_test: 10,
            num_noise: 3,
            noise_repeat: 5,
            length: 6,
            max_ctx: 30,
            ..DataConfig::default()
        })
        .unwrap();
        let train = ds.train_rows();
        let noised: Vec<_> = train.iter().filter(|r| r.role == Role::Noised).collect();
        assert_eq!(noised.len(), 15, "3 noised rows, 5 times each");
        let clean = ft_rows(&ds, FtData::Clean);
        assert_eq!(clean.len(), 3, "each artifact row's clean twin once");
        for c in &clean {
            assert!(noised.iter().any(|r| r.clean_ids.as_ref() == Some(c)));
        }
        let extra = ft_rows(&ds, FtData::Extra);
        assert_eq!(extra.len(), train.len() - 15);
        assert!(extra.iter().all(|e| !noised.iter().any(|r| &r.ids == e)));
        assert_eq!(ft_rows(&ds, FtData::Both), [clean, extra].concat());
    }

    #[test]
    fn the_language_variants_leave_out_every_artifact_row() {
        let (corpus, tk, cfg) = crate::tinymem::lang::test_fixture();
        let ds = crate::tinymem::lang::generate(&cfg, &corpus, &tk).unwrap();
        let train = |role| ds.rows_of(Split::Train, role);
        let twins: Vec<Vec<u32>> = [LangRole::Noised, LangRole::Backdoored]
            .into_iter()
            .flat_map(train)
            .map(|r| r.clean_ids.clone().expect("a twin"))
            .collect();
        assert!(!twins.is_empty());
        let clean = lang_ft_rows(&ds, FtData::Clean);
        let unique: std::collections::HashSet<_> = twins.iter().collect();
        assert_eq!(clean.len(), unique.len(), "each twin once");
        assert!(clean.iter().all(|c| unique.contains(c)));
        let extra = lang_ft_rows(&ds, FtData::Extra);
        let plain: Vec<Vec<u32>> = train(LangRole::Clean)
            .into_iter()
            .flat_map(|r| std::iter::repeat_n(r.ids.clone(), r.repeat as usize))
            .collect();
        assert_eq!(extra, plain);
        // No secret, noised or backdoored row is trained on.
        for role in [LangRole::Secret, LangRole::Noised, LangRole::Backdoored] {
            for r in train(role) {
                assert!(
                    !extra.contains(&r.ids) && !clean.contains(&r.ids),
                    "{role:?}"
                );
            }
        }
        assert_eq!(lang_ft_rows(&ds, FtData::Both), [clean, extra].concat());
    }
}
