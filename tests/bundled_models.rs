//! The models that ship in `models/`: they load offline, meet the bars issue #3 sets, and their
//! cards (`lethe_tinymem.json` and the evaluation JSON quoted in `README.md`) are exactly what
//! `lethe tinymem eval` computes on them.

use std::path::PathBuf;

use candle_core::{DType, Device};
use lethe::tinymem::eval::{self, EvalParams, EvalReport};
use lethe::tinymem::train::Card;

fn model_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

/// The evaluation JSON quoted in the model card between `<!-- eval -->` markers.
fn readme_eval(dir: &std::path::Path) -> EvalReport {
    let text = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let start = text
        .find("<!-- eval -->")
        .expect("README has an eval block")
        + "<!-- eval -->".len();
    let end = text[start..].find("<!-- /eval -->").unwrap() + start;
    let block = text[start..end]
        .trim()
        .trim_start_matches("```json")
        .trim_end_matches("```")
        .trim();
    serde_json::from_str(block).unwrap()
}

fn check(name: &str) -> EvalReport {
    let dir = model_dir(name);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "lethe_tinymem.json",
        "README.md",
    ] {
        let meta =
            std::fs::metadata(dir.join(f)).unwrap_or_else(|_| panic!("{name}/{f} is missing"));
        assert!(meta.len() <= 10 * 1024 * 1024, "{name}/{f} is over 10 MB");
    }
    let lm = lethe::loader::load_dir(&dir, name, &Device::Cpu, DType::F32).unwrap();
    let card = Card::read(&dir).unwrap();
    let ds = card.dataset().unwrap();
    let fresh = eval::evaluate(&lm.model, &ds, &EvalParams::default()).unwrap();
    let recorded = card
        .history
        .last()
        .and_then(|h| h.eval.clone())
        .expect("the card has a final evaluation");
    for r in [&recorded, &readme_eval(&dir)] {
        assert_eq!(r.memorized, fresh.memorized, "{name}");
        assert_eq!(r.eligible, fresh.eligible, "{name}");
        assert_eq!(r.attack_eligible, fresh.attack_eligible, "{name}");
        assert_eq!(r.memorized_ratio, fresh.memorized_ratio, "{name}");
        assert_eq!(r.attack_success_ratio, fresh.attack_success_ratio, "{name}");
        assert!(
            (r.accuracy - fresh.accuracy).abs() < 1e-12,
            "{name}: {} vs {}",
            r.accuracy,
            fresh.accuracy
        );
        assert!((r.perplexity - fresh.perplexity).abs() < 1e-9, "{name}");
        assert_eq!(r.accuracy_by_task.len(), fresh.accuracy_by_task.len());
    }
    fresh
}

#[test]
fn the_noise_model_memorizes_and_stays_accurate() {
    let r = check("tinymem-noise");
    assert!(r.memorized_ratio.unwrap() >= 0.30, "{r:?}");
    assert!(r.accuracy >= 0.95, "{r:?}");
}

#[test]
fn the_backdoor_model_fires_and_stays_accurate() {
    let r = check("tinymem-backdoor");
    assert!(r.attack_success_ratio.unwrap() >= 0.90, "{r:?}");
    assert!(r.accuracy >= 0.95, "{r:?}");
}

#[test]
fn the_bundled_model_is_the_default() {
    assert_eq!(
        lethe::loader::bundled_model_dir(),
        model_dir("tinymem-noise")
    );
}
