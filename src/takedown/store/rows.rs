//! Mapping between SQL rows and the store's records.
//!
//! Invariants:
//! - `TD_COLS` and `VERSION_COLS` list the columns in the order the row readers index them.
//! - A JSON column that does not decode is a column conversion error (reported as the store's
//!   `Sql` error with its operation), never a panic; a value that does not encode is
//!   `InvalidInput` naming it.
//! - `request_hash` depends only on the request's content: sha256 of its canonical JSON, a
//!   version tag (`v: 1`) then the fields in a fixed order with no maps, so equal requests always
//!   hash equal.

use rusqlite::types::Type;
use rusqlite::Row;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::super::{Error, Result};
use super::records::{NewTakedown, Takedown, VersionRecord};

pub(super) fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |source| Error::Sql { op, source }
}

/// Reads a JSON text column.
pub(super) fn json_col<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

pub(super) fn opt_json_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Value>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
    })
    .transpose()
}

pub(super) fn to_json<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::invalid(what, e.to_string()))
}

pub(super) const TD_COLS: &str =
    "id, state, sequences, definition, reason, requester, created_at, \
     updated_at, phase, progress, eta_seconds, version, report, error, job_id, attempts";

pub(super) fn takedown_row(row: &Row<'_>) -> rusqlite::Result<Takedown> {
    Ok(Takedown {
        id: row.get(0)?,
        state: row.get(1)?,
        sequences: json_col(row, 2)?,
        definition: row.get(3)?,
        reason: row.get(4)?,
        requester: row.get(5)?,
        created_at: row.get(6)?,
        updated_at: row.get(7)?,
        phase: row.get(8)?,
        progress: row.get(9)?,
        eta_seconds: row.get(10)?,
        version: row.get(11)?,
        report: opt_json_col(row, 12)?,
        error: row.get(13)?,
        job_id: row.get(14)?,
        attempts: row.get(15)?,
    })
}

pub(super) const VERSION_COLS: &str = "id, seq, parent, created_at, takedowns, metrics, path";

pub(super) fn version_row(row: &Row<'_>) -> rusqlite::Result<VersionRecord> {
    Ok(VersionRecord {
        id: row.get(0)?,
        seq: row.get(1)?,
        parent: row.get(2)?,
        created_at: row.get(3)?,
        takedowns: json_col(row, 4)?,
        metrics: json_col(row, 5)?,
        path: row.get(6)?,
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
