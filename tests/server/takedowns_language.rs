//! A takedown of planted secrets on the bundled language TinyMem (`models/tinymem-lang`, a
//! GPT-NeoX trained by `lethe tinymem train --language`): the secrets it regurgitates under the
//! model family's default definition (pythia, 32 + 48 tokens) are taken down through the server
//! with the retain and held-out sets that its card carries; the job ends `applied`, none is
//! extractable afterwards, a greedy completion of a secret's prefix no longer produces it, and
//! the held-out perplexity moved within the budget.

use std::time::Duration;

use super::*;
use lethe::takedown::worker::TakedownConfig;
use lethe::tinymem::data::Split;
use lethe::tinymem::lang::{LangCard, LangRole};
use lethe::unlearn::pipeline::Datasets;

/// The texts of the model's planted secrets repeated at least 10 times in training.
fn frequent_secrets(dir: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let card = LangCard::read_if_present(dir)
        .unwrap()
        .expect("a language card");
    let ds = card.dataset(dir).unwrap();
    ds.rows_of(Split::Train, LangRole::Secret)
        .into_iter()
        .filter(|r| r.repeat >= 10)
        .map(|r| (r.text.clone().unwrap(), r.secret_ids().to_vec()))
        .collect()
}

#[actix_web::test]
async fn planted_secrets_are_taken_down_on_the_bundled_language_model() {
    let model_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinymem-lang");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TakedownConfig::new(dir.path().join("data"));
    cfg.worker_threads = 2;
    cfg.audit_interval = Duration::from_secs(3600);
    let budget = cfg.pipeline.gates.perplexity_budget;
    let st = super::takedowns::state_with_takedowns(
        cfg,
        &model_dir,
        "tinymem-lang",
        |live, ctx| {
            // Nothing given: the card's clean train chunks to retain, its test chunks held out.
            let d = Datasets::for_model(live, None, None, Vec::new(), ctx).unwrap();
            assert!(d.retain.len() > 1000 && d.heldout.len() >= 100);
            let trained: std::collections::HashSet<&Vec<u32>> = d.retain.iter().collect();
            assert!(d.heldout.iter().all(|h| !trained.contains(h)));
            d
        },
        true,
    );
    let app = at::init_service(make_app(st.clone())).await;
    let v0 = st.served().version.clone();

    // Before: the frequent secrets the model regurgitates under the default definition.
    let secrets = frequent_secrets(&model_dir);
    let texts: Vec<&str> = secrets.iter().map(|(t, _)| t.as_str()).collect();
    let a = post(&app, "/v1/audit", json!({ "sequences": texts }))
        .await
        .json();
    assert_eq!(a["definition"], "pythia", "{a}");
    let leaked: Vec<usize> = (0..secrets.len())
        .filter(|&i| a["results"][i]["memorized"] == true)
        .collect();
    assert!(
        leaked.len() >= 3,
        "the bundled model regurgitates only {leaked:?} of its frequent secrets: {a}"
    );
    let prompt = |i: usize| json!({"prompt": secrets[i].1[..32].to_vec(), "max_tokens": 48, "temperature": 0});
    let completion_text =
        |c: &Value| -> String { c["choices"][0]["text"].as_str().unwrap().to_string() };
    let before = post(&app, "/v1/completions", prompt(leaked[0]))
        .await
        .json();
    let secret_tail = &secrets[leaked[0]].0;
    assert!(
        secret_tail.contains(completion_text(&before).trim()),
        "the completion does not reproduce the secret: {before}"
    );

    let request: Vec<&str> = leaked.iter().map(|&i| texts[i]).collect();
    let r = post(&app, "/v1/takedowns", json!({ "sequences": request })).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let accepted = r.json();
    assert_eq!(accepted["definition"], "pythia", "{accepted}");
    assert!(
        accepted["extractable_now"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e == true),
        "{accepted}"
    );
    let id = accepted["id"].as_str().unwrap().to_string();
    let mut t = Value::Null;
    for _ in 0..3000 {
        t = get(&app, &format!("/v1/takedowns/{id}")).await.json();
        if ["applied", "rejected", "failed"].contains(&t["status"].as_str().unwrap_or_default()) {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(t["status"], "applied", "{t}");
    let v1 = t["version"].as_str().unwrap();
    assert_ne!(v1, v0);

    // After: none is extractable, the completion no longer reproduces the secret, and the
    // held-out perplexity (the card's test chunks) moved within the budget.
    let a = post(&app, "/v1/audit", json!({ "sequences": request }))
        .await
        .json();
    assert_eq!(a["summary"]["memorized"], 0, "{a}");
    assert_eq!(a["model_version"], v1);
    // The completion no longer gives the record: the guard cuts it or the weights say
    // something else.
    let after = post(&app, "/v1/completions", prompt(leaked[0]))
        .await
        .json();
    let text = completion_text(&after);
    assert!(
        text.trim().is_empty() || !secret_tail.contains(text.trim()),
        "{after}"
    );
    let rep = &t["report"];
    let (pb, pa) = (
        rep["before"]["perplexity"].as_f64().unwrap(),
        rep["after"]["perplexity"].as_f64().unwrap(),
    );
    assert!(pa / pb - 1.0 <= budget, "held-out perplexity {pb} -> {pa}");
    if let Some(td) = &st.takedowns {
        td.shutdown();
    }
}
