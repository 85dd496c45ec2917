//! Batched autoregressive generation with a shared, left-padded KV cache, and continuous
//! batching ([`DecodeBatch`]), which [`generate`] and the engine thread both run.
//!
//! Invariants:
//! - Prompts of different lengths are left-padded into one batch; each row gets its own position
//!   ids (0 at its first real token) and a mask that hides its padding, so a row computes what it
//!   would alone, to float rounding: `tests/model_invariants.rs` checks the same tokens and
//!   log-probabilities within 1e-4 for padded batches and for rows joining and leaving a running
//!   batch.
//! - Rows join between decode steps ([`DecodeBatch::admit`] prefills them as their own
//!   left-padded batch, then stacks their cache under the running one, left-padding the shorter)
//!   and leave as soon as they finish or are cancelled; padding columns that no row needs any
//!   more are trimmed from the cache, and an empty batch frees it.
//! - Requests are validated before any compute (empty prompt, id outside the vocabulary, prompt
//!   plus new tokens over the context length, bad sampling parameters, every id banned, stop
//!   strings without a tokenizer): an error naming the field, and nothing is admitted.
//! - Each row samples with its own [`Sampler`]: greedy rows are deterministic, seeded rows draw
//!   the same tokens alone or batched.
//! - Every emitted token is one [`Event::Token`], in order, and every row that finishes ends with
//!   one [`Event::Done`]; an ending EOS, a stop string's last token and a token the output
//!   filter refuses are not emitted. Cancelled rows ([`DecodeBatch::cancel`]) get no events.

use candle_core::{DType, Device, Tensor};

use super::sampling::{log_softmax, Sampler, SamplingParams};
use crate::error::{Error, Result};
use crate::models::{Inputs, KvCache, Model};
use crate::tokenizer::Tokenizer;

/// Cuts a generation when it would reproduce protected text (the server's regurgitation
/// guard implements it).
pub trait OutputFilter: Send + Sync {
    /// A fresh per-sequence state that has seen `prompt`.
    fn start(&self, prompt: &[u32]) -> Box<dyn FilterState>;
}

/// Per-sequence state of an [`OutputFilter`].
pub trait FilterState: Send {
    /// Sees the next generated token; true means it must not be emitted.
    fn push(&mut self, token: u32) -> bool;
}

/// A shared output filter attached to a request.
#[derive(Clone)]
pub struct Filter(pub std::sync::Arc<dyn OutputFilter>);

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Filter")
    }
}

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
    /// Ends the sequence (finish reason `content_filter`) before a token the filter refuses.
    pub filter: Option<Filter>,
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
            filter: None,
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
    /// Cut by a content filter (the server's regurgitation guard).
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
            Self::ContentFilter => "content_filter",
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
    id: u64,
    req: GenerateRequest,
    sampler: Sampler,
    filter: Option<Box<dyn FilterState>>,
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

impl Row {
    fn new(id: u64, req: GenerateRequest, width: usize) -> Self {
        let pad = width - req.prompt.len();
        Self {
            id,
            sampler: Sampler::new(req.sampling.clone()),
            filter: req.filter.as_ref().map(|f| f.0.start(&req.prompt)),
            tokens: Vec::with_capacity(req.max_new_tokens),
            logprobs: Vec::new(),
            top: Vec::new(),
            text: None,
            done: (req.max_new_tokens == 0).then_some(FinishReason::Length),
            keys: (0..width).map(|j| j >= pad).collect(),
            next_pos: req.prompt.len(),
            req,
        }
    }

    /// Picks the next token from `logits`; returns the event for it, if one was emitted.
    fn advance(
        &mut self,
        logits: &mut [f32],
        eos: Option<u32>,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Option<Event>> {
        let req = &self.req;
        let lp = req.top_logprobs.map(|n| (log_softmax(logits), n));
        let tok = self.sampler.sample(logits, &req.banned_ids);
        if req.stop_at_eos && Some(tok) == eos && !req.banned_ids.contains(&tok) {
            self.done = Some(FinishReason::Stop);
            return Ok(None);
        }
        if let Some(f) = self.filter.as_mut() {
            if f.push(tok) {
                self.done = Some(FinishReason::ContentFilter);
                return Ok(None);
            }
        }
        let mut logprob = None;
        let mut top = Vec::new();
        if let Some((lp, n)) = lp {
            logprob = Some(lp[tok as usize]);
            self.logprobs.push(lp[tok as usize]);
            if n > 0 {
                top = top_n(&lp, n);
                self.top.push(top.clone());
            }
        }
        self.tokens.push(tok);
        if !req.stop.is_empty() {
            if let Some(tk) = tokenizer {
                let text = tk.decode(&self.tokens)?;
                if let Some(cut) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    self.text = Some(text[..cut].to_string());
                    self.done = Some(FinishReason::Stop);
                    return Ok(None);
                }
            }
        }
        if self.tokens.len() >= req.max_new_tokens {
            self.done = Some(FinishReason::Length);
        }
        Ok(Some(Event::Token {
            id: self.id,
            token: tok,
            logprob,
            top,
        }))
    }

