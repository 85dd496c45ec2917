//! Models, tokenization, health, metrics and the OpenAPI document.
//!
//! Invariants:
//! - `/v1/models`, `/v1/tokenize` and `/v1/detokenize` take the inference key and answer from one
//!   load of the live version; a `model` that names neither the served model nor its version is
//!   a 404 `model_not_found`.
//! - Tokenizing never drops text: a character outside the vocabulary is a 400 naming it and its
//!   position. Detokenizing takes only integer ids below the vocabulary size (`1.0` is refused
//!   like `1.5`); anything else is a 400 naming the element (`tokens[3]`).
//! - None of these run model compute or submit engine work, so they answer while its queue is
//!   full.
//! - `/livez` is 200 while the engine thread and (with takedowns) the unlearning worker and the
//!   auditor run, else 503; it never depends on the model, the load or a running job.
//! - `/readyz` is 200 (naming the model and its version) only when the engine answers a probe
//!   within 2 s and, in fleet mode, the shared store was read within `--guard-staleness`; else
//!   503. It and every `/metrics` scrape update `lethe_ready`.
//! - `/livez`, `/readyz`, `/metrics` and `/openapi.yaml` need no key; `/openapi.yaml` is the
//!   contract compiled into the binary, served as written.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::server::body;
use crate::server::error::ApiError;
use crate::server::state::AppState;

/// The OpenAPI 3.1 contract, served as written.
pub const OPENAPI_YAML: &str = include_str!("../../../api/openapi.yaml");

#[derive(Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// The weights version (content hash).
    version: String,
    architecture: &'static str,
    context_length: usize,
}

pub async fn models(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.inference(&req)?;
    let s = state.served();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list",
        "data": [ModelCard {
            id: s.name.clone(),
            object: "model",
            created: s.created,
            owned_by: "lethe",
            version: s.version.clone(),
            architecture: s.architecture(),
            context_length: s.model.spec().context_length,
        }],
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: String,
}

pub async fn tokenize(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.inference(&req)?;
    let r: TokenizeRequest = body::json(&req, payload, state.limits.max_body_bytes).await?;
    let s = state.served();
    super::completions::check_model(r.model.as_deref(), &s)?;
    // A character outside the vocabulary is a 400 naming it and its position, never dropped.
    let tokens = s.tokenizer.encode_field("prompt", &r.prompt)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "tokens": tokens,
        "count": tokens.len(),
        "max_model_len": s.model.spec().context_length,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    /// Checked by [`token_ids`], so a float, a negative or a huge number gets a 400 that
    /// names the element.
    tokens: Value,
}

/// The token ids of `field` (a JSON list), each an integer below `vocab`; anything else is a
/// 400 naming the offending element (`tokens[3]`). `1.0` is refused like `1.5`: ids are
/// integers in JSON, not numbers that happen to be whole.
pub fn token_ids(v: &Value, field: &str, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let items = v
        .as_array()
        .ok_or_else(|| ApiError::invalid(field, format!("must be a list of token ids, not {v}")))?;
    items
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_u64() {
            Some(id) if id < vocab as u64 => Ok(id as u32),
            _ => Err(ApiError::invalid(
                format!("{field}[{i}]"),
                format!(
                    "{t} is not a token id (an integer from 0 to {}, below the vocabulary size {vocab})",
                    vocab.saturating_sub(1)
                ),
            )),
        })
        .collect()
}

pub async fn detokenize(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.inference(&req)?;
    let r: DetokenizeRequest = body::json(&req, payload, state.limits.max_body_bytes).await?;
    let s = state.served();
    super::completions::check_model(r.model.as_deref(), &s)?;
    let tokens = token_ids(&r.tokens, "tokens", s.model.spec().vocab_size)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "prompt": s.tokenizer.decode(&tokens)? })))
}

/// Liveness: the process answers and its long-lived threads (the engine, the unlearning worker,
/// the auditor) are running. Never depends on the model, the load or a running job: a busy
/// engine is alive; one whose thread ended is not, and only a restart brings it back.
pub async fn livez(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if !state.engine.is_alive() {
        return Err(ApiError::Unavailable(
            "the engine thread has stopped; restart the process".into(),
        ));
    }
    if state.takedowns.as_ref().is_some_and(|t| !t.threads_alive()) {
        return Err(ApiError::Unavailable(
            "the unlearning worker or the auditor thread has stopped; restart the process".into(),
        ));
    }
    if state.audits.as_ref().is_some_and(|a| !a.thread_alive()) {
        return Err(ApiError::Unavailable(
            "the audit-job thread has stopped; restart the process".into(),
        ));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ok" })))
}

/// Whether this replica is ready: the engine answers a probe within 2 s and, in fleet mode,
/// the shared store was read within `--guard-staleness`; recorded as `lethe_ready`. `Err` says
/// why not.
async fn probe_ready(state: &AppState) -> Result<(), String> {
    let ready = match state.takedowns.as_ref().and_then(|t| t.fleet_stale()) {
        Some(stale) => Err(format!(
            "fleet mode: the shared store was last read {:.1} s ago (over --guard-staleness); \
             this replica might not guard a takedown accepted elsewhere",
            stale.as_secs_f64()
        )),
        None if state.engine.probe(Duration::from_secs(2)).await => Ok(()),
        None => Err("the engine did not answer a probe within 2 s".into()),
    };
    state.metrics.ready.set(i64::from(ready.is_ok()));
    ready
}

/// Readiness: a model is loaded, the engine thread answers a probe and (fleet mode) the shared
/// store is fresh.
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let s = state.served();
    probe_ready(&state).await.map_err(ApiError::Unavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "status": "ready",
        "model": s.name,
        "version": s.version,
    })))
}

/// The exposition; readiness is probed first so `lethe_ready` is current at every scrape.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let _ = probe_ready(&state).await;
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, prometheus::TEXT_FORMAT))
        .body(state.metrics.render())
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/yaml"))
        .body(OPENAPI_YAML)
}
