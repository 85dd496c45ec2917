//! Fused f32 CPU kernels with their own backward, for the autograd path (training, unlearning).
//!
//! Composed from candle primitives, a LayerNorm, a softmax, an attention head or a cross-entropy
//! becomes a dozen graph nodes, each allocating its output and, in backward, a zero tensor plus a
//! sum per input. Each kernel here is one candle `CustomOp` node whose `cpu_fwd` does the whole
//! computation in one pass and whose `bwd` returns every input's gradient from one more pass.
//! [`super::ops`] routes its *tracked* path through these functions when the tensors are f32 on
//! the CPU ([`supported`]), and keeps the composed reference for every other device and dtype.
//!
//! Invariants: every kernel computes the same function as the composed reference in `ops` (to
//! f32 rounding); every backward is pinned to autograd through that reference by the tests at the
//! bottom of this file (relative L2 error ≤ 1e-4 on every input, odd shapes included). Inputs may
//! have any strides; outputs are contiguous. Bad shapes are errors, never panics.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape,
    Storage, Tensor, WithDType,
};
use gemm::Parallelism;
use rayon::prelude::*;

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Whether the fused kernels can run on all of `ts` (f32 tensors on the CPU), and are not
/// switched off on this thread by [`with_reference_ops`].
pub fn supported(ts: &[&Tensor]) -> bool {
    ENABLED.with(|e| e.get())
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Runs `f` with the fused kernels switched off on the calling thread, so that `ops` takes its
/// composed reference path (what other devices run). For tests and for bisecting numerics.
pub fn with_reference_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ENABLED.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(ENABLED.with(|e| e.replace(false)));
    f()
}

// ---------------------------------------------------------------------------------------------
// Storage access

/// The elements of a CPU storage seen through `layout`, in logical (row-major) order: borrowed
/// when the layout is contiguous, gathered otherwise.
fn data<'a, T: WithDType>(s: &'a CpuStorage, layout: &Layout) -> Result<Cow<'a, [T]>> {
    let all = s.as_slice::<T>()?;
    Ok(match layout.contiguous_offsets() {
        Some((a, b)) => Cow::Borrowed(&all[a..b]),
        None => Cow::Owned(gather_strided(all, layout)),
    })
}

fn gather_strided<T: Copy>(all: &[T], layout: &Layout) -> Vec<T> {
    let dims = layout.dims();
    let strides = layout.stride();
    let n = layout.shape().elem_count();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    let mut off = layout.start_offset();
    for _ in 0..n {
        out.push(all[off]);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
    out
}

fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => bail!("lethe's fused kernels run on the CPU only"),
    }
}

/// Runs `f` on the logical f32 elements of `t` (a CPU tensor).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let d = data::<f32>(cpu(&guard)?, layout)?;
    f(&d)
}

/// A read view of a contiguous f32 CPU tensor (`G` is candle's storage read guard), for
/// hand-written passes that hold every weight as a plain slice at once.
pub(crate) struct View<'a, G> {
    guard: G,
    layout: &'a Layout,
}

/// [`View`] of `t`; the read guard is held until the view is dropped.
pub(crate) fn view(t: &Tensor) -> View<'_, impl std::ops::Deref<Target = Storage> + '_> {
    let (guard, layout) = t.storage_and_layout();
    View { guard, layout }
}

impl<G: std::ops::Deref<Target = Storage>> View<'_, G> {
    /// The tensor's elements; an error when it is not a contiguous f32 CPU tensor.
    pub(crate) fn slice(&self) -> Result<&[f32]> {
        let Storage::Cpu(c) = &*self.guard else {
            bail!("expected a tensor on the CPU");
        };
        let Some((a, b)) = self.layout.contiguous_offsets() else {
            bail!("expected a contiguous tensor");
        };
        Ok(&c.as_slice::<f32>()?[a..b])
    }
}

/// Runs `f` on the whole f32 storage of `t` (a CPU tensor) and its layout, for kernels that read
/// a strided view in place.
pub(crate) fn with_f32_storage<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32], &Layout) -> Result<R>,
) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    f(cpu(&guard)?.as_slice::<f32>()?, layout)
}

