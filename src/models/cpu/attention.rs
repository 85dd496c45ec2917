//! Causal multi-head attention, forward and backward, over a packed query/key/value buffer: the
//! training and unlearning passes' attention (inference reads the KV cache in [`super::attend`]).
//!
//! Invariants:
//! - [`attention_fwd`] computes `softmax(scale · Q Kᵀ + causal mask) V` per head, and
//!   [`attention_bwd`] its exact gradient with respect to Q, K and V, to f32 rounding; the tests
//!   below pin both against a naive f64 implementation and its finite differences, for both
//!   models' layouts and for sequences longer than one block of query rows.
//! - Where each head's Q, K and V sit in a row is a [`QkvLayout`]: GPT-2 packs `[Q | K | V]`
//!   (each `[nh, hd]`), GPT-NeoX `[nh, (q, k, v), hd]`; nothing else depends on the model.
//! - Only the lower triangle is computed: query rows go in blocks of [`ATT_BLOCK`], each against
//!   the keys up to its last row; saved probabilities are zero above the diagonal.
//! - Single-threaded: callers parallelise over rows groups, each with its own buffers.

use super::gemm::small_gemm;
use super::vmath::{exp_neg, max_lanes, sum_pairs};

/// Query rows per block of the causal products.
pub(crate) const ATT_BLOCK: usize = 32;

/// Where each head's query, key and value sit in one token's row of a packed `qkv` buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvLayout {
    /// Elements per token row (3·H).
    pub row: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Offsets of head 0's query, key and value in a row.
    pub q: usize,
    pub k: usize,
    pub v: usize,
    /// Distance in a row between the same part of consecutive heads.
    pub head_stride: usize,
}

impl QkvLayout {
    /// GPT-2's `c_attn` output: `[Q | K | V]`, each `[heads, head_dim]`.
    pub fn gpt2(hidden: usize, heads: usize) -> Self {
        let hd = hidden / heads;
        Self::new(3 * hidden, heads, hd, (0, hidden, 2 * hidden), hd)
    }

    /// GPT-NeoX's `query_key_value` output: `[heads, (q, k, v), head_dim]`.
    pub fn neox(hidden: usize, heads: usize) -> Self {
        let hd = hidden / heads;
        Self::new(3 * hidden, heads, hd, (0, hd, 2 * hd), 3 * hd)
    }

    /// A layout; panics unless every head's query, key and value lie within a row.
    pub fn new(
        row: usize,
        heads: usize,
        head_dim: usize,
        (q, k, v): (usize, usize, usize),
        head_stride: usize,
    ) -> Self {
        assert!(heads > 0 && head_dim > 0, "an attention needs heads");
        let last = (heads - 1) * head_stride + q.max(k).max(v) + head_dim;
        assert!(last <= row, "heads overrun a row of {row}: {last}");
        Self {
            row,
            heads,
            head_dim,
            q,
            k,
            v,
            head_stride,
        }
    }

