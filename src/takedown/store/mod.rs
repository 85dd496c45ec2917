//! The durable takedown store: one database holding the takedowns, their events, the version
//! registry and the current-version pointer. SQLite, `data_dir/lethe.sqlite3`, on one machine
//! ([`Store::open`]); PostgreSQL for a fleet of replicas ([`Store::open_postgres`]). Every
//! query is written once, against `db::Tx`.
//!
//! Invariants (both databases):
//! - Every write is one transaction that serializes with every other writer (SQLite:
//!   `IMMEDIATE`, WAL, `synchronous=FULL`; PostgreSQL: it first takes an advisory lock, so
//!   replicas on one database write one after the other): what a call changed is committed
//!   when it returns, and a crash or error mid-call changes nothing. A takedown exists once
//!   [`Store::create`] returns, before the caller answers 202.
//! - The state machine ([`State::can_go_to`]) is enforced inside the transaction that changes
//!   the state: `queued → running | cancelled`; `running → validating | queued | failed |
//!   cancelled`; `validating → running | applied | rejected | failed | queued | cancelled`;
//!   `applied → queued` only through a rollback ([`Store::requeue_applied_by`],
//!   [`Store::rollback`]); `rejected`, `failed` and `cancelled` are terminal. A refused job
//!   transition is [`Error::InvalidTransition`] and changes none of the job's takedowns; a
//!   refused cancel is [`Error::NotCancellable`]. Every transition appends an [`Event`] with its
//!   time, which is what receipts show.
//! - Job transitions touch only the job's `running` and `validating` takedowns: one cancelled
//!   meanwhile is never applied, rejected or failed. [`Store::claim_queued`] is exclusive (no
//!   takedown is in two jobs) and oldest first; a takedown marked `solo` (its coalesced job
//!   failed, was rejected, panicked or was interrupted) is claimed in a job of its own.
//! - At start-up ([`Store::requeue_interrupted`]) the takedowns a crash left `running` or
//!   `validating` go back to `queued`, except that one interrupted [`MAX_INTERRUPTIONS`] times
//!   becomes `failed` (and stays guarded).
//! - An idempotency key maps to one request content forever: reusing it with the same content
//!   returns the original takedown, with different content is [`Error::IdempotencyConflict`].
//!   No row of any table is ever deleted.
//! - The current-version pointer changes only by compare-and-swap, and every change is
//!   recorded in the `swaps` history in the same transaction.
//! - `Store` is `Send + Sync`: one connection behind a mutex, so writers serialize. On Unix the
//!   data directory is made 0700 and the database files 0600: they hold the sequences to forget.
//!
//! Here: opening the database and the takedown queue (create, claim, progress, finish, cancel,
//! requeue). `db`: the transaction interface; `records`: the state machine and the records;
//! `schema` and `postgres`: each database's migrations; `rows`: SQL row mapping; `fleet`: what
//! a fleet replica reads to follow the store, and the notification every PostgreSQL write sends;
//! `registry`: versions, the current-version pointer and its history (promote, rollback).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, TransactionBehavior};
use serde_json::{json, Value};

use super::{now, random_hex, Error, Result};

mod db;
mod fleet;
pub mod postgres;
mod records;
mod registry;
mod rows;
mod schema;

pub(crate) use db::pg as pg_error;
use db::{get, Dialect, Tx};
pub use fleet::{FleetView, NOTIFY_CHANNEL};
pub use records::{Event, NewTakedown, NewVersion, State, Swap, SwapKind, Takedown, VersionRecord};
use rows::{json_col, request_hash, sql, takedown_row, to_json, TD_COLS};
use schema::migrate;
pub use schema::SCHEMA_VERSION;

/// The database file inside the data directory.
pub const DB_FILE: &str = "lethe.sqlite3";
/// Crash interruptions of a takedown's jobs after which it is marked failed, not re-queued.
pub const MAX_INTERRUPTIONS: i64 = 3;
/// The advisory-lock key every PostgreSQL write transaction holds, so writers serialize as
/// SQLite's do ("lethe" in ASCII, then 2).
const PG_WRITE_LOCK: i64 = 0x6c65_7468_6502;

/// Runs `f`, on a thread of its own when called from an async runtime's thread (an HTTP
/// handler): the synchronous PostgreSQL client drives its connection with a runtime of its own,
/// which cannot be entered from another runtime's thread. Off a runtime (the worker, the
/// auditor, tests) `f` runs in place.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The database behind a [`Store`].
enum Backend {
    Sqlite(Connection),
    Postgres(::postgres::Client),
}

/// The durable store. `Send + Sync`: one connection behind a mutex, so writers serialize.
pub struct Store {
    conn: Mutex<Backend>,
    path: PathBuf,
    /// PostgreSQL: the URL to reconnect to when the connection closed.
    url: Option<String>,
}

impl Store {
    /// Opens (creating if needed) `data_dir/lethe.sqlite3` and migrates it to the current schema.
    pub fn open(data_dir: &Path) -> Result<Store> {
        let (mut conn, path, _) = crate::util::sqlite::open_durable(data_dir, DB_FILE)?;
        migrate(&mut conn, &path)?;
        Ok(Store {
            conn: Mutex::new(Backend::Sqlite(conn)),
            path,
            url: None,
        })
    }

    /// Connects to the PostgreSQL database at `url` (fleet mode) and migrates it under the
    /// migration lock ([`postgres::migrate`]).
    pub fn open_postgres(url: &str) -> Result<Store> {
        let mut client =
            ::postgres::Client::connect(url, ::postgres::NoTls).map_err(db::pg("connect"))?;
        postgres::migrate(&mut client)?;
        // Never the password: the path names the database for logs and errors.
        let shown = url.rsplit('@').next().unwrap_or(url);
        Ok(Store {
            conn: Mutex::new(Backend::Postgres(client)),
            path: PathBuf::from(format!("postgres://{shown}")),
            url: Some(url.to_string()),
        })
    }

