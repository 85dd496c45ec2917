//! GPT-2's gradient with respect to its MLP weight matrices alone, without candle's autograd:
//! the unlearning step's hot path.
//!
//! BalancedSubnet trains nothing but the scores over the MLP matrices (spec §4.1), so of the
//! whole backward pass it needs `∂L/∂W_eff` for each `c_fc` and `c_proj`. Through candle's
//! autograd every node's gradient is accumulated into a fresh zero tensor, every frozen weight,
//! bias and LayerNorm parameter gets a gradient nobody reads, and layer 0's attention is
//! differentiated for nothing. Here the forward keeps exactly the activations the backward reads,
//! in buffers that a [`MlpGradWorkspace`] reuses from step to step (no page faults after the
//! first), and the backward computes only what reaches an MLP matrix: it stops at layer 0's
//! `c_fc`. Causal attention skips the masked upper triangle in blocks of query rows.
//!
//! It computes the same function as [`super::Gpt2::forward_hidden`] → logits →
//! per-sequence cross-entropy with the given MLP weights (to f32 rounding); `tests` pin both the
//! loss and every MLP gradient to candle's autograd through the model's ordinary forward.
//! Supported: f32 weights on the CPU, ReLU MLPs, unpadded causal attention (rows may be
//! right-padded; the padding's predictions carry zero weight). [`super::Gpt2::mlp_grads_supported`]
//! says whether a model qualifies; callers fall back to autograd otherwise.

use std::ops::Deref;

use candle_core::{bail, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

use super::Gpt2;
use crate::models::fused::{
    self, gemm_parallelism, row_stats, rows_per_task, small_gemm, softmax_row, SharedMut,
};
use crate::models::ops::Activation;

/// Query rows per block of the causal attention kernels.
const ATT_BLOCK: usize = 32;

/// Buffers kept between steps so that steady-state steps allocate nothing large.
#[derive(Default)]
pub struct MlpGradWorkspace {
    /// Residual stream entering each block, plus the final one: `L + 1` × `[N, H]`.
    xs: Vec<Vec<f32>>,
    layers: Vec<LayerBufs>,
    /// Final LayerNorm output `[N, H]`, logits / their gradient `[N, V]`.
    hf: Vec<f32>,
    logits: Vec<f32>,
    /// Scratch: `[N, H]` ×3, `[N, I]`, `[N, 3H]`.
    a: Vec<f32>,
    dx: Vec<f32>,
    dt: Vec<f32>,
    dh: Vec<f32>,
    dqkv: Vec<f32>,
}

/// What one block's backward reads.
#[derive(Default)]
struct LayerBufs {
    qkv: Vec<f32>,
    probs: Vec<f32>,
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

/// Output of [`Gpt2::mlp_grads`].
pub struct MlpGrads {
    /// `Σ_r row_weight[r] · loss[r]`.
    pub loss: f64,
    /// Each row's mean cross-entropy over its own `len − 1` predictions.
    pub row_loss: Vec<f64>,
    /// `(∂L/∂c_fc, ∂L/∂c_proj)` per block, each `[in, out]` row-major like the weights.
    pub grads: Vec<(Vec<f32>, Vec<f32>)>,
}

/// A read view of a contiguous f32 CPU tensor (`G` is candle's storage read guard).
struct View<'a, G> {
    guard: G,
    layout: &'a Layout,
}

fn view(t: &Tensor) -> View<'_, impl Deref<Target = Storage> + '_> {
    let (guard, layout) = t.storage_and_layout();
    View { guard, layout }
}

impl<G: Deref<Target = Storage>> View<'_, G> {
    fn slice(&self) -> Result<&[f32]> {
        let Storage::Cpu(c) = &*self.guard else {
            bail!("mlp_grads runs on the CPU only");
        };
        let Some((a, b)) = self.layout.contiguous_offsets() else {
            bail!("mlp_grads needs contiguous weights");
        };
        Ok(&c.as_slice::<f32>()?[a..b])
    }
}

