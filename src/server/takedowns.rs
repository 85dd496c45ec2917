//! Takedowns: the durable queue, the background unlearning worker, validation gates, the hot
//! swap, rollback and the continuous auditor.
//!
//! Life of a takedown: `POST /v1/takedowns` writes it to SQLite (WAL, synced) and registers its
//! windows with the regurgitation guard before answering 202. The worker claims every queued
//! takedown as one job, runs BalancedSubnet (balanced mode) on the live version, then checks
//! the gates: (a) no takedown sequence is extractable under its definition, (b) held-out
//! perplexity drift within budget (TinyMem: also mean relative accuracy), (c) canaries within
//! budget. A candidate that fails the gates is followed by the next candidate of a small grid
//! while the time budget lasts; if none passes, the job is rejected with the full report and
//! the live model is untouched. A passing model is written as a new version (temp dir, fsync,
//! rename), loaded back, smoke-tested, recorded, and published with one compare-and-swap of the
//! live pointer. Requests in flight finish on the version they started on.
//!
//! Isolation: each job runs under [`supervise::catch`]. A job that panics, fails or is rejected
//! with one takedown ends that takedown (`failed` with the panic's message, or `rejected`); with
//! several, the job is split and each takedown is retried alone, so a bad takedown never blocks
//! or fails the good ones. The worker and auditor threads survive every job; if one of them
//! ends anyway, [`Takedowns::threads_alive`] turns false and `/livez` asks for a restart.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Value};

use super::metrics::Metrics;
use super::state::{content_hash, AppState, Served};
use crate::audit::{self, AuditItem, AuditResult, Definition};
use crate::engine::generate::{Filter, FilterState, OutputFilter};
use crate::error::{Error, Result};
use crate::models::Inputs;
use crate::supervise::{self, FaultPoint, Faults, SetOnDrop};
use crate::takedown::{versions, Checker, Guard, NewVersion, State, Store, Takedown};
use crate::tinymem::data::{Dataset, Role, Split};
use crate::tinymem::train::Card;
use crate::unlearn::cli::{mean_accuracy, quality};
use crate::unlearn::search::Quality;
use crate::unlearn::{balanced_subnet, BalancedSubnetConfig, JobControl, Mode};

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
    /// The first BalancedSubnet configuration tried.
    pub unlearn: BalancedSubnetConfig,
    /// Later candidates as (ratio, w), tried when a candidate fails the gates.
    pub fallbacks: Vec<(f64, f64)>,
    /// Wall-time budget for one job's candidates, in seconds.
    pub budget_seconds: f64,
    /// Largest allowed relative perplexity increase on held-out data (0.02 = +2 %).
    pub perplexity_budget: f64,
    /// TinyMem: largest allowed drop of mean relative test accuracy (0.005 = 0.5 %).
    pub accuracy_budget: f64,
    /// Largest allowed relative perplexity change of the canary set.
    pub canary_budget: f64,
    /// How often the auditor re-audits applied takedowns (it also runs after every swap).
    pub audit_interval: Duration,
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
            unlearn: BalancedSubnetConfig {
                mode: Mode::Balanced,
                ratio: 0.1,
                min_steps: 200,
                ..BalancedSubnetConfig::default()
            },
            fallbacks: vec![(0.3, 0.9), (0.5, 0.95)],
            budget_seconds: 1800.0,
            perplexity_budget: 0.02,
            accuracy_budget: 0.005,
            canary_budget: 0.02,
            audit_interval: Duration::from_secs(300),
            faults: Faults::default(),
        }
    }
}

/// The data the worker trains and validates with.
pub struct Datasets {
    /// Rows to keep working (the retain set).
    pub retain: Vec<Vec<u32>>,
    /// Held-out rows for the perplexity gate (ignored for TinyMem, which uses its test tasks).
    pub heldout: Vec<Vec<u32>>,
    /// Optional canaries whose perplexity must not move beyond budget.
    pub canary: Vec<Vec<u32>>,
    /// The TinyMem dataset, when the model has a TinyMem card.
    pub tinymem: Option<Dataset>,
}

