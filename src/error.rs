//! The library's error type: what model loading, tokenization, inference, audits and unlearning
//! return. The takedown store has its own (`takedown::Error`), which wraps this one as `Model`.
//!
//! Invariants:
//! - The variant tells whose problem it is: the operator's (`Io`, `Write`, `MissingFile`,
//!   `Config`, `UnsupportedArchitecture`, `Weights`, `Hub`), the client's ([`Error::InvalidInput`],
//!   naming the field), a cooperative stop ([`Error::Cancelled`]), or lethe's own
//!   ([`Error::Candle`] on validated input).
//! - Every variant about a file or field names it in its message: the path, the file, the
//!   `model_type` or the field at fault.
//! - [`Error::is_disk_full`] is true exactly for an `Io` or `Write` error whose cause is a full
//!   disk or quota (`ENOSPC`, `EDQUOT`), so that case is reported as the operator's.
//! - This module depends on no other lethe module (layer 0 in `docs/architecture.md`).

use std::path::PathBuf;

/// Errors raised by lethe's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model needs could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or directory could not be written (disk full, permissions).
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A required file is absent from a model directory.
    #[error("model directory {dir} has no {file}")]
    MissingFile { dir: PathBuf, file: String },
    /// `config.json` (or another JSON file) is malformed or inconsistent.
    #[error("invalid {file}: {message}")]
    Config { file: String, message: String },
    /// `model_type` names an architecture lethe does not implement.
    #[error("unsupported model_type {0:?} (lethe serves \"gpt2\" and \"gpt_neox\")")]
    UnsupportedArchitecture(String),
    /// A checkpoint lacks a tensor or stores it with the wrong shape.
    #[error("checkpoint {file}: {message}")]
    Weights { file: String, message: String },
    /// Tokenizer load or encode/decode failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The Hugging Face hub cache could not resolve a model id.
    #[error("hub: {0}")]
    Hub(String),
    /// A request or argument is invalid; `field` names what is wrong.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },
    /// A long-running job was cancelled cooperatively.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed. On validated input this is a bug in lethe.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether this is a full disk (or quota): the operator's problem, not a bug.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } | Error::Write { source, .. } => io_is_disk_full(source),
            _ => false,
        }
    }

    /// Shorthand for [`Error::Config`].
    pub fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            message: message.into(),
        }
    }
}

/// Whether an I/O error means the disk (or the user's quota) is full.
pub fn io_is_disk_full(e: &std::io::Error) -> bool {
    // ENOSPC 28, EDQUOT 122 on Linux.
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(28) | Some(122))
}
