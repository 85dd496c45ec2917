//! Mapping between SQL rows and the store's records.
//!
//! Invariants:
//! - `TD_COLS` and `VERSION_COLS` list the columns in the order the row readers index them.
//! - Rows are the values [`super::db::Tx`] returns, from either database. A column of the wrong
//!   type or a JSON column that does not decode is `Corrupt` naming the column, never a panic;
//!   a value that does not encode is `InvalidInput` naming it.
//! - `request_hash` depends only on the request's content: sha256 of its canonical JSON, a
//!   version tag (`v: 1`) then the fields in a fixed order with no maps, so equal requests always
//!   hash equal.

use rusqlite::types::Value as SqlValue;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::super::{Error, Result};
use super::db::get;
use super::records::{NewTakedown, Takedown, VersionRecord};

pub(super) fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |source| Error::Sql { op, source }
}

/// Reads a JSON text column; one that does not decode is `Corrupt`, naming the column.
pub(super) fn json_col<T: serde::de::DeserializeOwned>(row: &[SqlValue], idx: usize) -> Result<T> {
    let text: String = get(row, idx)?;
    serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        what: format!("JSON column {idx}"),
        message: e.to_string(),
    })
}

pub(super) fn opt_json_col(row: &[SqlValue], idx: usize) -> Result<Option<Value>> {
    let text: Option<String> = get(row, idx)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| Error::Corrupt {
            what: format!("JSON column {idx}"),
            message: e.to_string(),
        })
    })
    .transpose()
}

pub(super) fn to_json<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid(what, e.to_string()))
}

pub(super) const TD_COLS: &str =
    "id, state, sequences, definition, reason, requester, created_at, \
     updated_at, phase, progress, eta_seconds, version, report, error, job_id, attempts";

pub(super) fn takedown_row(row: &[SqlValue]) -> Result<Takedown> {
    Ok(Takedown {
        id: get(row, 0)?,
        state: get(row, 1)?,
        sequences: json_col(row, 2)?,
        definition: get(row, 3)?,
        reason: get(row, 4)?,
        requester: get(row, 5)?,
        created_at: get(row, 6)?,
        updated_at: get(row, 7)?,
        phase: get(row, 8)?,
        progress: get(row, 9)?,
        eta_seconds: get(row, 10)?,
        version: get(row, 11)?,
        report: opt_json_col(row, 12)?,
        error: get(row, 13)?,
        job_id: get(row, 14)?,
        attempts: get(row, 15)?,
    })
}

pub(super) const VERSION_COLS: &str = "id, seq, parent, created_at, takedowns, metrics, path";

pub(super) fn version_row(row: &[SqlValue]) -> Result<VersionRecord> {
    Ok(VersionRecord {
        id: get(row, 0)?,
        seq: get(row, 1)?,
        parent: get(row, 2)?,
        created_at: get(row, 3)?,
        takedowns: json_col(row, 4)?,
        metrics: json_col(row, 5)?,
        path: get(row, 6)?,
    })
}

/// sha256 (hex) of the request's canonical JSON: a version tag, then the fields in a fixed order
/// (struct serialization order; no maps, so no key-order ambiguity).
pub(super) fn request_hash(new: &NewTakedown) -> Result<String> {
    #[derive(Serialize)]
    struct Canonical<'a> {
        v: u32,
        sequences: &'a [Vec<u32>],
        definition: &'a str,
        reason: Option<&'a str>,
        requester: Option<&'a str>,
    }
    let c = Canonical {
        v: 1,
        sequences: &new.sequences,
        definition: &new.definition,
        reason: new.reason.as_deref(),
        requester: new.requester.as_deref(),
    };
    let bytes = serde_json::to_vec(&c).map_err(|e| Error::invalid("takedown", e.to_string()))?;
    Ok(crate::util::hex(&Sha256::digest(&bytes)))
}
