//! Issue #14, the HTTP edge: bounded request-metric labels, a panic boundary around each
//! request, timeouts for a stalled request head or body, HEAD on every GET route and `Allow`
//! on 405s. Each test fails on the code before the fix.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::{test as at, web, HttpResponse};
use serde_json::Value;

use lethe::engine::batcher::EngineConfig;
use lethe::server::routes::ROUTES;
use lethe::server::state::Limits;
use lethe::server::{app_with, http_server, HttpTimeouts};

use super::{get, make_app, open_auth, send, state, state_with};

/// Starts `http_server` on port 0 with one worker; returns its address and a stop handle.
fn start(
    st: web::Data<lethe::server::AppState>,
    timeouts: &HttpTimeouts,
) -> (String, actix_web::dev::ServerHandle) {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (server, addrs) = http_server(st, &[any], 1, 1, timeouts).unwrap();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (addrs[0].to_string(), handle)
}

/// Writes `raw` on a new connection, then reads until the server closes it (or `patience`
/// runs out, which fails the test): the bytes received and the time it took.
fn exchange(addr: &str, raw: &[u8], patience: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(patience)).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        panic!(
            "the connection was still open after {patience:?} ({e}); received so far: {}",
            String::from_utf8_lossy(&out)
        );
    }
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

#[actix_web::test]
async fn made_up_methods_do_not_add_request_metric_series() {
    let app = at::init_service(make_app(state())).await;
    for i in 0..40 {
        let method = format!("BREW{i}");
        send(&app, &method, "/livez", None, &[]).await;
        send(&app, &method, "/v1/no-such-route", None, &[]).await;
    }
    let text = String::from_utf8(get(&app, "/metrics").await.body.to_vec()).unwrap();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("lethe_request_duration_seconds_count{"))
        .collect();
    assert!(
        series.len() <= 3,
        "80 requests with made-up methods made {} series:\n{}",
        series.len(),
        series.join("\n")
    );
    assert!(!text.contains("BREW"), "a method reached a label:\n{text}");
    for needle in [
        r#"lethe_request_duration_seconds_count{method="other",route="/livez",status="405"} 40"#,
        r#"lethe_request_duration_seconds_count{method="other",route="unmatched",status="404"} 40"#,
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
}

#[actix_web::test]
async fn a_panicking_handler_answers_500_and_the_server_lives_on() {
    let st = state();
    let server = {
        let st = st.clone();
        actix_web::HttpServer::new(move || {
            app_with(st.clone(), |cfg| {
                cfg.route(
                    "/panic",
                    web::get().to(|| async {
                        if true {
                            panic!("injected handler fault");
                        }
                        HttpResponse::Ok().finish()
                    }),
                );
            })
        })
    }
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0].to_string();
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    let (panicked, after, metrics) = tokio::task::spawn_blocking(move || {
        let panicked = super::common::http(&addr, "GET", "/panic", "");
        let after = super::common::http(&addr, "GET", "/livez", "");
        let metrics = super::common::http(&addr, "GET", "/metrics", "");
        (panicked, after, metrics)
    })
    .await
    .unwrap();
    assert_eq!(panicked.0, 500, "{}", panicked.1);
    let e: Value = serde_json::from_str(&panicked.1).unwrap();
    assert_eq!(e["error"]["type"], "server_error", "{e}");
    assert_eq!(e["error"]["code"], "internal_error", "{e}");
    assert!(
        !panicked.1.contains("injected handler fault"),
        "the panic's text reached the client: {}",
        panicked.1
    );
    assert_eq!(after.0, 200, "the next request failed: {}", after.1);
    let text = metrics.1;
    for needle in [
        r#"lethe_panics_total{component="http"} 1"#,
        r#"lethe_request_duration_seconds_count{method="GET",route="other",status="500"} 1"#,
        "lethe_requests_in_flight 1", // the /metrics request itself
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
    handle.stop(true).await;
}

