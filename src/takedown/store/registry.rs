//! The version registry: every weights version, the compare-and-swap pointer to the current
//! one and its history, and the transactions that move it (promote, rollback).
//!
//! Invariants:
//! - The current-version pointer changes only by compare-and-swap: it moves only if the current
//!   version is the expected one (`None`: none set yet) and the target is registered; otherwise
//!   the call is [`Error::VersionConflict`] or [`Error::VersionNotFound`] and nothing changes.
//!   Each move appends a `swaps` row in the same transaction.
//! - A version's parent is registered before it (else [`Error::VersionNotFound`]), so parent
//!   links never form a cycle; an empty id is `InvalidInput`. Registering an id again returns
//!   the existing record unchanged.
//! - [`Store::promote`] is one transaction: it registers the version, swaps the pointer to it
//!   from `expected` and moves the job's validating takedowns to `applied`; a newly registered
//!   version's `takedowns` are exactly those. Any error (a lost swap, a takedown still
//!   `running`) leaves all three unchanged.
//! - [`Store::rollback`] is one transaction: `to` must be an ancestor of `expected` (else
//!   `InvalidInput`); it swaps the pointer back and re-queues the takedowns applied by every
//!   version left behind. [`Store::set_current`] and [`Store::set_current_as`] move only the
//!   pointer and re-queue nothing.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;

use super::records::{NewVersion, State, Swap, SwapKind, VersionRecord};
use super::rows::{sql, to_json, version_row, VERSION_COLS};
use super::{
    active_of_job, finish_applied_tx, immediate, now, requeue_applied_tx, Error, Result, Store,
};

impl Store {
    /// Registers a version. If `new.id` is already registered (same content), returns the
    /// existing record unchanged and `false`.
    pub fn insert_version(&self, new: NewVersion) -> Result<(VersionRecord, bool)> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let out = insert_version_tx(&tx, &new)?;
        tx.commit().map_err(sql("commit version"))?;
        Ok(out)
    }

    /// The version `id`.
    pub fn get_version(&self, id: &str) -> Result<VersionRecord> {
        get_version_tx(&self.conn(), id)
    }

    /// Every version, newest first.
    pub fn list_versions(&self) -> Result<Vec<VersionRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {VERSION_COLS} FROM versions ORDER BY seq DESC"
            ))
            .map_err(sql("list versions"))?;
        let rows = stmt
            .query_map([], version_row)
            .map_err(sql("list versions"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(sql("read version"))
    }

    /// The id of the version being served, if one was ever set.
    pub fn current_version(&self) -> Result<Option<String>> {
        current_tx(&self.conn())
    }

    /// Compare-and-swap of the current version: succeeds only if the current version is
    /// `expected` (`None`: none set yet). The swap is recorded as a rollback when `to` was
    /// registered before the current version, as a promote otherwise.
    pub fn set_current(&self, expected: Option<&str>, to: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let kind = match expected {
            Some(e) if get_version_tx(&tx, e)?.seq > get_version_tx(&tx, to)?.seq => {
                SwapKind::Rollback
            }
            _ => SwapKind::Promote,
        };
        cas_tx(&tx, expected, to, kind)?;
        tx.commit().map_err(sql("commit swap"))
    }

    /// [`Store::set_current`] with an explicit kind for the history.
    pub fn set_current_as(&self, expected: Option<&str>, to: &str, kind: SwapKind) -> Result<()> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        cas_tx(&tx, expected, to, kind)?;
        tx.commit().map_err(sql("commit swap"))
    }

    /// The history of current-version changes, newest first.
    pub fn swaps(&self) -> Result<Vec<Swap>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT from_version, to_version, at, kind FROM swaps ORDER BY seq DESC",
            )
            .map_err(sql("read swaps"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Swap {
                    from: r.get(0)?,
                    to: r.get(1)?,
                    at: r.get(2)?,
                    kind: r.get(3)?,
                })
            })
            .map_err(sql("read swaps"))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(sql("read swaps"))
    }

    /// In one transaction: registers `version`, swaps the current version from `expected` to it
    /// (a promote), and moves the validating takedowns of `job_id` to applied by it. The version's
    /// `takedowns` list is replaced by the ids this call applies. Nothing changes on any error
    /// (a lost compare-and-swap, a takedown in the wrong state, none left to apply:
    /// [`Error::NothingToApply`]). Returns the record and how many
    /// takedowns were applied.
    pub fn promote(
        &self,
        job_id: &str,
        expected: Option<&str>,
        mut version: NewVersion,
        report: &Value,
    ) -> Result<(VersionRecord, usize)> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        let active = active_of_job(&tx, job_id)?;
        if active.is_empty() {
            // Every takedown was cancelled while the job ran: a version would apply nothing.
            return Err(Error::NothingToApply {
                job: job_id.to_string(),
            });
        }
        version.takedowns = active
            .into_iter()
            .filter(|(_, s)| *s == State::Validating)
            .map(|(id, _)| id)
            .collect();
        let (record, _) = insert_version_tx(&tx, &version)?;
        cas_tx(&tx, expected, &record.id, SwapKind::Promote)?;
        let n = finish_applied_tx(&tx, job_id, &record.id, report)?;
        tx.commit().map_err(sql("commit promote"))?;
        Ok((record, n))
    }

    /// In one transaction: swaps the current version from `expected` back to its ancestor `to`
    /// (a rollback) and requeues the takedowns applied by every version on the way (`expected`
    /// and its ancestors below `to`). `to` must be an ancestor of `expected`. Returns how many
    /// takedowns were requeued.
    pub fn rollback(&self, expected: &str, to: &str) -> Result<usize> {
        let mut conn = self.conn();
        let tx = immediate(&mut conn)?;
        get_version_tx(&tx, to)?;
        let mut undone = Vec::new();
        let mut at = Some(expected.to_string());
        loop {
            match at {
                Some(v) if v == to => break,
                Some(v) => {
                    let parent = get_version_tx(&tx, &v)?.parent;
                    undone.push(v);
                    // Parent links are acyclic (a parent must exist before its child), but a
                    // corrupt database should not loop forever.
                    if undone.len() > 1_000_000 {
                        return Err(Error::Corrupt {
                            what: "versions".into(),
                            message: "parent chain does not end".into(),
                        });
                    }
                    at = parent;
                }
                None => {
                    return Err(Error::invalid(
                        "to_version",
                        format!("version {to} is not an ancestor of {expected}"),
                    ))
                }
            }
        }
        cas_tx(&tx, Some(expected), to, SwapKind::Rollback)?;
        let mut n = 0;
        for v in &undone {
            n += requeue_applied_tx(&tx, v)?;
        }
        tx.commit().map_err(sql("commit rollback"))?;
        Ok(n)
    }
}