/// `dst[m×n] (row stride n) (+)= lhs[m×k] · rhs[k×n]`, strides `(row, column)`, multi-threaded.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    accumulate: bool,
) {
    // The asserts make the unsafe addressing below sound; callers size every buffer exactly.
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lrs + (k - 1) * lcs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rrs + (n - 1) * rcs);
    // SAFETY: every access lies within the slices (checked above); dst is distinct from both.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(),
        )
    }
}

/// `out = LayerNorm(x)` row by row.
fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let chunk = d * rows_per_task(x.len() / d);
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, xc)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                let (mean, rstd) = row_stats(xrow, eps);
                for i in 0..d {
                    orow[i] = (xrow[i] - mean) * rstd * w[i] + b[i];
                }
            }
        });
}

/// `dx += ∂LayerNorm(x)/∂x · g` row by row (the weight and bias gradients are not needed).
fn layer_norm_bwd_add(x: &[f32], w: &[f32], eps: f32, g: &[f32], dx: &mut [f32]) {
    let d = w.len();
    let chunk = d * rows_per_task(x.len() / d);
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
        .for_each(|(dxc, (xc, gc))| {
            let mut xhat = vec![0f32; d];
            for ((dxr, xr), gr) in dxc
                .chunks_exact_mut(d)
                .zip(xc.chunks_exact(d))
                .zip(gc.chunks_exact(d))
            {
                let (mean, rstd) = row_stats(xr, eps);
                let (mut a, mut c) = (0f32, 0f32);
                for i in 0..d {
                    xhat[i] = (xr[i] - mean) * rstd;
                    let gw = gr[i] * w[i];
                    a += gw;
                    c += gw * xhat[i];
                }
                let (a, c) = (a / d as f32, c / d as f32);
                for i in 0..d {
                    dxr[i] += rstd * (gr[i] * w[i] - a - xhat[i] * c);
                }
            }
        });
}

/// Fills each `[d]` row of `out` with `base_row + bias` (`base` is `[rows, d]`, or absent).
fn rows_plus_bias(base: Option<&[f32]>, bias: &[f32], out: &mut [f32]) {
    let d = bias.len();
    let chunk = d * rows_per_task(out.len() / d);
    out.par_chunks_mut(chunk).enumerate().for_each(|(ci, o)| {
        for (ri, row) in o.chunks_exact_mut(d).enumerate() {
            match base {
                Some(x) => {
                    let off = ci * chunk + ri * d;
                    for ((r, &xv), &bv) in row.iter_mut().zip(&x[off..off + d]).zip(bias) {
                        *r = xv + bv;
                    }
                }
                None => row.copy_from_slice(bias),
            }
        }
    });
}

/// Causal multi-head attention over packed `qkv: [B, T, 3H]` → `out: [B, T, H]`, saving the
/// probabilities `[B, nh, T, T]` (zero above the diagonal).
fn attention_fwd(
    qkv: &[f32],
    (b, t, h, nh): (usize, usize, usize, usize),
    scale: f32,
    probs: &mut [f32],
    out: &mut [f32],
) {
    let (three_h, hd) = (3 * h, h / nh);
    debug_assert!(qkv.len() == b * t * three_h && probs.len() == b * nh * t * t);
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
        let (bi, hi) = (bh / nh, bh % nh);
        let base = &qkv[bi * t * three_h + hi * hd..];
        let (q, k, v) = (base.as_ptr(), base[h..].as_ptr(), base[2 * h..].as_ptr());
        for r0 in (0..t).step_by(ATT_BLOCK) {
            let r1 = (r0 + ATT_BLOCK).min(t);
            // SAFETY: q, k, v address [t × hd] blocks of `qkv` (row stride 3H) within the
            // slice; `p` is this task's own [t × t] chunk, rows r0..r1, columns 0..r1.
            unsafe {
                small_gemm(
                    r1 - r0,
                    r1,
                    hd,
                    p.as_mut_ptr().add(r0 * t),
                    t,
                    q.add(r0 * three_h),
                    (three_h, 1),
                    k,
                    (1, three_h),
                    scale,
                    false,
                );
            }
            for i in r0..r1 {
                let row = &mut p[i * t..(i + 1) * t];
                softmax_row(&mut row[..=i]);
                row[i + 1..].fill(0.0);
            }
            // SAFETY: this task alone writes columns hi·hd..(hi+1)·hd of batch bi's rows
            // r0..r1 of `out` ([b, t, h], row stride h).
            unsafe {
                small_gemm(
                    r1 - r0,
                    hd,
                    r1,
                    out_ptr.get().add((bi * t + r0) * h + hi * hd),
                    h,
                    p.as_ptr().add(r0 * t),
                    (t, 1),
                    v,
                    (three_h, 1),
                    1.0,
                    false,
                );
            }
        }
    });
}

