//! The takedown subsystem at run time: the worker that turns queued takedowns into published
//! versions, the continuous auditor, and rollback. The HTTP layer only calls into it.
//!
//! The worker claims up to 1,024 queued takedowns (or one marked solo) as one job and runs the
//! unlearning pipeline (`unlearn::pipeline`) on the version that was live when the job started;
//! past the root, the job re-masks the root's weights with the lineage's earlier sequences in
//! its forget set. A passing model is written as a new version, loaded back, smoke-tested and
//! published.
//!
//! Invariants:
//! - A request runs on the version it loaded: a swap, made after the store's pointer moved,
//!   replaces the live `Arc<Served>` whole (compare-and-swap on [`Live`]; memory follows the
//!   store if that loses) and never mutates one a request holds.
//! - A job's result is published only if the store's current version is still the one the job
//!   started on (the compare-and-swap inside [`Store::promote`], which also registers the version
//!   and marks the takedowns applied in one transaction). Otherwise its takedowns are re-queued
//!   for the new live version and the version written for it stays on disk, unreferenced.
//! - Before the store transaction the new version is complete on disk, reloaded with the same
//!   content hash and smoke-tested; a crash before it leaves the old version current and the
//!   job's takedowns re-queued at the next [`Takedowns::open`] (`failed` after
//!   `MAX_INTERRUPTIONS` such crashes), a crash after it the new version current with them
//!   applied.
//! - Only a committed `Store::promote` moves the live version for a job: a job that is rejected,
//!   or fails or panics before it, leaves the live version as it was. With several takedowns, a
//!   failure, rejection or panic splits the job and each takedown is retried alone; with one, a
//!   failure or panic marks it `failed` (it stays guarded).
//! - Each job and each audit pass runs under [`supervise::catch`]; if the worker or the auditor
//!   thread ends anyway, [`Takedowns::threads_alive`] turns false and `/livez` fails.
//! - [`Takedowns::shutdown`] re-queues the running job's takedowns (not counted as a crash); the
//!   auditor only reads the store and sets gauges, after each swap and every `audit_interval`.
//! - [`rollback`] loads and smoke-tests the target before the store's rollback transaction, so
//!   a failure there changes nothing; the takedowns the abandoned versions applied go back to
//!   `queued` and stay guarded.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::DType;
use serde_json::{json, Value};

use crate::audit;
use crate::engine::generate::Filter;
use crate::engine::served::{Live, Served};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::supervise::{self, FaultPoint, Faults, SetOnDrop};
use crate::takedown::fleet::{Fleet, FleetConfig, WorkerLock};
use crate::takedown::{versions, Guard, NewVersion, State, Store, Takedown};
use crate::unlearn::pipeline::{self, Baseline, Datasets, PipelineConfig};
use crate::unlearn::JobControl;

mod auditor;
mod follow;
mod lineage;
use auditor::auditor_loop;
use lineage::{job_parent, lineage_of, root_baseline, version_dir_of};

/// Takedown settings (flags of `lethe serve`).
#[derive(Debug, Clone)]
pub struct TakedownConfig {
    pub data_dir: PathBuf,
    /// Window length of the regurgitation guard, in tokens.
    pub guard_window: usize,
    /// Most sequences in one takedown request.
    pub max_sequences: usize,
    /// Cores the worker may use (a rayon pool of this size).
    pub worker_threads: usize,
    /// The unlearning pipeline: the controller's settings and the gates' budgets.
    pub pipeline: PipelineConfig,
    /// How often the auditor re-audits applied takedowns (it also runs after every swap).
    pub audit_interval: Duration,
    /// The dtype served versions are loaded in (`lethe serve --dtype`, resolved): a new
    /// version is reloaded in it and must pass the forget check in it before it goes live.
    pub serve_dtype: DType,
    /// The corpus the auditor samples every pass (`--audit-corpus`), if any.
    pub corpus: Option<crate::takedown::corpus::CorpusConfig>,
    /// Fleet mode (`--database-url`, `--versions-url`): the shared store and version store.
    pub fleet: Option<FleetConfig>,
    /// Fault injection for tests (never set in production).
    pub faults: Faults,
}

impl TakedownConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            guard_window: 16,
            max_sequences: 64,
            worker_threads: 1,
            pipeline: PipelineConfig::default(),
            audit_interval: Duration::from_secs(300),
            serve_dtype: DType::F32,
            corpus: None,
            fleet: None,
            faults: Faults::default(),
        }
    }
}

