//! CPU-vs-CUDA agreement, compiled only with `--features cuda` and skipped (with a note on
//! stderr) when no CUDA device can be opened. `bench/gpu_check.sh` runs them on a GPU machine:
//! `cargo test --release --features cuda --lib cuda_tests`.
//!
//! Invariants:
//! - Each test builds a small random model on the CPU, copies its tensors to `cuda:0`, and
//!   checks that the device runs the same function: forward logits, KV-cache greedy decoding
//!   over left-padded rows, and the BalancedSubnet step (which on CUDA goes through candle's
//!   autograd, not the hand-written CPU pass).
//! - Without a device a test passes after saying so on stderr; it never fails for the lack of
//!   one, so a CPU-only CI stays green and a GPU run is the only one that proves agreement.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::engine::{self, GenerateRequest};
use crate::models::{gpt2, gpt_neox, Inputs, Model, ModelConfig, Weights};
use crate::optim::{Sgd, SgdParams};
use crate::test_util::rows;
use crate::unlearn::mask::Scores;
use crate::unlearn::{batch_loss, fast_step_applies, step, Example, StepWorkspace};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device ({e}): skipped");
            None
        }
    }
}

fn gpt2_config() -> ModelConfig {
    ModelConfig::Gpt2(gpt2::Config {
        vocab_size: 14,
        n_positions: 64,
        n_embd: 24,
        n_layer: 2,
        n_head: 3,
        n_inner: 40,
        activation: crate::models::ops::Activation::Relu,
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: true,
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        initializer_range: 0.3,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    })
}

/// A small GPT-NeoX with partial rotary embeddings and parallel residuals (Pythia's layout).
fn neox_config() -> ModelConfig {
    ModelConfig::GptNeoX(gpt_neox::Config {
        vocab_size: 50,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 64,
        rotary_pct: 0.25,
        rotary_emb_base: 10000.0,
        use_parallel_residual: true,
        layer_norm_eps: 1e-5,
        activation: crate::models::ops::Activation::Gelu,
        tie_word_embeddings: false,
        attention_bias: true,
        initializer_range: 0.2,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        pad_token_id: None,
    })
}

/// `model`'s weights copied to `dev`.
fn to_device(config: &ModelConfig, model: &Model, dev: &Device) -> Model {
    let map: HashMap<String, Tensor> = model
        .named_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(dev).unwrap()))
        .collect();
    Model::new(config, &Weights::from_tensors(map, "cuda copy")).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    num.sqrt() / den.sqrt().max(1e-30)
}

#[test]
fn cuda_forward_and_decoding_match_the_cpu() {
    let Some(dev) = cuda() else { return };
    for config in [gpt2_config(), neox_config()] {
        let cpu = Model::random(&config, &Device::Cpu).unwrap();
        let gpu = to_device(&config, &cpu, &dev);
        assert!(gpu.device().is_cuda());
        let vocab = cpu.spec().vocab_size;
        let ids: Vec<u32> = (0..3 * 20).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
        let logits = |m: &Model| {
            let ids = Tensor::from_vec(ids.clone(), (3, 20), m.device()).unwrap();
            m.forward(&Inputs::causal(&ids, 0).unwrap(), None, None)
                .unwrap()
        };
        let d = max_abs_diff(&logits(&gpu), &logits(&cpu));
        assert!(d < 1e-3, "{config:?}: logits differ by {d}");

        // Rows of different lengths: left padding, masks and the KV cache on the device.
        let reqs: Vec<GenerateRequest> = [5usize, 12, 1]
            .iter()
            .map(|&n| {
                let prompt = (0..n)
                    .map(|i| ((i * 5 + n) % (vocab - 1) + 1) as u32)
                    .collect();
                GenerateRequest::greedy(prompt, 10)
            })
            .collect();
        let want = engine::generate(&cpu, None, &reqs).unwrap();
        let got = engine::generate(&gpu, None, &reqs).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.tokens, w.tokens, "{config:?}: greedy decoding differs");
        }
    }
}

