//! `POST /v1/completions` in OpenAI's shape, plain or streamed (server-sent events).
//!
//! `prompt` is a string, a list of strings, a list of token ids, or a list of token-id lists;
//! each prompt gets `n` choices (choice index = prompt index × n + j). With a `seed`, choice `i`
//! samples with seed `seed + i`, so the same request gives the same output every time, however
//! it is batched. `echo` with `max_tokens: 0` scores a prompt (perplexity through the API):
//! `logprobs.token_logprobs` holds `log p(token | prefix)` for every prompt token after the first.

use std::collections::VecDeque;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{GenerateRequest, Generation, SamplingParams};
use crate::server::body;
use crate::server::engine::{Job, RowEvent};
use crate::server::error::ApiError;
use crate::server::peer::{self, Peer};
use crate::server::state::{unix_now, AppState, Served};

/// The header that names the weights version a response was computed with.
pub const VERSION_HEADER: &str = "x-lethe-model-version";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Value,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Not in OpenAI's API (as in vLLM): keep only the k most likely tokens; 0 disables.
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Accepted for compatibility and ignored (never logged).
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

/// The status recorded (never received) when the client left before the answer: nginx's 499.
fn client_closed() -> actix_web::http::StatusCode {
    actix_web::http::StatusCode::from_u16(499).unwrap_or(actix_web::http::StatusCode::BAD_REQUEST)
}
const MAX_STOP_STRINGS: usize = 4;

/// A 404 unless `model` (when given) names the served model or its version.
pub fn check_model(model: Option<&str>, s: &Served) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.name && m != s.version => Err(ApiError::NotFound {
            message: format!(
                "model {m:?} is not served here; this server serves {:?}",
                s.name
            ),
            param: Some("model".into()),
            code: "model_not_found",
        }),
        _ => Ok(()),
    }
}

/// One prompt: its token ids and its text.
struct Prompt {
    ids: Vec<u32>,
    text: String,
}

fn parse_prompts(v: &Value, s: &Served, max_prompts: usize) -> Result<Vec<Prompt>, ApiError> {
    let shape = || {
        ApiError::invalid(
            "prompt",
            "must be a string, a list of strings, a list of token ids, or a list of token-id lists",
        )
    };
    let vocab = s.model.spec().vocab_size;
    let ids_of = |arr: &[Value], field: &str| -> Result<Vec<u32>, ApiError> {
        arr.iter()
            .enumerate()
            .map(|(j, t)| match t.as_u64() {
                Some(t) if (t as usize) < vocab => Ok(t as u32),
                _ => Err(ApiError::invalid(
                    format!("{field}[{j}]"),
                    format!("{t} is not a token id (an integer below the vocabulary size {vocab})"),
                )),
            })
            .collect()
    };
    let text_prompt = |t: &str, field: &str| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            ids: s.tokenizer.encode_field(field, t)?,
            text: t.to_string(),
        })
    };
    let id_prompt = |ids: Vec<u32>| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            text: s.tokenizer.decode(&ids)?,
            ids,
        })
    };
    let prompts = match v {
        Value::String(t) => vec![text_prompt(t, "prompt")?],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "must not be an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .enumerate()
            .map(|(i, t)| text_prompt(t.as_str().unwrap_or_default(), &format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![id_prompt(ids_of(items, "prompt")?)?]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let row = row.as_array().map(Vec::as_slice).unwrap_or_default();
                id_prompt(ids_of(row, &format!("prompt[{i}]"))?)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(shape()),
    };
    if prompts.len() > max_prompts {
        return Err(ApiError::TooLarge {
            message: format!(
                "{} prompts in one request; the limit is {max_prompts}",
                prompts.len()
            ),
            param: Some("prompt".into()),
        });
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(ApiError::invalid(
                format!("prompt[{i}]"),
                "has no tokens; a prompt needs at least one",
            ));
        }
    }
    Ok(prompts)
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid(format!("stop[{i}]"), "must be a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "must be a string or a list of strings",
            ))
        }
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings"),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(stops)
}

