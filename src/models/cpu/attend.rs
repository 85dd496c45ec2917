//! Scaled dot-product attention at inference on the CPU, reading the KV cache in place: what
//! `ops::attention` runs for untracked f32 CPU tensors, and how both decode steps attend
//! ([`CachedKv`]).
//!
//! Invariants:
//! - [`attention`] computes `softmax(q kᵀ / sqrt(D) + mask) v` as the composed candle path does,
//!   to float rounding (tested below against `ops::attention` with the fused kernels off, on a
//!   strided cache view, with per-row and shared masks); a query row whose keys are all masked
//!   gives NaN there too.
//! - Keys and values are read where they lie (any strides, a contiguous last dimension); a
//!   layout it cannot read returns `None` and the caller composes candle ops. q, k, v or a mask
//!   whose shapes do not fit are errors.
//! - Each (sequence, head) is computed on its own: on AVX-512F CPUs as two small products on
//!   [`skinny`]'s tiles (scores, then weighted values), elsewhere row by row; both branches are
//!   tested against an f64 softmax. Masked keys get weight exactly 0.
//! - [`attention`] runs the (sequence, head) pairs over the rayon pool above 2¹⁵ multiply-adds
//!   and on the calling thread below; [`CachedKv::attend`] always on the calling thread. Nothing
//!   is kept between calls.
//!
//! What it gained over composed candle ops is in `docs/benchmarks.md` ("Inference kernels").

use candle_core::{bail, Layout, Result, Tensor};
use rayon::prelude::*;

use super::{skinny, storage, vmath};
use crate::models::KvCache;

/// Multiply-adds below which the heads run on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 15;

/// `softmax(q kᵀ / sqrt(D) + mask) v` for `q: [B, H, T, D]`, `k`, `v: [B, H, S, D]` (any strides
/// with a contiguous last dimension) and an additive `mask: [1 | B, 1, T, S]`: `[B, H, T, D]`.
/// `None` when the layouts are not ones this kernel reads (the caller composes candle ops then).
/// A query row whose keys are all masked gives NaN, as the composed path does.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (b, h, t, d) = q.dims4()?;
    let s = k.dim(2)?;
    if k.dims() != [b, h, s, d] || v.dims() != [b, h, s, d] {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let mask_rows = match mask {
        None => 0,
        Some(m) => match m.dims() {
            &[mb, 1, mt, ms] if (mb == 1 || mb == b) && mt == t && ms == s => mb,
            other => bail!("attention: mask {other:?} does not fit [1 | {b}, 1, {t}, {s}]"),
        },
    };
    let q = q.contiguous()?;
    let mask = mask.map(Tensor::contiguous).transpose()?;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * h * t * d];
    let done = storage::with_f32(&q, |qs| {
        storage::with_f32_storage(k, |ks, kl| {
            storage::with_f32_storage(v, |vs, vl| {
                let (kst, vst) = (kl.stride(), vl.stride());
                if kst[3] != 1 || vst[3] != 1 {
                    return Ok(false);
                }
                let (kv, vv) = (Strided::of(kl), Strided::of(vl));
                let mut run = |ms: Option<&[f32]>| {
                    let job = Job {
                        qs,
                        ks,
                        vs,
                        kv,
                        vv,
                        ms,
                        mask_rows,
                        h,
                        t,
                        s,
                        d,
                        scale,
                    };
                    let per_head = |(bh, o): (usize, &mut [f32])| job.head(bh, o);
                    if b * h * t * s * d < MIN_PARALLEL_WORK {
                        out.chunks_mut(t * d).enumerate().for_each(per_head);
                    } else {
                        out.par_chunks_mut(t * d).enumerate().for_each(per_head);
                    }
                };
                match &mask {
                    Some(m) => storage::with_f32(m, |ms| {
                        run(Some(ms));
                        Ok(())
                    })?,
                    None => run(None),
                }
                Ok(true)
            })
        })
    })?;
    if !done {
        return Ok(None);
    }
    Tensor::from_vec(out, (b, h, t, d), q.device()).map(Some)
}