/// Backward of [`attention_fwd`]: `dqkv [B, T, 3H]` from `g = ∂L/∂out [B, T, H]`.
fn attention_bwd(
    qkv: &[f32],
    probs: &[f32],
    g: &[f32],
    (b, t, h, nh): (usize, usize, usize, usize),
    scale: f32,
    dqkv: &mut [f32],
) {
    let (three_h, hd) = (3 * h, h / nh);
    debug_assert!(dqkv.len() == b * t * three_h && g.len() == b * t * h);
    let d_ptr = SharedMut(dqkv.as_mut_ptr());
    probs.par_chunks(t * t).enumerate().for_each_init(
        || vec![0f32; t * t],
        |ds, (bh, p)| {
            let (bi, hi) = (bh / nh, bh % nh);
            let off = bi * t * three_h + hi * hd;
            let base = &qkv[off..];
            let (q, k, v) = (base.as_ptr(), base[h..].as_ptr(), base[2 * h..].as_ptr());
            let go = g[bi * t * h + hi * hd..].as_ptr();
            // dP = dO Vᵀ (lower triangle, by row blocks), then dS = scale·P⊙(dP − rowsum(P⊙dP)).
            for r0 in (0..t).step_by(ATT_BLOCK) {
                let r1 = (r0 + ATT_BLOCK).min(t);
                // SAFETY: rows r0..r1, columns 0..r1 of this task's scratch `ds`.
                unsafe {
                    small_gemm(
                        r1 - r0,
                        r1,
                        hd,
                        ds.as_mut_ptr().add(r0 * t),
                        t,
                        go.add(r0 * h),
                        (h, 1),
                        v,
                        (1, three_h),
                        1.0,
                        false,
                    );
                }
                for i in r0..r1 {
                    let (dr, pr) = (&mut ds[i * t..=i * t + i], &p[i * t..=i * t + i]);
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (d, &pp) in dr.iter_mut().zip(pr) {
                        *d = scale * pp * (*d - dot);
                    }
                    ds[i * t + i + 1..(i + 1) * t].fill(0.0);
                }
            }
            // SAFETY: dq, dk, dv are this task's own column blocks of `dqkv` (batch bi, head hi);
            // P and dS are zero above the diagonal, so each product only spans the rows and
            // columns that can be non-zero.
            unsafe {
                let dq = d_ptr.get().add(off);
                let (dk, dv) = (dq.add(h), dq.add(2 * h));
                for r0 in (0..t).step_by(ATT_BLOCK) {
                    let r1 = (r0 + ATT_BLOCK).min(t);
                    // dQ[r0..r1] = dS[r0..r1, 0..r1] K[0..r1]
                    small_gemm(
                        r1 - r0,
                        hd,
                        r1,
                        dq.add(r0 * three_h),
                        three_h,
                        ds.as_ptr().add(r0 * t),
                        (t, 1),
                        k,
                        (three_h, 1),
                        1.0,
                        false,
                    );
                    // Key block c0..c1 = r0..r1 sees queries c0..t:
                    // dK[c] = dS[c0..t, c]ᵀ Q[c0..t], dV[c] = P[c0..t, c]ᵀ dO[c0..t].
                    let (c0, c1) = (r0, r1);
                    small_gemm(
                        c1 - c0,
                        hd,
                        t - c0,
                        dk.add(c0 * three_h),
                        three_h,
                        ds.as_ptr().add(c0 * t + c0),
                        (1, t),
                        q.add(c0 * three_h),
                        (three_h, 1),
                        1.0,
                        false,
                    );
                    small_gemm(
                        c1 - c0,
                        hd,
                        t - c0,
                        dv.add(c0 * three_h),
                        three_h,
                        p.as_ptr().add(c0 * t + c0),
                        (1, t),
                        go.add(c0 * h),
                        (h, 1),
                        1.0,
                        false,
                    );
                }
            }
        },
    );
}

