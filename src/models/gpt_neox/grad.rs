//! GPT-NeoX's forward and backward without candle's autograd, for training and unlearning: the
//! hand-written pass of [`crate::models::pass`] (one pass for both families), fed GPT-NeoX's
//! weights.
//!
//! Invariants:
//! - It computes the same function as [`GptNeoX::forward_hidden`] → logits → per-sequence
//!   cross-entropy, to f32 rounding, and the same gradients as candle's autograd through it:
//!   the tests below pin the loss and every parameter's gradient over configurations that
//!   cover partial, full and no rotary, parallel and sequential residual, exact and tanh GELU,
//!   with and without attention biases, tied and untied heads.
//! - What differs from GPT-2 is data, not code: `nn.Linear` weights (`[out, in]`), the packed
//!   projection's per-head `[q | k | v]` ([`QkvLayout::neox`]), rotary tables, no position
//!   embeddings, the parallel residual; a missing attention bias is passed as zeros.
//! - `mlp_grads` returns `∂L/∂W` for each `dense_h_to_4h` and `dense_4h_to_h`, in
//!   the weights' own `[out, in]` layout; `train_grads` every parameter's, in
//!   [`GptNeoX::named_tensors`] order.
//! - Supported: f32 weights on the CPU (`mlp_grads_supported`); callers fall back to
//!   autograd otherwise.

use candle_core::Result;

use super::GptNeoX;
use crate::models::cpu::attention::QkvLayout;
use crate::models::cpu::storage::view;
use crate::models::ops::Activation;
use crate::models::pass::{
    pidx, BlockWeights, HandWrittenPass, Mlp, Weights, P_ATTN, P_FC, P_LN1, P_LN2, P_MPROJ, P_PROJ,
};
use crate::models::ModelSpec;

impl HandWrittenPass for GptNeoX {
    fn embedding(&self) -> &candle_core::Tensor {
        &self.embed_in
    }

    fn shape(&self) -> (ModelSpec, f32, Activation) {
        let cfg = &self.cfg;
        (cfg.spec(), cfg.layer_norm_eps as f32, cfg.activation)
    }

    /// [`GptNeoX::named_tensors`] order: per layer the attention biases come first (when the
    /// model has them), then the LayerNorms, the attention weights and the MLP.
    fn param_slots(&self) -> Vec<usize> {
        let cfg = &self.cfg;
        let nl = cfg.num_hidden_layers;
        let mut order = vec![0];
        for li in 0..nl {
            if cfg.attention_bias {
                order.extend([pidx(li, P_ATTN) + 1, pidx(li, P_PROJ) + 1]);
            }
            order.extend([
                pidx(li, P_LN1),
                pidx(li, P_LN1) + 1,
                pidx(li, P_LN2),
                pidx(li, P_LN2) + 1,
                pidx(li, P_ATTN),
                pidx(li, P_PROJ),
                pidx(li, P_FC),
                pidx(li, P_FC) + 1,
                pidx(li, P_MPROJ),
                pidx(li, P_MPROJ) + 1,
            ]);
        }
        order.extend([pidx(nl, 0), pidx(nl, 0) + 1]);
        if !cfg.tie_word_embeddings {
            order.push(pidx(nl, 2));
        }
        order
    }