/// Where row `(b, h, j)` of a `[B, H, S, D]` view starts in its storage.
#[derive(Clone, Copy)]
struct Strided {
    off: usize,
    sb: usize,
    sh: usize,
    ss: usize,
}

impl Strided {
    /// The view of a rank-4 layout.
    fn of(l: &Layout) -> Self {
        let st = l.stride();
        Self {
            off: l.start_offset(),
            sb: st[0],
            sh: st[1],
            ss: st[2],
        }
    }

    fn row_start(&self, b: usize, h: usize) -> usize {
        self.off + b * self.sb + h * self.sh
    }

    fn row<'a>(&self, all: &'a [f32], b: usize, h: usize, j: usize, d: usize) -> &'a [f32] {
        let at = self.row_start(b, h) + j * self.ss;
        &all[at..at + d]
    }
}

struct Job<'a> {
    qs: &'a [f32],
    ks: &'a [f32],
    vs: &'a [f32],
    kv: Strided,
    vv: Strided,
    ms: Option<&'a [f32]>,
    mask_rows: usize,
    h: usize,
    t: usize,
    s: usize,
    d: usize,
    scale: f32,
}

impl Job<'_> {
    /// Every query row of one (sequence, head) pair into `o: [T, D]`.
    fn head(&self, bh: usize, o: &mut [f32]) {
        if self.kv.ss != self.d || self.vv.ss != self.d {
            return self.head_rows(bh, o);
        }
        let (bi, hi) = (bh / self.h, bh % self.h);
        let (t, s, d) = (self.t, self.s, self.d);
        head_contiguous(
            &self.qs[bh * t * d..][..t * d],
            &self.ks[self.kv.row_start(bi, hi)..][..s * d],
            &self.vs[self.vv.row_start(bi, hi)..][..s * d],
            (t, s, d),
            self.scale,
            |ti| self.mask_row(bi, ti),
            o,
        );
    }

    /// Row `ti` of the mask for sequence `bi`, if there is a mask.
    fn mask_row(&self, bi: usize, ti: usize) -> Option<&[f32]> {
        self.ms.map(|m| {
            let mb = if self.mask_rows == 1 { 0 } else { bi };
            &m[(mb * self.t + ti) * self.s..][..self.s]
        })
    }

    /// The head row by row (any CPU; keys and values at any row stride).
    fn head_rows(&self, bh: usize, o: &mut [f32]) {
        let (bi, hi) = (bh / self.h, bh % self.h);
        let (t, s, d) = (self.t, self.s, self.d);
        let mut p = vec![0f32; s];
        for (ti, orow) in o.chunks_exact_mut(d).enumerate() {
            let q = &self.qs[(bh * t + ti) * d..][..d];
            let mrow = self.mask_row(bi, ti);
            for (j, pj) in p.iter_mut().enumerate() {
                let k = self.kv.row(self.ks, bi, hi, j, d);
                *pj =
                    vmath::sum_pairs(q, k, |a, b| a * b) * self.scale + mrow.map_or(0.0, |m| m[j]);
            }
            let max = vmath::max_lanes(&p);
            p.iter_mut()
                .for_each(|x| *x = vmath::softmax_term(*x - max));
            let inv = 1.0 / vmath::sum_pairs(&p, &p, |a, _| a);
            orow.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    let w = pj * inv;
                    let v = self.vv.row(self.vs, bi, hi, j, d);
                    orow.iter_mut().zip(v).for_each(|(o, &v)| *o += w * v);
                }
            }
        }
    }
}

/// One layer's cached keys and values as the decode steps read them in place: the
/// `[B, H, S, D]` views [`KvCache::append`] returns, over their storage.
pub(crate) struct CachedKv<'a> {
    ks: &'a [f32],
    vs: &'a [f32],
    k: Strided,
    v: Strided,
    s: usize,
    d: usize,
}