    /// The database file (SQLite), or `postgres://host:port/db` (PostgreSQL).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection. A panic in another thread cannot leave a transaction open (a dropped
    /// transaction rolls back), so a poisoned lock is safe to take over.
    /// A PostgreSQL connection that closed (the server restarted, the network dropped it) is
    /// replaced by a new one here; if that fails, the call fails and the next one tries again.
    fn conn(&self) -> MutexGuard<'_, Backend> {
        let mut guard = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let (Backend::Postgres(c), Some(url)) = (&mut *guard, &self.url) {
            if c.is_closed() {
                match off_runtime(|| ::postgres::Client::connect(url, ::postgres::NoTls)) {
                    Ok(fresh) => {
                        tracing::warn!(store = %self.path.display(), "reconnected to the takedown store");
                        *c = fresh;
                    }
                    Err(e) => {
                        tracing::error!(store = %self.path.display(), error = %e, "cannot reconnect to the takedown store")
                    }
                }
            }
        }
        guard
    }

    /// Runs `f` in one write transaction (SQLite: `IMMEDIATE`; PostgreSQL: holding
    /// [`PG_WRITE_LOCK`]) and commits it when `f` succeeds; an error rolls everything back.
    fn write<T: Send>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T> + Send) -> Result<T> {
        let mut guard = self.conn();
        match &mut *guard {
            Backend::Sqlite(c) => {
                let mut tx = c
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(sql("begin transaction"))?;
                let out = f(&mut tx)?;
                tx.commit().map_err(sql("commit"))?;
                Ok(out)
            }
            Backend::Postgres(c) => off_runtime(|| {
                let mut tx = c.transaction().map_err(db::pg("begin transaction"))?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PG_WRITE_LOCK])
                    .map_err(db::pg("take the write lock"))?;
                let out = f(&mut tx)?;
                fleet::notify(&mut tx)?;
                tx.commit().map_err(db::pg("commit"))?;
                Ok(out)
            }),
        }
    }

    /// Runs `f` in one read transaction: its queries see one snapshot.
    fn read<T: Send>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<T> + Send) -> Result<T> {
        let mut guard = self.conn();
        match &mut *guard {
            Backend::Sqlite(c) => {
                let mut tx = c.transaction().map_err(sql("begin transaction"))?;
                f(&mut tx)
            }
            Backend::Postgres(c) => off_runtime(|| {
                let mut tx = c
                    .build_transaction()
                    .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .map_err(db::pg("begin transaction"))?;
                f(&mut tx)
            }),
        }
    }

    /// Accepts a takedown. Returns it and whether it was created (`false`: the idempotency key
    /// was already used for the same request, and the original takedown is returned).
    pub fn create(
        &self,
        new: NewTakedown,
        idempotency_key: Option<&str>,
    ) -> Result<(Takedown, bool)> {
        if new.sequences.is_empty() {
            return Err(Error::invalid(
                "sequences",
                "at least one sequence is required",
            ));
        }
        if let Some(i) = new.sequences.iter().position(|s| s.is_empty()) {
            return Err(Error::invalid(
                format!("sequences[{i}]"),
                "a sequence needs at least one token",
            ));
        }
        let hash = request_hash(&new)?;
        let sequences = to_json("sequences", &new.sequences)?;
        self.write(|tx| {
            if let Some(key) = idempotency_key {
                let found = tx.query_opt(
                    "SELECT id, request_hash FROM takedowns WHERE idempotency_key = ?1",
                    &[&key],
                )?;
                if let Some(r) = found {
                    let (id, existing_hash): (String, String) = (get(&r, 0)?, get(&r, 1)?);
                    if existing_hash != hash {
                        return Err(Error::IdempotencyConflict {
                            key: key.to_string(),
                            existing_id: id,
                        });
                    }
                    return Ok((get_tx(tx, &id)?, false));
                }
            }
            let id = format!("td_{}", random_hex(8));
            let at = now();
            tx.execute(
                "INSERT INTO takedowns (id, state, sequences, definition, reason, requester, \
                 created_at, updated_at, attempts, idempotency_key, request_hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 0, ?8, ?9)",
                &[
                    &id,
                    &State::Queued,
                    &sequences,
                    &new.definition,
                    &new.reason,
                    &new.requester,
                    &at,
                    &idempotency_key,
                    &hash,
                ],
            )?;
            event(tx, &id, at, State::Queued, &Value::Null)?;
            Ok((get_tx(tx, &id)?, true))
        })
    }

    /// The takedown `id`.
    pub fn get(&self, id: &str) -> Result<Takedown> {
        self.read(|tx| get_tx(tx, id))
    }

    /// Takedowns in creation order (then id), optionally of one state, after the cursor `after_id`
    /// (exclusive), at most `limit`. An unknown cursor is [`Error::NotFound`].
    pub fn list(
        &self,
        after_id: Option<&str>,
        limit: usize,
        state: Option<State>,
    ) -> Result<Vec<Takedown>> {
        self.read(|tx| {
            let after_seq: i64 = match after_id {
                None => 0,
                Some(id) => {
                    let r = tx
                        .query_opt("SELECT seq FROM takedowns WHERE id = ?1", &[&id])?
                        .ok_or_else(|| Error::NotFound(id.to_string()))?;
                    get(&r, 0)?
                }
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let state = state.map(|s| s.as_str().to_string());
            tx.query(
                &format!(
                    "SELECT {TD_COLS} FROM takedowns WHERE seq > ?1 \
                     AND (CAST(?2 AS TEXT) IS NULL OR state = ?2) ORDER BY seq LIMIT ?3"
                ),
                &[&after_seq, &state, &limit],
            )?
            .iter()
            .map(|r| takedown_row(r))
            .collect()
        })
    }

    /// How many takedowns are in each state (every state, zeros included, in lifecycle order).
    pub fn counts_by_state(&self) -> Result<Vec<(State, u64)>> {
        let found: Vec<(State, i64)> = self.read(|tx| {
            tx.query("SELECT state, COUNT(*) FROM takedowns GROUP BY state", &[])?
                .iter()
                .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
                .collect::<Result<_>>()
        })?;
        Ok(State::ALL
            .into_iter()
            .map(|s| {
                let n = found.iter().find(|(f, _)| *f == s).map_or(0, |(_, n)| *n);
                (s, u64::try_from(n).unwrap_or(0))
            })
            .collect())
    }

    /// The state-change history of takedown `id`, oldest first.
    pub fn events(&self, id: &str) -> Result<Vec<Event>> {
        self.read(|tx| {
            tx.query(
                "SELECT takedown_id, at, state, detail FROM events WHERE takedown_id = ?1 \
                 ORDER BY seq",
                &[&id],
            )?
            .iter()
            .map(|r| {
                Ok(Event {
                    takedown_id: get(r, 0)?,
                    at: get(r, 1)?,
                    state: get(r, 2)?,
                    detail: json_col(r, 3)?,
                })
            })
            .collect()
        })
    }

    /// Atomically moves queued takedowns, oldest first, to running under `job_id`, counting an
    /// attempt on each, and returns them as updated: the oldest one alone when it is marked solo
    /// (see [`Store::split_job`]), else up to `max` of the takedowns that are not.
    pub fn claim_queued(&self, job_id: &str, max: usize) -> Result<Vec<Takedown>> {
        if job_id.is_empty() {
            return Err(Error::invalid("job_id", "must not be empty"));
        }
        self.write(|tx| {
            let oldest = tx.query_opt(
                "SELECT id, solo FROM takedowns WHERE state = ?1 ORDER BY seq LIMIT 1",
                &[&State::Queued],
            )?;
            let ids: Vec<String> = match oldest {
                None => Vec::new(),
                Some(r) if get::<i64>(&r, 1)? != 0 => vec![get(&r, 0)?],
                Some(_) => {
                    let limit = i64::try_from(max).unwrap_or(i64::MAX);
                    tx.query(
                        "SELECT id FROM takedowns WHERE state = ?1 AND solo = 0 ORDER BY seq \
                         LIMIT ?2",
                        &[&State::Queued, &limit],
                    )?
                    .iter()
                    .map(|r| get(r, 0))
                    .collect::<Result<_>>()?
                }
            };
            let at = now();
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                tx.execute(
                    "UPDATE takedowns SET state = ?2, job_id = ?3, attempts = attempts + 1, \
                     phase = NULL, progress = NULL, eta_seconds = NULL, error = NULL, \
                     updated_at = ?4 WHERE id = ?1",
                    &[&id, &State::Running, &job_id, &at],
                )?;
                event(tx, &id, at, State::Running, &json!({ "job_id": job_id }))?;
                out.push(get_tx(tx, &id)?);
            }
            Ok(out)
        })
    }

    /// Records the phase, progress (0..=1) and estimated seconds left of every running or
    /// validating takedown of `job_id`; a phase change is also recorded as an event. Returns how
    /// many takedowns were updated.
    pub fn set_progress(
        &self,
        job_id: &str,
        phase: &str,
        progress: Option<f64>,
        eta_seconds: Option<f64>,
    ) -> Result<usize> {
        if let Some(p) = progress {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid("progress", format!("{p} is not in [0, 1]")));
            }
        }
        if let Some(e) = eta_seconds {
            if !e.is_finite() || e < 0.0 {
                return Err(Error::invalid(
                    "eta_seconds",
                    format!("{e} is not a duration"),
                ));
            }
        }
        self.write(|tx| {
            let rows = active_of_job(tx, job_id)?;
            let at = now();
            for (id, state) in &rows {
                let old: Option<String> =
                    match tx.query_opt("SELECT phase FROM takedowns WHERE id = ?1", &[id])? {
                        Some(r) => get(&r, 0)?,
                        None => None,
                    };
                tx.execute(
                    "UPDATE takedowns SET phase = ?2, progress = ?3, eta_seconds = ?4, \
                     updated_at = ?5 WHERE id = ?1",
                    &[id, &phase, &progress, &eta_seconds, &at],
                )?;
                if old.as_deref() != Some(phase) {
                    event(tx, id, at, *state, &json!({ "phase": phase }))?;
                }
            }
            Ok(rows.len())
        })
    }

    /// Moves the running takedowns of `job_id` to validating.
    pub fn mark_validating(&self, job_id: &str) -> Result<usize> {
        self.job_transition(job_id, State::Validating, |tx, id, at| {
            tx.execute(
                "UPDATE takedowns SET state = ?2, phase = 'validate', updated_at = ?3 \
                 WHERE id = ?1",
                &[&id, &State::Validating, &at],
            )?;
            Ok(json!({ "job_id": job_id }))
        })
    }

    /// Moves the validating takedowns of `job_id` back to running: the candidate failed a gate
    /// and the job tries the next one.
    pub fn mark_running(&self, job_id: &str) -> Result<usize> {
        self.job_transition(job_id, State::Running, |tx, id, at| {
            tx.execute(
                "UPDATE takedowns SET state = ?2, phase = 'unlearn', updated_at = ?3 \
                 WHERE id = ?1",
                &[&id, &State::Running, &at],
            )?;
            Ok(json!({ "job_id": job_id, "reason": "next candidate" }))
        })
    }

    /// Moves the validating takedowns of `job_id` to applied by `version`, with the validation
    /// report. Cancelled takedowns of the job stay cancelled.
    pub fn finish_applied(&self, job_id: &str, version: &str, report: &Value) -> Result<usize> {
        self.write(|tx| finish_applied_tx(tx, job_id, version, report))
    }

    /// Moves the validating takedowns of `job_id` to rejected: validation refused the new
    /// weights. `reason` is kept in the takedown's `error`.
    pub fn finish_rejected(&self, job_id: &str, reason: &str, report: &Value) -> Result<usize> {
        let report_text = to_json("report", report)?;
        self.job_transition(job_id, State::Rejected, |tx, id, at| {
            tx.execute(
                "UPDATE takedowns SET state = ?2, error = ?3, report = ?4, progress = NULL, \
                 eta_seconds = NULL, updated_at = ?5 WHERE id = ?1",
                &[&id, &State::Rejected, &reason, &report_text, &at],
            )?;
            Ok(json!({ "job_id": job_id, "reason": reason }))
        })
    }

    /// Moves the running or validating takedowns of `job_id` to failed with `error`.
    pub fn finish_failed(&self, job_id: &str, error: &str) -> Result<usize> {
        self.job_transition(job_id, State::Failed, |tx, id, at| {
            fail_tx(tx, id, error, at)?;
            Ok(json!({ "job_id": job_id, "error": error }))
        })
    }

    /// Puts the running or validating takedowns of `job_id` back in the queue (e.g. the worker
    /// is shutting down). Their attempts count is kept.
    pub fn requeue_job(&self, job_id: &str) -> Result<usize> {
        self.job_transition(job_id, State::Queued, |tx, id, at| {
            clear_to_queued(tx, id, at)?;
            Ok(json!({ "job_id": job_id, "reason": "requeued" }))
        })
    }

    /// Splits the job `job_id` after it failed, was rejected or panicked with several takedowns
    /// in it: each of its running or validating takedowns goes back to the queue marked solo,
    /// so each is retried in a job of its own and one bad takedown cannot fail the others.
    /// `why` is recorded in each one's event. Returns how many.
    pub fn split_job(&self, job_id: &str, why: &str) -> Result<usize> {
        self.job_transition(job_id, State::Queued, |tx, id, at| {
            clear_to_queued(tx, id, at)?;
            tx.execute("UPDATE takedowns SET solo = 1 WHERE id = ?1", &[&id])?;
            Ok(json!({ "job_id": job_id, "reason": "split", "error": why }))
        })
    }

    /// Cancels takedown `id` (queued, running or validating). A running job notices through
    /// [`Store::is_cancelled`]. Its sequences stop being guarded.
    pub fn cancel(&self, id: &str) -> Result<Takedown> {
        self.write(|tx| {
            let td = get_tx(tx, id)?;
            if !td.state.can_go_to(State::Cancelled) {
                return Err(Error::NotCancellable {
                    id: id.to_string(),
                    state: td.state,
                });
            }
            let at = now();
            tx.execute(
                "UPDATE takedowns SET state = ?2, progress = NULL, eta_seconds = NULL, \
                 updated_at = ?3 WHERE id = ?1",
                &[&id, &State::Cancelled, &at],
            )?;
            event(tx, id, at, State::Cancelled, &json!({ "from": td.state }))?;
            get_tx(tx, id)
        })
    }

    /// Whether takedown `id` is cancelled.
    pub fn is_cancelled(&self, id: &str) -> Result<bool> {
        let state: State = self.read(|tx| {
            let r = tx
                .query_opt("SELECT state FROM takedowns WHERE id = ?1", &[&id])?
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            get(&r, 0)
        })?;
        Ok(state == State::Cancelled)
    }

    /// At startup: every running or validating takedown (its worker died with the process) goes
    /// back to queued, without job, phase or progress. Returns how many.
    ///
    /// A takedown whose jobs were interrupted this way [`MAX_INTERRUPTIONS`] times is marked
    /// failed instead (it stays guarded): a job that kills the process, e.g. out of memory,
    /// must not crash-loop it. Graceful interruptions (shutdown, rollback) do not count.
    pub fn requeue_interrupted(&self) -> Result<usize> {
        self.write(|tx| {
            let rows: Vec<(String, Option<String>)> = tx
                .query(
                    "SELECT id, job_id FROM takedowns WHERE state IN (?1, ?2) ORDER BY seq",
                    &[&State::Running, &State::Validating],
                )?
                .iter()
                .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
                .collect::<Result<_>>()?;
            let reason = match tx.dialect() {
                Dialect::Sqlite => "json_extract(detail, '$.reason')",
                Dialect::Postgres => "(detail::json ->> 'reason')",
            };
            let at = now();
            let mut requeued = 0;
            for (id, job) in &rows {
                let r = tx
                    .query_opt(
                        &format!(
                            "SELECT COUNT(*) FROM events WHERE takedown_id = ?1 AND state = ?2 \
                             AND {reason} = 'interrupted'"
                        ),
                        &[id, &State::Queued],
                    )?
                    .unwrap_or_default();
                let before: i64 = get(&r, 0)?;
                if before + 1 >= MAX_INTERRUPTIONS {
                    let error = format!(
                        "the process stopped during {} attempts of this takedown's job (a crash \
                         or a kill, e.g. out of memory); not retried again: check the logs, then \
                         resubmit it",
                        before + 1
                    );
                    fail_tx(tx, id, &error, at)?;
                    event(
                        tx,
                        id,
                        at,
                        State::Failed,
                        &json!({ "job_id": job, "error": error }),
                    )?;
                } else {
                    clear_to_queued(tx, id, at)?;
                    // Whatever stopped the process may be this takedown: it runs alone from now on.
                    tx.execute("UPDATE takedowns SET solo = 1 WHERE id = ?1", &[id])?;
                    event(
                        tx,
                        id,
                        at,
                        State::Queued,
                        &json!({ "reason": "interrupted", "job_id": job }),
                    )?;
                    requeued += 1;
                }
            }
            Ok(requeued)
        })
    }

    /// Rollback of `version`: the takedowns it applied go back to queued (version, job, report
    /// and progress cleared; the events keep the history). Returns how many.
    pub fn requeue_applied_by(&self, version: &str) -> Result<usize> {
        self.write(|tx| requeue_applied_tx(tx, version))
    }

    /// Sequences of every takedown that is not cancelled, whatever its state, in creation order.
    pub fn sequences_to_guard(&self) -> Result<Vec<Vec<u32>>> {
        let rows = self.read(|tx| {
            tx.query(
                "SELECT sequences FROM takedowns WHERE state != ?1 ORDER BY seq",
                &[&State::Cancelled],
            )
        })?;
        let mut out = Vec::new();
        for r in &rows {
            out.extend(json_col::<Vec<Vec<u32>>>(r, 0)?);
        }
        Ok(out)
    }

    /// Applies `to` to every running/validating takedown of `job_id`, checking each transition;
    /// `update` writes the row and returns the event detail.
    fn job_transition(
        &self,
        job_id: &str,
        to: State,
        update: impl Fn(&mut dyn Tx, &str, f64) -> Result<Value> + Sync,
    ) -> Result<usize> {
        self.write(|tx| {
            let rows = active_of_job(tx, job_id)?;
            check_all(&rows, to)?;
            let at = now();
            for (id, _) in &rows {
                let detail = update(tx, id, at)?;
                event(tx, id, at, to, &detail)?;
            }
            Ok(rows.len())
        })
    }
}

