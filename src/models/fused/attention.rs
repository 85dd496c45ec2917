//! Multi-head self-attention over GPT-2's packed `qkv` projection, with its backward: the kernel
//! `ops::self_attention` runs for f32 CPU tensors, tracked or not.
//!
//! Invariants:
//! - It computes `softmax(scale · q kᵀ + mask) v` per row and head over `qkv: [B, T, 3·H]` (the
//!   query, key and value blocks side by side), returning the merged heads `[B, T, H]`; output
//!   and gradient match the composed reference to f32 rounding
//!   (`self_attention_gradients_match_reference` in `fused::tests`: causal, unmasked and per-row
//!   padding masks).
//! - The mask is additive, `[1 | B, 1, T, T]`, broadcast over heads and read as f32; a mask of
//!   another shape, or a last dimension that is not 3 × a multiple of `n_head`, is an error.
//! - A query row whose keys are all masked gives zeros, where the composed path gives NaN
//!   (`fully_masked_rows_give_zeros_not_nan`).
//! - Each head computes its full `T × T` scores; the forward keeps the probabilities
//!   `[B, n_head, T, T]` in the op for its backward. (sequence, head) pairs run in parallel over
//!   the rayon pool, each writing only its own columns of the output.

use super::*;

// ---------------------------------------------------------------------------------------------
// Self-attention over a packed qkv

/// Multi-head self-attention over GPT-2's packed projection `qkv: [B, T, 3·H]` (the query, key
/// and value blocks side by side, each `n_head` heads of `H / n_head` columns), returning the
/// merged heads `[B, T, H]`: `softmax(scale · q kᵀ + mask) v` per row and head.
///
/// `mask`, when given, is additive (0 or −∞) and `[1 | B, 1, T, T]`, broadcast over heads. A query
/// row whose keys are all masked yields zeros (the composed path yields NaN there).
pub fn self_attention(
    qkv: &Tensor,
    n_head: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, three_h) = qkv.dims3()?;
    if n_head == 0 || !three_h.is_multiple_of(3 * n_head) {
        bail!("self_attention: last dim {three_h} is not 3 × a multiple of {n_head} heads");
    }
    let mask = match mask {
        Some(m) => {
            let (mb, mh, mt, ms) = m.dims4()?;
            if !(mb == 1 || mb == b) || mh != 1 || mt != t || ms != t {
                bail!(
                    "self_attention: mask {:?} does not fit [1 or {b}, 1, {t}, {t}]",
                    m.dims()
                );
            }
            let v = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Some((v, mb))
        }
        None => None,
    };
    qkv.apply_op1(SelfAttention {
        n_head,
        scale: scale as f32,
        mask,
        probs: OnceLock::new(),
    })
}

pub(super) struct SelfAttention {
    n_head: usize,
    scale: f32,
    /// Additive mask values `[mb, T, T]` and `mb` (1 or B).
    mask: Option<(Vec<f32>, usize)>,
    /// The attention probabilities `[B, n_head, T, T]` saved by the forward for the backward.
    probs: OnceLock<Vec<f32>>,
}

impl SelfAttention {
    fn mask_row(&self, b: usize, i: usize, t: usize) -> Option<&[f32]> {
        self.mask.as_ref().map(|(m, mb)| {
            let bb = if *mb == 1 { 0 } else { b };
            &m[(bb * t + i) * t..(bb * t + i + 1) * t]
        })
    }
}

