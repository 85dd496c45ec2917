//! What the server shares between handlers: the live model version behind one atomic pointer,
//! the engine, metrics, keys and limits.
//!
//! Invariants:
//! - A request loads the live [`Served`] once and runs to its end on that version, whatever
//!   swaps happen meanwhile: the pointer is replaced whole (`ArcSwap`), never mutated, and the
//!   old version lives as long as a request holds it.
//! - The live pointer follows the store's current-version pointer: a publisher (a takedown job
//!   or a rollback) first moves the store's pointer by compare-and-swap from the version it
//!   started from, in one transaction, and only a publisher that won publishes in memory; one
//!   that lost changes nothing.
//! - A [`Served`]'s version id is the content hash of its directory's config and weights, so
//!   the same weights always carry the same id in responses, metrics and the store.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::auth::Auth;
use super::engine::EngineHandle;
use super::metrics::Metrics;
use crate::error::Result;
use crate::loader::LoadedModel;
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// One immutable model version being served. Requests load the pointer once and keep this
/// `Arc` until they finish, so a swap never changes the weights under a running request.
pub struct Served {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The name clients put in `model` (the directory name unless configured).
    pub name: String,
    /// Content hash of config and weights (hex, 16 characters).
    pub version: String,
    /// Unix time the version was loaded.
    pub created: u64,
    /// The directory the weights were loaded from.
    pub dir: std::path::PathBuf,
}

impl Served {
    /// Wraps a loaded model, hashing its directory's files into the version id.
    pub fn new(lm: LoadedModel, name: Option<String>) -> Result<Self> {
        let version = crate::takedown::versions::content_hash(&lm.dir)?;
        let name = name.unwrap_or_else(|| {
            lm.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| lm.source.clone())
        });
        Ok(Self {
            model: lm.model,
            tokenizer: lm.tokenizer,
            name,
            version,
            created: unix_now(),
            dir: lm.dir,
        })
    }

    pub fn architecture(&self) -> &'static str {
        self.model.spec().architecture.model_type()
    }
}

/// Request limits (all configurable).
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
    pub current: ArcSwap<Served>,
    pub engine: EngineHandle,
    pub metrics: Metrics,
    pub auth: Auth,
    pub limits: Limits,
    /// The takedown subsystem (durable queue, guard, worker), when enabled.
    pub takedowns: Option<Arc<super::takedowns::Takedowns>>,
}

impl AppState {
    /// Starts the engine on `served` and publishes it as the live version.
    pub fn new(
        served: Served,
        engine: super::engine::EngineConfig,
        auth: Auth,
        limits: Limits,
    ) -> Self {
        let metrics = Metrics::new();
        metrics.set_model(&served.version, served.architecture());
        let served = Arc::new(served);
        let engine = EngineHandle::start(engine, metrics.clone());
        Self {
            current: ArcSwap::new(served),
            engine,
            metrics,
            auth,
            limits,
            takedowns: None,
        }
    }

    /// Enables takedowns (call before serving, then [`super::takedowns::Takedowns::start`]).
    pub fn with_takedowns(mut self, takedowns: super::takedowns::Takedowns) -> Self {
        self.takedowns = Some(Arc::new(takedowns));
        self
    }

    /// The regurgitation guard as an engine output filter, when takedowns are enabled.
    pub fn guard_filter(&self) -> Option<crate::engine::generate::Filter> {
        self.takedowns.as_ref().map(|t| t.filter())
    }

    /// The live version; keep the returned `Arc` for the whole request.
    pub fn served(&self) -> Arc<Served> {
        self.current.load_full()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
