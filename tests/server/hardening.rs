//! Issue #14's regressions inside the server: one request or one takedown can never stop
//! inference or unlearning. Each test reproduces a defect found by probing `lethe serve`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::takedowns::{memorized_rows, takedown_state, wait_for};
use super::*;
use lethe::supervise::{FaultPoint, Faults};

/// `lethe_panics_total{component}` from the exposition.
fn panics(st: &AppState, component: &str) -> u64 {
    st.metrics.panics.with_label_values(&[component]).get()
}

async fn completion_ok<S, B>(app: &S)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let r = post(
        app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(get(app, "/readyz").await.status, 200);
    assert_eq!(get(app, "/livez").await.status, 200);
}

/// Defect 1: `prompt_len + max_tokens` wrapped in release builds and the engine thread panicked
/// in `Vec::with_capacity`; every later completion was 503 while /livez stayed 200.
#[actix_web::test]
async fn a_huge_max_tokens_is_refused_and_the_engine_keeps_serving() {
    let st = state();
    let app = at::init_service(make_app(st.clone())).await;
    for max in [
        "18446744073709551615",
        "18446744073709551600",
        "9223372036854775808",
    ] {
        let body = format!(r#"{{"prompt":"^1840","max_tokens":{max}}}"#);
        let e = send(
            &app,
            "POST",
            "/v1/completions",
            Some(body.into_bytes()),
            &[],
        )
        .await
        .error(400);
        assert_eq!(e["param"], "max_tokens", "{e}");
    }
    // The engine validates on its own too: a request built in code, past the HTTP checks.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    st.engine
        .submit(Job::Generate {
            served: st.served(),
            reqs: vec![lethe::engine::GenerateRequest::greedy(
                vec![1, 2],
                usize::MAX,
            )],
            events: tx,
        })
        .unwrap();
    match rx.recv().await {
        Some(lethe::engine::batcher::RowEvent::Failed { message }) => {
            assert!(message.contains("context length"), "{message}")
        }
        other => panic!("expected a failed row, got {other:?}"),
    }
    completion_ok(&app).await;
}

/// Isolation: a panic while admitting rows, in a decode step or while scoring fails that unit
/// of work (its request gets a 500), is counted, and the engine goes on serving.
#[actix_web::test]
async fn an_injected_engine_panic_fails_only_its_request() {
    let step_bomb = Arc::new(AtomicBool::new(false));
    // A prompt ending in "333" is poisoned at admission and at scoring.
    let poison = bundled().tokenizer.encode("333").unwrap();
    let faults = {
        let step_bomb = step_bomb.clone();
        Faults::hook(move |p| match p {
            FaultPoint::EngineAdmit { prompts } if prompts.iter().any(|p| p.ends_with(&poison)) => {
                panic!("injected admit fault")
            }
            FaultPoint::EngineStep if step_bomb.swap(false, Ordering::SeqCst) => {
                panic!("injected step fault")
            }
            FaultPoint::EngineScore { sequences }
                if sequences.iter().any(|s| s.ends_with(&poison)) =>
            {
                panic!("injected score fault")
            }
            _ => {}
        })
    };
    let st = state_with(
        open_auth(),
        Limits::default(),
        EngineConfig {
            faults,
            ..EngineConfig::default()
        },
    );
    let app = at::init_service(make_app(st.clone())).await;
    let e = post(
        &app,
        "/v1/completions",
        json!({"prompt": "^1 333", "max_tokens": 4}),
    )
    .await
    .error(500);
    assert!(e["message"].as_str().unwrap().len() > 3, "{e}");
    assert_eq!(panics(&st, "engine"), 1);
    completion_ok(&app).await;

    step_bomb.store(true, Ordering::SeqCst);
    post(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 8}),
    )
    .await
    .error(500);
    assert_eq!(panics(&st, "engine"), 2);
    completion_ok(&app).await;

    post(
        &app,
        "/v1/completions",
        json!({"prompt": "^1 333", "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await
    .error(500);
    assert_eq!(panics(&st, "engine"), 3);
    completion_ok(&app).await;
    let text = get(&app, "/metrics").await;
    let text = String::from_utf8_lossy(&text.body);
    assert!(
        text.contains(r#"lethe_panics_total{component="engine"} 3"#),
        "{text}"
    );
}

/// Liveness means alive: once the engine thread has ended, /livez fails (so Kubernetes restarts
/// the process) instead of answering 200 while every completion is 503.
#[actix_web::test]
async fn livez_fails_when_the_engine_thread_is_gone() {
    let st = state();
    let app = at::init_service(make_app(st.clone())).await;
    assert_eq!(get(&app, "/livez").await.status, 200);
    st.engine.shutdown();
    get(&app, "/livez").await.error(503);
}

/// Defect 2 on /v1/audit and /v1/takedowns: `k + n` wrapped to 0 and the handler (or the
/// worker, at `seq[..k]`) panicked.
#[actix_web::test]
async fn a_definition_whose_sizes_overflow_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), false, |_| {});
    let app = at::init_service(make_app(st.clone())).await;
    for def in [
        "k=18446744073709551615,n=1",
        "k=1,n=18446744073709551615",
        "k=9223372036854775808,n=9223372036854775808",
    ] {
        for route in ["/v1/takedowns", "/v1/audit"] {
            let body = json!({"definition": def, "sequences": ["^1 2 3"]});
            let e = post(&app, route, body).await.error(400);
            assert_eq!(e["param"], "definition", "{route} {def}: {e}");
        }
    }
    // Larger than the context but not overflowing: refused by name too.
    let e = post(
        &app,
        "/v1/takedowns",
        json!({"definition": "k=1000,n=1000", "sequences": ["^1 2 3"]}),
    )
    .await
    .error(400);
    assert_eq!(e["param"], "definition", "{e}");
    assert!(
        st.takedowns
            .as_ref()
            .unwrap()
            .store
            .list(None, 10, None)
            .unwrap()
            .is_empty(),
        "nothing was stored"
    );
    completion_ok(&app).await;
}

