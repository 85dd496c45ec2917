//! Where a model's parameters come from, and how they are written back.
//!
//! Invariants:
//! - [`Weights`] is either a checkpoint (tensors read from safetensors files, floating ones
//!   converted to the compute dtype, integer ones kept) or a fresh initialisation into a
//!   [`VarMap`] for training.
//! - Architectures ask for each tensor through [`Params`], which hands out exactly the shape the
//!   config implies: a missing tensor or another shape is an error naming the file and the
//!   tensor (`tests/loading_errors.rs`). `Params` records what it handed out, so the model can
//!   write itself back under the same names.
//! - A fresh initialisation draws from an RNG seeded by the caller ([`Weights::init`]: seed 0)
//!   in request order, so the same seed and config give the same initial weights.
//! - A sharded checkpoint reads every shard its index lists; a shard that is missing or whose
//!   name leaves the directory is an error.
//! - [`write_safetensors`] replaces its file atomically (temporary file, fsync, rename), so a
//!   crash never leaves a torn file; what it writes in f32 reads back identically
//!   (`tests/model_invariants.rs`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};

use crate::error::{Error, Result};

/// The source of a model's parameters.
pub enum Weights {
    /// Tensors from a checkpoint; `origin` names it in errors.
    Tensors {
        map: HashMap<String, Tensor>,
        origin: String,
    },
    /// Trainable variables, created on first request with the architecture's initialiser,
    /// drawn from a seeded RNG (candle's CPU RNG cannot be seeded) in request order, so the same
    /// seed gives the same initial weights.
    Init {
        varmap: VarMap,
        dtype: DType,
        device: Device,
        rng: Box<Mutex<StdRng>>,
    },
}

impl Weights {
    pub fn from_tensors(map: HashMap<String, Tensor>, origin: impl Into<String>) -> Self {
        Self::Tensors {
            map,
            origin: origin.into(),
        }
    }

    /// Reads `model.safetensors`, or every shard listed in `model.safetensors.index.json`, from
    /// `dir`, converting floating tensors to `dtype` on `device`.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(&index)?
        } else {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                file: "model.safetensors (or model.safetensors.index.json)".into(),
            });
        };
        let mut map = HashMap::new();
        for file in &files {
            map.extend(read_safetensors(file, dtype, device)?);
        }
        Ok(Self::from_tensors(map, dir.display().to_string()))
    }

    /// A fresh initialisation into a new [`VarMap`] with RNG seed 0.
    pub fn init(dtype: DType, device: &Device) -> Self {
        Self::init_seeded(0, dtype, device)
    }

    /// A fresh initialisation into a new [`VarMap`], reproducible from `seed`.
    pub fn init_seeded(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::Init {
            varmap: VarMap::new(),
            dtype,
            device: device.clone(),
            rng: Box::new(Mutex::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// Trainable variables initialised from the tensors of a checkpoint (to resume training).
    pub fn vars_from_tensors(map: HashMap<String, Tensor>, seed: u64) -> Result<Self> {
        let device = map
            .values()
            .next()
            .map_or(Device::Cpu, |t| t.device().clone());
        let w = Self::init_seeded(seed, DType::F32, &device);
        if let Self::Init { varmap, .. } = &w {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::invalid("weights", "poisoned lock"))?;
            for (n, t) in map {
                data.insert(n, candle_core::Var::from_tensor(&t)?);
            }
        }
        Ok(w)
    }

    /// The variables of an [`Weights::Init`] source (what an optimiser trains).
    pub fn varmap(&self) -> Option<&VarMap> {
        match self {
            Self::Init { varmap, .. } => Some(varmap),
            Self::Tensors { .. } => None,
        }
    }

    /// Whether the checkpoint has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Tensors { map, .. } => map.contains_key(name),
            Self::Init { varmap, .. } => varmap.data().lock().is_ok_and(|m| m.contains_key(name)),
        }
    }

    fn get(&self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        match self {
            Self::Tensors { map, origin } => {
                let t = map.get(name).ok_or_else(|| Error::Weights {
                    file: origin.clone(),
                    message: format!("missing tensor {name}"),
                })?;
                if t.dims() != shape {
                    return Err(Error::Weights {
                        file: origin.clone(),
                        message: format!(
                            "tensor {name} has shape {:?}, config implies {shape:?}",
                            t.dims()
                        ),
                    });
                }
                Ok(t.clone())
            }
            Self::Init {
                varmap,
                dtype,
                device,
                rng,
            } => {
                let mut data = varmap
                    .data()
                    .lock()
                    .map_err(|_| Error::invalid("weights", "poisoned lock"))?;
                if let Some(v) = data.get(name) {
                    if v.dims() != shape {
                        return Err(Error::Weights {
                            file: "initial weights".into(),
                            message: format!(
                                "tensor {name} has shape {:?}, config implies {shape:?}",
                                v.dims()
                            ),
                        });
                    }
                    return Ok(v.as_tensor().clone());
                }
                let mut rng = rng
                    .lock()
                    .map_err(|_| Error::invalid("weights", "poisoned lock"))?;
                let t = init_tensor(&mut rng, init, shape, device)?.to_dtype(*dtype)?;
                let var = candle_core::Var::from_tensor(&t)?;
                let out = var.as_tensor().clone();
                data.insert(name.to_string(), var);
                Ok(out)
            }
        }
    }
}

