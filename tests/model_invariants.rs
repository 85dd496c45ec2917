//! Model invariants on the tiny fixtures: KV-cache decode equals full recompute, a padded batch
//! equals each row alone, seeded sampling is reproducible, MLP weights can be replaced at call
//! time, and a written checkpoint reads back identically.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lethe::engine::{self, GenerateRequest, SamplingParams};
use lethe::models::{Inputs, KvCache, MlpWeights};

#[test]
fn kv_cache_decode_equals_full_recompute() {
    for name in FIXTURES {
        let lm = load_fixture(name);
        let seq: Vec<u32> = (0..24).map(|i| 4 + (i * 7 % 60) as u32).collect();
        let full_ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let full = lm
            .model
            .forward(&Inputs::causal(&full_ids, 0).unwrap(), None, None)
            .unwrap();
        // Prefill 10 tokens, then 2 at a time, then 1 at a time.
        let mut cache = KvCache::new(lm.model.spec().num_layers);
        let mut pos = 0;
        for step in [10usize, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1] {
            let ids =
                Tensor::from_vec(seq[pos..pos + step].to_vec(), (1, step), &Device::Cpu).unwrap();
            let got = lm
                .model
                .forward(&Inputs::causal(&ids, pos).unwrap(), Some(&mut cache), None)
                .unwrap();
            let want = full.narrow(1, pos, step).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{name}: cached step at {pos}: max |Δ| = {d}");
            pos += step;
            assert_eq!(cache.len(), pos);
        }
        assert_eq!(pos, seq.len());
    }
}

#[test]
fn padded_batch_equals_each_row_alone() {
    for name in FIXTURES {
        let lm = load_fixture(name);
        let prompts: Vec<Vec<u32>> = vec![
            (0..3).map(|i| 5 + i).collect(),
            (0..17).map(|i| 4 + (i * 5 % 59)).collect(),
            (0..9).map(|i| 10 + (i * 3 % 50)).collect(),
        ];
        let reqs: Vec<GenerateRequest> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut r = GenerateRequest::greedy(p.clone(), 8 + 3 * i);
                r.stop_at_eos = false;
                r.top_logprobs = Some(3);
                r
            })
            .collect();
        let batch = engine::generate(&lm.model, None, &reqs).unwrap();
        for (i, r) in reqs.iter().enumerate() {
            let alone = engine::generate(&lm.model, None, std::slice::from_ref(r))
                .unwrap()
                .remove(0);
            assert_eq!(batch[i].tokens, alone.tokens, "{name} row {i}");
            assert_eq!(batch[i].tokens.len(), r.max_new_tokens);
            for (a, b) in batch[i].token_logprobs.iter().zip(&alone.token_logprobs) {
                assert!((a - b).abs() < 1e-4, "{name} row {i}: logprob {a} vs {b}");
            }
            assert_eq!(batch[i].top_logprobs.len(), r.max_new_tokens);
            assert_eq!(batch[i].top_logprobs[0].len(), 3);
        }
        // Scoring: a right-padded batch equals each sequence alone.
        let scored = engine::score(&lm.model, &prompts, 8).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let alone = engine::score(&lm.model, std::slice::from_ref(p), 1)
                .unwrap()
                .remove(0);
            assert!(
                (scored[i].nll - alone.nll).abs() < 1e-5,
                "{name} score row {i}"
            );
        }
    }
}