impl CachedKv<'_> {
    /// Appends one position, `k` and `v` each `[B, H, 1, D]` row-major (`dims` = `(B, H, D)`),
    /// to layer `layer` of `cache`, and runs `f` on that layer's cached keys and values.
    pub(crate) fn append_then<R>(
        cache: &mut KvCache,
        layer: usize,
        (k, v): (Vec<f32>, Vec<f32>),
        (b, h, d): (usize, usize, usize),
        f: impl FnOnce(&CachedKv) -> Result<R>,
    ) -> Result<R> {
        let dev = candle_core::Device::Cpu;
        let (keys, values) = cache.append(
            layer,
            &Tensor::from_vec(k, (b, h, 1, d), &dev)?,
            &Tensor::from_vec(v, (b, h, 1, d), &dev)?,
        )?;
        let s = keys.dim(2)?;
        storage::with_f32_storage(&keys, |ks, kl| {
            storage::with_f32_storage(&values, |vs, vl| {
                for l in [kl, vl] {
                    if !matches!(l.stride(), &[_, _, ss, 1] if ss == d) {
                        bail!(
                            "decode: KV cache strides {:?} are not [.., {d}, 1]",
                            l.stride()
                        );
                    }
                }
                let (k, v) = (Strided::of(kl), Strided::of(vl));
                f(&CachedKv { ks, vs, k, v, s, d })
            })
        })
    }

    /// Attention of one query `q: [D]` of sequence `b`, head `h`, over the cached positions
    /// (`mask`: its additive mask over them), into `o: [D]`.
    pub(crate) fn attend(
        &self,
        (b, h): (usize, usize),
        q: &[f32],
        scale: f32,
        mask: Option<&[f32]>,
        o: &mut [f32],
    ) {
        let (s, d) = (self.s, self.d);
        let keys = &self.ks[self.k.row_start(b, h)..][..s * d];
        let values = &self.vs[self.v.row_start(b, h)..][..s * d];
        head_contiguous(q, keys, values, (1, s, d), scale, |_| mask, o);
    }
}

/// Attention of one (sequence, head) pair whose keys and values are contiguous `[S, D]` rows:
/// `o: [T, D] = softmax(q Kᵀ · scale + mask(ti)) V` for `q: [T, D]`, where `mask(ti)` is query
/// row `ti`'s additive mask over the `S` keys. On AVX-512 two small products on [`skinny`]'s
/// tiles (scores, then weighted values); elsewhere row by row. Masked keys get weight exactly 0.
pub(crate) fn head_contiguous<'m>(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    dims: (usize, usize, usize),
    scale: f32,
    mask: impl Fn(usize) -> Option<&'m [f32]>,
    o: &mut [f32],
) {
    let tiled = skinny::available();
    head_contiguous_on(tiled, q, (keys, values), dims, scale, mask, o)
}

