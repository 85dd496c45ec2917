//! Takedowns end to end on the bundled TinyMem noise model: durable acceptance, the
//! regurgitation guard, the worker unlearning a memorized sequence, the gates, the hot swap,
//! receipts, versions, rollback and restart.

use std::path::Path;
use std::time::Duration;

use super::*;
use lethe::takedown::versions::resolve_current;
use lethe::takedown::worker::{TakedownConfig, Takedowns};
use lethe::unlearn::pipeline::Datasets;

/// A server state with takedowns under `dir` (fast unlearning settings for tests).
pub(crate) fn takedown_state(
    dir: &Path,
    start_worker: bool,
    tweak: impl FnOnce(&mut TakedownConfig),
) -> web::Data<AppState> {
    let mut cfg = TakedownConfig::new(dir.to_path_buf());
    cfg.pipeline.controller.max_steps = 400;
    cfg.pipeline.controller.check_every = 5;
    cfg.worker_threads = 2;
    cfg.audit_interval = Duration::from_secs(3600);
    tweak(&mut cfg);
    state_with_takedowns(
        cfg,
        &lethe::loader::bundled_model_dir(),
        "tinymem-noise",
        |live, ctx| Datasets::for_model(live, None, None, Vec::new(), ctx).unwrap(),
        start_worker,
    )
}

/// A server state serving the current version of `model_dir` (under `cfg.data_dir`) as `name`,
/// with takedowns on the datasets `data` builds from that version's directory.
pub(crate) fn state_with_takedowns(
    cfg: TakedownConfig,
    model_dir: &Path,
    name: &str,
    data: impl FnOnce(&Path, usize) -> Datasets,
    start_worker: bool,
) -> web::Data<AppState> {
    let live = resolve_current(&cfg.data_dir, model_dir).unwrap();
    let lm = lethe::loader::load_dir(&live, "live", &Device::Cpu, cfg.serve_dtype).unwrap();
    let data = data(&live, lm.model.spec().context_length);
    let served = Served::new(lm, Some(name.into())).unwrap();
    let st = AppState::new(
        served,
        EngineConfig::default(),
        open_auth(),
        Limits::default(),
    );
    let td = Takedowns::open(cfg, data, st.live.clone(), st.metrics.clone()).unwrap();
    let st = web::Data::new(st.with_takedowns(td));
    if start_worker {
        st.takedowns.as_ref().unwrap().start();
    }
    st
}

/// Memorized sequences of the bundled model under the tinymem definition (whole noised rows).
pub(crate) fn memorized_rows(count: usize) -> Vec<Vec<u32>> {
    let dir = lethe::loader::bundled_model_dir();
    let ds = lethe::tinymem::train::Card::read(&dir)
        .unwrap()
        .dataset()
        .unwrap();
    let lm = bundled();
    let def = lethe::audit::Definition::Tinymem;
    let rows: Vec<Vec<u32>> = ds
        .eligible_noised_rows(50, 100)
        .iter()
        .map(|r| r.ids.clone())
        .collect();
    let items: Vec<_> = rows.iter().map(|r| def.split(r).unwrap()).collect();
    let (res, _) = lethe::audit::audit(&lm.model, None, &items, 64).unwrap();
    rows.into_iter()
        .zip(res)
        .filter(|(_, r)| r.memorized)
        .map(|(s, _)| s)
        .take(count)
        .collect()
}

pub(crate) async fn wait_for<S, B>(app: &S, id: &str, done: &[&str], secs: u64) -> Value
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let mut last = Value::Null;
    for _ in 0..secs * 4 {
        last = get(app, &format!("/v1/takedowns/{id}")).await.json();
        // Traffic keeps flowing while the job runs and the weights are swapped: every request
        // succeeds and the server stays ready.
        let c = post(
            app,
            "/v1/completions",
            json!({"prompt": "^5 7 9", "max_tokens": 8}),
        )
        .await;
        assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
        assert_eq!(get(app, "/readyz").await.status, 200);
        if done.contains(&last["status"].as_str().unwrap_or_default()) {
            return last;
        }
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("takedown {id} did not reach {done:?} in {secs} s: {last}");
}

