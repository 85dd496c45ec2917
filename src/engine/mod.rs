//! Model compute on top of [`crate::models`]: token selection, batched generation and scoring,
//! the live model version ([`served`]) and the engine thread that runs all traffic compute
//! ([`batcher`]).
//!
//! `generate`, `sampling` and `score` are synchronous and run on the calling thread; the server
//! runs them only on the engine thread, never on an async worker.

pub mod batcher;
pub mod generate;
pub mod sampling;
pub mod score;
pub mod served;

pub use generate::{generate, FinishReason, GenerateRequest, Generation};
pub use sampling::{Sampler, SamplingParams};
pub use score::{score, Score};
