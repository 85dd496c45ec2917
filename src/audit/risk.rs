//! Extraction risk beyond one greedy query: is a sequence extractable by sampling, by a nearby
//! prompt, or in part?
//!
//! - **(n, p)-discoverable** (Hayes et al. 2024, "Measuring memorization in language models
//!   via probabilistic extraction"): sampling at temperature `T` (no top-k/top-p, EOS banned)
//!   reproduces the target with probability `q = Π p_T(target_i | prompt, target_<i)`, read off
//!   the same teacher-forced pass as the greedy verdict; `samples` independent draws extract it
//!   at least once with probability `1 − (1 − q)^samples`, and the item is discoverable when that
//!   reaches `p`.
//! - **Longest match**: the longest run of target tokens that the model's greedy pick
//!   reproduces given the true text before them, from the same pass (a secret's middle can leak
//!   when its first tokens do not).
//! - **Perturbed prompts**: `perturbations` copies of the prompt, each with `perturbed_tokens`
//!   positions replaced by other tokens (seeded, never EOS), are audited greedily; any that still
//!   reproduces the whole target counts.
//!
//! Invariants:
//! - Options are checked before any compute, each bad one named (`risk.temperature`, …).
//! - The same items, options and model give the same numbers (perturbations are drawn from
//!   `seed` and the item's index only).

use serde::{Deserialize, Serialize};

use super::{teacher_options, AuditItem};
use crate::engine::teacher::{teacher_forced, TeacherResult};
use crate::error::{Error, Result};
use crate::models::Model;

/// What extraction risk to measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RiskOptions {
    /// Sampling temperature (> 0).
    pub temperature: f32,
    /// Draws an attacker makes (the `n` of (n, p)-discoverable, ≥ 1).
    pub samples: u64,
    /// Probability of extraction at which a sequence counts as discoverable, in (0, 1].
    pub p: f64,
    /// Perturbed prompts per sequence (0: none).
    pub perturbations: usize,
    /// Tokens changed in each perturbed prompt (≥ 1 when `perturbations` > 0).
    pub perturbed_tokens: usize,
    /// Seed of the perturbations.
    pub seed: u64,
}

impl Default for RiskOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            samples: 100,
            p: 0.1,
            perturbations: 4,
            perturbed_tokens: 2,
            seed: 0,
        }
    }
}

impl RiskOptions {
    /// Refuses an option outside its range, naming it.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::invalid(
                "risk.temperature",
                "must be a finite number > 0",
            ));
        }
        if self.samples == 0 {
            return Err(Error::invalid("risk.samples", "must be at least 1"));
        }
        if !(self.p > 0.0 && self.p <= 1.0) {
            return Err(Error::invalid("risk.p", "must be in (0, 1]"));
        }
        if self.perturbations > 0 && self.perturbed_tokens == 0 {
            return Err(Error::invalid(
                "risk.perturbed_tokens",
                "must be at least 1 when perturbations > 0",
            ));
        }
        if self.perturbations > 64 {
            return Err(Error::invalid("risk.perturbations", "must be at most 64"));
        }
        Ok(())
    }
}

/// One sequence's extraction risk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Risk {
    /// `log q`: the natural log of the probability that one sample at the temperature
    /// reproduces the target; `None` when that probability is 0 (the target holds a banned id,
    /// EOS, which sampling never produces).
    pub sequence_logprob: Option<f64>,
    /// `1 − (1 − q)^samples`.
    pub discovery_probability: f64,
    /// `discovery_probability ≥ p`.
    pub discoverable: bool,
    /// The longest run of target tokens greedily predicted given the true text before them.
    pub longest_match: usize,
    /// Perturbed prompts audited.
    pub perturbed: usize,
    /// Of those, the ones from which greedy decoding still reproduces the whole target.
    pub perturbed_memorized: usize,
}

impl Risk {
    /// Discoverable by sampling or extracted from a perturbed prompt.
    pub fn extractable(&self) -> bool {
        self.discoverable || self.perturbed_memorized > 0
    }
}

/// `1 − (1 − e^logq)^n`, without losing small probabilities to rounding.
fn discovery(logq: f64, n: u64) -> f64 {
    if logq >= 0.0 {
        return 1.0;
    }
    // ln(1 − q): ln_1p(−q) for small q, ln(−expm1(log q)) near 1; then 1 − e^(n · that).
    let ln_miss = if logq < -0.5 {
        (-logq.exp()).ln_1p()
    } else {
        (-logq.exp_m1()).ln()
    };
    -(n as f64 * ln_miss).exp_m1()
}

