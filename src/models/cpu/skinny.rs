//! Dense layers for a few rows on the CPU, the shape of a decode step: `y = x · W (+ b)` reading
//! the weight once, in its stored layout, with no packing.
//!
//! Invariants:
//! - Both weight layouts: `[out, in]` (`transposed`: `nn.Linear`, GPT-NeoX) and `[in, out]`
//!   (GPT-2's `Conv1D`). Results equal a plain product to float rounding, not bit for bit (the
//!   summation order differs; tested below against an f64 product on every tile shape, with and
//!   without a bias).
//! - They run only where [`available`] says so (AVX-512F, checked at run time); `ops::dense`
//!   takes them at inference where [`takes`] says so and keeps candle's matmul everywhere else,
//!   so no CPU lacks a path.
//! - Operands shorter than their shapes, or a CPU without AVX-512F, panic before any read:
//!   callers check [`available`] and their shapes first.
//! - [`dense`] splits the work over the rayon pool by output columns only, in tasks of at least
//!   2¹⁷ multiply-adds (small layers stay on one thread): every thread streams its own slice of
//!   the weight, and no two threads write the same output. [`dense_into`] runs on the calling
//!   thread. Nothing is kept between calls.
//!
//! Tiles: up to 4 input rows × 4 weight rows of dot products for `[out, in]` weights (one row:
//! 1 × 8), broadcast tiles over the transposed input from 17 to 64 rows, and 4 rows × 64 outputs
//! for `[in, out]` weights. What they gained is in `docs/benchmarks.md` ("Inference kernels",
//! "Decode steps").

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

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m512 as F32x16, __mmask16 as Mask16};

/// An element type the kernels read weights in: `f32`, or `bf16`/`f16` (a server holding its
/// weights in half precision, `lethe serve --dtype`), widened to f32 as each vector is loaded,
/// so inputs, sums and outputs stay f32.
pub(crate) trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// The first `mask.count_ones()` elements at `p` as f32 lanes, the rest zero; `mask` is a
    /// prefix mask (`lanes(n)`), and only those elements are read.
    ///
    /// # Safety
    /// Inlined into the kernels (AVX-512F); `p` must address that many elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(mask: Mask16, p: *const Self) -> F32x16;
    /// The element at `p` as f32, inside the kernels.
    ///
    /// # Safety
    /// As [`WeightElem::load`], for one element.
    #[inline(always)]
    unsafe fn one(p: *const Self) -> f32 {
        (*p).to_f32()
    }
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(mask: Mask16, p: *const Self) -> F32x16 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p)
    }
}

/// 16 half-precision elements from `p`: one unaligned 256-bit load when the mask is full,
/// else through a zeroed buffer (masked 16-bit loads need AVX-512BW, which the kernels do not
/// assume; tails are at most one vector per row).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_halves(mask: Mask16, p: *const u16) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    if mask == 0xffff {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        let mut tmp = [0u16; 16];
        std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), mask.count_ones() as usize);
        _mm256_loadu_si256(tmp.as_ptr() as *const __m256i)
    }
}

