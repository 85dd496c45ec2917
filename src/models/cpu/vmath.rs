//! Elementwise math written so that loops over it vectorise (no library calls): `exp`,
//! log-sum-exp, erf and the exact GELU, LayerNorm's forward, and lane-wise sums and maxima,
//! shared by the inference kernels and the hand-written passes.
//!
//! Invariants:
//! - [`exp_neg`] is within 1e-6 relative of `eˣ` on `[−87, 0]` and ≈ 1e-38 instead of 0 below;
//!   [`softmax_term`] is the same but exactly 0 below −87, so masked keys weigh exactly 0.
//! - [`logsumexp`] is within 1e-5 relative of an f64 sum; NaN in, NaN out; an empty or all-−∞
//!   row gives −∞. [`gelu_erf`] is within 1e-5 of candle's `gelu_erf`. All tested below.
//! - Sums keep [`LANES`] independent partial sums, so they differ from a serial sum only by
//!   rounding; maxima are exact.
//! - `logsumexp` and the in-place GELU run the same code compiled for AVX-512F where the CPU has
//!   it.
//! - Everything runs on the calling thread except [`gelu_erf`] (a whole tensor), which splits
//!   over the rayon pool; nothing is kept between calls.
//!
//! What replacing libm's scalar `expf` and `erff` gained is in `docs/benchmarks.md` ("Inference
//! kernels", item 4).

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{skinny, storage};

/// Independent partial sums: LLVM keeps float sums in source order, so a plain `.sum()` is one
/// serial dependency chain; 16 lanes vectorise (the result differs from the serial sum only by
/// rounding).
pub(crate) const LANES: usize = 16;

#[inline(always)]
pub(crate) fn lanes_total(acc: [f32; LANES]) -> f32 {
    let mut acc = acc;
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `Σ f(a_i, b_i)` with [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn sum_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(xa[i], xb[i]);
        }
    }
    for (i, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[i] += f(x, y);
    }
    lanes_total(acc)
}