/// A validated request, ready for the engine.
struct Plan {
    prompts: Vec<Prompt>,
    n: usize,
    max_tokens: usize,
    echo: bool,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
    reqs: Vec<GenerateRequest>,
}

fn plan(r: CompletionRequest, s: &Served, state: &AppState) -> Result<Plan, ApiError> {
    let limits = &state.limits;
    check_model(r.model.as_deref(), s)?;
    let prompts = parse_prompts(&r.prompt, s, limits.max_prompts)?;
    let n = r.n.unwrap_or(1);
    if n == 0 || n > limits.max_n {
        return Err(ApiError::invalid(
            "n",
            format!("must be between 1 and {}", limits.max_n),
        ));
    }
    let temperature = r.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", "must be between 0 and 2"));
    }
    let top_p = r.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "must be in (0, 1]"));
    }
    if let Some(lp) = r.logprobs {
        if lp > limits.max_logprobs {
            return Err(ApiError::invalid(
                "logprobs",
                format!("must be between 0 and {}", limits.max_logprobs),
            ));
        }
    }
    let stop = parse_stop(r.stop.as_ref())?;
    let max_tokens = r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let echo = r.echo.unwrap_or(false);
    let stream = r.stream.unwrap_or(false);
    if r.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "is only allowed when stream is true",
        ));
    }
    let ctx = s.model.spec().context_length;
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.len() > ctx {
            return Err(ApiError::invalid(
                format!("prompt[{i}]"),
                format!(
                    "has {} tokens, more than the model's context length {ctx}",
                    p.ids.len()
                ),
            ));
        }
        // `ids.len() <= ctx` here, so the subtraction cannot wrap (an addition could).
        if max_tokens > ctx - p.ids.len() {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "prompt[{i}] has {} tokens; with max_tokens {max_tokens} that exceeds the \
                     model's context length {ctx}",
                    p.ids.len()
                ),
            ));
        }
    }
    let mut reqs = Vec::new();
    if max_tokens > 0 {
        for (pi, p) in prompts.iter().enumerate() {
            for j in 0..n {
                let choice = (pi * n + j) as u64;
                reqs.push(GenerateRequest {
                    prompt: p.ids.clone(),
                    max_new_tokens: max_tokens,
                    sampling: SamplingParams {
                        temperature,
                        top_p,
                        top_k: r.top_k.unwrap_or(0),
                        seed: r.seed.map(|s| (s as u64).wrapping_add(choice)),
                    },
                    stop: stop.clone(),
                    banned_ids: Vec::new(),
                    stop_at_eos: true,
                    top_logprobs: r.logprobs,
                    filter: state.guard_filter(),
                });
            }
        }
    }
    Ok(Plan {
        prompts,
        n,
        max_tokens,
        echo,
        logprobs: r.logprobs,
        stream,
        include_usage: r.stream_options.is_some_and(|o| o.include_usage),
        reqs,
    })
}

/// OpenAI's legacy logprobs object.
#[derive(Debug, Default, Serialize)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    text_offset: Vec<usize>,
}