#[test]
fn rows_joining_and_leaving_a_running_batch_get_their_solo_tokens() {
    use lethe::engine::generate::{DecodeBatch, Event};
    for name in FIXTURES {
        let lm = load_fixture(name);
        let m = &lm.model;
        let req = |prompt: Vec<u32>, n: usize, seed: Option<u64>| {
            let mut r = GenerateRequest::greedy(prompt, n);
            r.stop_at_eos = false;
            r.top_logprobs = Some(2);
            if let Some(s) = seed {
                r.sampling = SamplingParams {
                    temperature: 0.9,
                    top_p: 0.95,
                    top_k: 0,
                    seed: Some(s),
                };
            }
            r
        };
        let reqs = [
            req((0..5).map(|i| 5 + i).collect(), 20, None),
            req((0..19).map(|i| 4 + (i * 5 % 59)).collect(), 6, Some(3)),
            req((0..2).map(|i| 10 + i).collect(), 9, None),
            req((0..11).map(|i| 7 + (i * 3 % 50)).collect(), 12, Some(9)),
        ];
        let solo: Vec<_> = reqs
            .iter()
            .map(|r| {
                engine::generate(m, None, std::slice::from_ref(r))
                    .unwrap()
                    .remove(0)
            })
            .collect();
        // Row 0 starts alone; row 1 (longer prompt) joins after 3 steps; rows 2 and 3 join
        // after 8; row 2 is cancelled mid-way, and the others must not notice.
        let mut batch = DecodeBatch::new(m);
        let mut events = Vec::new();
        batch
            .admit(m, None, vec![(0, reqs[0].clone())], &mut events)
            .unwrap();
        let mut done = vec![None; 4];
        let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); 4];
        for step in 0.. {
            for ev in events.drain(..) {
                match ev {
                    Event::Token { id, token, .. } => streamed[id as usize].push(token),
                    Event::Done { id, generation } => done[id as usize] = Some(generation),
                }
            }
            if step == 3 {
                batch
                    .admit(m, None, vec![(1, reqs[1].clone())], &mut events)
                    .unwrap();
            }
            if step == 8 {
                let late = vec![(2, reqs[2].clone()), (3, reqs[3].clone())];
                batch.admit(m, None, late, &mut events).unwrap();
            }
            if step == 11 {
                assert_eq!(batch.cancel(&[2]).unwrap(), 1);
            }
            if batch.is_empty() && step > 8 {
                break;
            }
            batch.step(m, None, &mut events).unwrap();
        }
        for i in [0usize, 1, 3] {
            let g = done[i]
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: row {i} never finished"));
            assert_eq!(g.tokens, solo[i].tokens, "{name} row {i}");
            assert_eq!(streamed[i], solo[i].tokens, "{name} row {i} events");
            for (a, b) in g.token_logprobs.iter().zip(&solo[i].token_logprobs) {
                assert!((a - b).abs() < 1e-4, "{name} row {i}: logprob {a} vs {b}");
            }
        }
        assert!(done[2].is_none(), "{name}: a cancelled row reports nothing");
        assert!(streamed[2].len() < reqs[2].max_new_tokens);
        assert_eq!(
            batch.cache_len(),
            0,
            "{name}: an empty batch frees its cache"
        );
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let lm = load_fixture("neox-parallel-rot25");
    let req = |seed| {
        let mut r = GenerateRequest::greedy(vec![5, 6, 7, 8], 20);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 0,
            seed: Some(seed),
        };
        r.stop_at_eos = false;
        r
    };
    let a = engine::generate(&lm.model, None, &[req(42)]).unwrap();
    let b = engine::generate(&lm.model, None, &[req(42)]).unwrap();
    assert_eq!(a[0].tokens, b[0].tokens);
    // The same seed gives the same tokens inside a batch with other requests.
    let batched = engine::generate(&lm.model, None, &[req(1), req(42), req(3)]).unwrap();
    assert_eq!(batched[1].tokens, a[0].tokens);
    let c = engine::generate(&lm.model, None, &[req(43)]).unwrap();
    assert_ne!(a[0].tokens, c[0].tokens, "different seeds should differ");
}

#[test]
fn mlp_weights_are_replaceable_at_call_time() {
    for name in FIXTURES {
        let lm = load_fixture(name);
        let ids = Tensor::from_vec(vec![4u32, 9, 17, 33, 21], (1, 5), &Device::Cpu).unwrap();
        let inputs = Inputs::causal(&ids, 0).unwrap();
        let base = lm.model.forward(&inputs, None, None).unwrap();
        let own = lm.model.mlp_weights();
        let same = lm.model.forward(&inputs, None, Some(&own)).unwrap();
        assert_eq!(max_abs_diff(&base, &same), 0.0, "{name}");
        // Zeroing half of layer 0's input projection changes the output, and a model built with
        // those weights computes what the call-time override computes.
        let mut edited = own.0.clone();
        let w = &edited[0].0;
        let mask: Vec<f32> = (0..w.elem_count()).map(|i| (i % 2) as f32).collect();
        let mask = Tensor::from_vec(mask, w.dims(), &Device::Cpu).unwrap();
        edited[0].0 = (w * mask).unwrap();
        let edited = MlpWeights(edited);
        let over = lm.model.forward(&inputs, None, Some(&edited)).unwrap();
        assert!(
            max_abs_diff(&base, &over) > 1e-3,
            "{name}: override had no effect"
        );
        let swapped = lm.model.with_mlp_weights(&edited).unwrap();
        let built = swapped.forward(&inputs, None, None).unwrap();
        assert!(max_abs_diff(&built, &over) < 1e-6, "{name}");
        // The original model is untouched.
        let again = lm.model.forward(&inputs, None, None).unwrap();
        assert_eq!(max_abs_diff(&base, &again), 0.0);
    }
}

