//! `lethe serve` over HTTP: through `actix_web::test` on the bundled TinyMem model, plus one
//! real socket on port 0. Every response of a documented route is validated against
//! `api/openapi.yaml`.

#[path = "../common/mod.rs"]
mod common;
mod contract;
/// A real PostgreSQL for the fleet test (the same helper the library's store tests use).
#[allow(dead_code)]
#[path = "../../src/test_util/pg.rs"]
mod pg;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::header::{self, HeaderMap};
use actix_web::{test as at, web};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use contract::Contract;
use lethe::engine::batcher::{EngineConfig, Job};
use lethe::engine::served::Served;
use lethe::loader::content_hash;
use lethe::server::auth::{Auth, Secret};
use lethe::server::routes::ROUTES;
use lethe::server::state::Limits;
use lethe::server::{app as make_app, AppState};

/// The bundled model's memorized sequence prompt (docs and README use it too).
const PROMPT: &str = "^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903";

fn contract() -> &'static Contract {
    static C: OnceLock<Contract> = OnceLock::new();
    C.get_or_init(Contract::load)
}

fn bundled() -> lethe::loader::LoadedModel {
    lethe::loader::load_dir(
        &lethe::loader::bundled_model_dir(),
        "bundled",
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn open_auth() -> Auth {
    Auth {
        api_key: None,
        admin_key: None,
        loopback_only: true,
    }
}

fn state_with(auth: Auth, limits: Limits, engine: EngineConfig) -> web::Data<AppState> {
    let served = Served::new(bundled(), None).unwrap();
    web::Data::new(AppState::new(served, engine, auth, limits))
}

fn state() -> web::Data<AppState> {
    state_with(open_auth(), Limits::default(), EngineConfig::default())
}

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: web::Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts an OpenAI-shaped error with this status; returns `error`.
    fn error(&self, status: u16) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let e = self.json()["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        e
    }
}

/// Sends a request; responses of documented routes are checked against the contract.
async fn send<S, B>(
    app: &S,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let mut req = at::TestRequest::default()
        .method(method.parse().unwrap())
        .uri(path);
    if let Some(b) = body {
        req = req
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .set_payload(b);
    }
    for (k, v) in headers {
        req = req.insert_header((*k, *v));
    }
    let resp = at::call_service(app, req.to_request()).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = at::read_body(resp).await;
    if let Some(template) = contract::template_of(ROUTES, method, path) {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        contract().check(method, template, status, &ct, &body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

async fn post<S, B>(app: &S, path: &str, body: Value) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    send(app, "POST", path, Some(body.to_string().into_bytes()), &[]).await
}

async fn get<S, B>(app: &S, path: &str) -> Resp
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    send(app, "GET", path, None, &[]).await
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn every_registered_route_is_in_the_contract_and_back() {
    let ops = contract().operations();
    for (m, p) in ROUTES {
        assert!(
            ops.iter().any(|(om, op)| om == m && op == p),
            "{m} {p} is registered but missing from api/openapi.yaml"
        );
    }
    for (m, p) in &ops {
        assert!(
            ROUTES.iter().any(|(rm, rp)| rm == m && rp == p),
            "{m} {p} is in api/openapi.yaml but not registered"
        );
    }
}

#[actix_web::test]
async fn greedy_completion_matches_the_engine_and_names_the_version() {
    let st = state();
    let app = at::init_service(make_app(st.clone())).await;
    let r = post(
        &app,
        "/v1/completions",
        json!({"model": "tinymem-noise", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let lm = bundled();
    let ids = lm.tokenizer.encode(PROMPT).unwrap();
    let want = lethe::engine::generate(
        &lm.model,
        Some(&lm.tokenizer),
        &[lethe::engine::GenerateRequest::greedy(ids.clone(), 20)],
    )
    .unwrap()
    .remove(0);
    assert_eq!(v["choices"][0]["text"], want.text.unwrap());
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], want.tokens.len());
    let version = content_hash(&lethe::loader::bundled_model_dir()).unwrap();
    assert_eq!(v["system_fingerprint"], version.as_str());
    assert_eq!(
        r.headers.get("x-lethe-model-version").unwrap(),
        version.as_str()
    );
    // Token-id prompts and a list of prompts give the same text.
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": [ids.clone(), ids.clone()], "max_tokens": 20, "temperature": 0}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][1]["text"], v["choices"][0]["text"]);
}

#[actix_web::test]
async fn streamed_completion_equals_the_plain_one() {
    let app = at::init_service(make_app(state())).await;
    let req = json!({"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "logprobs": 2});
    let plain = post(&app, "/v1/completions", req.clone()).await.json();
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let r = post(&app, "/v1/completions", sreq).await;
    assert_eq!(r.status, 200);
    assert!(r
        .headers
        .get(header::CONTENT_TYPE)
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&r.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    let mut lps = Vec::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        contract().check_chunk(&chunk);
        if let Some(u) = chunk.get("usage") {
            usage = Some(u.clone());
            continue;
        }
        let c = &chunk["choices"][0];
        text.push_str(c["text"].as_str().unwrap());
        if let Some(l) = c["logprobs"]["token_logprobs"].as_array() {
            lps.extend(l.iter().cloned());
        }
        if !c["finish_reason"].is_null() {
            finish = Some(c["finish_reason"].clone());
        }
    }
    let p = &plain["choices"][0];
    assert_eq!(text, p["text"].as_str().unwrap());
    assert_eq!(finish.unwrap(), p["finish_reason"]);
    assert_eq!(&lps, p["logprobs"]["token_logprobs"].as_array().unwrap());
    assert_eq!(usage.unwrap(), plain["usage"]);
}

#[actix_web::test]
async fn stop_strings_end_the_stream_before_the_stop_text() {
    let app = at::init_service(make_app(state())).await;
    let full = post(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 30, "temperature": 0}),
    )
    .await
    .json();
    let full = full["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop at the third generated number: the text ends right before it.
    let third: String = full.split_whitespace().nth(2).unwrap().to_string();
    let cut = full.find(&third).unwrap();
    for stream in [false, true] {
        let r = post(
            &app,
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 30, "temperature": 0,
                   "stop": [third.clone()], "stream": stream}),
        )
        .await;
        let (text, finish) = if stream {
            let mut t = String::new();
            let mut f = Value::Null;
            for e in sse_events(&r.body).iter().filter(|e| *e != "[DONE]") {
                let c: Value = serde_json::from_str(e).unwrap();
                t.push_str(c["choices"][0]["text"].as_str().unwrap());
                if !c["choices"][0]["finish_reason"].is_null() {
                    f = c["choices"][0]["finish_reason"].clone();
                }
            }
            (t, f)
        } else {
            let v = r.json();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, full[..cut], "stream={stream}");
        assert_eq!(finish, "stop", "stream={stream}");
    }
}

#[actix_web::test]
async fn echo_with_zero_max_tokens_scores_like_lethe_score() {
    let app = at::init_service(make_app(state())).await;
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 0, "echo": true, "logprobs": 0}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let c = &v["choices"][0];
    assert_eq!(c["text"], PROMPT);
    let lps = c["logprobs"]["token_logprobs"].as_array().unwrap();
    assert!(lps[0].is_null());
    let lm = bundled();
    let ids = lm.tokenizer.encode(PROMPT).unwrap();
    assert_eq!(lps.len(), ids.len());
    let want = lethe::engine::score(&lm.model, &[ids], 1)
        .unwrap()
        .remove(0);
    let got: Vec<f64> = lps[1..].iter().map(|x| x.as_f64().unwrap()).collect();
    for (g, w) in got.iter().zip(&want.token_logprobs) {
        assert!((g - *w as f64).abs() < 1e-5, "{g} vs {w}");
    }
    let ppl = (-got.iter().sum::<f64>() / got.len() as f64).exp();
    assert!(
        (ppl - want.perplexity).abs() / want.perplexity < 1e-5,
        "{ppl} vs {}",
        want.perplexity
    );
    assert_eq!(v["usage"]["completion_tokens"], 0);
}

#[actix_web::test]
async fn seeded_sampling_is_reproducible_across_requests() {
    let app = at::init_service(make_app(state())).await;
    let req = |seed: i64| json!({"prompt": "^5 7 9", "max_tokens": 24, "temperature": 1.0, "n": 3, "seed": seed});
    let texts = |v: Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    let a = texts(post(&app, "/v1/completions", req(11)).await.json());
    let b = texts(post(&app, "/v1/completions", req(11)).await.json());
    assert_eq!(a, b);
    let c = texts(post(&app, "/v1/completions", req(12)).await.json());
    assert_ne!(a, c, "a different seed should give different samples");
    assert!(a[0] != a[1] || a[1] != a[2], "choices should differ: {a:?}");
}

#[actix_web::test]
async fn tokenize_round_trips() {
    let app = at::init_service(make_app(state())).await;
    let t = post(&app, "/v1/tokenize", json!({"prompt": PROMPT})).await;
    assert_eq!(t.status, 200);
    let t = t.json();
    assert_eq!(t["count"], t["tokens"].as_array().unwrap().len());
    let d = post(&app, "/v1/detokenize", json!({"tokens": t["tokens"]})).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.json()["prompt"], PROMPT);
    let e = post(&app, "/v1/detokenize", json!({"tokens": [1, 99999]}))
        .await
        .error(400);
    assert_eq!(e["param"], "tokens[1]");
    let m = get(&app, "/v1/models").await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["data"][0]["id"], "tinymem-noise");
}