fn get_tx(tx: &mut dyn Tx, id: &str) -> Result<Takedown> {
    let r = tx
        .query_opt(
            &format!("SELECT {TD_COLS} FROM takedowns WHERE id = ?1"),
            &[&id],
        )?
        .ok_or_else(|| Error::NotFound(id.to_string()))?;
    takedown_row(&r)
}

fn event(tx: &mut dyn Tx, id: &str, at: f64, state: State, detail: &Value) -> Result<()> {
    tx.execute(
        "INSERT INTO events (takedown_id, at, state, detail) VALUES (?1, ?2, ?3, ?4)",
        &[&id, &at, &state, &to_json("detail", detail)?],
    )?;
    Ok(())
}

/// The running or validating takedowns of `job_id` (cancelled ones are no longer the job's).
fn active_of_job(tx: &mut dyn Tx, job_id: &str) -> Result<Vec<(String, State)>> {
    tx.query(
        "SELECT id, state FROM takedowns WHERE job_id = ?1 AND state IN (?2, ?3) ORDER BY seq",
        &[&job_id, &State::Running, &State::Validating],
    )?
    .iter()
    .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
    .collect()
}

fn check_all(rows: &[(String, State)], to: State) -> Result<()> {
    match rows.iter().find(|(_, from)| !from.can_go_to(to)) {
        Some((id, from)) => Err(Error::InvalidTransition {
            id: id.clone(),
            from: *from,
            to,
        }),
        None => Ok(()),
    }
}

