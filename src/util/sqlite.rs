//! Opening a durable SQLite database in lethe's data directory: the one sequence the takedown
//! store and the audit-job store share.
//!
//! Invariants, on success of [`open_durable`]:
//! - The data directory exists and (Unix) is 0700; the database file was created 0600 before
//!   SQLite opened it, and an existing database, `-wal`, `-shm` or `-journal` file more open
//!   than 0600 is tightened with a warning: these files hold the sequences people asked to be
//!   forgotten.
//! - The connection is in WAL mode (or the open fails: a file system without shared memory
//!   cannot give the stores their crash guarantees), with `synchronous=FULL`, foreign keys on
//!   and a busy timeout.
//! - A database file this call created has its directory entry fsynced, so it survives a crash.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

/// How long a writer waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why [`open_durable`] failed; each store maps it onto its own error type.
#[derive(Debug)]
pub enum OpenError {
    /// A file or directory operation failed (`op` names it: "create", "chmod", ...).
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A SQLite call failed (`op` names it: "open database", "set pragmas", ...).
    Sql {
        op: &'static str,
        source: rusqlite::Error,
    },
    /// SQLite kept another journal mode (`mode`) instead of WAL for the database at `path`.
    NotWal { path: PathBuf, mode: String },
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            OpenError::Sql { op, source } => write!(f, "{op}: {source}"),
            OpenError::NotWal { mode, .. } => {
                write!(f, "journal_mode is {mode}, WAL could not be enabled")
            }
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> OpenError + 'a {
    move |source| OpenError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> OpenError {
    move |source| OpenError::Sql { op, source }
}

/// Opens (creating if needed) `data_dir/file` as the module docs describe. Returns the
/// connection, the database's path and whether the file already existed (a new one needs its
/// schema).
pub fn open_durable(data_dir: &Path, file: &str) -> Result<(Connection, PathBuf, bool), OpenError> {
    std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
    let path = data_dir.join(file);
    let existed = path.exists();
    restrict_permissions(data_dir, &path)?;
    let conn = Connection::open(&path).map_err(sql("open database"))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(sql("set busy_timeout"))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(sql("set journal_mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::NotWal { path, mode });
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(sql("set pragmas"))?;
    if !existed {
        if let Ok(d) = std::fs::File::open(data_dir) {
            d.sync_all().map_err(io("fsync", data_dir))?;
        }
    }
    Ok((conn, path, existed))
}

/// The data directory 0700 and the database's files 0600 (module docs).
fn restrict_permissions(data_dir: &Path, db: &Path) -> Result<(), OpenError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let tighten = |path: &Path, mode: u32| -> Result<(), OpenError> {
            let meta = std::fs::metadata(path).map_err(io("stat", path))?;
            let old = meta.permissions().mode() & 0o777;
            if old & !mode != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(io("chmod", path))?;
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
                .map_err(io("create", db))?;
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

#[cfg(test)]
mod tests {
    use super::open_durable;

    #[test]
    fn a_database_opens_private_durable_and_in_wal_mode() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        let (conn, path, existed) = open_durable(&dir, "x.sqlite3").unwrap();
        assert!(!existed && path == dir.join("x.sqlite3"));
        let get = |q: &str| -> String {
            conn.query_row(q, [], |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .unwrap()
        };
        assert!(get("PRAGMA journal_mode").contains("wal"));
        assert_eq!(get("PRAGMA synchronous"), "Integer(2)");
        assert_eq!(get("PRAGMA foreign_keys"), "Integer(1)");
        drop(conn);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode =
                |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&path), 0o600);
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let (_, _, existed) = open_durable(&dir, "x.sqlite3").unwrap();
            assert!(existed);
            assert_eq!((mode(&dir), mode(&path)), (0o700, 0o600));
        }
    }
}