#[actix_web::test]
async fn stalled_heads_and_bodies_are_answered_408_and_closed() {
    let limits = Limits {
        body_read_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let st = state_with(open_auth(), limits, EngineConfig::default());
    let timeouts = HttpTimeouts {
        header_read: Duration::from_secs(1),
        ..HttpTimeouts::default()
    };
    let (addr, handle) = start(st, &timeouts);
    let results = tokio::task::spawn_blocking(move || {
        let patience = Duration::from_secs(15);
        // Headers announcing 100 bytes, then one byte: 408 naming the limit, then closed.
        // Several at once, as the slow client of the issue opens many.
        let stalled_bodies: Vec<_> = (0..8)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    exchange(
                        &addr,
                        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\
                          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
                        patience,
                    )
                })
            })
            .collect();
        let stalled_head = exchange(
            &addr,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
            patience,
        );
        let silent = exchange(&addr, b"", patience);
        let bodies: Vec<_> = stalled_bodies
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        (bodies, stalled_head, silent)
    })
    .await
    .unwrap();
    let (bodies, stalled_head, silent) = results;
    for (resp, took) in bodies {
        assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
        assert!(resp.contains("--body-read-timeout-seconds"), "{resp}");
        assert!(resp.contains("\"code\":\"request_timeout\""), "{resp}");
        assert!(
            took >= Duration::from_millis(900),
            "answered after {took:?}"
        );
        assert!(took < Duration::from_secs(10), "answered after {took:?}");
    }
    let (resp, took) = stalled_head;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
    let (_, took) = silent;
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
    handle.stop(true).await;
}

/// Each GET template with `{id}` filled in.
fn get_paths() -> Vec<String> {
    ROUTES
        .iter()
        .filter(|(m, _)| *m == "GET")
        .map(|(_, p)| p.replace("{id}", "td_0000"))
        .collect()
}

#[actix_web::test]
async fn head_works_on_every_get_route_and_405_lists_allow() {
    let app = at::init_service(make_app(state())).await;
    for path in get_paths() {
        let g = send(&app, "GET", &path, None, &[]).await;
        let h = send(&app, "HEAD", &path, None, &[]).await;
        assert_eq!(h.status, g.status, "HEAD {path}");
        assert_eq!(
            h.headers.get(header::CONTENT_TYPE),
            g.headers.get(header::CONTENT_TYPE),
            "HEAD {path}"
        );
    }
    for (method, path, allow) in [
        ("GET", "/v1/completions", "POST"),
        ("HEAD", "/v1/completions", "POST"),
        ("DELETE", "/livez", "GET, HEAD"),
        ("PUT", "/v1/takedowns", "POST, GET, HEAD"),
        ("POST", "/v1/takedowns/td_1", "GET, HEAD, DELETE"),
    ] {
        let r = send(&app, method, path, None, &[]).await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(
            r.headers.get(header::ALLOW).map(|v| v.to_str().unwrap()),
            Some(allow),
            "{method} {path}"
        );
        if method != "HEAD" {
            r.error(405);
        }
    }
    // Over a socket, HEAD has GET's headers (Content-Length included) and no body.
    let (addr, handle) = start(state(), &HttpTimeouts::default());
    let (g, h) = tokio::task::spawn_blocking(move || {
        let req =
            |m: &str| format!("{m} /openapi.yaml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let patience = Duration::from_secs(15);
        (
            exchange(&addr, req("GET").as_bytes(), patience).0,
            exchange(&addr, req("HEAD").as_bytes(), patience).0,
        )
    })
    .await
    .unwrap();
    let (g_head, g_body) = g.split_once("\r\n\r\n").unwrap();
    let (h_head, h_body) = h.split_once("\r\n\r\n").unwrap();
    assert!(h_head.starts_with("HTTP/1.1 200"), "{h}");
    assert!(!g_body.is_empty());
    assert_eq!(h_body, "", "HEAD sent a body");
    let length = |head: &str| {
        head.lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .map(str::to_string)
    };
    assert_eq!(length(h_head), length(g_head), "{h_head}\n---\n{g_head}");
    assert!(length(h_head).is_some(), "{h_head}");
    handle.stop(true).await;
}
