//! Resolving `--model` to a directory and loading what is in it: config, weights and
//! tokenizer.
//!
//! Invariants:
//! - `--model` is a local directory (`config.json`, `model.safetensors` or a sharded
//!   `model.safetensors.index.json`, `tokenizer.json`) or a hub id `org/name[@revision]`;
//!   anything else, including hub ids with path-like parts (`..`, a leading dot, a third
//!   segment), is an error saying so. Without `--model` the bundled TinyMem model loads
//!   ([`bundled_model_dir`]).
//! - Hub ids are looked up in the Hugging Face cache first (`HF_HUB_CACHE`, else `$HF_HOME/hub`,
//!   else `~/.cache/huggingface/hub`), which works offline; only on a cache miss, and never when
//!   `HF_HUB_OFFLINE` is set, does lethe download through hf-hub.
//! - The architecture is chosen from `config.json`'s `model_type`; floating tensors are
//!   converted to the compute dtype ([`ModelArgs::load`]: f32) on the chosen device.
//! - A bad directory is an error naming the missing file, the malformed file or the tensor
//!   (`tests/loading_errors.rs`); so is a tokenizer with more tokens than the model's
//!   `vocab_size`.
//! - [`content_hash`] depends only on the names and bytes of `config.json` and the
//!   `*.safetensors` files, so the same weights always get the same version id.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::models::{Model, ModelConfig, Weights};
use crate::tokenizer::Tokenizer;

/// Which model to load and where to run it.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Model directory or Hugging Face hub id `org/name[@revision]` (default: the bundled TinyMem
    /// noise model).
    #[arg(long, env = "LETHE_MODEL")]
    pub model: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "LETHE_DEVICE", default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    /// The `--model` spec, or the bundled model's directory when it is omitted.
    pub fn spec(&self) -> anyhow::Result<String> {
        Ok(match &self.model {
            Some(m) => m.clone(),
            None => {
                let dir = bundled_model_dir();
                if !dir.is_dir() {
                    anyhow::bail!(
                        "no --model given and the bundled model is missing at {}",
                        dir.display()
                    );
                }
                dir.display().to_string()
            }
        })
    }

    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let device = crate::runtime::parse_device(&self.device)?;
        let spec = self.spec()?;
        load(&spec, &device, DType::F32).with_context(|| format!("loading model {spec}"))
    }
}

/// The precision a server holds its weights in (`lethe serve --dtype`). Weight matrices
/// (embeddings, projections, the head) are held in it; LayerNorms and biases stay f32, and so
/// does all compute: a half-precision weight is widened as it is read. Takedowns always train
/// and validate on f32 copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightDtype {
    /// Every weight in f32 (a half-precision checkpoint is widened, exactly).
    #[default]
    F32,
    /// Matrices in bfloat16 (an f32 checkpoint's values are rounded).
    Bf16,
    /// Matrices in float16 (an f32 checkpoint's values are rounded).
    F16,
    /// What the checkpoint stores (`torch_dtype` in `config.json`; f32 when absent).
    Auto,
}

impl WeightDtype {
    /// The dtype to load the checkpoint in `dir` with.
    pub fn resolve(self, dir: &Path) -> Result<DType> {
        match self {
            Self::Auto => stored_dtype(dir),
            fixed => Ok(fixed.resolve_random()),
        }
    }

    /// The dtype for weights with no checkpoint behind them (random ones): `auto` is f32.
    pub fn resolve_random(self) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::F32 | Self::Auto => DType::F32,
        }
    }
}

/// The floating dtype `config.json` in `dir` says the checkpoint is stored in (`torch_dtype`,
/// or `dtype` in newer files): f16, bf16, else f32.
pub fn stored_dtype(dir: &Path) -> Result<DType> {
    let path = require(dir, "config.json")?;
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
    Ok(dtype_named(stored_dtype_name(&json).as_deref()))
}

/// The `torch_dtype` (or `dtype`) entry of a parsed `config.json`.
fn stored_dtype_name(json: &serde_json::Value) -> Option<String> {
    json.get("torch_dtype")
        .or_else(|| json.get("dtype"))
        .and_then(|d| d.as_str().map(str::to_string))
}

