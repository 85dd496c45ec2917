//! Elementwise math written so that loops over it vectorise (no library calls, no branches):
//! `exp`, log-sum-exp and the exact GELU for inference on the CPU. libm's scalar `expf` and
//! `erff` were the hot spots they replace (`perf`, `docs/benchmarks.md` "Scoring").

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{fused, skinny};

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

/// Lanes the loops below keep independent, so that the compiler vectorises them.
const LANES: usize = 16;

#[inline(always)]
fn logsumexp_body(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut nan = false;
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            nan |= x.is_nan();
            *m = if x > *m { x } else { *m };
        }
    }
    let max = tail
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if nan || tail.iter().any(|x| x.is_nan()) {
        return f32::NAN;
    }
    if !max.is_finite() {
        return max;
    }
    let mut sums = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    for c in chunks {
        for (s, &x) in sums.iter_mut().zip(c) {
            *s += exp_nonpositive(x - max);
        }
    }
    let total = tail.iter().map(|&x| exp_nonpositive(x - max)).sum::<f32>() + sums.iter().sum::<f32>();
    max + total.ln()
}

/// `eˣ` for `x ≤ 0` to about 2 ulp (relative error below 3e-7 on `[−87, 0]`; `x < −87` gives
/// `e⁻⁸⁷` ≈ 1.6e-38 instead of a smaller number or 0, nothing next to the maximum's term 1).
/// Branch-free and in plain arithmetic so that loops over it vectorise: `eˣ = 2ⁿ · eʳ` with
/// `n = round(x / ln 2)` and `|r| ≤ ln 2 / 2`, `eʳ` by its Taylor polynomial to degree 7.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| < 2⁹.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2²³: adding it rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n + 127 into the exponent field: t's bits are 0x4B40_0000 + n.
    let scale = f32::from_bits((t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23);
    p * scale
}

/// `erf(x)` to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), from [`exp_nonpositive`].
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp_nonpositive(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
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
    let mut out = fused::with_f32(x, |xs| Ok(xs.to_vec()))?;
    out.par_chunks_mut(1 << 14).for_each(|c| {
        #[cfg(target_arch = "x86_64")]
        if skinny::available() {
            // SAFETY: AVX-512F is present (checked just above).
            unsafe { gelu_erf_avx512(c) };
            return;
        }
        gelu_erf_body(c)
    });
    Tensor::from_vec(out, x.shape(), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;

    #[test]
    fn exp_matches_the_library_exp_on_its_range() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn logsumexp_matches_a_double_precision_sum() {
        for len in [1usize, 15, 16, 17, 50_304] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 * 0.03 - 15.0).collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, |m, x| m.max(x as f64));
            let want = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let got = logsumexp(&row) as f64;
            assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "len {len}: {got} vs {want}");
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
        assert!(max_abs_diff(&got, &want) < 1e-5, "{}", max_abs_diff(&got, &want));
        let tiny = Tensor::new(&[-1e-3f32, 0.0, 1e-3, -30.0, 30.0], &candle_core::Device::Cpu).unwrap();
        assert!(max_abs_diff(&gelu_erf(&tiny).unwrap(), &tiny.gelu_erf().unwrap()) < 1e-6);
    }
}
