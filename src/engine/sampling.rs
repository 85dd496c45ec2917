//! Choosing the next token from logits: greedy or sampled (temperature, top-k, top-p), with
//! banned ids.
//!
//! Invariants:
//! - Temperature 0 is greedy: [`argmax`], the lowest id on ties (as `torch.argmax`), NaNs
//!   skipped; no RNG is drawn.
//! - Banned ids become −∞ before either rule, so they are never picked while any other logit is
//!   finite.
//! - Sampling divides the finite logits by the temperature, keeps the `top_k` most likely (0:
//!   all), then the shortest most-likely prefix whose mass reaches `top_p` (1: all), and draws
//!   from what is left; candidates are ordered by logit, then by id.
//! - Each sequence owns its [`Sampler`] and RNG, seeded from `seed` (from the OS when `None`):
//!   the same seed and logits give the same tokens, however requests are batched together.
//! - [`SamplingParams::validate`] rejects a negative or non-finite temperature and a `top_p`
//!   outside (0, 1], naming the field.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How to pick tokens. `temperature == 0` means greedy (argmax, lowest id on ties).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// RNG seed; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(
                "temperature",
                "must be a finite number >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", "must be in (0, 1]"));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Per-sequence sampler state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks a token from `logits` (modified in place: banned ids become −∞).
    pub fn sample(&mut self, logits: &mut [f32], banned: &[u32]) -> u32 {
        for &b in banned {
            if let Some(l) = logits.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// Index of the largest value, the lowest index on ties (as `torch.argmax`); NaNs are skipped,
/// and a row with no number in it gives 0.
///
/// Two passes the compiler vectorises — the maximum over independent lanes, then the first
/// block of lanes that holds it — instead of one compare-and-branch per logit: a 50,304-token
/// vocabulary is scanned once per generated token.
pub fn argmax(xs: &[f32]) -> u32 {
    const W: usize = crate::models::cpu::vmath::LANES;
    let max = crate::models::cpu::vmath::max_lanes(xs);
    let block = xs
        .chunks(W)
        .position(|c| c.iter().fold(false, |hit, &x| hit | (x == max)))
        .unwrap_or(0);
    let at = xs[block * W..]
        .iter()
        .position(|&x| x == max)
        .map_or(0, |i| block * W + i);
    at as u32
}

/// `log_softmax(logits)[i]` for every i, computed stably.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|l| l - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_first_max_and_respects_bans() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 0.0], &[]), 1);
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 0.0], &[1]), 2);
    }

    #[test]
    fn argmax_is_the_first_maximum_across_block_boundaries() {
        let naive = |xs: &[f32]| {
            let mut best: Option<usize> = None;
            for (i, &x) in xs.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b| x > xs[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0) as u32
        };
        let mut state = 7u32;
        for len in [0usize, 1, 15, 16, 17, 33, 100, 50_304] {
            for case in 0..4 {
                let mut xs: Vec<f32> = (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        // Few distinct values, so ties land in different blocks.
                        (state >> 28) as f32
                    })
                    .collect();
                match case {
                    1 if len > 3 => xs[len / 2] = f32::NAN,
                    2 => xs.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                    3 if len > 0 => xs[len - 1] = 99.0,
                    _ => {}
                }
                assert_eq!(argmax(&xs), naive(&xs), "len {len} case {case}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: Some(7),
        };
        let logits = vec![0.5f32; 50];
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        let other = SamplingParams {
            seed: Some(8),
            ..params.clone()
        };
        assert_ne!(draw(&params), draw(&other));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = vec![5.0f32, 4.0, 1.0, 0.0, -1.0];
        let mut k = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
            seed: Some(1),
        });
        let mut p = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            seed: Some(1),
        });
        for _ in 0..200 {
            assert!(k.sample(&mut logits.clone(), &[]) < 2);
            assert_eq!(p.sample(&mut logits.clone(), &[]), 0);
        }
    }

    #[test]
    fn invalid_params_name_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
        let bad = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }

    #[test]
    fn log_softmax_normalises() {
        let l = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