fn cpu_tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every user writes a region no other task touches (stated at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Row chunk size for row-parallel kernels: a few chunks per thread, never empty.
fn rows_per_task(rows: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    rows.div_ceil(tasks).max(1)
}

/// `dst[m×n] = beta · lhs[m×k] · rhs[k×n]` (+ `dst` when `accumulate`), single-threaded.
/// Strides are (row, column) in elements.
///
/// # Safety
/// Every pointer must address its whole matrix under the given strides, and `dst` must not alias
/// the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn small_gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    accumulate: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// `(x − mean) / sqrt(var + eps) · w + b` over the last dimension; `w`, `b: [D]`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.apply_op3(w, b, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of one row (two passes, as the composed reference computes them).
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

fn last_dim(layout: &Layout) -> Result<usize> {
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

struct Linear {
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

/// Threads for one large gemm (the rayon pool's size).
pub(crate) fn gemm_parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `(row stride, column stride)` of `W` seen as an `[in, out]` matrix.
fn w_strides(transposed: bool, d_in: usize, d_out: usize) -> (usize, usize) {
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

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(Softmax)
}

struct Softmax;

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
fn softmax_row_bwd(y: &[f32], g: &[f32], dx: &mut [f32], scale: f32) {
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

struct Relu;

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

struct SelfAttention {
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

// ---------------------------------------------------------------------------------------------
// Causal LM cross-entropy

/// Per-sequence mean cross-entropy of `logits[:, t]` against `ids[:, t + 1]` over the `T − 1`
/// shifted positions: `logits: [B, T, V]` f32, `ids: [B, T]` u32 or i64 → `[B]`.
pub fn per_sequence_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, _v) = logits.dims3()?;
    if ids.dims() != [b, t] {
        bail!(
            "lm_loss: ids {:?} do not match logits {:?}",
            ids.dims(),
            logits.dims()
        );
    }
    if t < 2 {
        bail!("lm_loss needs at least 2 positions, got {t}");
    }
    let targets: Vec<u32> = match ids.dtype() {
        DType::U32 => ids.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1::<u32>()?,
        _ => ids
            .narrow(1, 1, t - 1)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
            .collect(),
    };
    logits.apply_op1(LmLoss { targets })
}

struct LmLoss {
    /// `ids[:, 1..]`, row-major `[B, T − 1]`.
    targets: Vec<u32>,
}

impl LmLoss {
    fn target(&self, row: usize, v: usize) -> Result<usize> {
        let tg = self.targets[row] as usize;
        if tg >= v {
            bail!("lm_loss: target id {tg} is outside the vocabulary of {v}");
        }
        Ok(tg)
    }
}

impl CustomOp1 for LmLoss {
    fn name(&self) -> &'static str {
        "lethe-lm-loss"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, v) = l.shape().dims3()?;
        let x = data::<f32>(s, l)?;
        let mut out = vec![0f32; b];
        for (bi, o) in out.iter_mut().enumerate() {
            let mut total = 0f64;
            for ti in 0..t - 1 {
                let row = &x[(bi * t + ti) * v..(bi * t + ti + 1) * v];
                let tg = self.target(bi * (t - 1) + ti, v)?;
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + row.iter().map(|&r| (r - max).exp()).sum::<f32>().ln();
                total += f64::from(lse - row[tg]);
            }
            *o = (total / (t - 1) as f64) as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(b)))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, t, v) = logits.dims3()?;
        let g = grad.to_vec1::<f32>()?;
        let dx = with_f32(logits, |x| {
            let mut dx = vec![0f32; x.len()];
            for (bi, &gb) in g.iter().enumerate() {
                let w = gb / (t - 1) as f32;
                for ti in 0..t - 1 {
                    let r = (bi * t + ti) * v;
                    let tg = self.target(bi * (t - 1) + ti, v)?;
                    let drow = &mut dx[r..r + v];
                    drow.copy_from_slice(&x[r..r + v]);
                    softmax_row(drow);
                    drow[tg] -= 1.0;
                    drow.iter_mut().for_each(|d| *d *= w);
                }
            }
            Ok(dx)
        })?;
        Ok(Some(cpu_tensor(dx, logits.shape())?))
    }
}

