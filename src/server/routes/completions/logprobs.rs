//! OpenAI's legacy `logprobs` object: for generated tokens, and for an echoed prompt (scoring).
//!
//! Invariants:
//! - `tokens`, `token_logprobs`, `top_logprobs` and `text_offset` have one entry per token, in
//!   order; a token's `text_offset` is the byte length of the decoded tokens before it in the
//!   choice, echoed prompt included.
//! - An echoed prompt's first token has a `null` logprob (nothing to condition on); every later
//!   one holds `log p(token | prefix)`, scored by one engine job on the request's version.
//! - One-token prompts are not scored, and no scoring job is sent when no prompt has two tokens.
//! - `top_logprobs` maps each alternative's decoded text to its logprob; alternatives that decode
//!   to the same text keep the first listed.
//! - Scoring refused or failed is answered like generation: 429 for a full queue, 503 for a
//!   stopped engine, 500 for an engine failure.

use super::*;

/// OpenAI's legacy logprobs object.
#[derive(Debug, Default, Serialize)]
pub(super) struct Logprobs {
    pub(super) tokens: Vec<String>,
    pub(super) token_logprobs: Vec<Option<f32>>,
    pub(super) top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub(super) text_offset: Vec<usize>,
}

impl Logprobs {
    pub(super) fn push(
        &mut self,
        s: &Served,
        token: u32,
        logprob: Option<f32>,
        top: Option<&[(u32, f32)]>,
        offset: &mut usize,
    ) -> Result<(), ApiError> {
        let text = s.tokenizer.decode(&[token])?;
        self.text_offset.push(*offset);
        *offset += text.len();
        self.tokens.push(text);
        self.token_logprobs.push(logprob);
        let top = match top {
            None => None,
            Some(alts) => {
                let mut m = serde_json::Map::new();
                for &(t, lp) in alts {
                    m.entry(s.tokenizer.decode(&[t])?)
                        .or_insert_with(|| Value::from(lp));
                }
                Some(m)
            }
        };
        self.top_logprobs.push(top);
        Ok(())
    }
}

/// Per-prompt log-probabilities of the prompt tokens (echo with logprobs).
pub(super) async fn prompt_logprobs(
    state: &AppState,
    s: &Arc<Served>,
    prompts: &[Prompt],
) -> Result<Vec<Vec<f32>>, ApiError> {
    let scored: Vec<usize> = (0..prompts.len())
        .filter(|&i| prompts[i].ids.len() >= 2)
        .collect();
    let mut out = vec![Vec::new(); prompts.len()];
    if scored.is_empty() {
        return Ok(out);
    }
    let (tx, rx) = oneshot::channel();
    state.engine.submit(Job::Score {
        served: s.clone(),
        seqs: scored.iter().map(|&i| prompts[i].ids.clone()).collect(),
        reply: tx,
    })?;
    let scores = rx
        .await
        .map_err(|_| ApiError::Unavailable("the engine stopped".into()))?
        .map_err(ApiError::Internal)?;
    for (i, sc) in scored.into_iter().zip(scores) {
        out[i] = sc.token_logprobs;
    }
    Ok(out)
}

/// The echoed prompt's logprobs entries (the first token has none).
pub(super) fn echo_logprobs(
    s: &Served,
    p: &Prompt,
    lps: &[f32],
    out: &mut Logprobs,
    offset: &mut usize,
) -> Result<(), ApiError> {
    for (k, &t) in p.ids.iter().enumerate() {
        let lp = if k == 0 {
            None
        } else {
            lps.get(k - 1).copied()
        };
        out.push(s, t, lp, None, offset)?;
    }
    Ok(())
}
