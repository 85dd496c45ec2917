//! Weights versions on disk: `data_dir/versions/<id>/`, one model directory per version, named
//! by its content hash, and the start-up choice of the directory to serve.
//!
//! Invariants:
//! - `<id>` is [`content_hash`] of the directory: sha256 over the names and bytes of
//!   `config.json` and the `*.safetensors` files (other files do not change it), cut to 16 hex
//!   characters. The same content always gets the same id and one directory.
//! - A version is assembled in `versions/.tmp-<random>/` (written files fsync'd, then the
//!   directory), hashed, and published by one `rename` followed by an fsync of `versions/`. A
//!   crash at any moment leaves either no version or a complete one under its final name;
//!   [`clean_temp`] removes the `.tmp-*` leftovers at start-up. A staging error removes its
//!   temporary directory.
//! - lethe never writes into or removes a directory under its final name: publishing content
//!   that already exists (or that another writer published first) keeps the existing directory.
//! - [`import_base`] hard-links the model directory's files where it can, so it relies on them
//!   never being modified in place; the content is hashed again after staging, and a directory
//!   that changed meanwhile is an error and publishes nothing.
//! - [`resolve_current`]: a data directory serves one model lineage (another base model is
//!   refused); versions are found by id under the data directory, not by a recorded path; a live
//!   version without its directory is an error, never silently replaced. A crash during the
//!   first start is completed by the next one.

pub mod remote;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::{random_hex, Error, Result};
use crate::loader::content_hash;

/// The folder of versions inside the data directory.
pub const VERSIONS_DIR: &str = "versions";
/// Prefix of directories being assembled.
pub const TMP_PREFIX: &str = ".tmp-";
/// Other files of the base directory larger than this are not copied into a version.
pub const MAX_COPIED_FILE_BYTES: u64 = 64 << 20;

/// `data_dir/versions`.
pub fn versions_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(VERSIONS_DIR)
}

/// `data_dir/versions/<id>`.
pub fn version_dir(data_dir: &Path, id: &str) -> PathBuf {
    versions_dir(data_dir).join(id)
}

/// Writes `tensors` as a new version whose config, tokenizer and other small files (e.g.
/// `lethe_tinymem.json`, `README.md`) come from `base_dir`. Floating tensors are stored in the
/// dtype `base_dir/config.json` declares (`torch_dtype`: float16, bfloat16; float32 otherwise),
/// so a version is as large as its base. Returns the id and the version directory; the same
/// content always gives the same id, and writing it again returns the existing directory.
pub fn write_version(
    data_dir: &Path,
    base_dir: &Path,
    tensors: &[(String, Tensor)],
) -> Result<(String, PathBuf)> {
    let tmp = stage(data_dir, base_dir, tensors)?;
    publish(data_dir, &tmp, None)
}

/// Registers the served model directory `model_dir` as a version (the root of the history),
/// with the id its content hashes to. Every regular file at the top of `model_dir` (except weights
/// in formats lethe does not load, such as `pytorch_model.bin`) is hard-linked
/// into the version, or copied where linking is impossible (another filesystem, another owner):
/// a multi-gigabyte base costs no disk. This relies on the model directory's files never being
/// modified in place (hub snapshots and lethe's own writes replace files by rename); the content
/// hash is checked after linking, so a directory that changes during import is an error.
pub fn import_base(data_dir: &Path, model_dir: &Path) -> Result<(String, PathBuf)> {
    let id = content_hash(model_dir)?;
    let dest = version_dir(data_dir, &id);
    if dest.is_dir() {
        return Ok((id, dest));
    }
    let tmp = new_tmp(data_dir)?;
    let staged = (|| {
        for (name, src) in top_files(model_dir)? {
            // Weights in formats lethe does not load (pytorch_model.bin, ...) are left out.
            let loadable = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
            if is_weights_file(&name) && !loadable {
                continue;
            }
            link_or_copy(&src, &tmp.join(&name))?;
        }
        fsync_dir(&tmp)
    })();
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    publish(data_dir, &tmp, Some(&id))
}

/// Removes the `.tmp-*` leftovers of interrupted writes. Call at startup, before any write.
/// Returns how many were removed.
pub fn clean_temp(data_dir: &Path) -> Result<usize> {
    let root = versions_dir(data_dir);
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("read", &root)(e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(Error::io("read", &root))?;
        if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let r = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        r.map_err(Error::io("remove", &path))?;
        removed += 1;
    }
    if removed > 0 {
        fsync_dir(&root)?;
    }
    Ok(removed)
}

