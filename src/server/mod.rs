//! `lethe serve`: the HTTP sidecar. It only speaks HTTP (actix workers authenticate, parse,
//! route and answer); every forward pass runs on the engine thread ([`crate::engine::batcher`])
//! and takedowns run in [`crate::takedown::worker`]. See `docs/api.md` for the routes and
//! `docs/metrics.md` for the metrics.
//!
//! Invariants:
//! - A request loads the live version ([`crate::engine::served::Live`]) once and finishes on it,
//!   whatever swaps happen meanwhile.
//! - At start the live version is the one the data directory records (a first start imports
//!   `--model` as the root), so a restart serves what was live before it.
//! - A panic in a handler fails that request alone, whether it happens while the handler's future
//!   is made or polled: it is logged, counted in `lethe_panics_total{component="http"}` and
//!   answered 500 in OpenAI's error shape, and the worker goes on serving.
//! - Every request is observed in `lethe_request_duration_seconds` under labels from fixed sets
//!   ([`metrics`]); `lethe_requests_in_flight` is decremented on drop, so a request whose client
//!   left is not counted forever.
//! - The per-request log line holds the method, the route template, the status and the latency:
//!   never the path, the query string, headers or the body.
//! - The request head must arrive within `--header-read-timeout-seconds` (else 408 and close) and
//!   the body within `--body-read-timeout-seconds` ([`body`]).
//! - On SIGTERM/SIGINT the server stops accepting, gives in-flight requests up to
//!   `--shutdown-timeout` seconds, then stops the takedown worker (a running job stays queued) and
//!   drains the engine.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{web, App, HttpServer};
use anyhow::Context;

pub mod auth;
pub mod body;
pub mod config;
pub mod error;
pub mod metrics;
pub mod peer;
pub mod routes;
pub mod state;

pub use config::{Config, HttpTimeouts, ServeArgs};
pub use state::AppState;

use crate::engine::served::Served;
use crate::takedown::worker::Takedowns;

/// The application: routes, OpenAI-shaped 404/405s, request metrics and logging, and a panic
/// boundary around each request.
pub fn app(
    state: web::Data<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    app_with(state, |_| {})
}

/// [`app`] with more services registered by `extra` (tests add failing routes through it);
/// they sit behind the same middleware, with `route="other"` in the metrics.
pub fn app_with(
    state: web::Data<AppState>,
    extra: impl FnOnce(&mut web::ServiceConfig),
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .configure(routes::register)
        .configure(extra)
        .default_service(web::to(routes::not_found))
        .wrap_fn(|req, srv| {
            use actix_web::dev::Service;
            use futures_util::FutureExt;
            let state = req.app_data::<web::Data<AppState>>().cloned();
            // Labels from fixed sets only: a client must not be able to mint new series.
            let method = metrics::method_label(req.method());
            let route = metrics::route_label(req.match_pattern().as_deref());
            let start = Instant::now();
            // Decremented on drop, so a request whose client went away is not counted forever.
            let in_flight = state.as_ref().map(|s| InFlight::new(&s.metrics));
            // A panic fails this request alone: it is caught whether it happens while the
            // handler's future is made or while it is polled, answered 500 and counted. The
            // request is not cloned beforehand (routing needs it unshared), so the 500 is an
            // `Err` that actix renders with `ApiError`'s body.
            let fut = std::panic::catch_unwind(AssertUnwindSafe(|| srv.call(req)));
            async move {
                let caught = match fut {
                    Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                    Err(panic) => Err(panic),
                };
                let res = caught.unwrap_or_else(|panic| {
                    let reason = crate::supervise::panic_message(panic.as_ref());
                    tracing::error!(%method, route, panic = %reason, "a request handler panicked; answered 500");
                    if let Some(s) = &state {
                        s.metrics.panics.with_label_values(&["http"]).inc();
                    }
                    Err(error::ApiError::Internal(
                        "the request failed on an internal error (a panic, logged by the server); \
                         this is a bug in lethe"
                            .into(),
                    )
                    .into())
                });
                let status = match &res {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => e.as_response_error().status_code().as_u16(),
                };
                let secs = start.elapsed().as_secs_f64();
                drop(in_flight);
                if let Some(s) = &state {
                    s.metrics
                        .request_duration
                        .with_label_values(&[route, method, status.to_string().as_str()])
                        .observe(secs);
                }
                tracing::info!(%method, %route, status, ms = secs * 1e3, "request");
                res
            }
        })
}