/// `max_i x_i` with [`LANES`] partial maxima (exact: max is associative).
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = x.chunks_exact(LANES);
    let r = c.remainder();
    for xs in c {
        for i in 0..LANES {
            acc[i] = if xs[i] > acc[i] { xs[i] } else { acc[i] };
        }
    }
    for (i, &v) in r.iter().enumerate() {
        acc[i] = if v > acc[i] { v } else { acc[i] };
    }
    acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `e^x` for `x ≤ 0` in a form that vectorises (Cephes' `expf`: `x = n·ln 2 + r`, a degree-7
/// polynomial in `r`, `2^n` from the exponent bits); relative error below 1e-6 against the
/// exact value, and ≈ 1e-38 instead of 0 below −87.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    // Round x·log2(e) to the nearest integer with the 1.5·2^23 trick (|x·log2 e| < 2^22).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = (((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `eᶻ` for `z ≤ 0`, exactly 0 below −87. [`exp_neg`] gives ≈ 1e-38 there, which a
/// masked key's weight would carry into the values product as a denormal after normalising: an
/// x86 microcode assist per multiply, measured as most of a TinyMem audit's attention time.
/// The attention kernel (`attend.rs`) takes this; `fused::softmax_row` keeps libm's `exp`,
/// because the bundled models' recorded evaluations (pinned to 1e-9) run through it.
#[inline(always)]
pub(crate) fn softmax_term(z: f32) -> f32 {
    if z < -87.0 {
        0.0
    } else {
        exp_neg(z)
    }
}

/// `row[i] ← softmax_term(row[i] − shift)` in place, returning `Σ row[i]` with [`LANES`] partial
/// sums: a softmax's numerators and denominator in one vectorised pass (`shift` is the row's
/// maximum).
#[inline(always)]
pub(crate) fn exp_shifted_in_place(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut c = row.chunks_exact_mut(LANES);
    for xs in c.by_ref() {
        for i in 0..LANES {
            xs[i] = softmax_term(xs[i] - shift);
            acc[i] += xs[i];
        }
    }
    for (i, x) in c.into_remainder().iter_mut().enumerate() {
        *x = softmax_term(*x - shift);
        acc[i] += *x;
    }
    lanes_total(acc)
}

/// `ln Σ exp(row)`, stable (shifted by the maximum); NaN in, NaN out; `−∞` for an empty row or
/// one that is all `−∞`.
pub(crate) fn logsumexp(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if skinny::available() {
        // SAFETY: AVX-512F is present (checked just above).
        return unsafe { logsumexp_avx512(row) };
    }
    logsumexp_body(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn logsumexp_avx512(row: &[f32]) -> f32 {
    logsumexp_body(row)
}

#[inline(always)]
fn logsumexp_body(row: &[f32]) -> f32 {
    let max = max_lanes(row);
    if max.is_infinite() {
        // All −∞ (or empty), or a +∞: no finite shift; NaN still wins.
        return if row.iter().any(|x| x.is_nan()) {
            f32::NAN
        } else {
            max
        };
    }
    // A NaN entry makes its term, and so the total, NaN.
    max + sum_pairs(row, row, |x, _| exp_neg(x - max)).ln()
}

/// `erf(x)` to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), from [`exp_neg`].
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp_neg(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// Mean and 1/std of one row (two passes over lanes; the hand-written passes' LayerNorm).
#[inline(always)]
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum_pairs(x, x, |a, _| a) / d;
    let var = sum_pairs(x, x, |a, _| (a - mean) * (a - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `out = LayerNorm(x)` row by row, `w`, `b: [D]`.
#[inline(always)]
pub(crate) fn layer_norm(x: &[f32], (w, b): (&[f32], &[f32]), eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (orow, xrow) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let (mean, rstd) = row_stats(xrow, eps);
        for i in 0..d {
            orow[i] = (xrow[i] - mean) * rstd * w[i] + b[i];
        }
    }
}

/// The exact GELU, `x · Φ(x) = x/2 · (1 + erf(x/√2))` (Hugging Face `"gelu"`), in place.
#[inline(always)]
fn gelu_erf_body(xs: &mut [f32]) {
    for x in xs {
        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_erf_avx512(xs: &mut [f32]) {
    gelu_erf_body(xs)
}

/// [`Tensor::gelu_erf`] for an f32 CPU tensor at inference, vectorised and parallel; the
/// same function to about 1e-7 (tested against candle's, which calls libm's `erff` per element).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    let mut out = storage::with_f32(x, |xs| Ok(xs.to_vec()))?;
    out.par_chunks_mut(1 << 14).for_each(gelu_erf_in_place);
    Tensor::from_vec(out, x.shape(), x.device())
}

/// The exact GELU of every element of `xs`, in place, on the calling thread.
pub(crate) fn gelu_erf_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if skinny::available() {
        // SAFETY: AVX-512F is present (checked just above).
        unsafe { gelu_erf_avx512(xs) };
        return;
    }
    gelu_erf_body(xs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn exp_neg_is_accurate_on_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let got = f64::from(exp_neg(x));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn logsumexp_matches_a_double_precision_sum() {
        for len in [1usize, 15, 16, 17, 50_304] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 * 0.03 - 15.0)
                .collect();
            let max = row
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, |m, x| m.max(x as f64));
            let want = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let got = logsumexp(&row) as f64;
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "len {len}: {got} vs {want}"
            );
        }
        assert!(logsumexp(&[1.0, f32::NAN, 2.0]).is_nan());
        assert_eq!(logsumexp(&[f32::NEG_INFINITY; 20]), f32::NEG_INFINITY);
        assert_eq!(logsumexp(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn gelu_matches_candles_exact_gelu() {
        let x = (rand(&[4, 1000], 3) * 12.0).unwrap();
        let got = gelu_erf(&x).unwrap();
        let want = x.gelu_erf().unwrap();
        assert!(
            max_abs_diff(&got, &want) < 1e-5,
            "{}",
            max_abs_diff(&got, &want)
        );
        let tiny = Tensor::new(
            &[-1e-3f32, 0.0, 1e-3, -30.0, 30.0],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(max_abs_diff(&gelu_erf(&tiny).unwrap(), &tiny.gelu_erf().unwrap()) < 1e-6);
    }
}