    /// Width of the attention output, `heads × head_dim`.
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Softmax of a row with no −∞ entries, in place.
#[inline(always)]
pub(crate) fn softmax_dense_row(row: &mut [f32]) {
    let max = max_lanes(row);
    row.iter_mut().for_each(|v| *v = exp_neg(*v - max));
    let inv = 1.0 / sum_pairs(row, row, |a, _| a);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// One attention call's shape: where the heads sit, the batch `[b, t]` and the logit scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub layout: QkvLayout,
    pub b: usize,
    pub t: usize,
    pub scale: f32,
}

/// `(row, H, head_dim)` of `s`'s layout, after asserting that every packed buffer (`[B, T, row]`),
/// the probabilities (`[B, heads, T, T]`) and the output or its gradient (`[B, T, H]`) have a
/// `[b, t]` batch's lengths: the unsafe addressing of the kernels relies on it.
fn sizes(s: AttnShape, packed: &[usize], probs: usize, out: usize) -> (usize, usize, usize) {
    let (l, b, t) = (s.layout, s.b, s.t);
    let (row, h, nh, hd) = (l.row, l.hidden(), l.heads, l.head_dim);
    assert!(
        packed.iter().all(|&n| n == b * t * row),
        "packed buffers of {packed:?}"
    );
    assert!(
        probs == b * nh * t * t && out == b * t * h,
        "probs {probs}, out {out}"
    );
    (row, h, hd)
}

/// For the `bh`-th (batch, head) pair: its offset in `qkv` (the part's columns are added to
/// it), its query, key and value pointers, and its offset in the `[B, T, H]` output.
#[inline(always)]
fn head(qkv: &[f32], s: AttnShape, bh: usize) -> (usize, [*const f32; 3], usize) {
    let (l, t) = (s.layout, s.t);
    let (bi, hi) = (bh / l.heads, bh % l.heads);
    let off = bi * t * l.row + hi * l.head_stride;
    let base = &qkv[off..];
    let part = |c: usize| base[c..].as_ptr();
    let out = bi * t * l.hidden() + hi * l.head_dim;
    (off, [part(l.q), part(l.k), part(l.v)], out)
}

/// Rows `r0..r1`, columns `0..r1` of the `[t × t]` matrix at `dst`: `beta · A[r0..r1] B[0..r1]ᵀ`
/// for `[t × hd]` matrices A and B with row strides `a_rs` and `b_rs`.
///
/// # Safety
/// `a` and `b` address `t` rows of `hd` under their strides, `dst` a `[t × t]` matrix that
/// aliases neither.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn rows_a_bt(
    dst: *mut f32,
    t: usize,
    (r0, r1): (usize, usize),
    hd: usize,
    (a, a_rs): (*const f32, usize),
    (b, b_rs): (*const f32, usize),
    beta: f32,
) {
    small_gemm(
        r1 - r0,
        r1,
        hd,
        dst.add(r0 * t),
        t,
        a.add(r0 * a_rs),
        (a_rs, 1),
        b,
        (1, b_rs),
        beta,
        false,
    )
}

/// `dst[r0..r1] = M[r0..r1, 0..r1] X[0..r1]` for the lower-triangular `[t × t]` matrix M and a
/// `[t × hd]` X (row strides `dst_rs`, `x_rs`); with `transposed`, `dst[r0..r1] =
/// M[r0..t, r0..r1]ᵀ X[r0..t]` (what lies above M's diagonal is zero, so the rows before `r0`
/// add nothing).
///
/// # Safety
/// As for [`rows_a_bt`], with `dst` addressing `t` rows of `hd`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block_m_x(
    (dst, dst_rs): (*mut f32, usize),
    t: usize,
    (r0, r1): (usize, usize),
    hd: usize,
    m: *const f32,
    (x, x_rs): (*const f32, usize),
    transposed: bool,
) {
    let (k, m_block, m_strides, x_block) = if transposed {
        (t - r0, m.add(r0 * t + r0), (1, t), x.add(r0 * x_rs))
    } else {
        (r1, m.add(r0 * t), (t, 1), x)
    };
    small_gemm(
        r1 - r0,
        hd,
        k,
        dst.add(r0 * dst_rs),
        dst_rs,
        m_block,
        m_strides,
        x_block,
        (x_rs, 1),
        1.0,
        false,
    )
}

/// Causal multi-head attention over packed `qkv: [B, T, row]` (heads placed by `l`) →
/// `out: [B, T, H]` (head `i` in columns `i·hd..(i+1)·hd`), saving the probabilities
/// `[B, nh, T, T]` (zero above the diagonal).
#[inline(always)]
pub(crate) fn attention_fwd(qkv: &[f32], s: AttnShape, probs: &mut [f32], out: &mut [f32]) {
    let (t, scale) = (s.t, s.scale);
    let (row, h, hd) = sizes(s, &[qkv.len()], probs.len(), out.len());
    for (bh, p) in probs.chunks_exact_mut(t * t).enumerate() {
        let (_, [q, k, v], o) = head(qkv, s, bh);
        let o = out[o..].as_mut_ptr();
        for r0 in (0..t).step_by(ATT_BLOCK) {
            let r1 = (r0 + ATT_BLOCK).min(t);
            // SAFETY: q, k, v address [t × hd] blocks of `qkv` (row stride `row`) of batch bi,
            // head hi, within the slice (asserted above, and by `QkvLayout::new`); `p` is this
            // head's [t × t] chunk of `probs`.
            unsafe { rows_a_bt(p.as_mut_ptr(), t, (r0, r1), hd, (q, row), (k, row), scale) };
            for i in r0..r1 {
                let row = &mut p[i * t..(i + 1) * t];
                softmax_dense_row(&mut row[..=i]);
                row[i + 1..].fill(0.0);
            }
            // SAFETY: as above; `o` is the [t × hd] block of `out` (row stride H) of bi, hi.
            unsafe { block_m_x((o, h), t, (r0, r1), hd, p.as_ptr(), (v, row), false) };
        }
    }
}

