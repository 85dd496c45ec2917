//! A GPT-NeoX decode step on the CPU, written out over slices instead of candle ops: what
//! [`GptNeoX::forward_hidden`] runs for one new token per row with a KV cache.
//!
//! Invariants:
//! - It computes the same function as the candle path of `forward_hidden` for one new token
//!   with a KV cache, to float rounding (tested below against that path with the fused kernels
//!   switched off: parallel and sequential residuals, rotary 0, 0.25 and 1, with and without
//!   attention biases, left-padded rows; skipped on CPUs without AVX-512F).
//! - It is taken only for f32 weights on the CPU with AVX-512F, no MLP override and at most 64
//!   rows (where [`crate::models::ops::dense`] takes the same kernels). Otherwise, and for inputs
//!   the candle path should judge (ids or positions out of range, a mask that does not fit), it
//!   returns `None` with the cache untouched and the candle path runs.
//! - The four products of a layer run on [`skinny`]'s kernels, split over the rayon pool by
//!   output columns; everything between them (LayerNorms, rotary embeddings, the cache append,
//!   attention, the activation, residual adds) runs on the calling thread over the batch's rows,
//!   so no state is shared between threads inside a step.
//!
//! What it gained is in `docs/benchmarks.md` ("Decode steps").

use candle_core::{Result, Tensor};

use super::GptNeoX;
use crate::models::cpu::attend::CachedKv;
use crate::models::cpu::rotary::rotate;
use crate::models::cpu::skinny;
use crate::models::cpu::storage::view;
use crate::models::cpu::vmath::layer_norm;
use crate::models::fused;
use crate::models::{Inputs, KvCache, StepInputs};

/// Rows up to which the step is taken (the skinny kernels' range for `[out, in]` weights).
const MAX_ROWS: usize = 64;