/// The auditor thread's name.
const AUDITOR_THREAD: &str = "lethe-auditor";
/// How long shutdown waits for an auditor pass in progress.
const AUDITOR_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The takedown subsystem shared by handlers, the worker and the auditor.
pub struct Takedowns {
    pub store: Store,
    pub guard: Guard,
    pub config: TakedownConfig,
    data: Datasets,
    wake: (Mutex<u64>, Condvar),
    stop: AtomicBool,
    /// The running job: its id and control (cancellation, progress).
    running: Mutex<Option<(String, JobControl)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Worker and auditor threads started and not yet ended.
    live_threads: std::sync::atomic::AtomicUsize,
    /// The gates' quality numbers of one version (its id and them): the auditor measures the
    /// live version, and a job caches what the gates measured on the version it publishes, so
    /// the next job starts without measuring its parent again.
    quality_cache: Mutex<Option<(String, Baseline)>>,
    /// The lineage root's weights (its version id and model), loaded by the first job on a
    /// lineage past the root: jobs re-mask the root's MLP weights (see
    /// `unlearn::controller::run`).
    root_model: Mutex<Option<(String, Arc<crate::models::Model>)>>,
    /// The live version this subsystem publishes to and audits.
    live: Arc<Live>,
    metrics: Metrics,
    /// The corpus the auditor samples every pass (`--audit-corpus`).
    corpus: Option<crate::takedown::corpus::CorpusAudit>,
    /// Fleet mode: the worker lock, the shared version store, the store's freshness.
    pub fleet: Option<Fleet>,
    /// Held while the live version moves (a publish, a rollback, following the fleet), so a
    /// replica never loads one version twice at once.
    moving: Mutex<()>,
    /// Held (for writing) across a store commit that moves the live version and the
    /// in-memory swap after it, so a reader under [`Takedowns::settled`] never sees a takedown
    /// `applied`, or a rollback done, while this replica still serves the version before it.
    committing: std::sync::RwLock<()>,
}

impl Takedowns {
    /// Opens the store under `config.data_dir`, cleans half-written versions, re-queues jobs
    /// that a crash interrupted, and loads every accepted sequence into the guard. Jobs and
    /// rollbacks publish to `live`; the worker and the auditor report to `metrics`.
    pub fn open(
        config: TakedownConfig,
        data: Datasets,
        live: Arc<Live>,
        metrics: Metrics,
    ) -> Result<Self> {
        let fleet = config.fleet.clone().map(Fleet::open).transpose();
        let fleet = fleet.map_err(|e| store_err(&e))?;
        let store = match &config.fleet {
            Some(f) => Store::open_postgres(&f.database_url.0),
            None => Store::open(&config.data_dir),
        }
        .map_err(|e| store_err(&e))?;
        versions::clean_temp(&config.data_dir).map_err(|e| store_err(&e))?;
        // In a fleet, the replica that takes the worker lock re-queues what the last worker
        // left running (worker_loop): other replicas' jobs may be running right now.
        if fleet.is_none() {
            let requeued = store.requeue_interrupted().map_err(|e| store_err(&e))?;
            if requeued > 0 {
                tracing::warn!(requeued, "re-queued takedowns interrupted by a restart");
            }
        }
        let guard = Guard::new(config.guard_window).map_err(|e| store_err(&e))?;
        for seq in store.sequences_to_guard().map_err(|e| store_err(&e))? {
            guard.add(&seq);
        }
        let corpus = match &config.corpus {
            Some(c) => {
                let served = live.served();
                let def = audit::Definition::default_for(served.model.spec().architecture);
                let corpus = crate::takedown::corpus::CorpusAudit::load(
                    &c.path,
                    c.sample,
                    &served.tokenizer,
                    def,
                )?;
                tracing::info!(rows = corpus.len(), sample = c.sample, definition = %def, "audit corpus loaded");
                Some(corpus)
            }
            None => None,
        };
        Ok(Self {
            store,
            guard,
            config,
            data,
            wake: (Mutex::new(0), Condvar::new()),
            stop: AtomicBool::new(false),
            running: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
            live_threads: std::sync::atomic::AtomicUsize::new(0),
            quality_cache: Mutex::new(None),
            root_model: Mutex::new(None),
            live,
            metrics,
            corpus,
            fleet,
            moving: Mutex::new(()),
            committing: std::sync::RwLock::new(()),
        })
    }

    /// Reads the store once no publish or rollback is between its commit and its in-memory
    /// swap: what the read says is live is what this replica serves (read your writes). The
    /// HTTP views of takedowns and versions read through it.
    pub fn settled<T>(&self, read: impl FnOnce(&Store) -> T) -> T {
        let _settled = self.committing.read().unwrap_or_else(|e| e.into_inner());
        read(&self.store)
    }

    /// The guard as an engine output filter for completions.
    pub fn filter(&self) -> Filter {
        self.guard.filter()
    }

    /// Whether the worker has what it needs to unlearn (a retain set).
    pub fn can_unlearn(&self) -> bool {
        !self.data.retain.is_empty()
    }

    /// Wakes the worker and the auditor.
    pub fn notify(&self) {
        let (m, cv) = &self.wake;
        if let Ok(mut n) = m.lock() {
            *n += 1;
        }
        cv.notify_all();
    }

