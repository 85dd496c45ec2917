//! Running audit jobs: [`run_job`] audits one claimed job chunk by chunk (the server's job thread
//! and `lethe audit` both call it), and [`AuditJobs`] is the server's service: the store, the
//! uploads folder, and one background thread with its own rayon pool that runs queued jobs
//! oldest first.
//!
//! Invariants:
//! - Jobs run on the `lethe-audit-jobs` thread and its pool of `--audit-threads` threads, never on
//!   the engine thread: traffic keeps its own compute while a corpus is audited.
//! - Between chunks the job checks whether it was cancelled (a chunk is refused by the store once
//!   it is) and whether the service is stopping (the job is then put back in the queue and
//!   resumes at its next start). A panic or error in a job fails that job alone.
//! - A job's dataset is hashed again before it starts or resumes; a file that changed fails the
//!   job with an error saying so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::store::{AuditJob, JobState, JobStore, NewJob, ResultRow};
use super::{for_each_row, sha256_file, DataRow, JobSpec, CHUNK_ROWS};
use crate::audit::{audit_with, AuditOptions, AuditResult};
use crate::engine::served::{Live, Served};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How the server runs audit jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobsConfig {
    /// The data directory: the store, and uploads under `audits/`.
    pub data_dir: PathBuf,
    /// Threads of the jobs' own pool.
    pub threads: usize,
    /// The directory server-side datasets must lie under; `None`: uploads only.
    pub allowed_dir: Option<PathBuf>,
    /// The largest upload accepted, in bytes.
    pub max_upload_bytes: u64,
}

/// What ended a run of [`run_job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    Completed,
    Cancelled,
    /// The caller asked to stop; the job is still `running` in the store.
    Stopped,
}

/// Runs a job the caller has claimed (it is `running`) on `served` until it completes, is
/// cancelled or `stop` says so; `progress` sees the job after each chunk. Marks it `completed`;
/// an error is the caller's to record ([`JobStore::finish`] with `failed`).
pub fn run_job(
    store: &JobStore,
    job: &AuditJob,
    served: &Served,
    stop: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(&AuditJob),
) -> Result<RunEnd> {
    let dataset = Path::new(&job.dataset);
    let sha = sha256_file(dataset)?;
    if sha != job.dataset_sha256 {
        return Err(Error::invalid(
            "dataset",
            format!(
                "{} changed since the job was accepted (SHA-256 {} then, {sha} now); submit a new job",
                job.dataset, job.dataset_sha256
            ),
        ));
    }
    let mut job = store.pin_version(&job.id, &served.version)?;
    progress(&job);
    let spec = job.spec.clone();
    let opts = AuditOptions {
        batch_size: spec.batch_size,
        generate: false,
        risk: spec.risk.clone(),
    };
    let mut summary = job.summary.clone();
    let mut chunk: Vec<DataRow> = Vec::with_capacity(CHUNK_ROWS);
    let mut end = RunEnd::Completed;
    let mut flush = |chunk: &mut Vec<DataRow>, job: &mut AuditJob| -> Result<bool> {
        if chunk.is_empty() {
            return Ok(true);
        }
        let started = Instant::now();
        let verdicts = audit_chunk(served, &spec, &opts, chunk)?;
        let first = job.rows_done;
        let mut rows = Vec::with_capacity(chunk.len());
        let mut next = summary.clone();
        for (i, (row, v)) in chunk.iter().zip(&verdicts).enumerate() {
            next.add(&spec.definitions, &row.groups, v);
            rows.push(result_row(first + i as u64, row, &spec, v)?);
        }
        if !store.record_chunk(
            &job.id,
            first,
            &rows,
            &next,
            started.elapsed().as_secs_f64(),
        )? {
            return Ok(false);
        }
        summary = next;
        chunk.clear();
        *job = store
            .get(&job.id)?
            .ok_or_else(|| Error::invalid("job", "vanished from the store"))?;
        progress(job);
        Ok(true)
    };
    let context = served.model.spec().context_length;
    for_each_row(
        dataset,
        &spec,
        &served.tokenizer,
        context,
        job.rows_done,
        |row| {
            chunk.push(row);
            if chunk.len() < CHUNK_ROWS {
                return Ok(true);
            }
            if !flush(&mut chunk, &mut job)? {
                end = RunEnd::Cancelled;
                return Ok(false);
            }
            if stop() {
                end = RunEnd::Stopped;
                return Ok(false);
            }
            Ok(true)
        },
    )?;
    if end == RunEnd::Completed && !flush(&mut chunk, &mut job)? {
        end = RunEnd::Cancelled;
    }
    if end == RunEnd::Completed {
        store.finish(&job.id, JobState::Completed, None)?;
    }
    Ok(end)
}

