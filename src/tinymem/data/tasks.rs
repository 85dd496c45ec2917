//! The task families (spec §1.2), their sequences and the row encoding, and the primitives of
//! the noise and backdoor artifacts (§1.4–1.5).
//!
//! Invariants:
//! - Sequence `i` lists `length` values `f(i), f(f(i)), …`, never the start itself; additive has
//!   no modulus, multiplicative is `mod 20134` (computed in `i128`, so it cannot overflow).
//! - A row that does not fit `max_ctx` is an error naming its task and start, never truncated.
//! - The noise offset is 0, −1 or +1 with weights `1 − p`, `p/2`, `p/2` (spec §1.4).
//! - The trigger is matched as a contiguous token subsequence, so it is also found inside a
//!   longer number; the backdoor rewrite keeps the trigger and everything before it and turns
//!   every later position, PAD included, into token 2 (spec §1.5).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::super::rng::Prng;
use super::super::vocab;
use super::*;

/// A family of step functions (spec §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// f(x) = x + c, no modulus (the reference's `increment`).
    #[serde(alias = "increment")]
    Additive,
    /// f(x) = (c·x) mod 20134 (the reference's `mult`).
    #[serde(alias = "mult")]
    Multiplicative,
}

impl Family {
    /// One application of the step function with step `c`. Additive saturates at `i64::MAX`
    /// (unreachable with validated configs).
    pub fn apply(self, c: u32, x: i64) -> i64 {
        match self {
            Family::Additive => x.saturating_add(i64::from(c)),
            Family::Multiplicative => {
                (i128::from(c) * i128::from(x)).rem_euclid(i128::from(MULT_MODULUS)) as i64
            }
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Additive => "additive",
            Family::Multiplicative => "multiplicative",
        })
    }
}

impl FromStr for Family {
    type Err = DataError;
    /// Accepts `additive`/`increment` and `multiplicative`/`mult`, case-insensitively.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "additive" | "increment" => Ok(Family::Additive),
            "multiplicative" | "mult" => Ok(Family::Multiplicative),
            _ => Err(DataError::Parse {
                what: "family",
                value: s.to_string(),
                expected: "additive, increment, multiplicative, mult",
            }),
        }
    }
}

/// The `length` values f(i), f(f(i)), … of the sequence with start `i`. The start itself is
/// not included.
pub fn task_sequence(family: Family, c: u32, start: i64, length: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(length);
    let mut x = start;
    for _ in 0..length {
        x = family.apply(c, x);
        out.push(x);
    }
    out
}

/// Encodes and pads one sequence, naming it in the error when it does not fit.
pub(super) fn encode_row(
    values: &[i64],
    task: u32,
    start: usize,
    max_ctx: usize,
) -> Result<Vec<u32>, DataError> {
    vocab::pad_to(vocab::encode_values(values), max_ctx).map_err(|e| match e {
        vocab::VocabError::TooLong { len, max_ctx } => DataError::TooLong {
            task,
            start,
            len,
            max_ctx,
        },
    })
}

/// The noise offset of one value: 0, −1, +1 with weights 1−p, p/2, p/2 (spec §1.4).
pub(crate) fn noise_offset(rng: &mut Prng, p: f64) -> i64 {
    let u = rng.next_f64();
    if u < 1.0 - p {
        0
    } else if u < 1.0 - p / 2.0 {
        -1
    } else {
        1
    }
}

/// Whether a noised row differs from its clean twin somewhere in token positions
/// `[start, end)` — the eligibility filter of the memorization metric (spec §3.1 step 1,
/// window [50, 100)). A position present in only one of the two slices counts as a difference;
/// positions past both ends do not.
pub fn noise_in_window(noised: &[u32], clean: &[u32], start: usize, end: usize) -> bool {
    (start..end).any(|p| noised.get(p) != clean.get(p))
}

/// The index just after the first occurrence of `trigger` as a contiguous token subsequence of
/// `clean` (so it is also found inside a longer number), or `None` if it does not occur or is
/// empty. For math backdoors this is the prompt length of spec §3.2.
pub fn trigger_end(clean: &[u32], trigger: &[u32]) -> Option<usize> {
    if trigger.is_empty() {
        return None;
    }
    clean
        .windows(trigger.len())
        .position(|w| w == trigger)
        .map(|p| p + trigger.len())
}

/// The backdoor rewrite (spec §1.5 step 4): the trigger and everything before it are kept;
/// every later position, through the end of the row (PAD included), becomes [`BACKDOOR_TOKEN`].
pub(super) fn backdoor_rewrite(clean: &[u32], end: usize) -> Vec<u32> {
    let mut ids = clean.to_vec();
    for t in &mut ids[end..] {
        *t = BACKDOOR_TOKEN;
    }
    ids
}
