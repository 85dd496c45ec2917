//! lethe: a model-serving sidecar that makes a language model forget.
//!
//! It hosts TinyMem (GPT-2) and Pythia (GPT-NeoX) models on candle, audits them for verbatim
//! regurgitation, and removes memorized sequences from the weights with BalancedSubnet
//! (Sakarvadia et al., ICLR 2025). This crate is the library; `src/main.rs` is a thin CLI over it.

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