#[test]
fn cuda_unlearning_step_matches_cpu_autograd() {
    let Some(dev) = cuda() else { return };
    for config in [gpt2_config(), neox_config()] {
        let cpu = Model::random(&config, &Device::Cpu).unwrap();
        let gpu = to_device(&config, &cpu, &dev);
        let data = rows(6, |r| [20, 9, 20, 14, 20, 3][r], 7);
        let batch: Vec<Example> = data
            .iter()
            .enumerate()
            .map(|(i, ids)| Example { ids, forget: i < 2 })
            .collect();
        let score_grads = |m: &Model| -> (Vec<Vec<f32>>, Option<f64>, Option<f64>) {
            let base = m.mlp_weights();
            let scores = Scores::init(m, 0.3, 11).unwrap();
            let masked = scores.masked(&base).unwrap();
            let (loss, lf, lr) = batch_loss(m, &masked, &batch, 0.9).unwrap();
            let grads = loss.backward().unwrap();
            let g = scores
                .all_vars()
                .iter()
                .map(|v| {
                    let g = grads.get(v.as_tensor()).expect("a score gradient");
                    assert!(g.device().same_device(m.device()));
                    g.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect();
            (g, lf, lr)
        };
        let (want, wlf, wlr) = score_grads(&cpu);
        let (got, glf, glr) = score_grads(&gpu);
        for (a, b) in [(glf, wlf), (glr, wlr)] {
            let (a, b) = (a.unwrap(), b.unwrap());
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        for (g, w) in got.iter().zip(&want) {
            assert!(w.iter().any(|&x| x != 0.0), "zero gradient on the CPU");
            let e = rel_l2(g, w);
            assert!(e <= 1e-3, "{config:?}: relative gradient error {e}");
        }

        // A whole step on the device: autograd (the hand-written backward is CPU-only), and the
        // scores stay on the device.
        let base = gpu.mlp_weights();
        let scores = Scores::init(&gpu, 0.3, 11).unwrap();
        assert!(!fast_step_applies(&gpu, &scores));
        let mut opt = Sgd::new(
            scores.all_vars(),
            SgdParams {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 5e-4,
            },
        );
        let mut ws = StepWorkspace::default();
        for _ in 0..2 {
            let (lf, lr) = step(&gpu, &scores, &base, &batch, 0.9, &mut opt, &mut ws).unwrap();
            assert!(lf.unwrap().is_finite() && lr.unwrap().is_finite());
        }
        for v in scores.all_vars() {
            assert!(v.device().is_cuda());
        }
        let edited = gpu.with_mlp_weights(&scores.apply(&base).unwrap()).unwrap();
        assert!(edited.device().is_cuda());
    }
}

/// The mask a CUDA step uses is found on the device (bisection over counts) and equals the
/// host's selection, ties included; half-precision weights serve there as on the CPU.
#[test]
fn cuda_masks_and_half_precision_weights_match_the_cpu() {
    let Some(dev) = cuda() else { return };
    let tied: Vec<f32> = (0..50_000)
        .map(|i| ((i * 7919) % 13) as f32 - 6.0)
        .collect();
    let random = crate::test_util::rand(&[300, 170], 4);
    for t in [
        Tensor::from_vec(tied, (250, 200), &Device::Cpu).unwrap(),
        random,
    ] {
        for ratio in [0.0, 0.1, 0.5, 0.99] {
            let host = crate::unlearn::mask::hard_mask(&t, ratio).unwrap();
            let on_dev =
                crate::unlearn::mask::hard_mask(&t.to_device(&dev).unwrap(), ratio).unwrap();
            assert!(on_dev.device().is_cuda());
            assert_eq!(
                max_abs_diff(&host, &on_dev.to_device(&Device::Cpu).unwrap()),
                0.0
            );
        }
    }
    let config = neox_config();
    let model = Model::random(&config, &Device::Cpu).unwrap();
    let exact = model
        .rounded_as(candle_core::DType::BF16, candle_core::DType::F32)
        .unwrap();
    let held = to_device(&config, &model, &dev)
        .rounded_as(candle_core::DType::BF16, candle_core::DType::BF16)
        .unwrap();
    let ids =
        Tensor::from_vec((0..24u32).map(|i| i % 14).collect(), (2, 12), &Device::Cpu).unwrap();
    let inputs = Inputs::causal(&ids, 0).unwrap();
    let want = exact.forward(&inputs, None, None).unwrap();
    let dev_inputs = Inputs::causal(&ids.to_device(&dev).unwrap(), 0).unwrap();
    let got = held.forward(&dev_inputs, None, None).unwrap();
    assert!(max_abs_diff(&want, &got.to_device(&Device::Cpu).unwrap()) < 1e-3);
}
