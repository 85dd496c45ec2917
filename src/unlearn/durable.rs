//! Durable and Durable-agg (spec §4.5), one-shot baselines: accumulate the gradient of the mean
//! LM loss over every forget batch, then zero the MLP parameter entries with the largest
//! accumulated `|grad|`.
//!
//! Invariants:
//! - As the reference: the gradients are summed over batches, never zeroed, and the weights
//!   *and* biases of every MLP layer are candidates. [`durable`] zeroes the top
//!   `⌊ratio·numel⌋` entries of each tensor (ties broken by position); with `aggregate`, the top
//!   `⌊ratio·N⌋` over all `N` MLP parameters together.
//! - The input model is never mutated; the result is a new model. GPT-2 and GPT-NeoX in f32 on
//!   the CPU take the hand-written backward (`models::pass`, every parameter's gradient, tied to
//!   autograd by this module's tests); other models a trainable copy through candle's autograd.
//! - A ratio outside `[0, 1)` and an empty forget set are refused before any work, and
//!   sequences under 2 tokens or over the context (or, through autograd, a batch of unequal
//!   lengths) with an error naming `forget`, never a panic. The hand-written pass takes rows of
//!   any length (right-padded; each row's loss is the mean over its own predictions).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::models::pass::{HandWrittenPass, MlpGradWorkspace};
use crate::models::{ops, Inputs, Model};

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
    let fast = super::on_hand_written_pass(model);
    super::check_rows("forget", forget, model.spec().context_length)?;
    for chunk in forget.chunks(batch_size.max(1)) {
        if !fast && chunk.iter().any(|s| s.len() != chunk[0].len()) {
            return Err(Error::invalid(
                "forget",
                "Durable through autograd (not f32 on the CPU) needs equal-length sequences",
            ));
        }
    }
    let acc = match model {
        Model::Gpt2(m) if m.mlp_grads_supported() => {
            summed_fast(m, model, &names, forget, batch_size)?
        }
        Model::GptNeoX(m) if m.mlp_grads_supported() => {
            summed_fast(m, model, &names, forget, batch_size)?
        }
        _ => summed_autograd(model, &names, forget, batch_size)?,
    };
    let tracked: Vec<(&String, Vec<usize>)> = names
        .iter()
        .map(|n| {
            model
                .named_tensors()
                .iter()
                .find(|(m, _)| m == n)
                .map(|(_, t)| (n, t.dims().to_vec()))
                .ok_or_else(|| Error::invalid("weights", format!("no parameter {n}")))
        })
        .collect::<Result<_>>()?;
    let mut keep_masks: Vec<Vec<f32>> = Vec::with_capacity(tracked.len());
    if aggregate {
        let mut all: Vec<(f32, usize, usize)> = Vec::new();
        let mut sizes = Vec::new();
        for (ti, g) in acc.iter().enumerate() {
            sizes.push(g.len());
            all.extend(g.iter().enumerate().map(|(i, v)| (v.abs(), ti, i)));
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
        for g in &acc {
            let k = super::mask::zeros_for(g.len(), ratio);
            let mut m = vec![1.0f32; g.len()];
            if k > 0 {
                let mut idx: Vec<usize> = (0..g.len()).collect();
                idx.select_nth_unstable_by(k - 1, |&a, &b| {
                    g[b].abs().total_cmp(&g[a].abs()).then(a.cmp(&b))
                });
                for &i in &idx[..k] {
                    m[i] = 0.0;
                }
            }
            keep_masks.push(m);
        }
    }
    let mut zeros = Vec::new();
    let mut edits = Vec::with_capacity(tracked.len());
    for ((name, _), m) in tracked.into_iter().zip(keep_masks) {
        zeros.push((name.clone(), m.iter().filter(|&&x| x == 0.0).count()));
        let mut w = model
            .param_values(name)?
            .expect("tracked names are the model's");
        w.iter_mut().zip(&m).for_each(|(w, m)| *w *= m);
        edits.push((name.clone(), w));
    }
    let model = model.with_edits("Durable edit", edits)?;
    Ok(DurableOutcome {
        model,
        zeros,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The summed gradients of `names` over the forget batches, through the hand-written pass
/// (`pass` is `model`'s GPT-2 or GPT-NeoX).
fn summed_fast<P: HandWrittenPass>(
    pass: &P,
    model: &Model,
    names: &[String],
    forget: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let slots: Vec<usize> = names
        .iter()
        .map(|n| {
            model
                .named_tensors()
                .iter()
                .position(|(m, _)| m == n)
                .ok_or_else(|| Error::invalid("weights", format!("no parameter {n}")))
        })
        .collect::<Result<_>>()?;
    let mut acc: Vec<Vec<f32>> = Vec::new();
    let mut ws = MlpGradWorkspace::default();
    for chunk in forget.chunks(batch_size.max(1)) {
        // Rows of unequal length are right-padded; each row's loss is its own mean, so with
        // equal lengths this is the batch's mean LM loss.
        let p = super::Padded::rows(chunk.iter().map(Vec::as_slice));
        let row_weight = vec![1.0 / chunk.len() as f32; chunk.len()];
        let out = pass.weighted_grads(&p.ids, p.bt, &p.lens, &row_weight, &mut ws)?;
        if acc.is_empty() {
            acc = slots.iter().map(|&i| out.grads[i].to_vec()).collect();
        } else {
            for (a, &i) in acc.iter_mut().zip(&slots) {
                a.iter_mut().zip(out.grads[i]).for_each(|(x, g)| *x += g);
            }
        }
    }
    Ok(acc)
}

/// [`summed_fast`] through candle's autograd, for every model.
fn summed_autograd(
    model: &Model,
    names: &[String],
    forget: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    // A trainable copy: every parameter a variable, so the MLP biases get gradients too.
    let (trainable, vars) = model.trainable_copy(0)?;
    let all: HashMap<String, candle_core::Var> =
        crate::tinymem::train::named_vars(&trainable, &vars)?
            .into_iter()
            .collect();
    let tracked: Vec<Tensor> = names
        .iter()
        .map(|n| {
            all.get(n)
                .map(|v| v.as_tensor().clone())
                .ok_or_else(|| Error::invalid("weights", format!("no parameter {n}")))
        })
        .collect::<Result<_>>()?;
    let mut acc: Vec<Option<Tensor>> = vec![None; tracked.len()];
    for chunk in forget.chunks(batch_size.max(1)) {
        let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (chunk.len(), chunk[0].len()), model.device())?;
        let logits = trainable.forward(&Inputs::causal(&ids, 0)?, None, None)?;
        let grads = ops::lm_loss(&logits, &ids)?.backward()?;
        for (p, a) in tracked.iter().zip(acc.iter_mut()) {
            if let Some(g) = grads.get(p) {
                let g = g.detach();
                *a = Some(match a.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
    }
    tracked
        .iter()
        .zip(acc)
        .map(|(p, a)| match a {
            Some(g) => Ok(g.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?),
            None => Ok(vec![0.0; p.elem_count()]),
        })
        .collect()
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

    /// The hand-written pass sums the same forget-set gradients as autograd, for GPT-2 and for
    /// GPT-NeoX (partial rotary, parallel residual, biases), so Durable zeroes the same entries.
    #[test]
    fn the_hand_written_sums_match_autograd() {
        use crate::models::ops::Activation;
        use crate::test_util::{neox, rel_l2};
        let configs = [
            crate::test_util::relu_gpt2((14, 64, 24, 3), 2, true, false),
            neox(
                (14, 64, 32, 4, 48),
                2,
                0.25,
                true,
                Activation::Gelu,
                true,
                false,
            ),
        ];
        for config in configs {
            let model = Model::random(&config, &Device::Cpu).unwrap();
            let names: Vec<String> = model
                .mlp_weight_names()
                .into_iter()
                .flat_map(|(a, b)| [a, b])
                .collect();
            let forget: Vec<Vec<u32>> = crate::test_util::rows(5, |_| 12, 3);
            let fast = match &model {
                Model::Gpt2(m) => summed_fast(m, &model, &names, &forget, 2).unwrap(),
                Model::GptNeoX(m) => summed_fast(m, &model, &names, &forget, 2).unwrap(),
            };
            let slow = summed_autograd(&model, &names, &forget, 2).unwrap();
            for ((f, s), n) in fast.iter().zip(&slow).zip(&names) {
                let e = rel_l2(f, s);
                assert!(e < 1e-4, "{n}: relative L2 {e}");
            }
        }
    }
}