impl Logprobs {
    fn push(
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

#[derive(Serialize)]
struct Choice {
    index: usize,
    text: String,
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Clone, Copy, Default)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
    total_tokens: usize,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// Per-prompt log-probabilities of the prompt tokens (echo with logprobs).
async fn prompt_logprobs(
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
fn echo_logprobs(
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

pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.inference(&req)?;
    let r: CompletionRequest = body::json(&req, payload, state.limits.max_body_bytes).await?;
    let s = state.served();
    let plan = plan(r, &s, &state)?;
    state
        .metrics
        .prompt_tokens
        .inc_by(plan.prompts.iter().map(|p| p.ids.len() as u64).sum());
    let prompt_lps = if plan.echo && plan.logprobs.is_some() {
        prompt_logprobs(&state, &s, &plan.prompts).await?
    } else {
        vec![Vec::new(); plan.prompts.len()]
    };
    let id = format!(
        "cmpl-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    );
    let rx = if plan.reqs.is_empty() {
        None
    } else {
        let (tx, rx) = mpsc::unbounded_channel();
        state.engine.submit(Job::Generate {
            served: s.clone(),
            reqs: plan.reqs.clone(),
            events: tx,
        })?;
        Some(rx)
    };
    let mut resp = HttpResponse::Ok();
    resp.insert_header((VERSION_HEADER, s.version.clone()));
    if plan.stream {
        let stream = Stream::new(s, id, plan, prompt_lps, rx)?;
        return Ok(resp
            .insert_header((header::CONTENT_TYPE, "text/event-stream"))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .streaming(futures_util::stream::unfold(Some(stream), move |st| {
                let state = state.clone();
                async move { next_frame(st?, &state).await }
            })));
    }
    let total = plan.prompts.len() * plan.n;
    let mut gens: Vec<Option<Generation>> = vec![None; total];
    if let Some(mut rx) = rx {
        let mut left = plan.reqs.len();
        let peer = Peer::of(&req);
        let mut checked = std::time::Instant::now();
        while left > 0 {
            // While it waits, the handler checks every CHECK_INTERVAL that its client is still
            // there, whether or not tokens keep arriving (they arrive far more often than that
            // while rows generate); if it left, dropping `rx` makes the engine cancel the rows
            // at its next step.
            let event = tokio::time::timeout(peer::CHECK_INTERVAL, rx.recv()).await;
            if checked.elapsed() >= peer::CHECK_INTERVAL {
                checked = std::time::Instant::now();
                if peer.as_ref().is_some_and(Peer::gone) {
                    tracing::info!(
                        rows = left,
                        "client closed the connection; generation cancelled"
                    );
                    return Ok(HttpResponse::build(client_closed()).finish());
                }
            }
            let Ok(event) = event else {
                continue;
            };
            match event {
                Some(RowEvent::Done { index, generation }) => {
                    gens[index] = Some(generation);
                    left -= 1;
                }
                Some(RowEvent::Token { .. }) => {}
                Some(RowEvent::Failed { message }) => return Err(ApiError::Internal(message)),
                None => return Err(ApiError::Unavailable("the engine stopped".into())),
            }
        }
    }
    let mut usage = Usage {
        prompt_tokens: plan.prompts.iter().map(|p| p.ids.len()).sum(),
        ..Usage::default()
    };
    let mut choices = Vec::with_capacity(total);
    for (index, g) in gens.into_iter().enumerate() {
        let p = &plan.prompts[index / plan.n];
        let mut text = if plan.echo {
            p.text.clone()
        } else {
            String::new()
        };
        let mut logprobs = plan.logprobs.map(|_| Logprobs::default());
        let mut offset = 0;
        if let Some(lp) = logprobs.as_mut() {
            if plan.echo {
                echo_logprobs(&s, p, &prompt_lps[index / plan.n], lp, &mut offset)?;
            }
        }
        let finish = match &g {
            Some(g) => {
                usage.completion_tokens += g.tokens.len();
                text.push_str(g.text.as_deref().unwrap_or_default());
                if let Some(lp) = logprobs.as_mut() {
                    for (k, &t) in g.tokens.iter().enumerate() {
                        let top = g.top_logprobs.get(k).map(Vec::as_slice);
                        lp.push(&s, t, g.token_logprobs.get(k).copied(), top, &mut offset)?;
                    }
                }
                g.finish_reason.as_str()
            }
            None => "length",
        };
        choices.push(Choice {
            index,
            text,
            logprobs,
            finish_reason: Some(finish),
        });
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    debug_assert_eq!(plan.max_tokens == 0, plan.reqs.is_empty());
    Ok(resp.json(Completion {
        id: &id,
        object: "text_completion",
        created: unix_now(),
        model: &s.name,
        system_fingerprint: &s.version,
        choices,
        usage: Some(usage),
    }))
}

/// The stream's next frame. The response head is already sent, so the panic boundary of the
/// middleware cannot answer 500 any more: a panic here ends the stream with an error event and
/// `[DONE]`, and is counted like one in a handler.
async fn next_frame(
    mut st: Stream,
    state: &AppState,
) -> Option<(Result<web::Bytes, actix_web::Error>, Option<Stream>)> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(st.next()).catch_unwind().await {
        Ok(frame) => frame.map(|b| (Ok(b), Some(st))),
        Err(payload) => {
            state.metrics.panics.with_label_values(&["http"]).inc();
            let message = crate::supervise::panic_message(payload.as_ref());
            tracing::error!(panic = %message, "a completion stream panicked; it ends with an error event");
            let body = serde_json::json!({"error": {
                "message": "internal error while streaming (logged)", "type": "server_error",
                "param": null, "code": "internal_error"}});
            let frames = format!("data: {body}\n\ndata: [DONE]\n\n");
            Some((Ok(web::Bytes::from(frames)), None))
        }
    }
}

/// Per-choice streaming state.
#[derive(Default)]
struct StreamChoice {
    tokens: Vec<u32>,
    /// Text already sent (without the echoed prompt).
    sent: String,
    offset: usize,
}

/// The server-sent-event stream of one completion.
struct Stream {
    served: Arc<Served>,
    id: String,
    created: u64,
    logprobs: bool,
    stop: Vec<String>,
    include_usage: bool,
    usage: Usage,
    choices: Vec<StreamChoice>,
    rx: Option<mpsc::UnboundedReceiver<RowEvent>>,
    left: usize,
    out: VecDeque<web::Bytes>,
    finished: bool,
}

impl Stream {
    fn new(
        served: Arc<Served>,
        id: String,
        plan: Plan,
        prompt_lps: Vec<Vec<f32>>,
        rx: Option<mpsc::UnboundedReceiver<RowEvent>>,
    ) -> Result<Self, ApiError> {
        let total = plan.prompts.len() * plan.n;
        let mut st = Stream {
            id,
            created: unix_now(),
            logprobs: plan.logprobs.is_some(),
            stop: plan
                .reqs
                .first()
                .map(|r| r.stop.clone())
                .unwrap_or_default(),
            include_usage: plan.include_usage,
            usage: Usage {
                prompt_tokens: plan.prompts.iter().map(|p| p.ids.len()).sum(),
                ..Usage::default()
            },
            choices: (0..total).map(|_| StreamChoice::default()).collect(),
            rx,
            left: plan.reqs.len(),
            out: VecDeque::new(),
            finished: false,
            served,
        };
        for index in 0..total {
            let p = &plan.prompts[index / plan.n];
            if plan.echo {
                let mut lp = st.logprobs.then(Logprobs::default);
                if let Some(lp) = lp.as_mut() {
                    let offset = &mut st.choices[index].offset;
                    echo_logprobs(&st.served, p, &prompt_lps[index / plan.n], lp, offset)?;
                }
                st.chunk(index, p.text.clone(), lp, None);
            }
            if plan.max_tokens == 0 {
                st.chunk(index, String::new(), None, Some("length"));
            }
        }
        Ok(st)
    }

    fn chunk(
        &mut self,
        index: usize,
        text: String,
        logprobs: Option<Logprobs>,
        finish: Option<&'static str>,
    ) {
        let choice = Choice {
            index,
            text,
            logprobs,
            finish_reason: finish,
        };
        self.push_completion(vec![choice], None);
    }

    /// One `data:` frame holding a completion object with these choices and usage.
    fn push_completion(&mut self, choices: Vec<Choice>, usage: Option<Usage>) {
        let c = Completion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.served.name,
            system_fingerprint: &self.served.version,
            choices,
            usage,
        };
        let data = serde_json::to_string(&c).unwrap_or_default();
        self.push_data(&data);
    }

    fn push_data(&mut self, data: &str) {
        self.out
            .push_back(web::Bytes::from(format!("data: {data}\n\n")));
    }

    /// The next SSE frame, or `None` after `[DONE]`.
    async fn next(&mut self) -> Option<web::Bytes> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(b);
            }
            if self.finished {
                return None;
            }
            if self.left == 0 {
                self.finish();
                continue;
            }
            let ev = match self.rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            match ev {
                Some(ev) => {
                    if let Err(e) = self.on_event(ev) {
                        self.fail(e);
                    }
                }
                None => self.fail(ApiError::Unavailable("the engine stopped".into())),
            }
        }
    }