impl WeightElem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: widening is exact.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(mask: Mask16, p: *const Self) -> F32x16 {
        use std::arch::x86_64::*;
        let h = load_halves(mask, p as *const u16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

impl WeightElem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(mask: Mask16, p: *const Self) -> F32x16 {
        std::arch::x86_64::_mm512_cvtph_ps(load_halves(mask, p as *const u16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn one(p: *const Self) -> f32 {
        // F16C (every AVX-512F CPU has it) instead of `half`'s per-call feature check.
        use std::arch::x86_64::*;
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((*p).to_bits() as i32)))
    }
}

/// `y[m, n] = x[m, k] · W (+ b)` with `W` stored `[n, k]` row-major when `transposed`
/// (`nn.Linear`), `[k, n]` otherwise (GPT-2 `Conv1D`), split over the rayon pool by output
/// columns. Panics when a slice is shorter than its shape or when the CPU lacks AVX-512F
/// (callers check [`available`]).
pub(crate) fn dense<W: WeightElem>(
    x: &[f32],
    (m, k): (usize, usize),
    w: &[W],
    n: usize,
    b: Option<&[f32]>,
    transposed: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    run(x, (m, k), w, (n, b), transposed, &mut y, true);
    y
}

/// [`dense`] on the calling thread into `y: [m, n]`, for callers that run many small products
/// in parallel themselves (attention heads, a decode step's row groups); any number of rows.
pub(crate) fn dense_into<W: WeightElem>(
    x: &[f32],
    (m, k): (usize, usize),
    w: &[W],
    (n, b): (usize, Option<&[f32]>),
    transposed: bool,
    y: &mut [f32],
) {
    run(x, (m, k), w, (n, b), transposed, y, false);
}

fn run<W: WeightElem>(
    x: &[f32],
    (m, k): (usize, usize),
    w: &[W],
    (n, b): (usize, Option<&[f32]>),
    transposed: bool,
    y: &mut [f32],
    parallel: bool,
) {
    assert!(available(), "skinny kernels need AVX-512F");
    assert!(
        x.len() >= m * k && w.len() >= k * n,
        "skinny: operands shorter than their shapes"
    );
    assert!(
        b.is_none_or(|b| b.len() >= n),
        "skinny: bias shorter than {n}"
    );
    // From 17 to 64 rows against an `[n, k]` weight, `x` is transposed once (rows padded to
    // whole vectors) so that each weight element is broadcast against 16 rows at a time, with
    // no horizontal sums.
    let xt = (transposed && (17..=64).contains(&m)).then(|| transpose_padded(x, m, k));
    let p = Product::new(xt.as_deref().unwrap_or(x), m, k, w, n, b, y);
    #[cfg(target_arch = "x86_64")]
    {
        // Kernel, and the output columns its tiles cover (task chunks are multiples of it).
        let (kernel, tile): (Kernel<W>, usize) = match (transposed, &xt) {
            (true, Some(_)) => (avx512::xt_wt_cols, avx512::bcast_width(m)),
            (true, None) => (avx512::x_wt_cols, 8),
            (false, _) => (avx512::x_w_cols, 64),
        };
        let chunk = if parallel {
            chunk_len(m, k, n, tile)
        } else {
            n.max(1)
        };
        // SAFETY: AVX-512F and the operands' lengths are checked above; each task writes only
        // its own columns of `y`, which `Product::new` checked to hold m × n.
        for_chunks(n, chunk, |n0, n1| unsafe { kernel(p, n0, n1) });
    }
}

#[cfg(target_arch = "x86_64")]
/// A kernel over output columns `n0..n1` of a product.
type Kernel<W> = unsafe fn(Product<W>, usize, usize);

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
#[cfg(target_arch = "x86_64")]
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

/// One product's operands as the kernels read them: `y[m, n]` from `x` (`[m, k]`, or for the
/// broadcast kernel `xᵀ` padded to `[k, 16·⌈m/16⌉]`), the weight `w` (`[n, k]` or `[k, n]`) and
/// an optional bias `b[n]`. Parallel tasks share it and write disjoint columns of `y`.
struct Product<W> {
    x: *const f32,
    m: usize,
    k: usize,
    w: *const W,
    b: Option<*const f32>,
    y: *mut f32,
    n: usize,
}

// SAFETY: the pointers outlive every task (the callers above join the tasks before returning),
// and tasks write disjoint column ranges of `y`.
unsafe impl<W> Send for Product<W> {}
unsafe impl<W> Sync for Product<W> {}

// Copy whatever `W` is (the derive would ask `W: Copy`): the struct holds only pointers.
impl<W> Clone for Product<W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for Product<W> {}

impl<W> Product<W> {
    fn new(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[W],
        n: usize,
        b: Option<&[f32]>,
        y: &mut [f32],
    ) -> Self {
        assert!(y.len() >= m * n, "skinny: output shorter than {m} x {n}");
        Self {
            x: x.as_ptr(),
            m,
            k,
            w: w.as_ptr(),
            b: b.map(<[f32]>::as_ptr),
            y: y.as_mut_ptr(),
            n,
        }
    }

    /// The same product over weight rows (or columns) from `j` on, and rows of `y` from `i` on,
    /// with `x` advanced by `dx` elements.
    fn at(self, dx: usize, i: usize, j: usize, w_step: usize) -> Self {
        // Wrapping offsets: only the kernels dereference them, inside the shapes.
        Self {
            x: self.x.wrapping_add(dx),
            w: self.w.wrapping_add(j * w_step),
            b: self.b.map(|b| b.wrapping_add(j)),
            y: self.y.wrapping_add(i * self.n + j),
            ..self
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The kernels. Every function is `unsafe`: it needs AVX-512F, and `p`'s pointers must
    //! address whole matrices of its shapes, with no other thread writing the columns it writes.
    use std::arch::x86_64::*;

    use super::{Product, WeightElem};

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

    /// Columns `n0..n1` of `y = x · wᵀ (+ b)`, `w: [n, k]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn x_wt_cols<W: WeightElem>(p: Product<W>, n0: usize, n1: usize) {
        // One row streams the weight with 8 accumulators; more rows share each weight load.
        if p.m == 1 {
            dot_cols::<W, 8>(p, n0, n1);
        } else {
            dot_cols::<W, 4>(p, n0, n1);
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dot_cols<W: WeightElem, const C: usize>(p: Product<W>, n0: usize, n1: usize) {
        let mut j = n0;
        while j + C <= n1 {
            dot_rows::<W, C>(p.at(0, 0, j, p.k));
            j += C;
        }
        while j < n1 {
            dot_rows::<W, 1>(p.at(0, 0, j, p.k));
            j += 1;
        }
    }

    /// `C` weight rows against every input row, 4 input rows at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_rows<W: WeightElem, const C: usize>(p: Product<W>) {
        let mut i = 0;
        while i + 4 <= p.m {
            dot_tile::<W, 4, C>(p.at(i * p.k, i, 0, 0));
            i += 4;
        }
        let rest = p.at(i * p.k, i, 0, 0);
        match p.m - i {
            3 => dot_tile::<W, 3, C>(rest),
            2 => dot_tile::<W, 2, C>(rest),
            1 => dot_tile::<W, 1, C>(rest),
            _ => {}
        }
    }

    /// `y[r][c] = Σ_k x[r][k] · w[c][k] (+ b[c])` for an `R × C` tile; rows of `x` and `w` are
    /// `k` long and contiguous, rows of `y` are `n` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn dot_tile<W: WeightElem, const R: usize, const C: usize>(p: Product<W>) {
        let (x, k, w) = (p.x, p.k, p.w);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk < k {
            let mask = lanes(k - kk);
            // As in `bcast_tile`: 4 rows against the LM head went from 24 to 49 GFLOP/s
            // (single thread), one row (bound by memory bandwidth) by a few per cent.
            for c in 0..C {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c * k + kk + 128) as *const i8);
            }
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = W::load(mask, w.add(c * k + kk));
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
                let bias = p.b.map_or(0.0, |b| *b.add(c));
                *p.y.add(r * p.n + c) = _mm512_reduce_add_ps(*a) + bias;
            }
        }
    }

