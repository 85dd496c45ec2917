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
pub mod takedowns;

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

/// Loads the live version, starts the engine and the takedown worker, and serves until
/// SIGTERM/SIGINT; then drains in-flight requests, stops the worker (a running job goes back
/// to the queue) and exits.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    tracing::info!(?config, "starting");
    let device = crate::runtime::parse_device(&config.model.device)?;
    let spec = config.model.spec()?;
    let model_dir = crate::loader::resolve(&spec).with_context(|| format!("--model {spec}"))?;
    // The data dir remembers which version is live; a first start imports --model as the root.
    let live_dir = takedowns::resolve_current(&config.takedown, &model_dir)
        .with_context(|| format!("opening --data-dir {}", config.data_dir.display()))?;
    let lm = crate::loader::load_dir(&live_dir, &spec, &device, candle_core::DType::F32)
        .with_context(|| format!("loading {}", live_dir.display()))?;
    let name = config.served_model_name.clone().or_else(|| {
        model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    });
    let read = |f: &Option<std::path::PathBuf>| {
        f.as_deref()
            .map(|p| takedowns::read_sequences(p, &lm.tokenizer))
            .transpose()
    };
    let ta = &config.takedown_args;
    let data = takedowns::Datasets::for_model(
        &live_dir,
        read(&ta.retain_data)?,
        read(&ta.eval_data)?,
        read(&ta.canary_data)?.unwrap_or_default(),
    )?;
    let served = Served::new(lm, name).context("hashing the model files into a version id")?;
    tracing::info!(model = %served.name, version = %served.version, "model loaded");
    let td = takedowns::Takedowns::open(config.takedown.clone(), data)?;
    if !td.can_unlearn() {
        tracing::warn!("no retain set (--retain-data): takedowns are refused until one is given");
    }
    let state = web::Data::new(
        AppState::new(
            served,
            config.engine.clone(),
            config.auth.clone(),
            config.limits.clone(),
        )
        .with_takedowns(td),
    );
    takedowns::Takedowns::start(&state);
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
        tracing::info!("HTTP server stopped; stopping the worker and draining the engine");
        if let Some(td) = &state.takedowns {
            td.shutdown();
        }
        state.engine.shutdown();
        anyhow::Ok(())
    })
}