#[actix_web::test]
async fn five_memorized_sequences_are_guarded_unlearned_swapped_kept_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    // The audit finds memorized sequences; five of them are taken down.
    let seqs = memorized_rows(5);
    assert_eq!(seqs.len(), 5);
    let st = takedown_state(dir.path(), true, |_| {});
    let app = at::init_service(make_app(st.clone())).await;
    let v0 = st.served().version.clone();
    let a = post(&app, "/v1/audit", json!({"sequences": seqs}))
        .await
        .json();
    assert_eq!(a["summary"]["memorized"], 5, "{a}");
    // Before: the model regurgitates the first one.
    let complete = json!({"prompt": seqs[0][..50].to_vec(), "max_tokens": 50, "temperature": 0});
    let c = post(&app, "/v1/completions", complete.clone()).await.json();
    assert_eq!(c["choices"][0]["finish_reason"], "length");

    let body = || {
        Some(
            json!({"sequences": seqs, "reason": "test"})
                .to_string()
                .into_bytes(),
        )
    };
    let r = send(
        &app,
        "POST",
        "/v1/takedowns",
        body(),
        &[("idempotency-key", "k-1")],
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    // Durable before the answer: a second connection to the store sees it.
    let store = lethe::takedown::Store::open(dir.path()).unwrap();
    assert_eq!(store.get(&id).unwrap().sequences, seqs);
    // The guard cuts the regurgitation at once, before any weights change.
    let c = post(&app, "/v1/completions", complete.clone()).await.json();
    assert_eq!(c["choices"][0]["finish_reason"], "content_filter", "{c}");
    assert_eq!(c["system_fingerprint"], v0.as_str(), "cut before the swap");
    // A retry with the same key is the same takedown.
    let again = send(
        &app,
        "POST",
        "/v1/takedowns",
        body(),
        &[("idempotency-key", "k-1")],
    )
    .await;
    assert_eq!(again.json()["id"], id.as_str());

    // wait_for keeps completions flowing and asserts every one succeeds.
    let t = wait_for(&app, &id, &["applied", "rejected", "failed"], 900).await;
    assert_eq!(t["status"], "applied", "{t}");
    let v1 = t["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v0);
    assert_eq!(st.served().version, v1);
    // The new weights no longer regurgitate any of the five (audit bypasses the guard).
    let a = post(&app, "/v1/audit", json!({"sequences": seqs}))
        .await
        .json();
    assert_eq!(a["summary"]["memorized"], 0, "{a}");
    assert_eq!(a["model_version"], v1.as_str());
    // Drift within budget, as the gates recorded it.
    let rep = &t["report"];
    let (pb, pa) = (
        rep["before"]["perplexity"].as_f64().unwrap(),
        rep["after"]["perplexity"].as_f64().unwrap(),
    );
    assert!(pa / pb - 1.0 <= 0.02, "perplexity {pb} -> {pa}");
    let c = post(&app, "/v1/completions", complete.clone()).await;
    assert_eq!(c.headers.get("x-lethe-model-version").unwrap(), v1.as_str());
    // The receipt carries the evidence.
    let rc = get(&app, &format!("/v1/takedowns/{id}/receipt"))
        .await
        .json();
    assert_eq!(rc["version_before"], v0.as_str());
    assert_eq!(rc["version_after"], v1.as_str());
    assert_eq!(rc["audit"].as_array().unwrap().len(), 5);
    for s in rc["audit"].as_array().unwrap() {
        assert_eq!(s["before"]["memorized"], true);
        assert_eq!(s["after"]["memorized"], false);
    }
    assert_eq!(rc["sequences"][0]["sha256"].as_str().unwrap().len(), 64);
    // Versions and metrics.
    let vs = get(&app, "/v1/admin/versions").await.json();
    assert_eq!(vs["current"], v1.as_str());
    assert_eq!(vs["data"].as_array().unwrap().len(), 2);
    let m = String::from_utf8(get(&app, "/metrics").await.body.to_vec()).unwrap();
    assert!(m.contains(r#"lethe_takedowns{state="applied"} 1"#), "{m}");
    assert!(!m.contains("lethe_guard_blocks_total 0"), "{m}");
    assert!(m.contains(&format!(r#"lethe_model_version_info{{version="{v1}"}} 1"#)));
    for line in m.lines() {
        assert!(
            !line.contains(&id),
            "a takedown id leaked into a metric: {line}"
        );
    }

    // A restart keeps the new version.
    if let Some(td) = &st.takedowns {
        td.shutdown();
    }
    drop(app);
    drop(st);
    let st = takedown_state(dir.path(), false, |_| {});
    assert_eq!(st.served().version, v1);
    let app = at::init_service(make_app(st.clone())).await;
    // Rollback is compare-and-swap: a stale expected_current is refused.
    let e = post(
        &app,
        "/v1/admin/rollback",
        json!({"to_version": v0, "expected_current": v0}),
    )
    .await
    .error(409);
    assert_eq!(e["code"], "version_mismatch");
    // A stream started on v1 finishes on v1 even though the rollback lands while it runs: its
    // chunks say v1 and its log-probabilities are v1's (v0's differ, checked below).
    let long =
        json!({"prompt": "^5 7 9", "max_tokens": 100, "n": 8, "temperature": 0, "logprobs": 3});
    let want = post(&app, "/v1/completions", long.clone()).await.json();
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let in_flight = at::call_service(
        &app,
        at::TestRequest::post()
            .uri("/v1/completions")
            .insert_header((header::CONTENT_TYPE, "application/json"))
            .set_payload(streamed.to_string())
            .to_request(),
    )
    .await;
    let rb = post(
        &app,
        "/v1/admin/rollback",
        json!({"to_version": v0, "expected_current": v1}),
    )
    .await;
    assert_eq!(rb.status, 200, "{}", String::from_utf8_lossy(&rb.body));
    let body = at::read_body(in_flight).await;
    // Per choice: every top-alternative log-probability, in order.
    let tops = |chunks: Vec<Value>| {
        let mut out = vec![Vec::new(); 8];
        for c in chunks {
            let i = c["index"].as_u64().unwrap() as usize;
            for m in c["logprobs"]["top_logprobs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let mut v: Vec<f64> = m
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                v.sort_by(f64::total_cmp);
                out[i].extend(v);
            }
        }
        out
    };
    let mut chunks = Vec::new();
    for e in sse_events(&body).iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(e).unwrap();
        assert_eq!(chunk["system_fingerprint"], v1.as_str());
        chunks.push(chunk["choices"][0].clone());
    }
    let close = |a: &[Vec<f64>], b: &[Vec<f64>]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-4))
    };
    let want_tops = tops(want["choices"].as_array().unwrap().clone());
    assert!(
        close(&tops(chunks), &want_tops),
        "the stream did not finish on v1"
    );
    let on_v0 = post(&app, "/v1/completions", long.clone()).await.json();
    assert_eq!(on_v0["system_fingerprint"], v0.as_str());
    assert!(
        !close(
            &tops(on_v0["choices"].as_array().unwrap().clone()),
            &want_tops
        ),
        "v0 and v1 log-probabilities are indistinguishable: the check above proves nothing"
    );
    assert_eq!(rb.json()["requeued"], 1);
    assert_eq!(st.served().version, v0);
    // The old weights regurgitate again, and the re-queued takedown is guarded again.
    let a = post(&app, "/v1/audit", json!({"sequences": seqs}))
        .await
        .json();
    assert_eq!(a["summary"]["memorized"], 5);
    let c = post(&app, "/v1/completions", complete.clone()).await.json();
    assert_eq!(c["choices"][0]["finish_reason"], "content_filter");
    let t = get(&app, &format!("/v1/takedowns/{id}")).await.json();
    assert_eq!(t["status"], "queued");
}

/// With the risk and quantized gates on, a takedown is applied only once its sequences are
/// gone under sampling, perturbed prompts and int8 rounding too, and the receipt shows each
/// measure before and after.
#[actix_web::test]
async fn the_risk_and_quantized_gates_measure_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), true, |c| {
        // 10 samples extracting it with probability 0.5 or more: a bar this test can reach
        // in CI's time (the default, 100 samples and p = 0.1, needs q below about 1e-3).
        c.pipeline.gates.risk = Some(lethe::audit::RiskOptions {
            samples: 10,
            p: 0.5,
            ..Default::default()
        });
        c.pipeline.gates.quantized = true;
    });
    let app = at::init_service(make_app(st.clone())).await;
    let seqs = memorized_rows(2);
    let (id, t) = take_down(&app, &seqs, 900).await;
    assert_eq!(t["status"], "applied", "{t}");
    let rc = get(&app, &format!("/v1/takedowns/{id}/receipt"))
        .await
        .json();
    let audits = rc["audit"].as_array().unwrap();
    assert_eq!(audits.len(), 2, "{rc}");
    for s in audits {
        let (b, a) = (&s["before"], &s["after"]);
        assert_eq!(b["memorized"], true, "{s}");
        assert!(b["risk"]["longest_match"].as_u64().unwrap() >= 50, "{s}");
        assert!(
            b["int8_memorized"].is_boolean() && b["int4_memorized"].is_boolean(),
            "{s}"
        );
        assert_eq!(a["memorized"], false, "{s}");
        assert_eq!(a["risk"]["discoverable"], false, "{s}");
        assert_eq!(a["risk"]["perturbed_memorized"], 0, "{s}");
        assert_eq!(a["int8_memorized"], false, "{s}");
    }
    // The live model, audited with risk through the API, agrees.
    let a = post(
        &app,
        "/v1/audit",
        json!({"sequences": seqs, "risk": {"samples": 10, "p": 0.5}}),
    )
    .await
    .json();
    assert_eq!(a["summary"]["extractable"], 0, "{a}");
    st.takedowns.as_ref().unwrap().shutdown();
}

