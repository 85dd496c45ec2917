//! Following the fleet (`lethe-fleet` thread, fleet mode only): every replica keeps its guard
//! and its live version equal to the shared store's.
//!
//! Invariants:
//! - The thread reads the store ([`Store::fleet_view`]) when a commit is notified on
//!   [`NOTIFY_CHANNEL`], and every [`POLL`] when none is: a takedown accepted by any replica is
//!   in this replica's guard one round trip after it commits.
//! - The guard only grows between two reads; when the number of cancelled takedowns changed, it
//!   is rebuilt from the read (what a cancel does on one machine).
//! - When the store's live version is not this replica's, the version is fetched (local cache
//!   or the shared version store, verified by hash), loaded in the serving dtype, smoke-tested
//!   and swapped in exactly as a local promote or rollback is, on a thread of its own: reads of
//!   the store (the guard, freshness) go on while a large model loads. A failure leaves the old
//!   version serving and is retried at the next read (`lethe_fleet_version_lag_seconds` keeps
//!   growing).
//! - Each successful read marks the fleet fresh; a lost connection is reopened at the next
//!   iteration, and the replica turns not-ready after `--guard-staleness` without a read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;

use super::{swap, version_dir_of, Takedowns};
use crate::engine::served::Served;
use crate::error::Result;
use crate::takedown::fleet::POLL;
use crate::takedown::store::NOTIFY_CHANNEL;
use crate::takedown::{versions, Store};

/// The thread's name.
pub(super) const THREAD: &str = "lethe-fleet";

/// A connection to the store for reading, and one listening for its notifications.
struct Session {
    store: Store,
    listener: postgres::Client,
}

impl Session {
    fn open(url: &str) -> crate::takedown::Result<Session> {
        let store = Store::open_postgres(url)?;
        let mut listener = postgres::Client::connect(url, postgres::NoTls)
            .map_err(crate::takedown::store::pg_error("connect to listen"))?;
        listener
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .map_err(crate::takedown::store::pg_error("listen"))?;
        Ok(Session { store, listener })
    }

    /// Waits for a notification or `timeout`; drains the ones queued. False when the
    /// connection broke.
    fn wait(&mut self, timeout: Duration) -> bool {
        let mut n = self.listener.notifications();
        if n.timeout_iter(timeout).next().is_err() {
            return false;
        }
        // Drain what is queued: one read covers them all.
        let mut queued = n.iter();
        loop {
            match queued.next() {
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// What the replica has applied from the store.
#[derive(Default)]
struct Seen {
    last_seq: i64,
    /// `None` until the first read, which rebuilds the guard whole.
    cancelled: Option<u64>,
}

pub(super) fn follow_loop(td: &Takedowns) {
    let Some(fleet) = &td.fleet else {
        return;
    };
    let url = fleet.config.database_url.0.clone();
    let mut session: Option<Session> = None;
    let mut seen = Seen::default();
    // A version is loaded on a thread of its own, so the guard keeps following the store (and
    // the replica stays ready) while a large model loads.
    std::thread::scope(|scope| {
        let mut loading: Option<std::thread::ScopedJoinHandle<'_, ()>> = None;
        while !td.stopping() {
            let s = match session.as_mut() {
                Some(s) => s,
                None => match Session::open(&url) {
                    Ok(s) => session.insert(s),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot reach the fleet's database; retrying");
                        std::thread::sleep(POLL);
                        continue;
                    }
                },
            };
            let outcome = crate::supervise::catch("fleet", || sync(td, &s.store, &mut seen));
            match outcome {
                Ok(Ok(Some((to, moved_at)))) => {
                    if loading.as_ref().is_none_or(|h| h.is_finished()) {
                        loading = Some(scope.spawn(move || {
                            if crate::supervise::catch("fleet", || {
                                follow_version(td, &to, moved_at)
                            })
                            .is_err()
                            {
                                td.metrics.panics.with_label_values(&["fleet"]).inc();
                            }
                        }));
                    }
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "reading the fleet's store failed; reconnecting");
                    session = None;
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(_) => td.metrics.panics.with_label_values(&["fleet"]).inc(),
            }
            if !s.wait(POLL) {
                session = None;
            }
        }
    });
}

/// One read of the store: the guard is brought up to date; returns the store's live version
/// (and when its pointer moved) when this replica serves another one.
fn sync(
    td: &Takedowns,
    store: &Store,
    seen: &mut Seen,
) -> crate::takedown::Result<Option<(String, f64)>> {
    let view = store.fleet_view(seen.last_seq)?;
    let fleet = td.fleet.as_ref().expect("fleet mode");
    if seen.cancelled != Some(view.cancelled) {
        let all = store.sequences_to_guard()?;
        td.guard.replace(&all);
        seen.cancelled = Some(view.cancelled);
    } else {
        for s in &view.new_sequences {
            td.guard.add(s);
        }
    }
    let news = view.last_seq > seen.last_seq;
    seen.last_seq = view.last_seq;
    fleet.mark_read();
    if news {
        // A takedown accepted elsewhere: the worker (if it is this replica) claims it now.
        td.refresh_counts();
        td.notify();
    }
    let Some((current, moved_at)) = view.current else {
        return Ok(None);
    };
    if td.live.served().version == current {
        td.metrics.fleet_version_lag.set(0.0);
        return Ok(None);
    }
    td.metrics
        .fleet_version_lag
        .set((crate::takedown::now() - moved_at).max(0.0));
    Ok(Some((current, moved_at)))
}

/// Follows the store's live version `to` (its pointer moved at `moved_at`); a failure is
/// logged and retried at the next read.
fn follow_version(td: &Takedowns, to: &str, moved_at: f64) {
    let live = td.live.served();
    match follow(td, &live, to) {
        Ok(true) => {
            let lag = (crate::takedown::now() - moved_at).max(0.0);
            td.metrics.fleet_version_propagation.observe(lag);
            td.metrics.fleet_version_lag.set(0.0);
            tracing::info!(version = %to, lag_seconds = lag, "following the fleet's live version");
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(version = %to, error = %e, "cannot load the fleet's live version; still serving {}", live.version)
        }
    }
}

/// Loads `to` and swaps it in for `live`. False when the live version moved meanwhile (this
/// replica published or rolled back itself).
fn follow(td: &Takedowns, live: &Arc<Served>, to: &str) -> Result<bool> {
    let started = Instant::now();
    let _moving = td.moving.lock().unwrap_or_else(|e| e.into_inner());
    if td.live.served().version != live.version {
        return Ok(false);
    }
    let new = versions::load_served(
        &version_dir_of(td, to)?,
        to,
        live.model.device(),
        td.config.serve_dtype,
        Some(live.name.clone()),
    )?;
    swap(td, live, Arc::new(new), "follow");
    td.metrics
        .model_swap_duration
        .observe(started.elapsed().as_secs_f64());
    td.refresh_counts();
    Ok(true)
}
