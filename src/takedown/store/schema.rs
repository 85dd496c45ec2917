//! The database schema: numbered migrations keyed on `PRAGMA user_version`.
//!
//! Invariants:
//! - Migration `i` upgrades `user_version` `i → i + 1` in one transaction with the version
//!   bump, so a crash mid-upgrade leaves the database at the last complete step, and the next
//!   open resumes there.
//! - A database whose `user_version` is newer than `SCHEMA_VERSION` is refused (`Corrupt`)
//!   before any migration runs: older code never writes a newer schema's tables.
//! - The schema enforces what it can: unique takedown ids and idempotency keys, known state and
//!   swap-kind names, one current-version row pointing at a registered version, parents and
//!   events referencing existing rows (foreign keys are on).
//! - The file is opened by [`crate::util::sqlite::open_durable`] (WAL, `synchronous=FULL`,
//!   the data directory 0700 and the database's files 0600), whose failures map onto this
//!   module's [`Error`] here.

use std::path::Path;

use rusqlite::Connection;

use super::super::{Error, Result};
use super::rows::sql;
use crate::util::sqlite::OpenError;

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Io { op, path, source } => Error::Io { op, path, source },
            OpenError::Sql { op, source } => Error::Sql { op, source },
            OpenError::NotWal { ref path, .. } => Error::Corrupt {
                what: path.display().to_string(),
                message: e.to_string(),
            },
        }
    }
}

/// The schema version this code writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// Migrations, index i upgrading user_version i → i + 1.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE takedowns (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL CHECK (state IN
                      ('queued','running','validating','applied','rejected','failed','cancelled')),
    sequences       TEXT NOT NULL,
    definition      TEXT NOT NULL,
    reason          TEXT,
    requester       TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    phase           TEXT,
    progress        REAL,
    eta_seconds     REAL,
    version         TEXT,
    report          TEXT,
    error           TEXT,
    job_id          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT NOT NULL
);
CREATE INDEX takedowns_by_state ON takedowns (state, seq);
CREATE INDEX takedowns_by_job ON takedowns (job_id);
CREATE INDEX takedowns_by_version ON takedowns (version);
CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    takedown_id TEXT NOT NULL REFERENCES takedowns (id),
    at          REAL NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX events_by_takedown ON events (takedown_id, seq);
CREATE TABLE versions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    parent     TEXT REFERENCES versions (id),
    created_at REAL NOT NULL,
    takedowns  TEXT NOT NULL,
    metrics    TEXT NOT NULL,
    path       TEXT NOT NULL
);
CREATE TABLE current_version (
    one        INTEGER PRIMARY KEY CHECK (one = 1),
    version    TEXT NOT NULL REFERENCES versions (id),
    updated_at REAL NOT NULL
);
CREATE TABLE swaps (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    from_version TEXT,
    to_version   TEXT NOT NULL,
    at           REAL NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('promote','rollback'))
);
"#,
    // 1 → 2: `solo` marks a takedown that must run in a job of its own (its coalesced job failed,
    // was rejected or was interrupted), so one bad takedown cannot keep failing the others.
    r#"
ALTER TABLE takedowns ADD COLUMN solo INTEGER NOT NULL DEFAULT 0;
"#,
];

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("read user_version"))?;
    if version > SCHEMA_VERSION {
        return Err(Error::Corrupt {
            what: path.display().to_string(),
            message: format!(
                "schema version {version} is newer than this lethe understands ({SCHEMA_VERSION})"
            ),
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin migration"))?;
        tx.execute_batch(step).map_err(sql("migrate schema"))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(sql("set user_version"))?;
        tx.commit().map_err(sql("commit migration"))?;
    }
    Ok(())
}