/// [`head_contiguous`] on the tiles (`tiled`, AVX-512 only) or row by row.
fn head_contiguous_on<'m>(
    tiled: bool,
    q: &[f32],
    (keys, values): (&[f32], &[f32]),
    (t, s, d): (usize, usize, usize),
    scale: f32,
    mask: impl Fn(usize) -> Option<&'m [f32]>,
    o: &mut [f32],
) {
    let mut p = vec![0f32; t * s];
    if tiled {
        skinny::dense_into(q, (t, d), keys, (s, None), true, &mut p);
    } else {
        for (prow, qrow) in p.chunks_exact_mut(s).zip(q.chunks_exact(d)) {
            for (pj, k) in prow.iter_mut().zip(keys.chunks_exact(d)) {
                *pj = vmath::sum_pairs(qrow, k, |a, b| a * b);
            }
        }
    }
    for (ti, row) in p.chunks_exact_mut(s).enumerate() {
        match mask(ti) {
            Some(m) => row
                .iter_mut()
                .zip(m)
                .for_each(|(x, &m)| *x = *x * scale + m),
            None => row.iter_mut().for_each(|x| *x *= scale),
        }
        let max = vmath::max_lanes(row);
        row.iter_mut()
            .for_each(|x| *x = vmath::softmax_term(*x - max));
        let inv = 1.0 / vmath::sum_pairs(row, row, |a, _| a);
        row.iter_mut().for_each(|x| *x *= inv);
    }
    if tiled {
        skinny::dense_into(&p, (t, s), values, (d, None), false, o);
        return;
    }
    for (orow, prow) in o.chunks_exact_mut(d).zip(p.chunks_exact(s)) {
        orow.fill(0.0);
        for (&pj, v) in prow.iter().zip(values.chunks_exact(d)) {
            if pj != 0.0 {
                orow.iter_mut().zip(v).for_each(|(o, &v)| *o += pj * v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fused;
    use crate::models::ops;
    use crate::test_util::*;

    #[test]
    fn matches_the_composed_path_on_a_strided_cache_view_with_masks() {
        let (b, h, t, d, cap) = (3, 2, 5, 16, 12);
        let q = rand(&[b, h, t, d], 1);
        // A view of the first 9 positions of a 12-position buffer, as the KV cache hands out.
        let k = rand(&[b, h, cap, d], 2).narrow(2, 0, 9).unwrap();
        let v = rand(&[b, h, cap, d], 3).narrow(2, 0, 9).unwrap();
        let s = 9;
        let causal: Vec<f32> = (0..b * t * s)
            .map(|i| {
                let (row, j) = ((i / s) % t, i % s);
                // Left padding on sequence 1 (its first two keys), causal offset s − t.
                if j > s - t + row || (i / (t * s) == 1 && j < 2) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let per_row = Tensor::from_vec(causal, (b, 1, t, s), &candle_core::Device::Cpu).unwrap();
        let shared = per_row.narrow(0, 0, 1).unwrap().contiguous().unwrap();
        // Rows d apart (the tiled path on AVX-512) and 2d apart (the row-by-row path).
        let wide_k = rand(&[b, h, s, 2 * d], 5).narrow(3, 0, d).unwrap();
        let wide_v = rand(&[b, h, s, 2 * d], 6).narrow(3, d, d).unwrap();
        for (k, v) in [(&k, &v), (&wide_k, &wide_v)] {
            for mask in [None, Some(&per_row), Some(&shared)] {
                let got = attention(&q, k, v, mask)
                    .unwrap()
                    .expect("the view is readable in place");
                let want = fused::with_reference_ops(|| ops::attention(&q, k, v, mask)).unwrap();
                assert!(
                    max_abs_diff(&got, &want) < 1e-5,
                    "{}",
                    max_abs_diff(&got, &want)
                );
            }
        }
        assert!(attention(&q, &k, &v, Some(&rand(&[b, 1, t, s + 1], 4))).is_err());
    }

    /// Both branches of `head_contiguous` (the tiles, and row by row as on CPUs without
    /// AVX-512) against an f64 softmax, with masked keys.
    #[test]
    fn one_head_matches_a_double_precision_softmax_on_both_branches() {
        let (t, s, d, scale) = (3, 9, 16, 0.3f32);
        let vec = |shape: &[usize], seed| rand(shape, seed).flatten_all().unwrap().to_vec1::<f32>();
        let (q, keys, values) = (
            vec(&[t, d], 7).unwrap(),
            vec(&[s, d], 8).unwrap(),
            vec(&[s, d], 9).unwrap(),
        );
        // Query row ti sees keys 0..=s − t + ti; key 1 is padding for every row.
        let mask: Vec<Vec<f32>> = (0..t)
            .map(|ti| {
                (0..s)
                    .map(|j| {
                        if j > s - t + ti || j == 1 {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let mut want = vec![0f64; t * d];
        for ti in 0..t {
            let logits: Vec<f64> = (0..s)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|c| q[ti * d + c] as f64 * keys[j * d + c] as f64)
                        .sum();
                    dot * scale as f64 + mask[ti][j] as f64
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            for (j, l) in logits.iter().enumerate() {
                let p = (l - max).exp() / total;
                for c in 0..d {
                    want[ti * d + c] += p * values[j * d + c] as f64;
                }
            }
        }
        for tiled in [false, skinny::available()] {
            let mut got = vec![f32::NAN; t * d];
            head_contiguous_on(
                tiled,
                &q,
                (&keys, &values),
                (t, s, d),
                scale,
                |ti| Some(&mask[ti][..]),
                &mut got,
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "tiled {tiled}: {g} vs {w}");
            }
        }
    }
}
