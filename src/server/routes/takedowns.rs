//! Takedown and version routes (all admin): create, list, get, cancel and receipt of takedowns;
//! the version list and rollback.
//!
//! Invariants:
//! - Each route checks the admin key, then that takedowns are enabled (503 otherwise), before it
//!   reads a body.
//! - `POST /v1/takedowns` stores nothing unless the whole request is valid: 1 to
//!   `--max-takedown-sequences` sequences (400 for none, 413 over), a definition whose k + n fits
//!   the context length, each sequence tokenizable, within the vocabulary and from k + n tokens
//!   to the context length (every bad one named in one 400 `invalid_sequences`), a well-formed
//!   `Idempotency-Key`. A server without a retain set answers 503.
//! - It answers 202 only after the takedown is committed to SQLite and its sequences are in the
//!   regurgitation guard. An `Idempotency-Key` replayed with the same request answers the
//!   original takedown and stores nothing; with a different request it is a 409
//!   `idempotency_key_reused`.
//! - Only takedowns that are not cancelled are guarded (a replay does not re-arm a cancelled
//!   one). `DELETE` cancels a `queued`, `running` or `validating` takedown and rebuilds the guard
//!   without it; any other state is a 409 `not_cancellable`.
//! - Sequences are sensitive: never logged or put in metric labels; views and receipts show a
//!   sha256 per sequence, and only `GET /v1/takedowns/{id}?include=sequences` returns them.
//! - Rollback is a compare-and-swap: `expected_current` must be live (else 409
//!   `version_mismatch`) and `to_version` it or one of its ancestors; the takedowns that the
//!   abandoned versions applied return to `queued` in the same transaction.
//! - A bad query parameter (unknown, repeated, malformed, out of range) is a 400 naming it.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::completions::VERSION_HEADER;
use super::query_pairs_with;
use crate::audit::Definition;
use crate::server::body;
use crate::server::error::api_error as store_error;
use crate::server::error::ApiError;
use crate::server::state::AppState;
use crate::takedown::worker::{self as td, Takedowns};
use crate::takedown::{NewTakedown, State, Takedown};
use crate::unlearn::pipeline::sequence_sha256;

