//! A GPT-NeoX takedown run to completion: a tiny NeoX (the `neox-parallel-rot25` fixture's shape
//! and tokenizer: partial rotary, parallel residual, untied head) is fine-tuned here, through the
//! hand-written GPT-NeoX backward, until it regurgitates four random sequences; then a takedown
//! through the server unlearns them (BalancedSubnet on the same pass), the gates pass on
//! held-out rows it never trained on, the weights are swapped, and the new version no longer
//! regurgitates them while it still continues the patterns it learnt.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use lethe::takedown::versions::resolve_current;
use lethe::takedown::worker::TakedownConfig;
use lethe::tinymem::finetune::{fine_tune, FineTuneConfig};
use lethe::unlearn::pipeline::Datasets;

const LEN: usize = 40;
const DEFINITION: &str = "k=16,n=24";

type Rows = Vec<Vec<u32>>;

/// An arithmetic row over the ids 4..64 (ids 0..4 are the fixture tokenizer's specials).
fn pattern(start: usize, step: usize) -> Vec<u32> {
    (0..LEN)
        .map(|i| 4 + ((start + i * step) % 60) as u32)
        .collect()
}

/// (retain rows, held-out rows, secrets). The held-out rows are 40 of the 300 (start, step)
/// patterns, drawn at random; training never sees them.
fn data() -> [Rows; 3] {
    let mut rng = StdRng::seed_from_u64(7);
    let mut all: Vec<Vec<u32>> = (0..60)
        .flat_map(|start| (1..6).map(move |step| pattern(start, step)))
        .collect();
    all.shuffle(&mut rng);
    let retain = all.split_off(40);
    let secrets = (0..4)
        .map(|_| (0..LEN).map(|_| rng.random_range(4..64)).collect())
        .collect();
    [retain, all, secrets]
}

/// Fine-tunes the fixture on the retain rows plus every secret repeated (a quarter of the
/// rows), into `dir/model`.
fn memorizing_neox(dir: &Path, retain: &[Vec<u32>], secrets: &[Vec<u32>]) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/neox-parallel-rot25");
    let lm = lethe::loader::load_dir(&fixture, "fixture", &Device::Cpu, DType::F32).unwrap();
    let mut rows = retain.to_vec();
    for _ in 0..retain.len() / (3 * secrets.len()) {
        rows.extend(secrets.iter().cloned());
    }
    let out = dir.join("model");
    let cfg = FineTuneConfig {
        steps: 300,
        batch: 8,
        seq_len: LEN,
        lr: 3e-3,
        ..FineTuneConfig::default()
    };
    let r = fine_tune(&lm.model, &fixture, &rows, &cfg, &out, |_, _, _| {}).unwrap();
    assert!(r.fast, "the hand-written GPT-NeoX backward did not run");
    assert!(r.last_loss < 0.5, "fine-tuning did not converge: {r:?}");
    out
}

#[actix_web::test]
async fn a_neox_trained_here_to_regurgitate_is_taken_down_through_the_server() {
    taken_down_through_the_server(DType::F32).await;
}

/// The same takedown on a server holding its weights in bf16 (`lethe serve --dtype bf16`):
/// the job trains and gates in f32, and the audits before and after run on the bf16 weights
/// that the server holds.
#[actix_web::test]
async fn a_neox_served_in_bf16_is_taken_down_and_served_in_bf16() {
    taken_down_through_the_server(DType::BF16).await;
}

