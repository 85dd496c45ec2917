//! Where a model's parameters come from, and how they are written back.
//!
//! [`Weights`] is either a checkpoint (tensors read from safetensors files, upcast to the compute
//! dtype) or a fresh initialisation into a [`VarMap`] for training. Architectures ask for each
//! tensor through [`Params`], which checks its shape, names the file and tensor in every error,
//! and records what it handed out so the model can write itself back under the same names.

use std::collections::HashMap;
use std::path::Path;

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
    /// Trainable variables, created on first request with the architecture's initialiser.
    Init {
        varmap: VarMap,
        dtype: DType,
        device: Device,
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

    /// A fresh initialisation into a new [`VarMap`].
    pub fn init(dtype: DType, device: &Device) -> Self {
        Self::Init {
            varmap: VarMap::new(),
            dtype,
            device: device.clone(),
        }
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
            } => Ok(varmap.get(shape, name, init, *dtype, device)?),
        }
    }
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

/// Reads one safetensors file; floating tensors are converted to `dtype`, integer ones kept.
pub fn read_safetensors(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
        file: file.clone(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    let mut out = HashMap::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| {
            Error::Weights {
                file: file.clone(),
                message: format!("tensor {name}: {e}"),
            }
        })?;
        let t = if t.dtype().is_float() {
            t.to_dtype(dtype)?
        } else {
            t
        };
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
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