fn service(state: &AppState) -> Result<&Takedowns, ApiError> {
    state
        .takedowns
        .as_deref()
        .ok_or_else(|| ApiError::Unavailable("takedowns are not enabled on this server".into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    sequences: Vec<Value>,
    #[serde(default)]
    definition: Option<Definition>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    requester: Option<String>,
}

/// The public view of a takedown (sequences only on request, as sha256 otherwise).
fn view(t: &Takedown, with_sequences: bool) -> Value {
    let mut v = json!({
        "id": t.id,
        "object": "takedown",
        "status": t.state.as_str(),
        "definition": t.definition,
        "reason": t.reason,
        "requester": t.requester,
        "created_at": t.created_at,
        "updated_at": t.updated_at,
        "sequence_count": t.sequences.len(),
        "sequence_sha256": t.sequences.iter().map(|s| sequence_sha256(s)).collect::<Vec<_>>(),
    });
    let m = v.as_object_mut().expect("an object");
    if t.state == State::Running || t.state == State::Validating {
        m.insert("phase".into(), json!(t.phase));
        m.insert("progress".into(), json!(t.progress.unwrap_or(0.0)));
        m.insert("eta_seconds".into(), json!(t.eta_seconds));
    }
    if let Some(ver) = &t.version {
        m.insert("version".into(), json!(ver));
    }
    if t.state == State::Rejected {
        m.insert("rejection_reason".into(), json!(t.error));
        m.insert("report".into(), t.report.clone().unwrap_or(Value::Null));
    }
    if t.state == State::Applied {
        m.insert("report".into(), t.report.clone().unwrap_or(Value::Null));
    }
    if t.state == State::Failed {
        m.insert("error".into(), json!(t.error));
    }
    if with_sequences {
        m.insert("sequences".into(), json!(t.sequences));
    }
    v
}

pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?;
    let r: CreateRequest = body::json(&req, payload, state.limits.max_body_bytes).await?;
    if !svc.can_unlearn() {
        return Err(ApiError::Unavailable(
            "takedowns need a retain set: start lethe with --retain-data FILE".into(),
        ));
    }
    let s = state.served();
    let def = r
        .definition
        .unwrap_or_else(|| Definition::default_for(s.model.spec().architecture));
    let max = svc.config.max_sequences;
    if r.sequences.is_empty() {
        return Err(ApiError::invalid("sequences", "must not be empty"));
    }
    if r.sequences.len() > max {
        return Err(ApiError::TooLarge {
            message: format!(
                "{} sequences in one takedown; the limit is {max}",
                r.sequences.len()
            ),
            param: Some("sequences".into()),
        });
    }
    let span = def.span();
    let ctx = s.model.spec().context_length;
    if span > ctx {
        return Err(ApiError::invalid(
            "definition",
            format!(
                "{def} needs k + n = {span} tokens, more than the model's context length {ctx}"
            ),
        ));
    }
    let vocab = s.model.spec().vocab_size;
    let mut seqs = Vec::with_capacity(r.sequences.len());
    let mut bad = Vec::new();
    for (i, v) in r.sequences.iter().enumerate() {
        let ids: Result<Vec<u32>, String> = match v {
            Value::String(t) if t.is_empty() => Err("is empty".into()),
            // "sequences[i]: invalid text: character 'Ú' (U+00DA) at position 0 is not in ..."
            Value::String(t) => s
                .tokenizer
                .encode_field("text", t)
                .map_err(|e| e.to_string()),
            Value::Array(a) if a.is_empty() => Err("is empty".into()),
            Value::Array(a) => a
                .iter()
                .map(|x| match x.as_u64() {
                    Some(t) if (t as usize) < vocab => Ok(t as u32),
                    _ => Err(format!("{x} is not a token id below {vocab}")),
                })
                .collect(),
            _ => Err("must be a string or a list of token ids".into()),
        };
        match ids {
            Ok(ids) if ids.len() < span => bad.push(format!(
                "sequences[{i}]: {} tokens, fewer than k + n = {span} for definition {def}",
                ids.len(),
            )),
            Ok(ids) if ids.len() > ctx => bad.push(format!(
                "sequences[{i}]: {} tokens, more than the context length {ctx}",
                ids.len()
            )),
            Ok(ids) => seqs.push(ids),
            Err(m) => bad.push(format!("sequences[{i}]: {m}")),
        }
    }
    if !bad.is_empty() {
        return Err(ApiError::Invalid {
            message: format!("{} invalid sequence(s): {}", bad.len(), bad.join("; ")),
            param: Some("sequences".into()),
            code: "invalid_sequences",
        });
    }
    let key = req
        .headers()
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::invalid("Idempotency-Key", "must be visible ASCII"))
        })
        .transpose()?;
    if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 255) {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            "must be 1 to 255 characters",
        ));
    }
    // What the job will face: each sequence audited on the live version now, so the requester
    // learns in the 202 which ones it regurgitates (a takedown of none of them is recorded and
    // guarded, but the weights stay as they are).
    let items = seqs
        .iter()
        .map(|q| def.split(q))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::invalid("sequences", e.to_string()))?;
    let opts = crate::audit::AuditOptions::greedy(64);
    let extractable_now: Vec<bool> = super::audit::on_engine(&state, &s, &items, &opts)
        .await?
        .iter()
        .map(|r| r.memorized)
        .collect();
    let new = NewTakedown {
        sequences: seqs,
        definition: def.to_string(),
        reason: r.reason,
        requester: r.requester,
    };
    let (t, created) = web::block({
        // SQLite commits (with fsync) off the async worker.
        let state = state.clone();
        move || {
            let svc = state.takedowns.as_deref().expect("checked above");
            svc.store.create(new, key.as_deref())
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(store_error)?;
    // A retry with the key of a takedown cancelled since must not re-arm its guard: only a
    // takedown that is not cancelled is guarded (the store's `sequences_to_guard` agrees).
    if t.state != State::Cancelled {
        for seq in &t.sequences {
            svc.guard.add(seq);
        }
    }
    if created {
        tracing::info!(id = %t.id, sequences = t.sequences.len(), "takedown accepted");
        svc.refresh_counts();
        svc.notify();
    }
    Ok(HttpResponse::Accepted()
        .insert_header((header::LOCATION, format!("/v1/takedowns/{}", t.id)))
        .json(json!({
            "id": t.id,
            "object": "takedown",
            "status": t.state.as_str(),
            "definition": t.definition,
            "model_version": s.version,
            "extractable_now": extractable_now,
        })))
}

pub async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?;
    let mut with = false;
    for (_, v) in query_pairs_with(req.query_string(), &["include"], &[])? {
        if v != "sequences" {
            return Err(ApiError::invalid(
                "include",
                format!("{v:?} cannot be included; the only value is \"sequences\""),
            ));
        }
        with = true;
    }
    let t = svc.settled(|s| s.get(&path)).map_err(store_error)?;
    Ok(HttpResponse::Ok().json(view(&t, with)))
}

/// The query parameters of `GET /v1/takedowns`.
#[derive(Debug, PartialEq)]
struct ListQuery {
    after: Option<String>,
    limit: usize,
    status: Option<State>,
}

/// The most takedowns one page may hold.
const MAX_PAGE: usize = 500;

impl ListQuery {
    fn parse(q: &str) -> Result<Self, ApiError> {
        let mut out = ListQuery {
            after: None,
            limit: 50,
            status: None,
        };
        for (k, v) in query_pairs_with(q, &["after", "limit", "status"], &[])? {
            match k.as_str() {
                "after" if v.is_empty() => {
                    return Err(ApiError::invalid(
                        "after",
                        "must be the id of a takedown (the previous page's last_id), not empty",
                    ))
                }
                "after" => out.after = Some(v),
                "limit" => {
                    out.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "limit",
                                format!("{v:?} is not an integer between 1 and {MAX_PAGE}"),
                            )
                        })?
                }
                _ => {
                    out.status = Some(
                        State::ALL
                            .into_iter()
                            .find(|x| x.as_str() == v)
                            .ok_or_else(|| {
                                let all: Vec<&str> =
                                    State::ALL.iter().map(|x| x.as_str()).collect();
                                ApiError::invalid(
                                    "status",
                                    format!(
                                        "unknown state {v:?}; expected one of {}",
                                        all.join(", ")
                                    ),
                                )
                            })?,
                    )
                }
            }
        }
        Ok(out)
    }
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?;
    let q = ListQuery::parse(req.query_string())?;
    let limit = q.limit;
    let page = svc
        .settled(|s| s.list(q.after.as_deref(), limit + 1, q.status))
        .map_err(|e| match e {
            // A cursor that names no takedown is a bad parameter, not a missing page.
            crate::takedown::Error::NotFound(id) => ApiError::invalid(
                "after",
                format!("no takedown {id:?}; pass the previous page's last_id"),
            ),
            e => store_error(e),
        })?;
    let has_more = page.len() > limit;
    let data: Vec<Value> = page.iter().take(limit).map(|t| view(t, false)).collect();
    let last = page[..page.len().min(limit)].last().map(|t| t.id.clone());
    Ok(HttpResponse::Ok().json(json!({
        "object": "list", "data": data, "has_more": has_more, "last_id": last,
    })))
}

