//! The hand-written transformer pass: forward and backward without candle's autograd, the
//! unlearning step's and the training step's hot path. Written once for every family: a
//! family gives its weights as slices with what sets it apart ([`Weights`]: dense weight
//! layout, packed-qkv layout, position or rotary embeddings, sequential or parallel residual)
//! by implementing [`HandWrittenPass`] (`gpt2::grad`, `gpt_neox::grad`), on the kernels of
//! [`super::cpu`].
//!
//! Invariants:
//! - It computes the same function as each family's `forward_hidden` → logits → per-sequence
//!   cross-entropy, to f32 rounding, and the same gradients as candle's autograd through that
//!   forward: tests in `unlearn` pin the loss and every score gradient (both families), tests
//!   in `tinymem::train` and `gpt_neox::grad` the loss and every parameter gradient.
//! - [`HandWrittenPass::mlp_grads`] returns `∂L/∂W_eff` for each MLP matrix only (what
//!   BalancedSubnet's scores need; the backward stops at layer 0's in-projection);
//!   [`HandWrittenPass::train_grads`] returns every parameter's gradient. Both run the same
//!   code, parameterised by what is accumulated.
//! - Supported: f32 weights on the CPU, every MLP activation the loader accepts (ReLU, exact
//!   and tanh GELU, SiLU), causal attention over right-padded rows (the padding's predictions
//!   carry zero weight). [`HandWrittenPass::mlp_grads_supported`] says whether a model
//!   qualifies; callers fall back to autograd otherwise.
//! - A step's batch is cut into row groups that each run the whole forward and backward
//!   single-threaded, at most one group per thread at a time, on that thread's buffers (from a
//!   [`MlpGradWorkspace`] reused between steps). Groups shrink (never below one row) so that
//!   the groups running at once hold at most `ACT_BYTES_PER_PASS` of activations: no
//!   `[B, T, V]` logits tensor, only each group's `[rows, T, V]` block.
//! - Each parameter gradient is held once: a group adds its share into the workspace's sum as
//!   soon as it is computed, in group order (group `g` waits for `g − 1`'s share of that
//!   parameter), so the result does not depend on which thread ran which group. A panic in
//!   one group releases the others and is re-raised.
//!
//! How row groups are formed, scheduled and summed is [`groups`].
//!
//! The forward keeps exactly the activations the backward reads, and causal attention skips
//! the masked upper triangle in blocks of query rows. What this path gained over autograd is in
//! `docs/benchmarks.md` ("BalancedSubnet step and audit throughput", "Training step").

use candle_core::{bail, Result};

use super::cpu::activation;
use super::cpu::attention::{attention_bwd, attention_fwd, AttnShape, QkvLayout};
use super::cpu::gemm::{dense_bwd_w, dense_fwd, gemm};
use super::cpu::norm::{col_sum, layer_norm_bwd_add, rows_plus_bias};
use super::cpu::rotary::rotate_packed;
use super::cpu::vmath::{exp_shifted_in_place, layer_norm, logsumexp, max_lanes};
use super::fused;
use super::ops::Activation;
use super::ModelSpec;
pub(crate) use forward::{final_hidden, forward_only, patched_grads};
pub(crate) use groups::run_parts;
pub use groups::MlpGradWorkspace;
use groups::{sums, Sink};

pub(crate) mod forward;
mod groups;

