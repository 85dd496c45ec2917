//! Batched autoregressive generation with a shared, left-padded KV cache.
//!
//! Prompts of different lengths are left-padded into one batch; each row gets its own position
//! ids (starting at 0 at its first real token) and an attention mask that hides its padding, so
//! a row's tokens are the same whether it runs alone or in a batch. Rows leave the batch (and
//! the cache) as soon as they finish. Each row samples with its own seeded RNG.

use candle_core::{DType, Device, Tensor};

use super::sampling::{log_softmax, Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::models::{Inputs, KvCache, Model};
use crate::tokenizer::Tokenizer;

/// One sequence to continue.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop strings: generation ends when the decoded output contains one (needs a tokenizer);
    /// the returned text is cut before it.
    pub stop: Vec<String>,
    /// Token ids that can never be generated (audits ban EOS).
    pub banned_ids: Vec<u32>,
    /// End when the model emits its EOS token (ignored if EOS is banned).
    pub stop_at_eos: bool,
    /// `None`: no log-probabilities. `Some(n)`: the chosen token's log-probability, plus the
    /// `n` most likely alternatives per position when `n > 0`.
    pub top_logprobs: Option<usize>,
}

impl GenerateRequest {
    /// Greedy continuation of `prompt` by `max_new_tokens` tokens, stopping at EOS.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            banned_ids: Vec::new(),
            stop_at_eos: true,
            top_logprobs: None,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// A stop string or the EOS token.
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
        }
    }
}

/// The result for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids (an EOS that ended generation is not included).
    pub tokens: Vec<u32>,
    /// Decoded text, cut before a stop string (present when a tokenizer was given).
    pub text: Option<String>,
    pub finish_reason: FinishReason,
    /// Log-probability of each generated token under the model (temperature 1, no bans), when
    /// asked for.
    pub token_logprobs: Vec<f32>,
    /// The most likely alternatives per position, when asked for.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
}

struct Row {
    req: usize,
    sampler: Sampler,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
    text: Option<String>,
    done: Option<FinishReason>,
    /// Which cached key positions are real tokens (false = left padding).
    keys: Vec<bool>,
    /// Position id of the next token.
    next_pos: usize,
}

/// Checks requests against the model before any compute.
pub fn validate(model: &Model, reqs: &[GenerateRequest]) -> Result<()> {
    let spec = model.spec();
    for (i, r) in reqs.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(Error::invalid(format!("prompt[{i}]"), "is empty"));
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= spec.vocab_size) {
            return Err(Error::invalid(
                format!("prompt[{i}]"),
                format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    spec.vocab_size
                ),
            ));
        }
        let total = r.prompt.len() + r.max_new_tokens;
        if total > spec.context_length {
            return Err(Error::invalid(
                format!("prompt[{i}]"),
                format!(
                    "{} prompt tokens + {} new tokens exceed the context length {}",
                    r.prompt.len(),
                    r.max_new_tokens,
                    spec.context_length
                ),
            ));
        }
        r.sampling.validate()?;
        if r.banned_ids.len() >= spec.vocab_size {
            return Err(Error::invalid("banned_ids", "bans every token"));
        }
    }
    Ok(())
}

