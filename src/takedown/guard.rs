//! The regurgitation guard: cuts a completion the moment it emits an n-token window of a
//! sequence under takedown.
//!
//! Every registered sequence contributes each of its n-token windows. A [`Checker`] follows one
//! generated row: it keeps the last n tokens in a ring buffer and a rolling polynomial hash of
//! them (mod 2^64, tokens pre-mixed with a 64-bit finaliser so structured ids do not cluster), so
//! each generated token costs one hash update, one read lock and one table lookup, whatever the
//! number of windows.
//!
//! Invariants:
//! - No false cuts: a hash hit is confirmed by comparing the n tokens with the stored window, so
//!   a collision never cuts a harmless completion. No misses: [`Checker::push`] returns true at
//!   the generated token that completes a registered window, prompt tokens included in it.
//! - A window is reported only on [`Checker::push`], i.e. when it ends with a generated token; a
//!   prompt that itself contains a protected window is not the model regurgitating.
//! - The window set is shared by every clone of a [`Guard`] and every checker: a checker sees
//!   windows registered after it was created, from the next token on. [`Guard::add`] only adds;
//!   windows leave only when [`Guard::replace`] swaps in a whole new set under the write lock.
//! - `n >= 1` ([`Guard::new`] rejects 0 with `InvalidInput`). Sequences shorter than `n`
//!   register nothing.
//! - [`Guard`] and [`Checker`] are `Send + Sync`; a lock poisoned by a panicking writer is still
//!   read and written.
//!
//! Its cost per token is measured in `docs/benchmarks.md` ("Takedowns (issue #6)").

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{Error, Result};
use crate::engine::generate::{Filter, FilterState, OutputFilter};

/// Multiplier of the rolling hash (odd, so multiplication is invertible mod 2^64).
const BASE: u64 = 0x9E37_79B9_7F4A_7C15;