#[test]
fn written_checkpoint_reads_back_identically() {
    for name in FIXTURES {
        let lm = load_fixture(name);
        let dir = tempfile::tempdir().unwrap();
        lethe::models::weights::write_safetensors(
            lm.model.named_tensors(),
            DType::F32,
            &dir.path().join("model.safetensors"),
        )
        .unwrap();
        std::fs::copy(
            fixture_dir(name).join("config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        std::fs::copy(
            fixture_dir(name).join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let back = lethe::loader::load_dir(dir.path(), name, &Device::Cpu, DType::F32).unwrap();
        let ids = Tensor::from_vec(vec![4u32, 5, 6, 7], (1, 4), &Device::Cpu).unwrap();
        let inputs = Inputs::causal(&ids, 0).unwrap();
        let a = lm.model.forward(&inputs, None, None).unwrap();
        let b = back.model.forward(&inputs, None, None).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}");
        assert_eq!(lm.model.num_parameters(), back.model.num_parameters());
    }
}

#[test]
fn stop_strings_cut_the_text_and_banned_ids_never_appear() {
    let lm = load_fixture("gpt2-relu-tied");
    let prompt = vec![4u32, 9, 17, 33];
    let mut req = GenerateRequest::greedy(prompt.clone(), 12);
    req.stop_at_eos = false;
    let free = engine::generate(&lm.model, Some(&lm.tokenizer), std::slice::from_ref(&req))
        .unwrap()
        .remove(0);
    // Stop at the third generated word: the text ends before it, generation ends there.
    let third = lm.tokenizer.decode(&free.tokens[2..3]).unwrap();
    let first_at = free
        .tokens
        .iter()
        .position(|&t| lm.tokenizer.decode(&[t]).unwrap() == third)
        .unwrap();
    let mut stopping = req.clone();
    stopping.stop = vec![third.clone()];
    let out = engine::generate(&lm.model, Some(&lm.tokenizer), &[stopping])
        .unwrap()
        .remove(0);
    assert_eq!(out.finish_reason, engine::FinishReason::Stop);
    assert_eq!(out.tokens, free.tokens[..=first_at].to_vec());
    let text = out.text.unwrap();
    assert!(!text.contains(&third), "{text:?} still contains {third:?}");
    assert_eq!(
        text,
        lm.tokenizer.decode(&free.tokens[..first_at]).unwrap()
            + if first_at > 0 { " " } else { "" }
    );

    // Banning the tokens greedy decoding picked removes them from the output.
    let mut banned = req.clone();
    banned.banned_ids = free.tokens.clone();
    let out = engine::generate(&lm.model, None, &[banned])
        .unwrap()
        .remove(0);
    assert!(out.tokens.iter().all(|t| !free.tokens.contains(t)));
}

#[test]
fn bad_requests_name_the_field() {
    let lm = load_fixture("gpt2-relu-tied");
    let ctx = lm.model.spec().context_length;
    let cases = [
        (GenerateRequest::greedy(vec![], 3), "prompt[0]"),
        (GenerateRequest::greedy(vec![4; ctx], 1), "context length"),
        (
            GenerateRequest::greedy(vec![999], 1),
            "outside the vocabulary",
        ),
    ];
    for (req, want) in cases {
        let e = engine::generate(&lm.model, None, &[req])
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    }
    let e = engine::score(&lm.model, &[vec![4]], 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2"), "{e}");
}