impl CustomOp1 for SelfAttention {
    fn name(&self) -> &'static str {
        "lethe-self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, three_h) = l.shape().dims3()?;
        let (h, nh) = (three_h / 3, self.n_head);
        let hd = h / nh;
        let qkv = data::<f32>(s, l)?;
        let mut probs = vec![0f32; b * nh * t * t];
        let mut out = vec![0f32; b * t * h];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let qkv_ptr = qkv.as_ptr() as usize;
        probs.par_chunks_mut(t * t).enumerate().for_each(|(bh, p)| {
            let (bi, hi) = (bh / nh, bh % nh);
            let base = (qkv_ptr as *const f32).wrapping_add(bi * t * three_h + hi * hd);
            let (q, k, v) = (base, base.wrapping_add(h), base.wrapping_add(2 * h));
            // SAFETY: q, k, v address [t × hd] blocks of `qkv` with row stride 3H; `p` is
            // this task's own [t × t] chunk.
            unsafe {
                small_gemm(
                    t,
                    t,
                    hd,
                    p.as_mut_ptr(),
                    t,
                    q,
                    (three_h, 1),
                    k,
                    (1, three_h),
                    self.scale,
                    false,
                );
            }
            for (i, row) in p.chunks_exact_mut(t).enumerate() {
                if let Some(m) = self.mask_row(bi, i, t) {
                    for (r, &mv) in row.iter_mut().zip(m) {
                        *r += mv;
                    }
                }
                softmax_row(row);
            }
            // SAFETY: this task alone writes the columns hi·hd..(hi+1)·hd of batch bi's
            // rows of `out` ([b, t, h], row stride h).
            unsafe {
                small_gemm(
                    t,
                    hd,
                    t,
                    out_ptr.get().add(bi * t * h + hi * hd),
                    h,
                    p.as_ptr(),
                    (t, 1),
                    v,
                    (three_h, 1),
                    1.0,
                    false,
                );
            }
        });
        // A second forward through the same op object (it cannot happen through candle, which
        // builds a new op per call) would keep the first probabilities; both are identical.
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), Shape::from((b, t, h))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, t, three_h) = qkv.dims3()?;
        let (h, nh) = (three_h / 3, self.n_head);
        let hd = h / nh;
        let Some(probs) = self.probs.get() else {
            bail!("self_attention backward without its forward");
        };
        let scale = self.scale;
        let dqkv = with_f32(qkv, |x| {
            with_f32(grad, |g| {
                let mut dqkv = vec![0f32; b * t * three_h];
                let d_ptr = SharedMut(dqkv.as_mut_ptr());
                let (x_ptr, g_ptr) = (x.as_ptr() as usize, g.as_ptr() as usize);
                probs.par_chunks(t * t).enumerate().for_each_init(
                    || vec![0f32; t * t],
                    |ds, (bh, p)| {
                        let (bi, hi) = (bh / nh, bh % nh);
                        let off = bi * t * three_h + hi * hd;
                        let base = (x_ptr as *const f32).wrapping_add(off);
                        let (q, k, v) = (base, base.wrapping_add(h), base.wrapping_add(2 * h));
                        // SAFETY: dq, dk, dv are this task's own column blocks of `dqkv`
                        // (batch bi, head hi); the inputs are read-only blocks of `x` and `g`.
                        unsafe {
                            let dq = d_ptr.get().add(off);
                            let dv = dq.add(2 * h);
                            let go = (g_ptr as *const f32).add(bi * t * h + hi * hd);
                            // dV = Pᵀ dO
                            small_gemm(
                                t,
                                hd,
                                t,
                                dv,
                                three_h,
                                p.as_ptr(),
                                (1, t),
                                go,
                                (h, 1),
                                1.0,
                                false,
                            );
                            // dP = dO Vᵀ
                            small_gemm(
                                t,
                                t,
                                hd,
                                ds.as_mut_ptr(),
                                t,
                                go,
                                (h, 1),
                                v,
                                (1, three_h),
                                1.0,
                                false,
                            );
                        }
                        // dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))
                        for (dr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                            let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                            for (d, &pp) in dr.iter_mut().zip(pr) {
                                *d = scale * pp * (*d - dot);
                            }
                        }
                        // SAFETY: as above.
                        unsafe {
                            let dq = d_ptr.get().add(off);
                            let dk = dq.add(h);
                            // dQ = dS K
                            small_gemm(
                                t,
                                hd,
                                t,
                                dq,
                                three_h,
                                ds.as_ptr(),
                                (t, 1),
                                k,
                                (three_h, 1),
                                1.0,
                                false,
                            );
                            // dK = dSᵀ Q
                            small_gemm(
                                t,
                                hd,
                                t,
                                dk,
                                three_h,
                                ds.as_ptr(),
                                (1, t),
                                q,
                                (three_h, 1),
                                1.0,
                                false,
                            );
                        }
                    },
                );
                Ok(dqkv)
            })
        })?;
        Ok(Some(cpu_tensor(dqkv, qkv.shape())?))
    }
}