/// `--audit-corpus`: the auditor audits a sample of the corpus on the live version at start
/// and exports the ratio, the sample size and the change since the previous version.
#[actix_web::test]
async fn the_auditor_samples_the_audit_corpus_and_exports_its_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let rows = memorized_rows(3);
    let lines: Vec<String> = rows.iter().map(|r| json!({"ids": r}).to_string()).collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let data = dir.path().join("data");
    let st = takedown_state(&data, true, |c| {
        c.corpus = Some(lethe::takedown::corpus::CorpusConfig {
            path: corpus.clone(),
            sample: 2,
        });
    });
    let app = at::init_service(make_app(st.clone())).await;
    let mut text = String::new();
    for _ in 0..120 {
        let m = get(&app, "/metrics").await;
        text = String::from_utf8_lossy(&m.body).to_string();
        if text.contains("lethe_corpus_audit_sample_size 2") {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(text.contains("lethe_corpus_audit_sample_size 2"), "{text}");
    // Every row is memorized (whole noised rows, prompted with their own prefix).
    assert!(
        text.contains("lethe_corpus_memorization_ratio{definition=\"tinymem\"} 1"),
        "{text}"
    );
    assert!(text.contains("lethe_corpus_memorization_increase{definition=\"tinymem\"} 0"));
    st.takedowns.as_ref().unwrap().shutdown();
}

/// A takedown of one sequence that no model can pass the gates for ends `rejected`, with its
/// reason and report, and the live version stays; it does not stay `running` (the job is
/// `validating` once the gates decided, the state a rejection leaves from).
/// Posts a takedown of `sequences` and waits (as [`wait_for`]) until it ends: its id and last
/// state.
pub(crate) async fn take_down<S, B>(app: &S, sequences: &[Vec<u32>], secs: u64) -> (String, Value)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let t = post(app, "/v1/takedowns", json!({ "sequences": sequences }))
        .await
        .json();
    let id = t["id"].as_str().unwrap().to_string();
    let t = wait_for(app, &id, &["applied", "rejected", "failed"], secs).await;
    (id, t)
}