fn dtype_named(name: Option<&str>) -> DType {
    match name {
        Some("float16") => DType::F16,
        Some("bfloat16") => DType::BF16,
        _ => DType::F32,
    }
}

/// A model ready to run, with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The directory the files were read from.
    pub dir: PathBuf,
    /// What the user asked for (`--model`).
    pub source: String,
    /// The dtype the checkpoint stores its floating tensors in (compute is in `model.dtype()`).
    pub stored_dtype: String,
    /// `config.json` exactly as read, so derived checkpoints keep every key.
    pub config_json: String,
}

/// The directory of the model that ships with lethe (`models/tinymem-noise`): under
/// `$LETHE_MODELS_DIR` when set, else beside the executable (`<bin>/models` or
/// `<bin>/../share/lethe/models`, as packaged images lay it out), else in the source tree.
pub fn bundled_model_dir() -> PathBuf {
    bundled_models_root().join("tinymem-noise")
}

/// The folder holding the bundled models (see [`bundled_model_dir`]).
pub fn bundled_models_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("LETHE_MODELS_DIR") {
        return PathBuf::from(dir);
    }
    let source_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let beside_exe = std::env::current_exe().ok().and_then(|exe| {
        let bin = exe.parent()?.to_path_buf();
        [bin.join("models"), bin.join("../share/lethe/models")]
            .into_iter()
            .find(|d| d.join("tinymem-noise").is_dir())
    });
    beside_exe.unwrap_or(source_tree)
}

/// Loads `spec` (a directory or hub id) onto `device`, computing in `dtype`.
pub fn load(spec: &str, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let dir = resolve(spec)?;
    load_dir(&dir, spec, device, dtype)
}

/// Loads a model directory.
pub fn load_dir(dir: &Path, source: &str, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let config_path = require(dir, "config.json")?;
    let tokenizer_path = require(dir, "tokenizer.json")?;
    let config_json = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
        path: config_path.clone(),
        source,
    })?;
    let config = ModelConfig::from_json(&config_json, &config_path.display().to_string())?;
    let stored_dtype = serde_json::from_str::<serde_json::Value>(&config_json)
        .ok()
        .and_then(|v| stored_dtype_name(&v))
        .unwrap_or_else(|| "float32".to_string());
    let weights = Weights::from_dir(dir, dtype, device)?;
    let model = Model::new(&config, &weights)?;
    let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
    let spec = model.spec();
    if tokenizer.vocab_size() > spec.vocab_size {
        return Err(Error::config(
            tokenizer_path.display().to_string(),
            format!(
                "tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                spec.vocab_size
            ),
        ));
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        dir: dir.to_path_buf(),
        source: source.to_string(),
        stored_dtype,
        config_json,
    })
}

fn require(dir: &Path, file: &str) -> Result<PathBuf> {
    let p = dir.join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::MissingFile {
            dir: dir.to_path_buf(),
            file: file.to_string(),
        })
    }
}

/// sha256 over `config.json` and every `*.safetensors` file (sorted by name), as 16 hex
/// characters: the same weights always get the same version id.
pub fn content_hash(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| n == "config.json")
                || p.extension().is_some_and(|e| e == "safetensors")
        })
        .collect();
    files.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        h.update(path.file_name().unwrap_or_default().as_encoded_bytes());
        let mut f = std::fs::File::open(&path).map_err(io)?;
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(crate::util::hex(&h.finalize())[..16].to_string())
}

/// Turns `--model` into a local directory.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let Some(hub) = HubId::parse(spec) else {
        return Err(Error::invalid(
            "model",
            format!("{spec:?} is neither a directory nor a hub id of the form org/name[@revision]"),
        ));
    };
    if let Some(dir) = cached_snapshot(&hub_cache_dir(), &hub) {
        return Ok(dir);
    }
    if env_flag("HF_HUB_OFFLINE") {
        return Err(Error::Hub(format!(
            "{spec} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set",
            hub_cache_dir().display()
        )));
    }
    download(&hub)
}

/// `org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub owner: String,
    pub name: String,
    pub revision: String,
}