impl Datasets {
    /// TinyMem defaults from the model's card: retain = the clean training rows, held-out =
    /// the test tasks. Other models need `retain` from a file.
    pub fn for_model(
        dir: &Path,
        retain: Option<Vec<Vec<u32>>>,
        heldout: Option<Vec<Vec<u32>>>,
        canary: Vec<Vec<u32>>,
    ) -> Result<Self> {
        let tinymem = Card::read(dir).ok().map(|c| c.dataset()).transpose()?;
        let retain = match (retain, &tinymem) {
            (Some(r), _) => r,
            (None, Some(ds)) => ds
                .rows
                .iter()
                .filter(|r| r.split == Split::Train && r.role == Role::Clean)
                .map(|r| r.ids.clone())
                .collect(),
            (None, None) => Vec::new(),
        };
        let heldout = heldout.unwrap_or_else(|| retain.iter().take(256).cloned().collect());
        Ok(Self {
            retain,
            heldout,
            canary,
            tinymem,
        })
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
}

/// One sequence of a takedown, parsed under its definition.
#[derive(Debug, Clone, Serialize)]
struct Target {
    takedown: String,
    index: usize,
    sha256: String,
    #[serde(skip)]
    sequence: Vec<u32>,
    #[serde(skip)]
    item: AuditItem,
}

/// sha256 of a token sequence (little-endian u32s), hex.
pub fn sequence_sha256(seq: &[u32]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for t in seq {
        h.update(t.to_le_bytes());
    }
    super::state::hex(&h.finalize())
}

fn targets(tds: &[Takedown]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for td in tds {
        let def: Definition = td.definition.parse()?;
        for (index, seq) in td.sequences.iter().enumerate() {
            out.push(Target {
                takedown: td.id.clone(),
                index,
                sha256: sequence_sha256(seq),
                item: def.split(seq)?,
                sequence: seq.clone(),
            });
        }
    }
    Ok(out)
}

/// Before/after numbers of one candidate.
#[derive(Debug, Clone, Serialize)]
struct Evaluation {
    memorized: Vec<bool>,
    matched_prefix: Vec<usize>,
    accuracy: Option<f64>,
    /// Held-out perplexity and per-task accuracies (serialized flat: `perplexity`, ...).
    #[serde(flatten)]
    quality: Quality,
    canary_perplexity: Option<f64>,
}

impl Takedowns {
    /// Opens the store under `config.data_dir`, cleans half-written versions, re-queues jobs
    /// that a crash interrupted, and loads every accepted sequence into the guard.
    pub fn open(config: TakedownConfig, data: Datasets) -> Result<Self> {
        let store = Store::open(&config.data_dir).map_err(|e| store_err(&e))?;
        versions::clean_temp(&config.data_dir).map_err(|e| store_err(&e))?;
        let requeued = store.requeue_interrupted().map_err(|e| store_err(&e))?;
        if requeued > 0 {
            tracing::warn!(requeued, "re-queued takedowns interrupted by a restart");
        }
        let guard = Guard::new(config.guard_window).map_err(|e| store_err(&e))?;
        for seq in store.sequences_to_guard().map_err(|e| store_err(&e))? {
            guard.add(&seq);
        }
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
        })
    }

    /// The guard as an engine output filter for completions.
    pub fn filter(&self) -> Filter {
        Filter(Arc::new(GuardFilter(self.guard.clone())))
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
    pub fn refresh_counts(&self, metrics: &Metrics) {
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
    pub fn start(state: &actix_web::web::Data<AppState>) {
        let Some(td) = state.takedowns.clone() else {
            return;
        };
        let spawn = |name: &str, body: fn(&AppState)| {
            let state = state.clone();
            td.live_threads.fetch_add(1, Ordering::SeqCst);
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    // Counted down however the thread ends, a panic outside a job included.
                    let _ended = ThreadEnded(state.takedowns.clone());
                    body(&state)
                })
                .expect("spawning a takedown thread")
        };
        let worker = spawn("lethe-unlearn", worker_loop);
        let auditor = spawn(AUDITOR_THREAD, auditor_loop);
        if let Ok(mut t) = td.threads.lock() {
            t.push(worker);
            t.push(auditor);
        }
        td.refresh_counts(&state.metrics);
        td.notify();
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

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
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
struct ThreadEnded(Option<Arc<Takedowns>>);

impl Drop for ThreadEnded {
    fn drop(&mut self) {
        if let Some(td) = &self.0 {
            td.live_threads.fetch_sub(1, Ordering::SeqCst);
            if !td.stopping() {
                tracing::error!(
                    thread = std::thread::current().name().unwrap_or("?"),
                    "a takedown thread ended; /livez now fails so the process is restarted"
                );
            }
        }
    }
}

/// The regurgitation guard seen by the engine: each row gets a rolling-hash checker.
struct GuardFilter(Guard);

impl OutputFilter for GuardFilter {
    fn start(&self, prompt: &[u32]) -> Box<dyn FilterState> {
        Box::new(self.0.checker(prompt))
    }
}

impl FilterState for Checker {
    fn push(&mut self, token: u32) -> bool {
        Checker::push(self, token)
    }
}

fn store_err(e: &dyn std::fmt::Display) -> Error {
    Error::Config {
        file: "takedown store".into(),
        message: e.to_string(),
    }
}

fn worker_loop(state: &AppState) {
    let Some(td) = state.takedowns.clone() else {
        return;
    };
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
        td.refresh_counts(&state.metrics);
        let ctl = JobControl::new();
        if let Ok(mut r) = td.running.lock() {
            *r = Some((job.clone(), ctl.clone()));
        }
        tracing::info!(%job, takedowns = claimed.len(), "unlearning job started");
        let started = Instant::now();
        let result = supervise::catch("worker", || {
            pool.install(|| run_job(state, &td, &job, &claimed, &ctl))
        });
        if let Ok(mut r) = td.running.lock() {
            *r = None;
        }
        state
            .metrics
            .unlearn_job_duration
            .observe(started.elapsed().as_secs_f64());
        state.metrics.unlearn_job_progress.set(0.0);
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
                state.metrics.panics.with_label_values(&["worker"]).inc();
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
        td.refresh_counts(&state.metrics);
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

fn evaluate(
    served: &Served,
    targets: &[Target],
    data: &Datasets,
    model: &crate::models::Model,
) -> Result<(Evaluation, Vec<AuditResult>)> {
    let items: Vec<AuditItem> = targets.iter().map(|t| t.item.clone()).collect();
    let (results, _) = audit::audit(model, Some(&served.tokenizer), &items, 64)?;
    let q: Quality = quality(model, data.tinymem.as_ref(), &data.heldout)?;
    let canary_perplexity = if data.canary.is_empty() {
        None
    } else {
        let s = crate::engine::score(model, &data.canary, 32)?;
        Some(s.iter().map(|x| x.perplexity).sum::<f64>() / s.len() as f64)
    };
    Ok((
        Evaluation {
            memorized: results.iter().map(|r| r.memorized).collect(),
            matched_prefix: results.iter().map(|r| r.matched_prefix).collect(),
            accuracy: mean_accuracy(&q),
            quality: q,
            canary_perplexity,
        },
        results,
    ))
}

/// The gates: returns the reasons a candidate fails (empty = it passes).
fn gate_failures(cfg: &TakedownConfig, before: &Evaluation, after: &Evaluation) -> Vec<String> {
    let mut why = Vec::new();
    let still = after.memorized.iter().filter(|m| **m).count();
    if still > 0 {
        why.push(format!(
            "{still} of {} sequences are still extractable",
            after.memorized.len()
        ));
    }
    let drift = after.quality.perplexity / before.quality.perplexity - 1.0;
    // NaN (a diverged model) fails every gate.
    if drift.is_nan() || drift > cfg.perplexity_budget {
        why.push(format!(
            "perplexity drift {:+.3}% is over the budget of {:+.3}%",
            drift * 100.0,
            cfg.perplexity_budget * 100.0
        ));
    }
    if let Some(rel) = before.quality.relative_accuracy_change(&after.quality) {
        if rel.is_nan() || rel < -cfg.accuracy_budget {
            why.push(format!(
                "mean relative accuracy change {:+.3}% is below −{:.3}%",
                rel * 100.0,
                cfg.accuracy_budget * 100.0
            ));
        }
    }
    if let (Some(b), Some(a)) = (before.canary_perplexity, after.canary_perplexity) {
        let d = (a / b - 1.0).abs();
        if d.is_nan() || d > cfg.canary_budget {
            why.push(format!(
                "canary perplexity moved {:.3}%, over the budget of {:.3}%",
                d * 100.0,
                cfg.canary_budget * 100.0
            ));
        }
    }
    why
}

fn run_job(
    state: &AppState,
    td: &Takedowns,
    job: &str,
    claimed: &[Takedown],
    ctl: &JobControl,
) -> Result<JobEnd> {
    let base = state.served();
    let targets = targets(claimed)?;
    let forget: Vec<Vec<u32>> = targets.iter().map(|t| t.sequence.clone()).collect();
    td.config.faults.at(FaultPoint::Job { sequences: &forget });
    let items: Vec<AuditItem> = targets.iter().map(|t| t.item.clone()).collect();
    // Progress only moves forward, across candidates too.
    let high_water = Mutex::new(0.0f64);
    let set_phase = |phase: &str, progress: f64, eta: Option<f64>| {
        let progress = {
            let mut hw = high_water.lock().unwrap_or_else(|e| e.into_inner());
            *hw = hw.max(progress);
            *hw
        };
        if let Err(e) = td.store.set_progress(job, phase, Some(progress), eta) {
            tracing::warn!(error = %e, "recording progress failed");
        }
        state.metrics.unlearn_job_progress.set(progress);
    };
    set_phase("auditing", 0.0, None);
    let (before, before_results) = evaluate(&base, &targets, &td.data, &base.model)?;
    let mut candidates: Vec<BalancedSubnetConfig> = vec![td.config.unlearn.clone()];
    for &(ratio, w) in &td.config.fallbacks {
        candidates.push(BalancedSubnetConfig {
            ratio,
            w,
            ..td.config.unlearn.clone()
        });
    }
    let start = Instant::now();
    let mut tried = Vec::new();
    for (ci, cfg) in candidates.iter().enumerate() {
        if td.stopping() {
            return Ok(JobEnd::Interrupted);
        }
        if ci > 0 && start.elapsed().as_secs_f64() > td.config.budget_seconds {
            break;
        }
        // Progress reporter: copies the job's step counter into the store once a second and
        // cancels the job when all its takedowns were cancelled.
        let done = Arc::new(AtomicBool::new(false));
        let reporter = {
            let (done, ctl) = (done.clone(), ctl.clone());
            let (ci, n) = (ci, candidates.len());
            let t0 = Instant::now();
            std::thread::scope(|s| {
                let h = s.spawn(|| {
                    while !done.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(500));
                        let p = ctl.progress();
                        let frac = if p.total_steps > 0 {
                            p.step as f64 / p.total_steps as f64
                        } else {
                            0.0
                        };
                        let eta = (p.step > 0).then(|| {
                            t0.elapsed().as_secs_f64() / p.step as f64
                                * (p.total_steps.saturating_sub(p.step)) as f64
                        });
                        // Each candidate owns an equal share of the 0..0.9 unlearning span.
                        set_phase(
                            &format!("unlearning (candidate {} of {n})", ci + 1),
                            (ci as f64 + frac.min(1.0)) / n as f64 * 0.9,
                            eta,
                        );
                        td.cancel_check();
                    }
                });
                // Set even if the unlearning panics, so the reporter ends and the scope can unwind.
                let _done = SetOnDrop(&done);
                let out = balanced_subnet(&base.model, &forget, &td.data.retain, &items, cfg, &ctl);
                drop(_done);
                let _ = h.join();
                out
            })
        };
        let out = reporter?;
        if let Err(e) = td.store.mark_validating(job) {
            tracing::warn!(error = %e, "marking the job validating failed");
        }
        set_phase(
            "validating",
            (ci + 1) as f64 / candidates.len() as f64 * 0.9,
            None,
        );
        let (after, after_results) = evaluate(&base, &targets, &td.data, &out.model)?;
        let failures = gate_failures(&td.config, &before, &after);
        let report = json!({
            "job": job,
            "candidate": ci,
            "config": cfg,
            "steps": out.steps,
            "unlearn_seconds": out.seconds,
            "weights_zeroed": out.zeros_per_matrix.iter().map(|(a, b)| a + b).sum::<usize>(),
            "before": before,
            "after": after,
            "gates_failed": failures,
            "base_version": base.version,
            "sequences": targets.iter().zip(before_results.iter().zip(&after_results)).map(|(t, (b, a))| json!({
                "takedown": t.takedown, "index": t.index, "sha256": t.sha256,
                "before": {"memorized": b.memorized, "matched_prefix": b.matched_prefix, "match_fraction": b.match_fraction},
                "after": {"memorized": a.memorized, "matched_prefix": a.matched_prefix, "match_fraction": a.match_fraction},
            })).collect::<Vec<_>>(),
        });
        if !failures.is_empty() {
            tracing::warn!(candidate = ci, ?failures, "candidate failed the gates");
            tried.push(report);
            if ci + 1 < candidates.len() {
                if let Err(e) = td.store.mark_running(job) {
                    tracing::warn!(error = %e, "marking the job running again failed");
                }
            }
            continue;
        }
        set_phase("publishing", 0.96, None);
        let swap_start = Instant::now();
        let mut report = report;
        report["rejected_candidates"] = json!(tried);
        let Some(version) = publish(state, td, job, &base, &out.model, &report)? else {
            // The live version moved (a rollback) while the job ran: its result edits a
            // version that is no longer live, so the takedowns go back to the queue and the
            // next job unlearns them on top of the new live version.
            tracing::warn!(%job, "the live version changed during the job; re-queued");
            return Ok(JobEnd::Interrupted);
        };
        state
            .metrics
            .model_swap_duration
            .observe(swap_start.elapsed().as_secs_f64());
        return Ok(JobEnd::Applied { version });
    }
    let reason = tried
        .last()
        .and_then(|r| r["gates_failed"].as_array().cloned())
        .map(|v| {
            v.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|| "no candidate finished within the budget".into());
    Ok(JobEnd::Rejected {
        reason,
        report: json!({ "candidates": tried, "base_version": base.version }),
    })
}

/// Writes, reloads and smoke-tests a new version; then, in one store transaction, registers
/// it, moves the live pointer from `base` to it (compare-and-swap) and marks the job's takedowns
/// applied; then publishes it in memory. `None` when the compare-and-swap lost: the live
/// version is no longer `base` (the new version stays on disk, unreferenced by the pointer).
fn publish(
    state: &AppState,
    td: &Takedowns,
    job: &str,
    base: &Arc<Served>,
    model: &crate::models::Model,
    report: &Value,
) -> Result<Option<String>> {
    let (id, path) = versions::write_version(&td.config.data_dir, &base.dir, model.named_tensors())
        .map_err(|e| store_err(&e))?;
    let lm = crate::loader::load_dir(
        &path,
        &path.display().to_string(),
        model.device(),
        DType::F32,
    )?;
    smoke_test(&lm.model)?;
    let served = Served::new(lm, Some(base.name.clone()))?;
    if served.version != id {
        return Err(store_err(&format!(
            "version {id} reloaded with a different hash {}",
            served.version
        )));
    }
    let mut report = report.clone();
    report["version"] = json!(id);
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
        Err(e) => return Err(store_err(&e)),
    }
    swap(state, td, base, Arc::new(served), "promote");
    Ok(Some(id))
}

