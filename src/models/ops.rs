//! The numeric building blocks both architectures compose (LayerNorm, softmax, rotary
//! embedding, activations, attention, dense layers, the LM loss), each choosing its
//! implementation from its inputs so that no caller has to.
//!
//! Invariants:
//! - Inputs tracked by autograd (`Tensor::track_op`) always get a differentiable path: for f32
//!   tensors on the CPU the [`fused`] kernels (one node each, with a hand-written backward),
//!   elsewhere a composition of candle primitives. candle's own fused kernels
//!   (`candle_nn::ops::layer_norm`, `softmax_last_dim`, `rotary_emb::rope`) have no backward and
//!   run only on untracked inputs.
//! - Untracked f32 CPU inputs take lethe's CPU kernels where they apply: attention reading the
//!   KV cache in place (`cpu::attend`), the skinny products for a few rows on AVX-512F CPUs
//!   (`cpu::skinny`, as [`dense`] decides), the vectorised exact GELU (`cpu::vmath`), and
//!   [`self_attention`]'s fused kernel (tracked or not). Other devices and dtypes take the
//!   composed path.
//! - Every path computes the same function to float rounding: the tests below pin the fast and
//!   differentiable paths to each other, and each kernel's own tests pin it to the composed form.
//!   One known difference: a query row whose keys are all masked gives zeros through the fused
//!   `self_attention` and NaN through the composed one (no caller builds such a row).
//! - No state between calls; the kernels use the rayon pool of the calling thread.

use candle_core::{DType, Result, Tensor, D};

use super::cpu::{attend, skinny, storage, vmath};
use super::fused;

/// True when autograd must see through an op on these tensors.
fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if needs_grad(&[x, w, b]) && fused::supported(&[x, w, b]) {
        fused::layer_norm(x, w, b, eps)
    } else if needs_grad(&[x, w, b]) || x.dtype() != DType::F32 {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        xn.broadcast_mul(w)?.broadcast_add(b)
    } else {
        candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if needs_grad(&[x]) && fused::supported(&[x]) {
        fused::softmax_last(x)
    } else if needs_grad(&[x]) {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// Rotary embedding (GPT-NeoX / "rotate_half" convention) of `x: [B, H, T, R]` with
/// `cos`, `sin: [B, T, R/2]` already gathered at each row's positions.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if needs_grad(&[x, cos, sin]) {
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    } else {
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)
    }
}

/// MLP activations found in `config.json` files of the supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// Exact GELU, `x·Φ(x)` (Hugging Face `"gelu"`).
    Gelu,
    /// Tanh approximation (Hugging Face `"gelu_new"`, `"gelu_fast"`, `"gelu_pytorch_tanh"`).
    GeluTanh,
    Silu,
}

impl Activation {
    /// Parses a Hugging Face activation name; `None` when lethe does not implement it.
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Self::Relu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_fast" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    /// The Hugging Face name of this activation.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Relu => "relu",
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_new",
            Self::Silu => "silu",
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Relu if needs_grad(&[x]) && fused::supported(&[x]) => fused::relu(x),
            Self::Relu => x.relu(),
            Self::Gelu if !needs_grad(&[x]) && fused::supported(&[x]) => vmath::gelu_erf(x),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Silu => x.silu(),
        }
    }

    /// [`Activation::apply`] on a slice in place, the same function to float rounding (the
    /// hand-written decode step's buffers).
    pub(crate) fn apply_in_place(self, xs: &mut [f32]) {
        match self {
            Self::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            Self::Gelu => vmath::gelu_erf_in_place(xs),
            Self::GeluTanh => {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                xs.iter_mut().for_each(|x| {
                    *x = 0.5 * *x * (1.0 + (c * *x * (1.0 + 0.044715 * *x * *x)).tanh())
                });
            }
            Self::Silu => xs.iter_mut().for_each(|x| *x /= 1.0 + (-*x).exp()),
        }
    }
}

/// Scaled dot-product attention with an optional additive mask.
///
/// `q: [B, H, T, D]`, `k`, `v: [B, H, S, D]`, `mask: [B, 1, T, S]` (0 or −∞), broadcast over heads.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let all: Vec<&Tensor> = [Some(q), Some(k), Some(v), mask]
        .into_iter()
        .flatten()
        .collect();
    if !needs_grad(&all) && fused::supported(&all) {
        if let Some(out) = attend::attention(q, k, v, mask)? {
            return Ok(out);
        }
    }
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last(&scores)?.matmul(v)
}

/// Multiplies `q: [.., D]` so that [`attention`] (which divides by `sqrt(D)`) applies `scale`
/// instead; a no-op when `scale` is already `1/sqrt(D)`.
pub fn prescale_query(q: &Tensor, scale: f64) -> Result<Tensor> {
    let factor = scale * (q.dim(D::Minus1)? as f64).sqrt();
    if (factor - 1.0).abs() < 1e-12 {
        Ok(q.clone())
    } else {
        q * factor
    }
}