/// Assembles a version in a new temporary directory; on error it is removed.
fn stage(data_dir: &Path, base_dir: &Path, tensors: &[(String, Tensor)]) -> Result<PathBuf> {
    for required in ["config.json", "tokenizer.json"] {
        if !base_dir.join(required).is_file() {
            return Err(crate::error::Error::MissingFile {
                dir: base_dir.to_path_buf(),
                file: required.into(),
            }
            .into());
        }
    }
    let dtype = stored_dtype(base_dir)?;
    let tmp = new_tmp(data_dir)?;
    let staged = (|| {
        crate::models::weights::write_safetensors(tensors, dtype, &tmp.join("model.safetensors"))?;
        for (name, src) in top_files(base_dir)? {
            if is_weights_file(&name) {
                continue;
            }
            let len = std::fs::metadata(&src)
                .map_err(Error::io("stat", &src))?
                .len();
            if len > MAX_COPIED_FILE_BYTES && name != "config.json" && name != "tokenizer.json" {
                tracing::debug!(file = %src.display(), len, "not copied into the version: too large");
                continue;
            }
            copy_synced(&src, &tmp.join(&name))?;
        }
        fsync_dir(&tmp)
    })();
    match staged {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Hashes the staged directory and renames it to `versions/<id>`; if that version exists (same
/// content), the staged copy is dropped. `expect_id`: the id the content must hash to.
fn publish(data_dir: &Path, tmp: &Path, expect_id: Option<&str>) -> Result<(String, PathBuf)> {
    let root = versions_dir(data_dir);
    let discard = |e: Error| {
        let _ = std::fs::remove_dir_all(tmp);
        e
    };
    let id = content_hash(tmp).map_err(|e| discard(e.into()))?;
    if let Some(expected) = expect_id {
        if id != expected {
            return Err(discard(Error::invalid(
                "model directory",
                format!("its content changed while it was imported (hash {expected}, then {id})"),
            )));
        }
    }
    let dest = root.join(&id);
    if dest.is_dir() {
        std::fs::remove_dir_all(tmp).map_err(Error::io("remove", tmp))?;
        return Ok((id, dest));
    }
    if let Err(e) = std::fs::rename(tmp, &dest) {
        // Another writer published the same content first: keep theirs.
        if dest.is_dir() {
            std::fs::remove_dir_all(tmp).map_err(Error::io("remove", tmp))?;
            return Ok((id, dest));
        }
        return Err(discard(Error::io("rename", tmp)(e)));
    }
    fsync_dir(&root)?;
    Ok((id, dest))
}

fn new_tmp(data_dir: &Path) -> Result<PathBuf> {
    let root = versions_dir(data_dir);
    std::fs::create_dir_all(&root).map_err(Error::io("create", &root))?;
    let tmp = root.join(format!("{TMP_PREFIX}{}", random_hex(8)));
    std::fs::create_dir(&tmp).map_err(Error::io("create", &tmp))?;
    Ok(tmp)
}

/// The forget check on the weights as they will be served, when those differ from the f32
/// weights the gates measured: a version is written in the dtype its base checkpoint stores
/// and loaded in `serve` (`lethe serve --dtype`). `Some(reason)` when a sequence of `items`
/// is still extractable there; `None` when none is, or when both dtypes are f32 (nothing is
/// rounded).
pub fn forget_check_as_served(
    base_dir: &Path,
    serve: DType,
    model: &crate::models::Model,
    tokenizer: &crate::tokenizer::Tokenizer,
    items: &[crate::audit::AuditItem],
) -> Result<Option<String>> {
    let stored = stored_dtype(base_dir)?;
    if stored == DType::F32 && serve == DType::F32 {
        return Ok(None);
    }
    let served = model.rounded_as(stored, serve).map_err(Error::Model)?;
    let (results, _) =
        crate::audit::audit(&served, Some(tokenizer), items, 64).map_err(Error::Model)?;
    let still = results.iter().filter(|r| r.memorized).count();
    Ok((still > 0).then(|| {
        format!(
            "{still} of {} sequences are still extractable with the weights as served \
             ({stored:?} on disk, {serve:?} in memory), though not in f32",
            items.len()
        )
    }))
}

/// The dtype `config.json` says the checkpoint is stored in.
fn stored_dtype(dir: &Path) -> Result<DType> {
    crate::loader::stored_dtype(dir).map_err(Error::Model)
}

/// Files that hold weights (not copied from the base: the version writes its own).
fn is_weights_file(name: &str) -> bool {
    const EXT: [&str; 10] = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".onnx",
        ".gguf",
        ".ot",
    ];
    EXT.iter().any(|e| name.ends_with(e)) || name.ends_with(".index.json")
}

/// Regular files (symlinks followed) at the top of `dir`, not hidden, sorted by name.
fn top_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io("read", dir))? {
        let entry = entry.map_err(Error::io("read", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

/// Copies `src` to a new file `dst` and fsyncs it.
fn copy_synced(src: &Path, dst: &Path) -> Result<()> {
    let mut from = std::fs::File::open(src).map_err(Error::io("open", src))?;
    let mut to = std::fs::File::create(dst).map_err(Error::io("create", dst))?;
    std::io::copy(&mut from, &mut to).map_err(Error::io("copy to", dst))?;
    to.flush().map_err(Error::io("write", dst))?;
    to.sync_all().map_err(Error::io("fsync", dst))
}

/// Hard-links `src` (its target, if a symlink) at `dst`, or copies it.
fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    let target = std::fs::canonicalize(src).map_err(Error::io("resolve", src))?;
    if std::fs::hard_link(&target, dst).is_ok() {
        return Ok(());
    }
    copy_synced(&target, dst)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(Error::io("open", dir))?;
    d.sync_all().map_err(Error::io("fsync", dir))
}

/// One forward pass: the weights load and compute finite logits.
pub fn smoke_test(model: &crate::models::Model) -> crate::Result<()> {
    let ids = Tensor::new(&[[1u32, 2, 3]], model.device())?;
    let logits = model.forward(&crate::models::Inputs::causal(&ids, 0)?, None, None)?;
    let v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(crate::Error::Config {
            file: "takedown store".into(),
            message: "smoke test: the new weights give non-finite logits".into(),
        })
    }
}

/// Loads the version directory `dir` as the version `id` is served: in `dtype` on `device`,
/// smoke-tested, and named `name`. A directory whose content does not hash to `id` is an error:
/// what goes live is exactly the version the store names.
pub fn load_served(
    dir: &Path,
    id: &str,
    device: &candle_core::Device,
    dtype: DType,
    name: Option<String>,
) -> crate::Result<crate::engine::served::Served> {
    let lm = crate::loader::load_dir(dir, &dir.display().to_string(), device, dtype)?;
    smoke_test(&lm.model)?;
    let served = crate::engine::served::Served::new(lm, name)?;
    if served.version != id {
        return Err(store_err(&format!(
            "version {id} loaded from {} with a different hash {}",
            dir.display(),
            served.version
        )));
    }
    Ok(served)
}

/// Registers the served base model as the root version (first start), or loads the current
/// version recorded in the store (restarts). Returns the directory to serve.
///
/// A data directory belongs to one model lineage: starting it with a different base model
/// (`--model`) than the one it was created with is refused, since its versions and takedowns
/// are edits of that model. Version directories are found under the data directory by id, so
/// a restored or moved data directory works from any path.
pub fn resolve_current(data_dir: &Path, model_dir: &Path) -> crate::Result<PathBuf> {
    let store = super::Store::open(data_dir).map_err(|e| store_err(&e))?;
    resolve_in(&store, None, data_dir, model_dir)
}

/// [`resolve_current`] for a fleet replica: the live version is the shared store's, fetched
/// into `data_dir` (the local cache) from the shared version store when it is not there. The
/// first replica ever to start imports `model_dir`, uploads it and sets it live; replicas
/// starting at the same moment find its pointer and follow it.
pub fn resolve_current_fleet(
    data_dir: &Path,
    model_dir: &Path,
    fleet: &super::fleet::FleetConfig,
) -> crate::Result<PathBuf> {
    let store = super::Store::open_postgres(&fleet.database_url.0).map_err(|e| store_err(&e))?;
    let shared = remote::SharedVersions::open(&fleet.versions_url).map_err(|e| store_err(&e))?;
    resolve_in(&store, Some(&shared), data_dir, model_dir)
}

fn resolve_in(
    store: &super::Store,
    shared: Option<&remote::SharedVersions>,
    data_dir: &Path,
    model_dir: &Path,
) -> crate::Result<PathBuf> {
    if let Some(cur) = store.current_version().map_err(|e| store_err(&e))? {
        let versions = store.list_versions().map_err(|e| store_err(&e))?;
        let base = content_hash(model_dir)?;
        if let Some(root) = versions.iter().find(|v| v.parent.is_none()) {
            if root.id != base {
                return Err(crate::Error::Config {
                    file: data_dir.display().to_string(),
                    message: format!(
                        "this data directory belongs to base model version {} but --model {} \
                         is version {base}; use the original model or another --data-dir",
                        root.id,
                        model_dir.display()
                    ),
                });
            }
        }
        let dir = match shared {
            Some(s) => s.fetch(data_dir, &cur).map_err(|e| store_err(&e))?,
            None => version_dir(data_dir, &cur),
        };
        if !dir.is_dir() {
            return Err(crate::Error::Config {
                file: dir.display().to_string(),
                message: format!(
                    "the live version {cur} has no directory (restore it from a backup)"
                ),
            });
        }
        return Ok(dir);
    }
    let (id, path) = import_base(data_dir, model_dir).map_err(|e| store_err(&e))?;
    if let Some(s) = shared {
        s.upload(&id, &path).map_err(|e| store_err(&e))?;
    }
    store
        .insert_version(super::NewVersion {
            id: id.clone(),
            parent: None,
            takedowns: Vec::new(),
            metrics: serde_json::json!({}),
            path: path.display().to_string(),
        })
        .map_err(|e| store_err(&e))?;
    match store.set_current(None, &id) {
        Ok(()) => Ok(path),
        // Another replica of the fleet set the root live first: follow it.
        Err(Error::VersionConflict { .. }) if shared.is_some() => {
            resolve_in(store, shared, data_dir, model_dir)
        }
        Err(e) => Err(store_err(&e)),
    }
}

/// A store failure where a `crate::Error` is expected (start-up), named as the store's.
fn store_err(e: &dyn std::fmt::Display) -> crate::Error {
    crate::Error::Config {
        file: "takedown store".into(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::load_dir;
    use candle_core::Device;

    fn base() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinymem-noise")
    }

    fn base_tensors() -> Vec<(String, Tensor)> {
        let lm = load_dir(&base(), "base", &Device::Cpu, DType::F32).unwrap();
        lm.model.named_tensors().to_vec()
    }

    /// Entries of `versions/`, sorted.
    fn entries(data: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(versions_dir(data))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn written_version_loads_to_identical_tensors() {
        let data = tempfile::tempdir().unwrap();
        let mut tensors = base_tensors();
        // An "unlearned" edit: zero the first matrix.
        let (i, _) = tensors
            .iter()
            .enumerate()
            .find(|(_, (_, t))| t.rank() == 2)
            .unwrap();
        tensors[i].1 = tensors[i].1.zeros_like().unwrap();
        let (id, dir) = write_version(data.path(), &base(), &tensors).unwrap();
        assert_eq!(dir, version_dir(data.path(), &id));
        assert_eq!(content_hash(&dir).unwrap(), id);
        assert_ne!(content_hash(&base()).unwrap(), id);
        for f in [
            "config.json",
            "tokenizer.json",
            "model.safetensors",
            "lethe_tinymem.json",
        ] {
            assert!(dir.join(f).is_file(), "{f} missing");
        }
        let back = load_dir(&dir, "v", &Device::Cpu, DType::F32).unwrap();
        let loaded: std::collections::HashMap<_, _> =
            back.model.named_tensors().iter().cloned().collect();
        assert_eq!(loaded.len(), tensors.len());
        for (name, t) in &tensors {
            let l = &loaded[name];
            assert_eq!(l.dims(), t.dims(), "{name}");
            assert_eq!(
                crate::test_util::max_abs_diff(l, t),
                0.0,
                "{name} differs after the round trip"
            );
        }
        assert_eq!(entries(data.path()), vec![id]);
    }

    #[test]
    fn same_content_gives_the_same_id_and_one_directory() {
        let data = tempfile::tempdir().unwrap();
        let tensors = base_tensors();
        let (a, da) = write_version(data.path(), &base(), &tensors).unwrap();
        let (b, db) = write_version(data.path(), &base(), &tensors).unwrap();
        assert_eq!((a.clone(), da), (b, db));
        let mut changed = tensors.clone();
        changed[0].1 = (&changed[0].1 * 0.5).unwrap();
        let (c, _) = write_version(data.path(), &base(), &changed).unwrap();
        assert_ne!(a, c);
        let mut want = vec![a, c];
        want.sort();
        assert_eq!(entries(data.path()), want);
    }

    #[test]
    fn interrupted_writes_leave_only_temp_dirs_which_are_cleaned() {
        let data = tempfile::tempdir().unwrap();
        assert_eq!(clean_temp(data.path()).unwrap(), 0);
        // A crash after staging, before the rename: nothing under a final name.
        let tmp = stage(data.path(), &base(), &base_tensors()).unwrap();
        std::fs::write(versions_dir(data.path()).join(".tmp-file"), b"x").unwrap();
        assert!(tmp.is_dir());
        assert!(entries(data.path())
            .iter()
            .all(|e| e.starts_with(TMP_PREFIX)));
        assert_eq!(clean_temp(data.path()).unwrap(), 2);
        assert!(entries(data.path()).is_empty());
    }

    #[test]
    fn a_version_is_never_visible_before_it_is_complete() {
        let data = tempfile::tempdir().unwrap();
        let root = versions_dir(data.path());
        std::fs::create_dir_all(&root).unwrap();
        let tensors = base_tensors();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut checked = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    for e in std::fs::read_dir(&root).unwrap() {
                        let e = e.unwrap();
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with(TMP_PREFIX) {
                            continue;
                        }
                        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
                            assert!(e.path().join(f).is_file(), "{name} visible without {f}");
                        }
                        assert_eq!(content_hash(&e.path()).unwrap(), name);
                        checked += 1;
                    }
                }
                checked
            });
            for k in 0..3 {
                let mut t = tensors.clone();
                t[0].1 = (&t[0].1 + k as f64).unwrap();
                write_version(data.path(), &base(), &t).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            watcher.join().unwrap();
        });
        assert_eq!(entries(data.path()).len(), 3);
    }

    #[test]
    fn import_base_registers_the_model_under_its_hash() {
        let data = tempfile::tempdir().unwrap();
        // A copy of the base with a symlinked config (as in a hub snapshot) and a .bin to skip.
        let model = tempfile::tempdir().unwrap();
        for f in ["tokenizer.json", "model.safetensors", "lethe_tinymem.json"] {
            std::fs::copy(base().join(f), model.path().join(f)).unwrap();
        }
        std::os::unix::fs::symlink(base().join("config.json"), model.path().join("config.json"))
            .unwrap();
        std::fs::write(model.path().join("pytorch_model.bin"), b"not loaded").unwrap();
        let (id, dir) = import_base(data.path(), model.path()).unwrap();
        assert_eq!(id, content_hash(&base()).unwrap());
        assert!(!dir.join("config.json").is_symlink());
        assert_eq!(content_hash(&dir).unwrap(), id);
        assert!(dir.join("lethe_tinymem.json").is_file());
        assert!(!dir.join("pytorch_model.bin").exists());
        load_dir(&dir, "root", &Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            import_base(data.path(), &base()).unwrap(),
            (id.clone(), dir)
        );
        assert_eq!(entries(data.path()), vec![id]);
    }

    #[test]
    fn a_base_without_tokenizer_is_refused_and_leaves_nothing() {
        let data = tempfile::tempdir().unwrap();
        let bad = tempfile::tempdir().unwrap();
        std::fs::copy(base().join("config.json"), bad.path().join("config.json")).unwrap();
        let err = write_version(data.path(), bad.path(), &base_tensors()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        assert!(!versions_dir(data.path()).exists() || entries(data.path()).is_empty());
    }

    #[test]
    fn content_hash_changes_with_the_weights_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        std::fs::write(d.path().join("model.safetensors"), [1u8, 2, 3]).unwrap();
        std::fs::write(d.path().join("README.md"), "a").unwrap();
        let a = content_hash(d.path()).unwrap();
        assert_eq!(a.len(), 16);
        std::fs::write(d.path().join("README.md"), "b").unwrap();
        assert_eq!(content_hash(d.path()).unwrap(), a);
        std::fs::write(d.path().join("model.safetensors"), [1u8, 2, 4]).unwrap();
        assert_ne!(content_hash(d.path()).unwrap(), a);
    }

    #[test]
    fn a_moved_data_dir_still_resolves_and_another_base_model_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let first = tmp.path().join("first");
        let noise = base();
        let dir = resolve_current(&first, &noise).unwrap();
        assert!(dir.starts_with(&first) && dir.join("config.json").is_file());
        // A restore to another path (the store recorded the old one).
        let moved = tmp.path().join("restored");
        std::fs::rename(&first, &moved).unwrap();
        let dir = resolve_current(&moved, &noise).unwrap();
        assert!(dir.starts_with(&moved) && dir.join("config.json").is_file());
        // The same data dir with a different base model.
        let err = resolve_current(
            &moved,
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinymem-backdoor"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("belongs to base model"), "{err}");
    }
}
