//! Audit-job routes (all admin): create, list, get, cancel, and the results of audit jobs over
//! whole datasets ([`crate::audit::jobs`]).
//!
//! Invariants:
//! - Each route checks the admin key, then that audit jobs are enabled (503 otherwise), before
//!   it reads a body.
//! - `POST /v1/audits` takes either a JSONL body (`Content-Type: application/jsonl` or
//!   `application/x-ndjson`), streamed to `data_dir/audits/` under `--max-audit-upload-bytes`,
//!   with the options in the query string; or a JSON body naming a file under `--audit-dir`.
//!   Every row is checked before the 202; a bad row is a 400 naming its line, and a refused
//!   upload leaves no file behind.
//! - `DELETE /v1/audits/{id}` cancels a queued or running job; a finished one is a 409
//!   `not_cancellable`.
//! - Results are paged in row order: `after` is the previous page's `last_row`.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::query_pairs_with;
use crate::audit::jobs::store::NotCancellable;
use crate::audit::jobs::{AuditJob, AuditJobs, JobSpec};
use crate::audit::{Definition, RiskOptions};
use crate::server::body;
use crate::server::error::ApiError;
use crate::server::state::AppState;

fn service(state: &AppState) -> Result<&std::sync::Arc<AuditJobs>, ApiError> {
    state
        .audits
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("audit jobs are not enabled on this server".into()))
}

/// The JSON body of `POST /v1/audits`: a server-side file and the job's options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    file: String,
    #[serde(default)]
    definitions: Vec<Definition>,
    #[serde(default)]
    group_by: Vec<String>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    risk: Option<RiskOptions>,
}

/// The public view of a job.
fn view(j: &AuditJob) -> Value {
    let now = crate::util::unix_now();
    json!({
        "id": j.id,
        "object": "audit_job",
        "status": j.state.as_str(),
        "dataset": {
            "file": (!j.uploaded).then_some(&j.dataset),
            "uploaded": j.uploaded,
            "sha256": j.dataset_sha256,
        },
        "definitions": j.spec.definitions,
        "group_by": j.spec.group_by,
        "batch_size": j.spec.batch_size,
        "risk": j.spec.risk,
        "version": j.version,
        "created_at": j.created_at,
        "started_at": j.started_at,
        "finished_at": j.finished_at,
        "progress": {
            "rows_done": j.rows_done,
            "rows_total": j.rows_total,
            "fraction": if j.rows_total == 0 { 0.0 } else { j.rows_done as f64 / j.rows_total as f64 },
            "rows_per_second": j.rows_per_second(now),
            "eta_seconds": j.eta_seconds(now),
        },
        "seconds": j.seconds,
        "resumes": j.resumes,
        "restarts": j.restarts,
        "summary": j.summary,
        "error": j.error,
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("no audit job {id:?}"),
        param: None,
        code: "audit_job_not_found",
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// Whether the request carries a JSONL upload.
fn is_jsonl(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|ct| {
            matches!(
                ct.as_str(),
                "application/jsonl" | "application/x-ndjson" | "application/jsonlines"
            )
        })
}

/// A job's options from an upload's query string.
fn upload_spec(q: &str) -> Result<JobSpec, ApiError> {
    let mut spec = JobSpec {
        definitions: Vec::new(),
        group_by: Vec::new(),
        batch_size: 64,
        risk: None,
    };
    for (k, v) in query_pairs_with(
        q,
        &["definition", "group_by", "batch_size"],
        &["definition", "group_by"],
    )? {
        match k.as_str() {
            "definition" => {
                spec.definitions
                    .push(v.parse().map_err(|e: crate::error::Error| {
                        ApiError::invalid("definition", e.to_string())
                    })?)
            }
            "group_by" => spec.group_by.push(v),
            _ => {
                spec.batch_size = v.parse().map_err(|_| {
                    ApiError::invalid("batch_size", format!("{v:?} is not an integer"))
                })?
            }
        }
    }
    Ok(spec)
}

pub async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?.clone();
    let job = if is_jsonl(&req) {
        let spec = upload_spec(req.query_string())?;
        let dir = svc.uploads_dir();
        let d = dir.clone();
        blocking(move || {
            std::fs::create_dir_all(&d)
                .map_err(|source| crate::error::Error::Write { path: d, source })
        })
        .await?;
        let path = dir.join(format!("upload-{}.jsonl", crate::util::random_hex(8)));
        body::stream_to_file(&req, payload, svc.config.max_upload_bytes, path.clone()).await?;
        let s = svc.clone();
        let p = path.clone();
        let out = blocking(move || s.submit(p, true, spec)).await;
        if out.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        // Errors name the stored file; the client knows it as its body.
        out.map_err(|e| match e {
            ApiError::Invalid {
                message,
                param,
                code,
            } => {
                let name = path.display().to_string();
                ApiError::Invalid {
                    message: message.replace(&name, "body"),
                    param: param.map(|p| p.replace(&name, "body")),
                    code,
                }
            }
            other => other,
        })?
    } else {
        // The query options belong to uploads; a JSON body carries its own.
        query_pairs_with(req.query_string(), &[], &[])?;
        let r: CreateRequest = body::json(&req, payload, state.limits.max_body_bytes).await?;
        let spec = JobSpec {
            definitions: r.definitions,
            group_by: r.group_by,
            batch_size: r.batch_size.unwrap_or(64),
            risk: r.risk,
        };
        let s = svc.clone();
        blocking(move || {
            let file = s.resolve_file(&r.file)?;
            s.submit(file, false, spec)
        })
        .await?
    };
    Ok(HttpResponse::Accepted()
        .insert_header((header::LOCATION, format!("/v1/audits/{}", job.id)))
        .json(view(&job)))
}

pub async fn get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?.clone();
    let id = path.into_inner();
    let i = id.clone();
    let job = blocking(move || svc.store.get(&i)).await?;
    Ok(HttpResponse::Ok().json(view(&job.ok_or_else(|| not_found(&id))?)))
}

