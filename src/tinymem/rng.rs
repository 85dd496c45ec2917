//! The PRNG behind TinyMem data generation: xoshiro256++ seeded through SplitMix64.
//!
//! Invariants:
//! - For a given seed the output stream is fixed forever. It is implemented here rather than
//!   taken from `rand`, whose `StdRng` may change its algorithm between releases, so generated
//!   datasets never change under a dependency upgrade.
//! - The tests pin it to the reference C implementation's output and to the output of `rand`'s
//!   `Xoshiro256PlusPlus::seed_from_u64`, which uses the same seeding.
//! - `below` draws without modulo bias; `shuffle` is Fisher–Yates; `sample(n, k)` returns `k`
//!   distinct values of `0..n` in selection order, as Python's `random.sample(range(n), k)`.

/// xoshiro256++ with SplitMix64 seeding (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Prng {
    s: [u64; 4],
}

impl Prng {
    pub(crate) fn seed_from_u64(mut state: u64) -> Self {
        const PHI: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut s = [0u64; 4];
        for x in &mut s {
            state = state.wrapping_add(PHI);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *x = z ^ (z >> 31);
        }
        Prng { s }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n) without modulo bias (Lemire's method). `n` must be > 0.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        let n = n as u64;
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as usize
    }

    /// Fisher–Yates shuffle.
    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// `k` distinct values of `0..n` in selection order (partial Fisher–Yates), like Python's
    /// `random.sample(range(n), k)`. Requires `k <= n`.
    pub(crate) fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for j in 0..k {
            let r = j + self.below(n - j);
            v.swap(j, r);
        }
        v.truncate(k);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn prng_matches_the_xoshiro256plusplus_reference() {
        // Output of the reference C implementation from state [1, 2, 3, 4].
        let mut rng = Prng { s: [1, 2, 3, 4] };
        let expected: [u64; 6] = [
            41943041,
            58720359,
            3588806011781223,
            3591011842654386,
            9228616714210784205,
            9973669472204895162,
        ];
        for e in expected {
            assert_eq!(rng.next_u64(), e);
        }
        // SplitMix64 seeding, as in rand's Xoshiro256PlusPlus::seed_from_u64(0).
        let mut rng = Prng::seed_from_u64(0);
        for e in [
            5987356902031041503u64,
            7051070477665621255,
            6633766593972829180,
        ] {
            assert_eq!(rng.next_u64(), e);
        }
    }

    #[test]
    fn prng_helpers_stay_in_range() {
        let mut rng = Prng::seed_from_u64(42);
        for n in [1usize, 2, 3, 7, 1000] {
            for _ in 0..1000 {
                assert!(rng.below(n) < n);
            }
        }
        let s = rng.sample(100, 100);
        assert_eq!(s.iter().copied().collect::<HashSet<_>>().len(), 100);
        let s = rng.sample(19_000, 1_000);
        assert_eq!(s.len(), 1_000);
        assert!(s.iter().all(|&x| x < 19_000));
        assert_eq!(s.iter().copied().collect::<HashSet<_>>().len(), 1_000);
        assert!(rng.sample(5, 0).is_empty());
        for _ in 0..1000 {
            let u = rng.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