/// One forward pass: the weights load and compute finite logits.
pub fn smoke_test(model: &crate::models::Model) -> Result<()> {
    let ids = Tensor::new(&[[1u32, 2, 3]], model.device())?;
    let logits = model.forward(&Inputs::causal(&ids, 0)?, None, None)?;
    let v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(store_err(
            &"smoke test: the new weights give non-finite logits",
        ))
    }
}

/// Publishes `new` in memory (the store already moved its pointer): compare-and-swap on the
/// live `Arc`, so a request keeps the version it loaded.
pub fn swap(
    state: &AppState,
    td: &Takedowns,
    expected: &Arc<Served>,
    new: Arc<Served>,
    kind: &str,
) {
    let prev = state.current.compare_and_swap(expected, new.clone());
    if !Arc::ptr_eq(&prev, expected) {
        // The store is the authority and has moved; memory follows it.
        tracing::warn!(live = %prev.version, "the live version changed during a swap");
        state.current.store(new.clone());
    }
    state.metrics.set_model(&new.version, new.architecture());
    tracing::info!(from = %expected.version, to = %new.version, kind, "model version swapped");
    td.notify();
}

fn auditor_loop(state: &AppState) {
    let Some(td) = state.takedowns.clone() else {
        return;
    };
    let mut seen = 0;
    let mut last_version = String::new();
    let mut last_run: Option<Instant> = None;
    while !td.stopping() {
        let live = state.served();
        let due = last_run.is_none_or(|t| t.elapsed() >= td.config.audit_interval);
        if due || live.version != last_version {
            match supervise::catch("auditor", || audit_once(state, &td, &live)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "continuous audit failed"),
                Err(_) => state.metrics.panics.with_label_values(&["auditor"]).inc(),
            }
            last_version = live.version.clone();
            last_run = Some(Instant::now());
        }
        td.wait(
            &mut seen,
            Duration::from_secs(1).min(td.config.audit_interval),
        );
    }
}

