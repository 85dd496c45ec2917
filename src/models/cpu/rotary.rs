//! Rotary position embeddings (GPT-NeoX's "rotate_half" convention) on plain slices: the
//! rotation of one head's leading dimensions, its backward, and both applied in place to the
//! queries and keys of a packed `qkv` buffer.
//!
//! Invariants:
//! - [`rotate`] computes what `ops::rope` (and transformers' `apply_rotary_pos_emb`) computes for
//!   one vector: with `half = c.len()`, `(x₁, x₂) ↦ (x₁·c − x₂·s, x₂·c + x₁·s)` on the first
//!   `2·half` entries; the rest of a head (partial rotary) is left as it is.
//! - [`rotate_bwd`] is its exact gradient, the rotation by the opposite angle (a rotation is
//!   orthogonal); the tests pin both against candle's `ops::rope` and its autograd.
//! - [`rotate_packed`] rotates every query and key of a `[b, t]` batch in place, row `r`'s
//!   token `i` at position `i` (a training batch starts at 0); `inverse` undoes it, which is
//!   also its backward on `∂qkv`. Values and other columns are never touched.
//! - Tables are `cos`, `sin: [positions, half]` as `gpt_neox::rotary_tables` builds them;
//!   single-threaded.

use super::attention::QkvLayout;

/// Rotates the first `2·c.len()` entries of `x` by the angles whose cosines and sines are `c`
/// and `s` ("rotate_half": the first half pairs with the second).
#[inline(always)]
pub(crate) fn rotate(x: &mut [f32], c: &[f32], s: &[f32]) {
    turn(x, c, s, 1.0);
}

/// The backward of [`rotate`] on an upstream gradient `g`, in place: the rotation by the
/// opposite angles.
#[inline(always)]
pub(crate) fn rotate_bwd(g: &mut [f32], c: &[f32], s: &[f32]) {
    turn(g, c, s, -1.0);
}

/// The rotation by the angles `(c, dir·s)`: `dir` 1 turns forward, −1 back.
#[inline(always)]
fn turn(x: &mut [f32], c: &[f32], s: &[f32], dir: f32) {
    let half = c.len();
    let (lo, hi) = x[..2 * half].split_at_mut(half);
    for i in 0..half {
        let (x1, x2, si) = (lo[i], hi[i], dir * s[i]);
        lo[i] = x1 * c[i] - x2 * si;
        hi[i] = x2 * c[i] + x1 * si;
    }
}

/// Rotates the first `2·half` dimensions of every head's query and key in a packed
/// `qkv: [b, t, row]` (token `i` of each row at position `i`), or, with `inverse`, undoes that
/// rotation (the backward on `∂qkv`). `cos`, `sin` are `[≥ t, half]`.
pub(crate) fn rotate_packed(
    qkv: &mut [f32],
    l: QkvLayout,
    (b, t): (usize, usize),
    (cos, sin): (&[f32], &[f32]),
    half: usize,
    inverse: bool,
) {
    assert!(
        qkv.len() == b * t * l.row,
        "qkv of {} for [{b}, {t}]",
        qkv.len()
    );
    assert!(
        2 * half <= l.head_dim,
        "rotating {} of {} dimensions",
        2 * half,
        l.head_dim
    );
    assert!(
        cos.len() >= t * half && sin.len() >= t * half,
        "rotary tables too short"
    );
    if half == 0 {
        return;
    }
    for (n, token) in qkv.chunks_exact_mut(l.row).enumerate() {
        let p = n % t;
        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for hi in 0..l.heads {
            for part in [l.q, l.k] {
                let at = hi * l.head_stride + part;
                let x = &mut token[at..at + 2 * half];
                if inverse {
                    rotate_bwd(x, c, s);
                } else {
                    rotate(x, c, s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::test_util::{max_abs_diff, rand, rel_l2};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        rand(&[n], seed).to_vec1().unwrap()
    }

    /// Angles as transformers builds them for `positions` and `half` frequencies.
    fn tables(positions: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
        let mut c = Vec::new();
        let mut s = Vec::new();
        for p in 0..positions {
            for i in 0..half {
                let a = p as f32 / 10_000f32.powf(2.0 * i as f32 / (2 * half) as f32);
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        (c, s)
    }

    #[test]
    fn rotation_and_its_backward_match_candles_rope_and_autograd() {
        let (t, half) = (5, 3);
        let (c, s) = tables(t, half);
        let x = values(t * 2 * half, 1);
        let r = values(t * 2 * half, 2);
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (1, 1, t, 2 * half), &dev).unwrap())
            .unwrap();
        let ct = Tensor::from_vec(c.clone(), (1, t, half), &dev).unwrap();
        let st = Tensor::from_vec(s.clone(), (1, t, half), &dev).unwrap();
        let y = crate::models::ops::rope(xv.as_tensor(), &ct, &st).unwrap();
        let rt = Tensor::from_vec(r.clone(), (1, 1, t, 2 * half), &dev).unwrap();
        let grads = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
        let (mut got_y, mut got_g) = (x.clone(), r.clone());
        for p in 0..t {
            let (cp, sp) = (&c[p * half..][..half], &s[p * half..][..half]);
            rotate(&mut got_y[p * 2 * half..][..2 * half], cp, sp);
            rotate_bwd(&mut got_g[p * 2 * half..][..2 * half], cp, sp);
        }
        let as_tensor = |v: Vec<f32>| Tensor::from_vec(v, y.shape(), &dev).unwrap();
        let want_g = grads.get(xv.as_tensor()).unwrap();
        assert!(max_abs_diff(&as_tensor(got_y), &y) < 1e-6, "forward");
        assert!(max_abs_diff(&as_tensor(got_g), want_g) < 1e-6, "backward");
    }

    #[test]
    fn packed_rotation_touches_queries_and_keys_only_and_inverts() {
        for l in [QkvLayout::neox(8, 2), QkvLayout::gpt2(8, 2)] {
            let (b, t, half) = (2, 3, 1);
            let (c, s) = tables(t, half);
            let before = values(b * t * l.row, 3);
            let mut x = before.clone();
            rotate_packed(&mut x, l, (b, t), (&c, &s), half, false);
            for (n, (row, orig)) in x
                .chunks_exact(l.row)
                .zip(before.chunks_exact(l.row))
                .enumerate()
            {
                let p = n % t;
                for hi in 0..l.heads {
                    let base = hi * l.head_stride;
                    // Values, and the unrotated tail of queries and keys, are untouched.
                    let v = base + l.v;
                    assert_eq!(row[v..v + l.head_dim], orig[v..v + l.head_dim]);
                    for part in [l.q, l.k] {
                        let at = base + part;
                        assert_eq!(row[at + 2..at + l.head_dim], orig[at + 2..at + l.head_dim]);
                        let mut want = orig[at..at + 2].to_vec();
                        rotate(&mut want, &c[p..p + 1], &s[p..p + 1]);
                        assert_eq!(&row[at..at + 2], &want[..]);
                    }
                }
            }
            rotate_packed(&mut x, l, (b, t), (&c, &s), half, true);
            assert!(rel_l2(&x, &before) < 1e-6);
        }
    }
}
