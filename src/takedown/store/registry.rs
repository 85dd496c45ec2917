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

use serde_json::Value;

use super::db::{get, Tx};
use super::records::{NewVersion, State, Swap, SwapKind, VersionRecord};
use super::rows::{to_json, version_row, VERSION_COLS};
use super::{active_of_job, finish_applied_tx, now, requeue_applied_tx, Error, Result, Store};

impl Store {
    /// Registers a version. If `new.id` is already registered (same content), returns the
    /// existing record unchanged and `false`.
    pub fn insert_version(&self, new: NewVersion) -> Result<(VersionRecord, bool)> {
        self.write(|tx| insert_version_tx(tx, &new))
    }

    /// The version `id`.
    pub fn get_version(&self, id: &str) -> Result<VersionRecord> {
        self.read(|tx| get_version_tx(tx, id))
    }

    /// Every version, newest first.
    pub fn list_versions(&self) -> Result<Vec<VersionRecord>> {
        self.read(|tx| {
            tx.query(
                &format!("SELECT {VERSION_COLS} FROM versions ORDER BY seq DESC"),
                &[],
            )?
            .iter()
            .map(|r| version_row(r))
            .collect()
        })
    }

    /// The id of the version being served, if one was ever set.
    pub fn current_version(&self) -> Result<Option<String>> {
        self.read(current_tx)
    }

    /// Compare-and-swap of the current version: succeeds only if the current version is
    /// `expected` (`None`: none set yet). The swap is recorded as a rollback when `to` was
    /// registered before the current version, as a promote otherwise.
    pub fn set_current(&self, expected: Option<&str>, to: &str) -> Result<()> {
        self.write(|tx| {
            let kind = match expected {
                Some(e) if get_version_tx(tx, e)?.seq > get_version_tx(tx, to)?.seq => {
                    SwapKind::Rollback
                }
                _ => SwapKind::Promote,
            };
            cas_tx(tx, expected, to, kind)
        })
    }

    /// [`Store::set_current`] with an explicit kind for the history.
    pub fn set_current_as(&self, expected: Option<&str>, to: &str, kind: SwapKind) -> Result<()> {
        self.write(|tx| cas_tx(tx, expected, to, kind))
    }

    /// The history of current-version changes, newest first.
    pub fn swaps(&self) -> Result<Vec<Swap>> {
        self.read(|tx| {
            tx.query(
                "SELECT from_version, to_version, at, kind FROM swaps ORDER BY seq DESC",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(Swap {
                    from: get(r, 0)?,
                    to: get(r, 1)?,
                    at: get(r, 2)?,
                    kind: get(r, 3)?,
                })
            })
            .collect()
        })
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
        self.write(|tx| {
            let active = active_of_job(tx, job_id)?;
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
            let (record, _) = insert_version_tx(tx, &version)?;
            cas_tx(tx, expected, &record.id, SwapKind::Promote)?;
            let n = finish_applied_tx(tx, job_id, &record.id, report)?;
            Ok((record, n))
        })
    }

    /// In one transaction: swaps the current version from `expected` back to its ancestor `to`
    /// (a rollback) and requeues the takedowns applied by every version on the way (`expected`
    /// and its ancestors below `to`). `to` must be an ancestor of `expected`. Returns how many
    /// takedowns were requeued.
    pub fn rollback(&self, expected: &str, to: &str) -> Result<usize> {
        self.write(|tx| {
            get_version_tx(tx, to)?;
            let mut undone = Vec::new();
            let mut at = Some(expected.to_string());
            loop {
                match at {
                    Some(v) if v == to => break,
                    Some(v) => {
                        let parent = get_version_tx(tx, &v)?.parent;
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
            cas_tx(tx, Some(expected), to, SwapKind::Rollback)?;
            let mut n = 0;
            for v in &undone {
                n += requeue_applied_tx(tx, v)?;
            }
            Ok(n)
        })
    }
}

pub(super) fn get_version_tx(tx: &mut dyn Tx, id: &str) -> Result<VersionRecord> {
    let r = tx
        .query_opt(
            &format!("SELECT {VERSION_COLS} FROM versions WHERE id = ?1"),
            &[&id],
        )?
        .ok_or_else(|| Error::VersionNotFound(id.to_string()))?;
    version_row(&r)
}

pub(super) fn insert_version_tx(
    tx: &mut dyn Tx,
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
        &[
            &new.id,
            &new.parent,
            &now(),
            &to_json("takedowns", &new.takedowns)?,
            &to_json("metrics", &new.metrics)?,
            &new.path,
        ],
    )?;
    Ok((get_version_tx(tx, &new.id)?, true))
}

pub(super) fn current_tx(tx: &mut dyn Tx) -> Result<Option<String>> {
    match tx.query_opt("SELECT version FROM current_version WHERE one = 1", &[])? {
        Some(r) => get(&r, 0),
        None => Ok(None),
    }
}

pub(super) fn cas_tx(
    tx: &mut dyn Tx,
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
        &[&to, &at],
    )?;
    tx.execute(
        "INSERT INTO swaps (from_version, to_version, at, kind) VALUES (?1, ?2, ?3, ?4)",
        &[&expected, &to, &at, &kind.as_str()],
    )?;
    Ok(())
}