/// Re-audits every applied takedown (and the canaries) on the live version; sets the gauges.
fn audit_once(state: &AppState, td: &Takedowns, live: &Served) -> Result<()> {
    let applied = td
        .store
        .list(None, usize::MAX, Some(State::Applied))
        .map_err(|e| store_err(&e))?;
    let t = targets(&applied)?;
    let m = &state.metrics;
    if !t.is_empty() {
        let items: Vec<AuditItem> = t.iter().map(|x| x.item.clone()).collect();
        let (_, summary) = audit::audit(&live.model, None, &items, 64)?;
        m.memorization_ratio
            .with_label_values(&["takedowns"])
            .set(summary.rate);
    } else {
        m.memorization_ratio
            .with_label_values(&["takedowns"])
            .set(0.0);
    }
    if !td.data.heldout.is_empty() || td.data.tinymem.is_some() {
        let q = quality(&live.model, td.data.tinymem.as_ref(), &td.data.heldout)?;
        m.perplexity
            .with_label_values(&["heldout"])
            .set(q.perplexity);
        if let Some(root_ppl) = root_perplexity(td, &live.version) {
            m.perplexity_drift.set(q.perplexity / root_ppl - 1.0);
        }
    }
    if !td.data.canary.is_empty() {
        let s = crate::engine::score(&live.model, &td.data.canary, 32)?;
        m.perplexity
            .with_label_values(&["canary"])
            .set(s.iter().map(|x| x.perplexity).sum::<f64>() / s.len() as f64);
    }
    Ok(())
}

