//! The fine-tuning baselines (spec §4.8): continue training a TinyMem model on data that
//! contradicts or dilutes its artifact, the paper's second class of mitigation (effective,
//! but it retrains).
//!
//! Invariants:
//! - The data comes from the model's card, regenerated exactly: Clean-FT trains on the clean
//!   versions of the artifact rows (the noised or backdoored training rows, each once),
//!   Extra-FT on every training row that is not an artifact row, Both-FT on the union.
//! - Training continues as the model was trained (the card's AdamW settings, batch size and
//!   seed, no regularizer) for `epochs` more passes (the paper's 5), resuming the AdamW state
//!   from `optimizer.safetensors` when the directory has it; the bundled models ship without
//!   it (to keep the repository small), so there the moments start from zero, and the report
//!   says which.
//! - The input model is never mutated; the result is a new model. A model without a math
//!   TinyMem card is refused with an error naming it.

use std::path::Path;

use crate::error::{Error, Result};
use crate::models::Model;
use crate::tinymem::data::{Dataset, Role, Row};
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

/// The rows of `data` for the dataset `ds` (training rows only).
pub fn ft_rows(ds: &Dataset, data: FtData) -> Vec<Vec<u32>> {
    let train = ds.train_rows();
    let artifact = |r: &Row| matches!(r.role, Role::Noised | Role::Backdoored);
    let mut rows = Vec::new();
    if matches!(data, FtData::Clean | FtData::Both) {
        // Each artifact row once (the training set repeats them `noise_repeat` times).
        let mut seen = std::collections::HashSet::new();
        for r in train.iter().filter(|r| artifact(r)) {
            if let Some(clean) = &r.clean_ids {
                if seen.insert(clean.clone()) {
                    rows.push(clean.clone());
                }
            }
        }
    }
    if matches!(data, FtData::Extra | FtData::Both) {
        rows.extend(train.iter().filter(|r| !artifact(r)).map(|r| r.ids.clone()));
    }
    rows
}

/// Fine-tunes the TinyMem model in `dir` (`model` is its loaded weights) on `data` for
/// `epochs` passes.
pub fn fine_tune(model: &Model, dir: &Path, data: FtData, epochs: usize) -> Result<FtOutcome> {
    if epochs == 0 {
        return Err(Error::invalid("epochs", "must be positive"));
    }
    let card = Card::read_if_present(dir)?.ok_or_else(|| {
        Error::invalid(
            "model",
            format!(
                "{} has no math TinyMem card ({}): the fine-tuning baselines retrain on the \
                 card's data",
                dir.display(),
                crate::tinymem::train::CARD_FILE
            ),
        )
    })?;
    let ds = card.dataset()?;
    let rows = ft_rows(&ds, data);
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let c = continue_training(
        model,
        Some(&dir.join("optimizer.safetensors")),
        &card.train,
        &refs,
        ds.config.max_ctx,
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
}
