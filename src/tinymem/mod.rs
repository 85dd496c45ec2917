//! TinyMem: the small, fully controlled memorization testbed of Sakarvadia et al. (ICLR 2025).
//!
//! This module owns the math variant's data: [`vocab`] is the 14-token character vocabulary.
//! It is pure and total on untrusted input.

pub mod vocab;
