//! The LM head fused with log-softmax and the pick of the next token: what scoring needs
//! (`Model::next_token_logprobs`).
//!
//! Invariants:
//! - [`next_token_logprobs`] returns `log p(ids[b, t + 1] | ids[b, ..= t])` for `t < T − 1`,
//!   `[B, T − 1]` f32: the same numbers as the composed `ops::token_nll(dense(hidden, head))`,
//!   negated, to float rounding (tested below against it over more positions than one block and
//!   a vocabulary that is not a multiple of 16).
//! - Only untracked f32 CPU tensors take the fused path; other devices, dtypes and tensors under
//!   autograd take the composed one.
//! - The fused path never materialises the `[B, T, V]` logits: the head runs over blocks of
//!   [`BLOCK_ROWS`] positions into one buffer of at most `BLOCK_ROWS × V` floats, and each
//!   block's rows are reduced (the target's logit minus the log-sum-exp) while warm.
//! - Shapes that do not fit, fewer than 2 positions and ids outside the vocabulary are errors
//!   (`bad_shapes_and_ids_are_errors`).
//! - Each block's product runs on `gemm` over the rayon pool of the calling thread, and its rows
//!   are reduced in parallel; nothing is kept between calls.
//!
//! What it gained is in `docs/benchmarks.md` ("Inference kernels", item 4).

use candle_core::{bail, DType, Result, Tensor};
use rayon::prelude::*;

use super::{storage, vmath::logsumexp};
use crate::models::{fused, ops};

/// Positions per block: the logits buffer is `BLOCK_ROWS × V` floats (103 MB for a 50,304-token
/// vocabulary). Measured on Pythia-70m's head (8 × 127 positions, 2 threads): 512 rows took
/// 215–221 ms, 1,024 rows 202–225 ms, 256 rows 235–252 ms, 128 rows 314–463 ms.
const BLOCK_ROWS: usize = 512;

/// `log softmax(hidden[b, t] · headᵀ)[ids[b, t + 1]]` for `t < T − 1`: `[B, T − 1]` f32.
///
/// `hidden: [B, T, H]`, `head: [V, H]` (the `nn.Linear` layout both architectures' heads use),
/// `ids: [B, T]` u32. The same numbers as `ops::token_nll(dense(hidden, head)).neg()` up to float
/// rounding; that composed path also runs for other devices and dtypes and under autograd.
pub fn next_token_logprobs(hidden: &Tensor, head: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let (v, head_h) = head.dims2()?;
    if head_h != h || ids.dims() != [b, t] || t < 2 {
        bail!(
            "next_token_logprobs: hidden {:?}, head {:?} and ids {:?} do not fit (need [B, T, H], [V, H], [B, T], T >= 2)",
            hidden.dims(),
            head.dims(),
            ids.dims()
        );
    }
    // A head held in half precision (`lethe serve --dtype`) is widened once per call, so that
    // scoring keeps its blocked path instead of a whole `[B, T, V]` logits tensor.
    let widened;
    let head = if matches!(head.dtype(), DType::BF16 | DType::F16) && !head.track_op() {
        widened = head.to_dtype(DType::F32)?;
        &widened
    } else {
        head
    };
    let plain = fused::supported(&[hidden, head]) && !hidden.track_op() && !head.track_op();
    if !plain {
        let logits = ops::dense(hidden, head, None, true)?.to_dtype(DType::F32)?;
        return ops::token_nll(&logits, ids)?.neg();
    }
    let ids: Vec<u32> = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= v) {
        bail!("next_token_logprobs: token id {bad} is outside the vocabulary (size {v})");
    }
    // (row of `hidden`, target id) for every scored position, sequence by sequence.
    let rows: Vec<(usize, u32)> = (0..b)
        .flat_map(|s| (0..t - 1).map(move |p| (s * t + p, s * t + p + 1)))
        .map(|(r, next)| (r, ids[next]))
        .collect();
    let out = storage::with_f32(hidden, |hs| {
        storage::with_f32(head, |ws| Ok(block_logprobs(hs, h, ws, v, &rows)))
    })?;
    Tensor::from_vec(out, (b, t - 1), hidden.device())
}

