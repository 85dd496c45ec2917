//! Scoring: per-token log-probabilities and perplexity of given token sequences, batched.
//!
//! Invariants:
//! - For `n` tokens, `token_logprobs[i]` is `log p(token[i + 1] | token[..= i])`, and `nll` the
//!   mean negative log-likelihood in nats over the `n − 1` predicted tokens (every token after
//!   the first), summed in f64; it matches transformers' loss on the fixtures within 1e-4
//!   (`tests/parity.rs`).
//! - Sequences are right-padded within a batch; under causal attention a real token never
//!   attends to the padding after it, so each row's scores equal those of the row alone, to
//!   float rounding (`tests/model_invariants.rs`).
//! - Every sequence is checked before any compute: fewer than 2 tokens, more than the context
//!   length or an id outside the vocabulary is an error naming `sequence[i]`.
//! - GPT-2 with a ReLU MLP in f32 on the CPU (TinyMem) scores through the hand-written forward
//!   of `models::pass` (tested below against the candle path, within 1e-4); every other
//!   model through `forward_hidden` and the fused head (`Model::next_token_logprobs`).

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::models::pass::HandWrittenPass;
use crate::models::{Inputs, Model};

/// The score of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Number of tokens in the sequence.
    pub tokens: usize,
    /// `log p(token[i] | token[..i])` for i = 1..n.
    pub token_logprobs: Vec<f32>,
    /// Mean negative log-likelihood in nats over the n − 1 predicted tokens.
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
}

/// Scores every sequence, `batch_size` at a time.
pub fn score(model: &Model, seqs: &[Vec<u32>], batch_size: usize) -> Result<Vec<Score>> {
    let spec = model.spec();
    for (i, s) in seqs.iter().enumerate() {
        if s.len() < 2 {
            return Err(Error::invalid(
                format!("sequence[{i}]"),
                format!("has {} token(s); scoring needs at least 2", s.len()),
            ));
        }
        if s.len() > spec.context_length {
            return Err(Error::invalid(
                format!("sequence[{i}]"),
                format!(
                    "has {} tokens, more than the context length {}",
                    s.len(),
                    spec.context_length
                ),
            ));
        }
        if let Some(&bad) = s.iter().find(|&&t| t as usize >= spec.vocab_size) {
            return Err(Error::invalid(
                format!("sequence[{i}]"),
                format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    spec.vocab_size
                ),
            ));
        }
    }
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        out.extend(score_batch(model, chunk)?);
    }
    Ok(out)
}

fn score_batch(model: &Model, seqs: &[Vec<u32>]) -> Result<Vec<Score>> {
    let dev = model.device();
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let b = seqs.len();
    let mut ids = Vec::with_capacity(b * width);
    for s in seqs {
        ids.extend(
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(0, width - s.len())),
        );
    }
    let picked: Vec<Vec<f32>> = match model {
        // GPT-2 with a ReLU MLP in f32 on the CPU (TinyMem): the hand-written forward of
        // `models/gpt2/grad.rs`, no candle graph.
        Model::Gpt2(m) if m.mlp_grads_supported() => {
            let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
            m.token_logprobs(&ids, (b, width), &lens)?
                .chunks(width - 1)
                .map(<[f32]>::to_vec)
                .collect()
        }
        _ => {
            let ids = Tensor::from_vec(ids, (b, width), dev)?;
            let hidden = model.forward_hidden(&Inputs::causal(&ids, 0)?, None, None)?;
            model.next_token_logprobs(&hidden, &ids)?.to_vec2::<f32>()?
        }
    };
    Ok(seqs
        .iter()
        .zip(picked)
        .map(|(s, row)| {
            let token_logprobs = row[..s.len() - 1].to_vec();
            let nll = -token_logprobs.iter().map(|&x| x as f64).sum::<f64>() / (s.len() - 1) as f64;
            Score {
                tokens: s.len(),
                token_logprobs,
                nll,
                perplexity: nll.exp(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_hand_written_gpt2_path_scores_like_the_candle_path() {
        // Tied and untied heads, the 1/(layer + 1) attention scale, rows of mixed lengths
        // (right padding inside a batch), more rows than row groups.
        use crate::models::ops::Activation::{Gelu, Relu, Silu};
        for (act, tied, inverse_idx) in [
            (Relu, true, false),
            (Relu, false, true),
            (Gelu, false, false),
            (Silu, true, true),
        ] {
            let cfg = crate::test_util::gpt2_with(act, (14, 64, 24, 3), 2, tied, inverse_idx);
            let model = crate::models::Model::random(&cfg, &Device::Cpu).unwrap();
            let Model::Gpt2(gpt2) = &model else {
                unreachable!()
            };
            assert!(gpt2.mlp_grads_supported());
            let seqs: Vec<Vec<u32>> = (0..7)
                .map(|r| {
                    (0..[40, 2, 17, 40, 33, 5, 24][r])
                        .map(|i| ((i * 5 + r * 3) % 14) as u32)
                        .collect()
                })
                .collect();
            let fast = score(&model, &seqs, 4).unwrap();
            // The candle path: forward_hidden + the fused head, what other models take.
            let slow: Vec<Score> = seqs
                .chunks(4)
                .flat_map(|chunk| {
                    let width = chunk.iter().map(Vec::len).max().unwrap();
                    let ids: Vec<u32> = chunk
                        .iter()
                        .flat_map(|s| {
                            s.iter()
                                .copied()
                                .chain(std::iter::repeat_n(0, width - s.len()))
                        })
                        .collect();
                    let ids = Tensor::from_vec(ids, (chunk.len(), width), &Device::Cpu).unwrap();
                    let hidden = model
                        .forward_hidden(&Inputs::causal(&ids, 0).unwrap(), None, None)
                        .unwrap();
                    let lp = model
                        .next_token_logprobs(&hidden, &ids)
                        .unwrap()
                        .to_vec2::<f32>()
                        .unwrap();
                    chunk
                        .iter()
                        .zip(lp)
                        .map(|(s, row)| row[..s.len() - 1].to_vec())
                        .collect::<Vec<_>>()
                })
                .map(|token_logprobs| Score {
                    tokens: token_logprobs.len() + 1,
                    nll: 0.0,
                    perplexity: 0.0,
                    token_logprobs,
                })
                .collect();
            for (f, s) in fast.iter().zip(&slow) {
                assert_eq!(f.tokens, s.tokens);
                assert_eq!(f.token_logprobs.len(), s.token_logprobs.len());
                for (a, b) in f.token_logprobs.iter().zip(&s.token_logprobs) {
                    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
                }
            }
        }
    }
}
