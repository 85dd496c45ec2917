//! Durable and Durable-agg (spec §4.5), one-shot baselines: accumulate the gradient of the mean
//! LM loss over every forget batch, then zero the MLP parameter entries with the largest
//! accumulated `|grad|`.
//!
//! Invariants:
//! - As the reference: the gradients are summed over batches, never zeroed, and the weights
//!   *and* biases of every MLP layer are candidates. [`durable`] zeroes the top
//!   `⌊ratio·numel⌋` entries of each tensor (ties broken by position); with `aggregate`, the top
//!   `⌊ratio·N⌋` over all `N` MLP parameters together.
//! - The input model is never mutated: the gradients come from a trainable copy and the result
//!   is a new model.
//! - A ratio outside `[0, 1)` and an empty forget set are refused before any work, and a batch
//!   of unequal-length sequences or of sequences under 2 tokens with an error naming `forget`,
//!   never a panic.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::models::{ops, Inputs, Model, Weights};

/// What Durable changed.
pub struct DurableOutcome {
    pub model: Model,
    /// Zeroed entries per edited tensor, by checkpoint name.
    pub zeros: Vec<(String, usize)>,
    pub seconds: f64,
}

/// Runs Durable over `forget` (equal-length sequences are batched `batch_size` at a time).
pub fn durable(
    model: &Model,
    forget: &[Vec<u32>],
    ratio: f64,
    batch_size: usize,
    aggregate: bool,
) -> Result<DurableOutcome> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::invalid("ratio", "must be in [0, 1)"));
    }
    if forget.is_empty() {
        return Err(Error::invalid("forget", "the forget set is empty"));
    }
    let start = Instant::now();
    let names: Vec<String> = model
        .mlp_weight_names()
        .into_iter()
        .flat_map(|(a, b)| {
            let bias = |w: &str| w.trim_end_matches(".weight").to_string() + ".bias";
            [bias(&a), bias(&b), a, b]
        })
        .collect();
    // A trainable copy: every parameter a variable, so the MLP biases get gradients too.
    let map: HashMap<String, Tensor> = model
        .named_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.detach()))
        .collect();
    let vars = Weights::vars_from_tensors(map.clone(), 0)?;
    let trainable = Model::new(&model.config(), &vars)?;
    let varmap = vars
        .varmap()
        .ok_or_else(|| Error::invalid("weights", "not trainable"))?;
    let tracked: Vec<(String, Tensor)> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::invalid("weights", "poisoned lock"))?;
        names
            .iter()
            .map(|n| {
                data.get(n)
                    .map(|v| (n.clone(), v.as_tensor().clone()))
                    .ok_or_else(|| Error::invalid("weights", format!("no parameter {n}")))
            })
            .collect::<Result<_>>()?
    };
    let mut acc: Vec<Option<Tensor>> = vec![None; tracked.len()];
    for chunk in forget.chunks(batch_size.max(1)) {
        let t = chunk[0].len();
        if chunk.iter().any(|s| s.len() != t) || t < 2 {
            return Err(Error::invalid(
                "forget",
                "Durable batches need equal-length sequences of at least 2 tokens",
            ));
        }
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (chunk.len(), t), model.device())?;
        let logits = trainable.forward(&Inputs::causal(&ids, 0)?, None, None)?;
        let grads = ops::lm_loss(&logits, &ids)?.backward()?;
        for ((_, p), a) in tracked.iter().zip(acc.iter_mut()) {
            if let Some(g) = grads.get(p) {
                let g = g.detach();
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
    }
    let flat_abs = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.abs()?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?)
    };
    let mut keep_masks: Vec<Vec<f32>> = Vec::with_capacity(tracked.len());
    if aggregate {
        let mut all: Vec<(f32, usize, usize)> = Vec::new();
        let mut sizes = Vec::new();
        for (ti, ((_, p), a)) in tracked.iter().zip(&acc).enumerate() {
            let g = match a {
                Some(g) => flat_abs(g)?,
                None => vec![0.0; p.elem_count()],
            };
            sizes.push(g.len());
            all.extend(g.into_iter().enumerate().map(|(i, v)| (v, ti, i)));
        }
        let k = ((ratio * all.len() as f64).floor() as usize).min(all.len());
        keep_masks = sizes.iter().map(|&n| vec![1.0; n]).collect();
        if k > 0 {
            all.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            for &(_, ti, i) in &all[..k] {
                keep_masks[ti][i] = 0.0;
            }
        }
    } else {
        for ((_, p), a) in tracked.iter().zip(&acc) {
            let g = match a {
                Some(g) => flat_abs(g)?,
                None => vec![0.0; p.elem_count()],
            };
            let k = super::mask::zeros_for(g.len(), ratio);
            let mut m = vec![1.0f32; g.len()];
            if k > 0 {
                let mut idx: Vec<usize> = (0..g.len()).collect();
                idx.select_nth_unstable_by(k - 1, |&a, &b| g[b].total_cmp(&g[a]).then(a.cmp(&b)));
                for &i in &idx[..k] {
                    m[i] = 0.0;
                }
            }
            keep_masks.push(m);
        }
    }
    let mut edited = map;
    let mut zeros = Vec::new();
    for ((name, p), m) in tracked.iter().zip(keep_masks) {
        zeros.push((name.clone(), m.iter().filter(|&&x| x == 0.0).count()));
        let mask = Tensor::from_vec(m, p.dims(), p.device())?;
        edited.insert(name.clone(), (&edited[name] * mask)?);
    }
    let model = Model::new(
        &model.config(),
        &Weights::from_tensors(edited, "Durable edit"),
    )?;
    Ok(DurableOutcome {
        model,
        zeros,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroes_the_stated_count_per_tensor_and_leaves_the_input_alone() {
        let model = Model::random(
            &crate::test_util::relu_gpt2((14, 64, 24, 3), 2, true, false),
            &Device::Cpu,
        )
        .unwrap();
        let forget = vec![(0..40u32).map(|i| i % 14).collect::<Vec<_>>(); 3];
        let before: Vec<f32> = model.mlp_weights().0[0]
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let out = durable(&model, &forget, 0.05, 2, false).unwrap();
        assert_eq!(out.zeros.len(), 4 * model.spec().num_layers);
        for (name, z) in &out.zeros {
            let numel = model
                .named_tensors()
                .iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .elem_count();
            assert_eq!(*z, super::super::mask::zeros_for(numel, 0.05), "{name}");
        }
        let after: Vec<f32> = model.mlp_weights().0[0]
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(before, after);
        let agg = durable(&model, &forget, 0.05, 2, true).unwrap();
        let total: usize = agg.zeros.iter().map(|(_, z)| z).sum();
        let numel: usize = out
            .zeros
            .iter()
            .map(|(n, _)| {
                model
                    .named_tensors()
                    .iter()
                    .find(|(m, _)| m == n)
                    .unwrap()
                    .1
                    .elem_count()
            })
            .sum();
        assert_eq!(total, (0.05 * numel as f64).floor() as usize);
    }
}
