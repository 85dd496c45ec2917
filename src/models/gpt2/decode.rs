//! A decode step of a small GPT-2 on the CPU, written out over slices instead of candle ops:
//! what [`Gpt2::forward_hidden`] runs for one new token per row with a KV cache.
//!
//! Invariants:
//! - It computes the same function as the candle path of `forward_hidden` to float rounding,
//!   cache included (tested below against that path with the fused kernels switched off:
//!   prefill then four steps over left-padded rows, every activation, tied and untied heads).
//! - It is taken only for f32 weights on the CPU, no MLP override and blocks of at most
//!   [`MAX_BLOCK_PARAMS`] parameters (every row group re-reads the weights, so they must stay in
//!   cache). Otherwise, and for inputs the candle path should judge (ids or positions out of
//!   range, a mask that does not fit), it returns `None` with the cache untouched and the candle
//!   path runs, so errors read the same whichever path would have run.
//! - The products run on the [`skinny`] tiles where the CPU has AVX-512F and on single-threaded
//!   `gemm` elsewhere; both branches are tested against an f64 product.
//! - The batch is cut into one row group per rayon thread; each group runs a block
//!   single-threaded on its own buffers, and the groups join once per block, when the new keys
//!   and values are appended to the cache on the calling thread. Rows share nothing but the
//!   cache.
//!
//! What it gained over the candle path is in `docs/benchmarks.md` ("Decode steps").

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::Gpt2;
use crate::models::cpu::attend::CachedKv;
use crate::models::cpu::gemm::gemm;
use crate::models::cpu::skinny;
use crate::models::cpu::vmath::layer_norm;
use crate::models::pass::BlockWeights;
use crate::models::{fused, Inputs, KvCache, StepInputs};

/// Parameters per block (`c_attn`, `attn.c_proj`, `c_fc`, `mlp.c_proj`) up to which the step is
/// taken: 4 MiB of f32, about a core's L2. TinyMem's blocks have 196,608.
const MAX_BLOCK_PARAMS: usize = 1 << 20;

impl Gpt2 {
    /// One decode step (`T = 1`) through the row-group path, appending to `cache`; the final
    /// hidden states `[B, 1, H]`, or `None` (nothing done, the cache untouched) when the step
    /// is not one this path takes: not f32 on the CPU, a block above [`MAX_BLOCK_PARAMS`], or
    /// inputs the candle path should judge (ids or positions out of range, a mask that does not
    /// fit), so that errors read the same whichever path runs.
    pub(super) fn decode_step(
        &self,
        inputs: &Inputs,
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let (h, inner) = (cfg.n_embd, cfg.n_inner);
        if !fused::supported(&[&self.wte]) || 4 * h * h + 2 * h * inner > MAX_BLOCK_PARAMS {
            return Ok(None);
        }
        let Some(step_in) = StepInputs::read(
            inputs,
            cache.len(),
            (cfg.vocab_size, cfg.n_positions, usize::MAX),
        )?
        else {
            return Ok(None);
        };
        let b = step_in.b;
        let (ids, pos) = (&step_in.ids, &step_in.positions);
        let mask_row = |r: usize| step_in.mask_row(r);
        let dev = self.device().clone();
        let hidden = self.with_weights(None, |w| {
            let step = Step {
                h,
                nh: cfg.n_head,
                inner,
                eps: cfg.layer_norm_epsilon as f32,
                act: cfg.activation,
            };
            // Row groups: one per thread (each re-reads the weights, so no more than that).
            let groups = rayon::current_num_threads().clamp(1, b);
            let per = b.div_ceil(groups);
            let mut x = vec![0f32; b * h];
            for ((row, &id), &p) in x.chunks_exact_mut(h).zip(ids).zip(pos) {
                let (tok, at) = (
                    &w.wte[id as usize * h..][..h],
                    &w.wpe.expect("GPT-2 has position embeddings")[p as usize * h..][..h],
                );
                row.iter_mut()
                    .zip(tok.iter().zip(at))
                    .for_each(|(o, (&a, &c))| *o = a + c);
            }
            let mut qkv = vec![0f32; b * 3 * h];
            let first = &w.blocks[0];
            each_group(&mut x, &mut qkv, (per, h), |_, xs, qs| {
                step.qkv(first, xs, qs)
            });
            for (li, blk) in w.blocks.iter().enumerate() {
                // `[B, nh, 1, hd]` is each row's k (or v) third of `qkv`, as it lies.
                let third = |j: usize| -> Vec<f32> {
                    qkv.chunks_exact(3 * h)
                        .flat_map(|r| &r[j * h..(j + 1) * h])
                        .copied()
                        .collect()
                };
                let new_kv = (third(1), third(2));
                let dims = (b, cfg.n_head, h / cfg.n_head);
                let next = w.blocks.get(li + 1);
                CachedKv::append_then(cache, li, new_kv, dims, |kv| {
                    each_group(&mut x, &mut qkv, (per, h), |r0, xs, qs| {
                        step.rest(blk, next, (kv, r0, &mask_row), xs, qs)
                    });
                    Ok(())
                })?;
            }
            let mut out = vec![0f32; b * h];
            layer_norm(&x, w.lnf, step.eps, &mut out);
            Ok(out)
        })?;
        Tensor::from_vec(hidden, (b, 1, h), &dev).map(Some)
    }
}

