//! `x · W + b` over the last dimension in GPT-2's (`[in, out]`) and `nn.Linear`'s (`[out, in]`)
//! weight layouts, with its backward: the kernel `ops::dense` runs for tracked f32 CPU tensors.
//!
//! Invariants:
//! - Output and the gradients of `x`, `W` and `b` match `ops::dense_composed` to f32 rounding
//!   (`linear_gradients_match_reference` in `fused::tests`: both layouts, with and without a
//!   bias, odd sizes, a single row, a strided input); `∂W` comes back in `W`'s own layout.
//! - Shapes are checked by [`linear_dims`] (shared with the inference `dense`): a weight that is
//!   not a matrix, an input that does not fit it, an empty last dimension or a bias of another
//!   length is an error.
//! - The products run on `gemm` over the rayon pool of the calling thread; the bias gradient is
//!   summed from per-chunk partial sums in chunk order.

use super::*;

// ---------------------------------------------------------------------------------------------
// Linear

/// `x · W + b` over the last dimension of `x: [.., in]`, with `W: [in, out]` (GPT-2 `Conv1D`) or,
/// when `transposed`, `W: [out, in]` (`nn.Linear`), and an optional `b: [out]`. One graph node
/// instead of reshape → matmul → broadcast → add → reshape, each of which costs backward a zero
/// tensor and a sum.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, transposed: bool) -> Result<Tensor> {
    let op = Linear { transposed };
    match b {
        Some(b) => x.apply_op3(w, b, op),
        None => x.apply_op2(w, op),
    }
}

pub(super) struct Linear {
    transposed: bool,
}

/// `(rows, d_in, d_out)` of `x · W` for `x: [.., in]` and `W: [in, out]`, or `[out, in]` when
/// `transposed`; an error when they do not fit. Shared by [`linear`] and the inference dense.
pub(crate) fn linear_dims(
    x: &[usize],
    w: &[usize],
    transposed: bool,
) -> Result<(usize, usize, usize)> {
    let d_in = match x.last() {
        Some(&d) if d > 0 => d,
        _ => bail!("expected a non-empty last dimension, got {x:?}"),
    };
    let (a, b) = match w {
        &[a, b] => (a, b),
        _ => bail!("linear: weight {w:?} is not a matrix"),
    };
    let (w_in, d_out) = if transposed { (b, a) } else { (a, b) };
    if w_in != d_in {
        bail!("linear: input {x:?} does not fit weight {w:?} (transposed: {transposed})");
    }
    Ok((x.iter().product::<usize>() / d_in, d_in, d_out))
}

/// `(row stride, column stride)` of `W` seen as an `[in, out]` matrix.
pub(super) fn w_strides(transposed: bool, d_in: usize, d_out: usize) -> (usize, usize) {
    if transposed {
        (1, d_in)
    } else {
        (d_out, 1)
    }
}

impl Linear {
    fn dims(&self, xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
        linear_dims(xl.dims(), wl.dims(), self.transposed)
    }

    fn fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d_in, d_out) = self.dims(xl, wl)?;
        let (x, w) = (data::<f32>(xs, xl)?, data::<f32>(ws, wl)?);
        let mut out = match bias {
            Some((bs, bl)) => {
                let b = data::<f32>(bs, bl)?;
                if b.len() != d_out {
                    bail!("linear: bias {:?} does not fit {d_out} outputs", bl.dims());
                }
                let mut out = Vec::with_capacity(rows * d_out);
                for _ in 0..rows {
                    out.extend_from_slice(&b);
                }
                out
            }
            None => vec![0f32; rows * d_out],
        };
        // SAFETY: x is [rows, d_in] row-major, w is [in, out] under `w_strides`, out is
        // [rows, d_out] row-major and distinct from both.
        unsafe {
            gemm::gemm(
                rows,
                d_out,
                d_in,
                out.as_mut_ptr(),
                1,
                d_out as isize,
                bias.is_some(),
                x.as_ptr(),
                1,
                d_in as isize,
                w.as_ptr(),
                w_strides(self.transposed, d_in, d_out).1 as isize,
                w_strides(self.transposed, d_in, d_out).0 as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm_parallelism(),
            );
        }
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = d_out;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// Gradients of `x`, `W` and (when `with_bias`) `b`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        with_bias: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let (rows, d_in, d_out) = self.dims(xl, wl)?;
        let xd = data::<f32>(cpu(&xg)?, xl)?;
        let wd = data::<f32>(cpu(&wg)?, wl)?;
        let (gg, gl) = grad.storage_and_layout();
        let gd = data::<f32>(cpu(&gg)?, gl)?;
        let mut dx = vec![0f32; rows * d_in];
        let mut dw = vec![0f32; d_in * d_out];
        let (w_rs, w_cs) = w_strides(self.transposed, d_in, d_out);
        // SAFETY: all matrices are addressed within their buffers under the strides given;
        // destinations are fresh buffers.
        unsafe {
            // dx[rows, in] = g[rows, out] · Wᵀ[out, in]
            gemm::gemm(
                rows,
                d_in,
                d_out,
                dx.as_mut_ptr(),
                1,
                d_in as isize,
                false,
                gd.as_ptr(),
                1,
                d_out as isize,
                wd.as_ptr(),
                w_rs as isize,
                w_cs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm_parallelism(),
            );
            // dW seen as [in, out] = xᵀ[in, rows] · g[rows, out], written in W's own layout.
            let (dw_rs, dw_cs) = w_strides(self.transposed, d_in, d_out);
            gemm::gemm(
                d_in,
                d_out,
                rows,
                dw.as_mut_ptr(),
                dw_cs as isize,
                dw_rs as isize,
                false,
                xd.as_ptr(),
                d_in as isize,
                1,
                gd.as_ptr(),
                1,
                d_out as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm_parallelism(),
            );
        }
        let db = if with_bias {
            let chunk = rows_per_task(rows) * d_out;
            let partial: Vec<Vec<f32>> = gd
                .par_chunks(chunk)
                .map(|c| {
                    let mut acc = vec![0f32; d_out];
                    for r in c.chunks_exact(d_out) {
                        acc.iter_mut().zip(r).for_each(|(a, &v)| *a += v);
                    }
                    acc
                })
                .collect();
            let mut db = vec![0f32; d_out];
            for p in partial {
                db.iter_mut().zip(&p).for_each(|(a, &v)| *a += v);
            }
            Some(Tensor::from_vec(db, d_out, &Device::Cpu)?)
        } else {
            None
        };
        Ok((cpu_tensor(dx, x.shape())?, cpu_tensor(dw, w.shape())?, db))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "lethe-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(xs, xl, ws, wl, Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = Linear::bwd(self, x, w, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "lethe-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd(xs, xl, ws, wl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Linear::bwd(self, x, w, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}