/// One request counted in `lethe_requests_in_flight` until dropped.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(m: &crate::metrics::Metrics) -> Self {
        m.requests_in_flight.inc();
        Self(m.requests_in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The HTTP server for `state` bound to `addrs`, with lethe's connection limits: the request
/// head must arrive within `timeouts.header_read` (else 408 and close), idle keep-alive
/// connections close after `timeouts.keep_alive`, and a closing connection is dropped after
/// `timeouts.disconnect`. Bodies have their own timeout ([`body`]). Returns the server (run it
/// by awaiting or spawning it, inside an actix system) and the bound addresses.
pub fn http_server(
    state: web::Data<AppState>,
    addrs: &[SocketAddr],
    workers: usize,
    shutdown_timeout: u64,
    timeouts: &HttpTimeouts,
) -> anyhow::Result<(actix_web::dev::Server, Vec<SocketAddr>)> {
    let server = HttpServer::new(move || app(state.clone()))
        .on_connect(peer::on_connect)
        .workers(workers)
        .shutdown_timeout(shutdown_timeout)
        .client_request_timeout(timeouts.header_read)
        .keep_alive(timeouts.keep_alive)
        .client_disconnect_timeout(timeouts.disconnect)
        .bind(addrs)
        .with_context(|| format!("binding {addrs:?}"))?;
    let bound = server.addrs();
    Ok((server.run(), bound))
}

/// Loads the live version, starts the engine and the takedown worker, and serves until
/// SIGTERM/SIGINT; then drains in-flight requests, stops the worker and the audit jobs (a running job goes
/// back to the queue) and exits.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    tracing::info!(?config, "starting");
    let device = crate::runtime::parse_device(&config.model.device)?;
    let spec = config.model.spec()?;
    let model_dir = crate::loader::resolve(&spec).with_context(|| format!("--model {spec}"))?;
    // The data dir remembers which version is live; a first start imports --model as the root.
    let live_dir = match &config.takedown.fleet {
        Some(f) => crate::takedown::versions::resolve_current_fleet(
            &config.takedown.data_dir,
            &model_dir,
            f,
        )
        .with_context(|| format!("joining the fleet at {:?}", f.database_url))?,
        None => crate::takedown::versions::resolve_current(&config.takedown.data_dir, &model_dir)
            .with_context(|| format!("opening --data-dir {}", config.data_dir.display()))?,
    };
    let dtype = config
        .dtype
        .resolve(&live_dir)
        .with_context(|| format!("--dtype {:?}", config.dtype))?;
    let mut config = config;
    config.takedown.serve_dtype = dtype;
    let lm = crate::loader::load_dir(&live_dir, &spec, &device, dtype)
        .with_context(|| format!("loading {}", live_dir.display()))?;
    tracing::info!(?dtype, stored = %lm.stored_dtype, "weights loaded");
    let name = config.served_model_name.clone().or_else(|| {
        model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    });
    let read = |f: &Option<std::path::PathBuf>| {
        f.as_deref()
            .map(|p| crate::unlearn::pipeline::read_sequences(p, &lm.tokenizer))
            .transpose()
    };
    let ta = &config.takedown_args;
    let data = crate::unlearn::pipeline::Datasets::for_model(
        &live_dir,
        read(&ta.retain_data)?,
        read(&ta.eval_data)?,
        read(&ta.canary_data)?.unwrap_or_default(),
        lm.model.spec().context_length,
    )?;
    let served = Served::new(lm, name).context("hashing the model files into a version id")?;
    tracing::info!(model = %served.name, version = %served.version, "model loaded");
    let state = AppState::new(
        served,
        config.engine.clone(),
        config.auth.clone(),
        config.limits.clone(),
    );
    let td = Takedowns::open(
        config.takedown.clone(),
        data,
        state.live.clone(),
        state.metrics.clone(),
    )?;
    if !td.can_unlearn() {
        tracing::warn!("no retain set (--retain-data): takedowns are refused until one is given");
    }
    let jobs = crate::audit::jobs::AuditJobs::open(
        config.audits.clone(),
        state.live.clone(),
        state.metrics.clone(),
    )
    .with_context(|| format!("opening the audit jobs in {}", config.data_dir.display()))?;
    let state = web::Data::new(state.with_takedowns(td).with_audits(jobs));
    if let Some(td) = &state.takedowns {
        td.start();
    }
    if let Some(jobs) = &state.audits {
        jobs.start();
    }
    if let Some(warning) = config.auth.open_admin_warning() {
        tracing::warn!("{warning}");
    }
    actix_web::rt::System::new().block_on(async move {
        let (server, addrs) = http_server(
            state.clone(),
            &config.bind,
            config.http_workers,
            config.shutdown_timeout,
            &config.timeouts,
        )?;
        for addr in addrs {
            tracing::info!(%addr, "listening");
            eprintln!("lethe: listening on http://{addr}");
        }
        server.await.context("HTTP server")?;
        tracing::info!("HTTP server stopped; stopping the worker and draining the engine");
        if let Some(td) = &state.takedowns {
            td.shutdown();
        }
        if let Some(jobs) = &state.audits {
            jobs.shutdown();
        }
        state.engine.shutdown();
        anyhow::Ok(())
    })
}
