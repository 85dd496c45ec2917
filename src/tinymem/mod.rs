//! TinyMem: the small, fully controlled memorization testbed of Sakarvadia et al. (ICLR 2025),
//! math variant (spec §1–§3): the vocabulary and its tokenizer, the data generator, training
//! and evaluation.
//!
//! Invariants:
//! - [`vocab`] and [`data`] are pure (no I/O except through caller-supplied readers and
//!   writers) and deterministic in their config: their randomness comes from the private,
//!   version-stable PRNG in `rng`, so a seed regenerates the same dataset forever.
//! - [`eval`] implements spec §3 literally. Where lethe departs from the reference on purpose
//!   (each backdoor row prompted up to its own trigger, `'_'` for PAD, the additive family as
//!   the default) the module concerned says so, as does `docs/tinymem.md`.
//! - [`train`] writes Hugging Face checkpoints, each file replaced atomically, with a card from
//!   which [`data`] regenerates the exact training data.
//! - [`regularize`] holds the training-time regularizers (spec §4.7) that [`train`] applies.
//! - [`finetune`] trains any supported checkpoint on given rows (how tests and benchmarks make a
//!   GPT-NeoX that regurgitates chosen sequences).

pub mod cli;
pub mod data;
pub mod eval;
pub mod finetune;
pub mod lang;
pub mod regularize;
mod rng;
pub mod tokenizer;
pub mod train;
pub mod vocab;