/// Generates continuations for all `reqs` in one batch.
pub fn generate(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    reqs: &[GenerateRequest],
) -> Result<Vec<Generation>> {
    validate(model, reqs)?;
    if reqs.iter().any(|r| !r.stop.is_empty()) && tokenizer.is_none() {
        return Err(Error::invalid("stop", "stop strings need a tokenizer"));
    }
    let spec = model.spec();
    let dev = model.device().clone();
    let eos = spec.eos_token_id;
    let width = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let mut rows: Vec<Row> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let pad = width - r.prompt.len();
            Row {
                req: i,
                sampler: Sampler::new(r.sampling.clone()),
                tokens: Vec::with_capacity(r.max_new_tokens),
                logprobs: Vec::new(),
                top: Vec::new(),
                text: None,
                done: (r.max_new_tokens == 0).then_some(FinishReason::Length),
                keys: (0..width).map(|j| j >= pad).collect(),
                next_pos: r.prompt.len(),
            }
        })
        .collect();

    // Rows still generating, by index into `rows`; their order is the batch order.
    let mut active: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].done.is_none())
        .collect();
    if !active.is_empty() {
        let mut ids = Vec::with_capacity(active.len() * width);
        let mut pos = Vec::with_capacity(active.len() * width);
        for &a in &active {
            let p = &reqs[rows[a].req].prompt;
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
            pos.extend((0..width).map(|j| j.saturating_sub(pad) as u32));
        }
        let b = active.len();
        let key_rows: Vec<&[bool]> = active.iter().map(|&a| rows[a].keys.as_slice()).collect();
        let inputs = Inputs {
            ids: Tensor::from_vec(ids, (b, width), &dev)?,
            positions: Tensor::from_vec(pos, (b, width), &dev)?,
            mask: padding_mask(&key_rows, width, model.dtype(), &dev)?,
        };
        let mut cache = KvCache::new(spec.num_layers);
        let hidden = model.forward_hidden(&inputs, Some(&mut cache), None)?;
        let mut logits = model
            .logits(&hidden.narrow(1, width - 1, 1)?)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;

        loop {
            // Pick a token for every active row.
            for (slot, &a) in active.iter().enumerate() {
                let row = &mut rows[a];
                let req = &reqs[row.req];
                let lg = &mut logits[slot];
                let lp = req.top_logprobs.map(|n| (log_softmax(lg), n));
                let tok = row.sampler.sample(lg, &req.banned_ids);
                if req.stop_at_eos && Some(tok) == eos && !req.banned_ids.contains(&tok) {
                    row.done = Some(FinishReason::Stop);
                    continue;
                }
                if let Some((lp, n)) = lp {
                    row.logprobs.push(lp[tok as usize]);
                    if n > 0 {
                        row.top.push(top_n(&lp, n));
                    }
                }
                row.tokens.push(tok);
                if !req.stop.is_empty() {
                    if let Some(tk) = tokenizer {
                        let text = tk.decode(&row.tokens)?;
                        if let Some(cut) =
                            req.stop.iter().filter_map(|s| text.find(s.as_str())).min()
                        {
                            row.text = Some(text[..cut].to_string());
                            row.done = Some(FinishReason::Stop);
                            continue;
                        }
                    }
                }
                if row.tokens.len() >= req.max_new_tokens {
                    row.done = Some(FinishReason::Length);
                }
            }
            let still: Vec<usize> = (0..active.len())
                .filter(|&s| rows[active[s]].done.is_none())
                .collect();
            if still.is_empty() {
                break;
            }
            if still.len() < active.len() {
                let idx: Vec<u32> = still.iter().map(|&s| s as u32).collect();
                cache.select_rows(&Tensor::new(idx.as_slice(), &dev)?)?;
                active = still.iter().map(|&s| active[s]).collect();
            }
            let b = active.len();
            let mut ids = Vec::with_capacity(b);
            let mut pos = Vec::with_capacity(b);
            for &a in &active {
                let row = &mut rows[a];
                ids.push(
                    *row.tokens
                        .last()
                        .expect("an active row has generated a token"),
                );
                pos.push(row.next_pos as u32);
                row.next_pos += 1;
                row.keys.push(true);
            }
            let key_rows: Vec<&[bool]> = active.iter().map(|&a| rows[a].keys.as_slice()).collect();
            let inputs = Inputs {
                ids: Tensor::from_vec(ids, (b, 1), &dev)?,
                positions: Tensor::from_vec(pos, (b, 1), &dev)?,
                mask: padding_mask(&key_rows, 1, model.dtype(), &dev)?,
            };
            let hidden = model.forward_hidden(&inputs, Some(&mut cache), None)?;
            logits = model
                .logits(&hidden)?
                .squeeze(1)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
        }
    }

    let mut out: Vec<Option<Generation>> = vec![None; reqs.len()];
    for row in rows {
        let text = match (row.text, tokenizer) {
            (Some(t), _) => Some(t),
            (None, Some(tk)) => Some(tk.decode(&row.tokens)?),
            (None, None) => None,
        };
        out[row.req] = Some(Generation {
            tokens: row.tokens,
            text,
            finish_reason: row.done.unwrap_or(FinishReason::Length),
            token_logprobs: row.logprobs,
            top_logprobs: row.top,
        });
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every request has a row"))
        .collect())
}

/// The `n` most likely tokens with their log-probabilities, most likely first.
fn top_n(lp: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(lp.len());
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    if n < idx.len() {
        idx.select_nth_unstable_by(n, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]));
    }
    let mut best: Vec<(u32, f32)> = idx[..n].iter().map(|&i| (i, lp[i as usize])).collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best
}

/// The additive mask for a step whose `t` new tokens are the last `t` entries of each row's
/// `keys`; `None` when no row has padding (plain causal attention then applies).
fn padding_mask(keys: &[&[bool]], t: usize, dtype: DType, dev: &Device) -> Result<Option<Tensor>> {
    if keys.iter().all(|k| k.iter().all(|&v| v)) {
        return Ok(None);
    }
    let s = keys[0].len();
    let past = s - t;
    let mut data = Vec::with_capacity(keys.len() * t * s);
    for k in keys {
        for i in 0..t {
            let q = past + i;
            // A padding query attends to itself only, so its (unused) state stays finite.
            data.extend((0..s).map(|j| {
                if j <= q && (k[j] || j == q) {
                    0.0f32
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Ok(Some(
        Tensor::from_vec(data, (keys.len(), 1, t, s), dev)?.to_dtype(dtype)?,
    ))
}