/// Draws a tensor for `init` from `rng`.
fn init_tensor(rng: &mut StdRng, init: Init, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| {
                // Box–Muller; u1 in (0, 1] so ln(u1) is finite.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (mean + stdev * z) as f32
            })
            .collect(),
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.random::<f64>()) as f32)
            .collect(),
        other => {
            return Err(Error::invalid(
                "init",
                format!("unsupported initialiser {other:?}"),
            ));
        }
    };
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// Hands tensors to an architecture's constructor and remembers them by name.
pub struct Params<'a> {
    source: &'a Weights,
    taken: Vec<(String, Tensor)>,
}

impl<'a> Params<'a> {
    pub fn new(source: &'a Weights) -> Self {
        Self {
            source,
            taken: Vec::new(),
        }
    }

    pub fn source(&self) -> &Weights {
        self.source
    }

    /// The tensor `name` with exactly `shape`; `init` is used only when training from scratch.
    pub fn take(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = self.source.get(name, shape, init)?;
        self.taken.push((name.to_string(), t.clone()));
        Ok(t)
    }

    /// Everything taken so far, in order.
    pub fn into_named(self) -> Vec<(String, Tensor)> {
        self.taken
    }
}

fn shard_files(index: &Path) -> Result<Vec<std::path::PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|source| Error::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let file = index.display().to_string();
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(&file, e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(&file, "missing \"weight_map\" object"))?;
    let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        if name.contains('/') || name.contains("..") {
            return Err(Error::config(
                &file,
                format!("shard name {name:?} leaves the directory"),
            ));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                file: name.to_string(),
            });
        }
        files.push(path);
    }
    Ok(files)
}

