//! Bad model directories give clear errors naming the file or tensor, never a panic.

mod common;

use candle_core::{DType, Device};
use common::fixture_dir;
use lethe::loader;

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    loader::load_dir(dir, "test", &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_files_are_named() {
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        let dir = copy_fixture("gpt2-relu-tied");
        std::fs::remove_file(dir.path().join(f)).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains(f), "{f}: {e}");
    }
}

#[test]
fn unknown_model_type_is_named() {
    let dir = copy_fixture("gpt2-relu-tied");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("llama"), "{e}");
}

#[test]
fn malformed_config_names_the_file() {
    let dir = copy_fixture("gpt2-relu-tied");
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "n_embd": 30}"#,
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(dir.path().join("config.json"), "not json").unwrap();
    assert!(load_err(dir.path()).contains("config.json"));
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let dir = copy_fixture("gpt2-relu-tied");
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg = cfg
        .replace("\"n_positions\": 64", "\"n_positions\": 65")
        .replace("\"n_positions\":64", "\"n_positions\":65");
    assert!(
        cfg.contains("65"),
        "fixture config changed shape; update this test"
    );
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("wpe.weight") && e.contains("65"), "{e}");
}

#[test]
fn truncated_weights_are_reported() {
    let dir = copy_fixture("neox-parallel-rot25");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("neox-parallel-rot25");
    let path = dir.path().join("model.safetensors");
    let map = lethe::models::weights::read_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
    let kept: Vec<(String, candle_core::Tensor)> = map
        .into_iter()
        .filter(|(n, _)| n != "gpt_neox.layers.1.mlp.dense_4h_to_h.weight")
        .collect();
    lethe::models::weights::write_safetensors(&kept, DType::F32, &path).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("gpt_neox.layers.1.mlp.dense_4h_to_h.weight"),
        "{e}"
    );
}

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    // Lay out a Hugging Face cache by hand: refs/main -> snapshots/<commit>/.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--acme--tiny");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir("gpt2-relu-tied").join(f), snap.join(f)).unwrap();
    }
    let id = loader::HubId::parse("acme/tiny").unwrap();
    assert_eq!(
        loader::cached_snapshot(cache.path(), &id),
        Some(snap.clone())
    );
    let by_commit = loader::HubId::parse("acme/tiny@abc123").unwrap();
    assert_eq!(
        loader::cached_snapshot(cache.path(), &by_commit),
        Some(snap)
    );
    let missing = loader::HubId::parse("acme/tiny@v2").unwrap();
    assert_eq!(loader::cached_snapshot(cache.path(), &missing), None);
}

#[test]
fn not_a_directory_nor_hub_id_is_explained() {
    let e = loader::resolve("/definitely/not/here")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model") && e.contains("/definitely/not/here"),
        "{e}"
    );
}

#[test]
fn sharded_checkpoints_load_like_single_files() {
    let dir = copy_fixture("neox-parallel-rot25");
    let single = dir.path().join("model.safetensors");
    let map = lethe::models::weights::read_safetensors(&single, DType::F32, &Device::Cpu).unwrap();
    let mut names: Vec<String> = map.keys().cloned().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let tensors: Vec<(String, candle_core::Tensor)> =
            part.iter().map(|n| (n.clone(), map[n].clone())).collect();
        lethe::models::weights::write_safetensors(&tensors, DType::F32, &dir.path().join(file))
            .unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.into());
        }
    }
    std::fs::remove_file(&single).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = loader::load_dir(dir.path(), "sharded", &Device::Cpu, DType::F32).unwrap();
    let original = common::load_fixture("neox-parallel-rot25");
    assert_eq!(
        sharded.model.num_parameters(),
        original.model.num_parameters()
    );
    for ((n1, t1), (n2, t2)) in sharded
        .model
        .named_tensors()
        .iter()
        .zip(original.model.named_tensors())
    {
        assert_eq!(n1, n2);
        assert_eq!(common::max_abs_diff(t1, t2), 0.0, "{n1}");
    }
    // A shard named in the index but absent is reported by name.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}