pub async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?;
    let t = svc.store.cancel(&path).map_err(store_error)?;
    // A withdrawn takedown is no longer guarded.
    let guarded = svc.store.sequences_to_guard().map_err(store_error)?;
    svc.guard.replace(&guarded);
    svc.cancel_check();
    svc.refresh_counts();
    Ok(HttpResponse::Ok().json(view(&t, false)))
}

pub async fn receipt(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?;
    let (t, events) = svc
        .settled(|s| {
            let t = s.get(&path)?;
            let events = s.events(&t.id)?;
            Ok((t, events))
        })
        .map_err(store_error)?;
    let report = t.report.clone().unwrap_or(Value::Null);
    let mine: Vec<Value> = report["sequences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["takedown"] == json!(t.id))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Ok(HttpResponse::Ok().json(json!({
        "object": "takedown.receipt",
        "id": t.id,
        "status": t.state.as_str(),
        "definition": t.definition,
        "sequences": t.sequences.iter().enumerate().map(|(i, s)| json!({
            "index": i, "sha256": sequence_sha256(s), "tokens": s.len(),
        })).collect::<Vec<_>>(),
        "audit": mine,
        "perplexity_before": report["before"]["perplexity"],
        "perplexity_after": report["after"]["perplexity"],
        "accuracy_before": report["before"]["accuracy"],
        "accuracy_after": report["after"]["accuracy"],
        "version_before": report["base_version"],
        "version_after": t.version,
        "events": events,
    })))
}