/// A takedown whose job panics ends `failed` alone: the valid takedown that was coalesced into
/// the same job is retried by itself and `applied`; the worker lives on and the server stays
/// live and ready.
#[actix_web::test]
async fn a_poisoned_takedown_fails_alone_and_the_valid_one_is_applied() {
    let rows = memorized_rows(2);
    let poison = rows[1].clone();
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), false, |c| {
        let poison = poison.clone();
        c.faults = Faults::hook(move |p| {
            if let FaultPoint::Job { sequences } = p {
                if sequences.contains(&poison) {
                    panic!("injected job fault");
                }
            }
        });
    });
    let app = at::init_service(make_app(st.clone())).await;
    // Both are queued before the worker starts, so its first job holds both.
    let bad = post(&app, "/v1/takedowns", json!({"sequences": [poison]}))
        .await
        .json();
    let good = post(&app, "/v1/takedowns", json!({"sequences": [rows[0]]}))
        .await
        .json();
    st.takedowns.as_ref().unwrap().start();
    let (bad, good) = (bad["id"].as_str().unwrap(), good["id"].as_str().unwrap());
    let good_end = wait_for(&app, good, &["applied", "rejected", "failed"], 600).await;
    assert_eq!(good_end["status"], "applied", "{good_end}");
    let bad_end = wait_for(&app, bad, &["applied", "rejected", "failed"], 60).await;
    assert_eq!(bad_end["status"], "failed", "{bad_end}");
    let why = bad_end["error"].as_str().unwrap_or_default();
    assert!(why.contains("injected job fault"), "{bad_end}");
    // The first job held both and panicked once; the split retried each alone.
    assert_eq!(panics(&st, "worker"), 2);
    let receipt = get(&app, &format!("/v1/takedowns/{good}/receipt"))
        .await
        .json();
    assert!(receipt.to_string().contains("split"), "{receipt}");
    completion_ok(&app).await;
    st.takedowns.as_ref().unwrap().shutdown();
}

