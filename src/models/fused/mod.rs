//! Fused f32 CPU kernels with their own backward, for the autograd path (training,
//! unlearning): each is one candle `CustomOp` node whose `cpu_fwd` does the whole computation
//! in one pass and whose `bwd` returns every input's gradient from one more.
//!
//! Invariants:
//! - Every kernel computes the same function as its composed reference in [`super::ops`] (to f32
//!   rounding), and every backward is pinned to autograd through that reference by the tests at
//!   the bottom of this file (relative L2 error ≤ 1e-4 on every input, odd shapes and strided
//!   inputs included).
//! - CPU and f32 only: [`supported`] says whether tensors qualify, and [`super::ops`] takes these
//!   kernels only then (for tracked inputs; `self_attention` tracked or not), keeping the
//!   composed reference for every other device and dtype. [`with_reference_ops`] switches them
//!   off on the calling thread, and with them every hand-written pass that checks `supported`.
//! - Inputs may have any strides; outputs are contiguous. Shapes that do not fit are errors
//!   (`bad_inputs_are_errors`).
//! - Where a kernel departs from the composed path it says so: a softmax row that is −∞
//!   everywhere (an attention row with every key masked) gives zeros instead of NaN.
//! - An op keeps only what its own backward reads, nothing between calls; kernels split rows
//!   (or products, through `gemm`) over the rayon pool of the calling thread.
//!
//! What they gained over the composed graph is in `docs/benchmarks.md` ("Training step").

use std::sync::OnceLock;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor,
};

use super::cpu::gemm::{gemm_parallelism, small_gemm};
use super::cpu::storage::{cpu, data, with_f32};
use rayon::prelude::*;

mod attention;
mod layer_norm;
mod linear;
mod loss;
mod softmax;

pub use attention::*;
pub use layer_norm::*;
pub use linear::*;
pub use loss::*;
pub use softmax::*;

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