    fn on_event(&mut self, ev: RowEvent) -> Result<(), ApiError> {
        match ev {
            RowEvent::Token {
                index,
                token,
                logprob,
                top,
            } => {
                let s = self.served.clone();
                let c = &mut self.choices[index];
                c.tokens.push(token);
                let full = s.tokenizer.decode(&c.tokens)?;
                let delta = if full.starts_with(&c.sent) {
                    let end = safe_end(&full, &self.stop);
                    if end > c.sent.len() {
                        full[c.sent.len()..end].to_string()
                    } else {
                        String::new()
                    }
                } else {
                    String::new()
                };
                c.sent.push_str(&delta);
                let mut lp = None;
                if self.logprobs {
                    let mut l = Logprobs::default();
                    let top = (!top.is_empty()).then_some(top.as_slice());
                    l.push(&s, token, logprob, top, &mut c.offset)?;
                    lp = Some(l);
                }
                if !delta.is_empty() || lp.is_some() {
                    self.chunk(index, delta, lp, None);
                }
            }
            RowEvent::Done { index, generation } => {
                self.left -= 1;
                self.usage.completion_tokens += generation.tokens.len();
                let c = &mut self.choices[index];
                let text = generation.text.unwrap_or_default();
                let rest = text
                    .strip_prefix(c.sent.as_str())
                    .unwrap_or_default()
                    .to_string();
                c.sent = text;
                self.chunk(index, rest, None, Some(generation.finish_reason.as_str()));
            }
            RowEvent::Failed { message } => return Err(ApiError::Internal(message)),
        }
        Ok(())
    }

