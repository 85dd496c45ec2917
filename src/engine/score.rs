//! Scoring: per-token log-probabilities and perplexity of given token sequences, batched.
//!
//! Sequences are right-padded within a batch; under causal attention a real token never attends
//! to the padding after it, so each row's scores equal those of the row alone. The mean negative
//! log-likelihood is over the `n − 1` predicted tokens (every token after the first).

use candle_core::Tensor;

use crate::error::{Error, Result};
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
    let ids = Tensor::from_vec(ids, (b, width), dev)?;
    let hidden = model.forward_hidden(&Inputs::causal(&ids, 0)?, None, None)?;
    let picked = model.next_token_logprobs(&hidden, &ids)?.to_vec2::<f32>()?;
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
