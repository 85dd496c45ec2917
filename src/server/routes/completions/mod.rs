//! `POST /v1/completions` in OpenAI's shape, plain or streamed (server-sent events). `prompt` is
//! a string, a list of strings, a list of token ids, or a list of token-id lists; `echo` with
//! `max_tokens: 0` scores a prompt (perplexity through the API): `logprobs.token_logprobs` holds
//! `log p(token | prefix)` for every prompt token after the first.
//!
//! Invariants:
//! - The inference key is checked before the body is read, and the whole request is validated
//!   (`request`) before any work reaches the engine: bad input is a 4xx naming the field.
//! - The request loads the live version once: every choice is computed on it, and the answer
//!   names it in `x-lethe-model-version` and `system_fingerprint`.
//! - Each prompt gets `n` choices (choice index = prompt index × n + j). With a `seed`, choice
//!   `i` samples with seed `seed + i`, so the same request gives the same output however it is
//!   batched.
//! - A full engine queue is a 429 with `Retry-After` at once, a stopped engine a 503, an engine
//!   failure a 500 (once a stream has begun: an error frame, see `stream`).
//! - With takedowns enabled every generated token passes the regurgitation guard: a choice that
//!   would reproduce a guarded window ends before it with `finish_reason: "content_filter"`.
//! - A client that leaves cancels its rows: a waiting handler checks its socket every
//!   [`peer::CHECK_INTERVAL`] and, once it is gone, drops the engine's receiver (the answer is
//!   recorded as 499, never sent); a stream actix stops writing is dropped with its receiver.
//!   The engine cancels rows whose receiver is gone.

use std::collections::VecDeque;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::engine::batcher::{Job, RowEvent};
use crate::engine::served::{unix_now, Served};
use crate::engine::{GenerateRequest, Generation, SamplingParams};
use crate::server::body;
use crate::server::error::ApiError;
use crate::server::peer::{self, Peer};
use crate::server::state::AppState;

mod logprobs;
mod request;
mod stream;

use logprobs::*;
use request::*;
pub use request::{check_model, CompletionRequest, StreamOptions};
use stream::*;

/// The header that names the weights version a response was computed with.
pub const VERSION_HEADER: &str = "x-lethe-model-version";

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

    /// Too many prompts is a 413 before any of them is tokenized: a list whose every prompt
    /// would fail tokenization still gets the 413 (the count is judged first).
    #[test]
    fn the_prompt_count_is_judged_before_any_prompt_is_tokenized() {
        use actix_web::ResponseError;
        let s = crate::engine::served::Served::new(crate::test_util::bundled(), None).unwrap();
        let untokenizable = serde_json::json!(vec!["Ú"; 3]);
        let e = request::parse_prompts(&untokenizable, &s, 2).err().unwrap();
        assert_eq!(e.status_code().as_u16(), 413, "{e}");
        let e = request::parse_prompts(&untokenizable, &s, 3).err().unwrap();
        assert_eq!(e.status_code().as_u16(), 400, "{e}");
        let ids = serde_json::json!([[1, 2], [3], [4]]);
        assert_eq!(request::parse_prompts(&ids, &s, 3).unwrap().len(), 3);
        assert!(request::parse_prompts(&ids, &s, 2).is_err());
        let one = serde_json::json!([1, 2, 3]);
        assert_eq!(request::parse_prompts(&one, &s, 1).unwrap().len(), 1);
    }
}
