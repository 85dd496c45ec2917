//! TinyMem: the small, fully controlled memorization testbed of Sakarvadia et al. (ICLR 2025).
//!
//! This module owns the math variant's data: [`vocab`] is the 14-token character vocabulary
//! and [`data`] generates the task sequences, the noise and backdoor artifacts, the train/test
//! splits and their JSONL form, drawing randomness from the private, version-stable PRNG in
//! `rng`. All are pure (no I/O except through caller-supplied readers and writers) and
//! deterministic in their config.

pub mod cli;
pub mod data;
pub mod eval;
mod rng;
pub mod tokenizer;
pub mod train;
pub mod vocab;
