//! The engine thread: all model compute for HTTP requests runs here, never on an actix worker.
//! Generation is continuously batched: between decode steps the engine admits waiting rows into
//! the running batch of their version (up to `max_batch` rows in all), and rows leave as soon as
//! they finish. What it gains is in `docs/benchmarks.md` ("Serving under load (issue #5)").
//!
//! Invariants:
//! - [`EngineHandle::submit`] never waits for room: with `queue_capacity` jobs waiting it refuses
//!   at once ([`SubmitError::Full`], answered 429), and a shut-down or stopped engine likewise
//!   (503).
//! - Rows of different model versions run in separate batches, so every row runs to its end on
//!   the version its job named.
//! - A row's events come in generation order, and nothing follows its `Done` or `Failed`; a
//!   scoring job gets one reply.
//! - A row whose receiver was dropped (its client left) is dropped before admission, or cancelled
//!   at the next token the engine tries to send it.
//! - Every unit of work (admitting rows, one decode step, a scoring job) runs under
//!   [`supervise::catch`]: a panic fails the scoring job, or every row of the batch it hit (the
//!   batch is rebuilt empty; rows still waiting are kept), is counted in
//!   `lethe_panics_total{component="engine"}`, and the engine goes on with the next unit.
//! - [`EngineHandle::is_alive`] is false once the thread has ended for any reason, so `/livez`
//!   can ask the orchestrator for a restart. Shutdown refuses new jobs and lets the engine
//!   finish every job already queued before the thread ends.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc as tmpsc, oneshot};

use super::served::Served;
use crate::engine::generate::{DecodeBatch, Event};
use crate::engine::{self, GenerateRequest, Generation, Score};
use crate::metrics::Metrics;
use crate::supervise::{self, FaultPoint, Faults};

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Jobs that may wait in the queue before requests get 429.
    pub queue_capacity: usize,
    /// Sequences scored together (echo / perplexity requests).
    pub score_batch: usize,
    /// Fault injection for tests (never set in production).
    pub faults: Faults,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            queue_capacity: 256,
            score_batch: 32,
            faults: Faults::default(),
        }
    }
}

/// Why [`EngineHandle::submit`] refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full")]
    Full,
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the engine has stopped")]
    Stopped,
}

/// What a generation row reports back to its request.
#[derive(Debug, Clone)]
pub enum RowEvent {
    Token {
        index: usize,
        token: u32,
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    },
    Done {
        index: usize,
        generation: Generation,
    },
    /// The engine failed (a bug); the request should answer 500.
    Failed { message: String },
}

/// Work for the engine.
pub enum Job {
    /// Generate every request (its index in `reqs` is the event's `index`).
    Generate {
        served: Arc<Served>,
        reqs: Vec<GenerateRequest>,
        events: tmpsc::UnboundedSender<RowEvent>,
    },
    /// Score token sequences (per-token log-probabilities).
    Score {
        served: Arc<Served>,
        seqs: Vec<Vec<u32>>,
        reply: oneshot::Sender<Result<Vec<Score>, String>>,
    },
    /// Other model work on the engine thread, in turn with traffic: an audit's single
    /// pass (`audit::audit_with`), which the engine does not know. It reports through its own
    /// channel; a panic is caught and counted, and drops that channel (the waiting side sees
    /// it closed).
    Run(Box<dyn FnOnce() + Send>),
}

