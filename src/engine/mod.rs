//! Model compute on top of [`crate::models`]: token selection, batched generation and scoring,
//! the live model version ([`served`]) and the engine thread that runs all traffic compute
//! ([`batcher`]).
//!
//! Invariants:
//! - `generate`, `sampling` and `score` are synchronous: they return when the work is done, on
//!   the calling thread, with their kernels on the rayon pool that thread runs in (the global
//!   one by default); no results are kept between calls (a `generate::DecodeBatch` holds its
//!   rows between steps).
//! - No HTTP worker runs them: traffic runs them on the engine thread (`batcher`), takedowns on
//!   the unlearning worker and the auditor (`takedown::worker`).
//! - Requests are checked against the model before any compute; a bad one is an error naming
//!   the field (`tests/model_invariants.rs`).
//! - A row's result does not depend on the other rows batched with it, to float rounding
//!   (`tests/model_invariants.rs`).

pub mod batcher;
pub mod generate;
pub mod sampling;
pub mod score;
pub mod served;
pub mod teacher;

pub use generate::{generate, FinishReason, GenerateRequest, Generation};
pub use sampling::{Sampler, SamplingParams};
pub use score::{score, Score};