/// Multi-head self-attention without a KV cache over a packed projection `qkv: [B, T, 3·H]`
/// (query, key and value blocks side by side, `n_head` heads each): returns the merged heads
/// `[B, T, H]` of `softmax(scale · q kᵀ + mask) v`. `mask` is additive, `[1 | B, 1, T, T]`.
///
/// f32 on the CPU runs one fused kernel (forward and backward), tracked or not; elsewhere the heads
/// are split and [`attention`] runs. A query row with every key masked yields zeros on the fused
/// path and NaN on the composed one; no caller builds such a row.
pub fn self_attention(
    qkv: &Tensor,
    n_head: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if fused::supported(&[qkv]) {
        return fused::self_attention(qkv, n_head, scale, mask);
    }
    let (b, t, three_h) = qkv.dims3()?;
    let h = three_h / 3;
    let hd = h / n_head;
    let heads = |j: usize| -> Result<Tensor> {
        qkv.narrow(2, j * h, h)?
            .reshape((b, t, n_head, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = prescale_query(&heads(0)?, scale)?;
    attention(&q, &heads(1)?, &heads(2)?, mask)?
        .transpose(1, 2)?
        .reshape((b, t, h))
}

/// Causal language-modelling loss as transformers computes it with `labels = input_ids`: the
/// mean cross-entropy of `logits[:, t]` against `ids[:, t + 1]` over every row and every one of
/// the `T − 1` shifted positions (padding included, no ignore index).
///
/// `logits: [B, T, V]`, `ids: [B, T]` u32. Returns a scalar.
pub fn lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    per_sequence_lm_loss(logits, ids)?.mean_all()
}

/// Per-sequence mean cross-entropy over the `T − 1` shifted positions: `[B]`.
pub fn per_sequence_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if needs_grad(&[logits]) && fused::supported(&[logits]) {
        return fused::per_sequence_lm_loss(logits, ids);
    }
    token_nll(logits, ids)?.mean(1)
}

/// Per-position negative log-likelihood `[B, T − 1]` of `ids[:, t + 1]` under `logits[:, t]`,
/// composed from differentiable ops (the reference path; also used where rows need masking).
pub fn token_nll(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let pred = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let target = ids
        .narrow(1, 1, t - 1)?
        .contiguous()?
        .reshape(b * (t - 1))?;
    let lp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    lp.gather(&target.unsqueeze(1)?, 1)?
        .reshape((b, t - 1))?
        .neg()
}

/// Applies a `[in, out]` weight (GPT-2 `Conv1D` layout) or an `[out, in]` weight (`nn.Linear`
/// layout) with an optional bias to `x: [.., in]`.
pub fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>, transposed: bool) -> Result<Tensor> {
    if x.dtype() == DType::F32 && matches!(w.dtype(), DType::BF16 | DType::F16) {
        return dense_half_weight(x, w, b, transposed);
    }
    let all: Vec<&Tensor> = [Some(x), Some(w), b].into_iter().flatten().collect();
    if needs_grad(&all) && fused::supported(&all) {
        return fused::linear(x, w, b, transposed);
    }
    if !needs_grad(&all) && fused::supported(&all) && skinny::available() {
        // Shapes that do not fit (or a zero-width input) go to the composed path and its errors.
        if let Ok((rows, d_in, d_out)) = fused::linear_dims(x.dims(), w.dims(), transposed) {
            if skinny::takes(rows, transposed) && w.is_contiguous() {
                return dense_skinny::<f32>(x, w, b, transposed, (rows, d_in, d_out));
            }
        }
    }
    dense_composed(x, w, b, transposed)
}

/// [`dense`] of f32 inputs against a weight held in bf16 or f16 (`lethe serve --dtype`): for a
/// few rows at inference on the CPU, [`skinny`]'s kernels widen the weight as they read it;
/// otherwise (prefill, scoring, autograd, other devices) the weight is widened to f32 for this
/// product only, so the result is the f32 product of the stored values either way.
fn dense_half_weight(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
) -> Result<Tensor> {
    let plain: Vec<&Tensor> = [Some(x), b].into_iter().flatten().collect();
    if !needs_grad(&plain)
        && fused::supported(&plain)
        && w.device().is_cpu()
        && w.is_contiguous()
        && skinny::available()
    {
        if let Ok(dims) = fused::linear_dims(x.dims(), w.dims(), transposed) {
            if skinny::takes(dims.0, transposed) {
                return match w.dtype() {
                    DType::BF16 => dense_skinny::<half::bf16>(x, w, b, transposed, dims),
                    _ => dense_skinny::<half::f16>(x, w, b, transposed, dims),
                };
            }
        }
    }
    dense(x, &w.to_dtype(DType::F32)?, b, transposed)
}

