//! lethe: a model-serving sidecar that makes a language model forget.
//!
//! It hosts TinyMem (GPT-2) and Pythia (GPT-NeoX) models on candle, audits them for verbatim
//! regurgitation, and removes memorized sequences from the weights with BalancedSubnet
//! (Sakarvadia et al., ICLR 2025). This crate is the library; `src/main.rs` is a thin CLI over it.
//!
//! Invariants:
//! - A top-level module imports only modules on lower layers (`docs/architecture.md`,
//!   "Layers"); `tests/layering.rs` fails on any other import in library code.
//! - The library leaves process-wide choices to its host: it installs no global allocator and
//!   starts logging only when the host calls `runtime::init_tracing`.
//! - Test fixtures (`test_util`) and the CUDA tests exist only in test builds.

pub mod audit;
pub mod cli;
pub mod engine;
pub mod error;
pub mod loader;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod runtime;
pub mod server;
pub mod supervise;
pub mod takedown;
pub mod tinymem;
pub mod tokenizer;
pub mod unlearn;
pub mod util;

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;

pub use error::{Error, Result};