/// Which parameter gradients a pass accumulates.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Want<'a> {
    /// The MLP weight matrices only (`c_fc`, `c_proj`); the backward stops at layer 0's `c_fc`.
    Mlp,
    /// Every parameter, down to the embeddings (training).
    All,
    /// None: the forward and each position's log-probability of its next token (scoring).
    Forward,
    /// None: the forward up to the final LayerNorm, whose output is the result (the
    /// single-pass audit's hidden states; no head), for positions `from[r]..lens[r]` of each
    /// row `r` only, rows in order: the last block computes its attention for every position
    /// (the keys need them) and the rest of the block for those positions alone.
    Hidden(&'a [usize]),
    /// None: the forward, summing each block's MLP activations (after the nonlinearity) over
    /// positions `from[r]..lens[r] − 1` of each row `r` (the positions that predict a token of
    /// the row), per row: what attribution by activations reads ([`forward::mlp_activation_sums`]).
    Activations(&'a [usize]),
    /// Every parameter, as [`Want::All`], with each row's MLP activations (after the
    /// nonlinearity, in every block) multiplied by that row's neuron mask: `[b, I]` row-major.
    /// Example-tied dropout's training pass.
    Dropped(&'a [f32]),
    /// None: Integrated Gradients' pass. At block `layer`, each row's MLP activation at its
    /// last predicting position (`lens[r] − 2`) is multiplied by `scale[r]`; the loss is
    /// `Σ_r row_weight[r] · p_r`, `p_r` the probability of the row's last token there, and
    /// the result is `∂L/∂(that scaled activation)` per row, `[b, I]`.
    Patch { layer: usize, scale: &'a [f32] },
}

/// Index of block `li`'s `k`-th parameter in [`Gpt2::named_tensors`] order: `wte`, `wpe`, then
/// per block `ln_1` (w, b), `c_attn` (w, b), `attn.c_proj` (w, b), `ln_2` (w, b), `c_fc` (w, b),
/// `mlp.c_proj` (w, b); then `ln_f` (w, b) and, untied, `lm_head`.
pub(crate) const fn pidx(li: usize, k: usize) -> usize {
    2 + 12 * li + k
}
pub(crate) const P_LN1: usize = 0;
pub(crate) const P_ATTN: usize = 2;
pub(crate) const P_PROJ: usize = 4;
pub(crate) const P_LN2: usize = 6;
pub(crate) const P_FC: usize = 8;
pub(crate) const P_MPROJ: usize = 10;

/// One worker's activations and scratch, reused by every row group it runs.
#[derive(Default)]
pub(crate) struct PartBufs {
    /// Residual stream entering each block, plus the final one: `L + 1` × `[N, H]`.
    xs: Vec<Vec<f32>>,
    layers: Vec<LayerBufs>,
    /// Logits, then their gradient, `[N, V]`.
    logits: Vec<f32>,
    /// The final LayerNorm's output `[N, H]`.
    hf: Vec<f32>,
    /// Scratch: `[N, H]` ×2, `[N, I]`, `[N, 3H]`, `[T, T]`.
    dx: Vec<f32>,
    dt: Vec<f32>,
    dh: Vec<f32>,
    dqkv: Vec<f32>,
    ds: Vec<f32>,
    /// `∂` of the MLP's LayerNorm output `[N, H]`.
    dm: Vec<f32>,
    /// One parameter's gradient over this group's rows (a weight, its bias), before it is
    /// added to the workspace's sums; with tied embeddings, `wte`'s share from the head.
    gw: Vec<f32>,
    gb: Vec<f32>,
    tied: Vec<f32>,
    /// The group's rows' mean losses and ([`Want::Forward`]) next-token log-probabilities.
    row_loss: Vec<f64>,
    token_lp: Vec<f32>,
    /// [`Want::Activations`]: per row, each block's activation sums, `[rows, L, I]`.
    act: Vec<f32>,
}

/// What one block's backward reads.
#[derive(Default)]
struct LayerBufs {
    /// `ln_1`'s output, the packed q/k/v, the attention probabilities and output.
    ln1: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    /// Residual after attention, the MLP input (LayerNorm output), pre- and post-activation.
    xm: Vec<f32>,
    m_in: Vec<f32>,
    hpre: Vec<f32>,
    h: Vec<f32>,
}

/// A buffer of exactly `n` elements (contents unspecified; every user overwrites it).
fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    }
    v
}

/// A buffer of exactly `n` zeros.
fn zbuf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    let b = buf(v, n);
    b.fill(0.0);
    b
}

/// The first `n` elements of a scratch buffer that grows as needed (contents unspecified).
fn scratch(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// A LayerNorm's `(∂w, ∂b)` scratch, zeroed, when every gradient is wanted.
fn norm_scratch<'b>(
    gw: &'b mut Vec<f32>,
    gb: &'b mut Vec<f32>,
    h: usize,
    full: bool,
) -> Option<(&'b mut [f32], &'b mut [f32])> {
    full.then(|| {
        let (w, b) = (scratch(gw, h), scratch(gb, h));
        w.fill(0.0);
        b.fill(0.0);
        (w, b)
    })
}

/// Output of [`HandWrittenPass::mlp_grads`], borrowing the workspace's buffers.
pub struct MlpGrads<'w> {
    /// `Σ_r row_weight[r] · loss[r]`.
    pub loss: f64,
    /// Each row's mean cross-entropy over its own `len − 1` predictions.
    pub row_loss: Vec<f64>,
    /// `(∂L/∂c_fc, ∂L/∂c_proj)` per block, each `[in, out]` row-major like the weights.
    pub grads: Vec<(&'w [f32], &'w [f32])>,
}

/// Output of [`HandWrittenPass::train_grads`], borrowing the workspace's buffers.
pub struct TrainGrads<'w> {
    /// The causal-LM loss ([`crate::models::ops::lm_loss`]), or the weighted sum of
    /// [`HandWrittenPass::weighted_grads`].
    pub loss: f64,
    /// Each row's mean cross-entropy over its own `len − 1` predictions.
    pub row_loss: Vec<f64>,
    /// `∂loss/∂p` for every parameter, in the model's `named_tensors` order, each row-major in
    /// the parameter's shape. Tied embeddings get both uses' gradient in `wte`.
    pub grads: Vec<&'w [f32]>,
}

