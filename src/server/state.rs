//! What the server shares between handlers: the live model version, the engine, metrics, keys
//! and limits.
//!
//! Invariants:
//! - A handler loads the live [`Served`] once ([`AppState::served`]) and runs the whole request
//!   on it; [`crate::engine::served`] states why a swap cannot change it underneath.
//! - No handler writes [`AppState::live`] itself: the only publishers are in
//!   [`crate::takedown::worker`] (a job's promotion, and the rollback that
//!   `POST /v1/admin/rollback` calls), and both move the store's pointer before the live one.
//! - [`AppState::new`] sets the model metrics for the version it publishes, so `/metrics` names
//!   the live version from the first scrape on.
//! - [`AppState::audits`] is `None` unless audit jobs are enabled (`lethe serve` enables them);
//!   the `/v1/audits` routes then answer 503.
//! - [`AppState::takedowns`] is `None` unless takedowns are enabled; the takedown and version
//!   routes then answer 503, and completions run without the regurgitation guard.

use std::sync::Arc;

use super::auth::Auth;
use crate::audit::jobs::AuditJobs;
use crate::engine::batcher::{EngineConfig, EngineHandle};
use crate::engine::served::{Live, Served};
use crate::metrics::Metrics;
use crate::takedown::worker::Takedowns;

/// Request limits. `--max-body-bytes`, `--max-audit-sequences` and `--body-read-timeout-seconds`
/// set three of them; `max_prompts` (64), `max_n` (16) and `max_logprobs` (20) have no flag
/// and keep their defaults, which `docs/api.md` lists.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_audit_sequences: usize,
    pub max_prompts: usize,
    pub max_n: usize,
    pub max_logprobs: usize,
    /// Time a handler waits for the whole request body before answering 408.
    pub body_read_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_audit_sequences: 256,
            max_prompts: 64,
            max_n: 16,
            max_logprobs: 20,
            body_read_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Shared server state.
pub struct AppState {
    /// The live version, shared with the takedown worker and the auditor.
    pub live: Arc<Live>,
    pub engine: EngineHandle,
    pub metrics: Metrics,
    pub auth: Auth,
    pub limits: Limits,
    /// The takedown subsystem (durable queue, guard, worker), when enabled.
    pub takedowns: Option<Arc<Takedowns>>,
    /// Audit jobs over whole datasets (`/v1/audits`), when enabled.
    pub audits: Option<Arc<AuditJobs>>,
}

impl AppState {
    /// Starts the engine on `served` and publishes it as the live version.
    pub fn new(served: Served, engine: EngineConfig, auth: Auth, limits: Limits) -> Self {
        let metrics = Metrics::new();
        metrics.set_model(&served.version, served.architecture());
        let served = Arc::new(served);
        let engine = EngineHandle::start(engine, metrics.clone());
        Self {
            live: Arc::new(Live::new(served)),
            engine,
            metrics,
            auth,
            limits,
            takedowns: None,
            audits: None,
        }
    }

    /// Enables audit jobs (call before serving, then [`AuditJobs::start`]); `audits` must have
    /// been opened on this state's [`AppState::live`].
    pub fn with_audits(mut self, audits: AuditJobs) -> Self {
        self.audits = Some(Arc::new(audits));
        self
    }

    /// Enables takedowns (call before serving, then [`Takedowns::start`]). `takedowns` must have
    /// been opened on this state's [`AppState::live`] and [`AppState::metrics`].
    pub fn with_takedowns(mut self, takedowns: Takedowns) -> Self {
        self.takedowns = Some(Arc::new(takedowns));
        self
    }

    /// The regurgitation guard as an engine output filter, when takedowns are enabled.
    pub fn guard_filter(&self) -> Option<crate::engine::generate::Filter> {
        self.takedowns.as_ref().map(|t| t.filter())
    }

    /// The live version; keep the returned `Arc` for the whole request.
    pub fn served(&self) -> Arc<Served> {
        self.live.served()
    }
}
