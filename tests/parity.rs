//! Parity with Hugging Face transformers: logits, greedy continuations and scores of tiny
//! random-weight checkpoints, produced by `tests/fixtures/make_fixtures.py` (torch float32,
//! eager attention). Tolerance: max |Δlogit| ≤ 1e-4.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use lethe::engine::{self, GenerateRequest};
use lethe::models::Inputs;

const TOL: f32 = 1e-4;

#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let lm = load_fixture(name);
        let exp = expected(name);
        for (i, (prompt, want)) in exp["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(exp["logits"].as_array().unwrap())
            .enumerate()
        {
            let ids = ids_of(prompt);
            let t = ids.len();
            let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
            let got = lm
                .model
                .forward(&Inputs::causal(&input, 0).unwrap(), None, None)
                .unwrap();
            let want: Vec<f32> = want
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                })
                .collect();
            let v = lm.model.spec().vocab_size;
            let want = Tensor::from_vec(want, (1, t, v), &Device::Cpu).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= TOL, "{name} prompt {i}: max |Δlogit| = {d}");
        }
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in FIXTURES {
        let lm = load_fixture(name);
        let exp = expected(name);
        let eos = exp["eos_token_id"].as_u64().unwrap() as u32;
        let n = exp["max_new_tokens"].as_u64().unwrap() as usize;
        let reqs: Vec<GenerateRequest> = exp["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let mut r = GenerateRequest::greedy(ids_of(p), n);
                // transformers ran with min_new_tokens = max_new_tokens, which bans EOS.
                r.banned_ids.push(eos);
                r
            })
            .collect();
        // One batch (left-padded, different lengths) and each prompt alone must both match.
        let batched = engine::generate(&lm.model, None, &reqs).unwrap();
        for (i, (g, want)) in batched
            .iter()
            .zip(exp["greedy"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(g.tokens, ids_of(want), "{name} prompt {i} (batched)");
            let alone = engine::generate(&lm.model, None, std::slice::from_ref(&reqs[i])).unwrap();
            assert_eq!(alone[0].tokens, ids_of(want), "{name} prompt {i} (alone)");
        }
    }
}

#[test]
fn scores_match_transformers_loss() {
    for name in FIXTURES {
        let lm = load_fixture(name);
        let exp = expected(name);
        let seqs: Vec<Vec<u32>> = exp["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids_of)
            .collect();
        let scores = engine::score(&lm.model, &seqs, 2).unwrap();
        for (i, (s, want)) in scores
            .iter()
            .zip(exp["scores"].as_array().unwrap())
            .enumerate()
        {
            let loss = want["loss"].as_f64().unwrap();
            assert!(
                (s.nll - loss).abs() <= 1e-4,
                "{name} seq {i}: nll {} vs loss {loss}",
                s.nll
            );
            assert!((s.perplexity - loss.exp()).abs() <= 1e-3 * loss.exp());
            assert_eq!(s.token_logprobs.len(), seqs[i].len() - 1);
        }
    }
}
