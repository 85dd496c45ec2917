//! The PostgreSQL side of the takedown store (fleet mode, `--database-url postgres://…`): the
//! schema and its migrations. The queries are the SQLite store's, through `db::Tx`.
//!
//! Invariants:
//! - The schema is the SQLite schema's, in PostgreSQL's types: `seq` columns are identities,
//!   times `DOUBLE PRECISION` Unix seconds, counters and flags `BIGINT`, JSON documents `TEXT`
//!   (the same encoding the SQLite store writes, so one row mapper reads both).
//! - [`migrate`] runs every pending migration and the version bump in **one** transaction that
//!   first takes a transaction-scoped advisory lock ([`MIGRATION_LOCK`]): replicas starting at
//!   once migrate one after the other, and the later ones find nothing left to do. PostgreSQL's
//!   DDL is transactional, so a crash mid-migration leaves the previous schema whole.
//! - A database whose schema version is newer than [`SCHEMA_VERSION`] is refused (`Corrupt`)
//!   before anything is written: older code never writes a newer schema's tables.

use super::super::{Error, Result};
use super::db::pg;

/// The schema version this code writes (`lethe_schema.version`).
pub const SCHEMA_VERSION: i64 = 1;

/// The advisory-lock key migrations hold (an arbitrary constant: "lethe" in ASCII, then 1).
pub const MIGRATION_LOCK: i64 = 0x6c65_7468_6501;

/// Migrations, index i upgrading the schema version i → i + 1. Version 1 is SQLite's version 2.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE takedowns (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL CHECK (state IN
                      ('queued','running','validating','applied','rejected','failed','cancelled')),
    sequences       TEXT NOT NULL,
    definition      TEXT NOT NULL,
    reason          TEXT,
    requester       TEXT,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    phase           TEXT,
    progress        DOUBLE PRECISION,
    eta_seconds     DOUBLE PRECISION,
    version         TEXT,
    report          TEXT,
    error           TEXT,
    job_id          TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT NOT NULL,
    solo            BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX takedowns_by_state ON takedowns (state, seq);
CREATE INDEX takedowns_by_job ON takedowns (job_id);
CREATE INDEX takedowns_by_version ON takedowns (version);
CREATE TABLE events (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    takedown_id TEXT NOT NULL REFERENCES takedowns (id),
    at          DOUBLE PRECISION NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX events_by_takedown ON events (takedown_id, seq);
CREATE TABLE versions (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    parent     TEXT REFERENCES versions (id),
    created_at DOUBLE PRECISION NOT NULL,
    takedowns  TEXT NOT NULL,
    metrics    TEXT NOT NULL,
    path       TEXT NOT NULL
);
CREATE TABLE current_version (
    one        INTEGER PRIMARY KEY CHECK (one = 1),
    version    TEXT NOT NULL REFERENCES versions (id),
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE swaps (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_version TEXT,
    to_version   TEXT NOT NULL,
    at           DOUBLE PRECISION NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('promote','rollback'))
);
"#];

/// Brings the database to [`SCHEMA_VERSION`] (module docs). Returns the version found before.
pub fn migrate(client: &mut postgres::Client) -> Result<i64> {
    let mut tx = client.transaction().map_err(pg("begin migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg("take the migration lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS lethe_schema (
             one INTEGER PRIMARY KEY CHECK (one = 1),
             version BIGINT NOT NULL)",
    )
    .map_err(pg("create lethe_schema"))?;
    let found: i64 = tx
        .query_opt("SELECT version FROM lethe_schema WHERE one = 1", &[])
        .map_err(pg("read the schema version"))?
        .map_or(0, |r| r.get(0));
    if found > SCHEMA_VERSION {
        return Err(Error::Corrupt {
            what: "database schema".into(),
            message: format!(
                "schema version {found} is newer than this lethe understands ({SCHEMA_VERSION})"
            ),
        });
    }
    for step in &MIGRATIONS[found.max(0) as usize..] {
        tx.batch_execute(step).map_err(pg("migrate schema"))?;
    }
    tx.execute(
        "INSERT INTO lethe_schema (one, version) VALUES (1, $1)
         ON CONFLICT (one) DO UPDATE SET version = EXCLUDED.version",
        &[&SCHEMA_VERSION],
    )
    .map_err(pg("set the schema version"))?;
    tx.commit().map_err(pg("commit migration"))?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pg::PgServer;

    fn connect(url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }

    #[test]
    fn replicas_starting_at_once_migrate_exactly_once_and_a_newer_schema_is_refused() {
        let Some(server) = PgServer::start() else {
            return;
        };
        let url = server.new_database("migrate_once");
        // Four "replicas" migrate a fresh database at the same moment: the lock orders them,
        // one creates the schema (found 0) and the others find it current.
        let barrier = std::sync::Barrier::new(4);
        let found: Vec<i64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut c = connect(&url);
                        barrier.wait();
                        migrate(&mut c).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = found.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            vec![0, SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION],
            "{found:?}"
        );
        let mut c = connect(&url);
        let tables: i64 = c
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' \
                 AND table_name IN ('takedowns','events','versions','current_version','swaps')",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(tables, 5);
        // The schema enforces what SQLite's does: one current-version row, known states.
        let e = c
            .execute(
                "INSERT INTO takedowns (id, state, sequences, definition, created_at, \
                 updated_at, request_hash) VALUES ('t', 'lost', '[]', 'd', 0, 0, 'h')",
                &[],
            )
            .unwrap_err();
        let db = e.as_db_error().map(ToString::to_string).unwrap_or_default();
        assert!(db.contains("check constraint"), "{db}");
        c.execute("UPDATE lethe_schema SET version = 99", &[])
            .unwrap();
        let e = migrate(&mut c).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("99"), "{e}");
    }
}
