//! The hand-written pass's forward-only entry points: final hidden states (the single-pass
//! audit), per-row losses under replaced MLP weights (attribution by ablation) and MLP
//! activation sums (attribution by activations), each on the calling thread's workspace.

use candle_core::{bail, Result};

use super::{run, HandWrittenPass, MlpGradWorkspace, Want};

/// The final LayerNorm's output at positions `from[r]..lens[r]` of each right-padded row `r`,
/// rows in order (`[Σ (lens[r] − from[r]), H]` row-major f32), through the pass's forward on
/// the calling thread's buffers (kept for its next call). A position sees only the positions
/// before it, so a row's states do not depend on its padding or on the other rows, to float
/// rounding.
pub(crate) fn final_hidden<M: HandWrittenPass>(
    m: &M,
    ids: &[u32],
    (b, t): (usize, usize),
    lens: &[usize],
    from: &[usize],
) -> Result<Vec<f32>> {
    if from.len() != b || from.iter().zip(lens).any(|(f, l)| f > l) {
        bail!(
            "final_hidden: {} start positions for {b} rows, or one past its row's end",
            from.len()
        );
    }
    forward_only(m, ids, (b, t), lens, Want::Hidden(from), |ws| {
        std::mem::take(&mut ws.hidden)
    })
}

/// A forward-only pass (`Want::Forward` or `Want::Hidden`) of `m` on the calling thread's
/// workspace, kept for its next call (a new one would fault in fresh zeroed pages, which took
/// as long as the arithmetic), then `read` of what it left there.
pub(crate) fn forward_only<M: HandWrittenPass, R>(
    m: &M,
    ids: &[u32],
    (b, t): (usize, usize),
    lens: &[usize],
    want: Want<'_>,
    read: impl FnOnce(&mut MlpGradWorkspace) -> R,
) -> Result<R> {
    thread_local! {
        static WORKSPACE: std::cell::RefCell<MlpGradWorkspace> = Default::default();
    }
    WORKSPACE.with(|cell| {
        let mut ws = cell.borrow_mut();
        let row_weight = vec![0.0; b];
        run(m, ids, (b, t), lens, &row_weight, None, want, &mut ws)?;
        Ok(read(&mut ws))
    })
}

/// Each row's mean next-token cross-entropy over its first `lens[r]` tokens, with the MLP
/// matrices replaced by `mlp` (one `(in, out)` pair per layer in the weights' layout).
pub(crate) fn row_losses<M: HandWrittenPass>(
    m: &M,
    ids: &[u32],
    (b, t): (usize, usize),
    lens: &[usize],
    mlp: &[(Vec<f32>, Vec<f32>)],
    ws: &mut MlpGradWorkspace,
) -> Result<Vec<f64>> {
    let row_weight = vec![0.0; b];
    Ok(run(
        m,
        ids,
        (b, t),
        lens,
        &row_weight,
        Some(mlp),
        Want::Forward,
        ws,
    )?
    .1)
}

/// Per row `r` and block `l`, the sum of the MLP's activations (after the nonlinearity) over
/// positions `from[r]..lens[r] − 1`: `[b, L, I]` row-major.
pub(crate) fn mlp_activation_sums<M: HandWrittenPass>(
    m: &M,
    ids: &[u32],
    (b, t): (usize, usize),
    lens: &[usize],
    from: &[usize],
) -> Result<Vec<f32>> {
    // `run_parts` refuses start positions that do not fit the rows.
    forward_only(m, ids, (b, t), lens, Want::Activations(from), |ws| {
        std::mem::take(&mut ws.act)
    })
}

/// Integrated Gradients' pass: for each right-padded row `r`, with block `layer`'s MLP
/// activation at the row's last predicting position (`lens[r] − 2`) multiplied by `scale[r]`,
/// the probability of the row's last token there (per row) and its gradient with respect to
/// that scaled activation (`[b, I]` row-major), on the calling thread's workspace.
pub(crate) fn patched_grads<M: HandWrittenPass>(
    m: &M,
    ids: &[u32],
    (b, t): (usize, usize),
    lens: &[usize],
    layer: usize,
    scale: &[f32],
) -> Result<(Vec<f64>, Vec<f32>)> {
    thread_local! {
        static WORKSPACE: std::cell::RefCell<MlpGradWorkspace> = Default::default();
    }
    WORKSPACE.with(|cell| {
        let mut ws = cell.borrow_mut();
        let row_weight = vec![1.0; b];
        let want = Want::Patch { layer, scale };
        let (_, ce) = run(m, ids, (b, t), lens, &row_weight, None, want, &mut ws)?;
        let probs = ce.iter().map(|&c| (-c).exp()).collect();
        Ok((probs, std::mem::take(&mut ws.act)))
    })
}
