//! GPT-NeoX's forward and backward without candle's autograd, for training and unlearning: the
//! hand-written pass of `gpt2::grad` (one pass for both families), fed GPT-NeoX's weights.
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
//! - [`GptNeoX::mlp_grads`] returns `∂L/∂W` for each `dense_h_to_4h` and `dense_4h_to_h`, in
//!   the weights' own `[out, in]` layout; [`GptNeoX::train_grads`] every parameter's, in
//!   [`GptNeoX::named_tensors`] order.
//! - Supported: f32 weights on the CPU ([`GptNeoX::mlp_grads_supported`]); callers fall back to
//!   autograd otherwise.

use candle_core::{bail, Result};

use super::GptNeoX;
use crate::models::cpu::attention::QkvLayout;
use crate::models::cpu::storage::view;
use crate::models::fused;
use crate::models::gpt2::grad::{
    pidx, run_parts, sum_groups, BlockWeights, Dims, Want, Weights, P_ATTN, P_FC, P_LN1, P_LN2,
    P_MPROJ, P_PROJ,
};
use crate::models::gpt2::{MlpGradWorkspace, MlpGrads, TrainGrads};

impl GptNeoX {
    /// Whether [`GptNeoX::mlp_grads`] and [`GptNeoX::train_grads`] can run on this model (f32
    /// CPU weights, fused kernels enabled on this thread).
    pub fn mlp_grads_supported(&self) -> bool {
        fused::supported(&[&self.embed_in])
    }