/// Runs `f(first row, x rows, qkv rows)` for every row group of `per` rows, in parallel when
/// there are several.
fn each_group(
    x: &mut [f32],
    qkv: &mut [f32],
    (per, h): (usize, usize),
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    if x.len() <= per * h {
        return f(0, x, qkv);
    }
    x.par_chunks_mut(per * h)
        .zip(qkv.par_chunks_mut(per * 3 * h))
        .enumerate()
        .for_each(|(g, (xs, qs))| f(g * per, xs, qs));
}

/// What every group's work shares: the model's sizes and activation.
struct Step {
    h: usize,
    nh: usize,
    inner: usize,
    eps: f32,
    act: super::ops::Activation,
}

impl Step {
    /// `qkv = LayerNorm₁(x) · W_attn + b` for a group's rows.
    fn qkv(&self, blk: &BlockWeights, x: &[f32], qkv: &mut [f32]) {
        let mut a = vec![0f32; x.len()];
        layer_norm(x, blk.ln1, self.eps, &mut a);
        product(&a, self.h, blk.qkv, qkv);
    }

    /// The rest of a block for a group's rows (attention over the cache, its projection, the
    /// MLP, both residual adds), then the next block's `qkv` when there is one.
    fn rest<'m>(
        &self,
        blk: &BlockWeights,
        next: Option<&BlockWeights>,
        (kv, r0, mask_row): (
            &CachedKv,
            usize,
            &(impl Fn(usize) -> Option<&'m [f32]> + Sync),
        ),
        x: &mut [f32],
        qkv: &mut [f32],
    ) {
        let Self {
            h, nh, inner, eps, ..
        } = *self;
        let (hd, rows) = (h / nh, x.len() / h);
        let mut att = vec![0f32; rows * h];
        for (i, (orow, qrow)) in att
            .chunks_exact_mut(h)
            .zip(qkv.chunks_exact(3 * h))
            .enumerate()
        {
            let mask = mask_row(r0 + i);
            for (hi, (o, q)) in orow
                .chunks_exact_mut(hd)
                .zip(qrow[..h].chunks_exact(hd))
                .enumerate()
            {
                kv.attend((r0 + i, hi), q, blk.scale, mask, o);
            }
        }
        let mut y = vec![0f32; rows * h];
        product(&att, h, blk.proj, &mut y);
        x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        let mut m_in = att;
        layer_norm(x, blk.ln2, eps, &mut m_in);
        let mut hidden = vec![0f32; rows * inner];
        product(&m_in, h, blk.fc, &mut hidden);
        self.act.apply_in_place(&mut hidden);
        product(&hidden, inner, blk.mproj, &mut y);
        x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        if let Some(next) = next {
            self.qkv(next, x, qkv);
        }
    }
}

/// `y = x · W + b` for `x: [m, k]` and a GPT-2 `[k, n]` weight, on the calling thread.
fn product(x: &[f32], k: usize, wb: (&[f32], &[f32]), y: &mut [f32]) {
    product_on(skinny::available(), x, k, wb, y)
}

