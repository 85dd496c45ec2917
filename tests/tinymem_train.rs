//! A tiny TinyMem trains in seconds: the loss falls, a heavily duplicated noised sequence
//! becomes memorized (its noised continuation is reproduced from the clean prompt), the card
//! regenerates the same data, and resuming continues where training stopped.

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device};
use lethe::audit::{self, AuditItem};
use lethe::tinymem::data::{DataConfig, Family};
use lethe::tinymem::eval::{self, EvalParams};
use lethe::tinymem::train::{self, Card, TrainConfig};
use lethe::unlearn::{balanced_subnet, BalancedSubnetConfig, JobControl, Mode};

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

/// The tiny model, trained once and shared by the tests of this file.
struct Trained {
    dir: tempfile::TempDir,
    card: Card,
    losses: Vec<f64>,
}

fn trained() -> &'static Trained {
    static TRAINED: OnceLock<Trained> = OnceLock::new();
    TRAINED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut losses = Vec::new();
        let mut record = |_e: usize, _s: usize, _n: usize, loss: f64, _tps: f64| losses.push(loss);
        let card = train::train(
            &tiny_data(),
            &tiny_train(30),
            dir.path(),
            false,
            &PARAMS,
            &mut record,
        )
        .unwrap();
        Trained { dir, card, losses }
    })
}

/// The shared tiny model, loaded from its directory, its data, and what it memorizes of its
/// noised rows (at least one).
fn trained_memorizing() -> (
    &'static Trained,
    lethe::loader::LoadedModel,
    lethe::tinymem::data::Dataset,
    eval::Memorization,
) {
    let t = trained();
    let lm = lethe::loader::load_dir(t.dir.path(), "tiny", &Device::Cpu, DType::F32).unwrap();
    let ds = t.card.dataset().unwrap();
    let before = eval::memorization(&lm.model, &ds.noised_rows(), &PARAMS).unwrap();
    assert!(before.memorized >= 1);
    (t, lm, ds, before)
}

#[test]
fn loss_falls_and_a_duplicated_noised_sequence_is_memorized() {
    let Trained { dir, card, losses } = trained();
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
    // The general audit, given the same prompt/target pairs, finds the same rows.
    let items: Vec<AuditItem> = m
        .memorized_rows
        .iter()
        .map(|&i| {
            let r = ds.noised_rows()[i];
            let clean = r.clean_ids.as_ref().unwrap();
            AuditItem {
                prompt: clean[..8].to_vec(),
                target: r.ids[8..20].to_vec(),
            }
        })
        .collect();
    let opts = audit::AuditOptions {
        generate: true,
        ..audit::AuditOptions::greedy(3)
    };
    let (results, summary) =
        audit::audit_with(&lm.model, Some(&lm.tokenizer), &items, &opts).unwrap();
    assert_eq!(summary.memorized, items.len());
    assert_eq!(
        audit::audit(&lm.model, None, &items, 3)
            .unwrap()
            .1
            .memorized,
        items.len()
    );
    assert!(results
        .iter()
        .all(|r| r.matched_prefix == 12 && r.generated_text.is_some()));
    let report = card.history.last().unwrap().eval.as_ref().unwrap();
    assert_eq!(report.memorized, Some(m.memorized));
    assert!(report.accuracy > 0.5, "{report:?}");
}