/// Held-out perplexity of the root version: recorded as `before.perplexity` in the report of
/// the first version promoted on the live version's lineage. `None` while the root is live
/// and nothing was measured yet (the drift gauge then stays at 0).
fn root_perplexity(td: &Takedowns, live: &str) -> Option<f64> {
    let all = td.store.list_versions().ok()?;
    let mut cur = all.iter().find(|v| v.id == live)?;
    let mut found = None;
    while let Some(parent) = cur.parent.as_deref() {
        found = cur.metrics["before"]["perplexity"].as_f64().or(found);
        cur = all.iter().find(|v| v.id == parent)?;
    }
    found
}

/// Registers the served base model as the root version (first start), or loads the current
/// version recorded in the store (restarts). Returns the directory to serve.
///
/// A data directory belongs to one model lineage: starting it with a different base model
/// (`--model`) than the one it was created with is refused, since its versions and takedowns
/// are edits of that model. Version directories are found under the data directory by id, so
/// a restored or moved data directory works from any path.
pub fn resolve_current(config: &TakedownConfig, model_dir: &Path) -> Result<PathBuf> {
    let store = Store::open(&config.data_dir).map_err(|e| store_err(&e))?;
    if let Some(cur) = store.current_version().map_err(|e| store_err(&e))? {
        let versions = store.list_versions().map_err(|e| store_err(&e))?;
        let base = content_hash(model_dir)?;
        if let Some(root) = versions.iter().find(|v| v.parent.is_none()) {
            if root.id != base {
                return Err(Error::Config {
                    file: config.data_dir.display().to_string(),
                    message: format!(
                        "this data directory belongs to base model version {} but --model {} \
                         is version {base}; use the original model or another --data-dir",
                        root.id,
                        model_dir.display()
                    ),
                });
            }
        }
        let dir = versions::version_dir(&config.data_dir, &cur);
        if !dir.is_dir() {
            return Err(Error::Config {
                file: dir.display().to_string(),
                message: format!(
                    "the live version {cur} has no directory (restore it from a backup)"
                ),
            });
        }
        return Ok(dir);
    }
    let (id, path) =
        versions::import_base(&config.data_dir, model_dir).map_err(|e| store_err(&e))?;
    store
        .insert_version(NewVersion {
            id: id.clone(),
            parent: None,
            takedowns: Vec::new(),
            metrics: json!({}),
            path: path.display().to_string(),
        })
        .map_err(|e| store_err(&e))?;
    store.set_current(None, &id).map_err(|e| store_err(&e))?;
    Ok(path)
}