#[cfg(test)]
mod tests {
    //! Each fused backward against autograd through the composed reference: for a random
    //! linear functional `L = Σ R ⊙ f(inputs)`, the gradient of `L` with respect to every input
    //! agrees to a relative L2 error `‖g_fused − g_ref‖₂ / ‖g_ref‖₂ ≤ 1e-4`, and the outputs agree
    //! to the stated absolute tolerance.
    use super::*;
    use crate::test_util::*;
    use candle_core::{Var, D};

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let den = b.sqr().unwrap().sum_all().unwrap();
        let (num, den) = (
            num.to_scalar::<f32>().unwrap().sqrt(),
            den.to_scalar::<f32>().unwrap().sqrt(),
        );
        num / den.max(1e-30)
    }

    /// Checks outputs (absolute `out_tol`) and the gradient of `Σ R ⊙ f(vars)` for every var.
    fn check(
        inputs: &[Tensor],
        fused: impl Fn(&[&Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[&Tensor]) -> Result<Tensor>,
        out_tol: f32,
        seed: u64,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let yf = fused(&ts).unwrap();
        let yr = reference(&ts).unwrap();
        assert_eq!(yf.dims(), yr.dims());
        let diff = max_abs_diff(&yf, &yr);
        assert!(diff <= out_tol, "outputs differ by {diff}");
        let r = rand(yr.dims(), seed);
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let a = gf.get(v.as_tensor()).expect("fused gradient");
            let b = gr.get(v.as_tensor()).expect("reference gradient");
            let e = rel_err(a, b);
            assert!(e <= 1e-4, "input {i}: relative gradient error {e}");
        }
    }

    fn ln_ref(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        xn.broadcast_mul(w)?.broadcast_add(b)
    }

    #[test]
    fn layer_norm_gradients_match_reference() {
        for (shape, seed) in [(vec![2, 7, 24], 1), (vec![1, 1, 5], 2), (vec![3, 13], 3)] {
            let d = *shape.last().unwrap();
            let inputs = [
                rand(&shape, seed),
                rand(&[d], seed + 10),
                rand(&[d], seed + 20),
            ];
            check(
                &inputs,
                |t| layer_norm(t[0], t[1], t[2], 1e-5),
                |t| ln_ref(t[0], t[1], t[2]),
                1e-5,
                seed,
            );
        }
        // Strided input: a transposed view.
        let x = rand(&[6, 4], 4);
        let inputs = [x, rand(&[6], 5), rand(&[6], 6)];
        check(
            &inputs,
            |t| layer_norm(&t[0].t()?, t[1], t[2], 1e-5),
            |t| ln_ref(&t[0].t()?, t[1], t[2]),
            1e-5,
            7,
        );
    }

    fn linear_ref(x: &Tensor, w: &Tensor, b: Option<&Tensor>, transposed: bool) -> Result<Tensor> {
        crate::models::ops::dense_composed(x, w, b, transposed)
    }

    #[test]
    fn linear_gradients_match_reference() {
        // ([leading dims], in, out, seed): odd sizes, a single row.
        for (lead, d_in, d_out, seed) in [
            (vec![2, 5], 7, 3, 1),
            (vec![1], 4, 9, 2),
            (vec![3, 1, 2], 16, 5, 3),
        ] {
            let mut xs = lead.clone();
            xs.push(d_in);
            for transposed in [false, true] {
                let wshape = if transposed {
                    [d_out, d_in]
                } else {
                    [d_in, d_out]
                };
                let inputs = [
                    rand(&xs, seed),
                    rand(&wshape, seed + 1),
                    rand(&[d_out], seed + 2),
                ];
                check(
                    &inputs,
                    |t| linear(t[0], t[1], Some(t[2]), transposed),
                    |t| linear_ref(t[0], t[1], Some(t[2]), transposed),
                    1e-5,
                    seed,
                );
                check(
                    &inputs[..2],
                    |t| linear(t[0], t[1], None, transposed),
                    |t| linear_ref(t[0], t[1], None, transposed),
                    1e-5,
                    seed + 5,
                );
            }
        }
        // Strided input (a transposed view).
        let inputs = [rand(&[6, 4], 7), rand(&[6, 3], 8), rand(&[3], 9)];
        check(
            &inputs,
            |t| linear(&t[0].t()?, t[1], Some(t[2]), false),
            |t| linear_ref(&t[0].t()?, t[1], Some(t[2]), false),
            1e-5,
            10,
        );
    }

    #[test]
    fn softmax_and_relu_gradients_match_reference() {
        for (shape, seed) in [(vec![2, 3, 5, 7], 1), (vec![1, 1], 2), (vec![5, 33], 3)] {
            check(
                &[rand(&shape, seed)],
                |t| softmax_last(t[0]),
                |t| candle_nn::ops::softmax(t[0], D::Minus1),
                1e-6,
                seed,
            );
            check(
                &[rand(&shape, seed)],
                |t| relu(t[0]),
                |t| t[0].relu(),
                0.0,
                seed,
            );
        }
    }

    /// The composed path `ops` used before: split heads, `softmax(scale·q kᵀ + mask) v`, merge.
    fn attention_ref(qkv: &Tensor, nh: usize, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, three_h) = qkv.dims3()?;
        let h = three_h / 3;
        let heads = |j: usize| -> Result<Tensor> {
            qkv.narrow(2, j * h, h)?
                .reshape((b, t, nh, h / nh))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let s = (q.matmul(&k.t()?)? * scale)?;
        let s = match mask {
            Some(m) => s.broadcast_add(m)?,
            None => s,
        };
        candle_nn::ops::softmax(&s, D::Minus1)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, h))
    }

    #[test]
    fn self_attention_gradients_match_reference() {
        let causal = |t: usize| {
            crate::models::causal_mask(t, 0, DType::F32, &Device::Cpu)
                .unwrap()
                .unwrap()
        };
        // (B, T, H, heads): odd T, batch 1, one head, several heads.
        for (b, t, h, nh, seed) in [(2, 7, 12, 3, 1), (1, 5, 8, 1, 2), (3, 11, 16, 4, 3)] {
            let qkv = rand(&[b, t, 3 * h], seed);
            let scale = 1.0 / ((h / nh) as f64).sqrt();
            let m = causal(t);
            check(
                std::slice::from_ref(&qkv),
                |x| self_attention(x[0], nh, scale, Some(&m)),
                |x| attention_ref(x[0], nh, scale, Some(&m)),
                1e-5,
                seed,
            );
            check(
                &[qkv],
                |x| self_attention(x[0], nh, 0.7, None),
                |x| attention_ref(x[0], nh, 0.7, None),
                1e-5,
                seed + 100,
            );
        }
        // A per-row padding mask ([B, 1, T, T]): left-padded second row.
        let (b, t, h, nh) = (2, 6, 8, 2);
        let mut m = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j < 2) {
                        m[(bi * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        // Rows 0 and 1 of the padded sequence see no key; keep them out of the comparison.
        for i in 0..2 {
            m[(t + i) * t + i] = 0.0;
        }
        let m = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap();
        check(
            &[rand(&[b, t, 3 * h], 9)],
            |x| self_attention(x[0], nh, 0.5, Some(&m)),
            |x| attention_ref(x[0], nh, 0.5, Some(&m)),
            1e-5,
            9,
        );
    }

    #[test]
    fn fully_masked_rows_give_zeros_not_nan() {
        let m = Tensor::full(f32::NEG_INFINITY, (1, 1, 3, 3), &Device::Cpu).unwrap();
        let y = self_attention(&rand(&[1, 3, 6], 1), 1, 1.0, Some(&m)).unwrap();
        let s = y
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(s, 0.0);
    }

    fn lm_loss_ref(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (b, t, v) = logits.dims3()?;
        let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
        let target = ids
            .narrow(1, 1, t - 1)?
            .contiguous()?
            .reshape(b * (t - 1))?;
        let lp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
        let picked = lp.gather(&target.unsqueeze(1)?, 1)?.reshape((b, t - 1))?;
        picked.mean(1)?.neg()
    }

    #[test]
    fn lm_loss_gradients_match_reference() {
        for (b, t, v, seed) in [(3, 7, 5, 1), (1, 2, 14, 2), (2, 9, 3, 3)] {
            let ids: Vec<u32> = (0..b * t).map(|i| ((i * 7 + seed) % v) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
            check(
                &[rand(&[b, t, v], seed as u64)],
                |x| per_sequence_lm_loss(x[0], &ids),
                |x| lm_loss_ref(x[0], &ids),
                1e-5,
                seed as u64,
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = rand(&[2, 3, 4], 1);
        assert!(layer_norm(&x, &rand(&[3], 2), &rand(&[4], 3), 1e-5).is_err());
        assert!(linear(&x, &rand(&[3, 4], 2), None, false).is_err());
        assert!(linear(&x, &rand(&[4, 3], 2), Some(&rand(&[4], 3)), false).is_err());
        assert!(self_attention(&rand(&[1, 3, 8], 1), 3, 1.0, None).is_err());
        let bad_mask = rand(&[1, 1, 2, 3], 4);
        assert!(self_attention(&rand(&[1, 3, 6], 1), 1, 1.0, Some(&bad_mask)).is_err());
        let ids = Tensor::from_vec(vec![0u32, 9, 1, 2, 3, 1], (2, 3), &Device::Cpu).unwrap();
        assert!(per_sequence_lm_loss(&x, &ids).is_err());
        assert!(per_sequence_lm_loss(&rand(&[2, 1, 4], 1), &ids.narrow(1, 0, 1).unwrap()).is_err());
    }
}