#[actix_web::test]
async fn a_takedown_no_candidate_passes_ends_rejected_and_the_live_version_stays() {
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), true, |c| {
        // Held-out perplexity would have to fall by half: no candidate can pass.
        c.pipeline.gates.perplexity_budget = -0.5;
        c.pipeline.controller.max_steps = 10;
    });
    let app = at::init_service(make_app(st.clone())).await;
    let v0 = st.served().version.clone();
    let seq = memorized_rows(1);
    let (id, t) = take_down(&app, &seq, 120).await;
    assert_eq!(t["status"], "rejected", "{t}");
    assert!(
        t["rejection_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{t}"
    );
    assert!(t["report"].is_object(), "{t}");
    assert_eq!(st.served().version, v0);
    let events = get(&app, &format!("/v1/takedowns/{id}/receipt"))
        .await
        .json();
    let text = events.to_string();
    assert!(text.contains("validating"), "{events}");
    st.takedowns.as_ref().unwrap().shutdown();
}

/// `--unlearn-method`: another method runs once and its model meets the same gates. Durable at
/// ratio 0.3 (gates loosened to extractability alone) removes the sequence and is swapped in;
/// Activations at ratio 0 changes nothing, so its one candidate is rejected with the reason.
#[actix_web::test]
async fn another_unlearning_method_serves_a_takedown_through_the_same_gates() {
    use lethe::unlearn::method::MethodSpec;
    use lethe::unlearn::neurons::{NeuronConfig, NeuronMethod};
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), true, |c| {
        c.pipeline.method = Some(MethodSpec::Durable {
            ratio: 0.3,
            aggregate: false,
            batch_size: 64,
        });
        c.pipeline.gates.perplexity_budget = f64::INFINITY;
        c.pipeline.gates.accuracy_budget = f64::INFINITY;
        c.pipeline.gates.canary_budget = f64::INFINITY;
    });
    let app = at::init_service(make_app(st.clone())).await;
    let v0 = st.served().version.clone();
    let seq = memorized_rows(1);
    let (_, t) = take_down(&app, &seq, 180).await;
    assert_eq!(t["status"], "applied", "{t}");
    let report = &t["report"];
    assert_eq!(report["config"]["method"]["method"], "durable", "{t}");
    assert_eq!(report["ending"], "passed", "{t}");
    assert_eq!(report["checks"].as_array().map(Vec::len), Some(1), "{t}");
    assert_eq!(report["checks"][0]["extractable"], 0, "{t}");
    assert!(report["weights_zeroed"].as_u64().unwrap() > 0, "{t}");
    assert_ne!(st.served().version, v0, "the method's model is live");
    st.takedowns.as_ref().unwrap().shutdown();

    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), true, |c| {
        c.pipeline.method = Some(MethodSpec::Neuron {
            neuron: NeuronMethod::Activations,
            config: NeuronConfig {
                ratio: 0.0,
                ..NeuronConfig::default()
            },
        });
    });
    let app = at::init_service(make_app(st.clone())).await;
    let v0 = st.served().version.clone();
    let (_, t) = take_down(&app, &seq, 180).await;
    assert_eq!(t["status"], "rejected", "{t}");
    assert_eq!(t["report"]["ending"], "gates_failed", "{t}");
    let why = t["rejection_reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("still extractable") && why.contains("activations candidate"),
        "{why}"
    );
    assert_eq!(st.served().version, v0);
    st.takedowns.as_ref().unwrap().shutdown();
}