/// The model's sizes.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) t: usize,
    /// The context: rows of `wpe`, and the longest `t`.
    pub(crate) npos: usize,
    pub(crate) h: usize,
    pub(crate) nh: usize,
    pub(crate) inner: usize,
    pub(crate) v: usize,
    pub(crate) eps: f32,
    pub(crate) act: Activation,
}

/// Every weight the step reads, as slices, and how the model family arranges them.
pub(crate) struct Weights<'a> {
    pub(crate) wte: &'a [f32],
    /// Learned position embeddings `[positions, H]` (GPT-2); `None` with rotary ones.
    pub(crate) wpe: Option<&'a [f32]>,
    /// `[V, H]` (the tied `wte` or an untied head).
    pub(crate) lm: &'a [f32],
    /// Whether `lm` is `wte`.
    pub(crate) tied: bool,
    pub(crate) lnf: (&'a [f32], &'a [f32]),
    pub(crate) blocks: Vec<BlockWeights<'a>>,
    /// Dense weights stored `[out, in]` (`nn.Linear`: GPT-NeoX) instead of `[in, out]`
    /// (GPT-2's `Conv1D`).
    pub(crate) linear: bool,
    /// Where each head's query, key and value sit in the packed projection.
    pub(crate) layout: QkvLayout,
    /// GPT-NeoX's parallel residual: the MLP reads `LayerNorm(x)`, not `LayerNorm(x + attn)`.
    pub(crate) parallel: bool,
    /// Rotary tables `cos`, `sin: [positions, half]` and `half` (the rotated dimensions of a
    /// head are `2·half`); `None` without rotary embeddings.
    pub(crate) rotary: Option<(&'a [f32], &'a [f32], usize)>,
}

impl<'a> Weights<'a> {
    /// What every family has: the token embedding, the head (`None`: tied to the embedding),
    /// the final LayerNorm, the blocks and where heads sit in the packed projection. The
    /// rest starts as GPT-2's: no position embeddings (set them), `[in, out]` weights,
    /// sequential residual, no rotary embeddings.
    pub(crate) fn new(
        wte: &'a [f32],
        head: Option<&'a [f32]>,
        lnf: (&'a [f32], &'a [f32]),
        blocks: Vec<BlockWeights<'a>>,
        layout: QkvLayout,
    ) -> Self {
        Self {
            wte,
            wpe: None,
            lm: head.unwrap_or(wte),
            tied: head.is_none(),
            lnf,
            blocks,
            linear: false,
            layout,
            parallel: false,
            rotary: None,
        }
    }
}

/// One block's weights, each `(weight, bias)`; a family without a bias passes zeros.
pub(crate) struct BlockWeights<'a> {
    pub(crate) ln1: (&'a [f32], &'a [f32]),
    pub(crate) qkv: (&'a [f32], &'a [f32]),
    pub(crate) proj: (&'a [f32], &'a [f32]),
    pub(crate) ln2: (&'a [f32], &'a [f32]),
    pub(crate) fc: (&'a [f32], &'a [f32]),
    pub(crate) mproj: (&'a [f32], &'a [f32]),
    /// Attention logit scale.
    pub(crate) scale: f32,
}

/// Forward and backward over one row group (`ids: [b, t]`), single-threaded: fills `ws.grads`
/// (what `want` asks for) and `ws.row_loss`.
#[allow(clippy::too_many_arguments)]
fn part(
    d: Dims,
    w: &Weights,
    ids: &[u32],
    lens: &[usize],
    row_weight: &[f32],
    want: Want<'_>,
    ws: &mut PartBufs,
    sink: &Sink,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has the features `part_avx512` is compiled for (checked just above).
        return unsafe { part_avx512(d, w, ids, lens, row_weight, want, ws, sink) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features `part_avx2` is compiled for (checked just above).
        return unsafe { part_avx2(d, w, ids, lens, row_weight, want, ws, sink) };
    }
    part_body(d, w, ids, lens, row_weight, want, ws, sink)
}

/// `unsafe fn $name(..)`: [`part_body`] compiled with the target features `$features` (the
/// crate's baseline is x86-64's SSE2). Floating-point semantics are unchanged: no contraction
/// into FMA, no reassociation, so every build computes the same operations in the same order.
macro_rules! part_with_features {
    ($(#[$doc:meta])* $name:ident, $features:literal) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            d: Dims,
            w: &Weights,
            ids: &[u32],
            lens: &[usize],
            row_weight: &[f32],
            want: Want<'_>,
            ws: &mut PartBufs,
            sink: &Sink,
        ) {
            part_body(d, w, ids, lens, row_weight, want, ws, sink)
        }
    };
}