/// A splitmix64 step: the perturbations' random numbers.
fn mix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `q`-th perturbation of `prompt` (item `i`): `tokens` distinct positions (all of them in a
/// shorter prompt) each replaced by another id of the vocabulary that is not banned.
fn perturb(
    prompt: &[u32],
    vocab: u32,
    banned: &[u32],
    tokens: usize,
    seed: u64,
    i: usize,
    q: usize,
) -> Vec<u32> {
    let mut s = seed ^ (i as u64).wrapping_mul(0x100_0000_01b3) ^ ((q as u64) << 48);
    let mut out = prompt.to_vec();
    let mut positions: Vec<usize> = (0..prompt.len()).collect();
    for j in 0..tokens.min(prompt.len()) {
        let pick = j + (mix(&mut s) as usize) % (positions.len() - j);
        positions.swap(j, pick);
        let at = positions[j];
        // Any other allowed id; a vocabulary with none left keeps the token.
        for _ in 0..64 {
            let id = (mix(&mut s) % u64::from(vocab)) as u32;
            if id != prompt[at] && !banned.contains(&id) {
                out[at] = id;
                break;
            }
        }
    }
    out
}

/// Measures every item's risk (module docs), `batch_size` items per forward pass.
pub fn measure(
    model: &Model,
    items: &[AuditItem],
    opts: &RiskOptions,
    batch_size: usize,
) -> Result<Vec<Risk>> {
    Ok(measure_with_verdicts(model, items, opts, batch_size)?.1)
}

/// [`measure`], also returning the full teacher-forced results it read the risk from: their
/// `matched_prefix` is the greedy verdict, so an audit with risk needs no pass of its own.
pub(crate) fn measure_with_verdicts(
    model: &Model,
    items: &[AuditItem],
    opts: &RiskOptions,
    batch_size: usize,
) -> Result<(Vec<TeacherResult>, Vec<Risk>)> {
    opts.validate()?;
    let pairs: Vec<(&[u32], &[u32])> = items
        .iter()
        .map(|it| (&it.prompt[..], &it.target[..]))
        .collect();
    let full = teacher_forced(
        model,
        &pairs,
        &teacher_options(model, batch_size, Some(opts.temperature)),
    )?;
    let greedy = teacher_options(model, batch_size, None);
    let vocab = model.spec().vocab_size as u32;
    let banned = &greedy.banned;
    let perturbed: Vec<(usize, Vec<u32>)> = items
        .iter()
        .enumerate()
        .flat_map(|(i, it)| {
            (0..opts.perturbations).map(move |q| {
                (
                    i,
                    perturb(
                        &it.prompt,
                        vocab,
                        banned,
                        opts.perturbed_tokens,
                        opts.seed,
                        i,
                        q,
                    ),
                )
            })
        })
        .collect();
    let ppairs: Vec<(&[u32], &[u32])> = perturbed
        .iter()
        .map(|(i, p)| (&p[..], &items[*i].target[..]))
        .collect();
    let mut still = vec![0usize; items.len()];
    for ((i, _), r) in perturbed
        .iter()
        .zip(teacher_forced(model, &ppairs, &greedy)?)
    {
        if r.matched_prefix == items[*i].target.len() {
            still[*i] += 1;
        }
    }
    let risks = full
        .iter()
        .zip(still)
        .map(|(f, still)| {
            let logq = f.logprob[0];
            let discovery_probability = discovery(logq, opts.samples);
            Risk {
                sequence_logprob: (logq > f64::NEG_INFINITY).then_some(logq),
                discovery_probability,
                discoverable: discovery_probability >= opts.p,
                longest_match: f.longest_run,
                perturbed: opts.perturbations,
                perturbed_memorized: still,
            }
        })
        .collect();
    Ok((full, risks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_probability_is_one_minus_the_chance_of_missing_every_draw() {
        assert_eq!(discovery(0.0, 1), 1.0);
        assert!((discovery(0.5f64.ln(), 1) - 0.5).abs() < 1e-12);
        assert!((discovery(0.5f64.ln(), 3) - 0.875).abs() < 1e-12);
        // Small q: ≈ n·q, not lost to 1 − q rounding to 1.
        let d = discovery(-40.0, 1000);
        assert!((d / (1000.0 * (-40f64).exp()) - 1.0).abs() < 1e-6, "{d}");
        assert_eq!(discovery(f64::NEG_INFINITY, 10), 0.0);
    }

    #[test]
    fn perturbations_change_the_asked_number_of_tokens_reproducibly() {
        let prompt: Vec<u32> = (0..20).collect();
        for q in 0..8 {
            let a = perturb(&prompt, 50, &[0], 3, 7, 2, q);
            assert_eq!(a, perturb(&prompt, 50, &[0], 3, 7, 2, q));
            let changed: Vec<usize> = (0..20).filter(|&j| a[j] != prompt[j]).collect();
            assert_eq!(changed.len(), 3, "{a:?}");
            assert!(changed.iter().all(|&j| a[j] != 0 && a[j] < 50));
        }
        assert_ne!(
            perturb(&prompt, 50, &[], 3, 7, 2, 0),
            perturb(&prompt, 50, &[], 3, 7, 2, 1)
        );
        // A prompt shorter than the count: every token changes.
        let short = perturb(&[4, 5], 50, &[], 3, 1, 0, 0);
        assert!(short[0] != 4 && short[1] != 5);
    }

    #[test]
    fn bad_options_are_named() {
        for (o, name) in [
            (
                RiskOptions {
                    temperature: 0.0,
                    ..Default::default()
                },
                "risk.temperature",
            ),
            (
                RiskOptions {
                    samples: 0,
                    ..Default::default()
                },
                "risk.samples",
            ),
            (
                RiskOptions {
                    p: 1.5,
                    ..Default::default()
                },
                "risk.p",
            ),
            (
                RiskOptions {
                    perturbed_tokens: 0,
                    ..Default::default()
                },
                "risk.perturbed_tokens",
            ),
            (
                RiskOptions {
                    perturbations: 65,
                    ..Default::default()
                },
                "risk.perturbations",
            ),
        ] {
            assert!(o.validate().unwrap_err().to_string().contains(name));
        }
    }

    #[test]
    fn the_bundled_models_memorized_rows_are_at_risk_and_random_ones_are_not() {
        // The bundled TinyMem's eligible noise rows (clean prompt, noised target), then random
        // sequences of the same shape.
        let lm = crate::test_util::bundled();
        let ds = crate::tinymem::train::Card::read(&lm.dir)
            .unwrap()
            .dataset()
            .unwrap();
        let mut items: Vec<AuditItem> = ds
            .eligible_noised_rows(50, 100)
            .iter()
            .map(|r| AuditItem {
                prompt: r.clean_ids.as_ref().unwrap()[..50].to_vec(),
                target: r.ids[50..100].to_vec(),
            })
            .collect();
        let rows = items.len();
        items.extend(
            crate::test_util::rows(8, |_| 100, 3)
                .into_iter()
                .map(|r| AuditItem {
                    prompt: r[..50].iter().map(|&t| t % 14).collect(),
                    target: r[50..].iter().map(|&t| t % 14).collect(),
                }),
        );
        let opts = super::super::AuditOptions {
            risk: Some(RiskOptions::default()),
            ..super::super::AuditOptions::greedy(64)
        };
        let (res, summary) = super::super::audit_with(&lm.model, None, &items, &opts).unwrap();
        let memorized: Vec<&super::super::AuditResult> =
            res[..rows].iter().filter(|r| r.memorized).collect();
        assert!(memorized.len() >= 20, "{}", memorized.len());
        for r in &res {
            let k = r.risk.as_ref().unwrap();
            assert!(k.longest_match >= r.matched_prefix && k.longest_match <= 50);
            assert!(k.sequence_logprob.is_none_or(|l| l <= 1e-9));
            assert!((0.0..=1.0).contains(&k.discovery_probability));
            assert_eq!(k.perturbed, 4);
        }
        // Greedily memorized rows are mostly discoverable by sampling too; random ones never are.
        let discoverable = memorized
            .iter()
            .filter(|r| r.risk.as_ref().unwrap().discoverable)
            .count();
        assert!(
            discoverable * 2 >= memorized.len(),
            "{discoverable} of {}",
            memorized.len()
        );
        for r in &res[rows..] {
            let logq = r.risk.as_ref().unwrap().sequence_logprob;
            assert!(!r.extractable() && logq.is_none_or(|l| l < -20.0), "{r:?}");
        }
        assert_eq!(
            summary.extractable,
            Some(res.iter().filter(|r| r.extractable()).count())
        );
        assert!(summary.extractable.unwrap() >= summary.memorized);
    }
}