    /// [`x_wt_cols`] with `p.x = xᵀ: [k, mp]` (`mp` = `m` rounded up to 16, padding zero), for
    /// 17 to 64 rows: `V = mp / 16` row vectors × `C` weight rows per tile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn xt_wt_cols<W: WeightElem>(p: Product<W>, n0: usize, n1: usize) {
        match p.m.div_ceil(L) {
            1 => bcast_cols::<W, 1, { bcast_width(16) }>(p, n0, n1),
            2 => bcast_cols::<W, 2, { bcast_width(32) }>(p, n0, n1),
            3 => bcast_cols::<W, 3, { bcast_width(48) }>(p, n0, n1),
            4 => bcast_cols::<W, 4, { bcast_width(64) }>(p, n0, n1),
            _ => unreachable!("xt_wt_cols takes at most 64 rows"),
        }
    }

    /// Weight rows per broadcast tile for `m` rows: 27–28 accumulators for 2–4 row vectors
    /// (the register file is 32). Measured single-threaded against the Pythia-70m shapes at
    /// 32 rows (LM head, QKV, MLP in and out): 14 rows gave 108–134 GFLOP/s where 8 gave
    /// 91–107; 9 rows at 48 rows and 6 at 64 gained 5–12 % over 6 and 5. The code LLVM emits
    /// for these tiles is sensitive to what else is instantiated next to them (one extra tail
    /// tile width halved the rate of the main one by spilling accumulators), so the column
    /// chunks given to tasks are multiples of this width and tails are single columns.
    pub(super) const fn bcast_width(m: usize) -> usize {
        match m.div_ceil(L) {
            0 | 1 => 16,
            2 => 14,
            3 => 9,
            _ => 6,
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn bcast_cols<W: WeightElem, const V: usize, const C: usize>(
        p: Product<W>,
        n0: usize,
        n1: usize,
    ) {
        let mut j = n0;
        while j + C <= n1 {
            bcast_tile::<W, V, C>(p.at(0, 0, j, p.k));
            j += C;
        }
        while j < n1 {
            bcast_tile::<W, V, 1>(p.at(0, 0, j, p.k));
            j += 1;
        }
    }

    /// `y[i][c] = Σ_k xt[k][i] · w[c][k] (+ b[c])` for the `m` rows (`V` vectors of `xt`'s
    /// `V · 16`-wide rows) and `C` weight rows `k` long; rows of `y` are `n` apart.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn bcast_tile<W: WeightElem, const V: usize, const C: usize>(p: Product<W>) {
        let (xt, k, w) = (p.x, p.k, p.w);
        let mp = V * L;
        let mut acc = [[_mm512_setzero_ps(); V]; C];
        for kk in 0..k {
            // Software prefetch 512 bytes ahead in each weight row, once per cache line: the
            // hardware prefetchers alone left this loop waiting on L3 (single-thread probe on
            // the 32 × 512 × 50,304 LM head: 81 GFLOP/s without, 97–107 with).
            if kk % L == 0 {
                for c in 0..C {
                    _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c * k + kk + 128) as *const i8);
                }
            }
            let mut xv = [_mm512_setzero_ps(); V];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(xt.add(kk * mp + v * L));
            }
            outer_fma(&mut acc, |c| W::one(w.add(c * k + kk)), xv);
        }
        let mut lanes_out = [0f32; L];
        for (c, col) in acc.iter().enumerate() {
            let bias = p.b.map_or(0.0, |b| *b.add(c));
            for (v, a) in col.iter().enumerate() {
                _mm512_storeu_ps(lanes_out.as_mut_ptr(), *a);
                for (lane, &val) in lanes_out.iter().enumerate().take(p.m.saturating_sub(v * L)) {
                    *p.y.add((v * L + lane) * p.n + c) = val + bias;
                }
            }
        }
    }

    /// `acc[i][j] += s(i) · v[j]`, each `s(i)` broadcast: one step of an outer-product tile
    /// (the broadcast and axpy tiles; they differ in which operand is the vector).
    #[inline(always)]
    unsafe fn outer_fma<const I: usize, const J: usize>(
        acc: &mut [[__m512; J]; I],
        s: impl Fn(usize) -> f32,
        v: [__m512; J],
    ) {
        for (i, row) in acc.iter_mut().enumerate() {
            let si = _mm512_set1_ps(s(i));
            for (a, vj) in row.iter_mut().zip(v) {
                *a = _mm512_fmadd_ps(si, vj, *a);
            }
        }
    }

    /// Columns `n0..n1` of `y = x · w (+ b)`, `w: [k, n]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn x_w_cols<W: WeightElem>(p: Product<W>, n0: usize, n1: usize) {
        const C: usize = 4;
        let mut j = n0;
        while j < n1 {
            let width = (n1 - j).min(C * L);
            let mut i = 0;
            while i + 4 <= p.m {
                axpy_tile::<W, 4, C>(p.at(i * p.k, i, j, 1), width);
                i += 4;
            }
            let rest = p.at(i * p.k, i, j, 1);
            match p.m - i {
                3 => axpy_tile::<W, 3, C>(rest, width),
                2 => axpy_tile::<W, 2, C>(rest, width),
                1 => axpy_tile::<W, 1, C>(rest, width),
                _ => {}
            }
            j += width;
        }
    }

    /// `y[r][0..width] = Σ_k x[r][k] · w[k][0..width] (+ b)` for `R` rows and up to `C · 16`
    /// columns; rows of `w` and `y` are `n` apart, rows of `x` are `k` long.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn axpy_tile<W: WeightElem, const R: usize, const C: usize>(
        p: Product<W>,
        width: usize,
    ) {
        let (x, k, w, ld) = (p.x, p.k, p.w, p.n);
        let mut masks = [0 as __mmask16; C];
        for (c, mask) in masks.iter_mut().enumerate() {
            *mask = lanes(width.saturating_sub(c * L));
        }
        let mut init = [_mm512_setzero_ps(); C];
        if let Some(b) = p.b {
            for (c, v) in init.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(masks[c], b.add(c * L));
            }
        }
        let mut acc = [init; R];
        for kk in 0..k {
            let mut wv = [_mm512_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = W::load(masks[c], w.add(kk * ld + c * L));
            }
            outer_fma(&mut acc, |r| *x.add(r * k + kk), wv);
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(p.y.add(r * ld + c * L), masks[c], *a);
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

    /// Every element within 1e-4 (a NaN, e.g. an element never written, fails).
    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() < 1e-4, "{what}: element {i} is {a}, want {b}");
        }
    }

    #[test]
    fn both_layouts_match_a_plain_product_on_every_tile_shape() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, so the kernels never run here");
            return;
        }
        // Rows 1..=9 cover every row-tile remainder of the dot and axpy tiles, 16..=64 the
        // broadcast tiles (one to four vectors, partial ones), 70 the dot tiles beyond them
        // (`dense_into` only); k and n cover full vectors, masked tails, column tails and
        // several parallel chunks.
        let small: &[(usize, usize)] = &[(16, 8), (37, 13), (128, 384), (100, 1100), (512, 2100)];
        let large: &[(usize, usize)] = &[(37, 13), (128, 384), (100, 1100)];
        for m in (1..=9).chain([16, 17, 31, 32, 33, 48, 64, 70]) {
            for &(k, n) in if m <= 9 { small } else { large } {
                let x = rand(m * k, 1 + m as u64);
                let w = rand(k * n, 2);
                let b = rand(n, 3);
                for bias in [None, Some(b.as_slice())] {
                    for wt in [true, false] {
                        let want = reference(&x, m, k, &w, n, bias, wt);
                        let mut got = vec![f32::NAN; m * n];
                        dense_into(&x, (m, k), &w, (n, bias), wt, &mut got);
                        let what = format!(
                            "dense_into m {m} k {k} n {n} bias {} wt {wt}",
                            bias.is_some()
                        );
                        assert_close(&got, &want, &what);
                        if m <= 64 {
                            got = dense(&x, (m, k), &w, n, bias, wt);
                            let what =
                                format!("dense m {m} k {k} n {n} bias {} wt {wt}", bias.is_some());
                            assert_close(&got, &want, &what);
                        }
                    }
                }
            }
        }
    }

    /// Weights held in bf16 and f16 give the product of their widened values, on every tile
    /// shape of both layouts (the full-vector loads and the buffered tails alike).
    #[test]
    fn half_precision_weights_match_the_product_of_their_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F, so the kernels never run here");
            return;
        }
        for m in [1, 2, 3, 4, 5, 9, 16, 17, 33, 64] {
            for (k, n) in [(37, 13), (128, 70), (100, 300)] {
                let x = rand(m * k, 7 + m as u64);
                let w = rand(k * n, 8);
                let b = rand(n, 9);
                let bf: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let fh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
                let widened = [
                    bf.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(),
                    fh.iter().map(|v| v.to_f32()).collect(),
                ];
                for wt in [true, false] {
                    for (i, values) in widened.iter().enumerate() {
                        let want = reference(&x, m, k, values, n, Some(&b), wt);
                        let got = if i == 0 {
                            dense(&x, (m, k), &bf, n, Some(&b), wt)
                        } else {
                            dense(&x, (m, k), &fh, n, Some(&b), wt)
                        };
                        let what = format!("{} m {m} k {k} n {n} wt {wt}", ["bf16", "f16"][i]);
                        assert_close(&got, &want, &what);
                    }
                }
            }
        }
    }

    /// Not a check: the single-threaded kernel rates quoted in this file and in
    /// `docs/benchmarks.md` ("Decode steps"), best of 3 repetitions of `dense_into` on the
    /// Pythia-70m shapes (the weight read from L3 for the LM head, from L2 for the others).
    /// Run by hand on an idle machine:
    /// `cargo test --release --lib models::skinny::tests::single_thread_rates -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn single_thread_rates() {
        if !available() {
            return;
        }
        let shapes = [
            (1, 512, 50_304),
            (4, 512, 50_304),
            (32, 512, 50_304),
            (32, 512, 1_536),
            (32, 512, 2_048),
            (32, 2_048, 512),
            (48, 512, 1_536),
            (64, 512, 50_304),
        ];
        for (m, k, n) in shapes {
            let (x, w) = (rand(m * k, 1), rand(k * n, 2));
            let mut y = vec![0f32; m * n];
            let reps = (4_000_000_000 / (m * k * n)).max(5);
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    dense_into(&x, (m, k), &w, (n, None), true, &mut y);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (m * k * n * reps) as f64 / best / 1e9;
            println!("{m} x {k} x {n} ([n, k] weight): {gflops:.1} GFLOP/s on one thread");
        }
    }
}
