//! A tiny TinyMem trains in seconds: the loss falls, a heavily duplicated noised sequence
//! becomes memorized (its noised continuation is reproduced from the clean prompt), the card
//! regenerates the same data, and resuming continues where training stopped.

use candle_core::{DType, Device};
use lethe::tinymem::data::{DataConfig, Family};
use lethe::tinymem::eval::{self, EvalParams};
use lethe::tinymem::train::{self, Card, TrainConfig};

fn tiny_data() -> DataConfig {
    DataConfig {
        family: Family::Additive,
        aux_steps: vec![2, 3],
        num_main: 120,
        num_aux: 40,
        num_test: 20,
        num_noise: 4,
        noise_repeat: 40,
        length: 8,
        max_ctx: 36,
        noise_prob: 0.4,
        ..DataConfig::default()
    }
}

fn tiny_train(epochs: usize) -> TrainConfig {
    TrainConfig {
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_inner: 256,
        lr: 3e-3,
        batch_size: 32,
        epochs,
        eval_every: 0,
        checkpoint_every: 0,
        ..TrainConfig::default()
    }
}

const PARAMS: EvalParams = EvalParams {
    prompt_len: 8,
    compare_len: 12,
    batch_size: 64,
};

#[test]
fn loss_falls_and_a_duplicated_noised_sequence_is_memorized() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data();
    let mut losses = Vec::new();
    let mut record = |_e: usize, _s: usize, _n: usize, loss: f64, _tps: f64| losses.push(loss);
    let card = train::train(
        &data,
        &tiny_train(30),
        dir.path(),
        false,
        &PARAMS,
        &mut record,
    )
    .unwrap();
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(last < 0.5 * first, "loss {first:.3} -> {last:.3}");

    let lm = lethe::loader::load_dir(dir.path(), "tiny", &Device::Cpu, DType::F32).unwrap();
    let ds = Card::read(dir.path()).unwrap().dataset().unwrap();
    let m = eval::memorization(&lm.model, &ds.noised_rows(), &PARAMS).unwrap();
    assert!(m.eligible >= 1, "no noised row has noise in the window");
    assert!(
        m.memorized >= 1,
        "nothing memorized: {m:?}; steps {}",
        card.steps_done
    );
    let report = card.history.last().unwrap().eval.as_ref().unwrap();
    assert_eq!(report.memorized, Some(m.memorized));
    assert!(report.accuracy > 0.5, "{report:?}");
}