/// Marks takedown `id` failed with `error` (its job id and phase stay, to show what failed).
fn fail_tx(tx: &mut dyn Tx, id: &str, error: &str, at: f64) -> Result<()> {
    tx.execute(
        "UPDATE takedowns SET state = ?2, error = ?3, progress = NULL, eta_seconds = NULL, \
         updated_at = ?4 WHERE id = ?1",
        &[&id, &State::Failed, &error, &at],
    )?;
    Ok(())
}

fn clear_to_queued(tx: &mut dyn Tx, id: &str, at: f64) -> Result<()> {
    tx.execute(
        "UPDATE takedowns SET state = ?2, job_id = NULL, phase = NULL, progress = NULL, \
         eta_seconds = NULL, updated_at = ?3 WHERE id = ?1",
        &[&id, &State::Queued, &at],
    )?;
    Ok(())
}

fn finish_applied_tx(
    tx: &mut dyn Tx,
    job_id: &str,
    version: &str,
    report: &Value,
) -> Result<usize> {
    let rows = active_of_job(tx, job_id)?;
    check_all(&rows, State::Applied)?;
    let report_text = to_json("report", report)?;
    let at = now();
    for (id, _) in &rows {
        tx.execute(
            "UPDATE takedowns SET state = ?2, version = ?3, report = ?4, error = NULL, \
             progress = 1.0, eta_seconds = NULL, updated_at = ?5 WHERE id = ?1",
            &[id, &State::Applied, &version, &report_text, &at],
        )?;
        event(
            tx,
            id,
            at,
            State::Applied,
            &json!({ "job_id": job_id, "version": version }),
        )?;
    }
    Ok(rows.len())
}

