//! The durable audit-job store: one SQLite database, `data_dir/audits.sqlite3`, holding the jobs,
//! their progress and running summaries, and their results per row.
//!
//! Invariants:
//! - Every write is one `IMMEDIATE` transaction in WAL mode with `synchronous=FULL`: a job exists
//!   once [`JobStore::create`] returns (before the API answers 202), and a chunk's results, the
//!   job's `rows_done` and its summary are on disk together or not at all.
//! - States: `queued → running | cancelled`; `running → completed | failed | cancelled | queued`
//!   (the last only by [`JobStore::requeue`] at shutdown or [`JobStore::requeue_interrupted`]
//!   at start-up); `completed`, `failed` and `cancelled` are terminal. A chunk is recorded only
//!   while its job is `running` and only at the row the job has reached, so a cancelled job
//!   takes no more results and a chunk is never recorded twice.
//! - Results are keyed by (job, row); pages are in row order.
//! - `Send + Sync`: one connection behind a mutex. On Unix the database file is made 0600: it
//!   holds the audited sequences' verdicts and the datasets' paths.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

use super::{JobSpec, JobSummary};
use crate::error::{Error, Result};
use crate::util::unix_now;

/// The database file inside the data directory.
pub const DB_FILE: &str = "audits.sqlite3";
const SCHEMA_VERSION: i64 = 1;

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        Self::Queued,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| corrupt(format!("unknown job state {s:?}")))
    }

    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// One audit job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditJob {
    pub id: String,
    pub state: JobState,
    /// The dataset file, and whether it was uploaded (kept in the data directory).
    pub dataset: String,
    pub uploaded: bool,
    pub dataset_sha256: String,
    pub spec: JobSpec,
    pub rows_total: u64,
    pub rows_done: u64,
    /// The version audited, once the job has started.
    pub version: Option<String>,
    pub summary: JobSummary,
    pub error: Option<String>,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// When the current (or last) run started, and the rows done then: the rate and ETA.
    pub run_started_at: Option<f64>,
    pub run_rows_start: u64,
    /// Seconds spent auditing, summed over runs.
    pub seconds: f64,
    /// Times the job was resumed after an interruption.
    pub resumes: u64,
    /// Times the job started again from its first row because the live version changed.
    pub restarts: u64,
}

impl AuditJob {
    /// Rows per second of the current (or, once the job is over, the last) run, once it has
    /// done some.
    pub fn rows_per_second(&self, now: f64) -> Option<f64> {
        let started = self.run_started_at?;
        let done = self.rows_done.saturating_sub(self.run_rows_start);
        let secs = self.finished_at.unwrap_or(now) - started;
        (done > 0 && secs > 0.0).then(|| done as f64 / secs)
    }

    /// Seconds left at the current run's rate (0 when finished).
    pub fn eta_seconds(&self, now: f64) -> Option<f64> {
        if self.state.is_terminal() {
            return Some(0.0);
        }
        let left = self.rows_total.saturating_sub(self.rows_done) as f64;
        self.rows_per_second(now).map(|r| left / r)
    }
}

/// One row's results: its index among the data rows, its line in the file, its group values and
/// one verdict per definition (by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    pub row: u64,
    pub line: u64,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub groups: serde_json::Map<String, serde_json::Value>,
    pub results: serde_json::Map<String, serde_json::Value>,
}

/// A new job, before it is stored.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub dataset: PathBuf,
    pub uploaded: bool,
    pub dataset_sha256: String,
    pub spec: JobSpec,
    pub rows_total: u64,
}

/// Why a cancel was refused: the job is already over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCancellable(pub JobState);

/// The durable store. `Send + Sync`.
pub struct JobStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn corrupt(message: impl std::fmt::Display) -> Error {
    Error::Config {
        file: DB_FILE.into(),
        message: message.to_string(),
    }
}

fn sql(what: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| corrupt(format!("{what}: {e}"))
}

fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| corrupt(format!("encoding a record: {e}")))
}

