//! Model compute on top of [`crate::models`]: token selection, batched generation and scoring.
//!
//! Everything here is synchronous and runs on the calling thread; the server runs it on a
//! dedicated engine thread, never on an async worker.

pub mod generate;
pub mod sampling;
pub mod score;

pub use generate::{generate, FinishReason, GenerateRequest, Generation};
pub use sampling::{Sampler, SamplingParams};
pub use score::{score, Score};