/// The most jobs or results one page may hold.
const MAX_PAGE: usize = 1000;

fn limit_param(v: &str) -> Result<usize, ApiError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| {
            ApiError::invalid(
                "limit",
                format!("{v:?} is not an integer between 1 and {MAX_PAGE}"),
            )
        })
}

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?.clone();
    let mut limit = 50;
    for (_, v) in query_pairs_with(req.query_string(), &["limit"], &[])? {
        limit = limit_param(&v)?;
    }
    let jobs = blocking(move || svc.store.list(limit)).await?;
    let data: Vec<Value> = jobs.iter().map(view).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

pub async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?.clone();
    let id = path.into_inner();
    let i = id.clone();
    match blocking(move || svc.cancel(&i)).await? {
        None => Err(not_found(&id)),
        Some(Ok(job)) => Ok(HttpResponse::Ok().json(view(&job))),
        Some(Err(NotCancellable(s))) => Err(ApiError::Conflict {
            message: format!(
                "audit job {id} is {} and can no longer be cancelled",
                s.as_str()
            ),
            code: "not_cancellable",
        }),
    }
}

pub async fn results(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let svc = service(&state)?.clone();
    let (mut after, mut limit, mut memorized) = (None, 100, false);
    for (k, v) in query_pairs_with(req.query_string(), &["after", "limit", "memorized"], &[])? {
        match k.as_str() {
            "after" => {
                after = Some(v.parse::<u64>().map_err(|_| {
                    ApiError::invalid(
                        "after",
                        format!("{v:?} is not a row number (the previous page's last_row)"),
                    )
                })?)
            }
            "limit" => limit = limit_param(&v)?,
            _ => {
                memorized = v.parse::<bool>().map_err(|_| {
                    ApiError::invalid("memorized", format!("{v:?} is not true or false"))
                })?
            }
        }
    }
    let id = path.into_inner();
    let i = id.clone();
    let page = blocking(move || {
        if svc.store.get(&i)?.is_none() {
            return Ok(None);
        }
        svc.store.results(&i, after, limit + 1, memorized).map(Some)
    })
    .await?
    .ok_or_else(|| not_found(&id))?;
    let has_more = page.len() > limit;
    let page = &page[..page.len().min(limit)];
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": page,
        "has_more": has_more,
        "last_row": page.last().map(|r| r.row),
    })))
}