part_with_features!(
    /// 16-wide vectors for the row loops (the lane reductions of
    /// [`crate::models::vmath`] are 16 lanes).
    part_avx512,
    "avx512f,avx2,fma"
);
part_with_features!(
    /// 8-wide vectors for the row loops (LayerNorm, softmax, bias, activation).
    part_avx2,
    "avx2,fma"
);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn part_body(
    d: Dims,
    w: &Weights,
    ids: &[u32],
    lens: &[usize],
    row_weight: &[f32],
    want: Want<'_>,
    ws: &mut PartBufs,
    sink: &Sink,
) {
    let Dims {
        t,
        npos,
        h,
        nh,
        inner,
        v,
        eps,
        act,
    } = d;
    let (b, nl) = (lens.len(), w.blocks.len());
    let n = b * t;
    let lin = w.linear;
    let attn = |scale| AttnShape {
        layout: w.layout,
        b,
        t,
        scale,
    };
    let full = matches!(want, Want::All | Want::Dropped(_));
    // Want::Hidden: the (row · t + position) rows whose final states are wanted.
    let sel: Option<Vec<usize>> = match want {
        Want::Hidden(from) => Some(
            (0..b)
                .flat_map(|r| r * t + from[r]..r * t + lens[r])
                .collect(),
        ),
        _ => None,
    };
    ws.xs.resize_with(nl + 1, Vec::new);
    ws.layers.resize_with(nl, LayerBufs::default);

    // Embeddings.
    let x0 = buf(&mut ws.xs[0], n * h);
    for (r, row) in x0.chunks_exact_mut(h).enumerate() {
        let (id, pos) = (ids[r] as usize, r % t);
        row.copy_from_slice(&w.wte[id * h..(id + 1) * h]);
        if let Some(wpe) = w.wpe {
            row.iter_mut()
                .zip(&wpe[pos * h..(pos + 1) * h])
                .for_each(|(o, &p)| *o += p);
        }
    }

    // Forward.
    for (li, bw) in w.blocks.iter().enumerate() {
        let (done, rest) = ws.xs.split_at_mut(li + 1);
        let x = &done[li][..];
        // The backward reads every layer's activations; a forward alone reuses one set.
        let lb = &mut ws.layers[if matches!(
            want,
            Want::Forward | Want::Hidden(_) | Want::Activations(_)
        ) {
            0
        } else {
            li
        }];
        let a = buf(&mut lb.ln1, n * h);
        layer_norm(x, bw.ln1, eps, a);
        let qkv = buf(&mut lb.qkv, n * 3 * h);
        rows_plus_bias(None, bw.qkv.1, qkv);
        dense_fwd(lin, (n, h, 3 * h), qkv, a, bw.qkv.0, true);
        if let Some((cos, sin, half)) = w.rotary {
            rotate_packed(qkv, w.layout, (b, t), (cos, sin), half, false);
        }
        let probs = buf(&mut lb.probs, b * nh * t * t);
        let att = buf(&mut lb.att, n * h);
        attention_fwd(qkv, attn(bw.scale), probs, att);
        // Want::Hidden's last block: the rest of it for the wanted positions only.
        let (x, att, n) = match sel.as_deref().filter(|_| li + 1 == nl) {
            Some(sel) => {
                let (gx, ga) = (
                    buf(&mut ws.dx, sel.len() * h),
                    buf(&mut ws.dt, sel.len() * h),
                );
                for (k, &r) in sel.iter().enumerate() {
                    gx[k * h..(k + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
                    ga[k * h..(k + 1) * h].copy_from_slice(&att[r * h..(r + 1) * h]);
                }
                (&*gx, &*ga, sel.len())
            }
            None => (x, &*att, n),
        };
        let xm = buf(&mut lb.xm, n * h);
        rows_plus_bias(Some(x), bw.proj.1, xm);
        dense_fwd(lin, (n, h, h), xm, att, bw.proj.0, true);
        let m_in = buf(&mut lb.m_in, n * h);
        // Sequential: the MLP reads the residual after attention; parallel: the block's input.
        layer_norm(if w.parallel { x } else { xm }, bw.ln2, eps, m_in);
        let hpre = buf(&mut lb.hpre, n * inner);
        rows_plus_bias(None, bw.fc.1, hpre);
        dense_fwd(lin, (n, h, inner), hpre, m_in, bw.fc.0, true);
        let hh = buf(&mut lb.h, n * inner);
        activation::forward(act, hpre, hh);
        if let Want::Dropped(mask) = want {
            times_row_mask(hh, mask, t, inner);
        }
        if let Want::Patch { layer, scale } = want {
            if li == layer {
                for (r, &s) in scale.iter().enumerate() {
                    let p = r * t + lens[r] - 2;
                    hh[p * inner..(p + 1) * inner]
                        .iter_mut()
                        .for_each(|x| *x *= s);
                }
            }
        }
        if let Want::Activations(from) = want {
            let sums = if li == 0 {
                zbuf(&mut ws.act, b * nl * inner)
            } else {
                &mut ws.act[..]
            };
            for r in 0..b {
                let out = &mut sums[(r * nl + li) * inner..(r * nl + li + 1) * inner];
                for p in from[r]..lens[r].saturating_sub(1) {
                    let row = &hh[(r * t + p) * inner..(r * t + p + 1) * inner];
                    out.iter_mut().zip(row).for_each(|(o, &a)| *o += a);
                }
            }
        }
        let next = buf(&mut rest[0], n * h);
        rows_plus_bias(Some(xm), bw.mproj.1, next);
        dense_fwd(lin, (n, inner, h), next, hh, bw.mproj.0, true);
    }
    // The final LayerNorm, then logits = hf · lmᵀ.
    let hf = buf(&mut ws.hf, ws.xs[nl].len());
    layer_norm(&ws.xs[nl], w.lnf, eps, hf);
    if let Want::Hidden(_) | Want::Activations(_) = want {
        ws.row_loss.clear();
        ws.row_loss.resize(b, 0.0);
        return;
    }
    let logits = buf(&mut ws.logits, n * v);
    gemm(n, v, h, logits, hf, (h, 1), w.lm, (1, h), false);

    ws.row_loss.clear();
    if want == Want::Forward {
        ws.token_lp.clear();
        for (r, lg) in logits.chunks_exact(t * v).enumerate() {
            let len = lens[r];
            let mut total = 0f64;
            for j in 0..t - 1 {
                let lp = if j + 1 < len {
                    let row = &lg[j * v..(j + 1) * v];
                    row[ids[r * t + j + 1] as usize] - logsumexp(row)
                } else {
                    0.0
                };
                total -= f64::from(lp);
                ws.token_lp.push(lp);
            }
            ws.row_loss.push(if len > 1 {
                total / (len - 1) as f64
            } else {
                0.0
            });
        }
        return;
    }

    // Loss and its gradient, in place: logits become ∂L/∂logits. Want::Patch: only the last
    // prediction, and the gradient of its probability `p = e^{−ce}`, `−p·(softmax − onehot)`.
    let patch = matches!(want, Want::Patch { .. });
    for (r, lg) in logits.chunks_exact_mut(t * v).enumerate() {
        // A row of fewer than 2 tokens predicts nothing: loss 0, no gradient (as the composed
        // path's zero position weights give).
        let len = lens[r];
        let c = if len > 1 {
            row_weight[r] / (len - 1) as f32
        } else {
            0.0
        };
        let mut total = 0f64;
        for j in 0..t {
            let row = &mut lg[j * v..(j + 1) * v];
            if j + 1 >= len || (patch && j + 2 != len) {
                row.fill(0.0);
                continue;
            }
            // One pass for the softmax's numerators and their sum; then
            // ∂ce/∂logit = softmax − onehot(target), times the row's weight `c`.
            let tg = ids[r * t + j + 1] as usize;
            let target = row[tg];
            let max = max_lanes(row);
            let sum = exp_shifted_in_place(row, max);
            let ce = max + sum.ln() - target;
            total += f64::from(ce);
            let c = if patch {
                -(-ce).exp() * row_weight[r]
            } else {
                c
            };
            // `(e/sum − onehot)·c`, the target's term as a softmax then a subtraction: near a
            // certain prediction `p_target − 1` is exact, where `c/sum − c` would cancel.
            let inv = 1.0 / sum;
            let p_target = row[tg] * inv;
            row.iter_mut().for_each(|d| *d = *d * inv * c);
            row[tg] = (p_target - 1.0) * c;
        }
        ws.row_loss.push(if patch {
            total
        } else if len > 1 {
            total / (len - 1) as f64
        } else {
            0.0
        });
    }

    // Backward. An input gradient `dy · Wᵀ` is `dense_fwd` with the weight read the other way
    // (`!lin`, `d_in` and `d_out` swapped). Each parameter's gradient over this group's rows
    // goes to the sink as soon as it is computed.
    if full {
        // The head: ∂lm = ∂logitsᵀ hf (`wte`'s first share when tied, kept until the
        // embeddings' scatter adds the second).
        let g = if w.tied {
            buf(&mut ws.tied, v * h)
        } else {
            scratch(&mut ws.gw, v * h)
        };
        gemm(v, h, n, g, &ws.logits, (1, v), &ws.hf, (h, 1), false);
        if !w.tied {
            sink.add(pidx(nl, 2), g);
        }
    }
    let dhf = buf(&mut ws.dt, n * h);
    gemm(n, h, v, dhf, &ws.logits, (v, 1), w.lm, (h, 1), false);
    let dx = zbuf(&mut ws.dx, n * h);
    let p = norm_scratch(&mut ws.gw, &mut ws.gb, h, full);
    layer_norm_bwd_add(&ws.xs[nl], w.lnf.0, eps, dhf, dx, p);
    if full {
        sink.add_pair(pidx(nl, 0), &ws.gw[..h], &ws.gb[..h]);
    }
    for li in (0..nl).rev() {
        let bw = &w.blocks[li];
        let lb = &ws.layers[li];
        let dx = &mut ws.dx;
        // mlp.c_proj: ∂W2 from h and dx, ∂h = dx through W2, then the activation's derivative.
        if !patch {
            let gw = scratch(&mut ws.gw, inner * h);
            dense_bwd_w(lin, (n, inner, h), gw, &lb.h, dx);
            sink.add(pidx(li, P_MPROJ), gw);
        }
        if full {
            let gb = scratch(&mut ws.gb, h);
            col_sum(dx, gb);
            sink.add(pidx(li, P_MPROJ) + 1, gb);
        }
        let dh = buf(&mut ws.dh, n * inner);
        dense_fwd(!lin, (n, h, inner), dh, dx, bw.mproj.0, false);
        if let Want::Dropped(mask) = want {
            times_row_mask(dh, mask, t, inner);
        }
        if let Want::Patch { layer, .. } = want {
            if li == layer {
                let out = buf(&mut ws.act, b * inner);
                for (r, o) in out.chunks_exact_mut(inner).enumerate() {
                    let p = r * t + lens[r] - 2;
                    o.copy_from_slice(&dh[p * inner..(p + 1) * inner]);
                }
                break;
            }
        }
        activation::backward(act, &lb.hpre, dh);
        // c_fc: ∂W1 from m_in and ∂hpre.
        if !patch {
            let gw = scratch(&mut ws.gw, h * inner);
            dense_bwd_w(lin, (n, h, inner), gw, &lb.m_in, dh);
            sink.add(pidx(li, P_FC), gw);
        }
        if full {
            let gb = scratch(&mut ws.gb, inner);
            col_sum(dh, gb);
            sink.add(pidx(li, P_FC) + 1, gb);
        } else if li == 0 {
            break;
        }
        // ∂m_in = ∂hpre through W1, then through ln_2: into ∂(x + attn) now (sequential), or
        // into ∂x once the attention branch has read ∂next (parallel).
        let dm = buf(&mut ws.dm, n * h);
        dense_fwd(!lin, (n, inner, h), dm, dh, bw.fc.0, false);
        if !w.parallel {
            let p = norm_scratch(&mut ws.gw, &mut ws.gb, h, full);
            layer_norm_bwd_add(&lb.xm, bw.ln2.0, eps, dm, dx, p);
            if full {
                sink.add_pair(pidx(li, P_LN2), &ws.gw[..h], &ws.gb[..h]);
            }
        }
        // Attention output projection, attention, qkv projection, ln_1.
        if full {
            let gw = scratch(&mut ws.gw, h * h);
            dense_bwd_w(lin, (n, h, h), gw, &lb.att, dx);
            let gb = scratch(&mut ws.gb, h);
            col_sum(dx, gb);
            sink.add_pair(pidx(li, P_PROJ), &ws.gw[..h * h], &ws.gb[..h]);
        }
        let dt = buf(&mut ws.dt, n * h);
        dense_fwd(!lin, (n, h, h), dt, dx, bw.proj.0, false);
        let dqkv = buf(&mut ws.dqkv, n * 3 * h);
        let ds = buf(&mut ws.ds, t * t);
        attention_bwd((&lb.qkv, &lb.probs, dt), attn(bw.scale), dqkv, ds);
        if let Some((cos, sin, half)) = w.rotary {
            rotate_packed(dqkv, w.layout, (b, t), (cos, sin), half, true);
        }
        if full {
            let gw = scratch(&mut ws.gw, h * 3 * h);
            dense_bwd_w(lin, (n, h, 3 * h), gw, &lb.ln1, dqkv);
            let gb = scratch(&mut ws.gb, 3 * h);
            col_sum(dqkv, gb);
            sink.add_pair(pidx(li, P_ATTN), &ws.gw[..3 * h * h], &ws.gb[..3 * h]);
        }
        dense_fwd(!lin, (n, 3 * h, h), dt, dqkv, bw.qkv.0, false);
        let p = norm_scratch(&mut ws.gw, &mut ws.gb, h, full);
        layer_norm_bwd_add(&ws.xs[li], bw.ln1.0, eps, dt, dx, p);
        if full {
            sink.add_pair(pidx(li, P_LN1), &ws.gw[..h], &ws.gb[..h]);
        }
        if w.parallel {
            let p = norm_scratch(&mut ws.gw, &mut ws.gb, h, full);
            layer_norm_bwd_add(&ws.xs[li], bw.ln2.0, eps, &ws.dm, dx, p);
            if full {
                sink.add_pair(pidx(li, P_LN2), &ws.gw[..h], &ws.gb[..h]);
            }
        }
    }
    if full {
        // The embeddings: scatter the residual's gradient by token id and by position.
        let dx = &ws.dx;
        let by_token = |g: &mut [f32]| {
            for (r, row) in dx.chunks_exact(h).enumerate() {
                let id = ids[r] as usize;
                g[id * h..(id + 1) * h]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(g, &x)| *g += x);
            }
        };
        if w.tied {
            let g = &mut ws.tied[..v * h];
            by_token(g);
            sink.add(0, g);
        } else {
            sink.scatter(0, v * h, by_token);
        }
        if w.wpe.is_some() {
            sink.scatter(1, npos * h, |g| {
                for (r, row) in dx.chunks_exact(h).enumerate() {
                    let pos = r % t;
                    g[pos * h..(pos + 1) * h]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(g, &x)| *g += x);
                }
            });
        }
    }
}

