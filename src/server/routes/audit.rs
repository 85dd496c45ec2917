//! `POST /v1/audit` (admin): which of these sequences does the live model regurgitate? Each
//! sequence is a string, a list of token ids, or an audit row object (`{"text"}`, `{"ids"}`,
//! `{"ids", "clean_ids"}`, `{"prompt_ids", "target_ids"}`, as in `lethe audit`).
//!
//! Invariants:
//! - The request is checked whole before any compute: 1 to `--max-audit-sequences` sequences
//!   (400 for none, 413 over the limit, before any sequence is parsed), then every sequence
//!   against the live version; the first bad one is a 400 naming it (`sequences[2].ids[5]`).
//! - Text is tokenized without dropping anything (a character outside the vocabulary is a 400
//!   naming its position); ids are integers below the vocabulary size; prompt plus target fit
//!   the context length.
//! - Every row runs on the one version the request loaded, which the answer names
//!   (`model_version`, `x-lethe-model-version`).
//! - Rows are greedy with EOS banned and are not filtered by the regurgitation guard: the audit
//!   measures the model itself. The verdicts come from one teacher-forced pass run on the engine
//!   thread between decode steps; with `"generate": true` the rows are decoded instead, joining
//!   the engine's continuous batch like any generation (a full queue is a 429 either way).
//! - `"risk"` (`true` or options) adds each sequence's extraction risk beyond one greedy query
//!   (`audit::risk`); a bad option is a 400 naming it (`risk.p`).
//! - Results are in request order (`index`); each audited sequence is counted in
//!   `lethe_audit_sequences_total{result}`.

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::completions::{check_model, VERSION_HEADER};
use super::misc::token_ids;
use crate::audit::{
    self, AuditItem, AuditOptions, AuditRow, AuditSummary, Definition, RiskOptions,
};
use crate::engine::batcher::{Job, RowEvent};
use crate::engine::served::Served;
use crate::server::body;
use crate::server::error::ApiError;
use crate::server::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditRequest {
    #[serde(default)]
    model: Option<String>,
    sequences: Vec<Value>,
    #[serde(default)]
    definition: Option<Definition>,
    /// Also decode each sequence greedily: `generated_ids`, `generated_text`, `match_fraction`.
    #[serde(default)]
    generate: bool,
    /// Extraction risk beyond one greedy query (`true` for the defaults, or the options).
    #[serde(default)]
    risk: Option<RiskRequest>,
}

/// `"risk": true` (the defaults), `false`, or an options object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RiskRequest {
    On(bool),
    With(RiskOptions),
}

/// Parses `sequences[i]` into an audit item under `def`, checking it fits the model.
pub fn parse_sequence(
    i: usize,
    v: &Value,
    def: Definition,
    s: &Served,
) -> Result<AuditItem, ApiError> {
    let field = format!("sequences[{i}]");
    let bad = |m: String| ApiError::invalid(field.clone(), m);
    let vocab = s.model.spec().vocab_size;
    let row = match v {
        // Text is tokenized here so a character outside the vocabulary is named (with its
        // position), never dropped.
        Value::String(t) => AuditRow {
            ids: Some(s.tokenizer.encode_field(&field, t)?),
            ..AuditRow::default()
        },
        Value::Array(_) => AuditRow {
            ids: Some(token_ids(v, &field, vocab)?),
            ..AuditRow::default()
        },
        Value::Object(o) => {
            let ids = |k: &str| {
                let name = format!("{field}.{k}");
                match o.get(k).filter(|v| !v.is_null()) {
                    Some(Value::Array(a)) if a.is_empty() => {
                        Err(ApiError::invalid(name, "must not be empty"))
                    }
                    Some(v) => token_ids(v, &name, vocab).map(Some),
                    None => Ok(None),
                }
            };
            let mut row = AuditRow {
                text: None,
                ids: ids("ids")?,
                clean_ids: ids("clean_ids")?,
                prompt_ids: ids("prompt_ids")?,
                target_ids: ids("target_ids")?,
            };
            // `text` is used only when no ids are given (as in `lethe audit`).
            let pair = row.prompt_ids.is_some() && row.target_ids.is_some();
            match o.get("text") {
                None | Some(Value::Null) => {}
                Some(Value::String(t)) if row.ids.is_none() && !pair => {
                    row.ids = Some(s.tokenizer.encode_field(&format!("{field}.text"), t)?);
                }
                Some(Value::String(_)) => {}
                Some(other) => {
                    return Err(ApiError::invalid(
                        format!("{field}.text"),
                        format!("must be a string, not {other}"),
                    ))
                }
            }
            row
        }
        _ => {
            return Err(bad(
                "must be a string, a list of token ids, or an audit row object".into(),
            ))
        }
    };
    let item = row
        .parse(def, &s.tokenizer)
        .map_err(|e| bad(e.to_string()))?
        .item;
    let spec = s.model.spec();
    if let Some(t) = item
        .prompt
        .iter()
        .chain(&item.target)
        .find(|&&t| t as usize >= spec.vocab_size)
    {
        return Err(bad(format!(
            "token id {t} is outside the vocabulary (size {})",
            spec.vocab_size
        )));
    }
    if item.prompt.len() + item.target.len() > spec.context_length {
        return Err(bad(format!(
            "prompt + target is {} tokens, more than the context length {}",
            item.prompt.len() + item.target.len(),
            spec.context_length
        )));
    }
    Ok(item)
}