#[actix_web::test]
async fn audit_finds_the_bundled_models_memorized_sequences() {
    let app = at::init_service(make_app(state())).await;
    let dir = lethe::loader::bundled_model_dir();
    let card = lethe::tinymem::train::Card::read(&dir).unwrap();
    let ds = card.dataset().unwrap();
    let rows = ds.eligible_noised_rows(50, 100);
    let seqs: Vec<Value> = rows
        .iter()
        .map(|r| json!({"ids": r.ids, "clean_ids": r.clean_ids}))
        .collect();
    let r = post(
        &app,
        "/v1/audit",
        json!({"sequences": seqs, "definition": "tinymem"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let recorded = card.history.last().unwrap().eval.clone().unwrap();
    assert_eq!(v["summary"]["sequences"], rows.len());
    assert_eq!(v["summary"]["memorized"], recorded.memorized.unwrap());
    assert!(recorded.memorized.unwrap() > 0);
    // The same verdicts as the library audit, row by row.
    let lm = bundled();
    let items: Vec<_> = rows
        .iter()
        .map(|r| lethe::audit::AuditItem {
            prompt: r.clean_ids.as_ref().unwrap()[..50].to_vec(),
            target: r.ids[50..100].to_vec(),
        })
        .collect();
    let (want, _) = lethe::audit::audit(&lm.model, None, &items, 64).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(v["results"][i]["memorized"], w.memorized, "row {i}");
        assert_eq!(
            v["results"][i]["matched_prefix"], w.matched_prefix,
            "row {i}"
        );
        // The single pass decodes nothing.
        assert!(v["results"][i].get("generated_ids").is_none());
    }
    // With generation: the decoded continuations, and the same verdicts.
    let g = post(
        &app,
        "/v1/audit",
        json!({"sequences": seqs, "definition": "tinymem", "generate": true, "risk": true}),
    )
    .await
    .json();
    let opts = lethe::audit::AuditOptions {
        generate: true,
        ..lethe::audit::AuditOptions::greedy(64)
    };
    let (decoded, _) = lethe::audit::audit_with(&lm.model, None, &items, &opts).unwrap();
    for (i, (w, d)) in want.iter().zip(&decoded).enumerate() {
        let r = &g["results"][i];
        assert_eq!(r["memorized"], w.memorized, "row {i}");
        assert_eq!(
            r["generated_ids"],
            json!(d.generated_ids.as_ref().unwrap()),
            "row {i}"
        );
        assert!(r["generated_text"].is_string() && r["match_fraction"].is_number());
        assert!(r["risk"]["longest_match"].as_u64().unwrap() >= w.matched_prefix as u64);
    }
    assert!(
        g["summary"]["extractable"].as_u64().unwrap()
            >= g["summary"]["memorized"].as_u64().unwrap()
    );
    let e = post(
        &app,
        "/v1/audit",
        json!({"sequences": seqs, "risk": {"p": 2.0}}),
    )
    .await
    .error(400);
    assert_eq!(e["param"], "risk.p");
    // Two audits of the rows counted (the 400 none).
    let m = get(&app, "/metrics").await;
    let text = String::from_utf8_lossy(&m.body).to_string();
    assert!(text.contains(&format!(
        "lethe_audit_sequences_total{{result=\"memorized\"}} {}",
        2 * recorded.memorized.unwrap()
    )));
}

#[actix_web::test]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let limits = Limits {
        max_body_bytes: 4096,
        max_audit_sequences: 4,
        ..Limits::default()
    };
    let app = at::init_service(make_app(state_with(
        open_auth(),
        limits,
        EngineConfig::default(),
    )))
    .await;
    let c = "/v1/completions";
    // Malformed JSON, empty body.
    let e = send(&app, "POST", c, Some(b"{\"prompt\": ".to_vec()), &[])
        .await
        .error(400);
    assert_eq!(e["code"], "invalid_json");
    assert_eq!(e["type"], "invalid_request_error");
    send(&app, "POST", c, Some(Vec::new()), &[])
        .await
        .error(400);
    let cases = [
        (json!({"prompt": "^1", "max_tokens": "x"}), "max_tokens"),
        (json!({"prompt": "^1", "max_tokens": -1}), "max_tokens"),
        (json!({"prompt": "^1", "temperature": 5}), "temperature"),
        (json!({"prompt": "^1", "top_p": 0}), "top_p"),
        (json!({"prompt": "^1", "n": 0}), "n"),
        (json!({"prompt": "^1", "logprobs": 99}), "logprobs"),
        (json!({"prompt": "^1", "stop": 3}), "stop"),
        (json!({"prompt": "^1", "stop": ["a", 1]}), "stop[1]"),
        (
            json!({"prompt": "^1", "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": {"a": 1}}), "prompt"),
        (json!({"prompt": [1, 2, 99999]}), "prompt[2]"),
        (json!({"prompt": [[1], [2, -3]]}), "prompt[1][1]"),
        (json!({"prompt": ""}), "prompt[0]"),
        (json!({"prompt": "^1 2 3", "max_tokens": 149}), "max_tokens"),
        (json!({"prompt": vec![5u32; 151]}), "prompt[0]"),
    ];
    for (body, param) in cases {
        let e = post(&app, c, body.clone()).await.error(400);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    // Unknown fields are named in the message.
    let e = post(&app, c, json!({"prompt": "^1", "bogus_field": 1}))
        .await
        .error(400);
    assert!(
        e["message"].as_str().unwrap().contains("bogus_field"),
        "{e}"
    );
    let e = post(&app, c, json!({"max_tokens": 3})).await.error(400);
    assert!(e["message"].as_str().unwrap().contains("prompt"), "{e}");
    // Unknown model: 404 naming `model`.
    let e = post(&app, c, json!({"prompt": "^1", "model": "gpt-4"}))
        .await
        .error(404);
    assert_eq!(e["param"], "model");
    assert_eq!(e["code"], "model_not_found");
    // Body over the limit: 413; not JSON: 415.
    let big = json!({"prompt": "^".to_string() + &"1 ".repeat(4000)});
    post(&app, c, big).await.error(413);
    let r = at::call_service(
        &app,
        at::TestRequest::post()
            .uri(c)
            .insert_header((header::CONTENT_TYPE, "text/plain"))
            .set_payload("hi")
            .to_request(),
    )
    .await;
    assert_eq!(r.status().as_u16(), 415);
    // Audit limits: too many sequences 413; a sequence too short 400 naming it.
    let e = post(
        &app,
        "/v1/audit",
        json!({"sequences": ["^1", "^1", "^1", "^1", "^1"]}),
    )
    .await
    .error(413);
    assert_eq!(e["param"], "sequences");
    let e = post(
        &app,
        "/v1/audit",
        json!({"sequences": [vec![5u32; 120], "^1 2"]}),
    )
    .await
    .error(400);
    assert_eq!(e["param"], "sequences[1]");
    let e = post(
        &app,
        "/v1/audit",
        json!({"sequences": [vec![5u32; 100]], "definition": "nope"}),
    )
    .await
    .error(400);
    assert_eq!(e["param"], "definition");
    // Unknown route 404, wrong method 405, both in OpenAI's shape.
    let e = get(&app, "/v1/nothing").await.error(404);
    assert_eq!(e["code"], "unknown_route");
    get(&app, "/v1/completions").await.error(405);
}

#[actix_web::test]
async fn a_full_queue_answers_429_and_a_held_engine_is_not_ready() {
    let st = state_with(
        open_auth(),
        Limits::default(),
        EngineConfig {
            max_batch: 1,
            queue_capacity: 1,
            score_batch: 8,
            ..EngineConfig::default()
        },
    );
    let app = at::init_service(make_app(st.clone())).await;
    assert_eq!(get(&app, "/readyz").await.status, 200);
    st.engine.set_paused(true);
    // Fill the one queue slot while the engine is held.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ids = st.served().tokenizer.encode("^1 2 3").unwrap();
    st.engine
        .submit(Job::Generate {
            served: st.served(),
            reqs: vec![lethe::engine::GenerateRequest::greedy(ids, 4)],
            events: tx,
        })
        .unwrap();
    let r = post(
        &app,
        "/v1/completions",
        json!({"prompt": "^1 2", "max_tokens": 2}),
    )
    .await;
    let e = r.error(429);
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(r.headers.get(header::RETRY_AFTER).unwrap(), "1");
    let e = get(&app, "/readyz").await.error(503);
    assert_eq!(e["code"], "not_ready");
    assert_eq!(
        get(&app, "/livez").await.status,
        200,
        "liveness never depends on the engine"
    );
    st.engine.set_paused(false);
    loop {
        match rx.recv().await.unwrap() {
            lethe::engine::batcher::RowEvent::Done { .. } => break,
            lethe::engine::batcher::RowEvent::Failed { message } => panic!("{message}"),
            _ => {}
        }
    }
    assert_eq!(get(&app, "/readyz").await.status, 200);
}

#[actix_web::test]
async fn keys_guard_inference_and_admin_routes() {
    let body = json!({"prompt": "^1 2", "max_tokens": 2});
    let audit = json!({"sequences": [vec![5u32; 100]]});
    // No keys, bound to loopback: everything open.
    let app = at::init_service(make_app(state())).await;
    assert_eq!(
        post(&app, "/v1/completions", body.clone()).await.status,
        200
    );
    assert_eq!(post(&app, "/v1/audit", audit.clone()).await.status, 200);
    // No admin key on a public bind: admin routes are off.
    let public = Auth {
        loopback_only: false,
        ..open_auth()
    };
    let app = at::init_service(make_app(state_with(
        public,
        Limits::default(),
        EngineConfig::default(),
    )))
    .await;
    assert_eq!(
        post(&app, "/v1/completions", body.clone()).await.status,
        200
    );
    let e = post(&app, "/v1/audit", audit.clone()).await.error(403);
    assert_eq!(e["type"], "permission_error");
    // Both keys set.
    let keyed = Auth {
        api_key: Some(Secret::new("sk-infer")),
        admin_key: Some(Secret::new("sk-admin")),
        loopback_only: true,
    };
    let app = at::init_service(make_app(state_with(
        keyed,
        Limits::default(),
        EngineConfig::default(),
    )))
    .await;
    let b = || Some(body.to_string().into_bytes());
    let a = || Some(audit.to_string().into_bytes());
    let r = send(&app, "POST", "/v1/completions", b(), &[]).await;
    r.error(401);
    assert_eq!(r.headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
    let wrong = [("authorization", "Bearer sk-wrong")];
    send(&app, "POST", "/v1/completions", b(), &wrong)
        .await
        .error(401);
    let infer = [("authorization", "Bearer sk-infer")];
    let admin = [("authorization", "Bearer sk-admin")];
    assert_eq!(
        send(&app, "POST", "/v1/completions", b(), &infer)
            .await
            .status,
        200
    );
    assert_eq!(
        send(&app, "POST", "/v1/completions", b(), &admin)
            .await
            .status,
        200
    );
    send(&app, "POST", "/v1/audit", a(), &infer)
        .await
        .error(401);
    send(&app, "POST", "/v1/audit", a(), &[]).await.error(401);
    assert_eq!(
        send(&app, "POST", "/v1/audit", a(), &admin).await.status,
        200
    );
    send(&app, "GET", "/v1/models", None, &[]).await.error(401);
    // Health and metrics stay open.
    for p in ["/livez", "/readyz", "/metrics", "/openapi.yaml"] {
        assert_eq!(get(&app, p).await.status, 200, "{p}");
    }
}

/// A `tracing` writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[actix_web::test]
async fn keys_never_reach_the_logs() {
    let buf = Captured::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let keyed = Auth {
        api_key: Some(Secret::new("sk-infer-SECRET-1")),
        admin_key: Some(Secret::new("sk-admin-SECRET-2")),
        loopback_only: false,
    };
    tracing::info!(auth = ?keyed, "configured");
    let app = at::init_service(make_app(state_with(
        keyed,
        Limits::default(),
        EngineConfig::default(),
    )))
    .await;
    // Other tests run in parallel threads with no subscriber. One of them may be registering the
    // middleware's "request" callsite, with its interest computed before this subscriber existed,
    // and be descheduled before it lists the callsite (2 cores, ~40 test threads): the cached
    // interest is then "never" and a single rebuild can run before the callsite is listed. Probe
    // with a keyless request, rebuilding the cache, until the line arrives (at most 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tracing::callsite::rebuild_interest_cache();
        send(&app, "GET", "/livez", None, &[]).await;
        if String::from_utf8_lossy(&buf.0.lock().unwrap()).contains("request") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request log line never arrived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = || {
        Some(
            json!({"prompt": "^1 2", "max_tokens": 2})
                .to_string()
                .into_bytes(),
        )
    };
    for key in [
        "sk-infer-SECRET-1",
        "sk-admin-SECRET-2",
        "sk-wrong-SECRET-3",
    ] {
        let h = format!("Bearer {key}");
        send(
            &app,
            "POST",
            "/v1/completions",
            body(),
            &[("authorization", &h)],
        )
        .await;
        send(
            &app,
            "POST",
            "/v1/audit",
            Some(b"{}".to_vec()),
            &[("authorization", &h)],
        )
        .await;
    }
    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    for route in ["/v1/completions", "/v1/audit"] {
        let logged = logs
            .lines()
            .filter(|l| l.contains("request") && l.contains(&format!("route={route}")))
            .count();
        assert_eq!(logged, 3, "each {route} request is logged once: {logs}");
    }
    assert!(logs.contains("configured"));
    assert!(!logs.contains("SECRET"), "a key reached the logs:\n{logs}");
}

#[actix_web::test]
async fn metrics_follow_the_conventions_and_pass_promtool() {
    let app = at::init_service(make_app(state())).await;
    post(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 8}),
    )
    .await;
    get(&app, "/v1/nothing").await;
    let m = get(&app, "/metrics").await;
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for needle in [
        r#"lethe_request_duration_seconds_count{method="POST",route="/v1/completions",status="200"} 1"#,
        r#"lethe_request_duration_seconds_count{method="GET",route="unmatched",status="404"} 1"#,
        "lethe_time_to_first_token_seconds_count 1",
        "lethe_inter_token_latency_seconds_count 7",
        "lethe_generated_tokens_total 8",
        "lethe_model_info{architecture=\"gpt2\",version=",
        "lethe_batch_size_count",
        "lethe_queue_depth",
        "lethe_requests_in_flight",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("^1840"),
            "a prompt leaked into a label: {line}"
        );
    }
    // promtool (Debian's `prometheus` package; .ci/run installs it) lints the exposition.
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) if std::env::var_os("LETHE_REQUIRE_PROMTOOL").is_some() => {
            panic!("promtool is required (LETHE_REQUIRE_PROMTOOL) but failed to start: {e}")
        }
        Err(e) => eprintln!("promtool not run: {e}"),
    }
}

#[actix_web::test]
async fn serves_over_a_real_socket_on_port_0() {
    let st = state();
    let server = {
        let st = st.clone();
        actix_web::HttpServer::new(move || make_app(st.clone()))
    }
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0].to_string();
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    let (status, body, stream) = tokio::task::spawn_blocking(move || {
        let (s, b) = common::http(
            &addr,
            "POST",
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 10, "temperature": 0}).to_string(),
        );
        let (_, stream) = common::http(
            &addr,
            "POST",
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 5, "stream": true}).to_string(),
        );
        (s, b, stream)
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    contract().validate("/components/schemas/Completion", &v, "socket completion");
    assert!(stream.contains("data: [DONE]"), "{stream}");
    handle.stop(true).await;
}
mod audits;
mod contract_fixes;
mod deploy;
mod fleet;
mod hardening;
mod hardening_http;
mod takedowns;
mod takedowns_language;
mod takedowns_neox;