pub(super) fn get_version_tx(conn: &Connection, id: &str) -> Result<VersionRecord> {
    conn.query_row(
        &format!("SELECT {VERSION_COLS} FROM versions WHERE id = ?1"),
        [id],
        version_row,
    )
    .optional()
    .map_err(sql("read version"))?
    .ok_or_else(|| Error::VersionNotFound(id.to_string()))
}

pub(super) fn insert_version_tx(
    tx: &Transaction<'_>,
    new: &NewVersion,
) -> Result<(VersionRecord, bool)> {
    if new.id.is_empty() {
        return Err(Error::invalid("version id", "must not be empty"));
    }
    match get_version_tx(tx, &new.id) {
        Ok(existing) => return Ok((existing, false)),
        Err(Error::VersionNotFound(_)) => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = &new.parent {
        get_version_tx(tx, parent)?;
    }
    tx.execute(
        "INSERT INTO versions (id, parent, created_at, takedowns, metrics, path) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            new.id,
            new.parent,
            now(),
            to_json("takedowns", &new.takedowns)?,
            to_json("metrics", &new.metrics)?,
            new.path
        ],
    )
    .map_err(sql("insert version"))?;
    Ok((get_version_tx(tx, &new.id)?, true))
}

pub(super) fn current_tx(conn: &Connection) -> Result<Option<String>> {
    conn.query_row(
        "SELECT version FROM current_version WHERE one = 1",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql("read current version"))
}

pub(super) fn cas_tx(
    tx: &Transaction<'_>,
    expected: Option<&str>,
    to: &str,
    kind: SwapKind,
) -> Result<()> {
    let actual = current_tx(tx)?;
    if actual.as_deref() != expected {
        return Err(Error::VersionConflict {
            expected: expected.map(str::to_string),
            actual,
        });
    }
    get_version_tx(tx, to)?;
    let at = now();
    tx.execute(
        "INSERT INTO current_version (one, version, updated_at) VALUES (1, ?1, ?2) \
         ON CONFLICT (one) DO UPDATE SET version = excluded.version, \
         updated_at = excluded.updated_at",
        params![to, at],
    )
    .map_err(sql("set current version"))?;
    tx.execute(
        "INSERT INTO swaps (from_version, to_version, at, kind) VALUES (?1, ?2, ?3, ?4)",
        params![expected, to, at, kind.as_str()],
    )
    .map_err(sql("record swap"))?;
    Ok(())
}
