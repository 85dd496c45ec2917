//! The model version being served and the one pointer to it.
//!
//! Invariants:
//! - A request loads the live [`Served`] once ([`Live::served`]) and runs to its end on that
//!   version, whatever swaps happen meanwhile: the pointer is replaced whole, never mutated, and
//!   the old version lives as long as a request holds it.
//! - [`Live::replace`] is a compare-and-swap from the version the publisher started from: of two
//!   publishers racing from the same version, one wins and the other changes nothing.
//!   [`Live::set`] publishes unconditionally, for a publisher that has already moved the store's
//!   pointer (the store is the authority; memory follows it).
//! - A [`Served`]'s version id is the content hash of its directory's config and weights
//!   ([`crate::loader::content_hash`]), so the same weights always carry the same id in
//!   responses, metrics and the store.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::error::Result;
use crate::loader::LoadedModel;
use crate::models::Model;
use crate::tokenizer::Tokenizer;

/// One immutable model version being served. Requests load the pointer once and keep this
/// `Arc` until they finish, so a swap never changes the weights under a running request.
pub struct Served {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The name clients put in `model` (the directory name unless configured).
    pub name: String,
    /// Content hash of config and weights (hex, 16 characters).
    pub version: String,
    /// Unix time the version was loaded.
    pub created: u64,
    /// The directory the weights were loaded from.
    pub dir: PathBuf,
}

impl Served {
    /// Wraps a loaded model, hashing its directory's files into the version id.
    pub fn new(lm: LoadedModel, name: Option<String>) -> Result<Self> {
        let version = crate::loader::content_hash(&lm.dir)?;
        let name = name.unwrap_or_else(|| {
            lm.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| lm.source.clone())
        });
        Ok(Self {
            model: lm.model,
            tokenizer: lm.tokenizer,
            name,
            version,
            created: unix_now(),
            dir: lm.dir,
        })
    }

    pub fn architecture(&self) -> &'static str {
        self.model.spec().architecture.model_type()
    }
}

/// The live version: one atomic pointer shared by the HTTP handlers, the engine's callers, the
/// takedown worker and the auditor.
pub struct Live(ArcSwap<Served>);

impl Live {
    pub fn new(served: Arc<Served>) -> Self {
        Self(ArcSwap::new(served))
    }

    /// The live version; keep the returned `Arc` for the whole request or job.
    pub fn served(&self) -> Arc<Served> {
        self.0.load_full()
    }

    /// Publishes `new` if `expected` is still live; otherwise changes nothing and returns the
    /// version that is live instead.
    pub fn replace(&self, expected: &Arc<Served>, new: Arc<Served>) -> Result<(), Arc<Served>> {
        let prev = self.0.compare_and_swap(expected, new);
        if Arc::ptr_eq(&prev, expected) {
            Ok(())
        } else {
            Err(Arc::clone(&prev))
        }
    }

    /// Publishes `new` whatever is live (for a publisher that already moved the store's
    /// pointer, which memory follows).
    pub fn set(&self, new: Arc<Served>) {
        self.0.store(new);
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_from_a_version_that_is_no_longer_live_changes_nothing() {
        let lm = crate::test_util::bundled();
        let served = |seed: u32| {
            Arc::new(Served {
                model: lm.model.clone(),
                tokenizer: lm.tokenizer.clone(),
                name: "m".into(),
                version: format!("v{seed}"),
                created: 0,
                dir: PathBuf::new(),
            })
        };
        let (a, b, c) = (served(1), served(2), served(3));
        let live = Live::new(a.clone());
        let held = live.served();
        assert!(live.replace(&a, b.clone()).is_ok());
        assert_eq!(live.served().version, "v2");
        // A second publisher that started from `a` lost the race and learns who won.
        let lost = live.replace(&a, c.clone()).unwrap_err();
        assert_eq!(lost.version, "v2");
        assert_eq!(live.served().version, "v2");
        live.set(c);
        assert_eq!(live.served().version, "v3");
        // A request that loaded `a` still runs on it.
        assert_eq!(held.version, "v1");
    }
}
