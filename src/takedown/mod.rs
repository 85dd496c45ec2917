//! Takedowns: requests to make the served model forget sequences, carried from acceptance to a
//! validated, versioned, hot-swapped set of weights.
//!
//! Invariants:
//! - A takedown exists once [`Store::create`] returns: its row is committed (WAL,
//!   `synchronous=FULL`) before the caller answers, and rows are never deleted.
//! - Legal state transitions ([`State::can_go_to`], checked inside the transaction that makes
//!   them): `queued → running | cancelled`; `running → validating | queued | failed | cancelled`;
//!   `validating → running | applied | rejected | failed | queued | cancelled`;
//!   `applied → queued` only by a rollback; `rejected`, `failed` and `cancelled` are terminal. A
//!   refused transition is [`Error::InvalidTransition`] (or [`Error::NotCancellable`]) and
//!   changes nothing.
//! - The [`Guard`] holds the windows of every takedown that is not cancelled, whatever its
//!   state (applied ones too): loaded at start-up from [`Store::sequences_to_guard`], added to
//!   before `POST /v1/takedowns` answers, rebuilt after a cancel. A sequence shorter than the
//!   guard's window registers no window.
//! - A version directory appears under its final name only complete and fsync'd, by one
//!   rename, named by its content hash, and is never written again; a crash leaves either no
//!   version or a complete one, plus `.tmp-*` leftovers removed at the next start.
//! - The current-version pointer moves only by compare-and-swap, in one store transaction with
//!   the takedowns it applies (promote) or re-queues (rollback); a crash leaves either the old
//!   version current with the job's takedowns re-queued at the next start, or the new one
//!   current with them applied.
//! - Failures are [`Error`] values naming the takedown, version, file or SQL operation at fault;
//!   [`Error::is_disk_full`] tells a full disk from a bug.
//!
//! Submodules: [`store`], the durable record (SQLite, or PostgreSQL in fleet mode) and its
//! state machine, version registry and swap history; [`guard`], the regurgitation guard;
//! [`versions`], version directories, the shared version store of a fleet and start-up
//! resolution of the live version; [`fleet`], fleet mode's worker lock and store freshness;
//! [`worker`], the worker, auditor, rollback and fleet follower that publish versions to the
//! live pointer.

pub mod corpus;
pub mod fleet;
pub mod guard;
pub mod store;
pub mod versions;
pub mod worker;

pub use guard::{Checker, Guard};
pub use store::{
    Event, NewTakedown, NewVersion, State, Store, Swap, SwapKind, Takedown, VersionRecord,
};

use std::path::PathBuf;

/// Errors raised by the takedown store, guard and version directories. Every message names the
/// takedown, version, file or SQL operation at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A SQLite operation failed; `op` says which (e.g. "insert takedown").
    #[error("takedown store: {op}: {source}")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// A PostgreSQL operation failed (fleet mode); `op` says which.
    #[error("takedown store (PostgreSQL): {op}: {message}")]
    Postgres {
        op: &'static str,
        /// The server's message when it sent one (`postgres::Error` displays only "db error").
        message: String,
        #[source]
        source: postgres::Error,
    },
    /// The shared version store (fleet mode, `--versions-url`) failed; `op` says which
    /// operation, `message` the object and the store's error.
    #[error("shared version store: {op} {message}")]
    Remote { op: &'static str, message: String },
    /// A file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored value could not be decoded (a corrupt or foreign database).
    #[error("takedown store: corrupt {what}: {message}")]
    Corrupt { what: String, message: String },
    /// An argument is invalid; `field` names it.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },
    /// No takedown has this id.
    #[error("no takedown with id {0:?}")]
    NotFound(String),
    /// No version has this id.
    #[error("no version with id {0:?}")]
    VersionNotFound(String),
    /// The idempotency key was already used for a request with different content.
    #[error(
        "idempotency key {key:?} was already used by takedown {existing_id} with a different request"
    )]
    IdempotencyConflict { key: String, existing_id: String },
    /// The state machine forbids this transition.
    #[error("takedown {id} cannot go from {from} to {to}")]
    InvalidTransition { id: String, from: State, to: State },
    /// The takedown is already finished (applied, rejected, failed or cancelled).
    #[error("takedown {id} is {state} and can no longer be cancelled")]
    NotCancellable { id: String, state: State },
    /// A job's result has nothing left to apply: every one of its takedowns was cancelled
    /// while it ran, so no version is registered for it.
    #[error("job {job}: every takedown was cancelled; nothing to publish")]
    NothingToApply { job: String },
    /// Compare-and-swap of the current version lost: the current version is not the expected one.
    #[error("current version is {actual:?}, expected {expected:?}")]
    VersionConflict {
        expected: Option<String>,
        actual: Option<String>,
    },
    /// Loading, hashing or writing model files failed.
    #[error(transparent)]
    Model(#[from] crate::error::Error),
}

/// The result type of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether this is a full disk (or quota) under the data directory: the operator's problem,
    /// reported as such, never as a bug.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Sql { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DiskFull)
            ),
            Error::Io { source, .. } => crate::error::io_is_disk_full(source),
            Error::Model(e) => e.is_disk_full(),
            _ => false,
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

pub(crate) use crate::util::{random_hex, unix_now as now};

/// Every sequence of `tds` as a forget target of the unlearning pipeline, split under its
/// takedown's definition.
pub fn targets(tds: &[Takedown]) -> crate::error::Result<Vec<crate::unlearn::pipeline::Target>> {
    let mut out = Vec::new();
    for td in tds {
        let def: crate::audit::Definition = td.definition.parse()?;
        for (index, seq) in td.sequences.iter().enumerate() {
            out.push(crate::unlearn::pipeline::Target::new(
                td.id.clone(),
                index,
                seq.clone(),
                def.split(seq)?,
            ));
        }
    }
    Ok(out)
}