/// A 64-bit finaliser (splitmix64's) applied to each token before hashing.
#[inline]
fn mix(token: u32) -> u64 {
    let mut z = u64::from(token).wrapping_add(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The hash of a whole window (what the rolling update maintains).
fn window_hash(window: &[u32]) -> u64 {
    window
        .iter()
        .fold(0u64, |h, &t| h.wrapping_mul(BASE).wrapping_add(mix(t)))
}

#[derive(Default)]
struct Windows {
    /// Sequences that contributed at least one new window.
    seqs: Vec<Vec<u32>>,
    /// Window hash → (index into `seqs`, offset of the window).
    by_hash: HashMap<u64, Vec<(usize, usize)>>,
    /// Distinct windows registered.
    count: usize,
}

impl Windows {
    /// Whether `window` (exactly n tokens, hash `h`) is registered. `at(i)` yields its i-th token.
    fn contains_by(&self, h: u64, n: usize, at: impl Fn(usize) -> u32) -> bool {
        let Some(hits) = self.by_hash.get(&h) else {
            return false;
        };
        hits.iter().any(|&(si, off)| {
            self.seqs
                .get(si)
                .and_then(|s| s.get(off..off + n))
                .is_some_and(|w| w.iter().enumerate().all(|(i, &t)| t == at(i)))
        })
    }

    fn add(&mut self, seq: &[u32], n: usize, pow: u64) -> usize {
        if seq.len() < n {
            return 0;
        }
        let si = self.seqs.len();
        let mut added = 0;
        let mut h = window_hash(&seq[..n]);
        for off in 0..=seq.len() - n {
            if off > 0 {
                h = h
                    .wrapping_sub(mix(seq[off - 1]).wrapping_mul(pow))
                    .wrapping_mul(BASE)
                    .wrapping_add(mix(seq[off + n - 1]));
            }
            let window = &seq[off..off + n];
            // Windows already stored, or repeated earlier in this same sequence, are skipped.
            let seen_here = self
                .by_hash
                .get(&h)
                .is_some_and(|v| v.iter().any(|&(s, o)| s == si && seq[o..o + n] == *window));
            if seen_here || self.contains_by(h, n, |i| window[i]) {
                continue;
            }
            self.by_hash.entry(h).or_default().push((si, off));
            added += 1;
        }
        if added > 0 {
            self.seqs.push(seq.to_vec());
            self.count += added;
        }
        added
    }
}

struct Shared {
    n: usize,
    /// BASE^(n-1): the weight of the oldest token in a window.
    pow: u64,
    windows: RwLock<Windows>,
}

/// The set of protected n-token windows. Cheap to clone (shared); `Send + Sync`.
#[derive(Clone)]
pub struct Guard {
    shared: Arc<Shared>,
}

impl Guard {
    /// A guard over `n`-token windows. `n = 0` is an [`Error::InvalidInput`]: every completion
    /// would match the empty window.
    pub fn new(n: usize) -> Result<Guard> {
        if n == 0 {
            return Err(Error::invalid("guard window", "n must be at least 1"));
        }
        let pow = (1..n).fold(1u64, |p, _| p.wrapping_mul(BASE));
        Ok(Guard {
            shared: Arc::new(Shared {
                n,
                pow,
                windows: RwLock::new(Windows::default()),
            }),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Windows> {
        // Writers never leave the table half-updated across a panic point that matters (a
        // panicking `add` loses at most its own sequence), so a poisoned lock is still usable.
        self.shared
            .windows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Windows> {
        self.shared
            .windows
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers every n-token window of `seq`; returns how many were new.
    pub fn add(&self, seq: &[u32]) -> usize {
        let (n, pow) = (self.shared.n, self.shared.pow);
        self.write().add(seq, n, pow)
    }

    /// Replaces the whole window set by the windows of `seqs` (e.g. after a cancellation, rebuilt
    /// from `Store::sequences_to_guard`). Existing checkers see the new set from their next token.
    pub fn replace(&self, seqs: &[Vec<u32>]) -> usize {
        let (n, pow) = (self.shared.n, self.shared.pow);
        let mut fresh = Windows::default();
        for s in seqs {
            fresh.add(s, n, pow);
        }
        let count = fresh.count;
        *self.write() = fresh;
        count
    }

    /// Distinct windows registered.
    pub fn len(&self) -> usize {
        self.read().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The window length.
    pub fn n(&self) -> usize {
        self.shared.n
    }

    /// Whether `window` (exactly n tokens) is registered.
    pub fn contains(&self, window: &[u32]) -> bool {
        window.len() == self.shared.n
            && self
                .read()
                .contains_by(window_hash(window), window.len(), |i| window[i])
    }

    /// A checker for one row whose context starts with `prompt`.
    pub fn checker(&self, prompt: &[u32]) -> Checker {
        let n = self.shared.n;
        let mut c = Checker {
            guard: self.clone(),
            ring: vec![0; n],
            head: 0,
            filled: 0,
            hash: 0,
        };
        // Only the last n - 1 prompt tokens can be part of a window that ends on a generated one.
        for &t in &prompt[prompt.len().saturating_sub(n - 1)..] {
            c.roll(t);
        }
        c
    }
}

/// Follows one row's tokens; see [`Checker::push`].
pub struct Checker {
    guard: Guard,
    /// The last `filled` tokens; the oldest is at `head` once the ring is full.
    ring: Vec<u32>,
    /// Where the next token is written.
    head: usize,
    filled: usize,
    /// Rolling hash of the tokens in the ring, oldest first.
    hash: u64,
}

impl Checker {
    #[inline]
    fn roll(&mut self, token: u32) {
        let n = self.ring.len();
        if self.filled == n {
            let out = self.ring[self.head];
            self.hash = self
                .hash
                .wrapping_sub(mix(out).wrapping_mul(self.guard.shared.pow));
        } else {
            self.filled += 1;
        }
        self.hash = self.hash.wrapping_mul(BASE).wrapping_add(mix(token));
        self.ring[self.head] = token;
        self.head = (self.head + 1) % n;
    }

    /// Adds a generated token. True when the last n tokens (prompt and generated, this one
    /// included) are a registered window: the completion must be cut here.
    pub fn push(&mut self, token: u32) -> bool {
        self.roll(token);
        let n = self.ring.len();
        if self.filled < n {
            return false;
        }
        let (ring, head) = (&self.ring, self.head);
        self.guard
            .read()
            .contains_by(self.hash, n, |i| ring[(head + i) % n])
    }
}

/// Nanoseconds per [`Checker::push`] with 1,000 registered 64-token sequences (random ids below
/// 50,000), averaged over `tokens` random generated tokens.
pub fn bench_overhead(n: usize, tokens: usize) -> f64 {
    let Ok(guard) = Guard::new(n.max(1)) else {
        return 0.0;
    };
    let mut s: u64 = 0x1234_5678;
    let mut next = move || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 33) % 50_000) as u32
    };
    for _ in 0..1000 {
        let seq: Vec<u32> = (0..64).map(|_| next()).collect();
        guard.add(&seq);
    }
    let prompt: Vec<u32> = (0..n).map(|_| next()).collect();
    let stream: Vec<u32> = (0..tokens).map(|_| next()).collect();
    let mut checker = guard.checker(&prompt);
    let start = std::time::Instant::now();
    let mut hits = 0usize;
    for &t in &stream {
        hits += usize::from(checker.push(std::hint::black_box(t)));
    }
    std::hint::black_box(hits);
    start.elapsed().as_nanos() as f64 / tokens.max(1) as f64
}

impl Guard {
    /// The guard as an engine output filter: each generated row gets its own [`Checker`].
    pub fn filter(&self) -> Filter {
        Filter(Arc::new(GuardFilter(self.clone())))
    }
}

/// The regurgitation guard seen by the engine.
struct GuardFilter(Guard);

impl OutputFilter for GuardFilter {
    fn start(&self, prompt: &[u32]) -> Box<dyn FilterState> {
        Box::new(self.0.checker(prompt))
    }
}

impl FilterState for Checker {
    fn push(&mut self, token: u32) -> bool {
        Checker::push(self, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `gen` and returns the index of the first blocked token.
    fn first_block(c: &mut Checker, gen: &[u32]) -> Option<usize> {
        gen.iter().position(|&t| c.push(t))
    }

    #[test]
    fn guard_and_checker_can_cross_threads() {
        fn check<T: Send + Sync>() {}
        check::<Guard>();
        check::<Checker>();
    }

    #[test]
    fn zero_window_is_rejected() {
        assert!(matches!(Guard::new(0), Err(Error::InvalidInput { .. })));
    }

    #[test]
    fn blocks_exactly_at_the_token_that_completes_a_window() {
        let g = Guard::new(4).unwrap();
        assert_eq!(g.add(&[10, 11, 12, 13, 14]), 2);
        assert_eq!(g.len(), 2);
        let mut c = g.checker(&[]);
        assert_eq!(first_block(&mut c, &[1, 10, 11, 12, 13, 99]), Some(4));
        // The second window too, reached on its own.
        let mut c = g.checker(&[7]);
        assert_eq!(first_block(&mut c, &[11, 12, 13, 14]), Some(3));
    }

    #[test]
    fn blocks_across_the_prompt_generated_boundary() {
        let g = Guard::new(4).unwrap();
        g.add(&[1, 2, 3, 4]);
        for split in 1..4 {
            let mut c = g.checker(
                &[9, 9][..]
                    .iter()
                    .chain(&[1, 2, 3, 4][..split])
                    .copied()
                    .collect::<Vec<_>>(),
            );
            assert_eq!(
                first_block(&mut c, &[1, 2, 3, 4][split..]),
                Some(3 - split),
                "split {split}"
            );
        }
    }

    #[test]
    fn a_window_entirely_in_the_prompt_is_not_blocked() {
        let g = Guard::new(3).unwrap();
        g.add(&[5, 6, 7]);
        let mut c = g.checker(&[5, 6, 7]);
        assert_eq!(first_block(&mut c, &[8, 9, 10]), None);
        // But repeating it in the generated text is.
        assert_eq!(first_block(&mut c, &[5, 6, 7]), Some(2));
    }

    #[test]
    fn windows_added_after_the_checker_was_created_are_seen() {
        let g = Guard::new(3).unwrap();
        let mut c = g.checker(&[1]);
        assert!(!c.push(2));
        g.add(&[1, 2, 3]);
        assert!(c.push(3));
        // Through a clone of the guard too (shared set).
        let g2 = g.clone();
        g2.add(&[4, 5, 6]);
        assert_eq!(first_block(&mut c, &[4, 5, 6]), Some(2));
    }

    #[test]
    fn a_window_differing_in_one_token_is_not_blocked() {
        let g = Guard::new(5).unwrap();
        let seq = [3, 1, 4, 1, 5, 9, 2, 6];
        g.add(&seq);
        for pos in 0..5 {
            let mut w = seq[..5].to_vec();
            w[pos] += 100;
            let mut c = g.checker(&[]);
            assert_eq!(first_block(&mut c, &w), None, "changed position {pos}");
            assert!(!g.contains(&w));
        }
        // Same tokens, different order.
        let mut c = g.checker(&[]);
        assert_eq!(first_block(&mut c, &[1, 3, 4, 1, 5]), None);
    }

    #[test]
    fn only_the_registered_window_blocks_when_hashes_are_verified() {
        let g = Guard::new(3).unwrap();
        g.add(&[7, 8, 9]);
        // Plant a hash-table entry for an unregistered window: its bucket points at the registered
        // window's tokens, as a hash collision would. Verification must reject it.
        let other = [9, 8, 7];
        {
            let mut w = g.write();
            let target = w.by_hash.values().next().unwrap()[0];
            w.by_hash.insert(window_hash(&other), vec![target]);
        }
        let mut c = g.checker(&[]);
        assert_eq!(first_block(&mut c, &other), None);
        let mut c = g.checker(&[]);
        assert_eq!(first_block(&mut c, &[7, 8, 9]), Some(2));
    }

    #[test]
    fn short_sequences_register_nothing_and_duplicates_count_once() {
        let g = Guard::new(4).unwrap();
        assert_eq!(g.add(&[1, 2, 3]), 0);
        assert!(g.is_empty());
        assert_eq!(g.add(&[1, 2, 3, 4, 1, 2, 3, 4]), 4);
        assert_eq!(g.add(&[1, 2, 3, 4]), 0);
        assert_eq!(g.len(), 4);
        assert_eq!(g.n(), 4);
    }

    #[test]
    fn the_rolling_hash_equals_the_window_hash() {
        let g = Guard::new(6).unwrap();
        let toks: Vec<u32> = (0..50).map(|i| (i * 7919 % 101) as u32).collect();
        let mut c = g.checker(&toks[..3]);
        for (i, &t) in toks[3..].iter().enumerate() {
            c.push(t);
            let end = i + 4;
            if end >= 6 {
                assert_eq!(c.hash, window_hash(&toks[end - 6..end]));
            }
        }
    }

    #[test]
    fn window_of_one_token() {
        let g = Guard::new(1).unwrap();
        g.add(&[42]);
        let mut c = g.checker(&[42]);
        assert!(!c.push(41));
        assert!(c.push(42));
    }

    #[test]
    fn replace_drops_old_windows_for_existing_checkers() {
        let g = Guard::new(2).unwrap();
        g.add(&[1, 2]);
        let mut c = g.checker(&[1]);
        assert_eq!(g.replace(&[vec![3, 4]]), 1);
        assert!(!c.push(2));
        assert!(!c.push(3));
        assert!(c.push(4));
    }

    #[test]
    fn concurrent_adds_and_checks() {
        let g = Guard::new(3).unwrap();
        std::thread::scope(|s| {
            for k in 0..4u32 {
                let g = g.clone();
                s.spawn(move || {
                    for i in 0..200 {
                        g.add(&[k, i, i + 1, i + 2]);
                    }
                });
            }
            let mut c = g.checker(&[]);
            for i in 0..1000 {
                c.push(i % 7);
            }
        });
        let mut c = g.checker(&[2, 50]);
        assert!(c.push(51));
    }

    #[test]
    fn bench_overhead_runs() {
        let ns = bench_overhead(8, 10_000);
        assert!(ns.is_finite() && ns > 0.0);
    }
}