/// MLP weights that replace a model's own in a pass (one `(in-projection, out-projection)`
/// pair per layer, in the weights' layout), or `None` for its own.
pub(crate) type Mlp<'m> = Option<&'m [(Vec<f32>, Vec<f32>)]>;

/// A model family the pass runs: its sizes, its weights as slices, its parameter order; and
/// the pass's two entry points.
pub(crate) trait HandWrittenPass {
    /// The token embedding, whose storage says where the weights live.
    fn embedding(&self) -> &candle_core::Tensor;

    /// Whether the pass can run on this model: f32 weights on the CPU, fused kernels enabled on
    /// this thread (every activation the loader accepts); callers fall back to autograd
    /// otherwise.
    fn mlp_grads_supported(&self) -> bool {
        fused::supported(&[self.embedding()])
    }
    /// The model's sizes, its LayerNorm epsilon and its MLP activation.
    fn shape(&self) -> (ModelSpec, f32, Activation);
    /// For each of the model's `named_tensors`, its slot in the pass's gradient list ([`pidx`]).
    fn param_slots(&self) -> Vec<usize>;
    /// Runs `f` on every weight as a plain slice, the MLP matrices replaced by `mlp` (in the
    /// weights' own layout) when given.
    fn with_weights<R>(&self, mlp: Mlp, f: impl FnOnce(&Weights) -> Result<R>) -> Result<R>;