impl Gpt2 {
    /// Whether [`Gpt2::mlp_grads`] can run on this model (f32 CPU weights, ReLU MLP, fused kernels
    /// enabled on this thread).
    pub fn mlp_grads_supported(&self) -> bool {
        self.cfg.activation == Activation::Relu && fused::supported(&[&self.wte])
    }

    /// The loss `L = Σ_r row_weight[r] · ℓ_r`, where `ℓ_r` is row `r`'s mean next-token
    /// cross-entropy over its first `lens[r]` tokens, and `∂L/∂W` for every MLP matrix, with the
    /// MLP weights replaced by `mlp` (`(c_fc, c_proj)` per block, `[in, out]` row-major).
    ///
    /// `ids` is `[b, t]` row-major, rows right-padded to `t` with any valid id; `2 ≤ lens[r] ≤ t`.
    pub fn mlp_grads(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        lens: &[usize],
        row_weight: &[f32],
        mlp: &[(Vec<f32>, Vec<f32>)],
        ws: &mut MlpGradWorkspace,
    ) -> Result<MlpGrads> {
        let cfg = &self.cfg;
        let (h, nh, inner, v, nl) = (
            cfg.n_embd,
            cfg.n_head,
            cfg.n_inner,
            cfg.vocab_size,
            cfg.n_layer,
        );
        if !self.mlp_grads_supported() {
            bail!("mlp_grads: unsupported model (needs f32 on the CPU and a ReLU MLP)");
        }
        if ids.len() != b * t || lens.len() != b || row_weight.len() != b || b == 0 {
            bail!("mlp_grads: ids, lens and row weights do not describe {b} rows of {t}");
        }
        if t < 2 || t > cfg.n_positions {
            bail!("mlp_grads: {t} positions outside 2..={}", cfg.n_positions);
        }
        if let Some(&l) = lens.iter().find(|&&l| l < 2 || l > t) {
            bail!("mlp_grads: row length {l} outside 2..={t}");
        }
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= v) {
            bail!("mlp_grads: token id {id} is outside the vocabulary of {v}");
        }
        if mlp.len() != nl
            || mlp
                .iter()
                .any(|(a, c)| a.len() != h * inner || c.len() != inner * h)
        {
            bail!("mlp_grads: MLP weights do not fit {nl} blocks of [{h}, {inner}]");
        }
        let n = b * t;
        let eps = cfg.layer_norm_epsilon as f32;
        let dims = (b, t, h, nh);
        let hd = h / nh;

