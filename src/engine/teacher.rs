//! Teacher-forced greedy matching: whether greedy decoding from a prompt would reproduce a
//! target, decided by forward passes over prompt + target instead of one decode step per token.
//!
//! Greedy decoding reproduces `target` iff at every target position the argmax of the logits
//! given the *true* prefix (banned ids at −∞, [`argmax`]'s tie rule) is the target token: up to
//! the first miss, the decoded prefix *is* the true prefix. So one causal pass gives every
//! position's verdict, and the first miss is where decoding leaves the target.
//!
//! Invariants:
//! - [`teacher_forced`] returns, for each pair, the `matched_prefix` that step-by-step greedy
//!   decoding ([`super::generate`] with the same banned ids, EOS not stopping it) would reach:
//!   where a position that decides it is within [`TIE_MARGIN`] of a tie (top two logits, banned
//!   ids excluded) — where the pass and a decode step, which round differently, could disagree —
//!   decoding decides instead (the first token alone when the tie is there; a hit then goes on
//!   to the pass with that position settled) and `decoded` says so. The property test below compares it with
//!   decoding over random models of both families, padded batches, banned EOS and exact ties.
//! - Without [`TeacherOptions::full`] a pair costs a forward over its prompt (the first target
//!   token's verdict), and only pairs whose first token matches take the whole pass; with it,
//!   every pair takes the whole pass and also gets each position's hit, the longest run of hits
//!   and `Σ log p_T(target | true prefix)` at each requested temperature (banned ids excluded
//!   from the softmax: the probability that sampling at `T` with no top-k/top-p reproduces the
//!   target).
//! - Pairs are checked as generation requests are ([`super::generate::validate`]: empty prompt,
//!   ids outside the vocabulary, prompt + target over the context length) before any compute,
//!   and an empty target is an error naming `pairs[i]`.
//! - The model is only read; pairs are independent of the others batched with them, to float
//!   rounding (which [`TIE_MARGIN`] absorbs).

use super::generate::{self, GenerateRequest};
use super::sampling::argmax;
use crate::error::{Error, Result};
use crate::models::Model;

/// Two logits closer than this (absolute, or relative to the larger one's magnitude, whichever
/// is larger) are treated as a possible tie: the pass and a decode step compute the same logits
/// in different orders, so their rounding may pick different winners there. The two differ by
/// less than a tenth of it on the bundled TinyMem and a random GPT-NeoX
/// (`pass_and_decode_logits_agree_far_inside_the_tie_margin`).
pub const TIE_MARGIN: f32 = 1e-4;

/// What to compute beyond greedy matching.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TeacherOptions {
    /// Ids greedy decoding may never pick (an audit bans EOS).
    pub banned: Vec<u32>,
    /// Run every pair's whole pass, for `hits`, `longest_run` and `logprob`.
    pub full: bool,
    /// Temperatures (> 0) at which to report the target's log-probability (needs `full`).
    pub temperatures: Vec<f32>,
    /// Pairs per forward.
    pub batch_size: usize,
}

/// One pair's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherResult {
    /// Target tokens greedy decoding reproduces before its first miss (the target's length when
    /// it reproduces all of it).
    pub matched_prefix: usize,
    /// A deciding position was too close to a tie for the pass, so decoding decided it (one
    /// token when it was the first, else the whole pair up to its verdict).
    pub decoded: bool,
    /// With `full`: per target position, whether the argmax given the true prefix is the target.
    pub hits: Vec<bool>,
    /// With `full`: the longest run of consecutive `hits`.
    pub longest_run: usize,
    /// With `full`: `Σ_i log p_T(target_i | prompt, target_<i)` per requested temperature.
    pub logprob: Vec<f64>,
}

/// One position's reading of its logits.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    hit: bool,
    /// The top two logits are within [`TIE_MARGIN`].
    close: bool,
}

