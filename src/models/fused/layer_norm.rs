//! LayerNorm over the last dimension, with its backward: the kernel `ops::layer_norm` runs for
//! tracked f32 CPU tensors.
//!
//! Invariants:
//! - It computes `(x − mean) / sqrt(var + eps) · w + b` with `w`, `b: [D]`, mean and variance in
//!   two passes as the composed reference does ([`row_stats`]); output and the gradients of
//!   `x`, `w` and `b` match that reference to f32 rounding (`layer_norm_gradients_match_reference`
//!   in `fused::tests`, a strided input included).
//! - A `w` or `b` that does not match the last dimension, or an empty last dimension, is an
//!   error.
//! - Rows are split over the rayon pool, a few chunks per thread; `∂w` and `∂b` are summed from
//!   the chunks' partial sums in chunk order, so they are deterministic for a given pool size.

use super::*;

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// `(x − mean) / sqrt(var + eps) · w + b` over the last dimension; `w`, `b: [D]`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op3(w, b, LayerNorm { eps: eps as f32 })
}

pub(super) struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of one row (two passes, as the composed reference computes them).
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

pub(super) fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!(
            "expected a non-empty last dimension, got {:?}",
            layout.dims()
        ),
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "lethe-layer-norm"
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
        let d = last_dim(xl)?;
        let (x, w, b) = (
            data::<f32>(xs, xl)?,
            data::<f32>(ws, wl)?,
            data::<f32>(bs, bl)?,
        );
        if w.len() != d || b.len() != d {
            bail!(
                "layer_norm: weight {:?} / bias {:?} do not match last dim {d}",
                wl.dims(),
                bl.dims()
            );
        }
        let chunk = d * rows_per_task(x.len() / d);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, xc)| {
                for (orow, xrow) in o.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                    let (mean, rstd) = row_stats(xrow, self.eps);
                    for i in 0..d {
                        orow[i] = (xrow[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let eps = self.eps;
        let (dx, dw, db) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(grad, |g| {
                    let chunk = d * rows_per_task(x.len() / d);
                    let mut dx = vec![0f32; x.len()];
                    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(chunk)
                        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                        .map(|(dxc, (xc, gc))| {
                            let mut dw = vec![0f32; d];
                            let mut db = vec![0f32; d];
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
                                    dw[i] += gr[i] * xhat[i];
                                    db[i] += gr[i];
                                }
                                let (a, c) = (a / d as f32, c / d as f32);
                                for i in 0..d {
                                    dxr[i] = rstd * (gr[i] * w[i] - a - xhat[i] * c);
                                }
                            }
                            (dw, db)
                        })
                        .collect();
                    let mut dw = vec![0f32; d];
                    let mut db = vec![0f32; d];
                    for (pw, pb) in partial {
                        for i in 0..d {
                            dw[i] += pw[i];
                            db[i] += pb[i];
                        }
                    }
                    Ok((dx, dw, db))
                })
            })
        })?;
        Ok((
            Some(cpu_tensor(dx, x.shape())?),
            Some(cpu_tensor(dw, w.shape())?),
            Some(cpu_tensor(db, w.shape())?),
        ))
    }
}