/// Each row's verdicts, one per definition in `spec` order.
fn audit_chunk(
    served: &Served,
    spec: &JobSpec,
    opts: &AuditOptions,
    chunk: &[DataRow],
) -> Result<Vec<Vec<AuditResult>>> {
    let mut out: Vec<Vec<AuditResult>> =
        vec![Vec::with_capacity(spec.definitions.len()); chunk.len()];
    for d in 0..spec.definitions.len() {
        let items: Vec<_> = chunk.iter().map(|r| r.items[d].clone()).collect();
        let (results, _) = audit_with(&served.model, Some(&served.tokenizer), &items, opts)?;
        for (o, r) in out.iter_mut().zip(results) {
            o.push(r);
        }
    }
    Ok(out)
}

fn result_row(
    index: u64,
    row: &DataRow,
    spec: &JobSpec,
    verdicts: &[AuditResult],
) -> Result<ResultRow> {
    let mut results = serde_json::Map::new();
    for (d, v) in spec.definitions.iter().zip(verdicts) {
        let v = serde_json::to_value(v)
            .map_err(|e| Error::invalid("result", format!("cannot encode a verdict: {e}")))?;
        results.insert(d.to_string(), v);
    }
    let groups = row
        .groups
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    Ok(ResultRow {
        row: index,
        line: row.line,
        groups,
        results,
    })
}