/// The handlers' side of the engine.
pub struct EngineHandle {
    jobs: Mutex<Option<SyncSender<Job>>>,
    probes: SyncSender<oneshot::Sender<()>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    alive: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    /// Set by the engine while it honours `paused`.
    holding: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Starts the engine thread.
    pub fn start(config: EngineConfig, metrics: Metrics) -> Self {
        let (jobs_tx, jobs_rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let (probe_tx, probe_rx) = mpsc::sync_channel(64);
        let alive = Arc::new(AtomicBool::new(true));
        let paused = Arc::new(AtomicBool::new(false));
        let holding = Arc::new(AtomicBool::new(false));
        let engine = Engine {
            paused: paused.clone(),
            holding: holding.clone(),
            config,
            metrics,
            jobs: jobs_rx,
            probes: probe_rx,
            waiting: VecDeque::new(),
            groups: Vec::new(),
            routes: HashMap::new(),
            next_id: 0,
        };
        let flag = alive.clone();
        let thread = std::thread::Builder::new()
            .name("lethe-engine".into())
            .spawn(move || {
                // Cleared however the thread ends, a panic outside the supervised units included.
                let _dead = ClearOnDrop(flag);
                engine.run();
            })
            .expect("spawning the engine thread");
        Self {
            jobs: Mutex::new(Some(jobs_tx)),
            probes: probe_tx,
            thread: Mutex::new(Some(thread)),
            alive,
            paused,
            holding,
        }
    }

    /// Queues a job, or refuses it at once (the HTTP layer answers 429 for a full queue, 503
    /// for a stopped engine).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let guard = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(SubmitError::ShuttingDown);
        };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }

    /// False once the engine thread has ended (after shutdown, or if it died).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// True when the engine thread answers within `timeout`.
    pub async fn probe(&self, timeout: Duration) -> bool {
        if !self.alive.load(Ordering::SeqCst) {
            return false;
        }
        let (tx, rx) = oneshot::channel();
        if self.probes.try_send(tx).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Holds (or releases) the engine between steps: queued work waits and probes go
    /// unanswered, so readiness turns false. For maintenance and tests. Holding returns once
    /// the engine has stopped taking work (or after 10 s if it is stuck in a long step).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while paused
            && self.alive.load(Ordering::SeqCst)
            && !self.holding.load(Ordering::SeqCst)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops accepting jobs, lets the engine finish what it holds, and joins it.
    pub fn shutdown(&self) {
        self.set_paused(false);
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            if t.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

/// Clears a flag when dropped, also while unwinding.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where a row's events go.
struct Route {
    events: tmpsc::UnboundedSender<RowEvent>,
    /// The version the row runs on, and whether it is in that version's batch yet.
    served: Arc<Served>,
    admitted: bool,
    index: usize,
    queued: Instant,
    last_token: Option<Instant>,
}

/// A row waiting for a batch slot.
struct Pending {
    id: u64,
    served: Arc<Served>,
    req: GenerateRequest,
}

/// A request tagged with its row id.
type Tagged = (u64, GenerateRequest);

/// The running batch of one model version.
struct Group {
    served: Arc<Served>,
    batch: DecodeBatch,
}

struct Engine {
    paused: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
    config: EngineConfig,
    metrics: Metrics,
    jobs: mpsc::Receiver<Job>,
    probes: mpsc::Receiver<oneshot::Sender<()>>,
    waiting: VecDeque<Pending>,
    groups: Vec<Group>,
    routes: HashMap<u64, Route>,
    next_id: u64,
}

impl Engine {
    fn run(mut self) {
        let mut open = true;
        loop {
            if self.paused.load(Ordering::SeqCst) {
                self.holding.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            self.holding.store(false, Ordering::SeqCst);
            while let Ok(p) = self.probes.try_recv() {
                let _ = p.send(());
            }
            let busy = !self.waiting.is_empty() || self.groups.iter().any(|g| !g.batch.is_empty());
            if !busy {
                if !open {
                    break;
                }
                match self.jobs.recv_timeout(Duration::from_millis(50)) {
                    Ok(job) => self.accept(job),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        continue;
                    }
                }
            }
            // Pull more work while there is room for it to wait.
            while open && self.waiting.len() < self.config.max_batch {
                match self.jobs.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            self.admit();
            self.step();
            self.groups.retain(|g| !g.batch.is_empty());
            self.metrics.queue_depth.set(self.waiting.len() as i64);
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Generate {
                served,
                reqs,
                events,
            } => {
                let queued = Instant::now();
                for (index, req) in reqs.into_iter().enumerate() {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.routes.insert(
                        id,
                        Route {
                            events: events.clone(),
                            served: served.clone(),
                            admitted: false,
                            index,
                            queued,
                            last_token: None,
                        },
                    );
                    self.waiting.push_back(Pending {
                        id,
                        served: served.clone(),
                        req,
                    });
                }
            }
            Job::Score {
                served,
                seqs,
                reply,
            } => {
                self.metrics.batch_size.observe(seqs.len() as f64);
                let (faults, batch) = (&self.config.faults, self.config.score_batch);
                let out = supervise::catch("engine", || {
                    faults.at(FaultPoint::EngineScore { sequences: &seqs });
                    engine::score(&served.model, &seqs, batch).map_err(|e| e.to_string())
                })
                .unwrap_or_else(|panic| {
                    self.metrics.panics.with_label_values(&["engine"]).inc();
                    Err(format!("the engine failed on this request ({panic})"))
                });
                let _ = reply.send(out);
            }
            Job::Run(work) => {
                if supervise::catch("engine", work).is_err() {
                    self.metrics.panics.with_label_values(&["engine"]).inc();
                }
            }
        }
    }

    fn running(&self) -> usize {
        self.groups.iter().map(|g| g.batch.len()).sum()
    }

    /// Moves waiting rows into their version's batch while there is room.
    fn admit(&mut self) {
        let room = self.config.max_batch.saturating_sub(self.running());
        if room == 0 || self.waiting.is_empty() {
            return;
        }
        let take = room.min(self.waiting.len());
        let mut by_version: Vec<(Arc<Served>, Vec<Tagged>)> = Vec::new();
        for p in self.waiting.drain(..take) {
            // Rows whose client already left are dropped before any compute.
            if self.routes.get(&p.id).is_some_and(|r| r.events.is_closed()) {
                self.routes.remove(&p.id);
                continue;
            }
            match by_version
                .iter_mut()
                .find(|(s, _)| Arc::ptr_eq(s, &p.served))
            {
                Some((_, rows)) => rows.push((p.id, p.req)),
                None => by_version.push((p.served, vec![(p.id, p.req)])),
            }
        }
        for (served, rows) in by_version {
            let gi = match self
                .groups
                .iter()
                .position(|g| Arc::ptr_eq(&g.served, &served))
            {
                Some(i) => i,
                None => {
                    self.groups.push(Group {
                        batch: DecodeBatch::new(&served.model),
                        served,
                    });
                    self.groups.len() - 1
                }
            };
            let ids: Vec<u64> = rows.iter().map(|(id, _)| *id).collect();
            for id in &ids {
                if let Some(r) = self.routes.get_mut(id) {
                    r.admitted = true;
                }
            }
            self.metrics.batch_size.observe(rows.len() as f64);
            let mut events = Vec::new();
            let g = &mut self.groups[gi];
            let faults = &self.config.faults;
            let result = supervise::catch("engine", || {
                let prompts: Vec<&[u32]> = rows.iter().map(|(_, r)| r.prompt.as_slice()).collect();
                faults.at(FaultPoint::EngineAdmit { prompts: &prompts });
                g.batch.admit(
                    &g.served.model,
                    Some(&g.served.tokenizer),
                    rows,
                    &mut events,
                )
            });
            match result {
                Ok(result) => {
                    self.route(gi, events);
                    if let Err(e) = result {
                        self.fail(&ids, &e.to_string());
                    }
                }
                Err(panic) => self.reset_group(gi, &panic, true),
            }
        }
    }

    /// One decode step for every running batch.
    fn step(&mut self) {
        for gi in 0..self.groups.len() {
            if self.groups[gi].batch.is_empty() {
                continue;
            }
            self.metrics
                .batch_size
                .observe(self.groups[gi].batch.len() as f64);
            let mut events = Vec::new();
            let g = &mut self.groups[gi];
            let faults = &self.config.faults;
            let result = supervise::catch("engine", || {
                faults.at(FaultPoint::EngineStep);
                g.batch
                    .step(&g.served.model, Some(&g.served.tokenizer), &mut events)
            });
            match result {
                Ok(Ok(())) => self.route(gi, events),
                Ok(Err(e)) => {
                    self.route(gi, events);
                    self.reset_group(gi, &e.to_string(), false);
                }
                Err(panic) => self.reset_group(gi, &panic, true),
            }
        }
    }

    /// After a failure or a caught panic (`panicked`, counted) in a batch: its state is unknown,
    /// so every row admitted to it fails with `message` and the batch starts afresh (rows still
    /// waiting are kept).
    fn reset_group(&mut self, gi: usize, message: &str, panicked: bool) {
        if panicked {
            self.metrics.panics.with_label_values(&["engine"]).inc();
        }
        let g = &mut self.groups[gi];
        g.batch = DecodeBatch::new(&g.served.model);
        let running: Vec<u64> = self
            .routes
            .iter()
            .filter(|(_, r)| r.admitted && Arc::ptr_eq(&r.served, &self.groups[gi].served))
            .map(|(id, _)| *id)
            .collect();
        self.fail(&running, message);
    }

    /// Sends events to their requests; cancels rows whose request is gone.
    fn route(&mut self, gi: usize, events: Vec<Event>) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for ev in events {
            match ev {
                Event::Token {
                    id,
                    token,
                    logprob,
                    top,
                } => {
                    let Some(route) = self.routes.get_mut(&id) else {
                        continue;
                    };
                    self.metrics.generated_tokens.inc();
                    match route.last_token {
                        None => self
                            .metrics
                            .time_to_first_token
                            .observe((now - route.queued).as_secs_f64()),
                        Some(t) => self
                            .metrics
                            .inter_token_latency
                            .observe((now - t).as_secs_f64()),
                    }
                    route.last_token = Some(now);
                    let sent = route.events.send(RowEvent::Token {
                        index: route.index,
                        token,
                        logprob,
                        top,
                    });
                    if sent.is_err() {
                        gone.push(id);
                    }
                }
                Event::Done { id, generation } => {
                    if generation.finish_reason == engine::FinishReason::ContentFilter {
                        self.metrics.guard_blocks.inc();
                    }
                    if let Some(route) = self.routes.remove(&id) {
                        let _ = route.events.send(RowEvent::Done {
                            index: route.index,
                            generation,
                        });
                    }
                }
            }
        }
        if !gone.is_empty() {
            for id in &gone {
                self.routes.remove(id);
            }
            if let Err(e) = self.groups[gi].batch.cancel(&gone) {
                // The batch is reset, so every other row in it fails now rather than waiting
                // for events that will never come.
                let message = format!("cancelling rows failed; the batch was reset: {e}");
                self.reset_group(gi, &message, false);
            }
        }
    }

    fn fail(&mut self, ids: &[u64], message: &str) {
        tracing::error!(error = %message, rows = ids.len(), "engine failure");
        for id in ids {
            if let Some(route) = self.routes.remove(id) {
                let _ = route.events.send(RowEvent::Failed {
                    message: message.to_string(),
                });
            }
        }
    }
}
