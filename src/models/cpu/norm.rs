//! LayerNorm's backward and the row/column helpers of a dense layer's forward and backward, on
//! plain row-major slices (the forward LayerNorm is [`super::vmath::layer_norm`]).
//!
//! Invariants: [`layer_norm_bwd_add`] adds the exact gradient of `LayerNorm(x)·w + b` with
//! respect to `x` (and accumulates `∂w`, `∂b` when asked), to f32 rounding; the tests pin it
//! against finite differences of an f64 LayerNorm. Every function is single-threaded and writes
//! only its output slices.

use super::vmath::{row_stats, sum_pairs};

/// `dx += ∂LayerNorm(x)/∂x · g` row by row, and, given `(∂w, ∂b)`, `∂w += Σ g ⊙ x̂` and
/// `∂b += Σ g` over the rows.
#[inline(always)]
pub(crate) fn layer_norm_bwd_add(
    x: &[f32],
    w: &[f32],
    eps: f32,
    g: &[f32],
    dx: &mut [f32],
    mut dparams: Option<(&mut [f32], &mut [f32])>,
) {
    let d = w.len();
    let (mut xhat, mut gw) = (vec![0f32; d], vec![0f32; d]);
    for ((dxr, xr), gr) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(g.chunks_exact(d))
    {
        let (mean, rstd) = row_stats(xr, eps);
        for i in 0..d {
            xhat[i] = (xr[i] - mean) * rstd;
            gw[i] = gr[i] * w[i];
        }
        if let Some((dw, db)) = dparams.as_mut() {
            for i in 0..d {
                dw[i] += gr[i] * xhat[i];
                db[i] += gr[i];
            }
        }
        let a = sum_pairs(&gw, &gw, |p, _| p) / d as f32;
        let c = sum_pairs(&gw, &xhat, |p, q| p * q) / d as f32;
        for i in 0..d {
            dxr[i] += rstd * (gw[i] - a - xhat[i] * c);
        }
    }
}

/// `out = Σ_rows x` for `x: [rows, out.len()]`.
#[inline(always)]
pub(crate) fn col_sum(x: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for row in x.chunks_exact(out.len()) {
        out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
    }
}

/// Fills each `[d]` row of `out` with `base_row + bias` (`base` is `[rows, d]`, or absent).
#[inline(always)]
pub(crate) fn rows_plus_bias(base: Option<&[f32]>, bias: &[f32], out: &mut [f32]) {
    let d = bias.len();
    match base {
        Some(x) => {
            for (row, xr) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                for ((r, &xv), &bv) in row.iter_mut().zip(xr).zip(bias) {
                    *r = xv + bv;
                }
            }
        }
        None => out
            .chunks_exact_mut(d)
            .for_each(|r| r.copy_from_slice(bias)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_util::rand(&[n], seed).to_vec1().unwrap()
    }

    /// `Σ r ⊙ (LayerNorm(x)·w + b)` in f64.
    fn loss(x: &[f64], w: &[f64], b: &[f64], r: &[f32], eps: f64) -> f64 {
        let d = w.len();
        let mut total = 0.0;
        for (row, rr) in x.chunks_exact(d).zip(r.chunks_exact(d)) {
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                let y = (row[i] - mean) / (var + eps).sqrt() * w[i] + b[i];
                total += y * rr[i] as f64;
            }
        }
        total
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let (rows, d, eps) = (3, 7, 1e-5f32);
        let (x, w, b, r) = (
            values(rows * d, 1),
            values(d, 2),
            values(d, 3),
            values(rows * d, 4),
        );
        let mut dx = vec![0.5f32; rows * d];
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        layer_norm_bwd_add(&x, &w, eps, &r, &mut dx, Some((&mut dw, &mut db)));
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&b));
        let h = 1e-6;
        let fd = |which: usize, i: usize| {
            let (mut xs, mut ws, mut bs) = (x64.clone(), w64.clone(), b64.clone());
            let at =
                |xs: &mut Vec<f64>, ws: &mut Vec<f64>, bs: &mut Vec<f64>, delta: f64| match which {
                    0 => xs[i] += delta,
                    1 => ws[i] += delta,
                    _ => bs[i] += delta,
                };
            at(&mut xs, &mut ws, &mut bs, h);
            let up = loss(&xs, &ws, &bs, &r, eps as f64);
            at(&mut xs, &mut ws, &mut bs, -2.0 * h);
            let down = loss(&xs, &ws, &bs, &r, eps as f64);
            (up - down) / (2.0 * h)
        };
        for (i, &got) in dx.iter().enumerate() {
            // dx started at 0.5: the gradient is added.
            let want = fd(0, i) + 0.5;
            assert!((got as f64 - want).abs() < 1e-3, "dx[{i}] {got} vs {want}");
        }
        for i in 0..d {
            assert!((dw[i] as f64 - fd(1, i)).abs() < 1e-3, "dw[{i}]");
            assert!((db[i] as f64 - fd(2, i)).abs() < 1e-3, "db[{i}]");
        }
    }

    #[test]
    fn column_sums_and_bias_rows() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut s = [9.0; 3];
        col_sum(&x, &mut s);
        assert_eq!(s, [5.0, 7.0, 9.0]);
        let mut out = [0.0; 6];
        rows_plus_bias(Some(&x), &[1.0, 0.0, -1.0], &mut out);
        assert_eq!(out, [2.0, 2.0, 2.0, 5.0, 5.0, 5.0]);
        rows_plus_bias(None, &[1.0, 0.0, -1.0], &mut out);
        assert_eq!(out, [1.0, 0.0, -1.0, 1.0, 0.0, -1.0]);
    }
}