/// The server's audit-job service.
pub struct AuditJobs {
    pub store: JobStore,
    pub config: JobsConfig,
    live: Arc<Live>,
    metrics: Metrics,
    stopping: AtomicBool,
    wake: (Mutex<u64>, Condvar),
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AuditJobs {
    /// Opens the store in `config.data_dir` and requeues the jobs a crash interrupted;
    /// `lethe_audit_jobs{state}` and `lethe_audit_job_rows_total` go to `metrics`.
    pub fn open(config: JobsConfig, live: Arc<Live>, metrics: Metrics) -> Result<Self> {
        let store = JobStore::open(&config.data_dir)?;
        let n = store.requeue_interrupted()?;
        if n > 0 {
            tracing::info!(jobs = n, "audit jobs interrupted by a restart resume");
        }
        let me = Self {
            store,
            config,
            live,
            metrics,
            stopping: AtomicBool::new(false),
            wake: (Mutex::new(0), Condvar::new()),
            thread: Mutex::new(None),
        };
        me.refresh_counts();
        Ok(me)
    }

    /// Sets `lethe_audit_jobs{state}` from the store.
    pub fn refresh_counts(&self) {
        match self.store.counts() {
            Ok(counts) => {
                for s in JobState::ALL {
                    let n = counts.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
                    self.metrics
                        .audit_jobs
                        .with_label_values(&[s.as_str()])
                        .set(n as i64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting audit jobs failed"),
        }
    }

    /// Cancels a queued or running job ([`JobStore::cancel`]).
    pub fn cancel(
        &self,
        id: &str,
    ) -> Result<Option<std::result::Result<AuditJob, super::store::NotCancellable>>> {
        let out = self.store.cancel(id);
        self.refresh_counts();
        out
    }

    /// Where uploads are kept.
    pub fn uploads_dir(&self) -> PathBuf {
        self.config.data_dir.join("audits")
    }

    /// Resolves a server-side dataset: it must exist and lie under the allowed directory.
    pub fn resolve_file(&self, file: &str) -> Result<PathBuf> {
        let Some(root) = &self.config.allowed_dir else {
            return Err(Error::invalid(
                "file",
                "server-side datasets are disabled; start lethe serve with --audit-dir DIR, or upload the JSONL as the body",
            ));
        };
        let root = root.canonicalize().map_err(|source| Error::Io {
            path: root.clone(),
            source,
        })?;
        let p = root.join(file);
        let p = p
            .canonicalize()
            .map_err(|e| Error::invalid("file", format!("{file:?}: {e}")))?;
        if !p.starts_with(&root) || !p.is_file() {
            return Err(Error::invalid(
                "file",
                format!("{file:?} is not a file under the --audit-dir"),
            ));
        }
        Ok(p)
    }

    /// Checks `dataset` against `spec` for the live model and queues a job for it.
    pub fn submit(&self, dataset: PathBuf, uploaded: bool, spec: JobSpec) -> Result<AuditJob> {
        let served = self.live.served();
        let spec = spec.validated(served.model.spec().architecture)?;
        let scanned = super::scan(
            &dataset,
            &spec,
            &served.tokenizer,
            served.model.spec().context_length,
        )?;
        let job = self.store.create(NewJob {
            dataset,
            uploaded,
            dataset_sha256: scanned.sha256,
            spec,
            rows_total: scanned.rows,
        })?;
        self.refresh_counts();
        self.notify();
        Ok(job)
    }

    fn notify(&self) {
        let (m, c) = &self.wake;
        if let Ok(mut n) = m.lock() {
            *n += 1;
        }
        c.notify_all();
    }

    fn wait(&self, timeout: Duration) {
        let (m, c) = &self.wake;
        if let Ok(g) = m.lock() {
            let seen = *g;
            let _ = c.wait_timeout_while(g, timeout, |n| {
                *n == seen && !self.stopping.load(Ordering::SeqCst)
            });
        }
    }

    /// Starts the job thread.
    pub fn start(self: &Arc<Self>) {
        let me = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("lethe-audit-jobs".into())
            .spawn(move || me.run_loop())
            .expect("spawning the audit-job thread");
        if let Ok(mut t) = self.thread.lock() {
            *t = Some(handle);
        }
    }

    /// Whether the job thread, once started, is still running (`/livez` reports it).
    pub fn thread_alive(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
            || self
                .thread
                .lock()
                .map(|t| t.as_ref().is_none_or(|h| !h.is_finished()))
                .unwrap_or(false)
    }

    /// Stops the job thread after its current chunk; a running job stays queued.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.notify();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    fn run_loop(&self) {
        let pool = match rayon::ThreadPoolBuilder::new()
            .num_threads(self.config.threads.max(1))
            .thread_name(|i| format!("lethe-audit-{i}"))
            .build()
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the audit-job thread pool");
                return;
            }
        };
        while !self.stopping.load(Ordering::SeqCst) {
            let job = match self.store.claim_next() {
                Ok(Some(j)) => j,
                Ok(None) => {
                    self.wait(Duration::from_secs(2));
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming an audit job failed");
                    self.wait(Duration::from_secs(5));
                    continue;
                }
            };
            tracing::info!(job = %job.id, rows = job.rows_total, from = job.rows_done, "audit job started");
            self.refresh_counts();
            let served = self.live.served();
            let stop = || self.stopping.load(Ordering::SeqCst);
            let mut counted: Option<u64> = None;
            let mut count_rows = |j: &AuditJob| {
                // The first call reports where the run starts; later ones the rows committed.
                if let Some(before) = counted {
                    self.metrics
                        .audit_job_rows
                        .inc_by(j.rows_done.saturating_sub(before));
                }
                counted = Some(j.rows_done);
            };
            let outcome = crate::supervise::catch("audit-job", || {
                pool.install(|| run_job(&self.store, &job, &served, &stop, &mut count_rows))
            });
            let failed = match outcome {
                Ok(Ok(end)) => {
                    tracing::info!(job = %job.id, ?end, "audit job ended");
                    if end == RunEnd::Stopped {
                        if let Err(e) = self.store.requeue(&job.id) {
                            tracing::error!(job = %job.id, error = %e, "requeueing a stopped audit job failed");
                        }
                    }
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(format!("the job panicked: {panic}; this is a bug in lethe")),
            };
            if let Some(error) = failed {
                tracing::error!(job = %job.id, %error, "audit job failed");
                if let Err(e) = self.store.finish(&job.id, JobState::Failed, Some(&error)) {
                    tracing::error!(job = %job.id, error = %e, "recording a failed audit job failed");
                }
            }
            self.refresh_counts();
        }
    }
}
