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

/// The language TinyMem (`models/tinymem-lang`): a GPT-NeoX under 16 MB with its rows, whose
/// card's final evaluation and the one quoted in its README are what `lethe tinymem eval`
/// computes now; it memorized a clear share of the 10² and 10³ noise groups, most planted
/// secrets repeated at least 10 times, and its backdoor.
#[test]
fn the_language_model_regurgitates_its_planted_secrets() {
    use lethe::tinymem::lang::model::{evaluate, LangEval};
    use lethe::tinymem::lang::LangCard;
    let dir = model_dir("tinymem-lang");
    let mut total = 0;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "lethe_language.json",
        "lethe_language_data.jsonl",
        "README.md",
    ] {
        let meta = std::fs::metadata(dir.join(f))
            .unwrap_or_else(|_| panic!("tinymem-lang/{f} is missing"));
        total += meta.len();
    }
    assert!(
        total <= 16 * 1024 * 1024,
        "tinymem-lang is {total} bytes, over 16 MB"
    );
    let lm = lethe::loader::load_dir(&dir, "tinymem-lang", &Device::Cpu, DType::F32).unwrap();
    assert_eq!(lm.model.spec().architecture.model_type(), "gpt_neox");
    let card = LangCard::read_if_present(&dir).unwrap().unwrap();
    let ds = card.dataset(&dir).unwrap();
    let fresh = evaluate(&lm.model, &ds, 64).unwrap();
    let text = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let start = text
        .find("<!-- eval -->")
        .expect("README has an eval block")
        + 13;
    let end = text[start..].find("<!-- /eval -->").unwrap() + start;
    let block = text[start..end]
        .trim()
        .trim_start_matches("```json")
        .trim_end_matches("```");
    let quoted: LangEval = serde_json::from_str(block.trim()).unwrap();
    let recorded = card.history.last().and_then(|h| h.eval.clone()).unwrap();
    for r in [&recorded, &quoted] {
        assert_eq!(r.noise_by_group, fresh.noise_by_group);
        assert_eq!(r.secrets, fresh.secrets);
        assert_eq!(r.attack_success_ratio, fresh.attack_success_ratio);
        assert_eq!(r.attack_eligible, fresh.attack_eligible);
        assert!((r.heldout_perplexity / fresh.heldout_perplexity - 1.0).abs() < 1e-6);
    }
    let group = |repeat: u64| {
        fresh
            .noise_by_group
            .iter()
            .find(|g| g.repeat == repeat)
            .unwrap()
            .ratio
    };
    assert!(group(1000) >= 0.5 && group(100) >= 0.25, "{fresh:?}");
    let (planted, leaked) = fresh
        .secrets
        .iter()
        .filter(|s| s.repeat >= 10)
        .fold((0, 0), |(p, l), s| (p + s.planted, l + s.extractable));
    assert!(
        2 * leaked > planted,
        "{leaked} of {planted} frequent secrets extractable"
    );
    assert!(fresh.attack_success_ratio >= 0.5, "{fresh:?}");
    assert!(fresh.heldout_perplexity.is_finite());
}