fn requeue_applied_tx(tx: &mut dyn Tx, version: &str) -> Result<usize> {
    let ids: Vec<String> = tx
        .query(
            "SELECT id FROM takedowns WHERE state = ?1 AND version = ?2 ORDER BY seq",
            &[&State::Applied, &version],
        )?
        .iter()
        .map(|r| get(r, 0))
        .collect::<Result<_>>()?;
    let at = now();
    for id in &ids {
        tx.execute(
            "UPDATE takedowns SET state = ?2, version = NULL, report = NULL, error = NULL, \
             job_id = NULL, phase = NULL, progress = NULL, eta_seconds = NULL, \
             updated_at = ?3 WHERE id = ?1",
            &[id, &State::Queued, &at],
        )?;
        event(
            tx,
            id,
            at,
            State::Queued,
            &json!({ "reason": "rollback", "version": version }),
        )?;
    }
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_td(seqs: Vec<Vec<u32>>) -> NewTakedown {
        NewTakedown {
            sequences: seqs,
            definition: "exact".into(),
            reason: Some("dmca".into()),
            requester: Some("legal@example.com".into()),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        (d, s)
    }

    /// Runs `f` on a fresh SQLite store and, when PostgreSQL is installed (required in CI), on
    /// a fresh PostgreSQL database: one suite for both backends.
    fn on_both(name: &str, f: impl Fn(&Store)) {
        let (_d, s) = open();
        f(&s);
        if let Some(server) = crate::test_util::pg::PgServer::start() {
            let s = Store::open_postgres(&server.new_database(name)).unwrap();
            f(&s);
        }
    }

    fn states(s: &Store, id: &str) -> Vec<State> {
        s.events(id).unwrap().into_iter().map(|e| e.state).collect()
    }

    fn version(id: &str, parent: Option<&str>) -> NewVersion {
        NewVersion {
            id: id.into(),
            parent: parent.map(str::to_string),
            takedowns: vec![],
            metrics: json!({ "memorized": 0.0 }),
            path: format!("/data/versions/{id}"),
        }
    }

    #[test]
    fn a_split_job_runs_each_takedown_alone_and_the_rest_coalesce_again() {
        on_both(
            "a_split_job_runs_each_takedown_alone_and_the_rest_coalesce_again",
            |s| {
                let ids: Vec<String> = (0..4u32)
                    .map(|i| s.create(new_td(vec![vec![i; 3]]), None).unwrap().0.id)
                    .collect();
                // The first job takes three; it fails and is split.
                let claimed = s.claim_queued("job_1", 3).unwrap();
                assert_eq!(claimed.len(), 3);
                assert_eq!(s.split_job("job_1", "gates failed").unwrap(), 3);
                // Each of the three is now claimed alone, oldest first; the fourth, never split, waits
                // for them and is then claimed as usual.
                for (j, id) in ids[..3].iter().enumerate() {
                    let job = format!("solo_{j}");
                    let c = s.claim_queued(&job, 10).unwrap();
                    assert_eq!(c.iter().map(|t| &t.id).collect::<Vec<_>>(), [id], "{j}");
                    assert_eq!(c[0].attempts, 2);
                    s.finish_failed(&job, "x").unwrap();
                }
                let c = s.claim_queued("job_2", 10).unwrap();
                assert_eq!(c.iter().map(|t| &t.id).collect::<Vec<_>>(), [&ids[3]]);
                let ev = s.events(&ids[0]).unwrap();
                assert!(ev
                    .iter()
                    .any(|e| e.detail["reason"] == "split" && e.detail["error"] == "gates failed"));
                // A split is only allowed from running or validating.
                assert_eq!(s.split_job("job_1", "again").unwrap(), 0);
            },
        );
    }

    #[test]
    fn takedowns_interrupted_by_a_crash_come_back_solo() {
        let (d, s) = open();
        let a = s.create(new_td(vec![vec![1; 3]]), None).unwrap().0.id;
        let b = s.create(new_td(vec![vec![2; 3]]), None).unwrap().0.id;
        assert_eq!(s.claim_queued("job_1", 10).unwrap().len(), 2);
        drop(s);
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.requeue_interrupted().unwrap(), 2);
        assert_eq!(s.claim_queued("job_2", 10).unwrap()[0].id, a);
        s.finish_failed("job_2", "x").unwrap();
        let c = s.claim_queued("job_3", 10).unwrap();
        assert_eq!((c.len(), c[0].id.as_str()), (1, b.as_str()));
    }

    #[cfg(unix)]
    #[test]
    fn the_data_directory_and_database_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Store::open(&dir).unwrap();
        s.create(new_td(vec![vec![1; 3]]), None).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let db = dir.join(DB_FILE);
        assert_eq!(mode(&db), 0o600);
        let wal = PathBuf::from(format!("{}-wal", db.display()));
        assert!(wal.exists());
        assert_eq!(mode(&wal), 0o600);
        // A database made world-readable by hand is tightened when opened again.
        drop(s);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _s = Store::open(&dir).unwrap();
        assert_eq!(mode(&db), 0o600);
    }

    #[test]
    fn a_full_disk_is_recognised_as_such() {
        let full = Error::Sql {
            op: "insert takedown",
            source: rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                None,
            ),
        };
        assert!(full.is_disk_full());
        let enospc = Error::Io {
            op: "write",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert!(enospc.is_disk_full());
        let write = Error::Model(crate::error::Error::Write {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(28),
        });
        assert!(write.is_disk_full());
        assert!(write.to_string().starts_with("cannot write /x"), "{write}");
        assert!(!Error::NotFound("x".into()).is_disk_full());
    }

    /// Two replicas on one PostgreSQL database: claims are exclusive, an idempotency key
    /// creates one takedown, and the compare-and-swap of the current version has one winner.
    #[test]
    fn replicas_sharing_a_postgres_database_claim_exclusively() {
        let Some(server) = crate::test_util::pg::PgServer::start() else {
            return;
        };
        let url = server.new_database("replicas");
        let a = Store::open_postgres(&url).unwrap();
        let b = Store::open_postgres(&url).unwrap();
        for i in 0..40u32 {
            a.create(new_td(vec![vec![i, i + 1]]), None).unwrap();
        }
        fn claim(s: &Store, who: &str) -> Vec<String> {
            let mut got = Vec::new();
            for j in 0.. {
                let c = s.claim_queued(&format!("{who}_{j}"), 3).unwrap();
                if c.is_empty() {
                    break;
                }
                got.extend(c.into_iter().map(|t| t.id));
            }
            got
        }
        let (ca, cb, created) = std::thread::scope(|sc| {
            let ha = sc.spawn(|| claim(&a, "a"));
            let hb = sc.spawn(|| claim(&b, "b"));
            let hk: Vec<_> = [&a, &b]
                .map(|s| {
                    sc.spawn(move || s.create(new_td(vec![vec![9, 9]]), Some("same")).unwrap())
                })
                .into_iter()
                .collect();
            let created: Vec<bool> = hk.into_iter().map(|h| h.join().unwrap().1).collect();
            (ha.join().unwrap(), hb.join().unwrap(), created)
        });
        let mut all: Vec<&String> = ca.iter().chain(&cb).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a takedown was claimed twice");
        assert!(n >= 40, "{n}");
        assert_eq!(created.iter().filter(|&&c| c).count(), 1, "{created:?}");
        a.insert_version(version("v0", None)).unwrap();
        a.set_current(None, "v0").unwrap();
        b.insert_version(version("v1", Some("v0"))).unwrap();
        let wins = std::thread::scope(|sc| {
            let hs: Vec<_> = [&a, &b]
                .map(|s| sc.spawn(move || s.set_current(Some("v0"), "v1").is_ok()))
                .into_iter()
                .collect();
            hs.into_iter()
                .filter(|_| true)
                .map(|h| h.join().unwrap())
                .filter(|&w| w)
                .count()
        });
        assert_eq!(wins, 1);
        assert_eq!(b.current_version().unwrap().as_deref(), Some("v1"));
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn everything_survives_reopening() {
        let d = tempfile::tempdir().unwrap();
        let (td, applied, events, versions, swaps);
        {
            let s = Store::open(d.path()).unwrap();
            let (a, created) = s
                .create(new_td(vec![vec![1, 2, 3], vec![4]]), Some("k1"))
                .unwrap();
            assert!(created);
            s.create(new_td(vec![vec![9, 9]]), None).unwrap();
            s.insert_version(version("root", None)).unwrap();
            s.set_current(None, "root").unwrap();
            s.claim_queued("job1", 1).unwrap();
            s.set_progress("job1", "train", Some(0.5), Some(12.0))
                .unwrap();
            s.mark_validating("job1").unwrap();
            let (_, n) = s
                .promote(
                    "job1",
                    Some("root"),
                    version("v1", Some("root")),
                    &json!({"ok": true}),
                )
                .unwrap();
            assert_eq!(n, 1);
            td = s.get(&a.id).unwrap();
            applied = s.list(None, 10, None).unwrap();
            events = s.events(&a.id).unwrap();
            versions = s.list_versions().unwrap();
            swaps = s.swaps().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.get(&td.id).unwrap(), td);
        assert_eq!(td.state, State::Applied);
        assert_eq!(td.version.as_deref(), Some("v1"));
        assert_eq!(td.report, Some(json!({"ok": true})));
        assert_eq!(td.attempts, 1);
        assert_eq!(td.sequences, vec![vec![1, 2, 3], vec![4]]);
        assert_eq!(s.list(None, 10, None).unwrap(), applied);
        assert_eq!(s.events(&td.id).unwrap(), events);
        assert_eq!(s.list_versions().unwrap(), versions);
        assert_eq!(s.swaps().unwrap(), swaps);
        assert_eq!(s.current_version().unwrap().as_deref(), Some("v1"));
        assert_eq!(s.get_version("v1").unwrap().takedowns, vec![td.id.clone()]);
        // The idempotency key survives too.
        let (again, created) = s
            .create(new_td(vec![vec![1, 2, 3], vec![4]]), Some("k1"))
            .unwrap();
        assert!(!created);
        assert_eq!(again.id, td.id);
        let r = s
            .read(|tx| tx.query_opt("PRAGMA user_version", &[]))
            .unwrap()
            .unwrap();
        assert_eq!(get::<i64>(&r, 0).unwrap(), SCHEMA_VERSION);
        let r = s
            .read(|tx| tx.query_opt("PRAGMA journal_mode", &[]))
            .unwrap()
            .unwrap();
        assert_eq!(get::<String>(&r, 0).unwrap(), "wal");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let d = tempfile::tempdir().unwrap();
        drop(Store::open(d.path()).unwrap());
        let c = Connection::open(d.path().join(DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Store::open(d.path()).err().unwrap();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn idempotency_key_same_body_returns_the_original() {
        on_both("idempotency_key_same_body_returns_the_original", |s| {
            let (a, created_a) = s.create(new_td(vec![vec![1, 2]]), Some("key")).unwrap();
            let (b, created_b) = s.create(new_td(vec![vec![1, 2]]), Some("key")).unwrap();
            assert!(created_a && !created_b);
            assert_eq!(a, b);
            assert_eq!(s.list(None, 10, None).unwrap().len(), 1);
            // Without a key, every call is a new takedown.
            let (c, _) = s.create(new_td(vec![vec![1, 2]]), None).unwrap();
            let (d, _) = s.create(new_td(vec![vec![1, 2]]), None).unwrap();
            assert_ne!(c.id, d.id);
            assert!(c.id.starts_with("td_") && c.id.len() == 19);
        });
    }

    #[test]
    fn idempotency_key_different_body_conflicts() {
        on_both("idempotency_key_different_body_conflicts", |s| {
            let (a, _) = s.create(new_td(vec![vec![1, 2]]), Some("key")).unwrap();
            for other in [
                new_td(vec![vec![1, 3]]),
                new_td(vec![vec![1], vec![2]]),
                NewTakedown {
                    reason: None,
                    ..new_td(vec![vec![1, 2]])
                },
                NewTakedown {
                    definition: "semantic".into(),
                    ..new_td(vec![vec![1, 2]])
                },
            ] {
                match s.create(other, Some("key")) {
                    Err(Error::IdempotencyConflict { key, existing_id }) => {
                        assert_eq!((key.as_str(), existing_id.as_str()), ("key", a.id.as_str()));
                    }
                    other => panic!("expected a conflict, got {other:?}"),
                }
            }
            assert_eq!(s.list(None, 10, None).unwrap().len(), 1);
        });
    }

    #[test]
    fn empty_requests_are_refused() {
        on_both("empty_requests_are_refused", |s| {
            assert!(matches!(
                s.create(new_td(vec![]), None),
                Err(Error::InvalidInput { .. })
            ));
            match s.create(new_td(vec![vec![1], vec![]]), None) {
                Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "sequences[1]"),
                other => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn legal_transition_table() {
        use State::*;
        let legal = [
            (Queued, Running),
            (Queued, Cancelled),
            (Running, Validating),
            (Running, Queued),
            (Running, Failed),
            (Running, Cancelled),
            (Validating, Running),
            (Validating, Applied),
            (Validating, Rejected),
            (Validating, Failed),
            (Validating, Queued),
            (Validating, Cancelled),
        ];
        for from in State::ALL {
            for to in State::ALL {
                assert_eq!(
                    from.can_go_to(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
        }
        assert!("done".parse::<State>().is_err());
    }

    #[test]
    fn the_happy_path_records_every_transition() {
        on_both("the_happy_path_records_every_transition", |s| {
            let (a, _) = s.create(new_td(vec![vec![1, 2]]), None).unwrap();
            let claimed = s.claim_queued("j", 10).unwrap();
            assert_eq!(claimed.len(), 1);
            assert_eq!(claimed[0].state, State::Running);
            assert_eq!(claimed[0].job_id.as_deref(), Some("j"));
            assert_eq!(s.set_progress("j", "search", Some(0.1), None).unwrap(), 1);
            assert_eq!(
                s.set_progress("j", "search", Some(0.2), Some(3.0)).unwrap(),
                1
            );
            let td = s.get(&a.id).unwrap();
            assert_eq!(
                (td.phase.as_deref(), td.progress, td.eta_seconds),
                (Some("search"), Some(0.2), Some(3.0))
            );
            assert_eq!(s.mark_validating("j").unwrap(), 1);
            assert_eq!(s.finish_applied("j", "v9", &json!({"m": 1})).unwrap(), 1);
            let td = s.get(&a.id).unwrap();
            assert_eq!(td.state, State::Applied);
            assert_eq!(td.version.as_deref(), Some("v9"));
            // queued, running, phase change (only once for two updates), validating, applied
            assert_eq!(
                states(s, &a.id),
                vec![
                    State::Queued,
                    State::Running,
                    State::Running,
                    State::Validating,
                    State::Applied
                ]
            );
            let ev = s.events(&a.id).unwrap();
            assert_eq!(ev[2].detail, json!({"phase": "search"}));
            assert!(ev.windows(2).all(|w| w[0].at <= w[1].at));
        });
    }

    #[test]
    fn rejected_and_failed_paths() {
        on_both("rejected_and_failed_paths", |s| {
            let (a, _) = s.create(new_td(vec![vec![1]]), None).unwrap();
            s.claim_queued("j1", 1).unwrap();
            s.mark_validating("j1").unwrap();
            assert_eq!(
                s.finish_rejected("j1", "perplexity rose 40%", &json!({"ppl": 9}))
                    .unwrap(),
                1
            );
            let td = s.get(&a.id).unwrap();
            assert_eq!(td.state, State::Rejected);
            assert_eq!(td.error.as_deref(), Some("perplexity rose 40%"));
            assert_eq!(td.report, Some(json!({"ppl": 9})));

            let (b, _) = s.create(new_td(vec![vec![2]]), None).unwrap();
            s.claim_queued("j2", 1).unwrap();
            assert_eq!(s.finish_failed("j2", "out of memory").unwrap(), 1);
            assert_eq!(s.get(&b.id).unwrap().state, State::Failed);

            let (c, _) = s.create(new_td(vec![vec![3]]), None).unwrap();
            s.claim_queued("j3", 1).unwrap();
            s.mark_validating("j3").unwrap();
            assert_eq!(s.finish_failed("j3", "load failed").unwrap(), 1);
            assert_eq!(s.get(&c.id).unwrap().state, State::Failed);

            // Requeue of a job from running and from validating.
            let (d, _) = s.create(new_td(vec![vec![4]]), None).unwrap();
            s.claim_queued("j4", 1).unwrap();
            assert_eq!(s.requeue_job("j4").unwrap(), 1);
            s.claim_queued("j5", 1).unwrap();
            s.mark_validating("j5").unwrap();
            assert_eq!(s.requeue_job("j5").unwrap(), 1);
            let td = s.get(&d.id).unwrap();
            assert_eq!(
                (td.state, td.job_id.clone(), td.attempts),
                (State::Queued, None, 2)
            );
        });
    }

    #[test]
    fn illegal_transitions_are_refused_and_change_nothing() {
        on_both("illegal_transitions_are_refused_and_change_nothing", |s| {
            let (a, _) = s.create(new_td(vec![vec![1]]), None).unwrap();
            s.claim_queued("j", 1).unwrap();
            // running -> applied / rejected skip validation.
            for r in [
                s.finish_applied("j", "v", &Value::Null),
                s.finish_rejected("j", "x", &Value::Null),
            ] {
                match r {
                    Err(Error::InvalidTransition { id, from, to }) => {
                        assert_eq!((id.as_str(), from), (a.id.as_str(), State::Running));
                        assert!(matches!(to, State::Applied | State::Rejected));
                    }
                    other => panic!("{other:?}"),
                }
            }
            s.mark_validating("j").unwrap();
            // validating -> validating.
            assert!(matches!(
                s.mark_validating("j"),
                Err(Error::InvalidTransition { .. })
            ));
            assert_eq!(s.get(&a.id).unwrap().state, State::Validating);
            s.finish_applied("j", "v", &Value::Null).unwrap();
            // applied is finished for the job: nothing of it is active any more.
            assert_eq!(s.finish_failed("j", "late").unwrap(), 0);
            assert_eq!(s.get(&a.id).unwrap().state, State::Applied);
            // A job that never existed touches nothing.
            assert_eq!(s.mark_validating("nope").unwrap(), 0);
            assert!(matches!(
                s.claim_queued("", 1),
                Err(Error::InvalidInput { .. })
            ));
            assert!(matches!(
                s.set_progress("j", "x", Some(f64::NAN), None),
                Err(Error::InvalidInput { .. })
            ));
            assert!(matches!(
                s.set_progress("j", "x", Some(1.5), None),
                Err(Error::InvalidInput { .. })
            ));
            assert!(matches!(
                s.set_progress("j", "x", None, Some(-1.0)),
                Err(Error::InvalidInput { .. })
            ));
        });
    }

    #[test]
    fn cancel_rules() {
        on_both("cancel_rules", |s| {
            let ids: Vec<String> = (0..4)
                .map(|i| s.create(new_td(vec![vec![i]]), None).unwrap().0.id)
                .collect();
            // queued
            assert_eq!(s.cancel(&ids[0]).unwrap().state, State::Cancelled);
            assert!(s.is_cancelled(&ids[0]).unwrap());
            // running
            s.claim_queued("j", 1).unwrap();
            assert_eq!(s.cancel(&ids[1]).unwrap().state, State::Cancelled);
            // validating
            s.claim_queued("k", 2).unwrap();
            s.mark_validating("k").unwrap();
            s.cancel(&ids[2]).unwrap();
            // The job's other takedown applies; the cancelled one stays cancelled.
            assert_eq!(s.finish_applied("k", "v", &Value::Null).unwrap(), 1);
            assert_eq!(s.get(&ids[2]).unwrap().state, State::Cancelled);
            assert_eq!(s.get(&ids[3]).unwrap().state, State::Applied);
            assert!(!s.is_cancelled(&ids[3]).unwrap());
            for id in [&ids[0], &ids[3]] {
                match s.cancel(id) {
                    Err(Error::NotCancellable { id: got, state }) => {
                        assert_eq!(&got, id);
                        assert!(state.is_finished());
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(matches!(s.cancel("td_missing"), Err(Error::NotFound(_))));
            assert!(matches!(
                s.is_cancelled("td_missing"),
                Err(Error::NotFound(_))
            ));
        });
    }

    #[test]
    fn claim_is_oldest_first_and_exclusive() {
        on_both("claim_is_oldest_first_and_exclusive", |s| {
            let ids: Vec<String> = (0..5)
                .map(|i| s.create(new_td(vec![vec![i]]), None).unwrap().0.id)
                .collect();
            assert!(s.claim_queued("j0", 0).unwrap().is_empty());
            let a: Vec<String> = s
                .claim_queued("j1", 2)
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect();
            assert_eq!(a, ids[..2]);
            let b: Vec<String> = s
                .claim_queued("j2", 10)
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect();
            assert_eq!(b, ids[2..]);
            assert!(s.claim_queued("j3", 10).unwrap().is_empty());
            // Concurrent claimers never share a takedown.
            let more: Vec<String> = (0..40)
                .map(|i| s.create(new_td(vec![vec![i]]), None).unwrap().0.id)
                .collect();
            let got: Vec<Vec<String>> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..4)
                    .map(|w| {
                        let s = &s;
                        sc.spawn(move || {
                            let mut mine = Vec::new();
                            loop {
                                let c = s.claim_queued(&format!("w{w}"), 3).unwrap();
                                if c.is_empty() {
                                    break mine;
                                }
                                mine.extend(c.into_iter().map(|t| t.id));
                            }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut all: Vec<String> = got.into_iter().flatten().collect();
            all.sort();
            let mut want = more;
            want.sort();
            assert_eq!(all, want);
        });
    }

    #[test]
    fn interrupted_work_is_requeued_at_startup() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c);
        {
            let s = Store::open(d.path()).unwrap();
            a = s.create(new_td(vec![vec![1]]), None).unwrap().0.id;
            b = s.create(new_td(vec![vec![2]]), None).unwrap().0.id;
            c = s.create(new_td(vec![vec![3]]), None).unwrap().0.id;
            s.claim_queued("j1", 1).unwrap();
            s.set_progress("j1", "train", Some(0.7), Some(5.0)).unwrap();
            s.claim_queued("j2", 1).unwrap();
            s.mark_validating("j2").unwrap();
            // The process dies here.
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.requeue_interrupted().unwrap(), 2);
        assert_eq!(s.requeue_interrupted().unwrap(), 0);
        for id in [&a, &b, &c] {
            let td = s.get(id).unwrap();
            assert_eq!(td.state, State::Queued);
            assert_eq!(
                (td.job_id, td.phase, td.progress, td.eta_seconds),
                (None, None, None, None)
            );
        }
        assert_eq!(s.get(&a).unwrap().attempts, 1);
        assert_eq!(
            s.events(&a).unwrap().last().unwrap().detail["reason"],
            "interrupted"
        );
        // Oldest first again; the two interrupted ones each alone (solo: whatever stopped the
        // process may have been one of them), then the one that never ran.
        let mut again = Vec::new();
        for job in ["j3", "j4", "j5"] {
            let claimed: Vec<String> = s
                .claim_queued(job, 3)
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect();
            s.finish_failed(job, "x").unwrap();
            again.push(claimed);
        }
        assert_eq!(again, vec![vec![a], vec![b], vec![c]]);
    }

    #[test]
    fn a_takedown_whose_jobs_keep_dying_with_the_process_fails_after_max_interruptions() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let poison = s.create(new_td(vec![vec![1]]), None).unwrap().0.id;
        // Graceful requeues (shutdown, lost publish) do not count.
        s.claim_queued("g", 1).unwrap();
        s.requeue_job("g").unwrap();
        for round in 1..=MAX_INTERRUPTIONS {
            s.claim_queued(&format!("j{round}"), 1).unwrap();
            // The process dies; the next start recovers.
            let requeued = s.requeue_interrupted().unwrap();
            let td = s.get(&poison).unwrap();
            if round < MAX_INTERRUPTIONS {
                assert_eq!((requeued, td.state), (1, State::Queued), "round {round}");
            } else {
                assert_eq!((requeued, td.state), (0, State::Failed));
                assert!(td.error.unwrap().contains("3 attempts"));
            }
        }
        // It stays guarded, and nothing is left to claim.
        assert_eq!(s.sequences_to_guard().unwrap(), vec![vec![1]]);
        assert!(s.claim_queued("k", 1).unwrap().is_empty());
    }

    #[test]
    fn paging_and_filters() {
        on_both("paging_and_filters", |s| {
            let ids: Vec<String> = (0..7)
                .map(|i| s.create(new_td(vec![vec![i]]), None).unwrap().0.id)
                .collect();
            s.cancel(&ids[1]).unwrap();
            s.cancel(&ids[4]).unwrap();
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = s.list(after.as_deref(), 3, None).unwrap();
                if page.is_empty() {
                    break;
                }
                assert!(page.len() <= 3);
                after = page.last().map(|t| t.id.clone());
                seen.extend(page.into_iter().map(|t| t.id));
            }
            assert_eq!(seen, ids);
            let queued: Vec<String> = s
                .list(None, 100, Some(State::Queued))
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect();
            assert_eq!(
                queued,
                vec![
                    ids[0].clone(),
                    ids[2].clone(),
                    ids[3].clone(),
                    ids[5].clone(),
                    ids[6].clone()
                ]
            );
            let page = s.list(Some(&ids[2]), 2, Some(State::Queued)).unwrap();
            assert_eq!(
                page.iter().map(|t| &t.id).collect::<Vec<_>>(),
                vec![&ids[3], &ids[5]]
            );
            assert!(s.list(None, 0, None).unwrap().is_empty());
            assert!(matches!(
                s.list(Some("td_nope"), 3, None),
                Err(Error::NotFound(_))
            ));
            let counts = s.counts_by_state().unwrap();
            assert_eq!(counts.len(), State::ALL.len());
            assert_eq!(counts[0], (State::Queued, 5));
            assert_eq!(counts[6], (State::Cancelled, 2));
            assert_eq!(counts[3], (State::Applied, 0));
        });
    }

    #[test]
    fn every_accepted_takedown_is_guarded_until_cancelled() {
        on_both("every_accepted_takedown_is_guarded_until_cancelled", |s| {
            let a = s.create(new_td(vec![vec![1, 1]]), None).unwrap().0.id;
            s.create(new_td(vec![vec![2, 2], vec![3, 3]]), None)
                .unwrap();
            let c = s.create(new_td(vec![vec![4, 4]]), None).unwrap().0.id;
            s.claim_queued("j", 1).unwrap();
            s.finish_failed("j", "boom").unwrap();
            assert_eq!(s.get(&a).unwrap().state, State::Failed);
            s.cancel(&c).unwrap();
            assert_eq!(
                s.sequences_to_guard().unwrap(),
                vec![vec![1, 1], vec![2, 2], vec![3, 3]]
            );
        });
    }

    #[test]
    fn current_version_is_compare_and_swap() {
        on_both("current_version_is_compare_and_swap", |s| {
            assert_eq!(s.current_version().unwrap(), None);
            let (root, created) = s.insert_version(version("root", None)).unwrap();
            assert!(created && root.seq >= 1);
            let (again, created) = s.insert_version(version("root", None)).unwrap();
            assert!(!created);
            assert_eq!(again, root);
            assert!(matches!(
                s.insert_version(version("orphan", Some("missing"))),
                Err(Error::VersionNotFound(_))
            ));
            let (v1, _) = s.insert_version(version("v1", Some("root"))).unwrap();
            assert!(v1.seq > root.seq);
            // Unknown target.
            assert!(matches!(
                s.set_current(None, "nope"),
                Err(Error::VersionNotFound(_))
            ));
            s.set_current(None, "root").unwrap();
            // Wrong expectation: None while root is current.
            match s.set_current(None, "v1") {
                Err(Error::VersionConflict { expected, actual }) => {
                    assert_eq!((expected, actual.as_deref()), (None, Some("root")));
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(
                s.set_current(Some("v1"), "v1"),
                Err(Error::VersionConflict { .. })
            ));
            s.set_current(Some("root"), "v1").unwrap();
            s.set_current(Some("v1"), "root").unwrap();
            s.set_current_as(Some("root"), "v1", SwapKind::Promote)
                .unwrap();
            assert_eq!(s.current_version().unwrap().as_deref(), Some("v1"));
            let kinds: Vec<(Option<String>, String, SwapKind)> = s
                .swaps()
                .unwrap()
                .into_iter()
                .map(|w| (w.from, w.to, w.kind))
                .collect();
            assert_eq!(
                kinds,
                vec![
                    (Some("root".into()), "v1".into(), SwapKind::Promote),
                    (Some("v1".into()), "root".into(), SwapKind::Rollback),
                    (Some("root".into()), "v1".into(), SwapKind::Promote),
                    (None, "root".into(), SwapKind::Promote),
                ]
            );
            let ids: Vec<String> = s
                .list_versions()
                .unwrap()
                .into_iter()
                .map(|v| v.id)
                .collect();
            assert_eq!(ids, vec!["v1", "root"]);
            assert!(matches!(
                s.get_version("zz"),
                Err(Error::VersionNotFound(_))
            ));
        });
    }

    #[test]
    fn concurrent_compare_and_swap_has_one_winner() {
        on_both("concurrent_compare_and_swap_has_one_winner", |s| {
            s.insert_version(version("root", None)).unwrap();
            for i in 0..8 {
                s.insert_version(version(&format!("c{i}"), Some("root")))
                    .unwrap();
            }
            s.set_current(None, "root").unwrap();
            let wins: usize = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..8)
                    .map(|i| {
                        let s = &s;
                        sc.spawn(move || {
                            usize::from(s.set_current(Some("root"), &format!("c{i}")).is_ok())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(wins, 1);
        });
    }

    #[test]
    fn promote_is_all_or_nothing() {
        on_both("promote_is_all_or_nothing", |s| {
            s.insert_version(version("root", None)).unwrap();
            s.set_current(None, "root").unwrap();
            let a = s.create(new_td(vec![vec![1]]), None).unwrap().0.id;
            s.claim_queued("j", 1).unwrap();
            // Still running: promote refuses and registers nothing.
            assert!(matches!(
                s.promote("j", Some("root"), version("v1", Some("root")), &Value::Null),
                Err(Error::InvalidTransition { .. })
            ));
            assert!(matches!(
                s.get_version("v1"),
                Err(Error::VersionNotFound(_))
            ));
            s.mark_validating("j").unwrap();
            // Lost CAS: nothing changes either.
            assert!(matches!(
                s.promote(
                    "j",
                    Some("other"),
                    version("v1", Some("root")),
                    &Value::Null
                ),
                Err(Error::VersionConflict { .. })
            ));
            assert_eq!(s.get(&a).unwrap().state, State::Validating);
            assert!(s.get_version("v1").is_err());
            let (rec, n) = s
                .promote(
                    "j",
                    Some("root"),
                    version("v1", Some("root")),
                    &json!({"ok": 1}),
                )
                .unwrap();
            assert_eq!((rec.takedowns, n), (vec![a.clone()], 1));
            assert_eq!(s.current_version().unwrap().as_deref(), Some("v1"));
        });
    }

    #[test]
    fn rollback_requeues_what_the_undone_versions_applied() {
        on_both("rollback_requeues_what_the_undone_versions_applied", |s| {
            s.insert_version(version("root", None)).unwrap();
            s.set_current(None, "root").unwrap();
            let mut applied = Vec::new();
            for (job, v, parent) in [("j1", "v1", "root"), ("j2", "v2", "v1")] {
                let id = s.create(new_td(vec![vec![1]]), None).unwrap().0.id;
                s.claim_queued(job, 1).unwrap();
                s.mark_validating(job).unwrap();
                s.promote(job, Some(parent), version(v, Some(parent)), &Value::Null)
                    .unwrap();
                applied.push(id);
            }
            // requeue_applied_by on its own.
            let extra = s.create(new_td(vec![vec![7]]), None).unwrap().0.id;
            assert_eq!(s.requeue_applied_by("nothing").unwrap(), 0);
            // Not an ancestor.
            assert!(matches!(
                s.rollback("v2", "v3"),
                Err(Error::VersionNotFound(_))
            ));
            s.insert_version(version("side", Some("root"))).unwrap();
            assert!(matches!(
                s.rollback("v2", "side"),
                Err(Error::InvalidInput { .. })
            ));
            // Stale expectation.
            assert!(matches!(
                s.rollback("v1", "root"),
                Err(Error::VersionConflict { .. })
            ));
            assert_eq!(s.get(&applied[0]).unwrap().state, State::Applied);
            assert_eq!(s.rollback("v2", "root").unwrap(), 2);
            assert_eq!(s.current_version().unwrap().as_deref(), Some("root"));
            for id in &applied {
                let td = s.get(id).unwrap();
                assert_eq!((td.state, td.version), (State::Queued, None));
                assert_eq!(
                    s.events(id).unwrap().last().unwrap().detail["reason"],
                    "rollback"
                );
            }
            assert_eq!(s.swaps().unwrap()[0].kind, SwapKind::Rollback);
            // Requeued takedowns are claimed again in creation order.
            let order: Vec<String> = s
                .claim_queued("j3", 10)
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect();
            assert_eq!(order, vec![applied[0].clone(), applied[1].clone(), extra]);
        });
    }

    #[test]
    fn requeue_applied_by_only_touches_that_version() {
        on_both("requeue_applied_by_only_touches_that_version", |s| {
            let a = s.create(new_td(vec![vec![1]]), None).unwrap().0.id;
            let b = s.create(new_td(vec![vec![2]]), None).unwrap().0.id;
            s.claim_queued("j1", 1).unwrap();
            s.mark_validating("j1").unwrap();
            s.finish_applied("j1", "va", &Value::Null).unwrap();
            s.claim_queued("j2", 1).unwrap();
            s.mark_validating("j2").unwrap();
            s.finish_applied("j2", "vb", &Value::Null).unwrap();
            assert_eq!(s.requeue_applied_by("vb").unwrap(), 1);
            assert_eq!(s.get(&a).unwrap().state, State::Applied);
            assert_eq!(s.get(&b).unwrap().state, State::Queued);
        });
    }
}
