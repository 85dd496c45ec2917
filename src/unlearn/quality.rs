//! The quality of a model on held-out data, as the gates and the hyper-parameter search measure
//! it.
//!
//! Invariants:
//! - A model with a TinyMem dataset is measured on its clean test tasks through
//!   `tinymem::eval`: per-task accuracy as spec §3.3 (PAD included, mean of per-batch means)
//!   and the mean over the tasks of their §3.4 perplexity. Any other model: the mean perplexity
//!   of its held-out sequences.
//! - [`Quality::relative_accuracy_change`] is the mean over tasks of `(after − before) / before`
//!   (spec §3.6); `None` for a model without tasks.
//! - [`quality`] only reads the model.

use serde::{Deserialize, Serialize};

use crate::engine;
use crate::models::Model;
use crate::tinymem::data::Dataset;
use crate::tinymem::eval::{self, EvalParams};

/// Quality of a model on held-out data: per-task accuracies (TinyMem) and/or perplexity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub accuracy_by_task: Vec<(String, f64)>,
    pub perplexity: f64,
}

impl Quality {
    /// Mean over test tasks of (after − before) / before (spec §3.6); `None` without tasks.
    pub fn relative_accuracy_change(&self, after: &Quality) -> Option<f64> {
        (!self.accuracy_by_task.is_empty()).then(|| {
            self.accuracy_by_task
                .iter()
                .zip(&after.accuracy_by_task)
                .map(|((_, b), (_, a))| (a - b) / b)
                .sum::<f64>()
                / self.accuracy_by_task.len() as f64
        })
    }
}

/// Held-out quality: TinyMem test-task accuracies (and their §3.4 perplexity), or the mean
/// perplexity of held-out sequences.
pub fn quality(
    model: &Model,
    tinymem: Option<&Dataset>,
    heldout: &[Vec<u32>],
) -> crate::Result<Quality> {
    if let Some(ds) = tinymem {
        let r = eval::task_quality(model, ds, &EvalParams::default())?;
        return Ok(Quality {
            accuracy_by_task: r.accuracy_by_task.into_iter().collect(),
            perplexity: r.perplexity,
        });
    }
    let scores = engine::score(model, heldout, 32)?;
    let ppl = scores.iter().map(|s| s.perplexity).sum::<f64>() / scores.len().max(1) as f64;
    Ok(Quality {
        accuracy_by_task: Vec::new(),
        perplexity: ppl,
    })
}

pub fn mean_accuracy(q: &Quality) -> Option<f64> {
    (!q.accuracy_by_task.is_empty()).then(|| {
        q.accuracy_by_task.iter().map(|(_, a)| a).sum::<f64>() / q.accuracy_by_task.len() as f64
    })
}