    fn wait(&self, seen: &mut u64, timeout: Duration) {
        let (m, cv) = &self.wake;
        if let Ok(g) = m.lock() {
            let (g, _) = cv
                .wait_timeout_while(g, timeout, |n| {
                    *n == *seen && !self.stop.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|e| e.into_inner());
            *seen = *g;
        }
    }

    /// Asks the running job to stop if every takedown in it was cancelled.
    pub fn cancel_check(&self) {
        let Ok(guard) = self.running.lock() else {
            return;
        };
        if let Some((job, ctl)) = guard.as_ref() {
            let all_cancelled = self
                .store
                .list(None, usize::MAX, None)
                .map(|tds| {
                    let mine: Vec<&Takedown> = tds
                        .iter()
                        .filter(|t| t.job_id.as_deref() == Some(job.as_str()))
                        .collect();
                    !mine.is_empty() && mine.iter().all(|t| t.state == State::Cancelled)
                })
                .unwrap_or(false);
            if all_cancelled {
                ctl.cancel();
            }
        }
    }

    /// Refreshes `lethe_takedowns{state}`.
    pub fn refresh_counts(&self) {
        let metrics = &self.metrics;
        if let Ok(counts) = self.store.counts_by_state() {
            for s in State::ALL {
                let n = counts.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
                metrics
                    .takedowns
                    .with_label_values(&[s.as_str()])
                    .set(n as i64);
            }
        }
    }

    /// Starts the worker and the auditor threads.
    pub fn start(self: &Arc<Self>) {
        let spawn = |name: &str, body: fn(&Takedowns)| {
            let td = Arc::clone(self);
            self.live_threads.fetch_add(1, Ordering::SeqCst);
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    // Counted down however the thread ends, a panic outside a job included.
                    let _ended = ThreadEnded(Arc::clone(&td));
                    body(&td)
                })
                .expect("spawning a takedown thread")
        };
        let mut started = vec![
            spawn("lethe-unlearn", worker_loop),
            spawn(AUDITOR_THREAD, auditor_loop),
        ];
        if self.fleet.is_some() {
            started.push(spawn(follow::THREAD, follow::follow_loop));
        }
        if let Ok(mut t) = self.threads.lock() {
            t.extend(started);
        }
        // On one machine this process is its own worker (fleet mode: worker_loop sets it).
        if self.fleet.is_none() {
            self.metrics.fleet_worker.set(1);
        }
        self.refresh_counts();
        self.notify();
    }

    /// Stops the worker (cancelling a running job, which stays queued for the next start)
    /// and the auditor, and joins them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(g) = self.running.lock() {
            if let Some((_, ctl)) = g.as_ref() {
                ctl.cancel();
            }
        }
        self.notify();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        // The worker is joined: it re-queues its job. The auditor only reads and sets gauges,
        // and a pass over a large held-out set cannot be interrupted: shutdown waits for it a
        // few seconds, then lets the process exit without it.
        let deadline = Instant::now() + AUDITOR_SHUTDOWN_WAIT;
        for t in threads {
            let auditor = t.thread().name() == Some(AUDITOR_THREAD);
            while auditor && !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if auditor && !t.is_finished() {
                tracing::warn!("the auditor is in the middle of a pass; not waiting for it");
                continue;
            }
            let _ = t.join();
        }
    }

    /// The cached quality of `version`, if it is the one cached.
    fn cached_quality(&self, version: &str) -> Option<Baseline> {
        let g = self.quality_cache.lock().ok()?;
        g.as_ref()
            .filter(|(v, _)| v == version)
            .map(|(_, b)| b.clone())
    }

    fn cache_quality(&self, version: &str, b: Baseline) {
        if let Ok(mut g) = self.quality_cache.lock() {
            *g = Some((version.to_string(), b));
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// In a fleet, how long since the store was last read when that is longer than
    /// `--guard-staleness` (the replica is then not ready); `None` when fresh or not in a fleet.
    /// Sets `lethe_fleet_store_staleness_seconds` (each probe and scrape calls it).
    pub fn fleet_stale(&self) -> Option<Duration> {
        let f = self.fleet.as_ref()?;
        let staleness = f.staleness();
        self.metrics.fleet_staleness.set(staleness.as_secs_f64());
        (staleness > f.config.guard_staleness).then_some(staleness)
    }

    /// False when the worker or the auditor thread ended while the service was not stopping
    /// (it should never happen: jobs and audits run supervised). Before [`Takedowns::start`]
    /// there are no threads to lose, and this is true.
    pub fn threads_alive(&self) -> bool {
        let started = self.threads.lock().map_or(0, |t| t.len());
        self.stopping() || self.live_threads.load(Ordering::SeqCst) >= started
    }
}

/// Counts a takedown thread down when it ends.
struct ThreadEnded(Arc<Takedowns>);

impl Drop for ThreadEnded {
    fn drop(&mut self) {
        let td = &self.0;
        td.live_threads.fetch_sub(1, Ordering::SeqCst);
        if !td.stopping() {
            tracing::error!(
                thread = std::thread::current().name().unwrap_or("?"),
                "a takedown thread ended; /livez now fails so the process is restarted"
            );
        }
    }
}

fn store_err(e: &dyn std::fmt::Display) -> Error {
    Error::Config {
        file: "takedown store".into(),
        message: e.to_string(),
    }
}

/// Whether this replica may claim jobs: always on one machine; in a fleet, only while it holds
/// the worker lock. Taking the lock re-queues what the previous worker left running.
fn fleet_worker(td: &Takedowns) -> bool {
    let Some(f) = &td.fleet else {
        return true;
    };
    let state = f.worker_lock();
    td.metrics
        .fleet_worker
        .set(i64::from(state != WorkerLock::Elsewhere));
    match state {
        WorkerLock::Held => true,
        WorkerLock::Elsewhere => false,
        WorkerLock::Acquired => {
            tracing::info!("this replica holds the fleet's worker lock and now runs the jobs");
            match td.store.requeue_interrupted() {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    requeued = n,
                    "re-queued the takedowns the previous worker left running"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "re-queueing the previous worker's takedowns failed")
                }
            }
            td.refresh_counts();
            true
        }
    }
}