/// Backward of [`attention_fwd`]: `dqkv` (laid out as `qkv`; every query, key and value entry
/// is written, other columns of a row are left as they are) from `g = ∂L/∂out [B, T, H]`; `ds`
/// is scratch of at least `T × T`.
#[inline(always)]
pub(crate) fn attention_bwd(
    (qkv, probs, g): (&[f32], &[f32], &[f32]),
    s: AttnShape,
    dqkv: &mut [f32],
    ds: &mut [f32],
) {
    let (l, t, scale) = (s.layout, s.t, s.scale);
    let (row, h, hd) = sizes(s, &[qkv.len(), dqkv.len()], probs.len(), g.len());
    let ds = &mut ds[..t * t];
    for (bh, p) in probs.chunks_exact(t * t).enumerate() {
        let (off, [q, k, v], go) = head(qkv, s, bh);
        let go = g[go..].as_ptr();
        // dP = dO Vᵀ (lower triangle, by row blocks), then dS = scale·P⊙(dP − rowsum(P⊙dP)).
        for r0 in (0..t).step_by(ATT_BLOCK) {
            let r1 = (r0 + ATT_BLOCK).min(t);
            // SAFETY: `ds` is [t × t]; go and v address [t × hd] blocks of `g` (row stride H)
            // and `qkv` (row stride `row`) within the slices (asserted above).
            unsafe { rows_a_bt(ds.as_mut_ptr(), t, (r0, r1), hd, (go, h), (v, row), 1.0) };
            for i in r0..r1 {
                let (dr, pr) = (&mut ds[i * t..=i * t + i], &p[i * t..=i * t + i]);
                let dot = sum_pairs(dr, pr, |a, b| a * b);
                for (d, &pp) in dr.iter_mut().zip(pr) {
                    *d = scale * pp * (*d - dot);
                }
                ds[i * t + i + 1..(i + 1) * t].fill(0.0);
            }
        }
        // SAFETY: dq, dk, dv are batch bi / head hi's [t × hd] blocks of `dqkv` (row stride
        // `row`), within the slice. P and dS are zero above the diagonal, so each product only
        // spans the rows and columns that can be non-zero.
        unsafe {
            let d = dqkv[off..].as_mut_ptr();
            let (dq, dk, dv) = (d.add(l.q), d.add(l.k), d.add(l.v));
            for r0 in (0..t).step_by(ATT_BLOCK) {
                let r1 = (r0 + ATT_BLOCK).min(t);
                // dQ[r0..r1] = dS[r0..r1, 0..r1] K[0..r1]
                block_m_x((dq, row), t, (r0, r1), hd, ds.as_ptr(), (k, row), false);
                // Key block c0..c1 = r0..r1 sees queries c0..t:
                // dK[c] = dS[c0..t, c]ᵀ Q[c0..t], dV[c] = P[c0..t, c]ᵀ dO[c0..t].
                block_m_x((dk, row), t, (r0, r1), hd, ds.as_ptr(), (q, row), true);
                block_m_x((dv, row), t, (r0, r1), hd, p.as_ptr(), (go, h), true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::cpu::vmath::{max_lanes, sum_pairs};

    /// Naive causal attention in f64: `out [B, T, H]`.
    fn naive(qkv: &[f64], l: QkvLayout, (b, t): (usize, usize), scale: f64) -> Vec<f64> {
        let (h, hd) = (l.hidden(), l.head_dim);
        let mut out = vec![0f64; b * t * h];
        for bi in 0..b {
            for hi in 0..l.heads {
                let at = |ti: usize, part: usize, j: usize| {
                    qkv[(bi * t + ti) * l.row + hi * l.head_stride + part + j]
                };
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|c| {
                            scale * (0..hd).map(|j| at(i, l.q, j) * at(c, l.k, j)).sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..hd {
                        out[(bi * t + i) * h + hi * hd + j] =
                            (0..=i).map(|c| e[c] / z * at(c, l.v, j)).sum();
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_util::rand(&[n], seed).to_vec1().unwrap()
    }

    fn check(l: QkvLayout, (b, t): (usize, usize)) {
        let scale = 1.0 / (l.head_dim as f32).sqrt();
        let n = b * t * l.row;
        let qkv = values(n, 1);
        let mut probs = vec![0f32; b * l.heads * t * t];
        let mut out = vec![0f32; b * t * l.hidden()];
        let shape = AttnShape {
            layout: l,
            b,
            t,
            scale,
        };
        attention_fwd(&qkv, shape, &mut probs, &mut out);
        let q64: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
        let want = naive(&q64, l, (b, t), scale as f64);
        for (a, w) in out.iter().zip(&want) {
            assert!((*a as f64 - w).abs() < 1e-5, "forward {a} vs {w}");
        }
        for p in probs.chunks_exact(t * t) {
            for i in 0..t {
                assert!(p[i * t + i + 1..(i + 1) * t].iter().all(|&x| x == 0.0));
                let s: f32 = p[i * t..=i * t + i].iter().sum();
                assert!((s - 1.0).abs() < 1e-5);
            }
        }
        // The gradient of L = Σ R ⊙ out, against central differences of the f64 forward.
        let r = values(out.len(), 2);
        let mut dqkv = vec![0f32; n];
        let mut ds = vec![0f32; t * t];
        attention_bwd((&qkv, &probs, &r), shape, &mut dqkv, &mut ds);
        let loss = |x: &[f64]| -> f64 {
            naive(x, l, (b, t), scale as f64)
                .iter()
                .zip(&r)
                .map(|(o, &w)| o * w as f64)
                .sum()
        };
        let eps = 1e-6;
        let mut x = q64.clone();
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..n {
            x[i] = q64[i] + eps;
            let up = loss(&x);
            x[i] = q64[i] - eps;
            let down = loss(&x);
            x[i] = q64[i];
            let fd = (up - down) / (2.0 * eps);
            num += (dqkv[i] as f64 - fd).powi(2);
            den += fd * fd;
        }
        let rel = (num / den).sqrt();
        assert!(
            rel < 1e-4,
            "{l:?} b={b} t={t}: relative gradient error {rel}"
        );
    }

    #[test]
    fn lane_reductions_match_serial_ones() {
        for n in [1usize, 5, 16, 17, 128, 151] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let y: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32 - 6.0) / 3.0).collect();
            let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
            assert!((sum_pairs(&x, &y, |a, b| a * b) - dot).abs() <= 1e-5 * dot.abs().max(1.0));
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_lanes(&x), max);
            let mut row = x.clone();
            softmax_dense_row(&mut row);
            let mut reference = x.clone();
            crate::models::fused::softmax_row(&mut reference);
            for (a, b) in row.iter().zip(&reference) {
                assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn forward_and_backward_match_the_naive_attention_in_both_layouts() {
        check(QkvLayout::gpt2(6, 2), (2, 5));
        check(QkvLayout::neox(6, 2), (2, 5));
        // Longer than one block of query rows.
        check(QkvLayout::gpt2(4, 2), (1, ATT_BLOCK + 5));
        check(QkvLayout::neox(4, 2), (1, ATT_BLOCK + 5));
    }

    #[test]
    fn the_two_layouts_place_heads_where_each_model_puts_them() {
        let g = QkvLayout::gpt2(8, 2);
        assert_eq!((g.q, g.k, g.v, g.head_stride), (0, 8, 16, 4));
        let n = QkvLayout::neox(8, 2);
        assert_eq!((n.q, n.k, n.v, n.head_stride), (0, 4, 8, 12));
    }

    #[test]
    #[should_panic(expected = "overrun")]
    fn a_layout_whose_heads_overrun_a_row_is_refused() {
        QkvLayout::new(12, 2, 4, (0, 4, 8), 4);
    }
}