/// [`dense`] for a few rows at inference: [`skinny`]'s kernels read the weight in place.
fn dense_skinny<W: skinny::WeightElem + candle_core::WithDType>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
    (rows, d_in, d_out): (usize, usize, usize),
) -> Result<Tensor> {
    if let Some(b) = b {
        if b.dims() != [d_out] {
            candle_core::bail!("dense: bias {:?} does not fit {d_out} outputs", b.dims());
        }
    }
    let y = storage::with_f32(x, |xs| {
        storage::with_slice::<W, _>(w, |ws| {
            let run =
                |bs: Option<&[f32]>| skinny::dense(xs, (rows, d_in), ws, d_out, bs, transposed);
            match b {
                Some(b) => storage::with_f32(b, |bs| Ok(run(Some(bs)))),
                None => Ok(run(None)),
            }
        })
    })?;
    let mut dims = x.dims().to_vec();
    let last = dims.len() - 1;
    dims[last] = d_out;
    Tensor::from_vec(y, dims, x.device())
}

/// Whether `x · Wᵀ` for `rows` rows against an `[d_out, d_in]` weight runs faster on the CPU as
/// `(W · xᵀ)ᵀ`. A dispatch table measured for candle 0.11's CPU matmul (the `gemm` crate,
/// AVX-512, 2 threads; best of 10 runs on an idle machine): with `d_in ≥ 512`, the swapped order
/// took 0.38–0.87× the time at 8 rows, 0.38–0.75× at 32 rows against weights up to 2,048 wide,
/// and 0.72× for one row against a 50,304-wide LM head; at 32 rows against the LM head and from
/// 128 rows on it was slower (up to 2.5×). Decode steps are the skinny case; prefill and scoring
/// keep the usual order (`docs/benchmarks.md`, "Peer comparison").
fn skinny_prefers_wx(rows: usize, d_in: usize, d_out: usize) -> bool {
    d_in >= 512
        && match rows {
            1 => d_out >= 16_384,
            2..=8 => true,
            9..=32 => d_out <= 4_096,
            _ => false,
        }
}

/// [`dense`] composed from candle primitives (the reference path, differentiable by autograd).
pub(crate) fn dense_composed(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    transposed: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (rows, d_in) = (
        dims[..dims.len() - 1].iter().product::<usize>(),
        dims[dims.len() - 1],
    );
    let x2 = x.reshape((rows, d_in))?;
    let y = if transposed {
        let d_out = w.dim(0)?;
        if x2.device().is_cpu() && !needs_grad(&[x, w]) && skinny_prefers_wx(rows, d_in, d_out) {
            // The same product as `(W · xᵀ)ᵀ`: the `gemm` crate is faster in that operand order
            // for a few rows against a wide `[out, in]` weight (see `skinny_prefers_wx`).
            w.matmul(&x2.t()?)?.t()?
        } else {
            x2.matmul(&w.t()?)?
        }
    } else {
        x2.matmul(w)?
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = y.dim(1)?;
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use candle_core::Var;

    #[test]
    fn fast_and_differentiable_paths_agree() {
        let x = rand(&[2, 3, 5, 8], 1);
        let w = rand(&[8], 2);
        let b = rand(&[8], 3);
        let xv = Var::from_tensor(&x).unwrap();
        let fast = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let slow = layer_norm(xv.as_tensor(), &w, &b, 1e-5).unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-5);

        let fast = softmax_last(&x).unwrap();
        let slow = softmax_last(xv.as_tensor()).unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-6);

        let cos = rand(&[2, 5, 4], 4);
        let sin = rand(&[2, 5, 4], 5);
        let fast = rope(&x, &cos, &sin).unwrap();
        let slow = rope(xv.as_tensor(), &cos, &sin).unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-5);
    }

    #[test]
    fn differentiable_path_keeps_the_gradient() {
        let x = Var::from_tensor(&rand(&[4, 8], 7)).unwrap();
        let w = rand(&[8], 8);
        let b = rand(&[8], 9);
        let y = softmax_last(&layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap()).unwrap();
        let loss = (y * rand(&[4, 8], 10)).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("gradient reaches the input");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn activation_names_round_trip() {
        for name in ["relu", "gelu", "gelu_new", "silu"] {
            assert_eq!(Activation::from_hf(name).unwrap().hf_name(), name);
        }
        assert!(Activation::from_hf("mish").is_none());
    }

    #[test]
    fn skinny_dense_in_the_swapped_operand_order_is_the_same_product() {
        // (rows, d_in, d_out): one case per arm of `skinny_prefers_wx`, and one it declines.
        for (rows, d_in, d_out, swapped) in [
            (1, 512, 16_384, true),
            (3, 512, 40, true),
            (2 * 16, 640, 96, true),
            (1, 512, 96, false),
        ] {
            assert_eq!(skinny_prefers_wx(rows, d_in, d_out), swapped);
            let x = rand(&[rows, d_in], 7);
            let w = rand(&[d_out, d_in], 8);
            let b = rand(&[d_out], 9);
            let got = dense_composed(&x.unsqueeze(0).unwrap(), &w, Some(&b), true).unwrap();
            assert_eq!(got.dims(), &[1, rows, d_out]);
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-3, "{rows}x{d_in}x{d_out}");
        }
    }
}