fn worker_loop(td: &Takedowns) {
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(td.config.worker_threads.max(1))
        .thread_name(|i| format!("lethe-unlearn-{i}"))
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the unlearning thread pool");
            return;
        }
    };
    let mut seen = 0;
    while !td.stopping() {
        td.config.faults.at(FaultPoint::WorkerLoop);
        if !td.can_unlearn() {
            td.wait(&mut seen, Duration::from_secs(5));
            continue;
        }
        if !fleet_worker(td) {
            td.wait(&mut seen, Duration::from_secs(1));
            continue;
        }
        let job = format!("job_{:016x}", rand::random::<u64>());
        let claimed = match td.store.claim_queued(&job, 1024) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "claiming queued takedowns failed");
                td.wait(&mut seen, Duration::from_secs(5));
                continue;
            }
        };
        if claimed.is_empty() {
            td.wait(&mut seen, Duration::from_secs(2));
            continue;
        }
        td.refresh_counts();
        let ctl = JobControl::new();
        if let Ok(mut r) = td.running.lock() {
            *r = Some((job.clone(), ctl.clone()));
        }
        tracing::info!(%job, takedowns = claimed.len(), "unlearning job started");
        let started = Instant::now();
        let result = supervise::catch("worker", || {
            pool.install(|| run_job(td, &job, &claimed, &ctl))
        });
        if let Ok(mut r) = td.running.lock() {
            *r = None;
        }
        td.metrics
            .unlearn_job_duration
            .observe(started.elapsed().as_secs_f64());
        td.metrics.unlearn_job_progress.set(0.0);
        // With several takedowns in the job, a failure, a rejection or a panic cannot be pinned
        // on one of them: each is retried in a job of its own.
        let several = claimed.len() > 1;
        let split = |why: &str| {
            tracing::warn!(%job, takedowns = claimed.len(), %why, "splitting the job; each takedown is retried alone");
            td.store.split_job(&job, why)
        };
        let outcome = match result {
            Ok(Ok(JobEnd::Applied { version })) => {
                tracing::info!(%job, %version, "takedowns applied");
                Ok(0)
            }
            Ok(Ok(JobEnd::Rejected { reason, .. })) if several => split(&reason),
            Ok(Ok(JobEnd::Rejected { reason, report })) => {
                tracing::warn!(%job, %reason, "takedown job rejected");
                td.store.finish_rejected(&job, &reason, &report)
            }
            Ok(Ok(JobEnd::Interrupted)) => td.store.requeue_job(&job),
            Ok(Err(e)) if ctl.is_cancelled() && td.stopping() => {
                tracing::info!(%job, error = %e, "job interrupted by shutdown; re-queued");
                td.store.requeue_job(&job)
            }
            Ok(Err(_)) if ctl.is_cancelled() => {
                tracing::info!(%job, "job cancelled");
                Ok(0)
            }
            Ok(Err(e)) if several => split(&e.to_string()),
            Ok(Err(e)) => {
                tracing::error!(%job, error = %e, "takedown job failed");
                td.store.finish_failed(&job, &e.to_string())
            }
            Err(panic) => {
                td.metrics.panics.with_label_values(&["worker"]).inc();
                let why = format!("the unlearning job failed on an internal error ({panic})");
                if several {
                    split(&why)
                } else {
                    td.store
                        .finish_failed(&job, &format!("{why}; the sequences stay guarded"))
                }
            }
        };
        if let Err(e) = outcome {
            tracing::error!(%job, error = %e, "recording the job's outcome failed");
        }
        td.refresh_counts();
        td.notify();
    }
}