        // Views of the frozen weights.
        let wte = view(&self.wte);
        let wpe = view(&self.wpe);
        // Tied: the head is `wte` itself (one read guard per storage).
        let lm_head = (!cfg.tie_word_embeddings).then(|| view(&self.lm_head));
        let lnf = (view(&self.ln_f.w), view(&self.ln_f.b));
        let blocks: Vec<[_; 8]> = self
            .blocks
            .iter()
            .map(|blk| {
                [
                    view(&blk.ln_1.w),
                    view(&blk.ln_1.b),
                    view(&blk.c_attn_w),
                    view(&blk.c_attn_b),
                    view(&blk.attn_proj_w),
                    view(&blk.attn_proj_b),
                    view(&blk.ln_2.w),
                    view(&blk.ln_2.b),
                ]
            })
            .collect();
        let mut fc_b = Vec::with_capacity(nl);
        let mut proj_b = Vec::with_capacity(nl);
        for blk in &self.blocks {
            fc_b.push(view(&blk.c_fc_b));
            proj_b.push(view(&blk.mlp_proj_b));
        }

        ws.xs.resize_with(nl + 1, Vec::new);
        ws.layers.resize_with(nl, LayerBufs::default);

        // Embeddings.
        {
            let (wte, wpe) = (wte.slice()?, wpe.slice()?);
            let x0 = buf(&mut ws.xs[0], n * h);
            x0.par_chunks_mut(h).enumerate().for_each(|(r, row)| {
                let (id, pos) = (ids[r] as usize, r % t);
                for ((o, &a), &p) in row
                    .iter_mut()
                    .zip(&wte[id * h..(id + 1) * h])
                    .zip(&wpe[pos * h..(pos + 1) * h])
                {
                    *o = a + p;
                }
            });
        }