/// Liveness covers the worker: if its thread ends (here a fault outside any job), /livez fails.
#[actix_web::test]
async fn livez_fails_when_the_worker_thread_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let st = takedown_state(dir.path(), false, |c| {
        let armed = armed.clone();
        c.faults = Faults::hook(move |p| {
            if matches!(p, FaultPoint::WorkerLoop) && armed.load(Ordering::SeqCst) {
                panic!("injected worker-loop fault");
            }
        });
    });
    let app = at::init_service(make_app(st.clone())).await;
    st.takedowns.as_ref().unwrap().start();
    assert_eq!(get(&app, "/livez").await.status, 200);
    armed.store(true, Ordering::SeqCst);
    st.takedowns.as_ref().unwrap().notify();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(&app, "/livez").await;
        if r.status == 503 {
            assert!(String::from_utf8_lossy(&r.body).contains("worker"));
            break;
        }
        assert!(Instant::now() < deadline, "livez stayed 200");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    st.takedowns.as_ref().unwrap().shutdown();
}

/// Defect 6: retrying a cancelled takedown with its Idempotency-Key answered 202 `cancelled` but
/// put its sequences back into the guard.
#[actix_web::test]
async fn retrying_a_cancelled_takedown_does_not_re_arm_its_guard() {
    let dir = tempfile::tempdir().unwrap();
    let st = takedown_state(dir.path(), false, |_| {});
    let app = at::init_service(make_app(st.clone())).await;
    let guard = &st.takedowns.as_ref().unwrap().guard;
    let body = Some(
        json!({"sequences": [vec![5u32; 100]]})
            .to_string()
            .into_bytes(),
    );
    let key = [("idempotency-key", "retry-me")];
    let r = send(&app, "POST", "/v1/takedowns", body.clone(), &key).await;
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert!(!guard.is_empty());
    let r = send(&app, "DELETE", &format!("/v1/takedowns/{id}"), None, &[]).await;
    assert_eq!(r.json()["status"], "cancelled");
    assert!(guard.is_empty());
    let r = send(&app, "POST", "/v1/takedowns", body, &key).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["status"], "cancelled");
    assert!(guard.is_empty(), "the retry re-armed the guard");
}

/// Defect 4: a non-streaming completion whose client left kept generating every token. Over a
/// real socket: the client sends a long request and closes after 0.3 s; generation stops.
#[actix_web::test]
async fn a_non_streaming_completion_stops_when_its_client_leaves() {
    let st = state();
    // The server `lethe serve` runs (its on_connect hook keeps each connection's socket).
    let (server, addrs) = lethe::server::http_server(
        st.clone(),
        &["127.0.0.1:0".parse().unwrap()],
        1,
        1,
        &lethe::server::HttpTimeouts::default(),
    )
    .unwrap();
    let addr = addrs[0].to_string();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    let generated = || st.metrics.generated_tokens.get();
    // 16 prompts x n=16 x 100 tokens = 25,600 tokens: many seconds of work on 2 cores.
    let prompts: Vec<String> = (0..16).map(|i| format!("^{} {}", 10 + i, 17 + i)).collect();
    let body =
        json!({"prompt": prompts, "n": 16, "max_tokens": 100, "temperature": 1.0, "seed": 1})
            .to_string();
    let total = 16 * 16 * 100;
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
    })
    .await
    .unwrap();
    // Within a second of the close, generation has stopped.
    actix_web::rt::time::sleep(Duration::from_millis(1000)).await;
    let settled = generated();
    actix_web::rt::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        generated(),
        settled,
        "still generating after the client left"
    );
    assert!(
        settled < total / 2,
        "{settled} of {total} tokens generated for a client that left after 0.3 s"
    );
    handle.stop(true).await;
}