    fn fail(&mut self, e: ApiError) {
        if let ApiError::Internal(m) = &e {
            tracing::error!(error = %m, "stream failed");
        }
        let body = serde_json::json!({"error": {
            "message": e.to_string(), "type": e.kind(), "param": null, "code": e.code()}});
        self.push_data(&body.to_string());
        self.left = 0;
        self.finish();
    }

    fn finish(&mut self) {
        if self.finished {
            return;
        }
        if self.include_usage {
            self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens;
            self.push_completion(Vec::new(), Some(self.usage));
        }
        self.push_data("[DONE]");
        self.finished = true;
    }
}

/// How much of `text` may be sent: everything except a trailing part that could still grow
/// into a stop string, or an incomplete character (U+FFFD from a partial byte sequence).
fn safe_end(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    for stop in stops {
        for k in (1..stop.len()).rev() {
            if stop.is_char_boundary(k) && text.ends_with(&stop[..k]) {
                end = end.min(text.len() - k);
                break;
            }
        }
    }
    let trimmed = text[..end].trim_end_matches('\u{FFFD}');
    trimmed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_end_holds_back_possible_stop_prefixes() {
        assert_eq!(safe_end("hello wor", &["world".into()]), 6);
        assert_eq!(safe_end("hello", &["xyz".into()]), 5);
        assert_eq!(safe_end("ab\u{FFFD}", &[]), 2);
        assert_eq!(safe_end("a 12", &["123".into(), "2".into()]), 2);
    }
}