fn parse_json<T: for<'de> Deserialize<'de>>(s: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

const COLS: &str = "id, state, dataset, uploaded, dataset_sha256, spec, rows_total, rows_done, \
    version, summary, error, created_at, started_at, finished_at, run_started_at, run_rows_start, \
    seconds, resumes, restarts";

/// The state in column `i`; an unknown one is a conversion error naming it.
fn state_col(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<JobState> {
    let s: String = r.get(i)?;
    JobState::parse(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditJob> {
    Ok(AuditJob {
        id: r.get(0)?,
        state: state_col(r, 1)?,
        dataset: r.get(2)?,
        uploaded: r.get(3)?,
        dataset_sha256: r.get(4)?,
        spec: parse_json(&r.get::<_, String>(5)?)?,
        rows_total: r.get::<_, i64>(6)? as u64,
        rows_done: r.get::<_, i64>(7)? as u64,
        version: r.get(8)?,
        summary: parse_json(&r.get::<_, String>(9)?)?,
        error: r.get(10)?,
        created_at: r.get(11)?,
        started_at: r.get(12)?,
        finished_at: r.get(13)?,
        run_started_at: r.get(14)?,
        run_rows_start: r.get::<_, i64>(15)? as u64,
        seconds: r.get(16)?,
        resumes: r.get::<_, i64>(17)? as u64,
        restarts: r.get::<_, i64>(18)? as u64,
    })
}

impl JobStore {
    /// Opens (creating if needed) `data_dir/audits.sqlite3`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        use crate::util::sqlite::{open_durable, OpenError};
        let (conn, path, _) = open_durable(data_dir, DB_FILE).map_err(|e| match e {
            OpenError::Io { path, source, .. } => Error::Write { path, source },
            e => corrupt(e),
        })?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("read user_version"))?;
        if version > SCHEMA_VERSION {
            return Err(corrupt(format!(
                "schema version {version} is newer than this lethe's {SCHEMA_VERSION}"
            )));
        }
        if version < 1 {
            conn.execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE audit_jobs (
                   id TEXT PRIMARY KEY, state TEXT NOT NULL, dataset TEXT NOT NULL,
                   uploaded INTEGER NOT NULL, dataset_sha256 TEXT NOT NULL, spec TEXT NOT NULL,
                   rows_total INTEGER NOT NULL, rows_done INTEGER NOT NULL DEFAULT 0,
                   version TEXT, summary TEXT NOT NULL, error TEXT, created_at REAL NOT NULL,
                   started_at REAL, finished_at REAL, run_started_at REAL,
                   run_rows_start INTEGER NOT NULL DEFAULT 0, seconds REAL NOT NULL DEFAULT 0,
                   resumes INTEGER NOT NULL DEFAULT 0, restarts INTEGER NOT NULL DEFAULT 0);
                 CREATE INDEX audit_jobs_state ON audit_jobs(state, created_at);
                 CREATE TABLE audit_results (
                   job_id TEXT NOT NULL REFERENCES audit_jobs(id), row INTEGER NOT NULL,
                   line INTEGER NOT NULL, groups TEXT NOT NULL, results TEXT NOT NULL,
                   PRIMARY KEY (job_id, row)) WITHOUT ROWID;
                 PRAGMA user_version = 1;
                 COMMIT;",
            )
            .map_err(sql("create schema"))?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A dropped transaction rolls back, so a lock poisoned by a panic is safe to take over.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` in one `IMMEDIATE` transaction, committed when it returns `Ok`.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let out = f(&tx)?;
        tx.commit().map_err(sql("commit"))?;
        Ok(out)
    }

    /// Stores a new queued job.
    pub fn create(&self, new: NewJob) -> Result<AuditJob> {
        let id = format!("audit_{}", crate::util::random_hex(8));
        self.write(|tx| {
            tx.execute(
                "INSERT INTO audit_jobs (id, state, dataset, uploaded, dataset_sha256, spec, \
                 rows_total, summary, created_at) VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    new.dataset.display().to_string(),
                    new.uploaded,
                    new.dataset_sha256,
                    json(&new.spec)?,
                    new.rows_total as i64,
                    json(&JobSummary::default())?,
                    unix_now(),
                ],
            )
            .map_err(sql("insert job"))?;
            Ok(())
        })?;
        self.get(&id)?
            .ok_or_else(|| corrupt("a job just stored is missing"))
    }

    /// One job.
    pub fn get(&self, id: &str) -> Result<Option<AuditJob>> {
        let conn = self.conn();
        conn.query_row(
            &format!("SELECT {COLS} FROM audit_jobs WHERE id = ?1"),
            [id],
            job_row,
        )
        .optional()
        .map_err(sql("read job"))
    }

    /// An unfinished job (queued or running) of the same dataset, content and spec, if any: what
    /// `lethe audit --data-dir` resumes.
    pub fn find_unfinished(
        &self,
        dataset: &Path,
        sha256: &str,
        spec: &JobSpec,
    ) -> Result<Option<AuditJob>> {
        let spec = json(spec)?;
        let id: Option<String> = {
            let conn = self.conn();
            conn.query_row(
                "SELECT id FROM audit_jobs WHERE state IN ('queued', 'running') AND dataset = ?1 \
                 AND dataset_sha256 = ?2 AND spec = ?3 ORDER BY created_at LIMIT 1",
                params![dataset.display().to_string(), sha256, spec],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("find job"))?
        };
        match id {
            Some(id) => self.get(&id),
            None => Ok(None),
        }
    }

    /// The newest `limit` jobs, newest first.
    pub fn list(&self, limit: usize) -> Result<Vec<AuditJob>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(&format!(
                "SELECT {COLS} FROM audit_jobs ORDER BY created_at DESC, id LIMIT ?1"
            ))
            .map_err(sql("list jobs"))?;
        let rows = st
            .query_map([limit as i64], job_row)
            .map_err(sql("list jobs"))?;
        rows.map(|r| r.map_err(sql("list jobs"))).collect()
    }

    /// Claims the oldest queued job: it becomes `running`, starting a run at its `rows_done`.
    pub fn claim_next(&self) -> Result<Option<AuditJob>> {
        self.claim(None)
    }

    /// Claims the queued job `id` ([`JobStore::claim_next`] for that job only).
    pub fn claim_job(&self, id: &str) -> Result<Option<AuditJob>> {
        self.claim(Some(id))
    }

    fn claim(&self, only: Option<&str>) -> Result<Option<AuditJob>> {
        let id: Option<String> = self.write(|tx| {
            let id: Option<String> = tx
                .query_row(
                    "SELECT id FROM audit_jobs WHERE state = 'queued' AND (?1 IS NULL OR id = ?1) \
                     ORDER BY created_at, id LIMIT 1",
                    [only],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql("find queued job"))?;
            if let Some(id) = &id {
                let now = unix_now();
                tx.execute(
                    "UPDATE audit_jobs SET state = 'running', started_at = COALESCE(started_at, ?2), \
                     run_started_at = ?2, run_rows_start = rows_done WHERE id = ?1",
                    params![id, now],
                )
                .map_err(sql("claim job"))?;
            }
            Ok(id)
        })?;
        match id {
            Some(id) => self.get(&id),
            None => Ok(None),
        }
    }

    /// Records the version a running job audits. When it audited another version before, its
    /// results are dropped and it starts again from its first row (`restarts` counts it).
    pub fn pin_version(&self, id: &str, version: &str) -> Result<AuditJob> {
        self.write(|tx| {
            let old: Option<String> = tx
                .query_row("SELECT version FROM audit_jobs WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .map_err(sql("read version"))?;
            if old.as_deref().is_some_and(|v| v != version) {
                tx.execute("DELETE FROM audit_results WHERE job_id = ?1", [id])
                    .map_err(sql("drop results"))?;
                tx.execute(
                    "UPDATE audit_jobs SET rows_done = 0, run_rows_start = 0, summary = ?2, \
                     restarts = restarts + 1 WHERE id = ?1",
                    params![id, json(&JobSummary::default())?],
                )
                .map_err(sql("restart job"))?;
            }
            tx.execute(
                "UPDATE audit_jobs SET version = ?2 WHERE id = ?1",
                params![id, version],
            )
            .map_err(sql("pin version"))?;
            Ok(())
        })?;
        self.get(id)?.ok_or_else(|| corrupt("job vanished"))
    }

    /// Records a chunk: its rows' results from row `first`, the job's new summary, and the
    /// seconds it took. Returns `false`, recording nothing, when the job is no longer running
    /// (cancelled) or has moved past `first`.
    pub fn record_chunk(
        &self,
        id: &str,
        first: u64,
        rows: &[ResultRow],
        summary: &JobSummary,
        seconds: f64,
    ) -> Result<bool> {
        self.write(|tx| {
            let changed = tx
                .execute(
                    "UPDATE audit_jobs SET rows_done = rows_done + ?3, summary = ?4, \
                     seconds = seconds + ?5 WHERE id = ?1 AND state = 'running' AND rows_done = ?2",
                    params![id, first as i64, rows.len() as i64, json(summary)?, seconds],
                )
                .map_err(sql("record progress"))?;
            if changed == 0 {
                return Ok(false);
            }
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO audit_results (job_id, row, line, groups, results) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql("insert results"))?;
            for r in rows {
                st.execute(params![
                    id,
                    r.row as i64,
                    r.line as i64,
                    json(&r.groups)?,
                    json(&r.results)?
                ])
                .map_err(sql("insert results"))?;
            }
            Ok(true)
        })
    }

    /// Ends a running job as `completed` or `failed` (with its error).
    pub fn finish(&self, id: &str, state: JobState, error: Option<&str>) -> Result<()> {
        debug_assert!(matches!(state, JobState::Completed | JobState::Failed));
        self.write(|tx| {
            tx.execute(
                "UPDATE audit_jobs SET state = ?2, error = ?3, finished_at = ?4 \
                 WHERE id = ?1 AND state = 'running'",
                params![id, state.as_str(), error, unix_now()],
            )
            .map_err(sql("finish job"))?;
            Ok(())
        })
    }

    /// Cancels a queued or running job; a job already over is [`NotCancellable`]. `None` when
    /// there is no such job.
    pub fn cancel(
        &self,
        id: &str,
    ) -> Result<Option<std::result::Result<AuditJob, NotCancellable>>> {
        let Some(job) = self.get(id)? else {
            return Ok(None);
        };
        let changed = self.write(|tx| {
            tx.execute(
                "UPDATE audit_jobs SET state = 'cancelled', finished_at = ?2 \
                 WHERE id = ?1 AND state IN ('queued', 'running')",
                params![id, unix_now()],
            )
            .map_err(sql("cancel job"))
        })?;
        let now = self.get(id)?.unwrap_or(job);
        Ok(Some(if changed == 1 {
            Ok(now)
        } else {
            Err(NotCancellable(now.state))
        }))
    }

    /// Puts a running job back in the queue (the worker is stopping).
    pub fn requeue(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE audit_jobs SET state = 'queued' WHERE id = ?1 AND state = 'running'",
                [id],
            )
            .map_err(sql("requeue job"))?;
            Ok(())
        })
    }

    /// At start-up: the jobs a crash left `running` go back to the queue, counted in `resumes`.
    pub fn requeue_interrupted(&self) -> Result<usize> {
        self.write(|tx| {
            tx.execute(
                "UPDATE audit_jobs SET state = 'queued', resumes = resumes + 1 WHERE state = 'running'",
                [],
            )
            .map_err(sql("requeue interrupted jobs"))
        })
    }

    /// Up to `limit` results of a job after row `after` (from the first when `None`), in row
    /// order, keeping only rows memorized under some definition when `memorized_only`.
    pub fn results(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
        memorized_only: bool,
    ) -> Result<Vec<ResultRow>> {
        let conn = self.conn();
        let filter = if memorized_only {
            " AND results LIKE '%\"memorized\":true%'"
        } else {
            ""
        };
        let mut st = conn
            .prepare(&format!(
                "SELECT row, line, groups, results FROM audit_results \
                 WHERE job_id = ?1 AND row > ?2{filter} ORDER BY row LIMIT ?3"
            ))
            .map_err(sql("read results"))?;
        let after = after.map_or(-1, |a| a.min(i64::MAX as u64) as i64);
        let rows = st
            .query_map(params![id, after, limit as i64], |r| {
                Ok(ResultRow {
                    row: r.get::<_, i64>(0)? as u64,
                    line: r.get::<_, i64>(1)? as u64,
                    groups: parse_json(&r.get::<_, String>(2)?)?,
                    results: parse_json(&r.get::<_, String>(3)?)?,
                })
            })
            .map_err(sql("read results"))?;
        rows.map(|r| r.map_err(sql("read results"))).collect()
    }

    /// Jobs per state.
    pub fn counts(&self) -> Result<Vec<(JobState, u64)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT state, COUNT(*) FROM audit_jobs GROUP BY state")
            .map_err(sql("count jobs"))?;
        let rows = st
            .query_map([], |r| Ok((state_col(r, 0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(sql("count jobs"))?;
        rows.map(|r| r.map_err(sql("count jobs"))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job() -> NewJob {
        NewJob {
            dataset: "/data/d.jsonl".into(),
            uploaded: false,
            dataset_sha256: "ab".into(),
            spec: JobSpec {
                definitions: vec![crate::audit::Definition::Tinymem],
                group_by: vec![],
                batch_size: 8,
                risk: None,
            },
            rows_total: 3,
        }
    }

    fn row(i: u64) -> ResultRow {
        let mut results = serde_json::Map::new();
        results.insert(
            "tinymem".into(),
            serde_json::json!({"memorized": i == 1, "matched_prefix": i}),
        );
        ResultRow {
            row: i,
            line: i + 1,
            groups: Default::default(),
            results,
        }
    }

    #[test]
    fn jobs_survive_reopening_and_resume_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let s = JobStore::open(dir.path()).unwrap();
        let j = s.create(new_job()).unwrap();
        assert_eq!(j.state, JobState::Queued);
        let j = s.claim_next().unwrap().unwrap();
        assert_eq!(j.state, JobState::Running);
        assert!(s.claim_next().unwrap().is_none());
        let sum = JobSummary {
            rows: 2,
            ..Default::default()
        };
        assert!(s
            .record_chunk(&j.id, 0, &[row(0), row(1)], &sum, 1.0)
            .unwrap());
        // The same chunk again (a retry after a lost answer) is not recorded twice.
        assert!(!s
            .record_chunk(&j.id, 0, &[row(0), row(1)], &sum, 1.0)
            .unwrap());
        drop(s);
        let s = JobStore::open(dir.path()).unwrap();
        assert_eq!(s.requeue_interrupted().unwrap(), 1);
        let j = s.claim_next().unwrap().unwrap();
        assert_eq!((j.rows_done, j.run_rows_start, j.resumes), (2, 2, 1));
        assert_eq!(j.summary.rows, 2);
        assert!(s.record_chunk(&j.id, 2, &[row(2)], &sum, 1.0).unwrap());
        s.finish(&j.id, JobState::Completed, None).unwrap();
        let page = s.results(&j.id, None, 2, false).unwrap();
        assert_eq!(page.iter().map(|r| r.row).collect::<Vec<_>>(), vec![0, 1]);
        let page = s.results(&j.id, Some(1), 10, false).unwrap();
        assert_eq!(page.iter().map(|r| r.row).collect::<Vec<_>>(), vec![2]);
        let hits = s.results(&j.id, None, 10, true).unwrap();
        assert_eq!(hits.iter().map(|r| r.row).collect::<Vec<_>>(), vec![1]);
        assert_eq!(
            s.cancel(&j.id).unwrap().unwrap(),
            Err(NotCancellable(JobState::Completed))
        );
    }

    #[test]
    fn a_cancelled_job_takes_no_more_results_and_a_new_version_restarts_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = JobStore::open(dir.path()).unwrap();
        let j = s.create(new_job()).unwrap();
        s.claim_next().unwrap().unwrap();
        s.pin_version(&j.id, "v1").unwrap();
        let sum = JobSummary {
            rows: 1,
            ..Default::default()
        };
        assert!(s.record_chunk(&j.id, 0, &[row(0)], &sum, 1.0).unwrap());
        let j = s.pin_version(&j.id, "v2").unwrap();
        assert_eq!((j.rows_done, j.restarts, j.summary.rows), (0, 1, 0));
        assert!(s.results(&j.id, None, 10, false).unwrap().is_empty());
        let c = s.cancel(&j.id).unwrap().unwrap().unwrap();
        assert_eq!(c.state, JobState::Cancelled);
        assert!(!s.record_chunk(&j.id, 0, &[row(0)], &sum, 1.0).unwrap());
        assert!(s.cancel("audit_nope").unwrap().is_none());
        assert_eq!(s.counts().unwrap(), vec![(JobState::Cancelled, 1)]);
    }
}