/// Calls `f(i, logits_i)` for every row `i` of `hs` (`[m, H]` row-major f32), where
/// `logits_i = hs[i] · headᵀ` (`head: [V, H]`), in parallel over each block of [`BLOCK_ROWS`]
/// rows. An f32 or half-precision head on the CPU runs the blocked product here (a half one
/// widened once); any other takes `ops::dense` on its device and reads each block back.
pub fn visit_logits(hs: &[f32], head: &Tensor, f: impl Fn(usize, &[f32]) + Sync) -> Result<()> {
    let (v, h) = head.dims2()?;
    if h == 0 || !hs.len().is_multiple_of(h) {
        bail!("visit_logits: {} values are not rows of {h}", hs.len());
    }
    let m = hs.len() / h;
    let widened;
    let head = if matches!(head.dtype(), DType::BF16 | DType::F16) && head.device().is_cpu() {
        widened = head.to_dtype(DType::F32)?;
        &widened
    } else {
        head
    };
    if !fused::supported(&[head]) {
        for (bi, blk) in hs.chunks(BLOCK_ROWS * h).enumerate() {
            let x = Tensor::from_slice(blk, (blk.len() / h, h), head.device())?
                .to_dtype(head.dtype())?;
            let logits: Vec<Vec<f32>> = ops::dense(&x, head, None, true)?
                .to_dtype(DType::F32)?
                .to_vec2()?;
            logits
                .par_iter()
                .enumerate()
                .for_each(|(i, row)| f(bi * BLOCK_ROWS + i, row));
        }
        return Ok(());
    }
    thread_local! {
        // The logits block, kept for the thread's next call: a fresh one would fault in up to
        // `BLOCK_ROWS × V` zeroed pages per call (5 % of a Pythia-70m audit's time).
        static LOGITS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    storage::with_f32(head, |ws| {
        LOGITS.with(|cell| {
            let mut logits = cell.borrow_mut();
            let need = logits.len().max(BLOCK_ROWS.min(m) * v);
            logits.resize(need, 0.0);
            for (bi, x) in hs.chunks(BLOCK_ROWS * h).enumerate() {
                let rows = x.len() / h;
                head_product(x, h, ws, v, &mut logits);
                logits[..rows * v]
                    .par_chunks(v)
                    .enumerate()
                    .for_each(|(i, row)| f(bi * BLOCK_ROWS + i, row));
            }
            Ok(())
        })
    })
}

/// `logits[..m × v] = x · wsᵀ` for `x: [m, h]` and `ws: [v, h]` (the heads' `nn.Linear` layout,
/// read as its transpose), row-major, on `gemm` over the calling thread's rayon pool.
fn head_product(x: &[f32], h: usize, ws: &[f32], v: usize, logits: &mut [f32]) {
    let m = x.len() / h;
    assert!(x.len() == m * h && ws.len() == v * h && logits.len() >= m * v);
    // SAFETY: the sizes were checked just above: x is [m, h], ws is [v, h] read as its
    // transpose [h, v] (row stride 1, column stride h), logits holds [m, v]; the three are
    // distinct borrows, so nothing aliases.
    unsafe {
        gemm::gemm(
            m,
            v,
            h,
            logits.as_mut_ptr(),
            1,
            v as isize,
            false,
            x.as_ptr(),
            1,
            h as isize,
            ws.as_ptr(),
            h as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            super::gemm::gemm_parallelism(),
        );
    }
}

/// For each `(row, target)`: `log softmax(hs[row] · wsᵀ)[target]`.
fn block_logprobs(hs: &[f32], h: usize, ws: &[f32], v: usize, rows: &[(usize, u32)]) -> Vec<f32> {
    let mut out = vec![0f32; rows.len()];
    let mut x = vec![0f32; BLOCK_ROWS.min(rows.len()) * h];
    let mut logits = vec![0f32; BLOCK_ROWS.min(rows.len()) * v];
    for (blk, dst) in rows.chunks(BLOCK_ROWS).zip(out.chunks_mut(BLOCK_ROWS)) {
        let m = blk.len();
        for (xr, &(r, _)) in x.chunks_exact_mut(h).zip(blk) {
            xr.copy_from_slice(&hs[r * h..(r + 1) * h]);
        }
        head_product(&x[..m * h], h, ws, v, &mut logits);
        dst.par_iter_mut()
            .zip(logits.par_chunks(v))
            .zip(blk)
            .for_each(|((o, row), &(_, target))| *o = row[target as usize] - logsumexp(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn fused_head_matches_the_composed_path() {
        // More positions than one block, a vocabulary that is not a multiple of 16.
        let (b, t, h, v) = (3, 70, 24, 1_003);
        let hidden = rand(&[b, t, h], 1);
        let head = rand(&[v, h], 2);
        let ids: Vec<u32> = (0..b * t).map(|i| ((i * 37) % v) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, t), &candle_core::Device::Cpu).unwrap();
        let got = next_token_logprobs(&hidden, &head, &ids).unwrap();
        let want = fused::with_reference_ops(|| next_token_logprobs(&hidden, &head, &ids)).unwrap();
        assert_eq!(got.dims(), &[b, t - 1]);
        assert!(
            max_abs_diff(&got, &want) < 1e-4,
            "{}",
            max_abs_diff(&got, &want)
        );
    }

    #[test]
    fn bad_shapes_and_ids_are_errors() {
        let hidden = rand(&[1, 4, 8], 1);
        let head = rand(&[10, 8], 2);
        let ids = |v: Vec<u32>| Tensor::from_vec(v, (1, 4), &candle_core::Device::Cpu).unwrap();
        assert!(next_token_logprobs(&hidden, &head, &ids(vec![1, 2, 3, 10])).is_err());
        assert!(next_token_logprobs(&hidden, &rand(&[10, 7], 2), &ids(vec![1, 2, 3, 4])).is_err());
        assert!(next_token_logprobs(
            &hidden.narrow(1, 0, 1).unwrap(),
            &head,
            &ids(vec![1, 2, 3, 4])
        )
        .is_err());
    }
}
