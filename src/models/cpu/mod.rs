//! The CPU kernels that every hand-written pass shares, on plain f32 slices: what GPT-2's
//! training/unlearning pass (`models::pass`), both decode steps (`gpt2::decode`,
//! `gpt_neox::decode`), the fused autograd ops (`fused`) and the candle fallbacks in `ops`
//! build on.
//!
//! | module | what |
//! |---|---|
//! | [`storage`] | plain-slice views of candle CPU tensors |
//! | [`gemm`] | the matrix-product wrappers (checked slices, raw blocks, the pool's parallelism) |
//! | [`attention`] | causal attention forward and backward over a packed `qkv` ([`attention::QkvLayout`]) |
//! | [`norm`] | LayerNorm's backward, bias rows and column sums |
//! | [`activation`] | every MLP activation and its derivative |
//! | [`rotary`] | rotary position embeddings ("rotate_half") forward and backward, one head or a packed `qkv` |
//! | [`vmath`] | vectorisable exp, log-sum-exp, erf/GELU, LayerNorm forward |
//! | [`skinny`] | dense layers for a few rows (AVX-512), the decode step's products |
//! | [`attend`] | attention at inference, reading the KV cache in place |
//! | [`head`] | the LM head fused with log-softmax, for scoring |
//!
//! Invariants shared by all of them:
//! - Each kernel computes the same function as the composed candle reference (or, for
//!   backward kernels, the same gradient as candle's autograd through it) to f32 rounding, and
//!   its own tests pin that (against candle, a naive f64 version, or finite differences).
//! - No kernel depends on a model family: where layouts differ (GPT-2's and GPT-NeoX's packed
//!   attention, `Conv1D` versus `nn.Linear` weights) the caller says which.
//! - Kernels run on the calling thread unless their doc says they use the rayon pool; none
//!   keeps state between calls.

pub(crate) mod activation;
pub(crate) mod attend;
pub(crate) mod attention;
pub(crate) mod gemm;
pub(crate) mod head;
pub(crate) mod norm;
pub(crate) mod rotary;
pub(crate) mod skinny;
pub(crate) mod storage;
pub(crate) mod vmath;
