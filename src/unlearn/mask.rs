//! Score-based masks over the MLP weight matrices (spec §4.1), shared by Subnet, BalancedSubnet
//! and the takedown controller.
//!
//! Invariants:
//! - One f32 score tensor per masked matrix, of the matrix's own shape, Kaiming-uniform with
//!   bound `1/√fan_in` where `fan_in` is the output width (the second dimension in GPT-2's
//!   `[in, out]` orientation, which the reference uses for both architectures).
//!   [`Scores::init`] draws them from `seed` alone and refuses a ratio outside `[0, 1)` with an
//!   error naming `ratio`.
//! - The hard mask zeroes exactly `⌊ratio·numel⌋` entries per matrix, those with the smallest
//!   `|score|`, ties broken by position (lower first): the entries the reference's full sort
//!   picks (pinned by the tests), found by an O(n) selection.
//! - [`Scores::masked`] is `W ⊙ (hard + (|s| − stop_grad(|s|)))`: numerically `W ⊙ hard`, while
//!   the gradient reaching `s` is `(∂L/∂W_eff ⊙ W) · sign(s)` — the straight-through estimator.
//! - [`Scores::apply`] is the final edit `W ← W ⊙ hard` as new tensors without a graph; the
//!   base weights are never written.

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::models::{MlpWeights, Model};

/// The trainable scores of every masked matrix, in [`MlpWeights`] order.
pub struct Scores {
    /// `(input projection, output projection)` scores per block.
    pub vars: Vec<(Var, Var)>,
    pub ratio: f64,
    linear_layout: bool,
}

impl Scores {
    /// Fresh scores for `model`'s MLP matrices, reproducible from `seed`.
    pub fn init(model: &Model, ratio: f64, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&ratio) {
            return Err(Error::invalid(
                "ratio",
                format!("{ratio} is outside [0, 1)"),
            ));
        }
        let linear_layout = model.mlp_is_linear_layout();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut make = |w: &Tensor| -> Result<Var> {
            let dims = w.dims();
            let fan_in = if linear_layout { dims[0] } else { dims[1] };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let data: Vec<f32> = (0..w.elem_count())
                .map(|_| (rng.random::<f64>() * 2.0 * bound - bound) as f32)
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                data,
                dims,
                w.device(),
            )?)?)
        };
        let mut vars = Vec::new();
        for (a, b) in &model.mlp_weights().0 {
            vars.push((make(a)?, make(b)?));
        }
        Ok(Self {
            vars,
            ratio,
            linear_layout,
        })
    }

    /// Every score variable (what the optimiser trains).
    pub fn all_vars(&self) -> Vec<Var> {
        self.vars
            .iter()
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect()
    }

    /// Whether the masked matrices are stored `[out, in]`.
    pub fn linear_layout(&self) -> bool {
        self.linear_layout
    }

    /// The masked weights for a forward pass with straight-through gradients to the scores.
    pub fn masked(&self, base: &MlpWeights) -> Result<MlpWeights> {
        let one = |w: &Tensor, s: &Var| -> Result<Tensor> {
            let hard = hard_mask(s.as_tensor(), self.ratio)?;
            let a = s.as_tensor().abs()?;
            let ste = (hard + (&a - a.detach())?)?;
            Ok((w * ste)?)
        };
        let mut out = Vec::with_capacity(base.0.len());
        for ((w1, w2), (s1, s2)) in base.0.iter().zip(&self.vars) {
            out.push((one(w1, s1)?, one(w2, s2)?));
        }
        Ok(MlpWeights(out))
    }

    /// The final edit `W ← W ⊙ mask` (plain tensors, no graph).
    pub fn apply(&self, base: &MlpWeights) -> Result<MlpWeights> {
        let mut out = Vec::with_capacity(base.0.len());
        for ((w1, w2), (s1, s2)) in base.0.iter().zip(&self.vars) {
            out.push((
                (w1 * hard_mask(s1.as_tensor(), self.ratio)?)?.detach(),
                (w2 * hard_mask(s2.as_tensor(), self.ratio)?)?.detach(),
            ));
        }
        Ok(MlpWeights(out))
    }
}

/// The number of entries the mask zeroes in a matrix of `numel` entries.
pub fn zeros_for(numel: usize, ratio: f64) -> usize {
    ((ratio * numel as f64).floor() as usize).min(numel)
}

/// [`zeros_for`] of every masked matrix of `base`, `(input projection, output projection)` per
/// block.
pub fn zeros_per_matrix(base: &MlpWeights, ratio: f64) -> Vec<(usize, usize)> {
    base.0
        .iter()
        .map(|(a, b)| {
            (
                zeros_for(a.elem_count(), ratio),
                zeros_for(b.elem_count(), ratio),
            )
        })
        .collect()
}