    fn finish(self, tokenizer: Option<&Tokenizer>) -> Result<Event> {
        let text = match (self.text, tokenizer) {
            (Some(t), _) => Some(t),
            (None, Some(tk)) => Some(tk.decode(&self.tokens)?),
            (None, None) => None,
        };
        Ok(Event::Done {
            id: self.id,
            generation: Generation {
                tokens: self.tokens,
                text,
                finish_reason: self.done.unwrap_or(FinishReason::Length),
                token_logprobs: self.logprobs,
                top_logprobs: self.top,
            },
        })
    }
}

/// What a decode step produced for one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token was generated (a stop string's last token and an ending EOS are not reported).
    Token {
        id: u64,
        token: u32,
        /// Its log-probability, when asked for.
        logprob: Option<f32>,
        /// The most likely alternatives, when asked for.
        top: Vec<(u32, f32)>,
    },
    /// The row finished; it has left the batch.
    Done { id: u64, generation: Generation },
}

/// A running batch of generations that rows can join and leave between decode steps.
///
/// Invariant: every row in the batch is unfinished and has generated at least one token that
/// has not yet been fed to the model.
pub struct DecodeBatch {
    cache: KvCache,
    rows: Vec<Row>,
    num_layers: usize,
    dev: Device,
}

impl DecodeBatch {
    /// An empty batch for `model`.
    pub fn new(model: &Model) -> Self {
        let num_layers = model.spec().num_layers;
        Self {
            cache: KvCache::new(num_layers),
            rows: Vec::new(),
            num_layers,
            dev: model.device().clone(),
        }
    }