    /// The loss `L = Σ_r row_weight[r] · ℓ_r`, where `ℓ_r` is row `r`'s mean next-token
    /// cross-entropy over its first `lens[r]` tokens, and `∂L/∂W` for every MLP matrix, with
    /// the MLP weights replaced by `mlp`: one `(in-projection, out-projection)` pair per layer
    /// in the weights' own layout (GPT-2's `c_fc`, `c_proj` `[in, out]`; GPT-NeoX's
    /// `dense_h_to_4h`, `dense_4h_to_h` `[out, in]`), gradients in the same layout.
    ///
    /// `ids` is `[b, t]` row-major, rows right-padded to `t` with any valid id; `lens[r] ≤ t`
    /// (a row shorter than 2 tokens contributes nothing).
    fn mlp_grads<'w>(
        &self,
        ids: &[u32],
        bt: (usize, usize),
        lens: &[usize],
        row_weight: &[f32],
        mlp: &[(Vec<f32>, Vec<f32>)],
        ws: &'w mut MlpGradWorkspace,
    ) -> Result<MlpGrads<'w>>
    where
        Self: Sized,
    {
        let (d, nl) = (dims(self, bt.1), self.shape().0.num_layers);
        let size = d.h * d.inner;
        if mlp.len() != nl || mlp.iter().any(|(a, c)| a.len() != size || c.len() != size) {
            bail!(
                "mlp_grads: MLP weights do not fit {nl} layers of {} × {}",
                d.h,
                d.inner
            );
        }
        let (loss, row_loss) = run(self, ids, bt, lens, row_weight, Some(mlp), Want::Mlp, ws)?;
        let mut all = sums(ws);
        let grads = (0..nl)
            .map(|li| {
                (
                    std::mem::take(&mut all[pidx(li, P_FC)]),
                    std::mem::take(&mut all[pidx(li, P_MPROJ)]),
                )
            })
            .collect();
        Ok(MlpGrads {
            loss,
            row_loss,
            grads,
        })
    }

    /// The causal-LM training loss of `ids` (`[b, t]` row-major, no padding): the mean over
    /// rows of each row's mean next-token cross-entropy over its `t − 1` predictions, exactly
    /// [`crate::models::ops::lm_loss`] of the model's logits; and its gradient with respect to
    /// every parameter, in the model's `named_tensors` order.
    fn train_grads<'w>(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        ws: &'w mut MlpGradWorkspace,
    ) -> Result<TrainGrads<'w>>
    where
        Self: Sized,
    {
        mean_grads(self, ids, (b, t), Want::All, ws)
    }

    /// `L = Σ_r row_weight[r] · ℓ_r` over right-padded rows (as [`Self::mlp_grads`]) and its
    /// gradient with respect to every parameter, in the model's `named_tensors` order.
    fn weighted_grads<'w>(
        &self,
        ids: &[u32],
        bt: (usize, usize),
        lens: &[usize],
        row_weight: &[f32],
        ws: &'w mut MlpGradWorkspace,
    ) -> Result<TrainGrads<'w>>
    where
        Self: Sized,
    {
        every_grad(self, ids, bt, lens, row_weight, Want::All, ws)
    }

    /// [`Self::train_grads`] with each row's MLP activations, in every block, multiplied by
    /// that row's neuron mask (`mask`: `[b, I]` row-major): example-tied dropout's step.
    fn dropped_grads<'w>(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        mask: &[f32],
        ws: &'w mut MlpGradWorkspace,
    ) -> Result<TrainGrads<'w>>
    where
        Self: Sized,
    {
        mean_grads(self, ids, (b, t), Want::Dropped(mask), ws)
    }
}

