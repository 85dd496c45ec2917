//! Helpers for the library's unit tests: deterministic random tensors and token rows, small
//! ReLU GPT-2 configs, tensor comparisons, and the check that pins a hand-written decode step to
//! the candle path.
//!
//! Invariants:
//! - Compiled only for tests (`#[cfg(test)]` in `lib.rs`): no library code can depend on it.
//! - Every helper is deterministic in its arguments and touches no global RNG state.
//! - Helpers panic on failure: they are assertions, unlike library code.

use candle_core::{Device, Tensor};

/// Deterministic pseudo-random values in [-2, 2) without touching global RNG state.
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `n` rows of pseudo-random TinyMem token ids (below 14); row `r` has `len(r)` tokens.
pub fn rows(n: usize, len: impl Fn(usize) -> usize, seed: u64) -> Vec<Vec<u32>> {
    crate::util::token_rows(n, len, seed, 14)
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A small ReLU GPT-2 for gradient tests (`vocab`, `positions`, `width`, `heads`; MLP 40), with
/// initializer range 0.3 so attention is far from uniform and every op matters.
pub fn relu_gpt2(
    dims: (usize, usize, usize, usize),
    n_layer: usize,
    tied: bool,
    inverse_idx: bool,
) -> crate::models::ModelConfig {
    gpt2_with(
        crate::models::ops::Activation::Relu,
        dims,
        n_layer,
        tied,
        inverse_idx,
    )
}

/// [`relu_gpt2`] with another MLP activation.
pub fn gpt2_with(
    activation: crate::models::ops::Activation,
    (vocab, positions, width, heads): (usize, usize, usize, usize),
    n_layer: usize,
    tied: bool,
    inverse_idx: bool,
) -> crate::models::ModelConfig {
    crate::models::ModelConfig::Gpt2(crate::models::gpt2::Config {
        vocab_size: vocab,
        n_positions: positions,
        n_embd: width,
        n_layer,
        n_head: heads,
        n_inner: 40,
        activation,
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: tied,
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: inverse_idx,
        initializer_range: 0.3,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    })
}

/// The bundled TinyMem noise model, loaded in f32 on the CPU.
pub fn bundled() -> crate::loader::LoadedModel {
    crate::loader::load_dir(
        &crate::loader::bundled_model_dir(),
        "bundled",
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap()
}

/// `‖a − b‖₂ / ‖b‖₂` (absolute when `b` is 0), accumulated in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Runs a left-padded prefill of `b` rows (row r has r + 2 tokens below `vocab`) and then four
/// decode steps twice, through `step` (a hand-written decode step: `None` means it declined)
/// and through `reference` (the candle path), each on its own copy of the cache, and checks
/// that every step's hidden states `[b, 1, hidden]` agree to 1e-4. Even steps pass the engine's
/// padding mask (a padding query attends to itself), odd steps no mask (every key visible).
/// `prefill` fills the first cache; `what` names the case in failures.
pub fn check_decode_steps(
    (b, vocab, n_layer, hidden): (usize, u32, usize, usize),
    prefill: impl Fn(&crate::models::Inputs, &mut crate::models::KvCache),
    step: impl Fn(&crate::models::Inputs, &mut crate::models::KvCache) -> Option<Tensor>,
    reference: impl Fn(&crate::models::Inputs, &mut crate::models::KvCache) -> Tensor,
    what: &str,
) {
    use crate::models::{Inputs, KvCache};
    let dev = Device::Cpu;
    let mask_for = |keys: &[Vec<bool>], t: usize| {
        let s = keys[0].len();
        let m: Vec<f32> = keys
            .iter()
            .flat_map(|k| {
                (0..t).flat_map(move |ti| {
                    (0..s).map(move |j| {
                        let q = s - t + ti;
                        if j <= q && (k[j] || j == q) {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
            })
            .collect();
        Tensor::from_vec(m, (keys.len(), 1, t, s), &Device::Cpu).unwrap()
    };
    let width = b + 1;
    let (mut ids, mut pos) = (Vec::new(), Vec::new());
    let mut keys = vec![vec![false; width]; b];
    for (r, key_row) in keys.iter_mut().enumerate() {
        let pad = width - (r + 2);
        for (j, key) in key_row.iter_mut().enumerate() {
            ids.push(((r * 7 + j * 3) as u32) % vocab);
            pos.push(j.saturating_sub(pad) as u32);
            *key = j >= pad;
        }
    }
    let inputs = Inputs {
        ids: Tensor::from_vec(ids, (b, width), &dev).unwrap(),
        positions: Tensor::from_vec(pos, (b, width), &dev).unwrap(),
        mask: Some(mask_for(&keys, width)),
    };
    let mut fast = KvCache::new(n_layer);
    prefill(&inputs, &mut fast);
    let mut slow = fast.clone();
    let mut next: Vec<u32> = (0..b as u32).map(|r| r + 2).collect();
    for n in 0..4u32 {
        keys.iter_mut().for_each(|k| k.push(true));
        let with_mask = n % 2 == 0;
        if !with_mask {
            keys.iter_mut()
                .for_each(|k| k.iter_mut().for_each(|x| *x = true));
        }
        let ids: Vec<u32> = (0..b as u32)
            .map(|r| (r * 5 + n * 11 + 1) % vocab)
            .collect();
        let inputs = Inputs {
            ids: Tensor::from_vec(ids, (b, 1), &dev).unwrap(),
            positions: Tensor::from_vec(next.clone(), (b, 1), &dev).unwrap(),
            mask: with_mask.then(|| mask_for(&keys, 1)),
        };
        next.iter_mut().for_each(|p| *p += 1);
        let got = step(&inputs, &mut fast).unwrap_or_else(|| panic!("{what}: the step declined"));
        let want = reference(&inputs, &mut slow);
        assert_eq!(got.dims(), [b, 1, hidden], "{what}");
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < 1e-4,
            "{what} step {n}: hidden states differ by {diff}"
        );
        assert_eq!(fast.len(), slow.len(), "{what}");
    }
}

/// A small GPT-NeoX for gradient tests (`vocab`, `positions`, `width`, `heads`, `inner`), with
/// initializer range 0.3; the rest as given. Built from its `config.json`, as a checkpoint's.
#[allow(clippy::too_many_arguments)]
pub fn neox(
    (vocab, positions, width, heads, inner): (usize, usize, usize, usize, usize),
    layers: usize,
    rotary_pct: f64,
    parallel: bool,
    activation: crate::models::ops::Activation,
    attention_bias: bool,
    tied: bool,
) -> crate::models::ModelConfig {
    let json = serde_json::json!({
        "model_type": "gpt_neox", "vocab_size": vocab, "max_position_embeddings": positions,
        "hidden_size": width, "num_attention_heads": heads, "intermediate_size": inner,
        "num_hidden_layers": layers, "rotary_pct": rotary_pct, "rotary_emb_base": 10000.0,
        "use_parallel_residual": parallel, "layer_norm_eps": 1e-5,
        "hidden_act": activation.hf_name(), "attention_bias": attention_bias,
        "tie_word_embeddings": tied, "initializer_range": 0.3,
    });
    crate::models::ModelConfig::from_json(&json.to_string(), "test config").unwrap()
}

/// The gradient autograd computed for `t`, flattened.
pub fn grad_values(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Vec<f32> {
    grads
        .get(t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Asserts that a hand-written pass's training loss and gradients (`loss`, `grads` in
/// `named_tensors` order) match candle's autograd through `model` (built on trainable
/// `weights`) on `ids: [b, t]`: loss within 1e-5 relative, every gradient within 1e-4
/// relative L2.
pub fn assert_matches_autograd(
    case: usize,
    model: &crate::models::Model,
    weights: &crate::models::Weights,
    (ids, b, t): (&[u32], usize, usize),
    (loss, grads): (f64, &[&[f32]]),
) {
    let ids_t = Tensor::from_slice(ids, (b, t), &candle_core::Device::Cpu).unwrap();
    let logits = model
        .forward(
            &crate::models::Inputs::causal(&ids_t, 0).unwrap(),
            None,
            None,
        )
        .unwrap();
    let want_loss = crate::models::ops::lm_loss(&logits, &ids_t).unwrap();
    let want = f64::from(want_loss.to_scalar::<f32>().unwrap());
    assert!(
        (loss - want).abs() <= 1e-5 * want.abs(),
        "case {case}: loss {loss} vs {want}"
    );
    let back = want_loss.backward().unwrap();
    let vars = crate::tinymem::train::named_vars(model, weights).unwrap();
    assert_eq!(vars.len(), grads.len(), "case {case}");
    for ((name, var), got) in vars.iter().zip(grads) {
        let e = rel_l2(got, &grad_values(&back, var.as_tensor()));
        assert!(e <= 1e-4, "case {case}: {name}: relative L2 error {e}");
    }
}
pub mod pg;

/// A tiny model that regurgitates planted rows, for unlearning tests: a ReLU GPT-2 (vocab 14,
/// 32 positions, width 32, 2 heads, 2 layers, MLP 64, tied) trained with AdamW on 96 rows of
/// a counting rule (the retain set) and 4 random rows repeated 8× (the forget set), all 24
/// tokens. Trained once per test binary; a clone is returned.
pub struct Memorizing {
    pub model: crate::models::Model,
    pub forget: Vec<Vec<u32>>,
    pub retain: Vec<Vec<u32>>,
}

impl Memorizing {
    /// Prompt 8 tokens, the next 16 compared.
    pub const DEFINITION: crate::audit::Definition =
        crate::audit::Definition::Custom { k: 8, n: 16 };

    /// How many of `rows` `model` regurgitates under [`Self::DEFINITION`].
    pub fn extractable(model: &crate::models::Model, rows: &[Vec<u32>]) -> usize {
        let items: Vec<_> = rows
            .iter()
            .map(|r| Self::DEFINITION.split(r).unwrap())
            .collect();
        crate::audit::audit(model, None, &items, 16)
            .unwrap()
            .1
            .memorized
    }
}

pub fn memorizing() -> Memorizing {
    use crate::models::{Model, Weights};
    use crate::optim::{AdamW, AdamWParams};
    use crate::tinymem::train::{named_vars, train_step, StepWorkspace};
    type Trained = (Vec<(String, Tensor)>, Vec<Vec<u32>>, Vec<Vec<u32>>);
    static TRAINED: std::sync::OnceLock<Trained> = std::sync::OnceLock::new();
    let config = crate::models::ModelConfig::Gpt2(crate::models::gpt2::Config {
        n_inner: 64,
        initializer_range: 0.05,
        ..match gpt2_with(
            crate::models::ops::Activation::Relu,
            (14, 32, 32, 2),
            2,
            true,
            false,
        ) {
            crate::models::ModelConfig::Gpt2(c) => c,
            _ => unreachable!(),
        }
    });
    let (tensors, forget, retain) = TRAINED.get_or_init(|| {
        let len = 24;
        let retain: Vec<Vec<u32>> = (0..96u32)
            .map(|r| {
                (0..len as u32)
                    .map(|k| (r + k * (1 + r % 7)) % 10)
                    .collect()
            })
            .collect();
        let forget = rows(4, |_| len, 7);
        let (model, weights) = Model::random(&config, &Device::Cpu)
            .unwrap()
            .trainable_copy(0)
            .unwrap();
        let params = AdamWParams {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(named_vars(&model, &weights).unwrap(), params).unwrap();
        let mut train: Vec<&Vec<u32>> = retain.iter().collect();
        for _ in 0..8 {
            train.extend(forget.iter());
        }
        let mut ws = StepWorkspace::default();
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut s = 1u64;
        for _epoch in 0..60 {
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            for batch in order.chunks(16) {
                let ids: Vec<u32> = batch.iter().flat_map(|&i| train[i].clone()).collect();
                train_step(&model, &mut opt, &ids, (batch.len(), len), &mut ws).unwrap();
            }
        }
        let tensors = model
            .named_tensors()
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().copy().unwrap()))
            .collect();
        (tensors, forget, retain)
    });
    let weights = Weights::from_tensors(tensors.iter().cloned().collect(), "memorizing");
    Memorizing {
        model: Model::new(&config, &weights).unwrap(),
        forget: forget.clone(),
        retain: retain.clone(),
    }
}

#[cfg(test)]
mod memorizing_tests {
    #[test]
    fn the_memorizing_model_regurgitates_its_planted_rows() {
        let m = super::memorizing();
        assert_eq!(super::Memorizing::extractable(&m.model, &m.forget), 4);
    }
}