/// `POST /v1/admin/rollback`: makes the ancestor version `to` live if `expected` is live now
/// (compare-and-swap). Takedowns applied by the versions left behind return to `queued` in the
/// same store transaction; the guard keeps protecting them and the worker re-applies them on
/// top of `to` (cancel them to stop that). Returns (new live version, previous, re-queued).
pub fn rollback(
    state: &AppState,
    to: &str,
    expected: &str,
) -> std::result::Result<(String, String, usize), super::error::ApiError> {
    use super::error::ApiError;
    let td = state
        .takedowns
        .clone()
        .ok_or_else(|| ApiError::Unavailable("takedowns are not enabled".into()))?;
    let started = Instant::now();
    let live = state.served();
    if live.version != expected {
        return Err(ApiError::Conflict {
            message: format!("the live version is {}, not {expected}", live.version),
            code: "version_mismatch",
        });
    }
    if to == expected {
        return Ok((to.to_string(), expected.to_string(), 0));
    }
    let target = td.store.get_version(to).map_err(api_error)?;
    let dir = versions::version_dir(&td.config.data_dir, &target.id);
    let lm = crate::loader::load_dir(
        &dir,
        &dir.display().to_string(),
        live.model.device(),
        DType::F32,
    )?;
    smoke_test(&lm.model)?;
    let new = Arc::new(Served::new(lm, Some(live.name.clone()))?);
    let requeued = td.store.rollback(expected, to).map_err(api_error)?;
    swap(state, &td, &live, new, "rollback");
    state
        .metrics
        .model_swap_duration
        .observe(started.elapsed().as_secs_f64());
    td.refresh_counts(&state.metrics);
    td.notify();
    Ok((to.to_string(), expected.to_string(), requeued))
}

