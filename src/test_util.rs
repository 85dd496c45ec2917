//! Helpers for the library's unit tests: deterministic random tensors and tensor comparisons.

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
        activation: crate::models::ops::Activation::Relu,
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

/// `‖a − b‖₂ / ‖b‖₂` (absolute when `b` is 0), accumulated in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