impl HubId {
    pub fn parse(spec: &str) -> Option<Self> {
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (spec, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !ok(owner) || !ok(name) || revision.contains("..") {
            return None;
        }
        Some(Self {
            owner: owner.to_string(),
            name: name.to_string(),
            revision: revision.to_string(),
        })
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The hub cache directory, following huggingface_hub's precedence.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// The snapshot directory of `id` in `cache`, if it holds a complete model.
pub fn cached_snapshot(cache: &Path, id: &HubId) -> Option<PathBuf> {
    let repo = cache.join(format!("models--{}--{}", id.owner, id.name));
    let refs = repo.join("refs").join(&id.revision);
    let commit = match std::fs::read_to_string(&refs) {
        Ok(s) => s.trim().to_string(),
        // A revision given as a commit hash has no ref file.
        Err(_) => id.revision.clone(),
    };
    let dir = repo.join("snapshots").join(commit);
    let complete = dir.join("config.json").is_file()
        && dir.join("tokenizer.json").is_file()
        && (dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file());
    complete.then_some(dir)
}

fn download(id: &HubId) -> Result<PathBuf> {
    let hub_err = |e: hf_hub::HFError| Error::Hub(format!("{}/{}: {e}", id.owner, id.name));
    let client = hf_hub::HFClientSync::new().map_err(hub_err)?;
    let repo = client.model(id.owner.clone(), id.name.clone());
    let fetch = |file: &str| -> Result<PathBuf> {
        tracing::info!(file, repo = %format!("{}/{}", id.owner, id.name), "downloading");
        repo.download_file()
            .filename(file)
            .revision(id.revision.clone())
            .send()
            .map_err(hub_err)
    };
    let config = fetch("config.json")?;
    fetch("tokenizer.json")?;
    match fetch("model.safetensors") {
        Ok(_) => {}
        Err(_) => {
            let index = fetch("model.safetensors.index.json")?;
            let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
                path: index.clone(),
                source,
            })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(index.display().to_string(), e.to_string()))?;
            let mut shards: Vec<String> = json["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                fetch(&s)?;
            }
        }
    }
    Ok(config.parent().unwrap_or(Path::new(".")).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint stored in bf16: `auto` holds its matrices in bf16 and its LayerNorms and
    /// biases in f32 (computing in f32), with exactly the values an f32 load widens them to.
    #[test]
    fn a_bf16_checkpoint_loads_its_matrices_in_bf16_under_auto() {
        let src = bundled_model_dir();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        cfg["torch_dtype"] = "bfloat16".into();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let lm = load_dir(&src, "bundled", &Device::Cpu, DType::F32).unwrap();
        crate::models::weights::write_safetensors(
            lm.model.named_tensors(),
            DType::BF16,
            &dir.join("model.safetensors"),
        )
        .unwrap();
        assert_eq!(WeightDtype::Auto.resolve(&src).unwrap(), DType::F32);
        assert_eq!(WeightDtype::Auto.resolve(dir).unwrap(), DType::BF16);
        let held = load_dir(dir, "bf16", &Device::Cpu, DType::BF16).unwrap();
        let wide = load_dir(dir, "bf16", &Device::Cpu, DType::F32).unwrap();
        assert_eq!(held.stored_dtype, "bfloat16");
        assert_eq!(
            (held.model.weight_dtype(), held.model.dtype()),
            (DType::BF16, DType::F32)
        );
        for ((name, h), (_, w)) in held
            .model
            .named_tensors()
            .iter()
            .zip(wide.model.named_tensors())
        {
            assert_eq!(
                h.dtype(),
                if h.rank() < 2 {
                    DType::F32
                } else {
                    DType::BF16
                },
                "{name}"
            );
            let values = |t: &candle_core::Tensor| -> Vec<f32> {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(values(h), values(w), "{name}");
        }
    }

    #[test]
    fn hub_ids_parse() {
        let id = HubId::parse("EleutherAI/pythia-70m@step3000").unwrap();
        assert_eq!(
            (id.owner.as_str(), id.name.as_str(), id.revision.as_str()),
            ("EleutherAI", "pythia-70m", "step3000")
        );
        assert_eq!(HubId::parse("a/b").unwrap().revision, "main");
        for bad in ["noslash", "a/b@", "../x/y", "a/b/c", "a b/c", "/b"] {
            assert!(HubId::parse(bad).is_none(), "{bad}");
        }
    }
}