/// The HTTP answer for a store error.
pub fn api_error(e: crate::takedown::Error) -> super::error::ApiError {
    use super::error::ApiError;
    use crate::takedown::Error as E;
    match e {
        E::NotFound(id) => ApiError::NotFound {
            message: format!("no takedown {id:?}"),
            param: None,
            code: "takedown_not_found",
        },
        E::VersionNotFound(id) => ApiError::NotFound {
            message: format!("no version {id:?}"),
            param: Some("to_version".into()),
            code: "version_not_found",
        },
        E::IdempotencyConflict { key, existing_id } => ApiError::Conflict {
            message: format!(
                "Idempotency-Key {key:?} was already used by takedown {existing_id} for a \
                 different request"
            ),
            code: "idempotency_key_reused",
        },
        E::NotCancellable { id, state } => ApiError::Conflict {
            message: format!("takedown {id} is {state} and can no longer be cancelled"),
            code: "not_cancellable",
        },
        E::VersionConflict { expected, actual } => ApiError::Conflict {
            message: format!(
                "the live version is {}, not the expected {}",
                actual.as_deref().unwrap_or("none"),
                expected.as_deref().unwrap_or("none")
            ),
            code: "version_mismatch",
        },
        E::InvalidInput { field, message } => ApiError::invalid(field, message),
        e if e.is_disk_full() => {
            tracing::error!(error = %e, "the data directory's disk is full");
            ApiError::Unavailable(
                "the data directory's disk is full: nothing was stored; retry once the \
                 operator has freed space"
                    .into(),
            )
        }
        other => ApiError::Internal(other.to_string()),
    }
}

