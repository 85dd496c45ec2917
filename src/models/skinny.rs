//! Dense layers for a few rows on the CPU: the shape of a decode step.
//!
//! A decode step multiplies `B` rows (one per sequence in the batch, often 1) by every weight of
//! the model. candle's CPU matmul (the `gemm` crate) packs both operands for a cache-blocked
//! kernel on every call; for a handful of rows the packing and dispatch cost more than the
//! arithmetic, and one row against Pythia-70m's 512 × 50,304 LM head ran at 6 GFLOP/s, a
//! twentieth of what the same weight streams at (`docs/benchmarks.md`, "Decode kernels"). The
//! kernels here read the weight once, in its stored layout, with no packing:
//!
//! - [`x_wt`] for an `[out, in]` weight (`nn.Linear`, GPT-NeoX): each output is a dot product
//!   of an input row with a weight row; a tile of up to 4 input rows × 4 weight rows keeps 16
//!   AVX-512 accumulators, so each weight vector loaded feeds 4 FMAs.
//! - [`x_w`] for an `[in, out]` weight (GPT-2 `Conv1D`): each input element scales a weight row
//!   into the outputs; a tile of up to 4 input rows × 64 outputs keeps 16 accumulators.
//!
//! Work is split over the rayon pool by output columns, so every thread streams its own slice
//! of the weight. They need AVX-512F (checked at run time: [`available`]); elsewhere `ops`
//! keeps candle's matmul. The summation order differs from `gemm`'s, so results agree to
//! float rounding, not bit for bit (tested against candle below).

/// Whether [`super::ops::dense`] takes these kernels at inference for `rows` rows against an
/// `[out, in]` (`transposed`) or `[in, out]` weight. Measured against candle's matmul on
/// Pythia-70m and TinyMem shapes (`docs/benchmarks.md`, "Decode kernels"): [`x_wt`] is faster
/// up to 64 rows; [`x_w`] only for a few rows, where `gemm`'s packing is not amortised.
pub(crate) fn takes(rows: usize, transposed: bool) -> bool {
    rows <= if transposed { 64 } else { 4 }
}

/// Whether this CPU runs the kernels (AVX-512F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[m, n] = x[m, k] · wᵀ (+ b)` with `w: [n, k]` row-major. Panics when a slice is shorter
/// than its shape or when the CPU lacks AVX-512F (callers check [`available`]).
pub(crate) fn x_wt(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    b: Option<&[f32]>,
) -> Vec<f32> {
    check(x, m, k, w, n, b);
    let mut y = vec![0f32; m * n];
    #[cfg(target_arch = "x86_64")]
    {
        // Whole tiles of 8 weight rows per task chunk; a few chunks per thread for balance.
        let chunk = chunk_len(m, k, n, 8);
        let out = Shared(y.as_mut_ptr());
        // Above 16 rows, `x` is transposed once (rows padded to whole vectors) so that each
        // weight element is broadcast against 16 rows at a time, with no horizontal sums.
        let xt = (m > 16).then(|| transpose_padded(x, m, k));
        for_chunks(n, chunk, |n0, n1| {
            // SAFETY: AVX-512F was checked by `check`; every pointer stays inside its slice
            // (shapes checked above); this task writes only columns n0..n1 of `y`, disjoint
            // from every other task's.
            unsafe {
                match &xt {
                    Some(xt) => avx512::xt_wt_cols(
                        xt.as_ptr(),
                        m,
                        k,
                        w.as_ptr(),
                        b.map(|b| b.as_ptr()),
                        out.get(),
                        n,
                        n0,
                        n1,
                    ),
                    None => avx512::x_wt_cols(
                        x.as_ptr(),
                        m,
                        k,
                        w.as_ptr(),
                        b.map(|b| b.as_ptr()),
                        out.get(),
                        n,
                        n0,
                        n1,
                    ),
                }
            }
        });
    }
    y
}

