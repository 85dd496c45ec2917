//! Matrix products for hand-written passes, on the `gemm` crate: [`gemm`] (checked slices,
//! single-threaded), [`small_gemm`] (raw pointers, for blocks inside a larger buffer) and
//! [`gemm_parallelism`] for one large product over the rayon pool.
//!
//! Invariants: `dst = β·lhs·rhs` (`+ dst` when accumulating) with any row and column strides
//! of the inputs and a row-major `dst`; `dst` never aliases an input. [`gemm`] checks every
//! slice covers its matrix before the one unsafe call, so a bad size panics before any read.

use gemm::Parallelism;

/// Threads for one large gemm (the rayon pool's size).
pub(crate) fn gemm_parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst[m×n] (row stride n) (+)= lhs[m×k] · rhs[k×n]`, strides `(row, column)`,
/// single-threaded (the step parallelises over row groups).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    accumulate: bool,
) {
    // The asserts make the unsafe addressing below sound; callers size every buffer exactly.
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lrs + (k - 1) * lcs);
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rrs + (n - 1) * rcs);
    // SAFETY: every access lies within the slices (checked above); dst is distinct from both.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
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

/// `out (+)= x · W` for `x: [n, d_in]` and a dense weight stored `[d_in, d_out]`, or `[d_out,
/// d_in]` when `linear` (then `x · Wᵀ`). With `!linear` and the sizes swapped it reads the same
/// weight the other way round: `dx = dy · Wᵀ`, the layer's input gradient.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn dense_fwd(
    linear: bool,
    (n, d_in, d_out): (usize, usize, usize),
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    acc: bool,
) {
    let ws = if linear { (1, d_in) } else { (d_out, 1) };
    gemm(n, d_out, d_in, out, x, (d_in, 1), w, ws, acc);
}

/// `∂W` in the weight's own layout from the layer's input `x: [n, d_in]` and `dy: [n, d_out]`.
#[inline(always)]
pub(crate) fn dense_bwd_w(
    linear: bool,
    dims: (usize, usize, usize),
    gw: &mut [f32],
    x: &[f32],
    dy: &[f32],
) {
    let (n, d_in, d_out) = dims;
    if linear {
        gemm(d_out, d_in, n, gw, dy, (1, d_out), x, (d_in, 1), false);
    } else {
        gemm(d_in, d_out, n, gw, x, (1, d_in), dy, (d_out, 1), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lhs[m×k] · rhs[k×n]` with the given (row, column) strides, in f64.
    fn naive(
        (m, n, k): (usize, usize, usize),
        lhs: &[f32],
        (lrs, lcs): (usize, usize),
        rhs: &[f32],
        (rrs, rcs): (usize, usize),
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| lhs[i * lrs + p * lcs] as f64 * rhs[p * rrs + j * rcs] as f64)
                    .sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn strided_products_match_the_naive_product_and_accumulate() {
        let (m, n, k) = (5, 7, 3);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.21).cos()).collect();
        // lhs row-major, rhs read transposed from an [n×k] buffer.
        let want = naive((m, n, k), &lhs, (k, 1), &rhs, (1, k));
        let mut dst = vec![0f32; m * n];
        gemm(m, n, k, &mut dst, &lhs, (k, 1), &rhs, (1, k), false);
        for (a, b) in dst.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        gemm(m, n, k, &mut dst, &lhs, (k, 1), &rhs, (1, k), true);
        for (a, b) in dst.iter().zip(&want) {
            assert!((a - 2.0 * b).abs() < 1e-5, "{a} vs 2·{b}");
        }
        // small_gemm writes a block inside a wider buffer (row stride n + 2) scaled by beta.
        let mut wide = vec![9f32; m * (n + 2)];
        // SAFETY: lhs is [m×k] row-major, rhs [n×k] read transposed, wide is [m×(n+2)].
        unsafe {
            small_gemm(
                m,
                n,
                k,
                wide.as_mut_ptr(),
                n + 2,
                lhs.as_ptr(),
                (k, 1),
                rhs.as_ptr(),
                (1, k),
                0.5,
                false,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let (a, b) = (wide[i * (n + 2) + j], 0.5 * want[i * n + j]);
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            assert_eq!(&wide[i * (n + 2) + n..(i + 1) * (n + 2)], &[9.0, 9.0]);
        }
    }

    #[test]
    #[should_panic]
    fn a_slice_too_short_for_its_matrix_panics_before_reading() {
        let mut dst = vec![0f32; 4];
        gemm(
            2,
            2,
            2,
            &mut dst,
            &[1.0; 3],
            (2, 1),
            &[1.0; 4],
            (2, 1),
            false,
        );
    }

    #[test]
    fn dense_layers_in_both_weight_layouts_match_the_naive_products() {
        let (n, di, d_o) = (3, 4, 5);
        let x: Vec<f32> = (0..n * di).map(|i| (i as f32 * 0.3).sin()).collect();
        let w_conv: Vec<f32> = (0..di * d_o).map(|i| (i as f32 * 0.7).cos()).collect();
        // The same weight stored [out, in].
        let w_lin: Vec<f32> = (0..d_o * di)
            .map(|k| w_conv[(k % di) * d_o + k / di])
            .collect();
        let dy: Vec<f32> = (0..n * d_o).map(|i| (i as f32 * 0.11).sin()).collect();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        let y_want = naive((n, d_o, di), &x, (di, 1), &w_conv, (d_o, 1));
        let dx_want = naive((n, di, d_o), &dy, (d_o, 1), &w_conv, (1, d_o));
        let dw_want = naive((di, d_o, n), &x, (1, di), &dy, (d_o, 1));
        for (linear, w) in [(false, &w_conv), (true, &w_lin)] {
            let mut y = vec![0f32; n * d_o];
            dense_fwd(linear, (n, di, d_o), &mut y, &x, w, false);
            assert!(close(&y, &y_want), "forward, linear {linear}");
            let mut dx = vec![0f32; n * di];
            dense_fwd(!linear, (n, d_o, di), &mut dx, &dy, w, false);
            assert!(close(&dx, &dx_want), "input gradient, linear {linear}");
            let mut dw = vec![0f32; di * d_o];
            dense_bwd_w(linear, (n, di, d_o), &mut dw, &x, &dy);
            // In the weight's own layout.
            let dw_conv: Vec<f32> = if linear {
                (0..di * d_o)
                    .map(|k| dw[(k % d_o) * di + k / d_o])
                    .collect()
            } else {
                dw
            };
            assert!(
                close(&dw_conv, &dw_want),
                "weight gradient, linear {linear}"
            );
        }
    }
}