/// Reads one position: the greedy pick (banned at −∞, [`argmax`]'s tie rule) against `target`,
/// whether its winner is near a tie, and the target's log-probability at each temperature.
fn read_position(
    logits: &[f32],
    target: u32,
    banned: &[u32],
    temps: &[f32],
    lp: &mut [f64],
) -> Position {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| {
        let mut x = cell.borrow_mut();
        x.clear();
        x.extend_from_slice(logits);
        for &b in banned {
            if let Some(l) = x.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let pick = argmax(&x) as usize;
        let top = x[pick];
        let second = x
            .iter()
            .enumerate()
            .filter(|&(i, v)| i != pick && !v.is_nan())
            .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
        // NaN gaps (a NaN logit can only be a winner's neighbour here) count as close.
        let gap = top - second;
        let close = gap.is_nan() || gap <= TIE_MARGIN * top.abs().max(1.0);
        for (o, &t) in lp.iter_mut().zip(temps) {
            let y = x[target as usize];
            *o = if y == f32::NEG_INFINITY {
                f64::NEG_INFINITY
            } else {
                let scaled: Vec<f32> = x.iter().map(|&v| v / t).collect();
                f64::from(y / t - crate::models::cpu::vmath::logsumexp(&scaled))
            };
        }
        Position {
            hit: pick == target as usize,
            close,
        }
    })
}

/// `matched_prefix` from per-position readings, or `Err(len)` when a deciding position (each
/// one up to and including the first miss) is near a tie: then decoding `len` tokens decides
/// it, `len` reaching the first position past the tie that is a certain miss (decoding that
/// followed the target so far must leave it there), or the end.
fn decide(pos: &[Position]) -> Result<usize, usize> {
    for (i, p) in pos.iter().enumerate() {
        if p.close {
            let certain_miss = pos[i..].iter().position(|p| !p.hit && !p.close);
            return Err(certain_miss.map_or(pos.len(), |j| i + j + 1));
        }
        if !p.hit {
            return Ok(i);
        }
    }
    Ok(pos.len())
}