    fn with_weights<R>(&self, mlp: Mlp, f: impl FnOnce(&Weights) -> Result<R>) -> Result<R> {
        let cfg = &self.cfg;
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        let rd = cfg.rotary_ndims();
        let zeros = vec![0f32; 3 * h];
        let wte = view(&self.embed_in);
        let lm_head = (!cfg.tie_word_embeddings).then(|| view(&self.embed_out));
        let lnf = (view(&self.final_ln.w), view(&self.final_ln.b));
        let (cos, sin) = (view(&self.cos), view(&self.sin));
        let guards: Vec<_> = self
            .layers
            .iter()
            .map(|l| {
                let (ln1, ln2) = (&l.input_ln, &l.post_attn_ln);
                let (fc, proj) = (
                    (&l.h_to_4h_w, &l.h_to_4h_b),
                    (&l.four_h_to_h_w, &l.four_h_to_h_b),
                );
                let all = [
                    &ln1.w, &ln1.b, &l.qkv_w, &l.dense_w, &ln2.w, &ln2.b, fc.0, fc.1, proj.0,
                    proj.1,
                ];
                (
                    all.map(view),
                    l.qkv_b.as_ref().map(view),
                    l.dense_b.as_ref().map(view),
                )
            })
            .collect();
        let scale = 1.0 / ((h / nh) as f32).sqrt();
        let mut blocks = Vec::with_capacity(guards.len());
        for (li, (g, qkv_b, dense_b)) in guards.iter().enumerate() {
            let (w1, w2) = match mlp {
                Some(m) => (m[li].0.as_slice(), m[li].1.as_slice()),
                None => (g[6].slice()?, g[8].slice()?),
            };
            blocks.push(BlockWeights {
                ln1: (g[0].slice()?, g[1].slice()?),
                qkv: (
                    g[2].slice()?,
                    match qkv_b {
                        Some(v) => v.slice()?,
                        None => &zeros[..3 * h],
                    },
                ),
                proj: (
                    g[3].slice()?,
                    match dense_b {
                        Some(v) => v.slice()?,
                        None => &zeros[..h],
                    },
                ),
                ln2: (g[4].slice()?, g[5].slice()?),
                fc: (w1, g[7].slice()?),
                mproj: (w2, g[9].slice()?),
                scale,
            });
        }
        let head = lm_head.as_ref().map(|l| l.slice()).transpose()?;
        let lnf = (lnf.0.slice()?, lnf.1.slice()?);
        let rotary = if rd > 0 {
            Some((cos.slice()?, sin.slice()?, rd / 2))
        } else {
            None
        };
        f(&Weights {
            linear: true,
            parallel: cfg.use_parallel_residual,
            rotary,
            ..Weights::new(wte.slice()?, head, lnf, blocks, QkvLayout::neox(h, nh))
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use crate::models::ops::Activation;
    use crate::models::pass::HandWrittenPass;
    use crate::models::{Model, Weights};
    use crate::test_util::{assert_matches_autograd, neox};

    #[test]
    fn hand_written_gradients_match_autograd_for_every_parameter() {
        use Activation::{Gelu, GeluTanh, Relu};
        // (layers, rotary_pct, parallel, activation, attention bias, tied, rows, length)
        let cases = [
            (2, 0.25, true, Gelu, true, false, 3, 9),
            (2, 1.0, false, Gelu, true, false, 2, 16),
            (1, 0.0, true, GeluTanh, false, false, 4, 7),
            (2, 0.5, false, Relu, false, true, 2, 12),
            (1, 0.5, true, Gelu, true, true, 1, 2),
        ];
        let mut ws = crate::models::pass::MlpGradWorkspace::default();
        for (case, &(nl, rp, par, act, bias, tied, b, t)) in cases.iter().enumerate() {
            let weights = Weights::init_seeded(case as u64 + 7, DType::F32, &Device::Cpu);
            // vocab 11, 16 positions, width 16, 2 heads of 8, MLP 24.
            let cfg = neox((11, 16, 16, 2, 24), nl, rp, par, act, bias, tied);
            let model = Model::new(&cfg, &weights).unwrap();
            let Model::GptNeoX(gpt) = &model else {
                unreachable!()
            };
            assert!(gpt.mlp_grads_supported());
            let ids = crate::util::token_rows(b, |_| t, 40 + case as u64, 11).concat();
            let out = gpt.train_grads(&ids, (b, t), &mut ws).unwrap();
            assert_matches_autograd(case, &model, &weights, (&ids, b, t), (out.loss, &out.grads));
        }
    }

    /// The groups add their gradients into one sum in group order: the result is the same bits
    /// however the threads interleave, and (to f32 rounding) whatever the group count.
    #[test]
    fn summed_gradients_do_not_depend_on_thread_timing_or_group_count() {
        let weights = Weights::init_seeded(3, DType::F32, &Device::Cpu);
        let cfg = neox(
            (11, 16, 16, 2, 24),
            2,
            0.25,
            true,
            Activation::Gelu,
            true,
            false,
        );
        let model = Model::new(&cfg, &weights).unwrap();
        let Model::GptNeoX(gpt) = &model else {
            unreachable!()
        };
        let (b, t) = (16, 12);
        let ids = crate::util::token_rows(b, |_| t, 5, 11).concat();
        let run = |threads: usize| -> (f64, Vec<Vec<f32>>) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut ws = crate::models::pass::MlpGradWorkspace::default();
                let out = gpt.train_grads(&ids, (b, t), &mut ws).unwrap();
                (out.loss, out.grads.iter().map(|g| g.to_vec()).collect())
            })
        };
        // Two threads: 8 groups of 2 rows; one thread: 4 groups of 4.
        let first = run(2);
        for _ in 0..3 {
            let again = run(2);
            assert_eq!(again.0.to_bits(), first.0.to_bits());
            assert!(again.1 == first.1, "the sums changed between runs");
        }
        let one = run(1);
        assert!((one.0 - first.0).abs() <= 1e-6 * first.0.abs());
        for (a, b) in one.1.iter().zip(&first.1) {
            let e = crate::test_util::rel_l2(a, b);
            assert!(e <= 1e-5, "group count changed a gradient by {e}");
        }
    }
}