    /// Number of rows generating.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Positions held in the shared cache (the longest row plus any padding).
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Prefills `reqs` (each tagged with a caller-chosen id) and adds them to the batch; their
    /// first tokens, and the rows that finish at once, are pushed to `events`. Requests are
    /// validated first: on an error nothing is admitted.
    pub fn admit(
        &mut self,
        model: &Model,
        tokenizer: Option<&Tokenizer>,
        reqs: Vec<(u64, GenerateRequest)>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        {
            let plain: Vec<&GenerateRequest> = reqs.iter().map(|(_, r)| r).collect();
            validate_all(model, &plain)?;
            if plain.iter().any(|r| !r.stop.is_empty()) && tokenizer.is_none() {
                return Err(Error::invalid("stop", "stop strings need a tokenizer"));
            }
        }
        let width = reqs.iter().map(|(_, r)| r.prompt.len()).max().unwrap_or(0);
        let mut fresh = Vec::with_capacity(reqs.len());
        for (id, req) in reqs {
            let row = Row::new(id, req, width);
            if row.done.is_some() {
                events.push(row.finish(tokenizer)?);
            } else {
                fresh.push(row);
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let dev = model.device().clone();
        let b = fresh.len();
        let mut ids = Vec::with_capacity(b * width);
        let mut pos = Vec::with_capacity(b * width);
        for row in &fresh {
            let p = &row.req.prompt;
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
            pos.extend((0..width).map(|j| j.saturating_sub(pad) as u32));
        }
        let key_rows: Vec<&[bool]> = fresh.iter().map(|r| r.keys.as_slice()).collect();
        let inputs = Inputs {
            ids: Tensor::from_vec(ids, (b, width), &dev)?,
            positions: Tensor::from_vec(pos, (b, width), &dev)?,
            mask: padding_mask(&key_rows, width, model.dtype(), &dev)?,
        };
        let mut cache = KvCache::new(self.num_layers);
        let hidden = model.forward_hidden(&inputs, Some(&mut cache), None)?;
        let logits = model
            .logits(&hidden.narrow(1, width - 1, 1)?)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let eos = model.spec().eos_token_id;
        let fresh = advance_rows(fresh, logits, eos, tokenizer, &mut cache, &dev, events)?;
        if fresh.is_empty() {
            return Ok(());
        }
        // Stack the new rows under the running ones; the shorter side gets left padding.
        let (old_len, new_len) = (self.cache.len(), cache.len());
        let len = old_len.max(new_len);
        for row in &mut self.rows {
            row.keys
                .splice(0..0, std::iter::repeat_n(false, len - old_len));
        }
        self.cache.merge(&cache)?;
        self.rows.extend(fresh.into_iter().map(|mut row| {
            row.keys
                .splice(0..0, std::iter::repeat_n(false, len - new_len));
            row
        }));
        Ok(())
    }

    /// Runs one decode step for every row; generated tokens and finished rows go to `events`.
    pub fn step(
        &mut self,
        model: &Model,
        tokenizer: Option<&Tokenizer>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let dev = model.device().clone();
        let b = self.rows.len();
        let mut ids = Vec::with_capacity(b);
        let mut pos = Vec::with_capacity(b);
        for row in &mut self.rows {
            ids.push(
                *row.tokens
                    .last()
                    .expect("a row in the batch has generated a token"),
            );
            pos.push(row.next_pos as u32);
            row.next_pos += 1;
            row.keys.push(true);
        }
        let key_rows: Vec<&[bool]> = self.rows.iter().map(|r| r.keys.as_slice()).collect();
        let inputs = Inputs {
            ids: Tensor::from_vec(ids, (b, 1), &dev)?,
            positions: Tensor::from_vec(pos, (b, 1), &dev)?,
            mask: padding_mask(&key_rows, 1, model.dtype(), &dev)?,
        };
        let hidden = model.forward_hidden(&inputs, Some(&mut self.cache), None)?;
        let logits = model
            .logits(&hidden)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let eos = model.spec().eos_token_id;
        let rows = std::mem::take(&mut self.rows);
        self.rows = advance_rows(rows, logits, eos, tokenizer, &mut self.cache, &dev, events)?;
        self.compact()
    }

    /// Removes the rows whose id is in `ids` (e.g. their client went away); returns how many
    /// were removed. No events are emitted for them.
    pub fn cancel(&mut self, ids: &[u64]) -> Result<usize> {
        let keep: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|&i| !ids.contains(&self.rows[i as usize].id))
            .collect();
        let removed = self.rows.len() - keep.len();
        if removed > 0 {
            let idx = Tensor::new(keep.as_slice(), &self.dev)?;
            self.cache.select_rows(&idx)?;
            let mut i = 0;
            self.rows.retain(|_| {
                i += 1;
                keep.binary_search(&(i as u32 - 1)).is_ok()
            });
            self.compact()?;
        }
        Ok(removed)
    }

    /// Resets an empty batch's cache and trims padding columns that every row has.
    fn compact(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            self.cache = KvCache::new(self.num_layers);
            return Ok(());
        }
        let lead = self
            .rows
            .iter()
            .map(|r| r.keys.iter().take_while(|&&k| !k).count())
            .min()
            .unwrap_or(0);
        if lead > 0 {
            self.cache.trim_front(lead)?;
            for row in &mut self.rows {
                row.keys.drain(..lead);
            }
        }
        Ok(())
    }
}

/// Samples one token per row from `logits` (row order), pushes events, and drops finished rows
/// from `rows` and `cache`.
fn advance_rows(
    rows: Vec<Row>,
    mut logits: Vec<Vec<f32>>,
    eos: Option<u32>,
    tokenizer: Option<&Tokenizer>,
    cache: &mut KvCache,
    dev: &Device,
    events: &mut Vec<Event>,
) -> Result<Vec<Row>> {
    let mut kept = Vec::with_capacity(rows.len());
    let mut keep_idx = Vec::with_capacity(rows.len());
    let total = rows.len();
    for (slot, mut row) in rows.into_iter().enumerate() {
        if let Some(ev) = row.advance(&mut logits[slot], eos, tokenizer)? {
            events.push(ev);
        }
        if row.done.is_some() {
            events.push(row.finish(tokenizer)?);
        } else {
            keep_idx.push(slot as u32);
            kept.push(row);
        }
    }
    if !kept.is_empty() && kept.len() < total {
        cache.select_rows(&Tensor::new(keep_idx.as_slice(), dev)?)?;
    }
    Ok(kept)
}