/// Audits `items` on the version `s` on the engine thread, with `opts`: the single pass by
/// default, joining the continuous batch when generation is asked for (greedy, EOS banned, no
/// regurgitation guard); results in order.
pub(super) async fn on_engine(
    state: &AppState,
    s: &std::sync::Arc<crate::engine::served::Served>,
    items: &[AuditItem],
    opts: &AuditOptions,
) -> Result<Vec<audit::AuditResult>, ApiError> {
    if !opts.generate {
        // The single pass, with the risk when asked (one job: the risk's pass gives the verdict).
        return on_engine_thread(state, s, items, opts.clone()).await;
    }
    let mut results = decoded(state, s, items).await?;
    if let Some(r) = &opts.risk {
        let risk_only = AuditOptions {
            risk: Some(r.clone()),
            ..AuditOptions::greedy(opts.batch_size)
        };
        let risks = on_engine_thread(state, s, items, risk_only).await?;
        results
            .iter_mut()
            .zip(risks)
            .for_each(|(res, k)| res.risk = k.risk);
    }
    Ok(results)
}

/// `audit::audit_with(items, opts)` on the version `s`, run on the engine thread.
async fn on_engine_thread(
    state: &AppState,
    s: &std::sync::Arc<crate::engine::served::Served>,
    items: &[AuditItem],
    opts: AuditOptions,
) -> Result<Vec<audit::AuditResult>, ApiError> {
    let (tx, rx) = oneshot::channel();
    let (served, work) = (s.clone(), items.to_vec());
    state.engine.submit(Job::Run(Box::new(move || {
        let _ = tx.send(audit::audit_with(&served.model, None, &work, &opts));
    })))?;
    Ok(rx
        .await
        .map_err(|_| ApiError::Internal("the engine failed on this audit".into()))?
        .map_err(ApiError::from)?
        .0)
}

/// Decodes `items` greedily through the engine's continuous batch and judges each, in order.
async fn decoded(
    state: &AppState,
    s: &std::sync::Arc<crate::engine::served::Served>,
    items: &[AuditItem],
) -> Result<Vec<audit::AuditResult>, ApiError> {
    let eos = s.model.spec().eos_token_id;
    let (tx, mut rx) = mpsc::unbounded_channel();
    state.engine.submit(Job::Generate {
        served: s.clone(),
        reqs: items.iter().map(|it| audit::request(it, eos)).collect(),
        events: tx,
    })?;
    let mut gens = vec![None; items.len()];
    let mut left = items.len();
    while left > 0 {
        match rx.recv().await {
            Some(RowEvent::Done { index, generation }) => {
                gens[index] = Some(generation.tokens);
                left -= 1;
            }
            Some(RowEvent::Token { .. }) => {}
            Some(RowEvent::Failed { message }) => return Err(ApiError::Internal(message)),
            None => return Err(ApiError::Unavailable("the engine stopped".into())),
        }
    }
    let mut results = Vec::with_capacity(items.len());
    for (it, g) in items.iter().zip(gens) {
        results.push(audit::judge(it, g.unwrap_or_default(), Some(&s.tokenizer))?);
    }
    Ok(results)
}

pub async fn audit(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.admin(&req)?;
    let r: AuditRequest = body::json(&req, payload, state.limits.max_body_bytes).await?;
    let s = state.served();
    check_model(r.model.as_deref(), &s)?;
    let max = state.limits.max_audit_sequences;
    if r.sequences.is_empty() {
        return Err(ApiError::invalid("sequences", "must not be empty"));
    }
    if r.sequences.len() > max {
        return Err(ApiError::TooLarge {
            message: format!(
                "{} sequences in one audit; the limit is {max}",
                r.sequences.len()
            ),
            param: Some("sequences".into()),
        });
    }
    let def = r
        .definition
        .unwrap_or_else(|| Definition::default_for(s.model.spec().architecture));
    let items: Vec<AuditItem> = r
        .sequences
        .iter()
        .enumerate()
        .map(|(i, v)| parse_sequence(i, v, def, &s))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let risk = match r.risk {
        None | Some(RiskRequest::On(false)) => None,
        Some(RiskRequest::On(true)) => Some(RiskOptions::default()),
        Some(RiskRequest::With(o)) => Some(o),
    };
    if let Some(o) = &risk {
        o.validate()?;
    }
    let opts = AuditOptions {
        generate: r.generate,
        risk,
        ..AuditOptions::greedy(64)
    };
    let results = on_engine(&state, &s, &items, &opts).await?;
    let summary = AuditSummary::of(&results, start.elapsed().as_secs_f64());
    let m = &state.metrics.audit_sequences;
    m.with_label_values(&["memorized"])
        .inc_by(summary.memorized as u64);
    m.with_label_values(&["not_memorized"])
        .inc_by((summary.sequences - summary.memorized) as u64);
    let results: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["index"] = i.into();
            v
        })
        .collect();
    Ok(HttpResponse::Ok()
        .insert_header((VERSION_HEADER, s.version.clone()))
        .json(serde_json::json!({
            "object": "audit",
            "model": s.name,
            "model_version": s.version,
            "definition": def,
            "results": results,
            "summary": summary,
        })))
}
