//! Models, tokenization, health, metrics and the OpenAPI document.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

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
    let tokens = s.tokenizer.encode(&r.prompt)?;
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
    tokens: Vec<u32>,
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
    let vocab = s.model.spec().vocab_size;
    if let Some((i, t)) = r
        .tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        return Err(ApiError::invalid(
            format!("tokens[{i}]"),
            format!("token id {t} is outside the vocabulary (size {vocab})"),
        ));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "prompt": s.tokenizer.decode(&r.tokens)? })))
}

/// Liveness: the process answers. Never depends on the model or a running job.
pub async fn livez() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Whether the engine answers a probe within 2 s; recorded as `lethe_ready`.
async fn probe_ready(state: &AppState) -> bool {
    let ready = state.engine.probe(Duration::from_secs(2)).await;
    state.metrics.ready.set(i64::from(ready));
    ready
}

/// Readiness: a model is loaded and the engine thread answers a probe.
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let s = state.served();
    if probe_ready(&state).await {
        Ok(HttpResponse::Ok().json(serde_json::json!({
            "status": "ready",
            "model": s.name,
            "version": s.version,
        })))
    } else {
        Err(ApiError::Unavailable(
            "the engine did not answer a probe within 2 s".into(),
        ))
    }
}

/// The exposition; readiness is probed first so `lethe_ready` is current at every scrape.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    probe_ready(&state).await;
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, prometheus::TEXT_FORMAT))
        .body(state.metrics.render())
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/yaml"))
        .body(OPENAPI_YAML)
}