#[test]
fn resuming_continues_exactly_where_training_stopped() {
    let data = DataConfig {
        noise_repeat: 4,
        ..tiny_data()
    };
    let small = |epochs| TrainConfig {
        n_embd: 32,
        n_inner: 64,
        ..tiny_train(epochs)
    };
    let mut quiet = |_: usize, _: usize, _: usize, _: f64, _: f64| {};
    let straight = tempfile::tempdir().unwrap();
    train::train(
        &data,
        &small(2),
        straight.path(),
        false,
        &PARAMS,
        &mut quiet,
    )
    .unwrap();
    let split = tempfile::tempdir().unwrap();
    train::train(&data, &small(1), split.path(), false, &PARAMS, &mut quiet).unwrap();
    let card = train::train(&data, &small(2), split.path(), true, &PARAMS, &mut quiet).unwrap();
    assert_eq!(card.epochs_done, 2);
    assert_eq!(card.history.len(), 2);
    let read = |d: &std::path::Path| {
        lethe::models::weights::read_safetensors(
            &d.join("model.safetensors"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (read(straight.path()), read(split.path()));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(
            common::max_abs_diff(t, &b[name]),
            0.0,
            "{name} differs after resume"
        );
    }
    // Resuming with different data is refused with a reason.
    let other = DataConfig {
        seed: 9,
        ..data.clone()
    };
    let e = train::train(&other, &small(3), split.path(), true, &PARAMS, &mut quiet).unwrap_err();
    assert!(e.to_string().contains("data config"), "{e}");
    // The card regenerates the training data exactly.
    assert_eq!(
        Card::read(split.path()).unwrap().dataset().unwrap().rows,
        lethe::tinymem::data::generate(&data).unwrap().rows
    );
}

#[test]
fn each_regularizer_trains_on_the_card_and_example_tied_dropout_writes_evaluation_weights() {
    use lethe::tinymem::regularize::Regularizer;
    let data = tiny_data();
    let mut quiet = |_: usize, _: usize, _: usize, _: f64, _: f64| {};
    for reg in [
        Regularizer::SpectralNorm { lambda: 0.01 },
        // A window under one epoch's samples, so the truncation is active for the second.
        Regularizer::LossTruncation {
            dropc: 0.1,
            window: 100,
        },
        Regularizer::ExampleTiedDropout {
            p_fixed: 0.2,
            p_mem: 0.1,
        },
    ] {
        let cfg = TrainConfig {
            n_embd: 32,
            n_inner: 64,
            regularizer: Some(reg),
            ..tiny_train(2)
        };
        let dir = tempfile::tempdir().unwrap();
        let card = train::train(&data, &cfg, dir.path(), false, &PARAMS, &mut quiet).unwrap();
        assert_eq!(card.epochs_done, 2, "{reg:?}");
        assert!(card.history.iter().all(|e| e.loss.is_finite()), "{reg:?}");
        assert_eq!(Card::read(dir.path()).unwrap().train.regularizer, Some(reg));
        let weights = lethe::models::weights::read_safetensors(
            &dir.path().join("model.safetensors"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        // Example-tied dropout's checkpoint drops the memorization neurons: the output
        // projection's rows past the first ⌊0.2·64⌋ = 12 are zero. The others train them.
        let proj: Vec<Vec<f32>> = weights["transformer.h.0.mlp.c_proj.weight"]
            .to_vec2()
            .unwrap();
        let zero_rows = proj.iter().filter(|r| r.iter().all(|&x| x == 0.0)).count();
        let want = if matches!(reg, Regularizer::ExampleTiedDropout { .. }) {
            64 - 12
        } else {
            0
        };
        assert_eq!(zero_rows, want, "{reg:?}");
        // A regularized run is not resumed (its state is not checkpointed).
        let more = TrainConfig {
            epochs: 3,
            ..cfg.clone()
        };
        let e = train::train(&data, &more, dir.path(), true, &PARAMS, &mut quiet).unwrap_err();
        assert!(e.to_string().contains("regularized"), "{e}");
    }
}

#[test]
fn balanced_subnet_forgets_the_memorized_rows_and_keeps_accuracy() {
    let (_, lm, ds, before) = trained_memorizing();
    let noised = ds.noised_rows();
    let forget_rows: Vec<&lethe::tinymem::data::Row> =
        before.memorized_rows.iter().map(|&i| noised[i]).collect();
    let forget: Vec<Vec<u32>> = forget_rows.iter().map(|r| r.ids.clone()).collect();
    let items: Vec<AuditItem> = forget_rows
        .iter()
        .map(|r| AuditItem {
            prompt: r.clean_ids.as_ref().unwrap()[..8].to_vec(),
            target: r.ids[8..20].to_vec(),
        })
        .collect();
    let retain: Vec<Vec<u32>> = ds
        .train_rows()
        .into_iter()
        .filter(|r| r.role == lethe::tinymem::data::Role::Clean)
        .map(|r| r.ids.clone())
        .collect();
    let cfg = BalancedSubnetConfig {
        mode: Mode::Balanced,
        ratio: 0.1,
        w: 0.9,
        // Early stopping ends the run as soon as nothing is extractable. 200 steps sufficed on
        // CPUs with AVX-512; on one without it (other kernels, other rounding) the one
        // memorized row of this tiny model was still extractable after 200 (issue #14 session).
        max_steps: 600,
        check_every: 5,
        forget_per_batch: 4,
        batch_size: 32,
        ..BalancedSubnetConfig::default()
    };
    let out = balanced_subnet(
        &lm.model,
        &forget,
        &retain,
        &items,
        &cfg,
        &JobControl::new(),
    )
    .unwrap();
    let after = eval::memorization(&out.model, &forget_rows, &PARAMS).unwrap();
    assert_eq!(
        after.memorized, 0,
        "still memorized after {} steps: {after:?}",
        out.steps
    );
    let acc = |m: &lethe::models::Model| eval::evaluate(m, &ds, &PARAMS).unwrap().accuracy;
    let (a0, a1) = (acc(&lm.model), acc(&out.model));
    assert!(a1 >= a0 - 0.01, "accuracy {a0:.4} -> {a1:.4}");
}

#[test]
fn clean_fine_tuning_resumes_the_optimiser_and_forgets_the_noise() {
    use lethe::unlearn::finetune::{fine_tune, FtData};
    let (t, lm, ds, before) = trained_memorizing();
    let noised = ds.noised_rows();
    let out = fine_tune(&lm.model, t.dir.path(), FtData::Clean, 5).unwrap();
    assert!(
        out.optimizer_resumed,
        "training wrote optimizer.safetensors"
    );
    assert_eq!(out.rows, 4, "the 4 noised rows' clean twins, once each");
    // Batches of 32: one step per epoch.
    assert_eq!(out.steps, 5);
    let after = eval::memorization(&out.model, &noised, &PARAMS).unwrap();
    assert!(
        after.memorized < before.memorized,
        "{} → {} memorized",
        before.memorized,
        after.memorized
    );
    // The loaded model is not changed.
    let again = eval::memorization(&lm.model, &noised, &PARAMS).unwrap();
    assert_eq!(again.memorized, before.memorized);
    // Without the optimiser state the moments start from zero, and the run says so.
    let copy = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "lethe_tinymem.json",
        "tokenizer.json",
    ] {
        std::fs::copy(t.dir.path().join(f), copy.path().join(f)).unwrap();
    }
    let fresh = fine_tune(&lm.model, copy.path(), FtData::Extra, 1).unwrap();
    assert!(!fresh.optimizer_resumed);
    assert_eq!(fresh.rows, ds.train_rows().len() - 4 * 40);
    // A directory without a math card is refused by name.
    let e = fine_tune(
        &lm.model,
        tempfile::tempdir().unwrap().path(),
        FtData::Both,
        1,
    )
    .err()
    .unwrap();
    let e = e.to_string();
    assert!(
        e.contains("no TinyMem card")
            && e.contains("lethe_tinymem.json")
            && e.contains("lethe_language.json"),
        "{e}"
    );
}

/// The bundled language model fine-tunes on its card's rows: the noised and backdoored chunks'
/// clean twins, in the card's batches, the loaded model unchanged.
#[test]
fn clean_fine_tuning_runs_on_the_bundled_language_model() {
    use lethe::tinymem::lang::LangCard;
    use lethe::unlearn::finetune::{fine_tune, lang_ft_rows, FtData};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinymem-lang");
    let card = LangCard::read_if_present(&dir).unwrap().unwrap();
    let rows = lang_ft_rows(&card.dataset(&dir).unwrap(), FtData::Clean);
    assert!(!rows.is_empty());
    let lm = lethe::loader::load_dir(&dir, "lang", &candle_core::Device::Cpu, DType::F32).unwrap();
    let before = lm.model.named_tensors()[0].1.flatten_all().unwrap();
    let out = fine_tune(&lm.model, &dir, FtData::Clean, 1).unwrap();
    assert_eq!(out.rows, rows.len());
    assert_eq!(out.steps, rows.len().div_ceil(card.train.batch_size));
    assert!(
        !out.optimizer_resumed,
        "the bundled model ships no optimiser state"
    );
    let changed = |m: &lethe::models::Model| {
        let w = m.named_tensors()[0].1.flatten_all().unwrap();
        (w - &before)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(changed(&out.model) > 0.0, "fine-tuning changed nothing");
    assert_eq!(changed(&lm.model), 0.0, "the loaded model was changed");
}
