//! `lethe serve`: the HTTP sidecar.
//!
//! actix workers only parse, authenticate and route; every forward pass runs on the engine
//! thread ([`engine`]), fed by a bounded queue. The live model is one `ArcSwap<Served>`:
//! a request loads it once and finishes on that version. See `docs/api.md` for the routes and
//! `docs/metrics.md` for the metrics.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{web, App, HttpServer};
use anyhow::Context;

pub mod auth;
pub mod body;
pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod state;

pub use config::{Config, ServeArgs};
pub use state::{AppState, Served};

/// The application: routes, OpenAI-shaped 404/405s, request metrics and logging.
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
    App::new()
        .app_data(state)
        .configure(routes::register)
        .default_service(web::to(routes::not_found))
        .wrap_fn(|req, srv| {
            use actix_web::dev::Service;
            let state = req.app_data::<web::Data<AppState>>().cloned();
            let method = req.method().to_string();
            let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
            let start = Instant::now();
            if let Some(s) = &state {
                s.metrics.requests_in_flight.inc();
            }
            let fut = srv.call(req);
            async move {
                let res = fut.await;
                let status = match &res {
                    Ok(r) => r.status().as_u16(),
                    Err(e) => e.as_response_error().status_code().as_u16(),
                };
                let secs = start.elapsed().as_secs_f64();
                if let Some(s) = &state {
                    s.metrics.requests_in_flight.dec();
                    s.metrics
                        .request_duration
                        .with_label_values(&[&route, &method, &status.to_string()])
                        .observe(secs);
                }
                tracing::info!(%method, %route, status, ms = secs * 1e3, "request");
                res
            }
        })
}

/// Loads the model, starts the engine and serves until SIGTERM/SIGINT, then drains.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    tracing::info!(?config, "starting");
    let lm = config.model.load()?;
    let served = Served::new(lm, config.served_model_name.clone())
        .context("hashing the model files into a version id")?;
    tracing::info!(model = %served.name, version = %served.version, "model loaded");
    let state = web::Data::new(AppState::new(
        served,
        config.engine.clone(),
        config.auth.clone(),
        config.limits.clone(),
    ));
    actix_web::rt::System::new().block_on(async move {
        let server = {
            let state = state.clone();
            HttpServer::new(move || app(state.clone()))
        }
        .workers(config.http_workers)
        .shutdown_timeout(config.shutdown_timeout)
        .bind(config.bind.as_slice())
        .with_context(|| format!("binding {:?}", config.bind))?;
        for addr in server.addrs() {
            tracing::info!(%addr, "listening");
            eprintln!("lethe: listening on http://{addr}");
        }
        server.run().await.context("HTTP server")?;
        tracing::info!("HTTP server stopped; draining the engine");
        state.engine.shutdown();
        anyhow::Ok(())
    })
}
