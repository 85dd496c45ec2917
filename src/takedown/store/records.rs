//! What the store keeps: the takedown state machine and the records it reads and writes.
//!
//! Invariants:
//! - [`State::can_go_to`] is the one table of ordinary transitions: `queued → running |
//!   cancelled`; `running → validating | queued | failed | cancelled`; `validating → running |
//!   applied | rejected | failed | queued | cancelled`. `applied → queued` is not in it: only a
//!   rollback makes it. Nothing leaves `rejected`, `failed` or `cancelled`.
//! - A state's name ([`State::as_str`]) is the same in the API, serde and the database; an
//!   unknown name is an `InvalidInput` error naming `state` (`FromStr`) or a column conversion
//!   error (reading a row), never a panic.
//! - A [`NewTakedown`]'s content (sequences, definition, reason, requester) is what idempotency
//!   compares; the records here are plain data and enforce nothing themselves: the store checks
//!   them inside its transactions.
//! - A [`VersionRecord`]'s `seq` grows with each registration, so a lower `seq` was registered
//!   earlier (`Store::set_current` records a swap to a lower `seq` as a rollback).

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::ToSql;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::super::{Error, Result};

/// Where a takedown is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Validating,
    Applied,
    Rejected,
    Failed,
    Cancelled,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 7] = [
        State::Queued,
        State::Running,
        State::Validating,
        State::Applied,
        State::Rejected,
        State::Failed,
        State::Cancelled,
    ];

    /// The lower-case name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Validating => "validating",
            State::Applied => "applied",
            State::Rejected => "rejected",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// Parses a lower-case state name.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the ordinary state machine allows `self → to`. `applied → queued` is not among
    /// them: only a rollback makes it.
    pub fn can_go_to(self, to: State) -> bool {
        use State::*;
        matches!(
            (self, to),
            (Queued, Running | Cancelled)
                | (Running, Validating | Queued | Failed | Cancelled)
                | (
                    Validating,
                    Running | Applied | Rejected | Failed | Queued | Cancelled
                )
        )
    }

    /// Whether work on the takedown is over (it can still be requeued by a rollback if applied).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            State::Applied | State::Rejected | State::Failed | State::Cancelled
        )
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = Error;
    fn from_str(s: &str) -> Result<State> {
        State::parse(s).ok_or_else(|| {
            Error::invalid(
                "state",
                format!(
                    "unknown state {s:?} (one of queued, running, validating, applied, rejected, failed, cancelled)"
                ),
            )
        })
    }
}

impl ToSql for State {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for State {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        State::parse(s).ok_or_else(|| FromSqlError::Other(format!("unknown state {s:?}").into()))
    }
}

/// What a client asks to forget. Its canonical JSON is what idempotency compares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTakedown {
    /// Token ids of each sequence to forget (non-empty, each non-empty).
    pub sequences: Vec<Vec<u32>>,
    /// The forgetting definition the request names (e.g. "exact").
    pub definition: String,
    pub reason: Option<String>,
    pub requester: Option<String>,
}

/// A takedown as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Takedown {
    /// `td_` + 16 random hex characters.
    pub id: String,
    pub state: State,
    pub sequences: Vec<Vec<u32>>,
    pub definition: String,
    pub reason: Option<String>,
    pub requester: Option<String>,
    /// Unix seconds.
    pub created_at: f64,
    /// Unix seconds of the last change.
    pub updated_at: f64,
    pub phase: Option<String>,
    /// Fraction done, 0..=1, while running.
    pub progress: Option<f64>,
    pub eta_seconds: Option<f64>,
    /// The version whose weights applied this takedown.
    pub version: Option<String>,
    /// The validation report of the job that applied or rejected it.
    pub report: Option<Value>,
    /// Why it failed, or why validation rejected it.
    pub error: Option<String>,
    /// The job that holds (or last held) it.
    pub job_id: Option<String>,
    /// How many times a worker claimed it.
    pub attempts: u32,
}

/// One state change of a takedown (or a phase change while it runs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub takedown_id: String,
    /// Unix seconds.
    pub at: f64,
    /// The state after the event.
    pub state: State,
    /// What happened: job id, phase, version, reason, ... (`null` when nothing more to say).
    pub detail: Value,
}

/// A version to register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewVersion {
    /// Content hash of the version directory (see `versions::write_version`).
    pub id: String,
    pub parent: Option<String>,
    /// Ids of the takedowns whose sequences these weights forget (beyond the parent's).
    pub takedowns: Vec<String>,
    /// Validation metrics.
    pub metrics: Value,
    /// The version directory.
    pub path: String,
}

/// A registered weights version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionRecord {
    /// Content hash (16 hex characters).
    pub id: String,
    /// Monotonic registration counter (1, 2, ...).
    pub seq: i64,
    pub parent: Option<String>,
    /// Unix seconds.
    pub created_at: f64,
    pub takedowns: Vec<String>,
    pub metrics: Value,
    pub path: String,
}

/// Why the current version changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapKind {
    Promote,
    Rollback,
}

impl SwapKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SwapKind::Promote => "promote",
            SwapKind::Rollback => "rollback",
        }
    }
}

impl FromSql for SwapKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_str()? {
            "promote" => Ok(SwapKind::Promote),
            "rollback" => Ok(SwapKind::Rollback),
            s => Err(FromSqlError::Other(
                format!("unknown swap kind {s:?}").into(),
            )),
        }
    }
}

/// One change of the current version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Swap {
    pub from: Option<String>,
    pub to: String,
    /// Unix seconds.
    pub at: f64,
    pub kind: SwapKind,
}