/// The mean over unpadded rows of each row's mean loss and its gradient with respect to every
/// parameter (`want`: [`Want::All`] or [`Want::Dropped`]): the training step's.
fn mean_grads<'w, M: HandWrittenPass>(
    m: &M,
    ids: &[u32],
    (b, t): (usize, usize),
    want: Want<'_>,
    ws: &'w mut MlpGradWorkspace,
) -> Result<TrainGrads<'w>> {
    let lens = vec![t; b];
    let row_weight = vec![1.0 / b.max(1) as f32; b];
    let mut out = every_grad(m, ids, (b, t), &lens, &row_weight, want, ws)?;
    out.loss = out.row_loss.iter().sum::<f64>() / b as f64;
    Ok(out)
}

/// The weighted loss's gradient with respect to every parameter (`want`: [`Want::All`] or
/// [`Want::Dropped`]), in the model's `named_tensors` order.
fn every_grad<'w, M: HandWrittenPass>(
    m: &M,
    ids: &[u32],
    bt: (usize, usize),
    lens: &[usize],
    row_weight: &[f32],
    want: Want<'_>,
    ws: &'w mut MlpGradWorkspace,
) -> Result<TrainGrads<'w>> {
    let (loss, row_loss) = run(m, ids, bt, lens, row_weight, None, want, ws)?;
    let slots = m.param_slots();
    let mut all = sums(ws);
    Ok(TrainGrads {
        loss,
        row_loss,
        grads: slots.iter().map(|&i| std::mem::take(&mut all[i])).collect(),
    })
}