async fn taken_down_through_the_server(serve_dtype: DType) {
    let dir = tempfile::tempdir().unwrap();
    let [retain, heldout, secrets] = data();
    let model_dir = memorizing_neox(dir.path(), &retain, &secrets);

    let mut cfg = TakedownConfig::new(dir.path().join("data"));
    cfg.serve_dtype = serve_dtype;
    cfg.worker_threads = 2;
    cfg.audit_interval = Duration::from_secs(3600);
    let st = super::takedowns::state_with_takedowns(
        cfg,
        &model_dir,
        "tiny-neox",
        |live, ctx| {
            Datasets::for_model(
                live,
                Some(retain.clone()),
                Some(heldout.clone()),
                Vec::new(),
                ctx,
            )
            .unwrap()
        },
        true,
    );
    let app = at::init_service(make_app(st.clone())).await;
    let v0 = st.served().version.clone();

    // Before: every secret is (16, 24)-extractable and a greedy completion reproduces it.
    let audit = json!({"sequences": secrets, "definition": DEFINITION});
    let a = post(&app, "/v1/audit", audit.clone()).await.json();
    assert_eq!(a["summary"]["memorized"], 4, "{a}");
    let kept = json!({"sequences": heldout[..8], "definition": DEFINITION});
    let flags = |a: &Value| -> Vec<bool> {
        let rows = a["results"].as_array().unwrap();
        rows.iter()
            .map(|r| r["memorized"].as_bool().unwrap())
            .collect()
    };
    let kept_before = flags(&post(&app, "/v1/audit", kept.clone()).await.json());
    let skill = kept_before.iter().filter(|&&m| m).count();
    assert!(
        skill == 8,
        "the model did not learn the patterns: {kept_before:?}"
    );
    let complete =
        |s: &[u32]| json!({"prompt": s[..16].to_vec(), "max_tokens": 24, "temperature": 0});
    let before = post(&app, "/v1/completions", complete(&secrets[0]))
        .await
        .json();
    assert_eq!(before["choices"][0]["finish_reason"], "length", "{before}");

    let r = post(
        &app,
        "/v1/takedowns",
        json!({"sequences": secrets, "definition": DEFINITION}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let mut t = Value::Null;
    for _ in 0..600 {
        t = get(&app, &format!("/v1/takedowns/{id}")).await.json();
        if ["applied", "rejected", "failed"].contains(&t["status"].as_str().unwrap_or_default()) {
            break;
        }
        // Inference keeps answering while the job runs.
        let c = post(&app, "/v1/completions", complete(&heldout[0])).await;
        assert_eq!(c.status, 200, "{}", String::from_utf8_lossy(&c.body));
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t["status"], "applied", "{t}");
    let v1 = t["version"].as_str().unwrap();
    assert_ne!(v1, v0);
    assert_eq!(st.served().version, v1);
    assert_eq!(st.served().model.weight_dtype(), serve_dtype);

    // After: none is extractable, and the gates measured the held-out rows within budget.
    let a = post(&app, "/v1/audit", audit).await.json();
    assert_eq!(a["summary"]["memorized"], 0, "{a}");
    assert_eq!(a["model_version"], v1);
    let rep = &t["report"];
    let (pb, pa) = (
        rep["before"]["perplexity"].as_f64().unwrap(),
        rep["after"]["perplexity"].as_f64().unwrap(),
    );
    // The model had learnt the patterns (a uniform guess is 60), and the takedown kept that.
    assert!(
        pb < 1.5,
        "held-out perplexity {pb}: the fine-tuning did not learn"
    );
    assert!(pa / pb - 1.0 <= 0.02, "held-out perplexity {pb} -> {pa}");
    // The new version still continues exactly the held-out patterns it continued before (it
    // kept its skill; these rows were never trained on).
    let a = post(&app, "/v1/audit", kept).await.json();
    assert_eq!(flags(&a), kept_before, "{a}");
    // The new weights are a version on disk that loads as GPT-NeoX.
    let vs = get(&app, "/v1/admin/versions").await.json();
    assert_eq!(vs["current"], v1);
    let cur = resolve_current(&dir.path().join("data"), &model_dir).unwrap();
    let reloaded = lethe::loader::load_dir(&cur, "v1", &Device::Cpu, DType::F32).unwrap();
    assert_eq!(reloaded.model.spec().architecture.model_type(), "gpt_neox");
    if let Some(td) = &st.takedowns {
        td.shutdown();
    }
}