impl GptNeoX {
    /// One decode step (`T = 1`) appending to `cache`: the final hidden states `[B, 1, H]`, or
    /// `None` (nothing done, the cache untouched) when this path does not take the step: not
    /// f32 on an AVX-512 CPU, more than [`MAX_ROWS`] rows, or inputs the candle path should
    /// judge (ids or positions out of range, a mask that does not fit), so that errors read the
    /// same whichever path runs.
    pub(super) fn decode_step(
        &self,
        inputs: &Inputs,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        if !fused::supported(&[&self.embed_in]) || !skinny::available() {
            return Ok(None);
        }
        let limits = (cfg.vocab_size, cfg.max_position_embeddings, MAX_ROWS);
        let Some(step_in) = StepInputs::read(inputs, cache.len(), limits)? else {
            return Ok(None);
        };
        let b = step_in.b;
        let (ids, pos) = (&step_in.ids, &step_in.positions);
        let (h, nh, hd, rd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim(),
            cfg.rotary_ndims(),
        );
        let inner = cfg.intermediate_size;
        let eps = cfg.layer_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let dev = self.device().clone();

        let embed = view(&self.embed_in);
        let (cos, sin) = (view(&self.cos), view(&self.sin));
        let (cos, sin) = (cos.slice()?, sin.slice()?);
        let mut x = vec![0f32; b * h];
        {
            let table = embed.slice()?;
            for (row, &id) in x.chunks_exact_mut(h).zip(ids) {
                row.copy_from_slice(&table[id as usize * h..][..h]);
            }
        }
        let mut a = vec![0f32; b * h];
        let mut att = vec![0f32; b * h];
        for (li, l) in self.layers.iter().enumerate() {
            let (ln1_w, ln1_b) = (view(&l.input_ln.w), view(&l.input_ln.b));
            let (ln2_w, ln2_b) = (view(&l.post_attn_ln.w), view(&l.post_attn_ln.b));
            let (qkv_w, dense_w) = (view(&l.qkv_w), view(&l.dense_w));
            let qkv_b = l.qkv_b.as_ref().map(view);
            let dense_b = l.dense_b.as_ref().map(view);
            let (up_w, up_b) = (view(&l.h_to_4h_w), view(&l.h_to_4h_b));
            let (down_w, down_b) = (view(&l.four_h_to_h_w), view(&l.four_h_to_h_b));
            let qkv_bias = match &qkv_b {
                Some(v) => Some(v.slice()?),
                None => None,
            };
            let dense_bias = match &dense_b {
                Some(v) => Some(v.slice()?),
                None => None,
            };

            layer_norm(&x, (ln1_w.slice()?, ln1_b.slice()?), eps, &mut a);
            let qkv = skinny::dense(&a, (b, h), qkv_w.slice()?, 3 * h, qkv_bias, true);
            // Per row and head the packed projection is [q | k | v], `hd` each. q and k are
            // rotated in place (their first `rd` dimensions, "rotate_half" convention).
            let mut q = vec![0f32; b * h];
            let mut k = vec![0f32; b * h];
            let mut v = vec![0f32; b * h];
            for r in 0..b {
                let p = pos[r] as usize;
                for hi in 0..nh {
                    let src = &qkv[(r * nh + hi) * 3 * hd..][..3 * hd];
                    let at = (r * nh + hi) * hd;
                    q[at..at + hd].copy_from_slice(&src[..hd]);
                    k[at..at + hd].copy_from_slice(&src[hd..2 * hd]);
                    v[at..at + hd].copy_from_slice(&src[2 * hd..]);
                    if rd > 0 {
                        let half = rd / 2;
                        let (c, sn) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                        rotate(&mut q[at..at + rd], c, sn);
                        rotate(&mut k[at..at + rd], c, sn);
                    }
                }
            }
            CachedKv::append_then(cache, li, (k, v), (b, nh, hd), |kv| {
                for r in 0..b {
                    let m = step_in.mask_row(r);
                    for hi in 0..nh {
                        let at = (r * nh + hi) * hd;
                        kv.attend((r, hi), &q[at..at + hd], scale, m, &mut att[at..at + hd]);
                    }
                }
                Ok(())
            })?;
            let attn_out = skinny::dense(&att, (b, h), dense_w.slice()?, h, dense_bias, true);
            let mlp = |x: &[f32], m_in: &mut [f32]| -> Result<Vec<f32>> {
                layer_norm(x, (ln2_w.slice()?, ln2_b.slice()?), eps, m_in);
                let mut hidden = skinny::dense(
                    m_in,
                    (b, h),
                    up_w.slice()?,
                    inner,
                    Some(up_b.slice()?),
                    true,
                );
                cfg.activation.apply_in_place(&mut hidden);
                Ok(skinny::dense(
                    &hidden,
                    (b, inner),
                    down_w.slice()?,
                    h,
                    Some(down_b.slice()?),
                    true,
                ))
            };
            if cfg.use_parallel_residual {
                // x + attn(ln1(x)) + mlp(ln2(x)), added in the candle path's order.
                let mlp_out = mlp(&x, &mut a)?;
                for ((x, &o), &m) in x.iter_mut().zip(&attn_out).zip(&mlp_out) {
                    *x = (*x + o) + m;
                }
            } else {
                x.iter_mut().zip(&attn_out).for_each(|(x, &o)| *x += o);
                let mlp_out = mlp(&x, &mut a)?;
                x.iter_mut().zip(&mlp_out).for_each(|(x, &m)| *x += m);
            }
        }
        let (fw, fb) = (view(&self.final_ln.w), view(&self.final_ln.b));
        layer_norm(&x, (fw.slice()?, fb.slice()?), eps, &mut a);
        Tensor::from_vec(a, (b, 1, h), &dev).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use crate::models::{Model, ModelConfig};
    use crate::test_util::*;

    use super::*;

    fn model(parallel_residual: bool, rotary_pct: f64, bias: bool, act: &str) -> Model {
        let cfg = serde_json::json!({
            "model_type": "gpt_neox",
            "vocab_size": 50,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "rotary_pct": rotary_pct,
            "use_parallel_residual": parallel_residual,
            "attention_bias": bias,
            "hidden_act": act,
            "initializer_range": 0.3,
        });
        let cfg = ModelConfig::from_json(&cfg.to_string(), "test config").unwrap();
        crate::models::Model::random(&cfg, &Device::Cpu).unwrap()
    }

    /// Prefill then decode steps, through this step and through the candle path (fused
    /// kernels off), with left padding in the batch; hidden states agree.
    #[test]
    fn decode_steps_match_the_candle_path() {
        if !skinny::available() {
            eprintln!("no AVX-512F: the step is not taken on this CPU");
            return;
        }
        for (parallel, pct, bias, act, b) in [
            (true, 0.25, true, "gelu", 3usize),
            (false, 1.0, false, "gelu_new", 2),
            (true, 0.0, true, "relu", 1),
        ] {
            let model = model(parallel, pct, bias, act);
            let Model::GptNeoX(neox) = &model else {
                unreachable!()
            };
            let what = format!("parallel {parallel} rotary {pct} bias {bias} {act} batch {b}");
            let reference = |inputs: &Inputs, cache: &mut KvCache| {
                fused::with_reference_ops(|| neox.forward_hidden(inputs, Some(cache), None))
                    .unwrap()
            };
            check_decode_steps(
                (b, 50, 2, 32),
                |inputs, cache| {
                    reference(inputs, cache);
                },
                |inputs, cache| neox.decode_step(inputs, cache).unwrap(),
                reference,
                &what,
            );
        }
    }

    /// A step it declines (more rows than the kernels take, see `StepInputs::read`) leaves
    /// the cache as it was; one that fits is taken on AVX-512 CPUs.
    #[test]
    fn declined_and_taken_steps() {
        let model = model(true, 0.25, true, "gelu");
        let Model::GptNeoX(neox) = &model else {
            unreachable!()
        };
        let dev = Device::Cpu;
        let mut cache = KvCache::new(2);
        let prompt = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
        neox.forward_hidden(&Inputs::causal(&prompt, 0).unwrap(), Some(&mut cache), None)
            .unwrap();
        let wide = Tensor::from_vec(vec![1u32; MAX_ROWS + 1], (MAX_ROWS + 1, 1), &dev).unwrap();
        let wide = Inputs::causal(&wide, 3).unwrap();
        assert!(neox.decode_step(&wide, &mut cache).unwrap().is_none());
        assert_eq!(cache.len(), 3);
        let one = Inputs::causal(&Tensor::new(&[[1u32]], &dev).unwrap(), 3).unwrap();
        let taken = neox.decode_step(&one, &mut cache).unwrap();
        assert_eq!(taken.is_some(), skinny::available());
    }
}