    /// The loss `L = Σ_r row_weight[r] · ℓ_r` (row `r`'s mean next-token cross-entropy over
    /// its first `lens[r]` tokens) and `∂L/∂W` for every MLP matrix, with the MLP weights
    /// replaced by `mlp` (`(dense_h_to_4h, dense_4h_to_h)` per layer, `[out, in]` row-major
    /// like the weights). `ids` is `[b, t]` row-major, right-padded.
    pub fn mlp_grads<'w>(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        lens: &[usize],
        row_weight: &[f32],
        mlp: &[(Vec<f32>, Vec<f32>)],
        ws: &'w mut MlpGradWorkspace,
    ) -> Result<MlpGrads<'w>> {
        let cfg = &self.cfg;
        let (h, inner, nl) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
        );
        if mlp.len() != nl
            || mlp
                .iter()
                .any(|(a, c)| a.len() != h * inner || c.len() != inner * h)
        {
            bail!("mlp_grads: MLP weights do not fit {nl} layers of [{inner}, {h}]");
        }
        let (loss, row_loss) =
            self.run_parts(ids, (b, t), lens, row_weight, Some(mlp), Want::Mlp, ws)?;
        let used: Vec<usize> = (0..nl)
            .flat_map(|li| [pidx(li, P_FC), pidx(li, P_MPROJ)])
            .collect();
        let first = sum_groups(&mut ws.parts, &used);
        let grads = (0..nl)
            .map(|li| {
                (
                    first[pidx(li, P_FC)].as_slice(),
                    first[pidx(li, P_MPROJ)].as_slice(),
                )
            })
            .collect();
        Ok(MlpGrads {
            loss,
            row_loss,
            grads,
        })
    }

    /// The causal-LM training loss of `ids` (`[b, t]`, no padding), exactly
    /// [`crate::models::ops::lm_loss`] of the model's logits, and its gradient with respect to
    /// every parameter, in [`GptNeoX::named_tensors`] order.
    pub fn train_grads<'w>(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        ws: &'w mut MlpGradWorkspace,
    ) -> Result<TrainGrads<'w>> {
        let lens = vec![t; b];
        let row_weight = vec![1.0 / b.max(1) as f32; b];
        let (_, row_loss) = self.run_parts(ids, (b, t), &lens, &row_weight, None, Want::All, ws)?;
        let loss = row_loss.iter().sum::<f64>() / b as f64;
        let order = self.canonical_order();
        let first = sum_groups(&mut ws.parts, &order);
        Ok(TrainGrads {
            loss,
            grads: order.iter().map(|&i| first[i].as_slice()).collect(),
        })
    }

    /// For each of [`GptNeoX::named_tensors`], its slot in the pass's gradient list (GPT-2's
    /// order: see `gpt2::grad::pidx`).
    fn canonical_order(&self) -> Vec<usize> {
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

    #[allow(clippy::too_many_arguments)]
    fn run_parts(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        lens: &[usize],
        row_weight: &[f32],
        mlp: Option<&[(Vec<f32>, Vec<f32>)]>,
        want: Want,
        ws: &mut MlpGradWorkspace,
    ) -> Result<(f64, Vec<f64>)> {
        let cfg = &self.cfg;
        if !self.mlp_grads_supported() {
            bail!("mlp_grads: unsupported model (needs f32 weights on the CPU)");
        }
        let d = Dims {
            t,
            npos: cfg.max_position_embeddings,
            h: cfg.hidden_size,
            nh: cfg.num_attention_heads,
            inner: cfg.intermediate_size,
            v: cfg.vocab_size,
            eps: cfg.layer_norm_eps as f32,
            act: cfg.activation,
        };
        self.with_weights(mlp, |w| run_parts(d, w, ids, b, lens, row_weight, want, ws))
    }

    /// Runs `f` on every weight as a plain slice (the read guards are held for the call), the
    /// MLP matrices replaced by `mlp` when given.
    fn with_weights<R>(
        &self,
        mlp: Option<&[(Vec<f32>, Vec<f32>)]>,
        f: impl FnOnce(&Weights) -> Result<R>,
    ) -> Result<R> {
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
                (
                    [
                        view(&l.input_ln.w),
                        view(&l.input_ln.b),
                        view(&l.qkv_w),
                        view(&l.dense_w),
                        view(&l.post_attn_ln.w),
                        view(&l.post_attn_ln.b),
                        view(&l.h_to_4h_w),
                        view(&l.h_to_4h_b),
                        view(&l.four_h_to_h_w),
                        view(&l.four_h_to_h_b),
                    ],
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
        f(&Weights {
            wte: wte.slice()?,
            wpe: None,
            lm: match &lm_head {
                Some(l) => l.slice()?,
                None => wte.slice()?,
            },
            tied: lm_head.is_none(),
            lnf: (lnf.0.slice()?, lnf.1.slice()?),
            blocks,
            linear: true,
            layout: QkvLayout::neox(h, nh),
            parallel: cfg.use_parallel_residual,
            rotary: if rd > 0 {
                Some((cos.slice()?, sin.slice()?, rd / 2))
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::models::ops::{self, Activation};
    use crate::models::{gpt_neox, Inputs, Model, ModelConfig, Weights};
    use crate::test_util::rel_l2;

    /// A small GPT-NeoX (vocab 11, width 16, 2 heads of 8, MLP 24, 16 positions) with the given
    /// rotary fraction, residual, activation, attention biases and head.
    fn config(
        layers: usize,
        rotary_pct: f64,
        parallel: bool,
        act: Activation,
        bias: bool,
        tied: bool,
    ) -> ModelConfig {
        ModelConfig::GptNeoX(gpt_neox::Config {
            vocab_size: 11,
            hidden_size: 16,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            intermediate_size: 24,
            max_position_embeddings: 16,
            rotary_pct,
            rotary_emb_base: 10000.0,
            use_parallel_residual: parallel,
            layer_norm_eps: 1e-5,
            activation: act,
            tie_word_embeddings: tied,
            attention_bias: bias,
            initializer_range: 0.3,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        })
    }

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
        let mut ws = crate::models::gpt2::MlpGradWorkspace::default();
        for (case, &(nl, rp, par, act, bias, tied, b, t)) in cases.iter().enumerate() {
            let weights = Weights::init_seeded(case as u64 + 7, DType::F32, &Device::Cpu);
            let model = Model::new(&config(nl, rp, par, act, bias, tied), &weights).unwrap();
            let Model::GptNeoX(neox) = &model else {
                unreachable!()
            };
            assert!(neox.mlp_grads_supported());
            let ids = crate::util::token_rows(b, |_| t, 40 + case as u64, 11).concat();
            let out = neox.train_grads(&ids, (b, t), &mut ws).unwrap();
            let ids_t = Tensor::from_slice(&ids, (b, t), &Device::Cpu).unwrap();
            let logits = model
                .forward(&Inputs::causal(&ids_t, 0).unwrap(), None, None)
                .unwrap();
            let loss = ops::lm_loss(&logits, &ids_t).unwrap();
            let want = f64::from(loss.to_scalar::<f32>().unwrap());
            assert!(
                (out.loss - want).abs() <= 1e-5 * want.abs(),
                "case {case}: loss {} vs {want}",
                out.loss
            );
            let grads = loss.backward().unwrap();
            let vars = crate::tinymem::train::named_vars(&model, &weights).unwrap();
            assert_eq!(vars.len(), out.grads.len(), "case {case}");
            for ((name, var), got) in vars.iter().zip(&out.grads) {
                let want: Vec<f32> = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let e = rel_l2(got, &want);
                assert!(e <= 1e-4, "case {case}: {name}: relative L2 error {e}");
            }
        }
    }
}
