//! Row groups of the hand-written pass: how a batch is cut, which thread runs which group,
//! and the one sum per parameter gradient that the groups add into.
//!
//! Invariants:
//! - At most one group per thread runs at a time, each on its thread's [`PartBufs`]; the groups
//!   running at once hold at most [`ACT_BYTES_PER_PASS`] of activations (a group never has
//!   fewer than one row).
//! - Every parameter gradient exists once, in [`MlpGradWorkspace`]: group `g` adds its share
//!   after group `g − 1` has added its own (group 0 copies), so the sum has the same bits
//!   whichever thread finishes first.
//! - A panic in a group releases the groups waiting for its turn and is re-raised once every
//!   group has stopped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use candle_core::{bail, Result};
use rayon::prelude::*;

use super::{part, pidx, Dims, PartBufs, Want, Weights, P_FC, P_MPROJ};

/// Buffers kept between steps so that steady-state steps allocate nothing large: one set of
/// activation buffers per worker (at most one per thread), and one set of parameter gradients
/// that every row group adds into.
#[derive(Default)]
pub struct MlpGradWorkspace {
    pub(crate) parts: Vec<PartBufs>,
    /// Gradients summed over every row group, in [`pidx`] order; only those the pass wants are
    /// filled.
    acc: Vec<Turns>,
    /// Each row's mean loss, in row order.
    row_loss: Vec<f64>,
    /// [`Want::Forward`]: `log p(ids[r, j + 1])` for `j < t − 1`, `[b, t − 1]` row-major (0
    /// past a row's length).
    pub(crate) token_lp: Vec<f32>,
    /// [`Want::Hidden`]: the final LayerNorm's output at the wanted positions, rows in order.
    pub(crate) hidden: Vec<f32>,
    /// [`Want::Activations`]: per row, each block's MLP activation sums, `[b, L, I]`.
    pub(crate) act: Vec<f32>,
}

impl MlpGradWorkspace {
    /// The last [`HandWrittenPass::mlp_grads`]' `(∂L/∂c_fc, ∂L/∂c_proj)` buffers per block, to
    /// read or to reuse in place. Between passes their contents are free for any use (the next
    /// pass overwrites them): the unlearning step turns them into the scores' gradients. Empty
    /// before the first pass.
    pub(crate) fn mlp_grads_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let nl = self.acc.len().saturating_sub(pidx(0, 3)) / 12;
        self.acc
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| (0..nl).any(|li| *i == pidx(li, P_FC) || *i == pidx(li, P_MPROJ)))
            .map(|(_, t)| &mut t.state.get_mut().unwrap_or_else(PoisonError::into_inner).v)
            .collect()
    }
}

/// One parameter's gradient, summed over the row groups in group order (group 0 first) so that
/// the sum is the same whichever thread finishes first: a group adds its share when every
/// group before it has.
#[derive(Default)]
struct Turns {
    state: Mutex<Acc>,
    turn: Condvar,
}

#[derive(Default)]
struct Acc {
    /// Row groups that have added their share.
    done: usize,
    v: Vec<f32>,
}

/// [`Acc::done`] once a group has panicked: the others stop waiting for their turns.
const ABORTED: usize = usize::MAX;

/// Where row groups add their parameter gradients.
pub(super) struct Sink<'a> {
    acc: &'a [Turns],
    group: usize,
}

impl Sink<'_> {
    /// Adds this group's share `g` to gradient `i` (the first group copies it).
    pub(super) fn add(&self, i: usize, g: &[f32]) {
        self.on_turn(i, |v, first| {
            if first {
                v.clear();
                v.extend_from_slice(g);
            } else {
                v.iter_mut().zip(g).for_each(|(a, &x)| *a += x);
            }
        });
    }

    /// Runs `f` on gradient `i` (`len` values, zeroed by the first group) on this group's
    /// turn: for gradients the groups scatter into.
    pub(super) fn scatter(&self, i: usize, len: usize, f: impl FnOnce(&mut [f32])) {
        self.on_turn(i, |v, first| {
            if first {
                v.clear();
                v.resize(len, 0.0);
            }
            f(v)
        });
    }

    /// [`Self::add`] of a weight's and its bias's shares (`i`, `i + 1`).
    pub(super) fn add_pair(&self, i: usize, gw: &[f32], gb: &[f32]) {
        self.add(i, gw);
        self.add(i + 1, gb);
    }

    /// Runs `f(gradient i, whether this is the first group)` once every earlier group has.
    fn on_turn(&self, i: usize, f: impl FnOnce(&mut Vec<f32>, bool)) {
        let t = &self.acc[i];
        let mut a = t.state.lock().unwrap_or_else(PoisonError::into_inner);
        while a.done != self.group {
            if a.done == ABORTED {
                return;
            }
            a = t.turn.wait(a).unwrap_or_else(PoisonError::into_inner);
        }
        f(&mut a.v, self.group == 0);
        a.done += 1;
        drop(a);
        t.turn.notify_all();
    }
}

