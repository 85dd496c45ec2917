//! The causal LM cross-entropy per sequence, with its backward: the kernel
//! `ops::per_sequence_lm_loss` runs for tracked f32 CPU logits.
//!
//! Invariants:
//! - `[B]`: each row's mean cross-entropy of `logits[:, t]` against `ids[:, t + 1]` over its
//!   `T − 1` shifted positions, padding included (no ignore index), as transformers computes it
//!   with `labels = input_ids`; output and gradient match the composed reference to f32 rounding
//!   (`lm_loss_gradients_match_reference` in `fused::tests`).
//! - `ids` are u32 or i64; ids not `[B, T]`, fewer than 2 positions, or a target outside the
//!   vocabulary (negative ones included) are errors (`bad_inputs_are_errors`).
//! - Single-threaded; each row's loss is summed over its positions in f64.

use super::*;

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

pub(super) struct LmLoss {
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