/// Multiplies each position of row `r` of `x` (`[b, t, inner]`) by `mask[r]` (`[b, inner]`).
fn times_row_mask(x: &mut [f32], mask: &[f32], t: usize, inner: usize) {
    for (i, pos) in x.chunks_exact_mut(inner).enumerate() {
        let m = &mask[(i / t) * inner..(i / t + 1) * inner];
        pos.iter_mut().zip(m).for_each(|(x, &m)| *x *= m);
    }
}

/// The sizes of a pass of `m` over rows of `t` tokens.
fn dims<M: HandWrittenPass>(m: &M, t: usize) -> Dims {
    let (s, eps, act) = m.shape();
    Dims {
        t,
        npos: s.context_length,
        h: s.hidden_size,
        nh: s.num_heads,
        inner: s.intermediate_size,
        v: s.vocab_size,
        eps,
        act,
    }
}

/// [`run_parts`] on `m`'s weights, the MLP matrices replaced by `mlp` when given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<M: HandWrittenPass>(
    m: &M,
    ids: &[u32],
    (b, t): (usize, usize),
    lens: &[usize],
    row_weight: &[f32],
    mlp: Option<&[(Vec<f32>, Vec<f32>)]>,
    want: Want<'_>,
    ws: &mut MlpGradWorkspace,
) -> Result<(f64, Vec<f64>)> {
    if !m.mlp_grads_supported() {
        bail!("mlp_grads: unsupported model (needs f32 weights on the CPU)");
    }
    let d = dims(m, t);
    m.with_weights(mlp, |w| run_parts(d, w, ids, b, lens, row_weight, want, ws))
}
