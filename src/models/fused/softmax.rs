//! Softmax over the last dimension and ReLU, with their backwards: the kernels
//! `ops::softmax_last` and `Activation::Relu` run for tracked f32 CPU tensors.
//!
//! Invariants:
//! - Both match candle's ops to f32 rounding, output and gradient
//!   (`softmax_and_relu_gradients_match_reference` in `fused::tests`). The softmax uses the
//!   standard library's `exp`, not `cpu::vmath`'s, because the bundled models' recorded
//!   evaluations run through [`softmax_row`] (`tests/bundled_models.rs`).
//! - Entries of −∞ get exactly 0, and a row that is −∞ everywhere becomes all zeros instead of
//!   NaN ([`softmax_row`], which the attention and loss kernels share).
//! - ReLU passes the gradient at exactly 0, as candle's backward does.
//! - Rows (for ReLU, chunks of 16,384 elements) are split over the rayon pool; every output
//!   element depends only on its own row, so the result does not depend on the split.

use super::*;

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(Softmax)
}

pub(super) struct Softmax;

/// In-place softmax of one row; entries equal to −∞ become exactly 0, and a row that is −∞
/// everywhere becomes all zeros (instead of NaN).
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `dx = y · (g − Σ g·y)` for one row, `scale` applied on top.
pub(super) fn softmax_row_bwd(y: &[f32], g: &[f32], dx: &mut [f32], scale: f32) {
    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
    for ((d, &yy), &gg) in dx.iter_mut().zip(y).zip(g) {
        *d = scale * yy * (gg - dot);
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lethe-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l)?;
        let mut out = data::<f32>(s, l)?.into_owned();
        let chunk = d * rows_per_task(out.len() / d);
        out.par_chunks_mut(chunk)
            .for_each(|c| c.chunks_exact_mut(d).for_each(softmax_row));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = res.dim(candle_core::D::Minus1)?;
        let dx = with_f32(res, |y| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; y.len()];
                let chunk = d * rows_per_task(y.len() / d);
                dx.par_chunks_mut(chunk)
                    .zip(y.par_chunks(chunk).zip(g.par_chunks(chunk)))
                    .for_each(|(dc, (yc, gc))| {
                        for ((dr, yr), gr) in dc
                            .chunks_exact_mut(d)
                            .zip(yc.chunks_exact(d))
                            .zip(gc.chunks_exact(d))
                        {
                            softmax_row_bwd(yr, gr, dr, 1.0);
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(cpu_tensor(dx, res.shape())?))
    }
}

// ---------------------------------------------------------------------------------------------
// ReLU

/// `max(x, 0)`, with candle's convention for the gradient at 0 (it passes through).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(Relu)
}

pub(super) struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "lethe-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = data::<f32>(s, l)?.into_owned();
        out.par_chunks_mut(1 << 14)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(arg, |x| {
            with_f32(grad, |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(1 << 14)
                    .zip(x.par_chunks(1 << 14).zip(g.par_chunks(1 << 14)))
                    .for_each(|(d, (x, g))| {
                        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                            *d = if x >= 0.0 { g } else { 0.0 };
                        }
                    });
                Ok(dx)
            })
        })?;
        Ok(Some(cpu_tensor(dx, arg.shape())?))
    }
}