/// [`product`] on the skinny tiles (`tiled`, AVX-512 only) or with single-threaded `gemm`.
fn product_on(tiled: bool, x: &[f32], k: usize, (w, b): (&[f32], &[f32]), y: &mut [f32]) {
    let (m, n) = (x.len() / k, b.len());
    if tiled {
        return skinny::dense_into(x, (m, k), w, (n, Some(b)), false, y);
    }
    for row in y.chunks_exact_mut(n) {
        row.copy_from_slice(b);
    }
    gemm(m, n, k, y, x, (k, 1), w, (n, 1), true);
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use crate::models::ops::Activation;
    use crate::models::{Model, ModelConfig};
    use crate::test_util::*;

    use super::*;

    /// A random two-block GPT-2 (width 24, 3 heads, MLP 40, vocabulary 14) with `act`.
    fn model(act: Activation, tied: bool, inverse_idx: bool) -> Model {
        let ModelConfig::Gpt2(mut cfg) = relu_gpt2((14, 64, 24, 3), 2, tied, inverse_idx) else {
            unreachable!("relu_gpt2 is a GPT-2 config")
        };
        cfg.activation = act;
        crate::models::Model::random(&ModelConfig::Gpt2(cfg), &Device::Cpu).unwrap()
    }

    /// Prefill then decode steps, through the row-group step and through the candle path
    /// (fused kernels off), with left padding in the batch; hidden states and caches agree.
    #[test]
    fn decode_steps_match_the_candle_path() {
        let cases = [
            (Activation::Relu, true, false, 3usize),
            (Activation::Gelu, false, true, 5),
            (Activation::GeluTanh, true, true, 1),
            (Activation::Silu, false, false, 4),
        ];
        for (act, tied, inverse_idx, b) in cases {
            let model = model(act, tied, inverse_idx);
            let Model::Gpt2(gpt) = &model else {
                unreachable!()
            };
            let what = format!("{act:?} tied {tied} 1/(layer+1) {inverse_idx} batch {b}");
            let cfg = gpt.config();
            check_decode_steps(
                (b, cfg.vocab_size as u32, cfg.n_layer, cfg.n_embd),
                |inputs, cache| {
                    gpt.forward_hidden(inputs, Some(cache), None).unwrap();
                },
                |inputs, cache| gpt.decode_step(inputs, cache).unwrap(),
                |inputs, cache| {
                    fused::with_reference_ops(|| gpt.forward_hidden(inputs, Some(cache), None))
                        .unwrap()
                },
                &what,
            );
        }
    }

    /// Both branches of the step's products (the skinny tiles, and `gemm` as on CPUs without
    /// AVX-512) against a double-precision product.
    #[test]
    fn products_match_on_both_branches() {
        let (m, k, n) = (5, 24, 40);
        let vec = |len: usize, seed| rand(&[len], seed).to_vec1::<f32>().unwrap();
        let (x, w, b) = (vec(m * k, 1), vec(k * n, 2), vec(n, 3));
        for tiled in [false, skinny::available()] {
            let mut y = vec![f32::NAN; m * n];
            product_on(tiled, &x, k, (&w, &b), &mut y);
            for (i, row) in y.chunks_exact(n).enumerate() {
                for (j, &got) in row.iter().enumerate() {
                    let want = b[j] as f64
                        + (0..k)
                            .map(|c| x[i * k + c] as f64 * w[c * n + j] as f64)
                            .sum::<f64>();
                    assert!(
                        (got as f64 - want).abs() < 1e-4,
                        "tiled {tiled}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// A step it declines (here an id outside the vocabulary, see `StepInputs::read`) leaves
    /// the cache as it was, and the candle path then reports it.
    #[test]
    fn a_declined_step_leaves_the_cache_alone() {
        let model = model(Activation::Relu, true, false);
        let Model::Gpt2(gpt) = &model else {
            unreachable!()
        };
        let dev = Device::Cpu;
        let mut cache = KvCache::new(gpt.config().n_layer);
        let prompt = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
        gpt.forward_hidden(&Inputs::causal(&prompt, 0).unwrap(), Some(&mut cache), None)
            .unwrap();
        let bad = Inputs::causal(&Tensor::new(&[[14u32]], &dev).unwrap(), 3).unwrap();
        assert!(gpt.decode_step(&bad, &mut cache).unwrap().is_none());
        assert_eq!(cache.len(), 3);
        assert!(gpt.forward_hidden(&bad, Some(&mut cache), None).is_err());
    }
}