/// Every gradient the last pass summed, in [`pidx`] order (empty where it wanted none).
pub(super) fn sums(ws: &mut MlpGradWorkspace) -> Vec<&[f32]> {
    ws.acc
        .iter_mut()
        .map(|t| {
            let a = t.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            a.v.as_slice()
        })
        .collect()
}

/// Weight bytes (blocks and head) past which a pass runs one row group per thread instead of
/// four.
const BIG_WEIGHTS: usize = 64 << 20;

/// Activation bytes the row groups running at once may hold together: a group gets fewer rows
/// (never fewer than one) when more would exceed it.
const ACT_BYTES_PER_PASS: usize = 1 << 30;

/// Runs the forward and the backward `want` asks for over row groups in parallel (at most one
/// group per thread at a time), summing each parameter gradient over the groups into
/// `ws.acc` in group order. Returns the loss `Σ_r row_weight[r] · ℓ_r` and each row's `ℓ_r`.
/// Bad rows are errors, checked first.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_parts(
    d: Dims,
    w: &Weights,
    ids: &[u32],
    b: usize,
    lens: &[usize],
    row_weight: &[f32],
    want: Want,
    ws: &mut MlpGradWorkspace,
) -> Result<(f64, Vec<f64>)> {
    let t = d.t;
    if ids.len() != b * t || lens.len() != b || row_weight.len() != b || b == 0 {
        bail!("mlp_grads: ids, lens and row weights do not describe {b} rows of {t}");
    }
    if t < 2 || t > d.npos {
        bail!("mlp_grads: {t} positions outside 2..={}", d.npos);
    }
    if let Some(&l) = lens.iter().find(|&&l| l > t) {
        bail!("mlp_grads: row length {l} is longer than {t}");
    }
    if let Some(&id) = ids.iter().find(|&&i| i as usize >= d.v) {
        bail!(
            "mlp_grads: token id {id} is outside the vocabulary of {}",
            d.v
        );
    }
    // Row groups: four per thread (one for big models, see BIG_WEIGHTS), so that a thread
    // slowed down by another process leaves work for the other to take, and each group's
    // activations stay closer to the core's L2;
    // fewer rows per group where the groups running at once would hold more than
    // ACT_BYTES_PER_PASS of activations. Each thread keeps one set of buffers for the groups
    // it runs.
    let nl = w.blocks.len();
    let threads = rayon::current_num_threads().max(1);
    let kept = if matches!(want, Want::Forward | Want::Hidden(_) | Want::Activations(_)) {
        1
    } else {
        nl
    };
    let row_bytes = 4 * t * (kept * (7 * d.h + 2 * d.inner + d.nh * t) + (nl + 8) * d.h + d.v);
    let max_rows = (ACT_BYTES_PER_PASS / (threads * row_bytes).max(1)).max(1);
    // Every group reads every block weight three times and the head twice: past BIG_WEIGHTS
    // of them, one group per thread reads them fewer times, which gains more than the
    // balance loses.
    let weight_bytes = 4 * (nl * (4 * d.h * d.h + 2 * d.h * d.inner) + d.v * d.h);
    let per_thread = if weight_bytes > BIG_WEIGHTS { 1 } else { 4 };
    let per = b.div_ceil(per_thread * threads).clamp(1, max_rows);
    let groups = b.div_ceil(per);
    let MlpGradWorkspace {
        parts,
        acc,
        row_loss,
        token_lp,
        hidden,
        act,
    } = ws;
    parts.resize_with(threads.min(groups), PartBufs::default);
    acc.resize_with(pidx(nl, 3), Turns::default);
    for turns in acc.iter_mut() {
        turns
            .state
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .done = 0;
    }
    row_loss.clear();
    row_loss.resize(b, 0.0);
    token_lp.clear();
    if want == Want::Forward {
        token_lp.resize(b * (t - 1), 0.0);
    }
    if let Want::Dropped(mask) = want {
        if mask.len() != b * d.inner {
            bail!(
                "dropped_grads: a neuron mask of {} values for {b} rows of {} neurons",
                mask.len(),
                d.inner
            );
        }
    }
    if let Want::Patch { layer, scale } = want {
        if layer >= nl || scale.len() != b || lens.iter().any(|&l| l < 2) {
            bail!("mlp_grads: a patch at block {layer} of {nl}, {} scales for {b} rows, or a row under 2 tokens", scale.len());
        }
    }
    if let Want::Hidden(from) | Want::Activations(from) = want {
        if from.len() != b || from.iter().zip(lens).any(|(f, l)| f > l) {
            bail!("mlp_grads: positions wanted from past a row's end");
        }
    }
    // Want::Hidden: where each row's wanted states start in the output.
    let mut offset = vec![0usize; b + 1];
    if let Want::Hidden(from) = want {
        for r in 0..b {
            offset[r + 1] = offset[r] + lens[r] - from[r];
        }
    }
    hidden.clear();
    hidden.resize(offset[b] * d.h, 0.0);
    let per_row_act = nl * d.inner;
    act.clear();
    let per_row_act = match want {
        Want::Patch { .. } => d.inner,
        _ => per_row_act,
    };
    if let Want::Activations(_) | Want::Patch { .. } = want {
        act.resize(b * per_row_act, 0.0);
    }
    let out = Mutex::new((row_loss, token_lp, hidden, act));
    let next = AtomicUsize::new(0);
    let acc = &acc[..];
    let panicked = Mutex::new(None);
    parts.par_iter_mut().for_each(|part_ws| loop {
        let gi = next.fetch_add(1, Ordering::Relaxed);
        if gi >= groups {
            break;
        }
        let (r0, r1) = (gi * per, ((gi + 1) * per).min(b));
        let sink = Sink { acc, group: gi };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            part(
                d,
                w,
                &ids[r0 * t..r1 * t],
                &lens[r0..r1],
                &row_weight[r0..r1],
                match want {
                    Want::Hidden(from) => Want::Hidden(&from[r0..r1]),
                    Want::Activations(from) => Want::Activations(&from[r0..r1]),
                    Want::Dropped(mask) => Want::Dropped(&mask[r0 * d.inner..r1 * d.inner]),
                    Want::Patch { layer, scale } => Want::Patch {
                        layer,
                        scale: &scale[r0..r1],
                    },
                    other => other,
                },
                part_ws,
                &sink,
            )
        }));
        if let Err(payload) = ran {
            // Later groups wait for this one's turn: let them through, then re-raise.
            for turns in acc {
                turns
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .done = ABORTED;
                turns.turn.notify_all();
            }
            *panicked.lock().unwrap_or_else(PoisonError::into_inner) = Some(payload);
            break;
        }
        let mut o = out.lock().unwrap_or_else(PoisonError::into_inner);
        o.0[r0..r1].copy_from_slice(&part_ws.row_loss);
        if want == Want::Forward {
            o.1[r0 * (t - 1)..r1 * (t - 1)].copy_from_slice(&part_ws.token_lp);
        }
        if let Want::Hidden(_) = want {
            let (a, z) = (offset[r0] * d.h, offset[r1] * d.h);
            o.2[a..z].copy_from_slice(&part_ws.hf[..z - a]);
        }
        if let Want::Activations(_) | Want::Patch { .. } = want {
            o.3[r0 * per_row_act..r1 * per_row_act].copy_from_slice(&part_ws.act);
        }
    });
    if let Some(payload) = panicked
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        std::panic::resume_unwind(payload);
    }
    let row_loss = ws.row_loss.clone();
    let loss = row_loss
        .iter()
        .zip(row_weight)
        .map(|(l, &w)| l * f64::from(w))
        .sum();
    Ok((loss, row_loss))
}
