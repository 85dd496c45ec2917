//! What a fleet replica reads from the shared store to follow it (issue #20): the takedowns to
//! guard that it has not seen yet, whether any was cancelled, and the live-version pointer.
//!
//! Invariants:
//! - [`Store::fleet_view`] is one read transaction: the new takedowns, the cancel count and the
//!   pointer are one snapshot.
//! - Every committed PostgreSQL write notifies [`NOTIFY_CHANNEL`] (in the transaction, so the
//!   notification is delivered only if it commits): replicas listening on it poll at once
//!   instead of at their next poll.
//! - Writers serialize (the store's write lock), so takedowns commit in `seq` order: a replica
//!   that has seen every takedown up to `seq` s never misses one below s later.

use super::db::{get, Tx};
use super::rows::json_col;
use super::{Result, State, Store};

/// The PostgreSQL channel every committed store write notifies.
pub const NOTIFY_CHANNEL: &str = "lethe_store";

/// One snapshot of what a replica follows.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetView {
    /// The highest takedown `seq` seen (the `after` given when nothing is newer).
    pub last_seq: i64,
    /// Sequences of the takedowns after `after` that are not cancelled, in creation order.
    pub new_sequences: Vec<Vec<u32>>,
    /// How many takedowns are cancelled: when it changes, the guard is rebuilt.
    pub cancelled: u64,
    /// The live version and when the pointer last moved (Unix seconds), if one is set.
    pub current: Option<(String, f64)>,
}

impl Store {
    /// The takedowns created after `after` (a `seq`), the cancel count and the live-version
    /// pointer, in one snapshot.
    pub fn fleet_view(&self, after: i64) -> Result<FleetView> {
        self.read(|tx| {
            let rows = tx.query(
                "SELECT seq, sequences, state FROM takedowns WHERE seq > ?1 ORDER BY seq",
                &[&after],
            )?;
            let mut view = FleetView {
                last_seq: after,
                new_sequences: Vec::new(),
                cancelled: 0,
                current: None,
            };
            for r in &rows {
                view.last_seq = view.last_seq.max(get::<i64>(r, 0)?);
                if get::<State>(r, 2)? != State::Cancelled {
                    view.new_sequences.extend(json_col::<Vec<Vec<u32>>>(r, 1)?);
                }
            }
            let n = tx.query_opt(
                "SELECT COUNT(*) FROM takedowns WHERE state = ?1",
                &[&State::Cancelled],
            )?;
            view.cancelled = n.map_or(Ok(0), |r| get::<i64>(&r, 0))?.max(0) as u64;
            view.current = match tx.query_opt(
                "SELECT version, updated_at FROM current_version WHERE one = 1",
                &[],
            )? {
                Some(r) => Some((get::<String>(&r, 0)?, get::<f64>(&r, 1)?)),
                None => None,
            };
            Ok(view)
        })
    }
}

/// Notifies [`NOTIFY_CHANNEL`] inside a PostgreSQL write transaction (nothing on SQLite).
pub(super) fn notify(tx: &mut dyn Tx) -> Result<()> {
    if tx.dialect() == super::db::Dialect::Postgres {
        tx.execute(&format!("NOTIFY {NOTIFY_CHANNEL}"), &[])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::takedown::{NewTakedown, NewVersion};
    use crate::test_util::pg::PgServer;

    fn td(seq: Vec<u32>) -> NewTakedown {
        NewTakedown {
            sequences: vec![seq],
            definition: "exact".into(),
            reason: None,
            requester: None,
        }
    }

    fn check(s: &Store) {
        let empty = s.fleet_view(0).unwrap();
        assert_eq!(
            (empty.last_seq, empty.cancelled, empty.current),
            (0, 0, None)
        );
        let a = s.create(td(vec![1, 2, 3]), None).unwrap().0;
        let b = s.create(td(vec![4, 5, 6]), None).unwrap().0;
        let all = s.fleet_view(0).unwrap();
        assert_eq!(all.new_sequences, vec![vec![1, 2, 3], vec![4, 5, 6]]);
        // Only what came after the seq a replica has seen.
        let first = s.fleet_view(0).unwrap().last_seq;
        let after_a = s.fleet_view(first - 1).unwrap();
        assert_eq!(after_a.new_sequences, vec![vec![4, 5, 6]]);
        let none = s.fleet_view(all.last_seq).unwrap();
        assert!(none.new_sequences.is_empty());
        assert_eq!(none.last_seq, all.last_seq);
        // A cancel shows as a changed count, and a cancelled takedown is not guarded.
        s.cancel(&b.id).unwrap();
        let v = s.fleet_view(0).unwrap();
        assert_eq!(v.cancelled, 1);
        assert_eq!(v.new_sequences, vec![vec![1, 2, 3]]);
        // The live-version pointer and when it moved.
        s.insert_version(NewVersion {
            id: "v0".into(),
            parent: None,
            takedowns: vec![],
            metrics: serde_json::json!({}),
            path: "/v0".into(),
        })
        .unwrap();
        let before = crate::util::unix_now();
        s.set_current(None, "v0").unwrap();
        let (v, at) = s.fleet_view(0).unwrap().current.unwrap();
        assert_eq!(v, "v0");
        assert!(
            at >= before - 1.0 && at <= crate::util::unix_now() + 1.0,
            "{at}"
        );
        let _ = a;
    }

    #[test]
    fn a_fleet_view_shows_new_takedowns_cancels_and_the_pointer_on_both_databases() {
        let d = tempfile::tempdir().unwrap();
        check(&Store::open(d.path()).unwrap());
        if let Some(server) = PgServer::start() {
            check(&Store::open_postgres(&server.new_database("fleet_view")).unwrap());
        }
    }

    #[test]
    fn a_commit_notifies_listeners_and_a_dropped_connection_is_replaced() {
        let Some(server) = PgServer::start() else {
            return;
        };
        let url = server.new_database("notify");
        let s = Store::open_postgres(&url).unwrap();
        let mut listener = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        listener
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .unwrap();
        s.create(td(vec![7, 8, 9]), None).unwrap();
        use postgres::fallible_iterator::FallibleIterator;
        let n = listener
            .notifications()
            .timeout_iter(std::time::Duration::from_secs(5))
            .next()
            .unwrap();
        assert_eq!(
            n.map(|n| n.channel().to_string()),
            Some(NOTIFY_CHANNEL.into())
        );
        // The server drops the store's connection (a restart, a network cut): the call that
        // finds it closed may fail, the next one reconnects.
        let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND query NOT ILIKE '%LISTEN%'",
                &[],
            )
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _ = s.fleet_view(0);
        let v = s.fleet_view(0).unwrap();
        assert_eq!(v.new_sequences, vec![vec![7, 8, 9]]);
    }
}
