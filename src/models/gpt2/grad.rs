//! GPT-2 on the hand-written pass ([`crate::models::pass`]): its weights as slices, its sizes
//! and parameter order, and scoring through the pass.
//!
//! Invariants:
//! - GPT-2's weights go to the pass as they are stored (`Conv1D`, `[in, out]`), with learned
//!   position embeddings, `[Q | K | V]` packed heads and a sequential residual; the attention
//!   scale follows `scale_attn_weights` and `scale_attn_by_inverse_layer_idx`.
//! - The pass's gradient slots are GPT-2's `named_tensors` order, so `train_grads` returns
//!   them as they are.
//! - `token_logprobs` scores through the pass's forward, keeping its buffers on the calling
//!   thread between calls; `engine::score` tests it against the candle path.

use candle_core::Result;

use super::Gpt2;
use crate::models::cpu::attention::QkvLayout;
use crate::models::cpu::storage::view;
use crate::models::ops::Activation;
use crate::models::pass::{BlockWeights, HandWrittenPass, Mlp, Want, Weights};
use crate::models::ModelSpec;

impl Gpt2 {
    /// Each row's log-probability of its next token at every position, `[b, t − 1]` row-major
    /// (0 at and past position `lens[r] − 1`), for `ids` as [`HandWrittenPass::mlp_grads`] takes them:
    /// scoring through this module's forward (row groups in parallel, single-threaded gemms,
    /// causal attention without the upper triangle). Needs [`HandWrittenPass::mlp_grads_supported`].
    ///
    /// The buffers stay with the calling thread for its next call (a scoring batch reuses the
    /// previous one's pages instead of faulting in fresh zeroed ones, which took as long as the
    /// arithmetic): about 7.5 MB per row group (eight groups on two threads) for TinyMem's 32 × 150
    /// batches.
    pub fn token_logprobs(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        lens: &[usize],
    ) -> Result<Vec<f32>> {
        crate::models::pass::forward_only(self, ids, (b, t), lens, Want::Forward, |ws| {
            ws.token_lp.clone()
        })
    }

    /// Runs `f` on every weight as a plain slice (the read guards are held for the call), with
    /// the MLP matrices replaced by `mlp` (`(c_fc, c_proj)` per block) when given. Needs f32
    /// weights on the CPU; `mlp`, when given, must have one pair per block.
    pub(super) fn with_weights<R>(
        &self,
        mlp: Option<&[(Vec<f32>, Vec<f32>)]>,
        f: impl FnOnce(&Weights) -> Result<R>,
    ) -> Result<R> {
        <Self as HandWrittenPass>::with_weights(self, mlp, f)
    }
}

impl HandWrittenPass for Gpt2 {
    /// GPT-2's `named_tensors` order is the pass's own.
    fn param_slots(&self) -> Vec<usize> {
        (0..self.named.len()).collect()
    }

    fn shape(&self) -> (ModelSpec, f32, Activation) {
        (
            self.cfg.spec(),
            self.cfg.layer_norm_epsilon as f32,
            self.cfg.activation,
        )
    }

    fn with_weights<R>(&self, mlp: Mlp, f: impl FnOnce(&Weights) -> Result<R>) -> Result<R> {
        let cfg = &self.cfg;
        let (h, nh) = (cfg.n_embd, cfg.n_head);
        let wte = view(&self.wte);
        let wpe = view(&self.wpe);
        // Tied: the head is `wte` itself (one read guard per storage).
        let lm_head = (!cfg.tie_word_embeddings).then(|| view(&self.lm_head));
        let lnf = (view(&self.ln_f.w), view(&self.ln_f.b));
        let guards: Vec<[_; 12]> = self
            .blocks
            .iter()
            .map(|blk| {
                let (ln1, ln2) = (&blk.ln_1, &blk.ln_2);
                let attn = [
                    &blk.c_attn_w,
                    &blk.c_attn_b,
                    &blk.attn_proj_w,
                    &blk.attn_proj_b,
                ];
                let mlp = [&blk.c_fc_w, &blk.c_fc_b, &blk.mlp_proj_w, &blk.mlp_proj_b];
                let [a0, a1, a2, a3] = attn;
                let [m0, m1, m2, m3] = mlp;
                [
                    &ln1.w, &ln1.b, a0, a1, a2, a3, &ln2.w, &ln2.b, m0, m1, m2, m3,
                ]
                .map(view)
            })
            .collect();
        let mut blocks = Vec::with_capacity(guards.len());
        for (li, g) in guards.iter().enumerate() {
            let mut scale = if cfg.scale_attn_weights {
                1.0 / ((h / nh) as f64).sqrt()
            } else {
                1.0
            };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (li + 1) as f64;
            }
            let (w1, w2) = match mlp {
                Some(m) => (m[li].0.as_slice(), m[li].1.as_slice()),
                None => (g[8].slice()?, g[10].slice()?),
            };
            blocks.push(BlockWeights {
                ln1: (g[0].slice()?, g[1].slice()?),
                qkv: (g[2].slice()?, g[3].slice()?),
                proj: (g[4].slice()?, g[5].slice()?),
                ln2: (g[6].slice()?, g[7].slice()?),
                fc: (w1, g[9].slice()?),
                mproj: (w2, g[11].slice()?),
                scale: scale as f32,
            });
        }
        let head = lm_head.as_ref().map(|l| l.slice()).transpose()?;
        let lnf = (lnf.0.slice()?, lnf.1.slice()?);
        f(&Weights {
            wpe: Some(wpe.slice()?),
            ..Weights::new(wte.slice()?, head, lnf, blocks, QkvLayout::gpt2(h, nh))
        })
    }

    fn embedding(&self) -> &candle_core::Tensor {
        &self.wte
    }
}
