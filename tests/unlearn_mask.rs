//! BalancedSubnet's machinery on a fixture model: the straight-through gradient, exact mask
//! sizes, the empty-group rule, cancellation.

mod common;

use candle_core::{Tensor, Var};
use common::*;
use lethe::models::{Inputs, MlpWeights};
use lethe::unlearn::mask::{hard_mask, zeros_for, Scores};
use lethe::unlearn::{balanced_subnet, batch_loss, BalancedSubnetConfig, Example, JobControl};

fn probe(v: usize, t: usize) -> Tensor {
    let data: Vec<f32> = (0..t * v)
        .map(|i| ((i * 7919 % 103) as f32 / 51.0) - 1.0)
        .collect();
    Tensor::from_vec(data, (1, t, v), &candle_core::Device::Cpu).unwrap()
}

#[test]
fn straight_through_gradient_equals_weight_grad_times_weight_times_sign() {
    for name in ["gpt2-relu-tied", "neox-sequential-rot50"] {
        let lm = load_fixture(name);
        let base = lm.model.mlp_weights();
        let scores = Scores::init(&lm.model, 0.3, 1).unwrap();
        let ids = Tensor::new(&[[4u32, 9, 17, 33, 21, 8]], &candle_core::Device::Cpu).unwrap();
        let inputs = Inputs::causal(&ids, 0).unwrap();
        let v = lm.model.spec().vocab_size;
        // Through the scores.
        let masked = scores.masked(&base).unwrap();
        let loss = (lm.model.forward(&inputs, None, Some(&masked)).unwrap() * probe(v, 6))
            .unwrap()
            .sum_all()
            .unwrap();
        let gs = loss.backward().unwrap();
        // Through W_eff = W ⊙ hard directly.
        let eff: Vec<(Var, Var)> = base
            .0
            .iter()
            .zip(&scores.vars)
            .map(|((w1, w2), (s1, s2))| {
                let m1 = hard_mask(s1.as_tensor(), 0.3).unwrap();
                let m2 = hard_mask(s2.as_tensor(), 0.3).unwrap();
                (
                    Var::from_tensor(&(w1 * m1).unwrap()).unwrap(),
                    Var::from_tensor(&(w2 * m2).unwrap()).unwrap(),
                )
            })
            .collect();
        let eff_w = MlpWeights(
            eff.iter()
                .map(|(a, b)| (a.as_tensor().clone(), b.as_tensor().clone()))
                .collect(),
        );
        let loss2 = (lm.model.forward(&inputs, None, Some(&eff_w)).unwrap() * probe(v, 6))
            .unwrap()
            .sum_all()
            .unwrap();
        let gw = loss2.backward().unwrap();
        for (((w1, w2), (s1, s2)), (e1, e2)) in base.0.iter().zip(&scores.vars).zip(&eff) {
            for (w, s, e) in [(w1, s1, e1), (w2, s2, e2)] {
                let got = gs.get(s.as_tensor()).expect("scores get a gradient");
                let want = ((gw.get(e.as_tensor()).unwrap() * w).unwrap()
                    * s.as_tensor().sign().unwrap())
                .unwrap();
                let err = max_abs_diff(got, &want);
                let scale = max_abs_diff(&want, &want.zeros_like().unwrap());
                assert!(scale > 0.0, "{name}: zero gradient");
                assert!(
                    err <= 1e-5 * scale.max(1.0),
                    "{name}: |Δ| {err} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn the_final_edit_zeroes_exactly_floor_ratio_numel_per_matrix() {
    let lm = load_fixture("gpt2-gelu-untied");
    for ratio in [0.0, 0.05, 0.3, 0.5] {
        let scores = Scores::init(&lm.model, ratio, 3).unwrap();
        let edited = scores.apply(&lm.model.mlp_weights()).unwrap();
        for (a, b) in &edited.0 {
            for t in [a, b] {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let zeros = v.iter().filter(|&&x| x == 0.0).count();
                assert_eq!(zeros, zeros_for(v.len(), ratio), "ratio {ratio}");
            }
        }
    }
}

#[test]
fn a_batch_without_forget_rows_gives_finite_gradients() {
    let lm = load_fixture("gpt2-relu-tied");
    let scores = Scores::init(&lm.model, 0.2, 0).unwrap();
    let masked = scores.masked(&lm.model.mlp_weights()).unwrap();
    let rows = [vec![4u32, 5, 6, 7, 8], vec![9u32, 10, 11, 12, 13]];
    let batch: Vec<Example> = rows
        .iter()
        .map(|r| Example {
            ids: r,
            forget: false,
        })
        .collect();
    let (loss, lf, lr) = batch_loss(&lm.model, &masked, &batch, 0.9).unwrap();
    assert!(lf.is_none() && lr.is_some_and(f64::is_finite));
    let grads = loss.backward().unwrap();
    for (a, b) in &scores.vars {
        for s in [a, b] {
            let g = grads.get(s.as_tensor()).unwrap();
            let sum = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(sum.is_finite() && sum > 0.0);
        }
    }
    // Mixed lengths use the padded path and still give finite losses.
    let short = [vec![4u32, 5, 6], vec![9u32, 10, 11, 12, 13, 14]];
    let batch: Vec<Example> = short
        .iter()
        .enumerate()
        .map(|(i, r)| Example {
            ids: r,
            forget: i == 0,
        })
        .collect();
    let (_, lf, lr) = batch_loss(&lm.model, &masked, &batch, 0.5).unwrap();
    assert!(lf.is_some_and(f64::is_finite) && lr.is_some_and(f64::is_finite));
}

#[test]
fn cancellation_stops_the_job_and_leaves_the_input_untouched() {
    let lm = load_fixture("gpt2-relu-tied");
    let before: Vec<Vec<f32>> = lm
        .model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let forget = vec![vec![4u32, 5, 6, 7, 8, 9]];
    let retain: Vec<Vec<u32>> = (0..40).map(|i| vec![4 + i % 50, 5, 6, 7, 8, 9]).collect();
    let ctl = JobControl::new();
    ctl.cancel();
    let cfg = BalancedSubnetConfig {
        epochs: 3,
        batch_size: 4,
        ..Default::default()
    };
    let err = balanced_subnet(&lm.model, &forget, &retain, &[], &cfg, &ctl)
        .err()
        .unwrap();
    assert!(matches!(err, lethe::Error::Cancelled));
    // A run that finishes produces a new model and leaves the input as it was.
    let done = balanced_subnet(&lm.model, &forget, &retain, &[], &cfg, &JobControl::new()).unwrap();
    assert!(done.steps > 0);
    let after: Vec<Vec<f32>> = lm
        .model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(before, after);
    let changed = done.model.mlp_weights().0[0]
        .0
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(changed, before_mlp(&lm));
}

fn before_mlp(lm: &lethe::loader::LoadedModel) -> Vec<f32> {
    lm.model.mlp_weights().0[0]
        .0
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn balanced_mode_honours_min_steps_before_stopping_early() {
    let lm = load_fixture("gpt2-relu-tied");
    let forget = vec![vec![4u32, 5, 6, 7, 8, 9]];
    // Nothing in this forget set is extractable, so the first audit would stop the run.
    let items = vec![lethe::audit::AuditItem {
        prompt: vec![4, 5],
        target: vec![6, 7, 8, 9],
    }];
    let retain: Vec<Vec<u32>> = (0..8).map(|i| vec![10 + i, 11, 12, 13, 14, 15]).collect();
    let cfg = |min_steps| BalancedSubnetConfig {
        mode: lethe::unlearn::Mode::Balanced,
        batch_size: 4,
        forget_per_batch: 1,
        check_every: 1,
        min_steps,
        max_steps: 20,
        ..Default::default()
    };
    let quick = balanced_subnet(
        &lm.model,
        &forget,
        &retain,
        &items,
        &cfg(0),
        &JobControl::new(),
    )
    .unwrap();
    assert!(
        quick.stopped_early && quick.steps == 1,
        "{} steps",
        quick.steps
    );
    let patient = balanced_subnet(
        &lm.model,
        &forget,
        &retain,
        &items,
        &cfg(7),
        &JobControl::new(),
    )
    .unwrap();
    assert!(
        patient.stopped_early && patient.steps == 7,
        "{} steps",
        patient.steps
    );
}