/// `y[m, n] = x[m, k] · w (+ b)` with `w: [k, n]` row-major. Panics like [`x_wt`].
pub(crate) fn x_w(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    b: Option<&[f32]>,
) -> Vec<f32> {
    check(x, m, k, w, n, b);
    let mut y = vec![0f32; m * n];
    #[cfg(target_arch = "x86_64")]
    {
        let chunk = chunk_len(m, k, n, 64);
        let out = Shared(y.as_mut_ptr());
        for_chunks(n, chunk, |n0, n1| {
            // SAFETY: as in `x_wt`.
            unsafe {
                avx512::x_w_cols(
                    x.as_ptr(),
                    m,
                    k,
                    w.as_ptr(),
                    b.map(|b| b.as_ptr()),
                    out.get(),
                    n,
                    n0,
                    n1,
                )
            }
        });
    }
    y
}

/// `xᵀ` as `[k, m rounded up to 16]`, the padding rows zero.
fn transpose_padded(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mp = m.div_ceil(16) * 16;
    let mut xt = vec![0f32; k * mp];
    for (i, row) in x.chunks_exact(k).take(m).enumerate() {
        for (kk, &v) in row.iter().enumerate() {
            xt[kk * mp + i] = v;
        }
    }
    xt
}

/// [`x_wt`] on the calling thread into `y: [m, n]`, for callers that run many small products
/// in parallel themselves (attention heads).
pub(crate) fn x_wt_into(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32]) {
    check(x, m, k, w, n, None);
    assert!(y.len() >= m * n, "skinny: output shorter than {m} x {n}");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512F and the operand lengths are checked above; `y` is exclusively borrowed.
    unsafe {
        avx512::x_wt_cols(x.as_ptr(), m, k, w.as_ptr(), None, y.as_mut_ptr(), n, 0, n)
    }
}

/// [`x_w`] on the calling thread into `y: [m, n]`, as [`x_wt_into`].
pub(crate) fn x_w_into(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32]) {
    check(x, m, k, w, n, None);
    assert!(y.len() >= m * n, "skinny: output shorter than {m} x {n}");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `x_wt_into`.
    unsafe {
        avx512::x_w_cols(x.as_ptr(), m, k, w.as_ptr(), None, y.as_mut_ptr(), n, 0, n)
    }
}

fn check(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>) {
    assert!(available(), "skinny kernels need AVX-512F");
    assert!(
        x.len() >= m * k && w.len() >= k * n,
        "skinny: operands shorter than their shapes"
    );
    assert!(
        b.is_none_or(|b| b.len() >= n),
        "skinny: bias shorter than {n}"
    );
}

/// Multiply-adds below which a task is not worth handing to another thread (a rayon hand-off
/// costs a few microseconds; this is about one microsecond of work).
const MIN_TASK_WORK: usize = 1 << 17;

/// Output columns per parallel task: about four tasks per thread, a multiple of `tile`, and
/// at least [`MIN_TASK_WORK`] multiply-adds each, so that small layers stay on one thread.
fn chunk_len(m: usize, k: usize, n: usize, tile: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    let min_cols = MIN_TASK_WORK.div_ceil((m * k).max(1));
    n.div_ceil(tasks).max(min_cols).div_ceil(tile) * tile
}

/// Runs `f(n0, n1)` over `0..n` in chunks of `chunk`, in parallel when there are several.
fn for_chunks(n: usize, chunk: usize, f: impl Fn(usize, usize) + Sync) {
    use rayon::prelude::*;
    let count = n.div_ceil(chunk);
    if count <= 1 {
        f(0, n);
    } else {
        (0..count)
            .into_par_iter()
            .for_each(|c| f(c * chunk, ((c + 1) * chunk).min(n)));
    }
}