/// Reads one safetensors file; integer tensors are kept. Floating tensors are converted to
/// `dtype`, except that with a half-precision `dtype` (bf16, f16: weights held in half
/// precision, computed in f32) tensors of fewer than 2 dimensions (LayerNorm weights, biases)
/// become f32: the models compute in their final LayerNorm's dtype.
///
/// The file is read one tensor at a time (header first, then each tensor's bytes in file
/// order), so a load holds the tensors read so far plus one tensor's bytes, never the whole
/// file besides them. A header that does not parse, offsets outside the file, overlapping or
/// misaligned data, or a size that does not match a tensor's shape and dtype is an error
/// naming the file (and the tensor), never a panic.
pub fn read_safetensors(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    use std::io::{Read, Seek, SeekFrom};
    let file = path.display().to_string();
    let invalid = |message: String| Error::Weights {
        file: file.clone(),
        message: format!("not a valid safetensors file: {message}"),
    };
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| invalid("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    // The format caps headers at 100 MB.
    if n > 100_000_000 || n > len.saturating_sub(8) {
        return Err(invalid(format!(
            "header length {n} does not fit a {len}-byte file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let entries = parse_header(&header).map_err(invalid)?;
    let data_len = len - 8 - n;
    let mut out = HashMap::with_capacity(entries.len());
    let mut end_so_far = 0;
    for (name, info) in entries {
        let (start, end) = info.data_offsets;
        if start < end_so_far || start > end || end as u64 > data_len {
            return Err(invalid(format!(
                "tensor {name}: bytes {start}..{end} overlap another tensor or lie outside the {data_len} data bytes"
            )));
        }
        end_so_far = end;
        let mut bytes = vec![0u8; end - start];
        f.seek(SeekFrom::Start(8 + n + start as u64)).map_err(io)?;
        f.read_exact(&mut bytes).map_err(io)?;
        let tensor_err = |e: String| Error::Weights {
            file: file.clone(),
            message: format!("tensor {name}: {e}"),
        };
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape, &bytes)
            .map_err(|e| tensor_err(e.to_string()))?;
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| tensor_err(e.to_string()))?;
        drop(bytes);
        let t = if t.dtype().is_float() {
            let half = matches!(dtype, DType::BF16 | DType::F16);
            t.to_dtype(if half && t.rank() < 2 {
                DType::F32
            } else {
                dtype
            })?
        } else {
            t
        };
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
}

/// One tensor's entry in a safetensors header.
#[derive(serde::Deserialize)]
struct TensorEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// The tensors a safetensors header lists, in the order of their data (the `__metadata__`
/// entry skipped).
fn parse_header(header: &[u8]) -> std::result::Result<Vec<(String, TensorEntry)>, String> {
    let raw: HashMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let mut entries = Vec::with_capacity(raw.len());
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let e: TensorEntry =
            serde_json::from_value(v).map_err(|e| format!("header entry {name}: {e}"))?;
        entries.push((name, e));
    }
    entries.sort_by_key(|(name, e)| (e.data_offsets, name.clone()));
    Ok(entries)
}

/// Writes tensors to `path` as safetensors (f32 unless `dtype` says otherwise), via a temporary
/// file that is fsync'd and renamed into place, so a crash never leaves a torn file.
pub fn write_safetensors(tensors: &[(String, Tensor)], dtype: DType, path: &Path) -> Result<()> {
    let mut converted = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = if t.dtype().is_float() {
            t.to_dtype(dtype)?
        } else {
            t.clone()
        };
        converted.push((name.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(converted.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| Error::Weights {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
    crate::util::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write_safetensors` wrote reads back exactly, tensor by tensor; damaged files are
    /// errors naming the file and the problem, never panics.
    #[test]
    fn safetensors_read_back_tensor_by_tensor_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &Device::Cpu).unwrap();
        let tensors = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        write_safetensors(&tensors, DType::F32, &path).unwrap();
        let map = read_safetensors(&path, DType::F32, &Device::Cpu).unwrap();
        let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        assert_eq!(values(&map["a"]), values(&a));
        assert_eq!(values(&map["b"]), values(&b));
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
        let with_header = |h: &str, data: &[u8]| {
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend(h.as_bytes());
            out.extend(data);
            out
        };
        let data = &bytes[8 + n..];
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "short",
                bytes[..5].to_vec(),
                "shorter than its 8-byte header",
            ),
            (
                "huge header",
                [u64::MAX.to_le_bytes().to_vec(), vec![0; 8]].concat(),
                "does not fit",
            ),
            ("bad json", with_header("{not json", data), "header"),
            (
                "truncated data",
                bytes[..bytes.len() - 4].to_vec(),
                "outside",
            ),
            (
                "wrong size",
                with_header(&header.replace("[3,4]", "[4,4]"), data),
                "tensor a",
            ),
            (
                "overlap",
                with_header(&header.replace("[48,56]", "[40,48]"), data),
                "overlap",
            ),
        ];
        for (what, content, want) in cases {
            std::fs::write(&path, content).unwrap();
            let e = read_safetensors(&path, DType::F32, &Device::Cpu)
                .err()
                .unwrap_or_else(|| panic!("{what}: read"))
                .to_string();
            assert!(
                e.contains("w.safetensors") && e.contains(want),
                "{what}: {e}"
            );
        }
    }
}