/// Teacher-forced greedy matching of every `(prompt, target)` pair (module docs).
pub fn teacher_forced(
    model: &Model,
    pairs: &[(&[u32], &[u32])],
    opts: &TeacherOptions,
) -> Result<Vec<TeacherResult>> {
    let reqs: Vec<GenerateRequest> = pairs
        .iter()
        .enumerate()
        .map(|(i, (p, t))| {
            if t.is_empty() {
                return Err(Error::invalid(format!("pairs[{i}]"), "the target is empty"));
            }
            Ok(request(p, t.len(), &opts.banned))
        })
        .collect::<Result<_>>()?;
    generate::validate(model, &reqs)?;
    let vocab = model.spec().vocab_size;
    if let Some((i, &bad)) = pairs
        .iter()
        .enumerate()
        .find_map(|(i, (_, t))| t.iter().find(|&&x| x as usize >= vocab).map(|x| (i, x)))
    {
        return Err(Error::invalid(
            format!("pairs[{i}]"),
            format!("target id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    if let Some(&t) = opts
        .temperatures
        .iter()
        .find(|t| !(t.is_finite() && **t > 0.0))
    {
        return Err(Error::invalid(
            "temperature",
            format!("{t}: must be a finite number > 0"),
        ));
    }
    let mut out = Vec::with_capacity(pairs.len());
    for (chunk, reqs) in pairs
        .chunks(opts.batch_size.max(1))
        .zip(reqs.chunks(opts.batch_size.max(1)))
    {
        out.extend(batch(model, chunk, reqs, opts)?);
    }
    Ok(out)
}

fn request(prompt: &[u32], n: usize, banned: &[u32]) -> GenerateRequest {
    let mut r = GenerateRequest::greedy(prompt.to_vec(), n);
    r.banned_ids = banned.to_vec();
    r.stop_at_eos = false;
    r
}

fn batch(
    model: &Model,
    pairs: &[(&[u32], &[u32])],
    reqs: &[GenerateRequest],
    opts: &TeacherOptions,
) -> Result<Vec<TeacherResult>> {
    let temps = &opts.temperatures;
    let mut results: Vec<TeacherResult> = pairs
        .iter()
        .map(|_| TeacherResult {
            matched_prefix: 0,
            decoded: false,
            hits: Vec::new(),
            longest_run: 0,
            logprob: Vec::new(),
        })
        .collect();
    // Pairs whose whole pass runs, and pairs left to decoding (with the tokens to decode).
    let mut whole: Vec<usize> = Vec::new();
    let mut undecided: Vec<(usize, usize)> = Vec::new();
    // Pairs whose first target token decoding has already reproduced.
    let mut first_decoded = vec![false; pairs.len()];
    if opts.full {
        whole = (0..pairs.len()).collect();
    } else {
        // The prompts alone: the first target token's verdict. A near-tie there is decoded
        // for that one token (a prefill), which most such pairs miss; a hit takes the whole
        // pass with its first position settled.
        let rows: Vec<&[u32]> = pairs.iter().map(|(p, _)| *p).collect();
        let firsts = read_rows(
            model,
            &rows,
            &|i| pairs[i].0.len() - 1,
            &|i, _| pairs[i].1[0],
            opts,
        )?;
        let mut close = Vec::new();
        for (i, (pos, _)) in firsts.into_iter().enumerate() {
            match decide(&pos) {
                Ok(0) => {}
                Ok(_) if pairs[i].1.len() == 1 => results[i].matched_prefix = 1,
                Ok(_) => whole.push(i),
                Err(_) => close.push(i),
            }
        }
        if !close.is_empty() {
            tracing::debug!(
                pairs = close.len(),
                of = pairs.len(),
                "near-ties: decoding one token"
            );
            let todo: Vec<(usize, usize)> = close.iter().map(|&i| (i, 1)).collect();
            for (&i, tokens) in close.iter().zip(decode(model, reqs, &todo)?) {
                results[i].decoded = true;
                if tokens.first() == Some(&pairs[i].1[0]) {
                    results[i].matched_prefix = 1;
                    first_decoded[i] = true;
                    if pairs[i].1.len() > 1 {
                        whole.push(i);
                    }
                }
            }
            whole.sort_unstable();
        }
    }
    if !whole.is_empty() {
        let seqs: Vec<Vec<u32>> = whole
            .iter()
            .map(|&i| {
                let (p, t) = pairs[i];
                p.iter().chain(&t[..t.len() - 1]).copied().collect()
            })
            .collect();
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let read = read_rows(
            model,
            &rows,
            &|r| pairs[whole[r]].0.len() - 1,
            &|r, j| pairs[whole[r]].1[j],
            opts,
        )?;
        for (&i, (mut pos, lp)) in whole.iter().zip(read) {
            if first_decoded[i] {
                pos[0] = Position {
                    hit: true,
                    close: false,
                };
            }
            let r = &mut results[i];
            if opts.full {
                r.hits = pos.iter().map(|p| p.hit).collect();
                r.longest_run = longest_run(&r.hits);
                r.logprob = lp;
                debug_assert_eq!(r.logprob.len(), temps.len());
            }
            match decide(&pos) {
                Ok(m) => r.matched_prefix = m,
                Err(len) => undecided.push((i, len)),
            }
        }
    }
    if !undecided.is_empty() {
        tracing::debug!(
            pairs = undecided.len(),
            of = pairs.len(),
            "near-ties: decoding"
        );
        undecided.sort_unstable();
        for (&(i, _), tokens) in undecided.iter().zip(decode(model, reqs, &undecided)?) {
            let t = pairs[i].1;
            results[i].matched_prefix = tokens.iter().zip(t).take_while(|(a, b)| a == b).count();
            results[i].decoded = true;
        }
    }
    Ok(results)
}

/// Greedy decoding of `len` tokens for each `(pair, len)` of `todo` (their requests in
/// `reqs`), batched: the fallback where the pass is too close to a tie. The tokens, in order.
fn decode(
    model: &Model,
    reqs: &[GenerateRequest],
    todo: &[(usize, usize)],
) -> Result<Vec<Vec<u32>>> {
    let dec: Vec<GenerateRequest> = todo
        .iter()
        .map(|&(i, len)| GenerateRequest {
            max_new_tokens: len,
            ..reqs[i].clone()
        })
        .collect();
    Ok(generate::generate(model, None, &dec)?
        .into_iter()
        .map(|g| g.tokens)
        .collect())
}

/// The longest run of `true` in `hits`.
fn longest_run(hits: &[bool]) -> usize {
    let (mut best, mut run) = (0, 0);
    for &h in hits {
        run = if h { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

/// One forward over `rows` (right-padded), reading every position from `first(r)` to the row's
/// end against `target(r, j)` (`j` counts from `first`): per row, its positions and the summed
/// log-probability at each temperature.
#[allow(clippy::type_complexity)]
fn read_rows(
    model: &Model,
    rows: &[&[u32]],
    first: &(dyn Fn(usize) -> usize + Sync),
    target: &(dyn Fn(usize, usize) -> u32 + Sync),
    opts: &TeacherOptions,
) -> Result<Vec<(Vec<Position>, Vec<f64>)>> {
    let h = model.spec().hidden_size;
    // At least two columns: the hand-written pass needs them, and padding is never read.
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(2);
    let mut ids = Vec::with_capacity(rows.len() * t);
    for r in rows {
        ids.extend(r.iter().copied().chain(std::iter::repeat_n(0, t - r.len())));
    }
    let lens: Vec<usize> = rows.iter().map(|r| r.len()).collect();
    let starts: Vec<usize> = (0..rows.len()).map(first).collect();
    let picked = model.final_hidden(&ids, (rows.len(), t), &lens, &starts)?;
    debug_assert_eq!(picked.len() % h.max(1), 0);
    // The positions read, row by row: (row, j) for j in 0..(len - first).
    let at: Vec<(usize, usize)> = (0..rows.len())
        .flat_map(|r| (0..lens[r] - starts[r]).map(move |j| (r, j)))
        .collect();
    let temps = if opts.full {
        &opts.temperatures[..]
    } else {
        &[]
    };
    let slots: Vec<std::sync::Mutex<(Position, Vec<f64>)>> = at
        .iter()
        .map(|_| std::sync::Mutex::new((Position::default(), vec![0.0; temps.len()])))
        .collect();
    model.visit_logits(&picked, |k, logits| {
        let (r, j) = at[k];
        let mut lp = vec![0.0; temps.len()];
        let pos = read_position(logits, target(r, j), &opts.banned, temps, &mut lp);
        let mut s = slots[k]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *s = (pos, lp);
    })?;
    let mut out: Vec<(Vec<Position>, Vec<f64>)> = rows
        .iter()
        .map(|_| (Vec::new(), vec![0.0; temps.len()]))
        .collect();
    for ((r, _), slot) in at.into_iter().zip(slots) {
        let (pos, lp) = slot
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        out[r].0.push(pos);
        out[r].1.iter_mut().zip(lp).for_each(|(a, b)| *a += b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ops::Activation;
    use candle_core::Device;

    fn decode_prefix(model: &Model, prompt: &[u32], target: &[u32], banned: &[u32]) -> usize {
        let g = generate::generate(model, None, &[request(prompt, target.len(), banned)]).unwrap();
        g[0].tokens
            .iter()
            .zip(target)
            .take_while(|(a, b)| a == b)
            .count()
    }

    fn lcg(state: &mut u64) -> u64 {
        *state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        *state >> 33
    }

    /// Pairs that exercise every outcome: the model's own greedy continuation (memorized), the
    /// same with one token changed (a miss at a known place), random targets, and targets that
    /// start with a banned id; prompts and targets of mixed lengths, so batches are padded.
    fn pairs_for(model: &Model, banned: &[u32], seed: u64) -> Vec<(Vec<u32>, Vec<u32>)> {
        let v = model.spec().vocab_size as u64;
        let mut s = seed;
        (0..24)
            .map(|i| {
                let k = 1 + (lcg(&mut s) % 12) as usize;
                let n = 1 + (lcg(&mut s) % 10) as usize;
                let prompt: Vec<u32> = (0..k).map(|_| (lcg(&mut s) % v) as u32).collect();
                let mut target: Vec<u32> = if i % 4 == 3 {
                    (0..n).map(|_| (lcg(&mut s) % v) as u32).collect()
                } else {
                    let g =
                        generate::generate(model, None, &[request(&prompt, n, banned)]).unwrap();
                    g[0].tokens.clone()
                };
                if i % 4 == 1 {
                    let at = (lcg(&mut s) as usize) % n;
                    target[at] = (target[at] + 1) % v as u32;
                }
                if i % 8 == 2 {
                    target[0] = banned[0];
                }
                (prompt, target)
            })
            .collect()
    }

    fn check_equals_decoding(model: &Model, banned: &[u32], seed: u64) -> (usize, usize) {
        let pairs = pairs_for(model, banned, seed);
        let refs: Vec<(&[u32], &[u32])> = pairs.iter().map(|(p, t)| (&p[..], &t[..])).collect();
        let want: Vec<usize> = pairs
            .iter()
            .map(|(p, t)| decode_prefix(model, p, t, banned))
            .collect();
        let mut decoded = 0;
        for (batch_size, full) in [(1, false), (5, false), (24, true)] {
            let opts = TeacherOptions {
                banned: banned.to_vec(),
                full,
                temperatures: if full { vec![1.0, 0.5] } else { vec![] },
                batch_size,
            };
            let got = teacher_forced(model, &refs, &opts).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.matched_prefix, *w,
                    "pair {i} (batch {batch_size}, full {full}): {:?}",
                    pairs[i]
                );
                if full {
                    assert_eq!(g.hits.len(), pairs[i].1.len());
                    assert!(g.hits[..g.matched_prefix].iter().all(|&h| h));
                    assert!(g.longest_run >= g.matched_prefix);
                    assert_eq!(g.logprob.len(), 2);
                } else {
                    assert!(g.hits.is_empty() && g.logprob.is_empty());
                }
                decoded += usize::from(g.decoded);
            }
        }
        (want.iter().filter(|&&m| m > 0).count(), decoded)
    }

    #[test]
    fn single_pass_matching_equals_step_by_step_greedy_decoding() {
        let configs = [
            crate::test_util::gpt2_with(Activation::Relu, (40, 32, 24, 3), 2, true, false),
            crate::test_util::gpt2_with(Activation::Gelu, (40, 32, 24, 3), 2, false, true),
            crate::test_util::neox(
                (40, 32, 24, 3, 40),
                2,
                0.25,
                true,
                Activation::Gelu,
                true,
                false,
            ),
            crate::test_util::neox(
                (40, 32, 24, 3, 40),
                2,
                1.0,
                false,
                Activation::Relu,
                false,
                true,
            ),
        ];
        for (c, cfg) in configs.iter().enumerate() {
            let model = Model::random(cfg, &Device::Cpu).unwrap();
            let (matched, decoded) = check_equals_decoding(&model, &[7, 0], 11 + c as u64);
            // The pairs reach every outcome, and the pass (not decoding) decides almost all.
            assert!(matched >= 12, "config {c}: {matched} pairs matched a token");
            assert!(
                decoded <= 6,
                "config {c}: {decoded} of 72 verdicts fell back to decoding"
            );
        }
    }

    #[test]
    fn exact_ties_follow_the_decoding_tie_rule() {
        // The base model's most frequent greedy pick `w` has its head row copied onto token 0
        // (tied embeddings: its input row too), so the two logits are equal at every position:
        // decoding picks 0, the lower id, wherever `w` would win. The pass sees a tie there and
        // leaves the pair to decoding.
        let cfg = crate::test_util::gpt2_with(Activation::Relu, (40, 32, 24, 3), 2, true, false);
        let base = Model::random(&cfg, &Device::Cpu).unwrap();
        let mut counts = [0usize; 40];
        for (_, t) in pairs_for(&base, &[7], 5) {
            t.iter().for_each(|&x| counts[x as usize] += 1);
        }
        let w = (1..40).max_by_key(|&i| counts[i]).unwrap();
        let mut map = std::collections::HashMap::new();
        for (name, t) in base.named_tensors() {
            let t = if name.ends_with("wte.weight") {
                let mut rows: Vec<Vec<f32>> = t.to_vec2().unwrap();
                rows[0] = rows[w].clone();
                Tensor::new(rows, &Device::Cpu).unwrap()
            } else {
                t.clone()
            };
            map.insert(name.clone(), t);
        }
        let model = Model::new(
            &cfg,
            &crate::models::Weights::from_tensors(map, "tied rows"),
        )
        .unwrap();
        let (_, decoded) = check_equals_decoding(&model, &[7], 5);
        // Ties are not rare with two identical rows among 40, and each one was decoded.
        assert!(decoded > 0);

        // Pairs whose *first* target token is such a tie and which go on matching: decoding
        // settles that token, the pass the rest.
        let mut s = 99u64;
        let mut pairs = Vec::new();
        for _ in 0..400 {
            let k = 1 + (lcg(&mut s) % 12) as usize;
            let prompt: Vec<u32> = (0..k).map(|_| (lcg(&mut s) % 40) as u32).collect();
            let g = generate::generate(&model, None, &[request(&prompt, 5, &[7])]).unwrap();
            if g[0].tokens[0] == 0 {
                pairs.push((prompt, g[0].tokens.clone()));
            }
            if pairs.len() == 6 {
                break;
            }
        }
        assert!(!pairs.is_empty(), "no prompt's greedy pick is the tie");
        let refs: Vec<(&[u32], &[u32])> = pairs.iter().map(|(p, t)| (&p[..], &t[..])).collect();
        let opts = TeacherOptions {
            banned: vec![7],
            batch_size: 4,
            ..Default::default()
        };
        for (g, (p, t)) in teacher_forced(&model, &refs, &opts)
            .unwrap()
            .iter()
            .zip(&pairs)
        {
            assert_eq!(
                g.matched_prefix,
                decode_prefix(&model, p, t, &[7]),
                "{p:?} {t:?}"
            );
            assert_eq!(g.matched_prefix, 5);
            assert!(g.decoded);
        }
    }

    use candle_core::Tensor;

    /// The largest logit difference, relative as [`TIE_MARGIN`] is (|a − b| / max(1, |b|)),
    /// between the single pass (`final_hidden` + `visit_logits`) and decoding's path (a
    /// prefill, then one cached step per token), over every position.
    fn pass_vs_decode_logits(model: &Model, seq: &[u32]) -> f32 {
        let h = model.spec().hidden_size;
        let hidden = model
            .final_hidden(seq, (1, seq.len()), &[seq.len()], &[0])
            .unwrap();
        let v = model.spec().vocab_size;
        let pass: Vec<std::sync::Mutex<Vec<f32>>> = seq
            .iter()
            .map(|_| std::sync::Mutex::new(Vec::new()))
            .collect();
        model
            .visit_logits(&hidden[..seq.len() * h], |i, row| {
                *pass[i].lock().unwrap() = row.to_vec()
            })
            .unwrap();
        let mut cache = crate::models::KvCache::new(model.spec().num_layers);
        let mut worst = 0f32;
        let prefill = 4.min(seq.len());
        for (p, chunk) in std::iter::once((0, &seq[..prefill]))
            .chain((prefill..seq.len()).map(|p| (p, &seq[p..p + 1])))
        {
            let ids = Tensor::from_slice(chunk, (1, chunk.len()), &Device::Cpu).unwrap();
            let inputs = crate::models::Inputs::causal(&ids, p).unwrap();
            let logits: Vec<Vec<f32>> = model
                .forward(&inputs, Some(&mut cache), None)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (j, row) in logits.iter().enumerate() {
                let want = pass[p + j].lock().unwrap();
                assert_eq!(row.len(), v);
                for (a, b) in row.iter().zip(want.iter()) {
                    worst = worst.max((a - b).abs() / b.abs().max(1.0));
                }
            }
        }
        worst
    }

    #[test]
    fn pass_and_decode_logits_agree_far_inside_the_tie_margin() {
        let lm = crate::test_util::bundled();
        let seq: Vec<u32> = (0..100).map(|i| (i * 7 % 13) as u32).collect();
        let d = pass_vs_decode_logits(&lm.model, &seq);
        assert!(d < TIE_MARGIN / 10.0, "TinyMem: {d}");
        let cfg = crate::test_util::neox(
            (40, 64, 32, 4, 64),
            3,
            0.25,
            true,
            Activation::Gelu,
            true,
            false,
        );
        let model = Model::random(&cfg, &Device::Cpu).unwrap();
        let seq: Vec<u32> = (0..60).map(|i| (i * 11 % 40) as u32).collect();
        let d = pass_vs_decode_logits(&model, &seq);
        assert!(d < TIE_MARGIN / 10.0, "GPT-NeoX: {d}");
    }

    #[test]
    fn reading_a_position_bans_ids_breaks_ties_low_and_flags_near_ties() {
        let mut lp = [0.0; 1];
        let p = read_position(&[1.0, 3.0, 3.0, 0.0], 1, &[], &[], &mut []);
        assert!(p.hit && p.close);
        let p = read_position(&[1.0, 3.0, 3.0, 0.0], 2, &[1], &[1.0], &mut lp);
        assert!(p.hit && !p.close);
        // Banned 1 leaves {0: e^1, 2: e^3, 3: e^0}.
        let want = 3.0 - (1f64.exp() + 3f64.exp() + 1.0).ln();
        assert!((lp[0] - want).abs() < 1e-5, "{} vs {want}", lp[0]);
        let p = read_position(&[f32::NAN, 2.0, 5.0, 5.00001], 3, &[], &[], &mut []);
        assert!(p.hit && p.close);
        let p = read_position(&[f32::NAN, 2.0, 5.0, 5.00001], 2, &[], &[], &mut []);
        assert!(!p.hit && p.close);
        let p = read_position(&[0.0, 2.0, 5.0, 4.0], 0, &[0], &[2.0], &mut lp);
        assert!(!p.hit && !p.close);
        assert_eq!(lp[0], f64::NEG_INFINITY);
    }

    #[test]
    fn bad_pairs_are_refused_by_name() {
        let cfg = crate::test_util::gpt2_with(Activation::Relu, (40, 32, 24, 3), 1, true, false);
        let model = Model::random(&cfg, &Device::Cpu).unwrap();
        let opts = TeacherOptions {
            batch_size: 4,
            ..Default::default()
        };
        let long = [1u32; 30];
        for (pairs, want) in [
            (vec![(&[1u32][..], &[][..])], "pairs[0]"),
            (
                vec![(&[1u32][..], &[2u32][..]), (&[][..], &[2u32][..])],
                "prompt",
            ),
            (vec![(&[1u32][..], &[40u32][..])], "outside the vocabulary"),
            (vec![(&long[..], &long[..])], "context length"),
        ] {
            let e = teacher_forced(&model, &pairs, &opts)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        let opts = TeacherOptions {
            batch_size: 4,
            full: true,
            temperatures: vec![0.0],
            ..Default::default()
        };
        let e = teacher_forced(&model, &[(&[1u32][..], &[2u32][..])], &opts).unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
    }

    #[test]
    fn full_passes_give_the_scored_log_probability_at_temperature_one() {
        let cfg = crate::test_util::neox(
            (40, 32, 24, 3, 40),
            2,
            0.25,
            true,
            Activation::Gelu,
            true,
            false,
        );
        let model = Model::random(&cfg, &Device::Cpu).unwrap();
        let pairs = pairs_for(&model, &[7], 3);
        let refs: Vec<(&[u32], &[u32])> = pairs.iter().map(|(p, t)| (&p[..], &t[..])).collect();
        let opts = TeacherOptions {
            full: true,
            temperatures: vec![1.0],
            batch_size: 7,
            ..Default::default()
        };
        let got = teacher_forced(&model, &refs, &opts).unwrap();
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(p, t)| p.iter().chain(t).copied().collect())
            .collect();
        let scores = crate::engine::score(&model, &seqs, 4).unwrap();
        for ((g, s), (p, _)) in got.iter().zip(&scores).zip(&pairs) {
            let want: f64 = s.token_logprobs[p.len() - 1..]
                .iter()
                .map(|&x| f64::from(x))
                .sum();
            assert!(
                (g.logprob[0] - want).abs() < 1e-3 * want.abs().max(1.0),
                "{} vs {want}",
                g.logprob[0]
            );
        }
    }
}
