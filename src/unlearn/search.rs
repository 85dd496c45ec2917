//! Hyper-parameter search for score-mask unlearning under a wall-time budget.
//!
//! Invariants:
//! - Candidates run in the order given ([`paper_grid`]: the 90 settings of spec §4.4, cheapest
//!   first). No candidate starts once `budget_seconds` have passed, and a started one runs to its
//!   end; every candidate tried is reported.
//! - Every candidate starts from the input model, which is never mutated.
//! - The winner minimises the paper's selection score (spec §3.6): for TinyMem
//!   `Δmem_rel − mean_task(Δacc_rel)`, otherwise `Δmem_% + Δperplexity_%`. A run whose
//!   perplexity is not finite scores +∞; on equal scores the earlier candidate wins.
//! - A candidate that fails (bad settings, cancellation) ends the search with its error.

use std::time::Instant;

use serde::Serialize;

pub use super::quality::Quality;
use super::{balanced_subnet, BalancedSubnetConfig, JobControl, Mode, Outcome};
use crate::audit::{self, AuditItem};
use crate::error::Result;
use crate::models::Model;

/// The paper's BalancedSubnet grid (spec §4.4): ratio × epochs × w, cheapest first.
pub fn paper_grid(base: &BalancedSubnetConfig) -> Vec<BalancedSubnetConfig> {
    let ratios = [1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.8];
    let mut out = Vec::new();
    for epochs in [1, 10, 20] {
        for w in [0.9, 0.7, 0.5] {
            for ratio in ratios {
                out.push(BalancedSubnetConfig {
                    ratio,
                    w,
                    epochs,
                    mode: Mode::Paper,
                    ..base.clone()
                });
            }
        }
    }
    out
}

/// One tried candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub config: BalancedSubnetConfig,
    pub memorized_after: f64,
    pub quality_after: Quality,
    pub score: f64,
    pub seconds: f64,
}

/// The selection score of spec §3.6 (lower is better).
pub fn selection_score(mem_before: f64, mem_after: f64, before: &Quality, after: &Quality) -> f64 {
    if !after.perplexity.is_finite() {
        return f64::INFINITY;
    }
    let mem_rel = if mem_before > 0.0 {
        (mem_after - mem_before) / mem_before
    } else {
        mem_after
    };
    if let Some(acc_rel) = before.relative_accuracy_change(after) {
        mem_rel - acc_rel
    } else {
        let ppl_rel = (after.perplexity - before.perplexity) / before.perplexity;
        100.0 * mem_rel + 100.0 * ppl_rel
    }
}

/// Result of a search: every candidate tried and the index of the winner with its outcome.
pub struct SearchResult {
    pub candidates: Vec<Candidate>,
    pub best: Option<(usize, Outcome)>,
    pub budget_exhausted: bool,
}

/// Tries `grid` in order within `budget_seconds`, keeping the best outcome by
/// [`selection_score`]. `quality` measures a model on held-out data.
#[allow(clippy::too_many_arguments)]
pub fn search(
    model: &Model,
    forget: &[Vec<u32>],
    retain: &[Vec<u32>],
    items: &[AuditItem],
    grid: &[BalancedSubnetConfig],
    budget_seconds: f64,
    ctl: &JobControl,
    quality: &dyn Fn(&Model) -> Result<Quality>,
) -> Result<SearchResult> {
    let start = Instant::now();
    let (_, before_mem) = audit::audit(model, None, items, 64)?;
    let before = quality(model)?;
    let mut candidates = Vec::new();
    let mut best: Option<(usize, Outcome, f64)> = None;
    let mut budget_exhausted = false;
    for cfg in grid {
        if start.elapsed().as_secs_f64() >= budget_seconds {
            budget_exhausted = true;
            break;
        }
        let out = balanced_subnet(model, forget, retain, items, cfg, ctl)?;
        let (_, after_mem) = audit::audit(&out.model, None, items, 64)?;
        let after = quality(&out.model)?;
        let score = selection_score(before_mem.rate, after_mem.rate, &before, &after);
        candidates.push(Candidate {
            config: cfg.clone(),
            memorized_after: after_mem.rate,
            quality_after: after,
            score,
            seconds: out.seconds,
        });
        if best.as_ref().is_none_or(|(_, _, s)| score < *s) {
            best = Some((candidates.len() - 1, out, score));
        }
    }
    Ok(SearchResult {
        candidates,
        best: best.map(|(i, o, _)| (i, o)),
        budget_exhausted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(acc: &[f64], ppl: f64) -> Quality {
        Quality {
            accuracy_by_task: acc
                .iter()
                .enumerate()
                .map(|(i, &a)| (i.to_string(), a))
                .collect(),
            perplexity: ppl,
        }
    }

    #[test]
    fn selection_prefers_forgetting_with_small_accuracy_loss() {
        let before = q(&[0.97, 0.96], 1.2);
        let keeps = selection_score(0.4, 0.0, &before, &q(&[0.969, 0.959], 1.2));
        let hurts = selection_score(0.4, 0.0, &before, &q(&[0.90, 0.90], 1.3));
        let stays = selection_score(0.4, 0.4, &before, &q(&[0.97, 0.96], 1.2));
        assert!(keeps < hurts && keeps < stays);
        assert_eq!(
            selection_score(0.4, 0.0, &before, &q(&[0.9, 0.9], f64::NAN)),
            f64::INFINITY
        );
    }

    #[test]
    fn perplexity_score_for_models_without_tasks() {
        let before = q(&[], 20.0);
        let s = selection_score(0.5, 0.1, &before, &q(&[], 22.0));
        assert!((s - (-80.0 + 10.0)).abs() < 1e-9);
    }

    #[test]
    fn the_paper_grid_has_ninety_candidates_cheapest_first() {
        let g = paper_grid(&BalancedSubnetConfig::default());
        assert_eq!(g.len(), 90);
        assert!(g.windows(2).all(|w| w[0].epochs <= w[1].epochs));
    }
}