enum JobEnd {
    /// Published: the store recorded the version, the swap and the applied takedowns at once.
    Applied {
        version: String,
    },
    Rejected {
        reason: String,
        report: Value,
    },
    /// Shutdown arrived between phases: the takedowns go back to the queue.
    Interrupted,
}

fn run_job(td: &Takedowns, job: &str, claimed: &[Takedown], ctl: &JobControl) -> Result<JobEnd> {
    let base = td.live.served();
    let targets = crate::takedown::targets(claimed)?;
    let forget: Vec<Vec<u32>> = targets.iter().map(|t| t.sequence.clone()).collect();
    td.config.faults.at(FaultPoint::Job { sequences: &forget });
    let root = root_baseline(td, &base.version);
    let (root_model, earlier) = lineage_of(td, &base)?;
    let parent_model = job_parent(td, &base)?;
    let parent = td.cached_quality(&base.version);
    let cfg = &td.config.pipeline;
    // Progress only moves forward: the larger of the step and time fractions of the run's
    // budgets, over the 0..0.9 span (publishing takes the rest).
    let high_water = Mutex::new(0.0f64);
    let phase = Mutex::new(String::from("auditing"));
    let report = |progress: f64| {
        let progress = {
            let mut hw = high_water.lock().unwrap_or_else(|e| e.into_inner());
            *hw = hw.max(progress);
            *hw
        };
        let name = phase.lock().map(|p| p.clone()).unwrap_or_default();
        if let Err(e) = td.store.set_progress(job, &name, Some(progress), None) {
            tracing::warn!(error = %e, "recording progress failed");
        }
        td.metrics.unlearn_job_progress.set(progress);
    };
    let on_phase = |name: &str| {
        if let Ok(mut p) = phase.lock() {
            if *p != name {
                *p = name.to_string();
            }
        }
    };
    report(0.0);
    let t0 = Instant::now();
    let done = AtomicBool::new(false);
    let decision = std::thread::scope(|s| {
        // Copies the job's step counter into the store twice a second and cancels the job when
        // all its takedowns were cancelled.
        let h = s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(500));
                let p = ctl.progress();
                let steps = if p.total_steps > 0 {
                    p.step as f64 / p.total_steps as f64
                } else {
                    0.0
                };
                let time = t0.elapsed().as_secs_f64() / cfg.controller.budget_seconds.max(1.0);
                report(steps.max(time).min(1.0) * 0.9);
                td.cancel_check();
                if td.fleet.as_ref().is_some_and(|f| !f.still_worker()) {
                    tracing::error!(%job, "lost the fleet's worker lock; cancelling the job (the next worker re-runs it)");
                    ctl.cancel();
                }
            }
        });
        // Set even if the pipeline panics, so the reporter ends and the scope can unwind.
        let _done = SetOnDrop(&done);
        let out = pipeline::run(
            &parent_model,
            Some(&base.tokenizer),
            &targets,
            &td.data,
            pipeline::Lineage {
                parent: parent.as_ref(),
                root: root.as_ref(),
                root_model: root_model.as_deref(),
                earlier: &earlier,
            },
            cfg,
            ctl,
            &on_phase,
        );
        drop(_done);
        let _ = h.join();
        out
    })?;
    if td.stopping() {
        return Ok(JobEnd::Interrupted);
    }
    let mut report_json = decision.report;
    report_json["job"] = json!(job);
    report_json["base_version"] = json!(base.version);
    // The gates have decided: `running → validating`, the state from which a job is either
    // applied or rejected (`State::can_go_to`).
    if let Err(e) = td.store.mark_validating(job) {
        tracing::warn!(error = %e, "marking the job validating failed");
    }
    if !decision.passed {
        let reason = decision
            .rejection
            .unwrap_or_else(|| "no model passed the gates".into());
        return Ok(JobEnd::Rejected {
            reason,
            report: report_json,
        });
    }
    if decision.unchanged {
        // Nothing was extractable: the takedowns are recorded as applied to the live version,
        // which stays as it is; their sequences stay guarded.
        td.store
            .finish_applied(job, &base.version, &report_json)
            .map_err(|e| store_err(&e))?;
        return Ok(JobEnd::Applied {
            version: base.version.clone(),
        });
    }
    let model = decision.model;
    let items: Vec<_> = targets
        .iter()
        .chain(&earlier)
        .map(|t| t.item.clone())
        .collect();
    let dtype = td.config.serve_dtype;
    if let Some(reason) =
        versions::forget_check_as_served(&base.dir, dtype, &model, &base.tokenizer, &items)
            .map_err(|e| match e {
                crate::takedown::Error::Model(m) => m,
                e => store_err(&e),
            })?
    {
        return Ok(JobEnd::Rejected {
            reason,
            report: report_json,
        });
    }
    let new_quality = decision.quality;
    if let Ok(mut p) = phase.lock() {
        *p = "publishing".into();
    }
    report(0.96);
    let swap_start = Instant::now();
    let Some(version) = publish(td, job, &base, &model, &report_json)? else {
        // The live version moved (a rollback) while the job ran: its result edits a
        // version that is no longer live, so the takedowns go back to the queue and the
        // next job unlearns them on top of the new live version. (Or every takedown was
        // cancelled: then nothing is left to re-queue.)
        tracing::warn!(%job, "the job's result was not published; its live takedowns re-queued");
        return Ok(JobEnd::Interrupted);
    };
    td.metrics
        .model_swap_duration
        .observe(swap_start.elapsed().as_secs_f64());
    if let Some(q) = new_quality {
        td.cache_quality(&version, q);
    }
    Ok(JobEnd::Applied { version })
}