/// The output pointer the tasks share; each writes its own columns.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks write disjoint column ranges (stated at each use).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Lanes of one `__m512`.
    const L: usize = 16;

    /// Mask of the first `n` (≤ 16) lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= L {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Columns `n0..n1` of `y = x · wᵀ (+ b)`, `x: [m, k]`, `w: [n, k]`, `y: [m, n]`.
    ///
    /// # Safety
    /// AVX-512F present; pointers address whole matrices of the given shapes; no other thread
    /// writes columns `n0..n1` of `y`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn x_wt_cols(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        n: usize,
        n0: usize,
        n1: usize,
    ) {
        // One row streams the weight with 8 accumulators; more rows share each weight load.
        if m == 1 {
            dot_cols::<8>(x, m, k, w, b, y, n, n0, n1);
        } else {
            dot_cols::<4>(x, m, k, w, b, y, n, n0, n1);
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_cols<const C: usize>(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        n: usize,
        n0: usize,
        n1: usize,
    ) {
        let mut j = n0;
        while j + C <= n1 {
            dot_rows::<C>(x, m, k, w.add(j * k), b.map(|b| b.add(j)), y.add(j), n);
            j += C;
        }
        while j < n1 {
            dot_rows::<1>(x, m, k, w.add(j * k), b.map(|b| b.add(j)), y.add(j), n);
            j += 1;
        }
    }

    /// `C` weight rows against every input row, 4 input rows at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_rows<const C: usize>(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut i = 0;
        while i + 4 <= m {
            dot_tile::<4, C>(x.add(i * k), k, w, b, y.add(i * ldy), ldy);
            i += 4;
        }
        match m - i {
            3 => dot_tile::<3, C>(x.add(i * k), k, w, b, y.add(i * ldy), ldy),
            2 => dot_tile::<2, C>(x.add(i * k), k, w, b, y.add(i * ldy), ldy),
            1 => dot_tile::<1, C>(x.add(i * k), k, w, b, y.add(i * ldy), ldy),
            _ => {}
        }
    }

    /// `y[r][c] = Σ_k x[r][k] · w[c][k] (+ b[c])` for an `R × C` tile; rows of `x` and `w` are
    /// `k` long and contiguous, rows of `y` are `ldy` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot_tile<const R: usize, const C: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk < k {
            let mask = lanes(k - kk);
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, w.add(c * k + kk));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + kk));
                for (a, wc) in row.iter_mut().zip(wv) {
                    *a = _mm512_fmadd_ps(xv, wc, *a);
                }
            }
            kk += L;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                let bias = b.map_or(0.0, |b| *b.add(c));
                *y.add(r * ldy + c) = _mm512_reduce_add_ps(*a) + bias;
            }
        }
    }

    /// [`x_wt_cols`] from `xt = xᵀ: [k, mp]` (`mp` = `m` rounded up to 16, padding zero), for
    /// 17 to 64 rows: `V = mp / 16` row vectors × `C` weight rows per tile.
    ///
    /// # Safety
    /// As [`x_wt_cols`]; `m ≤ 64`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn xt_wt_cols(
        xt: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        n: usize,
        n0: usize,
        n1: usize,
    ) {
        match m.div_ceil(L) {
            1 => bcast_cols::<1, 16>(xt, m, k, w, b, y, n, n0, n1),
            2 => bcast_cols::<2, 8>(xt, m, k, w, b, y, n, n0, n1),
            3 => bcast_cols::<3, 6>(xt, m, k, w, b, y, n, n0, n1),
            4 => bcast_cols::<4, 5>(xt, m, k, w, b, y, n, n0, n1),
            _ => unreachable!("xt_wt_cols takes at most 64 rows"),
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn bcast_cols<const V: usize, const C: usize>(
        xt: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        n: usize,
        n0: usize,
        n1: usize,
    ) {
        let mut j = n0;
        while j + C <= n1 {
            bcast_tile::<V, C>(xt, m, k, w.add(j * k), b.map(|b| b.add(j)), y.add(j), n);
            j += C;
        }
        while j < n1 {
            bcast_tile::<V, 1>(xt, m, k, w.add(j * k), b.map(|b| b.add(j)), y.add(j), n);
            j += 1;
        }
    }

    /// `y[i][c] = Σ_k xt[k][i] · w[c][k] (+ b[c])` for the `m` rows (`V` vectors of `xt`'s
    /// `V · 16`-wide rows) and `C` weight rows `k` long; rows of `y` are `ldy` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn bcast_tile<const V: usize, const C: usize>(
        xt: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        ldy: usize,
    ) {
        let mp = V * L;
        let mut acc = [[_mm512_setzero_ps(); V]; C];
        for kk in 0..k {
            let mut xv = [_mm512_setzero_ps(); V];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(xt.add(kk * mp + v * L));
            }
            for (c, col) in acc.iter_mut().enumerate() {
                let wb = _mm512_set1_ps(*w.add(c * k + kk));
                for (a, x) in col.iter_mut().zip(xv) {
                    *a = _mm512_fmadd_ps(x, wb, *a);
                }
            }
        }
        let mut lanes_out = [0f32; L];
        for (c, col) in acc.iter().enumerate() {
            let bias = b.map_or(0.0, |b| *b.add(c));
            for (v, a) in col.iter().enumerate() {
                _mm512_storeu_ps(lanes_out.as_mut_ptr(), *a);
                for (lane, &val) in lanes_out.iter().enumerate().take(m.saturating_sub(v * L)) {
                    *y.add((v * L + lane) * ldy + c) = val + bias;
                }
            }
        }
    }

    /// Columns `n0..n1` of `y = x · w (+ b)`, `x: [m, k]`, `w: [k, n]`, `y: [m, n]`.
    ///
    /// # Safety
    /// As [`x_wt_cols`].
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn x_w_cols(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        b: Option<*const f32>,
        y: *mut f32,
        n: usize,
        n0: usize,
        n1: usize,
    ) {
        const C: usize = 4;
        let mut j = n0;
        while j < n1 {
            let width = (n1 - j).min(C * L);
            let mut i = 0;
            while i + 4 <= m {
                axpy_tile::<4, C>(
                    x.add(i * k),
                    k,
                    w.add(j),
                    n,
                    width,
                    b.map(|b| b.add(j)),
                    y.add(i * n + j),
                );
                i += 4;
            }
            let (xr, yr) = (x.add(i * k), y.add(i * n + j));
            let (wj, bj) = (w.add(j), b.map(|b| b.add(j)));
            match m - i {
                3 => axpy_tile::<3, C>(xr, k, wj, n, width, bj, yr),
                2 => axpy_tile::<2, C>(xr, k, wj, n, width, bj, yr),
                1 => axpy_tile::<1, C>(xr, k, wj, n, width, bj, yr),
                _ => {}
            }
            j += width;
        }
    }

    /// `y[r][0..width] = Σ_k x[r][k] · w[k][0..width] (+ b)` for `R` rows and up to `C · 16`
    /// columns; rows of `w` and `y` are `ld` apart, rows of `x` are `k` long.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn axpy_tile<const R: usize, const C: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        ld: usize,
        width: usize,
        b: Option<*const f32>,
        y: *mut f32,
    ) {
        let mut masks = [0 as __mmask16; C];
        for (c, mask) in masks.iter_mut().enumerate() {
            *mask = lanes(width.saturating_sub(c * L));
        }
        let mut init = [_mm512_setzero_ps(); C];
        if let Some(b) = b {
            for (c, v) in init.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[c], b.add(c * L));
            }
        }
        let mut acc = [init; R];
        for kk in 0..k {
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[c], w.add(kk * ld + c * L));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*x.add(r * k + kk));
                for (a, wc) in row.iter_mut().zip(wv) {
                    *a = _mm512_fmadd_ps(xb, wc, *a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(y.add(r * ld + c * L), masks[c], *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn reference(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        b: Option<&[f32]>,
        wt: bool,
    ) -> Vec<f32> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for kk in 0..k {
                    let wv = if wt { w[j * k + kk] } else { w[kk * n + j] };
                    s += x[i * k + kk] as f64 * wv as f64;
                }
                y[i * n + j] = s;
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn both_layouts_match_a_plain_product_on_every_tile_shape() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, so the kernels never run here");
            return;
        }
        // Rows 1..=9 cover every row-tile remainder; k and n cover full vectors, masked tails,
        // column tails and several parallel chunks.
        for m in 1..=9 {
            for &(k, n) in &[(16, 8), (37, 13), (128, 384), (100, 1100), (512, 2100)] {
                let x = rand(m * k, 1 + m as u64);
                let w = rand(k * n, 2);
                let b = rand(n, 3);
                for bias in [None, Some(b.as_slice())] {
                    for wt in [true, false] {
                        let got = if wt {
                            x_wt(&x, m, k, &w, n, bias)
                        } else {
                            x_w(&x, m, k, &w, n, bias)
                        };
                        let want = reference(&x, m, k, &w, n, bias, wt);
                        let err = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            err < 1e-4,
                            "m {m} k {k} n {n} bias {} wt {wt}: max error {err}",
                            bias.is_some()
                        );
                    }
                }
            }
        }
    }
}
