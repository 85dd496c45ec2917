//! Fleet mode (`lethe serve --database-url postgres://… --versions-url …`): several replicas
//! behind a load balancer share one PostgreSQL store and one version store; exactly one of them
//! runs unlearning jobs, and every one follows the store's live version and guard.
//!
//! Invariants:
//! - **One worker.** Only the replica whose dedicated PostgreSQL session holds the advisory
//!   lock [`WORKER_LOCK`] claims jobs ([`Fleet::worker_lock`]). The lock lives and dies with
//!   that session: a replica that is killed or loses its connection loses it, and the next
//!   replica to try takes it, re-queues the takedowns the old worker left `running` or
//!   `validating` (as a restart does on one machine) and runs them. A worker that finds its
//!   session gone cancels its job ([`Fleet::still_worker`]); it never publishes without it.
//! - **Every replica follows the store** (`worker::follow`): within one poll of a commit (a
//!   notification on `store::NOTIFY_CHANNEL`, else [`POLL`]) it guards every new takedown,
//!   rebuilds the guard after a cancel, and loads, smoke-tests and swaps to the store's live
//!   version, fetched from the shared version store and verified by hash.
//! - **Staleness.** A replica that has not read the store for longer than
//!   `--guard-staleness` is not ready ([`Fleet::fresh`]): it might miss a takedown accepted
//!   elsewhere, so the load balancer must stop sending it traffic.
//! - A version is uploaded to the shared store before the store's pointer moves to it
//!   (`worker::publish`), so a replica told to follow a version can always fetch it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::store::pg_error as pg;
use super::versions::remote::SharedVersions;
use super::Result;

/// The advisory-lock key the fleet's worker holds ("lethe" in ASCII, then 3).
pub const WORKER_LOCK: i64 = 0x6c65_7468_6503;
/// How often a replica reads the store when no notification arrives.
pub const POLL: Duration = Duration::from_millis(500);
/// How long a replica waits for PostgreSQL to answer a liveness query of the worker session.
const LOCK_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Fleet settings (`lethe serve` flags).
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `postgres://user:password@host:port/db` (never logged: `Debug` hides it).
    pub database_url: Secret,
    /// The shared version store: `file:///dir`, `s3://bucket/prefix`, ….
    pub versions_url: String,
    /// Longer than this without reading the store and the replica is not ready.
    pub guard_staleness: Duration,
}

/// A string that never shows in logs.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The host and database only: the password stays out of logs.
        let shown = self.0.rsplit('@').next().unwrap_or("");
        write!(f, "\"postgres://…@{shown}\"")
    }
}

/// What [`Fleet::worker_lock`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerLock {
    /// This replica held the lock already.
    Held,
    /// This replica just took it: the previous worker is gone.
    Acquired,
    /// Another replica holds it (or the database cannot be reached).
    Elsewhere,
}

/// The worker lock's database session.
struct LockSession {
    client: postgres::Client,
    /// Whether this session holds the lock.
    held: bool,
}

/// A replica's fleet state: the shared version store, the worker lock's session, and when the
/// store was last read.
pub struct Fleet {
    pub config: FleetConfig,
    pub versions: SharedVersions,
    /// The session that asks for [`WORKER_LOCK`] (and holds it while this replica is the
    /// worker).
    lock: Mutex<Option<LockSession>>,
    last_read: Mutex<Instant>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Opens the shared version store. The store itself is opened by `Takedowns::open`.
    pub fn open(config: FleetConfig) -> Result<Fleet> {
        let versions = SharedVersions::open(&config.versions_url)?;
        Ok(Fleet {
            config,
            versions,
            lock: Mutex::new(None),
            last_read: Mutex::new(Instant::now()),
        })
    }

    /// Whether this replica is the fleet's worker, taking the lock if it is free. A replica
    /// that is not keeps its session and asks again on it at the next call.
    pub fn worker_lock(&self) -> WorkerLock {
        let mut lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = lock.as_mut() {
            if s.client.is_valid(LOCK_CHECK_TIMEOUT).is_err() {
                if s.held {
                    tracing::error!("the worker lock's database session is gone; this replica stops being the worker");
                }
                *lock = None;
            } else if s.held {
                return WorkerLock::Held;
            }
        }
        let s = match lock.as_mut() {
            Some(s) => s,
            None => match postgres::Client::connect(&self.config.database_url.0, postgres::NoTls) {
                Ok(client) => lock.insert(LockSession {
                    client,
                    held: false,
                }),
                Err(e) => {
                    tracing::warn!(error = %pg("connect for the worker lock")(e), "cannot reach the database for the worker lock");
                    return WorkerLock::Elsewhere;
                }
            },
        };
        match s
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&WORKER_LOCK])
        {
            Ok(row) if row.get::<_, bool>(0) => {
                s.held = true;
                WorkerLock::Acquired
            }
            Ok(_) => WorkerLock::Elsewhere,
            Err(e) => {
                tracing::warn!(error = %pg("try the worker lock")(e), "cannot take the worker lock");
                *lock = None;
                WorkerLock::Elsewhere
            }
        }
    }

    /// Whether this replica still holds the worker lock (its session answers); a job checks it
    /// twice a second and is cancelled when it does not.
    pub fn still_worker(&self) -> bool {
        let mut lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let alive = lock
            .as_mut()
            .is_some_and(|s| s.held && s.client.is_valid(LOCK_CHECK_TIMEOUT).is_ok());
        if !alive && lock.as_ref().is_some_and(|s| s.held) {
            *lock = None;
        }
        alive
    }

    /// Whether this replica holds the worker lock (without checking its session).
    pub fn is_worker(&self) -> bool {
        self.lock
            .lock()
            .is_ok_and(|l| l.as_ref().is_some_and(|s| s.held))
    }

    /// Records a successful read of the store.
    pub fn mark_read(&self) {
        if let Ok(mut t) = self.last_read.lock() {
            *t = Instant::now();
        }
    }

    /// Time since the store was last read.
    pub fn staleness(&self) -> Duration {
        self.last_read
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pg::PgServer;

    fn fleet(url: &str, shared: &std::path::Path) -> Fleet {
        Fleet::open(FleetConfig {
            database_url: Secret(url.into()),
            versions_url: format!("file://{}", shared.display()),
            guard_staleness: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[test]
    fn one_replica_holds_the_worker_lock_and_it_moves_when_its_session_dies() {
        let Some(server) = PgServer::start() else {
            return;
        };
        let url = server.new_database("worker_lock");
        let shared = tempfile::tempdir().unwrap();
        let (a, b) = (fleet(&url, shared.path()), fleet(&url, shared.path()));
        assert_eq!(a.worker_lock(), WorkerLock::Acquired);
        assert_eq!(b.worker_lock(), WorkerLock::Elsewhere);
        assert_eq!(a.worker_lock(), WorkerLock::Held);
        assert!(a.still_worker() && !b.still_worker());
        // The worker's session ends (as when its process is killed): the server frees the lock
        // as soon as it sees the connection close, and the other replica takes it.
        drop(a);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match b.worker_lock() {
                WorkerLock::Acquired => break,
                other => assert_eq!(other, WorkerLock::Elsewhere),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the lock was never freed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(b.is_worker() && b.still_worker());
        assert_eq!(b.worker_lock(), WorkerLock::Held);
    }

    #[test]
    fn the_database_password_never_shows() {
        let s = format!(
            "{:?}",
            Secret("postgres://lethe:hunter2@db:5432/lethe".into())
        );
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("db:5432/lethe"), "{s}");
    }
}