/// Writes, reloads and smoke-tests a new version; then, in one store transaction, registers
/// it, moves the live pointer from `base` to it (compare-and-swap) and marks the job's takedowns
/// applied; then publishes it in memory. `None` when the compare-and-swap lost (the live
/// version is no longer `base`) or every takedown of the job was cancelled meanwhile; either
/// way the new version stays on disk, unreferenced by the pointer, and nothing goes live.
fn publish(
    td: &Takedowns,
    job: &str,
    base: &Arc<Served>,
    model: &crate::models::Model,
    report: &Value,
) -> Result<Option<String>> {
    let (id, path) = versions::write_version(&td.config.data_dir, &base.dir, model.named_tensors())
        .map_err(|e| store_err(&e))?;
    if let Some(f) = &td.fleet {
        // Every replica must be able to fetch the version before the pointer names it.
        f.versions.upload(&id, &path).map_err(|e| store_err(&e))?;
        if !f.still_worker() {
            return Err(store_err(&"lost the fleet's worker lock before publishing"));
        }
    }
    let served = versions::load_served(
        &path,
        &id,
        model.device(),
        td.config.serve_dtype,
        Some(base.name.clone()),
    )?;
    let mut report = report.clone();
    report["version"] = json!(id);
    let _moving = td.moving.lock().unwrap_or_else(|e| e.into_inner());
    let _committing = td.committing.write().unwrap_or_else(|e| e.into_inner());
    let promoted = td.store.promote(
        job,
        Some(&base.version),
        NewVersion {
            id: id.clone(),
            parent: Some(base.version.clone()),
            takedowns: Vec::new(),
            metrics: report.clone(),
            path: path.display().to_string(),
        },
        &report,
    );
    match promoted {
        Ok(_) => {}
        Err(crate::takedown::Error::VersionConflict { .. }) => return Ok(None),
        Err(crate::takedown::Error::NothingToApply { .. }) => {
            tracing::info!(%job, "every takedown was cancelled during the job; nothing published");
            return Ok(None);
        }
        Err(e) => return Err(store_err(&e)),
    }
    swap(td, base, Arc::new(served), "promote");
    Ok(Some(id))
}

/// Publishes `new` in memory (the store already moved its pointer): compare-and-swap on the
/// live `Arc`, so a request keeps the version it loaded.
fn swap(td: &Takedowns, expected: &Arc<Served>, new: Arc<Served>, kind: &str) {
    if let Err(prev) = td.live.replace(expected, new.clone()) {
        // The store is the authority and has moved; memory follows it.
        tracing::warn!(live = %prev.version, "the live version changed during a swap");
        td.live.set(new.clone());
    }
    td.metrics.set_model(&new.version, new.architecture());
    tracing::info!(from = %expected.version, to = %new.version, kind, "model version swapped");
    td.notify();
}

