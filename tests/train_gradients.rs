//! End-to-end gradient check of the training path: on tiny randomly initialised GPT-2s, the
//! gradient of `ops::lm_loss` with respect to every parameter through lethe's fused kernels
//! equals the gradient through the composed candle reference (`fused::with_reference_ops`), to a
//! relative L2 error `‖g_fused − g_ref‖₂ / ‖g_ref‖₂ ≤ 1e-4` per parameter. The same holds for
//! MLP weights passed in at call time (how unlearning trains its mask).

use candle_core::{DType, Device, Tensor, Var};
use lethe::models::{fused, gpt2, ops, Inputs, MlpWeights, Model, ModelConfig, Weights};

fn tiny(activation: &str, tied: bool, inverse_idx: bool) -> ModelConfig {
    ModelConfig::Gpt2(gpt2::Config {
        vocab_size: 11,
        n_positions: 16,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        n_inner: 40,
        activation: ops::Activation::from_hf(activation).unwrap(),
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: tied,
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: inverse_idx,
        // Large enough that attention is far from uniform and every op matters.
        initializer_range: 0.3,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    })
}

fn ids(b: usize, t: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| ((i * 7 + i / 3) % 11) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap();
    num.to_scalar::<f32>().unwrap().sqrt() / den.to_scalar::<f32>().unwrap().sqrt().max(1e-30)
}

fn loss(model: &Model, ids: &Tensor, mlp: Option<&MlpWeights>) -> Tensor {
    let logits = model
        .forward(&Inputs::causal(ids, 0).unwrap(), None, mlp)
        .unwrap();
    ops::lm_loss(&logits, ids).unwrap()
}

#[test]
fn every_parameter_gradient_matches_the_reference_path() {
    for (act, tied, inv, b, t) in [
        ("relu", true, false, 3, 9),
        ("gelu_new", false, true, 1, 13),
    ] {
        let weights = Weights::init(DType::F32, &Device::Cpu);
        let model = Model::new(&tiny(act, tied, inv), &weights).unwrap();
        let ids = ids(b, t);
        let fused_loss = loss(&model, &ids, None);
        let ref_loss = fused::with_reference_ops(|| loss(&model, &ids, None));
        let (lf, lr) = (
            fused_loss.to_scalar::<f32>().unwrap(),
            ref_loss.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (lf - lr).abs() <= 1e-5 * lr.abs(),
            "{act}: loss {lf} vs {lr}"
        );
        let gf = fused_loss.backward().unwrap();
        let gr = ref_loss.backward().unwrap();
        let vars = weights.varmap().unwrap().data().lock().unwrap().clone();
        assert!(!vars.is_empty());
        for (name, var) in &vars {
            let a = gf
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no fused grad"));
            let r = gr
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no reference grad"));
            let e = rel_err(a, r);
            assert!(e <= 1e-4, "{act}: {name}: relative gradient error {e}");
        }
    }
}

#[test]
fn mlp_override_gradients_match_the_reference_path() {
    let weights = Weights::init(DType::F32, &Device::Cpu);
    let model = Model::new(&tiny("relu", true, false), &weights).unwrap();
    let vars: Vec<(Var, Var)> = model
        .mlp_weights()
        .0
        .iter()
        .map(|(a, b)| {
            (
                Var::from_tensor(&a.detach()).unwrap(),
                Var::from_tensor(&b.detach()).unwrap(),
            )
        })
        .collect();
    let mlp = MlpWeights(
        vars.iter()
            .map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone()))
            .collect(),
    );
    let ids = ids(2, 7);
    let gf = loss(&model, &ids, Some(&mlp)).backward().unwrap();
    let gr = fused::with_reference_ops(|| loss(&model, &ids, Some(&mlp)))
        .backward()
        .unwrap();
    for (i, (a, b)) in vars.iter().enumerate() {
        for v in [a, b] {
            let e = rel_err(
                gf.get(v.as_tensor()).unwrap(),
                gr.get(v.as_tensor()).unwrap(),
            );
            assert!(e <= 1e-4, "layer {i}: relative gradient error {e}");
        }
    }
}