        // Forward.
        for (li, bv) in blocks.iter().enumerate() {
            let [ln1w, ln1b, wqkv, bqkv, wo, bo, ln2w, ln2b] = bv;
            let mut scale = if cfg.scale_attn_weights {
                1.0 / (hd as f64).sqrt()
            } else {
                1.0
            };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (li + 1) as f64;
            }
            let (done, rest) = ws.xs.split_at_mut(li + 1);
            let x = &done[li][..];
            let lb = &mut ws.layers[li];
            let a = buf(&mut ws.a, n * h);
            layer_norm(x, ln1w.slice()?, ln1b.slice()?, eps, a);
            let qkv = buf(&mut lb.qkv, n * 3 * h);
            rows_plus_bias(None, bqkv.slice()?, qkv);
            gemm(n, 3 * h, h, qkv, a, (h, 1), wqkv.slice()?, (3 * h, 1), true);
            let probs = buf(&mut lb.probs, b * nh * t * t);
            attention_fwd(qkv, dims, scale as f32, probs, a);
            let xm = buf(&mut lb.xm, n * h);
            rows_plus_bias(Some(x), bo.slice()?, xm);
            gemm(n, h, h, xm, a, (h, 1), wo.slice()?, (h, 1), true);
            let m_in = buf(&mut lb.m_in, n * h);
            layer_norm(xm, ln2w.slice()?, ln2b.slice()?, eps, m_in);
            let hpre = buf(&mut lb.hpre, n * inner);
            rows_plus_bias(None, fc_b[li].slice()?, hpre);
            gemm(
                n,
                inner,
                h,
                hpre,
                m_in,
                (h, 1),
                &mlp[li].0,
                (inner, 1),
                true,
            );
            let hh = buf(&mut lb.h, n * inner);
            hh.par_chunks_mut(1 << 14)
                .zip(hpre.par_chunks(1 << 14))
                .for_each(|(o, i)| {
                    o.iter_mut().zip(i).for_each(|(o, &i)| *o = i.max(0.0));
                });
            let next = buf(&mut rest[0], n * h);
            rows_plus_bias(Some(xm), proj_b[li].slice()?, next);
            gemm(n, h, inner, next, hh, (inner, 1), &mlp[li].1, (h, 1), true);
        }
        let hf = buf(&mut ws.hf, n * h);
        layer_norm(&ws.xs[nl], lnf.0.slice()?, lnf.1.slice()?, eps, hf);
        let lm = match &lm_head {
            Some(l) => l.slice()?,
            None => wte.slice()?,
        };
        let logits = buf(&mut ws.logits, n * v);
        // lm_head is [V, H]: logits = hf · lm_headᵀ.
        gemm(n, v, h, logits, hf, (h, 1), lm, (1, h), false);

        // Loss and its gradient, in place: logits become ∂L/∂logits.
        let row_loss: Vec<f64> = logits
            .par_chunks_mut(t * v)
            .enumerate()
            .map(|(r, lg)| {
                let len = lens[r];
                let c = row_weight[r] / (len - 1) as f32;
                let mut total = 0f64;
                for j in 0..t {
                    let row = &mut lg[j * v..(j + 1) * v];
                    if j + 1 >= len {
                        row.fill(0.0);
                        continue;
                    }
                    let tg = ids[r * t + j + 1] as usize;
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let lse = max + row.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
                    total += f64::from(lse - row[tg]);
                    softmax_row(row);
                    row[tg] -= 1.0;
                    row.iter_mut().for_each(|d| *d *= c);
                }
                total / (len - 1) as f64
            })
            .collect();
        let loss = row_loss
            .iter()
            .zip(row_weight)
            .map(|(l, &w)| l * f64::from(w))
            .sum();

        // Backward.
        let dhf = buf(&mut ws.dt, n * h);
        gemm(n, h, v, dhf, &ws.logits, (v, 1), lm, (h, 1), false);
        let dx = buf(&mut ws.dx, n * h);
        dx.fill(0.0);
        layer_norm_bwd_add(&ws.xs[nl], lnf.0.slice()?, eps, dhf, dx);
        let mut grads = vec![(vec![0f32; h * inner], vec![0f32; inner * h]); nl];
        for li in (0..nl).rev() {
            let [ln1w, _, wqkv, _, wo, _, ln2w, _] = &blocks[li];
            let lb = &ws.layers[li];
            let (w1, w2) = (&mlp[li].0, &mlp[li].1);
            let (g1, g2) = &mut grads[li];
            let dx = &mut ws.dx;
            // c_proj: ∂W2 = hᵀ dx, ∂h = dx W2ᵀ, then ReLU (the gradient passes at 0).
            gemm(inner, h, n, g2, &lb.h, (1, inner), dx, (h, 1), false);
            let dh = buf(&mut ws.dh, n * inner);
            gemm(n, inner, h, dh, dx, (h, 1), w2, (1, h), false);
            dh.par_chunks_mut(1 << 14)
                .zip(lb.hpre.par_chunks(1 << 14))
                .for_each(|(d, x)| {
                    // A select, not a branch: the sign of x is a coin flip.
                    d.iter_mut()
                        .zip(x)
                        .for_each(|(d, &x)| *d = if x >= 0.0 { *d } else { 0.0 });
                });
            gemm(h, inner, n, g1, &lb.m_in, (1, h), dh, (inner, 1), false);
            if li == 0 {
                break;
            }
            // ∂m_in = ∂hpre W1ᵀ; through ln_2 into the residual.
            let dt = buf(&mut ws.dt, n * h);
            gemm(n, h, inner, dt, dh, (inner, 1), w1, (1, inner), false);
            layer_norm_bwd_add(&lb.xm, ln2w.slice()?, eps, dt, dx);
            gemm(n, h, h, dt, dx, (h, 1), wo.slice()?, (1, h), false);
            let dqkv = buf(&mut ws.dqkv, n * 3 * h);
            let mut scale = if cfg.scale_attn_weights {
                1.0 / (hd as f64).sqrt()
            } else {
                1.0
            };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (li + 1) as f64;
            }
            attention_bwd(&lb.qkv, &lb.probs, dt, dims, scale as f32, dqkv);
            gemm(
                n,
                h,
                3 * h,
                dt,
                dqkv,
                (3 * h, 1),
                wqkv.slice()?,
                (1, 3 * h),
                false,
            );
            layer_norm_bwd_add(&ws.xs[li], ln1w.slice()?, eps, dt, dx);
        }
        Ok(MlpGrads {
            loss,
            row_loss,
            grads,
        })
    }
}