/// Makes the ancestor version `to` live if `expected` is live now (compare-and-swap), for
/// `POST /v1/admin/rollback`. Takedowns applied by the versions left behind return to `queued`
/// in the same store transaction; the guard keeps protecting them and the worker re-applies
/// them on top of `to` (cancel them to stop that). Returns (new live version, previous,
/// re-queued).
pub fn rollback(
    td: &Takedowns,
    to: &str,
    expected: &str,
) -> crate::takedown::Result<(String, String, usize)> {
    let started = Instant::now();
    let live = td.live.served();
    if live.version != expected {
        return Err(crate::takedown::Error::VersionConflict {
            expected: Some(expected.to_string()),
            actual: Some(live.version.clone()),
        });
    }
    if to == expected {
        return Ok((to.to_string(), expected.to_string(), 0));
    }
    let target = td.store.get_version(to)?;
    let new = Arc::new(versions::load_served(
        &version_dir_of(td, &target.id)?,
        &target.id,
        live.model.device(),
        td.config.serve_dtype,
        Some(live.name.clone()),
    )?);
    let _moving = td.moving.lock().unwrap_or_else(|e| e.into_inner());
    let committing = td.committing.write().unwrap_or_else(|e| e.into_inner());
    let requeued = td.store.rollback(expected, to)?;
    swap(td, &live, new, "rollback");
    drop(committing);
    td.metrics
        .model_swap_duration
        .observe(started.elapsed().as_secs_f64());
    td.refresh_counts();
    td.notify();
    Ok((to.to_string(), expected.to_string(), requeued))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditItem;
    use std::path::Path;

    use crate::engine::generate::{generate, GenerateRequest};
    use crate::takedown::NewTakedown;

    /// The bundled model with every MLP weight scaled by `f`: distinct weights per `f`.
    fn scaled(model: &crate::models::Model, f: f64) -> crate::models::Model {
        let w = model.mlp_weights();
        let w = crate::models::MlpWeights(
            w.0.iter()
                .map(|(a, b)| ((a * f).unwrap(), (b * f).unwrap()))
                .collect(),
        );
        model.with_mlp_weights(&w).unwrap()
    }

    /// Takedowns (worker not started) over the bundled model imported into `tmp`, served in
    /// `dtype`.
    fn takedowns_on_bundled(tmp: &Path, dtype: DType) -> (Takedowns, Arc<Live>) {
        let mut cfg = TakedownConfig::new(tmp.to_path_buf());
        cfg.serve_dtype = dtype;
        let noise = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinymem-noise");
        let live = versions::resolve_current(&cfg.data_dir, &noise).unwrap();
        let lm = crate::loader::load_dir(&live, "live", &candle_core::Device::Cpu, dtype).unwrap();
        let context = lm.model.spec().context_length;
        let data = Datasets::for_model(&live, None, None, Vec::new(), context).unwrap();
        let live = Arc::new(Live::new(Arc::new(Served::new(lm, None).unwrap())));
        let td = Takedowns::open(cfg, data, live.clone(), Metrics::new()).unwrap();
        (td, live)
    }

    /// A takedown of one sequence claimed by job `job` and moved to validating: its id.
    fn validating_in_job(td: &Takedowns, job: &str) -> String {
        let new = NewTakedown {
            sequences: vec![(0..120).map(|i| 1 + i % 12).collect()],
            definition: "tinymem".into(),
            reason: None,
            requester: None,
        };
        let (t, _) = td.store.create(new, None).unwrap();
        td.store.claim_queued(job, 1).unwrap();
        td.store.mark_validating(job).unwrap();
        t.id
    }

    #[test]
    fn a_job_whose_base_is_no_longer_live_is_not_published() {
        let tmp = tempfile::tempdir().unwrap();
        let (td, live) = takedowns_on_bundled(tmp.path(), DType::F32);
        let v0 = live.served();
        let job = |name: &str| validating_in_job(&td, name);
        let a = job("j1");
        let v1 = publish(&td, "j1", &v0, &scaled(&v0.model, 0.5), &json!({}))
            .unwrap()
            .expect("the first job publishes");
        assert_eq!(live.served().version, v1);
        assert_eq!(td.store.get(&a).unwrap().state, State::Applied);
        // The next job on v1 re-masks the root's weights (v0's, loaded from its version
        // directory) with the sequences v1 applied in its forget set; on the root there is no
        // lineage behind it.
        let (root, earlier) = lineage_of(&td, &live.served()).unwrap();
        let flat = |m: &crate::models::Model| -> Vec<f32> {
            m.mlp_weights()
                .0
                .iter()
                .flat_map(|(a, b)| {
                    let mut v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                    v.extend(b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    v
                })
                .collect()
        };
        let root = root.expect("v1 is past the root");
        assert_eq!(flat(&root), flat(&v0.model));
        // Only the MLP is the root's own: every other tensor is the served model's.
        let mlp: Vec<String> = root
            .mlp_weight_names()
            .into_iter()
            .flat_map(|(a, b)| [a, b])
            .collect();
        let served = live.served();
        for ((n, a), (_, b)) in root
            .named_tensors()
            .iter()
            .zip(served.model.named_tensors())
        {
            assert_eq!(a.id() == b.id(), !mlp.contains(n), "{n}");
        }
        assert_eq!(earlier.len(), 1);
        assert_eq!(earlier[0].takedown, a);
        assert_eq!(earlier[0].sequence, td.store.get(&a).unwrap().sequences[0]);
        let (root, earlier) = lineage_of(&td, &v0).unwrap();
        assert!(root.is_none() && earlier.is_empty());
        // A second job that started on v0 finishes after v1 went live.
        let b = job("j2");
        let lost = publish(&td, "j2", &v0, &scaled(&v0.model, 0.25), &json!({})).unwrap();
        assert_eq!(lost, None);
        assert_eq!(live.served().version, v1);
        assert_eq!(
            td.store.current_version().unwrap().as_deref(),
            Some(v1.as_str())
        );
        assert_eq!(td.store.get(&b).unwrap().state, State::Validating);
        td.store.requeue_job("j2").unwrap();
        assert_eq!(td.store.get(&b).unwrap().state, State::Queued);
    }

    /// A reader under `settled` never sees a publish between its store commit and its swap:
    /// while a read is open the publish waits, and once it is done the store and the served
    /// model agree. (The GET views read through `settled`; without it a client could see its
    /// takedown `applied` while this replica still served the version before it.)
    #[test]
    fn a_settled_read_sees_the_store_and_the_served_model_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let (td, live) = takedowns_on_bundled(tmp.path(), DType::F32);
        let v0 = live.served();
        let a = validating_in_job(&td, "j1");
        let next = scaled(&v0.model, 0.5);
        std::thread::scope(|s| {
            let publisher = td.settled(|store| {
                let publisher = s.spawn(|| publish(&td, "j1", &v0, &next, &json!({})));
                // Long past what writing, loading and committing the small model takes.
                std::thread::sleep(Duration::from_millis(1500));
                assert_eq!(
                    store.current_version().unwrap().as_deref(),
                    Some(v0.version.as_str()),
                    "the publish committed while a settled read was open"
                );
                assert_eq!(store.get(&a).unwrap().state, State::Validating);
                assert_eq!(live.served().version, v0.version);
                publisher
            });
            let v1 = publisher.join().unwrap().unwrap().expect("published");
            td.settled(|store| {
                assert_eq!(store.current_version().unwrap(), Some(v1.clone()));
                assert_eq!(store.get(&a).unwrap().state, State::Applied);
                assert_eq!(live.served().version, v1);
            });
        });
    }

    /// A job whose every takedown was cancelled while it ran publishes nothing: no version is
    /// registered and the live one stays.
    #[test]
    fn a_job_whose_takedowns_were_all_cancelled_publishes_no_version() {
        let tmp = tempfile::tempdir().unwrap();
        let (td, live) = takedowns_on_bundled(tmp.path(), DType::F32);
        let v0 = live.served();
        let t = validating_in_job(&td, "j1");
        td.store.cancel(&t).unwrap();
        let out = publish(&td, "j1", &v0, &scaled(&v0.model, 0.5), &json!({})).unwrap();
        assert_eq!(out, None);
        assert_eq!(live.served().version, v0.version);
        assert_eq!(td.store.list_versions().unwrap().len(), 1);
        assert_eq!(td.store.get(&t).unwrap().state, State::Cancelled);
    }

    /// A server holding its weights in bf16: a job starts from the live version's f32 copy,
    /// lineage roots are read in f32 (not shared with the bf16 tensors), published and
    /// rolled-back versions go live in bf16, and the forget check runs on the weights as
    /// served (here a sequence the model itself continues, extractable in any precision).
    #[test]
    fn a_server_holding_bf16_weights_trains_in_f32_and_serves_bf16() {
        let tmp = tempfile::tempdir().unwrap();
        let (td, live) = takedowns_on_bundled(tmp.path(), DType::BF16);
        let v0 = live.served();
        assert_eq!(v0.model.weight_dtype(), DType::BF16);
        let parent = job_parent(&td, &v0).unwrap();
        assert_eq!(parent.weight_dtype(), DType::F32);

        // The model's own greedy continuation is extractable; f32 on disk and in memory skips
        // the check, bf16 in memory runs it and names the dtypes.
        let prompt: Vec<u32> = (0..32).map(|i| 1 + i % 12).collect();
        let out = generate(
            &parent,
            None,
            &[GenerateRequest::greedy(prompt.clone(), 48)],
        )
        .unwrap();
        let item = AuditItem {
            prompt,
            target: out[0].tokens.clone(),
        };
        let check = |dtype| {
            versions::forget_check_as_served(
                &v0.dir,
                dtype,
                &parent,
                &v0.tokenizer,
                std::slice::from_ref(&item),
            )
            .unwrap()
        };
        assert_eq!(check(DType::F32), None);
        let reason = check(DType::BF16).expect("still extractable in bf16");
        assert!(
            reason.contains("1 of 1") && reason.contains("BF16"),
            "{reason}"
        );

        validating_in_job(&td, "j1");
        let v1 = publish(&td, "j1", &v0, &scaled(&parent, 0.5), &json!({}))
            .unwrap()
            .expect("published");
        assert_eq!(live.served().model.weight_dtype(), DType::BF16);
        let (root, _) = lineage_of(&td, &live.served()).unwrap();
        let root = root.expect("v1 is past the root");
        assert_eq!(root.weight_dtype(), DType::F32);
        rollback(&td, &v0.version, &v1).unwrap();
        assert_eq!(live.served().version, v0.version);
        assert_eq!(live.served().model.weight_dtype(), DType::BF16);
    }
}