/// The 202 says which sequences the live model regurgitates now, under which definition; a
/// takedown of none of them ends applied on the live version, which stays (no new version,
/// nothing masked), with its sequences guarded and a report that says so.
#[actix_web::test]
async fn a_takedown_of_nothing_extractable_is_recorded_and_guarded_without_a_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), true, |_| {});
    let app = at::init_service(make_app(st.clone())).await;
    let v0 = st.served().version.clone();
    // 100 pseudo-random symbols: nothing the noise model was trained to continue.
    let random: Vec<u32> = (0..100u32).map(|i| (i * 37 + 11) % 97 % 12).collect();
    let r = post(&app, "/v1/takedowns", json!({"sequences": [random]})).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let t = r.json();
    assert_eq!(t["extractable_now"], json!([false]), "{t}");
    assert_eq!(
        t["definition"], "tinymem",
        "the GPT-2 family's default: {t}"
    );
    assert_eq!(t["model_version"], v0.as_str());
    let id = t["id"].as_str().unwrap().to_string();
    let t = wait_for(&app, &id, &["applied", "rejected", "failed"], 120).await;
    assert_eq!(t["status"], "applied", "{t}");
    assert_eq!(t["version"], v0.as_str(), "{t}");
    assert_eq!(t["report"]["ending"], "nothing_extractable", "{t}");
    assert_eq!(st.served().version, v0);
    let vs = get(&app, "/v1/admin/versions").await.json();
    assert_eq!(vs["data"].as_array().map(Vec::len), Some(1), "{vs}");
    // Mixed: the 202 tells the memorized one from the other.
    let mut both = memorized_rows(1);
    both.insert(0, random);
    let t = post(&app, "/v1/takedowns", json!({"sequences": both}))
        .await
        .json();
    assert_eq!(t["extractable_now"], json!([false, true]), "{t}");
    st.takedowns.as_ref().unwrap().shutdown();
}