pub async fn versions(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?;
    let (live, list) = svc.settled(|s| (state.served(), s.list_versions()));
    let list = list.map_err(store_error)?;
    let data: Vec<Value> = list
        .iter()
        .map(|v| {
            json!({
                "id": v.id, "seq": v.seq, "parent": v.parent, "created_at": v.created_at,
                "takedowns": v.takedowns, "live": v.id == live.version,
            })
        })
        .collect();
    Ok(HttpResponse::Ok()
        .insert_header((VERSION_HEADER, live.version.clone()))
        .json(json!({"object": "list", "data": data, "current": live.version})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    to_version: String,
    expected_current: String,
}

pub async fn rollback(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    service(&state)?;
    let r: RollbackRequest = body::json(&req, payload, state.limits.max_body_bytes).await?;
    let svc = state.takedowns.clone();
    let out = web::block(move || {
        svc.as_deref()
            .map(|svc| td::rollback(svc, &r.to_version, &r.expected_current))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .ok_or_else(|| ApiError::Unavailable("takedowns are not enabled on this server".into()))?
    .map_err(store_error)?;
    Ok(HttpResponse::Ok()
        .insert_header((VERSION_HEADER, out.0.clone()))
        .json(
            json!({"object": "rollback", "version": out.0, "previous": out.1, "requeued": out.2}),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(e: ApiError) -> Option<String> {
        match e {
            ApiError::Invalid { param, .. } => param,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn list_queries_are_percent_decoded() {
        let q = ListQuery::parse("status=app%6Cied&after=td_%41b+c&limit=%32").unwrap();
        assert_eq!(q.status, Some(State::Applied));
        assert_eq!(q.after.as_deref(), Some("td_Ab c"));
        assert_eq!(q.limit, 2);
        assert_eq!(ListQuery::parse("").unwrap().limit, 50);
    }

    #[test]
    fn bad_list_queries_name_the_parameter() {
        for (q, p) in [
            ("after=", "after"),
            ("limit=", "limit"),
            ("limit=0", "limit"),
            ("limit=501", "limit"),
            ("limit=-1", "limit"),
            ("limit=1e300", "limit"),
            ("limit=18446744073709551615", "limit"),
            ("limit=18446744073709551616", "limit"),
            ("status=nope", "status"),
            ("status=queued&status=failed", "status"),
            ("bogus=1", "bogus"),
        ] {
            let e = ListQuery::parse(q).unwrap_err();
            assert_eq!(param(e).as_deref(), Some(p), "{q}");
        }
    }
}
