//! Second-Order Unlearning, SOU (spec §4.5, the reference's `obs`): Optimal-Brain-Surgeon
//! saliencies from an empirical Fisher of the forget set, then the most salient MLP entries
//! are zeroed.
//!
//! For every MLP parameter tensor (weights and biases), flattened and cut into blocks of
//! `block` entries, the Fisher block `F = λI + (1/N)·Σ_s g_s g_sᵀ` over `N` per-sample
//! gradients `g_s` (forget rows drawn in shuffled passes, one row per sample) is inverted by
//! Sherman–Morrison updates from `F⁻¹ = I/λ`:
//! `F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (N + gᵀF⁻¹g)`. An entry's saliency is `w² / (2·[F⁻¹]_qq)`,
//! the loss change OBS estimates for removing it; the `⌊ratio·numel⌋` most salient entries of
//! each tensor are zeroed.
//!
//! Invariants:
//! - Each sample's gradient is its own (the reference never zeroed gradients between samples,
//!   so its "per-sample" gradients were running sums, spec §6.12).
//! - The input model is never mutated; it runs on the hand-written pass (f32 on the CPU) and
//!   says so otherwise; bad settings and an empty forget set are refused before any work;
//!   [`JobControl::cancel`] stops it between two samples with [`Error::Cancelled`].

use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::JobControl;
use crate::error::{Error, Result};
use crate::models::pass::{HandWrittenPass, MlpGradWorkspace};
use crate::models::Model;

/// SOU's settings: the reference's block 50, 512 gradient samples and damping 1e-7.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SouConfig {
    pub ratio: f64,
    pub block: usize,
    pub samples: usize,
    pub damping: f64,
    pub seed: u64,
}

impl Default for SouConfig {
    fn default() -> Self {
        Self {
            ratio: 0.01,
            block: 50,
            samples: 512,
            damping: 1e-7,
            seed: 0,
        }
    }
}

/// What SOU did.
pub struct SouOutcome {
    pub model: Model,
    /// Zeroed entries per edited tensor, by checkpoint name.
    pub zeros: Vec<(String, usize)>,
    pub seconds: f64,
}

/// One tensor's Fisher blocks, each `block × block` row-major (the last one may be smaller).
struct Blocks {
    n: usize,
    block: usize,
    inv: Vec<Vec<f64>>,
}

impl Blocks {
    fn new(n: usize, block: usize, damping: f64) -> Self {
        let inv = (0..n.div_ceil(block))
            .map(|b| {
                let m = block.min(n - b * block);
                let mut v = vec![0.0; m * m];
                for i in 0..m {
                    v[i * m + i] = 1.0 / damping;
                }
                v
            })
            .collect();
        Self { n, block, inv }
    }

    /// One Sherman–Morrison update with gradient `g` of `samples` in all.
    fn update(&mut self, g: &[f32], samples: f64) {
        use rayon::prelude::*;
        let block = self.block;
        self.inv.par_iter_mut().enumerate().for_each(|(b, inv)| {
            let g = &g[b * block..(b * block + block).min(g.len())];
            let m = g.len();
            let fg: Vec<f64> = (0..m)
                .map(|i| {
                    (0..m)
                        .map(|j| inv[i * m + j] * f64::from(g[j]))
                        .sum::<f64>()
                })
                .collect();
            let denom = samples
                + g.iter()
                    .zip(&fg)
                    .map(|(&x, y)| f64::from(x) * y)
                    .sum::<f64>();
            for i in 0..m {
                for j in 0..m {
                    inv[i * m + j] -= fg[i] * fg[j] / denom;
                }
            }
        });
    }

    /// `[F⁻¹]_qq` for every entry `q`.
    fn diagonal(&self) -> Vec<f64> {
        let mut d = Vec::with_capacity(self.n);
        for inv in &self.inv {
            let m = (inv.len() as f64).sqrt() as usize;
            d.extend((0..m).map(|i| inv[i * m + i]));
        }
        d
    }
}

pub fn sou(
    model: &Model,
    forget: &[Vec<u32>],
    cfg: &SouConfig,
    ctl: &JobControl,
) -> Result<SouOutcome> {
    if !(0.0..1.0).contains(&cfg.ratio) {
        return Err(Error::invalid("ratio", "must be in [0, 1)"));
    }
    if cfg.block == 0 || cfg.samples == 0 {
        return Err(Error::invalid("sou", "block and samples must be positive"));
    }
    if !(cfg.damping.is_finite() && cfg.damping > 0.0) {
        return Err(Error::invalid("damping", "must be a positive number"));
    }
    if forget.is_empty() {
        return Err(Error::invalid("forget", "the forget set is empty"));
    }
    super::check_rows("forget", forget, model.spec().context_length)?;
    match model {
        Model::Gpt2(m) if m.mlp_grads_supported() => run(m, model, forget, cfg, ctl),
        Model::GptNeoX(m) if m.mlp_grads_supported() => run(m, model, forget, cfg, ctl),
        _ => Err(Error::invalid(
            "model",
            "SOU runs on the hand-written pass: f32 weights on the CPU",
        )),
    }
}

