//! The database schema: numbered migrations keyed on `PRAGMA user_version`, and the data
//! directory's permissions.
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
//! - On Unix, before SQLite opens the database: the data directory is made 0700, a new database
//!   file is created 0600, and an existing database, `-wal`, `-shm` or `-journal` file more
//!   open than 0600 is tightened with a warning.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use super::super::{Error, Result};
use super::immediate;
use super::rows::sql;

/// The schema version this code writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;
/// How long a writer waits for another connection's lock before failing.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The data directory holds the sequences people asked to be forgotten: it is made private to
/// the user lethe runs as (0700), and the database with its WAL and shared-memory files 0600
/// (SQLite creates `-wal` and `-shm` with the database file's mode). A directory or file that
/// was more open is tightened, with a warning.
pub(super) fn restrict_permissions(data_dir: &Path, db: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tighten = |path: &Path, mode: u32| -> Result<()> {
            let meta = std::fs::metadata(path).map_err(Error::io("stat", path))?;
            let old = meta.permissions().mode() & 0o777;
            if old & !mode != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(Error::io("chmod", path))?;
                tracing::warn!(path = %path.display(), old = format!("{old:o}"),
                    new = format!("{mode:o}"), "tightened permissions of the data directory");
            }
            Ok(())
        };
        tighten(data_dir, 0o700)?;
        if !db.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(db)
                .map_err(Error::io("create", db))?;
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let f = PathBuf::from(format!("{}{suffix}", db.display()));
            if f.exists() {
                tighten(&f, 0o600)?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (data_dir, db);
    Ok(())
}

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
        let tx = immediate(conn)?;
        tx.execute_batch(step).map_err(sql("migrate schema"))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(sql("set user_version"))?;
        tx.commit().map_err(sql("commit migration"))?;
    }
    Ok(())
}