/// Checks requests against the model before any compute.
pub fn validate(model: &Model, reqs: &[GenerateRequest]) -> Result<()> {
    validate_all(model, &reqs.iter().collect::<Vec<_>>())
}

fn validate_all(model: &Model, reqs: &[&GenerateRequest]) -> Result<()> {
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
        // Checked: a `max_new_tokens` near usize::MAX must not wrap past the check.
        let fits = r
            .prompt
            .len()
            .checked_add(r.max_new_tokens)
            .is_some_and(|total| total <= spec.context_length);
        if !fits {
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
    let mut batch = DecodeBatch::new(model);
    let mut events = Vec::new();
    batch.admit(
        model,
        tokenizer,
        reqs.iter()
            .cloned()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect(),
        &mut events,
    )?;
    let mut out: Vec<Option<Generation>> = vec![None; reqs.len()];
    loop {
        for ev in events.drain(..) {
            if let Event::Done { id, generation } = ev {
                out[id as usize] = Some(generation);
            }
        }
        if batch.is_empty() {
            break;
        }
        batch.step(model, tokenizer, &mut events)?;
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every request finishes"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::Activation;
    use crate::test_util::{max_abs_diff, neox, relu_gpt2};

    /// Weights held in bf16 or f16 (`lethe serve --dtype`) compute what the same values compute
    /// in f32: greedy tokens equal and log-probabilities within 1e-4 over prefills wider than the
    /// skinny kernels take (the weight widened per product) and decode steps (the kernels
    /// widening as they read; f32 takes the hand-written decode step), and logits and scored
    /// log-probabilities (the head widened once) within 1e-4, on both architectures with tied
    /// and untied heads.
    #[test]
    fn half_precision_weights_compute_what_their_f32_values_compute() {
        let configs = [
            relu_gpt2((61, 64, 32, 4), 2, true, false),
            neox(
                (61, 64, 32, 4, 64),
                2,
                0.25,
                true,
                Activation::Gelu,
                true,
                false,
            ),
            neox(
                (61, 64, 32, 4, 48),
                2,
                1.0,
                false,
                Activation::GeluTanh,
                false,
                true,
            ),
        ];
        for cfg in configs {
            let random = Model::random(&cfg, &Device::Cpu).unwrap();
            for half in [DType::BF16, DType::F16] {
                let what = format!("{:?} {half:?}", random.spec());
                let exact = random.rounded_as(half, DType::F32).unwrap();
                let held = random.rounded_as(half, half).unwrap();
                assert_eq!(
                    (held.weight_dtype(), held.dtype()),
                    (half, DType::F32),
                    "{what}"
                );
                let reqs: Vec<GenerateRequest> = (0..6)
                    .map(|i| {
                        let prompt = (0..3 + 4 * i).map(|j| ((j * 7 + i) % 61) as u32);
                        let mut r = GenerateRequest::greedy(prompt.collect(), 10);
                        r.stop_at_eos = false;
                        r.top_logprobs = Some(0);
                        r
                    })
                    .collect();
                let (a, b) = (
                    generate(&exact, None, &reqs).unwrap(),
                    generate(&held, None, &reqs).unwrap(),
                );
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(x.tokens, y.tokens, "{what}");
                    for (p, q) in x.token_logprobs.iter().zip(&y.token_logprobs) {
                        assert!((p - q).abs() < 1e-4, "{what}: logprob {p} vs {q}");
                    }
                }
                let ids: Vec<u32> = (0..3 * 20).map(|j| (j * 13 % 61) as u32).collect();
                let ids = Tensor::from_vec(ids, (3, 20), &Device::Cpu).unwrap();
                let inputs = Inputs::causal(&ids, 0).unwrap();
                let hidden = |m: &Model| m.forward_hidden(&inputs, None, None).unwrap();
                let (hx, hy) = (hidden(&exact), hidden(&held));
                assert!(max_abs_diff(&hx, &hy) < 1e-4, "{what}: hidden states");
                let logits = |m: &Model, h: &Tensor| m.logits(h).unwrap();
                let d = max_abs_diff(&logits(&exact, &hx), &logits(&held, &hy));
                assert!(d < 1e-4, "{what}: logits differ by {d}");
                let scored = |m: &Model, h: &Tensor| m.next_token_logprobs(h, &ids).unwrap();
                let d = max_abs_diff(&scored(&exact, &hx), &scored(&held, &hy));
                assert!(d < 1e-4, "{what}: scored log-probabilities differ by {d}");
            }
        }
    }
}