/// `1` everywhere except the `⌊ratio·numel⌋` entries of smallest `|score|`, which are `0`
/// (ties broken by position, deterministically). On the CPU an O(n) selection; elsewhere
/// [`hard_mask_where_they_are`], so scores never leave the device.
pub fn hard_mask(scores: &Tensor, ratio: f64) -> Result<Tensor> {
    if scores.device().is_cpu() {
        hard_mask_on_host(scores, ratio)
    } else {
        hard_mask_where_they_are(scores, ratio)
    }
}

/// [`hard_mask`] through the host: the scores are copied to the CPU and back.
fn hard_mask_on_host(scores: &Tensor, ratio: f64) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let flat: Vec<f32> = scores.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    Ok(Tensor::from_vec(
        hard_mask_values(&flat, ratio),
        dims,
        scores.device(),
    )?)
}

/// [`hard_mask`] computed on the scores' own device (a GPU's) with comparisons and sums only:
/// the same mask, found by bisection over counts, so that only counts cross to the host.
///
/// The threshold `τ` is the smallest `|score|` with at least `j = ⌊ratio·numel⌋` entries at
/// or below it, found by bisection over the bit patterns of non-negative floats (whose order
/// is the values' order): about 31 comparisons and sums. Entries below `τ` are zeroed; when
/// more entries equal `τ` than are still to be zeroed, a second bisection (about log₂ numel
/// steps) finds the position before which those ties are zeroed, as the host path breaks them.
/// Scores with a NaN among the `j` smallest (a diverged step) take the host path, which orders
/// NaN above +∞.
pub fn hard_mask_where_they_are(scores: &Tensor, ratio: f64) -> Result<Tensor> {
    use candle_core::DType;
    let dims = scores.dims().to_vec();
    let a = scores.flatten_all()?.abs()?;
    let n = a.elem_count();
    let j = zeros_for(n, ratio);
    if j == 0 {
        return Ok(Tensor::ones(dims, DType::F32, scores.device())?);
    }
    let count = |hits: Tensor| -> Result<usize> {
        Ok(hits.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize)
    };
    if count(a.le(f32::INFINITY)?)? < j {
        return hard_mask_on_host(scores, ratio);
    }
    // The smallest bit pattern v with count(|s| ≤ v) ≥ j (+∞ qualifies, checked above).
    let (mut lo, mut hi) = (0u32, f32::INFINITY.to_bits());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if count(a.le(f32::from_bits(mid))?)? >= j {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    let tau = f32::from_bits(lo);
    // Above τ, or NaN (kept, as the host orders NaN above +∞; NaN ≠ NaN).
    let above = (a.gt(tau)?.to_dtype(DType::U32)? + a.ne(&a)?.to_dtype(DType::U32)?)?;
    let at = a.eq(tau)?.to_dtype(DType::U32)?;
    let ties = j - count(a.lt(tau)?)?;
    let keep = if ties == count(at.clone())? {
        above
    } else {
        // Zero the ties before the smallest position p with `ties` of them before it.
        let idx = Tensor::arange(0u32, n as u32, scores.device())?;
        let (mut lo, mut hi) = (0u32, n as u32);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if count((&at * idx.lt(mid)?.to_dtype(DType::U32)?)?)? >= ties {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        (above + (at * idx.ge(lo)?.to_dtype(DType::U32)?)?)?
    };
    Ok(keep.to_dtype(DType::F32)?.reshape(dims)?)
}

/// [`hard_mask`] of flattened scores, as values.
pub fn hard_mask_values(flat: &[f32], ratio: f64) -> Vec<f32> {
    let mut mask = vec![1f32; flat.len()];
    for_each_smallest_abs(flat, zeros_for(flat.len(), ratio), |i| mask[i] = 0.0);
    mask
}

/// The positions of the `j` smallest `|x|`, ties broken by position (lower first), in
/// ascending position order.
///
/// O(n), read-only: [`abs_threshold`] finds the threshold `τ`, the `j`-th smallest; every
/// entry below `τ` is taken, then entries equal to `τ` in position order until `j` are taken.
pub fn smallest_abs(x: &[f32], j: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(j.min(x.len()));
    for_each_smallest_abs(x, j, |i| out.push(i));
    out
}

/// Calls `f` on each of [`smallest_abs`]'s positions, in ascending order, without collecting
/// them.
pub fn for_each_smallest_abs(x: &[f32], j: usize, mut f: impl FnMut(usize)) {
    let j = j.min(x.len());
    if j == 0 {
        return;
    }
    let mut sel = Selection::new(x, j);
    for (i, &v) in x.iter().enumerate() {
        if sel.takes(v) {
            f(i);
        }
    }
}

/// `out ← w` with the entries at [`smallest_abs`]`(s, j)`'s positions set to 0: the masked
/// weights `W ⊙ hard(s)` of one matrix, built in one pass after the threshold's two.
pub fn masked_copy(w: &[f32], s: &[f32], j: usize, out: &mut Vec<f32>) {
    assert_eq!(
        w.len(),
        s.len(),
        "masked_copy: weights and scores differ in size"
    );
    out.clear();
    let j = j.min(s.len());
    if j == 0 {
        out.extend_from_slice(w);
        return;
    }
    let mut sel = Selection::new(s, j);
    if sel.takes_every_tie() {
        // One comparison per entry and no state, which vectorises.
        let tau = sel.tau;
        out.extend(
            w.iter()
                .zip(s)
                .map(|(&w, &s)| if abs_key(s) <= tau { 0.0 } else { w }),
        );
    } else {
        out.extend(
            w.iter()
                .zip(s)
                .map(|(&w, &s)| if sel.takes(s) { 0.0 } else { w }),
        );
    }
}

/// The rule of [`smallest_abs`] for one scan in position order: every entry whose key is
/// below the threshold `τ`, then entries at `τ` until `j` are taken.
struct Selection {
    tau: u32,
    /// Entries at `τ` still to take.
    ties: usize,
    /// Entries at `τ` in all.
    at_tau: usize,
}

impl Selection {
    /// For `1 ≤ j ≤ x.len()`.
    fn new(x: &[f32], j: usize) -> Self {
        let (tau, below, at_tau) = abs_threshold(x, j);
        Self {
            tau,
            ties: j - below,
            at_tau,
        }
    }

    /// Whether every entry at `τ` is taken, so that `key ≤ τ` alone decides.
    fn takes_every_tie(&self) -> bool {
        self.ties == self.at_tau
    }

    /// Whether the next entry in position order, `v`, is taken.
    #[inline(always)]
    fn takes(&mut self, v: f32) -> bool {
        let k = abs_key(v);
        if k < self.tau {
            true
        } else if k == self.tau && self.ties > 0 {
            self.ties -= 1;
            true
        } else {
            false
        }
    }
}

/// `|v|`'s bit pattern: for non-negative floats, including NaN above +∞, the unsigned order of
/// the bits is `f32::total_cmp`'s order.
#[inline(always)]
fn abs_key(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// For `1 ≤ j ≤ x.len()`: the `j`-th smallest [`abs_key`] `τ`, how many keys lie below it and
/// how many equal it. A radix selection over the 31-bit keys: one histogram of the high 15 bits
/// finds `τ`'s bucket, a second of the low 16 bits, over that bucket's entries only, finds `τ`.
/// Two read-only passes over `x`, whatever the distribution.
fn abs_threshold(x: &[f32], j: usize) -> (u32, usize, usize) {
    debug_assert!(j >= 1 && j <= x.len());
    let mut high = vec![0usize; 1 << 15];
    for &v in x {
        high[(abs_key(v) >> 16) as usize] += 1;
    }
    let (top, below_top) = nth_bucket(&high, j);
    let mut low = vec![0usize; 1 << 16];
    for &v in x {
        let k = abs_key(v);
        if k >> 16 == top {
            low[(k & 0xffff) as usize] += 1;
        }
    }
    let (bottom, below_bottom) = nth_bucket(&low, j - below_top);
    (
        (top << 16) | bottom,
        below_top + below_bottom,
        low[bottom as usize],
    )
}

/// The bucket holding the `j`-th entry (1-based) of a histogram, and how many entries the
/// buckets before it hold.
fn nth_bucket(counts: &[usize], j: usize) -> (u32, usize) {
    let mut below = 0;
    for (b, &c) in counts.iter().enumerate() {
        if below + c >= j {
            return (b as u32, below);
        }
        below += c;
    }
    unreachable!("a histogram of at least {j} entries holds {below}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bisection a GPU runs gives exactly the host's mask: random scores, scores with many
    /// ties at the threshold (a few distinct magnitudes of both signs), all equal, zeros, the
    /// extreme ratios, and a NaN (through the host path).
    #[test]
    fn the_device_bisection_matches_the_host_selection() {
        let mut rng = StdRng::seed_from_u64(5);
        let random: Vec<f32> = (0..997).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let tied: Vec<f32> = (0..1000)
            .map(|_| [-0.5f32, -0.25, 0.0, 0.25, 0.5, 1e-30][rng.random_range(0..6)])
            .collect();
        let mut with_nan = random.clone();
        with_nan[3] = f32::NAN;
        let cases = [
            ("random", random),
            ("tied", tied),
            ("equal", vec![0.3f32; 64]),
            ("zeros", vec![0.0f32; 10]),
            ("nan", with_nan),
        ];
        for (what, values) in cases {
            let t = Tensor::from_vec(values.clone(), (values.len(),), &Device::Cpu).unwrap();
            for ratio in [0.0, 0.001, 0.1, 0.5, 0.9, 0.999] {
                let got: Vec<f32> = hard_mask_where_they_are(&t, ratio)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(
                    got,
                    hard_mask_values(&values, ratio),
                    "{what} ratio {ratio}"
                );
            }
        }
    }

    #[test]
    fn mask_zeroes_exactly_floor_ratio_numel_smallest_scores() {
        let s = Tensor::new(&[[0.5f32, -0.1, 0.3], [-0.9, 0.2, 0.05]], &Device::Cpu).unwrap();
        for (ratio, zeros) in [(0.0, 0), (0.17, 1), (0.34, 2), (0.5, 3), (0.99, 5)] {
            let m = hard_mask(&s, ratio).unwrap();
            let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(
                v.iter().filter(|&&x| x == 0.0).count(),
                zeros,
                "ratio {ratio}"
            );
        }
        let m: Vec<f32> = hard_mask(&s, 0.5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // |s| ascending: 0.05 (5), 0.1 (1), 0.2 (4) are zeroed.
        assert_eq!(m, vec![1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    }

    /// The sort the reference code does: ascending `|s|`, ties by position.
    fn by_sort(x: &[f32], j: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()).then(a.cmp(&b)));
        let mut out = idx[..j].to_vec();
        out.sort_unstable();
        out
    }

    #[test]
    fn selection_equals_a_full_sort_with_ties_zeros_and_signs() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for case in 0..40 {
            let n = 1 + case * 37 % 301;
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    // Few distinct magnitudes, both signs, and ±0: many ties.
                    let v = [0.0f32, -0.0, 0.5, -0.5, 0.25, 1.0, -3.0, 1e-30][(s % 8) as usize];
                    if case % 2 == 0 {
                        v
                    } else {
                        v * (1.0 + (s >> 40) as f32 / (1u64 << 24) as f32)
                    }
                })
                .collect();
            for j in [0, 1, n / 3, n / 2, n - 1, n] {
                let want = by_sort(&x, j);
                assert_eq!(smallest_abs(&x, j), want, "n {n} j {j}");
                let w: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
                let mut masked = Vec::new();
                masked_copy(&w, &x, j, &mut masked);
                let zeroed: Vec<usize> = (0..n).filter(|&i| masked[i] == 0.0).collect();
                assert_eq!(zeroed, want, "masked_copy: n {n} j {j}");
                assert!(
                    (0..n).all(|i| masked[i] == 0.0 || masked[i] == w[i]),
                    "masked_copy keeps the other weights: n {n} j {j}"
                );
            }
        }
    }

    /// The radix selection's two levels: magnitudes spread over many high-bit buckets, and
    /// magnitudes that share their high bits and differ only in the low 16, with NaN and ±∞.
    #[test]
    fn radix_selection_matches_a_sort_within_and_across_buckets() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let wide: Vec<f32> = (0..5000)
            .map(|_| {
                let r = next();
                let v = f32::from_bits((r as u32) & 0x7f7f_ffff);
                if r >> 63 == 1 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        let narrow: Vec<f32> = (0..5000)
            .map(|_| {
                let r = next();
                // One high-bit bucket (1.0's), low bits from a few values: ties inside it.
                let v = f32::from_bits(0x3f80_0000 | ((r as u32) & 0x7) << 3);
                if r >> 63 == 1 {
                    -v
                } else {
                    v
                }
            })
            .collect();
        let mut odd = narrow.clone();
        odd[17] = f32::NAN;
        odd[18] = f32::INFINITY;
        odd[19] = -0.0;
        for (what, x) in [("wide", wide), ("narrow", narrow), ("odd", odd)] {
            for j in [1, 7, 999, 2500, 4999, 5000] {
                assert_eq!(smallest_abs(&x, j), by_sort(&x, j), "{what} j {j}");
            }
        }
    }

    #[test]
    fn ties_still_give_exactly_the_count() {
        let s = Tensor::new(&[0.1f32; 10], &Device::Cpu).unwrap();
        let m: Vec<f32> = hard_mask(&s, 0.35).unwrap().to_vec1().unwrap();
        assert_eq!(m.iter().filter(|&&x| x == 0.0).count(), 3);
    }
}
