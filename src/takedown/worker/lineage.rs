//! A job's lineage: the weights it starts from and what the versions before it applied.
//!
//! Invariants:
//! - A job works on f32 weights: the live version's own when it is served in f32, else its
//!   f32 copy read again from disk ([`job_parent`]); a lineage's root is always read in f32.
//! - The root is held once per lineage (cached in [`Takedowns`]), sharing every tensor but the
//!   MLP matrices with the served model when they are equal bit for bit and of one dtype.

use std::sync::Arc;

use candle_core::DType;

use super::{store_err, Takedowns};
use crate::engine::served::Served;
use crate::error::Result;
use crate::takedown::{versions, VersionRecord};
use crate::unlearn::pipeline::{self, Baseline};

/// The f32 model a job on `base` starts from (and measures its "before" on).
pub(super) fn job_parent(td: &Takedowns, base: &Served) -> Result<crate::models::Model> {
    Ok(match base.model.weight_dtype() {
        DType::F32 => base.model.clone(),
        _ => load_version(td, &base.version, base.model.device(), DType::F32)?.model,
    })
}

/// The lineage behind the live version `live`: the root's weights (`None` while the root is
/// live) and the sequences that the versions between them applied.
pub(super) fn lineage_of(
    td: &Takedowns,
    live: &Served,
) -> Result<(Option<Arc<crate::models::Model>>, Vec<pipeline::Target>)> {
    let all = td.store.list_versions().map_err(|e| store_err(&e))?;
    // A version or parent missing from the registry: mask the live weights, as without a
    // lineage.
    let Some(chain) = ancestry(&all, &live.version) else {
        return Ok((None, Vec::new()));
    };
    let Some((root, edits)) = chain.split_last().filter(|(_, edits)| !edits.is_empty()) else {
        return Ok((None, Vec::new()));
    };
    let mut applied = Vec::new();
    for v in edits {
        for id in &v.takedowns {
            applied.push(td.store.get(id).map_err(|e| store_err(&e))?);
        }
    }
    let earlier = crate::takedown::targets(&applied)?;
    let mut cached = td.root_model.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((id, m)) = cached.as_ref() {
        if *id == root.id {
            return Ok((Some(m.clone()), earlier));
        }
    }
    // Versions differ only in their MLP matrices: hold the root as the served tensors plus its
    // own MLP, not as a second copy of every weight.
    let full = load_version(td, &root.id, live.model.device(), DType::F32)?.model;
    let m = Arc::new(live.model.sharing_all_but_mlp(&full)?.unwrap_or(full));
    *cached = Some((root.id.clone(), m.clone()));
    Ok((Some(m), earlier))
}

/// The versions from `live` up to its lineage's root (both included, `live` first); `None`
/// when `live` or one of its ancestors is not in `all`.
pub(super) fn ancestry<'a>(all: &'a [VersionRecord], live: &str) -> Option<Vec<&'a VersionRecord>> {
    let mut chain = vec![all.iter().find(|v| v.id == live)?];
    while let Some(parent) = chain[chain.len() - 1].parent.as_deref() {
        chain.push(all.iter().find(|v| v.id == parent)?);
    }
    Some(chain)
}

/// The directory of the registered version `id` under the data directory (fetched there first
/// from the shared version store in a fleet).
pub(super) fn version_dir_of(td: &Takedowns, id: &str) -> Result<std::path::PathBuf> {
    Ok(match &td.fleet {
        // In a fleet, a version this replica never saw comes from the shared version store.
        Some(f) => f
            .versions
            .fetch(&td.config.data_dir, id)
            .map_err(|e| store_err(&e))?,
        None => versions::version_dir(&td.config.data_dir, id),
    })
}

/// The registered version `id`, loaded from its directory ([`version_dir_of`]).
fn load_version(
    td: &Takedowns,
    id: &str,
    device: &candle_core::Device,
    dtype: DType,
) -> Result<crate::loader::LoadedModel> {
    let dir = version_dir_of(td, id)?;
    crate::loader::load_dir(&dir, &dir.display().to_string(), device, dtype)
}

/// The lineage's root quality, from the live version's report (`None` while the root is live:
/// the pipeline then takes the parent's own numbers).
pub(super) fn root_baseline(td: &Takedowns, live: &str) -> Option<Baseline> {
    let v = td.store.get_version(live).ok()?;
    Baseline::from_report(&v.metrics)
}