/// Reads a JSONL file of `{"text"}` or `{"ids"}` rows (a TinyMem data header line is skipped)
/// into token sequences; errors name the file and line.
pub fn read_sequences(path: &Path, tk: &crate::tokenizer::Tokenizer) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| Error::invalid(at(), e.to_string()))?;
        if v.get("format").is_some() {
            continue;
        }
        let ids = if let Some(ids) = v.get("ids") {
            serde_json::from_value::<Vec<u32>>(ids.clone())
                .map_err(|e| Error::invalid(at(), format!("ids: {e}")))?
        } else if let Some(t) = v.get("text").and_then(Value::as_str) {
            tk.encode(t)?
        } else {
            return Err(Error::invalid(at(), "expected {\"text\"} or {\"ids\"}"));
        };
        if ids.len() >= 2 {
            out.push(ids);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name)
    }

    #[test]
    fn a_full_disk_is_a_503_that_says_so_not_a_500() {
        use actix_web::ResponseError;
        let full = crate::takedown::Error::Io {
            op: "write",
            path: "/data/lethe.sqlite3".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let e = api_error(full);
        assert_eq!(e.status_code().as_u16(), 503);
        assert!(e.to_string().contains("disk is full"), "{e}");
        let other = api_error(crate::takedown::Error::Corrupt {
            what: "x".into(),
            message: "y".into(),
        });
        assert_eq!(other.status_code().as_u16(), 500);
    }

    #[test]
    fn a_moved_data_dir_still_resolves_and_another_base_model_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let first = tmp.path().join("first");
        let noise = bundled("tinymem-noise");
        let dir = resolve_current(&TakedownConfig::new(first.clone()), &noise).unwrap();
        assert!(dir.starts_with(&first) && dir.join("config.json").is_file());
        // A restore to another path (the store recorded the old one).
        let moved = tmp.path().join("restored");
        std::fs::rename(&first, &moved).unwrap();
        let cfg = TakedownConfig::new(moved.clone());
        let dir = resolve_current(&cfg, &noise).unwrap();
        assert!(dir.starts_with(&moved) && dir.join("config.json").is_file());
        // The same data dir with a different base model.
        let err = resolve_current(&cfg, &bundled("tinymem-backdoor"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to base model"), "{err}");
    }

    use crate::server::auth::Auth;
    use crate::server::engine::EngineConfig;
    use crate::server::state::Limits;
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

    #[test]
    fn a_job_whose_base_is_no_longer_live_is_not_published() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = TakedownConfig::new(tmp.path().to_path_buf());
        let noise = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinymem-noise");
        let live = resolve_current(&cfg, &noise).unwrap();
        let lm =
            crate::loader::load_dir(&live, "live", &candle_core::Device::Cpu, DType::F32).unwrap();
        let data = Datasets::for_model(&live, None, None, Vec::new()).unwrap();
        let served = Served::new(lm, None).unwrap();
        let auth = Auth {
            api_key: None,
            admin_key: None,
            loopback_only: true,
        };
        let state = AppState::new(served, EngineConfig::default(), auth, Limits::default())
            .with_takedowns(Takedowns::open(cfg, data).unwrap());
        let td = state.takedowns.clone().unwrap();
        let v0 = state.served();
        let job = |name: &str| {
            let new = NewTakedown {
                sequences: vec![vec![1, 2, 3]],
                definition: "tinymem".into(),
                reason: None,
                requester: None,
            };
            let (t, _) = td.store.create(new, None).unwrap();
            td.store.claim_queued(name, 1).unwrap();
            td.store.mark_validating(name).unwrap();
            t.id
        };
        let a = job("j1");
        let v1 = publish(&state, &td, "j1", &v0, &scaled(&v0.model, 0.5), &json!({}))
            .unwrap()
            .expect("the first job publishes");
        assert_eq!(state.served().version, v1);
        assert_eq!(td.store.get(&a).unwrap().state, State::Applied);
        // A second job that started on v0 finishes after v1 went live.
        let b = job("j2");
        let lost = publish(&state, &td, "j2", &v0, &scaled(&v0.model, 0.25), &json!({})).unwrap();
        assert_eq!(lost, None);
        assert_eq!(state.served().version, v1);
        assert_eq!(
            td.store.current_version().unwrap().as_deref(),
            Some(v1.as_str())
        );
        assert_eq!(td.store.get(&b).unwrap().state, State::Validating);
        td.store.requeue_job("j2").unwrap();
        assert_eq!(td.store.get(&b).unwrap().state, State::Queued);
    }
}
