//! Helpers shared by the integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lethe::loader::{self, LoadedModel};

/// The Hugging Face parity fixtures (see tests/fixtures/README.md).
pub const FIXTURES: [&str; 5] = [
    "gpt2-relu-tied",
    "gpt2-gelu-untied",
    "neox-parallel-rot25",
    "neox-sequential-rot50",
    "neox-fp16",
];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn load_fixture(name: &str) -> LoadedModel {
    let dir = fixture_dir(name);
    loader::load_dir(&dir, name, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