#[actix_web::test]
async fn bad_takedowns_are_refused_item_by_item() {
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), false, |c| c.max_sequences = 3);
    let app = at::init_service(make_app(st.clone())).await;
    let long = vec![5u32; 151];
    let e = post(
        &app,
        "/v1/takedowns",
        json!({"sequences": ["", [1, 2, 3], long, [1, 99999], {"a": 1}]}),
    )
    .await
    .error(413);
    assert_eq!(e["param"], "sequences");
    let e = post(
        &app,
        "/v1/takedowns",
        json!({"sequences": ["", [1, 2, 3], vec![5u32; 151]]}),
    )
    .await
    .error(400);
    let msg = e["message"].as_str().unwrap();
    for needle in ["sequences[0]", "sequences[1]", "sequences[2]", "3 invalid"] {
        assert!(msg.contains(needle), "{needle} missing from {msg}");
    }
    post(&app, "/v1/takedowns", json!({"sequences": []}))
        .await
        .error(400);
    post(
        &app,
        "/v1/takedowns",
        json!({"sequences": [vec![5u32; 100]], "x": 1}),
    )
    .await
    .error(400);
    // Idempotency: same key, different body → 409.
    let body = |n: u32| {
        Some(
            json!({"sequences": [vec![n; 100]]})
                .to_string()
                .into_bytes(),
        )
    };
    let k = [("idempotency-key", "same")];
    assert_eq!(
        send(&app, "POST", "/v1/takedowns", body(5), &k)
            .await
            .status,
        202
    );
    send(&app, "POST", "/v1/takedowns", body(6), &k)
        .await
        .error(409);
    // The worker is not running: the takedown stays queued and can be cancelled once.
    let list = get(&app, "/v1/takedowns?limit=10").await.json();
    let id = list["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(list["data"][0]["status"], "queued");
    let one = get(&app, &format!("/v1/takedowns/{id}?include=sequences"))
        .await
        .json();
    assert_eq!(one["sequences"][0], json!(vec![5u32; 100]));
    let r = send(&app, "DELETE", &format!("/v1/takedowns/{id}"), None, &[]).await;
    assert_eq!(r.json()["status"], "cancelled");
    send(&app, "DELETE", &format!("/v1/takedowns/{id}"), None, &[])
        .await
        .error(409);
    get(&app, "/v1/takedowns/td_nope").await.error(404);
    get(&app, "/v1/takedowns?limit=0").await.error(400);
    get(&app, "/v1/takedowns?status=bogus").await.error(400);
}