fn run<P: HandWrittenPass>(
    pass: &P,
    model: &Model,
    forget: &[Vec<u32>],
    cfg: &SouConfig,
    ctl: &JobControl,
) -> Result<SouOutcome> {
    let start = Instant::now();
    let tracked: Vec<(usize, String, Vec<f32>)> = model
        .named_tensors()
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| n.contains("mlp"))
        .map(|(i, (n, t))| Ok((i, n.clone(), t.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    let mut fisher: Vec<Blocks> = tracked
        .iter()
        .map(|(_, _, w)| Blocks::new(w.len(), cfg.block, cfg.damping))
        .collect();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut ws = MlpGradWorkspace::default();
    for _ in 0..cfg.samples {
        if ctl.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if order.is_empty() {
            order = (0..forget.len()).collect();
            order.shuffle(&mut rng);
        }
        let row = &forget[order.pop().expect("refilled")];
        let out = pass.train_grads(row, (1, row.len()), &mut ws)?;
        for ((slot, _, _), f) in tracked.iter().zip(fisher.iter_mut()) {
            f.update(out.grads[*slot], cfg.samples as f64);
        }
    }
    let mut edits = Vec::new();
    let mut zeros = Vec::new();
    for ((_, name, w), f) in tracked.iter().zip(&fisher) {
        let d = f.diagonal();
        let saliency: Vec<f64> = w
            .iter()
            .zip(&d)
            .map(|(&w, &d)| f64::from(w) * f64::from(w) / (2.0 * d))
            .collect();
        let k = super::mask::zeros_for(w.len(), cfg.ratio);
        let mut idx: Vec<usize> = (0..w.len()).collect();
        idx.sort_by(|&a, &b| saliency[b].total_cmp(&saliency[a]).then(a.cmp(&b)));
        let mut edited = w.clone();
        for &i in &idx[..k] {
            edited[i] = 0.0;
        }
        edits.push((name.clone(), edited));
        zeros.push((name.clone(), k));
    }
    Ok(SouOutcome {
        model: model.with_edits("SOU edit", edits)?,
        zeros,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{memorizing, Memorizing};

    /// The Sherman–Morrison blocks equal the inverse of `λI + (1/N)·Σ g gᵀ` built directly.
    #[test]
    fn the_blocks_invert_the_damped_empirical_fisher() {
        let grads = [[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 1.0, 1.0]];
        let (n, lambda) = (3.0, 0.1);
        let mut b = Blocks::new(3, 3, lambda);
        for g in &grads {
            b.update(g, n);
        }
        let mut f = [[0f64; 3]; 3];
        for (i, row) in f.iter_mut().enumerate() {
            row[i] = lambda;
            for g in &grads {
                for j in 0..3 {
                    row[j] += f64::from(g[i]) * f64::from(g[j]) / n;
                }
            }
        }
        // F · F⁻¹ = I.
        let inv = &b.inv[0];
        for (i, row) in f.iter().enumerate() {
            for j in 0..3 {
                let v: f64 = (0..3).map(|k| row[k] * inv[k * 3 + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "{i},{j}: {v}");
            }
        }
        // A partial last block: 7 entries in blocks of 3 are 3, 3, 1.
        let b = Blocks::new(7, 3, 1.0);
        assert_eq!(b.inv.iter().map(Vec::len).collect::<Vec<_>>(), [9, 9, 1]);
        assert_eq!(b.diagonal(), vec![1.0; 7]);
    }

    #[test]
    fn sou_zeroes_the_most_salient_mlp_entries_per_tensor_and_forgets() {
        let m = memorizing();
        let cfg = SouConfig {
            ratio: 0.05,
            samples: 64,
            ..SouConfig::default()
        };
        let out = sou(&m.model, &m.forget, &cfg, &JobControl::new()).unwrap();
        assert_eq!(
            out.zeros.len(),
            8,
            "weights and biases of 2 blocks' 2 MLP layers"
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
            let changed = b.iter().zip(&a).filter(|(x, y)| x != y).count();
            if name.contains("mlp") {
                assert!(a.iter().zip(&b).all(|(y, x)| y == x || *y == 0.0));
                assert!(changed <= super::super::mask::zeros_for(b.len(), 0.05));
            } else {
                assert_eq!(changed, 0, "{name}");
            }
        }
        assert!(Memorizing::extractable(&out.model, &m.forget) < 4);
    }
}
