//! Greedy (spec §4.5, after Maini et al. 2023): zero one MLP parameter entry per iteration, the
//! one whose first-order estimate of the loss decrease is largest.
//!
//! Each iteration takes the next batch of a shuffled pass over forget (label +1) ∪ retain
//! (label −1), computes `L = Σ_retain ℓ − Σ_forget ℓ` (the reference's per-sample `ℓ·(−B·label)`
//! averaged over the batch) and its gradient, and over every parameter whose name contains
//! `mlp` (weights and biases) zeroes the entry with the largest `θ · ∂L/∂θ`, if that is above
//! 0 (the reference's running maximum starts at 0: otherwise the iteration changes nothing).
//! It stops after `⌊ratio · (number of parameters)⌋` iterations, cycling over epochs.
//!
//! Invariants:
//! - The input model is never mutated; the gradient of every iteration is taken on the model
//!   as edited so far.
//! - It runs on the hand-written pass (f32 weights on the CPU) and says so otherwise.
//! - Bad settings, an empty forget or retain set and rows outside the context are refused
//!   before any work; the order of batches is drawn from `seed`; [`JobControl::cancel`] stops
//!   it between two iterations with [`Error::Cancelled`].

use std::collections::HashMap;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{JobControl, Padded};
use crate::error::{Error, Result};
use crate::models::pass::{HandWrittenPass, MlpGradWorkspace};
use crate::models::Model;

/// Greedy's settings (the reference: batch 64).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GreedyConfig {
    /// Iterations = `⌊ratio · parameters⌋`.
    pub ratio: f64,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for GreedyConfig {
    fn default() -> Self {
        Self {
            ratio: 1e-4,
            batch_size: 64,
            seed: 0,
        }
    }
}

/// What Greedy did.
pub struct GreedyOutcome {
    pub model: Model,
    pub iterations: usize,
    /// The entries zeroed, in order: `(parameter name, flat index)`.
    pub zeroed: Vec<(String, usize)>,
    pub seconds: f64,
}

pub fn greedy(
    model: &Model,
    forget: &[Vec<u32>],
    retain: &[Vec<u32>],
    cfg: &GreedyConfig,
    ctl: &JobControl,
) -> Result<GreedyOutcome> {
    if !(0.0..1.0).contains(&cfg.ratio) {
        return Err(Error::invalid("ratio", "must be in [0, 1)"));
    }
    if cfg.batch_size == 0 {
        return Err(Error::invalid("batch_size", "must be positive"));
    }
    if forget.is_empty() {
        return Err(Error::invalid("forget", "the forget set is empty"));
    }
    if retain.is_empty() {
        return Err(Error::invalid("retain", "the retain set is empty"));
    }
    let ctx = model.spec().context_length;
    super::check_rows("forget", forget, ctx)?;
    super::check_rows("retain", retain, ctx)?;
    if !super::on_hand_written_pass(model) {
        return Err(Error::invalid(
            "model",
            "Greedy runs on the hand-written pass: f32 weights on the CPU",
        ));
    }
    let start = Instant::now();
    let iterations = (cfg.ratio * model.num_parameters() as f64).floor() as usize;
    // The candidates: every parameter named `…mlp…`, as editable vectors.
    let mut mlp: Vec<(String, Vec<f32>)> = model
        .named_tensors()
        .iter()
        .filter(|(n, _)| n.contains("mlp"))
        .map(|(n, t)| Ok((n.clone(), t.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    let slot: HashMap<&str, usize> = model
        .named_tensors()
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    let slots: Vec<usize> = mlp.iter().map(|(n, _)| slot[n.as_str()]).collect();
    let mut examples: Vec<(&[u32], f32)> = forget
        .iter()
        .map(|s| (s.as_slice(), -1.0))
        .chain(retain.iter().map(|s| (s.as_slice(), 1.0)))
        .collect();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut current = model.clone();
    let mut ws = MlpGradWorkspace::default();
    let mut zeroed = Vec::new();
    let mut done = 0;
    'epochs: while done < iterations {
        examples.shuffle(&mut rng);
        for batch in examples.chunks(cfg.batch_size) {
            if done == iterations {
                break 'epochs;
            }
            if ctl.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let p = Padded::rows(batch.iter().map(|(s, _)| *s));
            let weight: Vec<f32> = batch.iter().map(|(_, w)| *w).collect();
            let out = match &current {
                Model::Gpt2(m) => m.weighted_grads(&p.ids, p.bt, &p.lens, &weight, &mut ws)?,
                Model::GptNeoX(m) => m.weighted_grads(&p.ids, p.bt, &p.lens, &weight, &mut ws)?,
            };
            // The entry with the largest θ·g above 0 (first found wins a tie).
            let mut best: Option<(usize, usize)> = None;
            let mut best_score = 0f32;
            for (k, ((_, theta), &s)) in mlp.iter().zip(&slots).enumerate() {
                for (i, (&p, &g)) in theta.iter().zip(out.grads[s]).enumerate() {
                    if p * g > best_score {
                        best_score = p * g;
                        best = Some((k, i));
                    }
                }
            }
            done += 1;
            if let Some((k, i)) = best {
                mlp[k].1[i] = 0.0;
                zeroed.push((mlp[k].0.clone(), i));
                current =
                    current.with_edits("Greedy edit", [(mlp[k].0.clone(), mlp[k].1.clone())])?;
            }
        }
    }
    Ok(GreedyOutcome {
        model: current,
        iterations,
        zeroed,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{memorizing, Memorizing};

    #[test]
    fn greedy_zeroes_one_mlp_entry_per_iteration_and_nothing_else() {
        let m = memorizing();
        let cfg = GreedyConfig {
            ratio: 0.01,
            ..GreedyConfig::default()
        };
        let out = greedy(&m.model, &m.forget, &m.retain, &cfg, &JobControl::new()).unwrap();
        assert_eq!(out.iterations, m.model.num_parameters() / 100);
        assert!(!out.zeroed.is_empty() && out.zeroed.len() <= out.iterations);
        let zeroed: std::collections::HashSet<_> = out.zeroed.iter().cloned().collect();
        assert_eq!(
            zeroed.len(),
            out.zeroed.len(),
            "an entry already 0 is never chosen again"
        );
        for ((name, before), (_, after)) in m
            .model
            .named_tensors()
            .iter()
            .zip(out.model.named_tensors())
        {
            let (b, a): (Vec<f32>, Vec<f32>) = (
                before.flatten_all().unwrap().to_vec1().unwrap(),
                after.flatten_all().unwrap().to_vec1().unwrap(),
            );
            for (i, (x, y)) in b.iter().zip(&a).enumerate() {
                if zeroed.contains(&(name.clone(), i)) {
                    assert!(name.contains("mlp") && *y == 0.0, "{name}[{i}]");
                } else {
                    assert_eq!(x, y, "{name}[{i}] changed");
                }
            }
        }
        assert!(Memorizing::extractable(&out.model, &m.forget) < 4);
        assert!(matches!(
            greedy(&m.model, &m.forget, &[], &cfg, &JobControl::new()),
            Err(Error::InvalidInput { field, .. }) if field == "retain"
        ));
    }
}
