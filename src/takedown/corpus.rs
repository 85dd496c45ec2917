//! Continuous auditing of a corpus (`lethe serve --audit-corpus FILE --audit-sample N`): every
//! auditor pass audits a fresh random sample of the corpus against the live version, and every
//! new version is audited as soon as it goes live (the auditor runs after each swap).
//!
//! Invariants:
//! - The corpus is read and parsed once, at start-up, under the served model's default
//!   definition; a bad line refuses the start with an error naming the file and line, and a
//!   corpus with no row long enough for the definition is refused.
//! - Each pass sets `lethe_corpus_memorization_ratio{definition}` (memorized / sampled, by the
//!   single-pass audit) and `lethe_corpus_audit_sample_size`; when the live version differs from
//!   the one audited before, `lethe_corpus_memorization_increase{definition}` becomes this
//!   version's ratio minus the previous version's last one (0 before any swap), which the
//!   `LetheCorpusMemorizationRose` alert watches.
//! - Samples are drawn without replacement, fresh every pass; the whole corpus when it has at
//!   most `sample` rows.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::audit::{self, AuditItem, Definition};
use crate::engine::served::Served;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::tokenizer::Tokenizer;

/// Where the corpus is and how much of it each pass audits.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusConfig {
    pub path: PathBuf,
    pub sample: usize,
}

/// The parsed corpus and what the last passes measured.
pub struct CorpusAudit {
    items: Vec<AuditItem>,
    definition: Definition,
    sample: usize,
    last: Mutex<Seen>,
}

/// What the corpus passes saw: the version audited last with its ratio, and the last ratio of
/// the version before it.
#[derive(Default)]
struct Seen {
    current: Option<(String, f64)>,
    previous: Option<f64>,
}

impl CorpusAudit {
    /// Reads the JSONL corpus at `path` (the rows `lethe audit` takes) under `definition`.
    pub fn load(
        path: &Path,
        sample: usize,
        tokenizer: &Tokenizer,
        definition: Definition,
    ) -> Result<Self> {
        if sample == 0 {
            return Err(Error::invalid("audit_sample", "must be at least 1"));
        }
        let rows = audit::cli::read_rows(path, definition, tokenizer)
            .map_err(|e| Error::invalid("audit_corpus", format!("{e:#}")))?;
        if rows.is_empty() {
            return Err(Error::invalid(
                "audit_corpus",
                format!("{} has no row to audit", path.display()),
            ));
        }
        Ok(Self {
            items: rows.into_iter().map(|p| p.item).collect(),
            definition,
            sample,
            last: Mutex::new(Seen::default()),
        })
    }

    /// Rows in the corpus.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the corpus is empty (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Audits a fresh sample against `live` and sets the gauges; returns the ratio.
    pub fn audit(&self, live: &Served, metrics: &Metrics) -> Result<f64> {
        let n = self.sample.min(self.items.len());
        let picked = rand::seq::index::sample(&mut rand::rng(), self.items.len(), n);
        let items: Vec<AuditItem> = picked.iter().map(|i| self.items[i].clone()).collect();
        let (_, summary) = audit::audit(&live.model, None, &items, 64)?;
        let def = self.definition.to_string();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((v, r)) = &last.current {
            if *v != live.version {
                last.previous = Some(*r);
            }
        }
        last.current = Some((live.version.clone(), summary.rate));
        let previous = last.previous;
        metrics
            .corpus_ratio
            .with_label_values(&[&def])
            .set(summary.rate);
        metrics.corpus_sample.set(n as f64);
        metrics
            .corpus_increase
            .with_label_values(&[&def])
            .set(previous.map_or(0.0, |p| summary.rate - p));
        Ok(summary.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_sample_the_corpus_and_report_the_rise_after_a_version_change() {
        let lm = crate::test_util::bundled();
        let ds = crate::tinymem::train::Card::read(&lm.dir)
            .unwrap()
            .dataset()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.jsonl");
        // The eligible noise rows (24 of 59 memorized), as `lethe audit` reads them.
        let lines: Vec<String> = ds
            .eligible_noised_rows(50, 100)
            .iter()
            .map(|r| serde_json::json!({"ids": r.ids, "clean_ids": r.clean_ids}).to_string())
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let c = CorpusAudit::load(&path, 1000, &lm.tokenizer, Definition::Tinymem).unwrap();
        assert_eq!(c.len(), 59);
        let metrics = Metrics::new();
        let served = |version: &str, model: crate::models::Model| Served {
            model,
            tokenizer: lm.tokenizer.clone(),
            name: "tinymem".into(),
            version: version.into(),
            created: 0,
            dir: lm.dir.clone(),
        };
        let r = c.audit(&served("v0", lm.model.clone()), &metrics).unwrap();
        assert!((r - 24.0 / 59.0).abs() < 1e-12, "{r}");
        assert_eq!(metrics.corpus_sample.get(), 59.0);
        assert_eq!(
            metrics
                .corpus_increase
                .with_label_values(&["tinymem"])
                .get(),
            0.0
        );
        // Another "version" that regurgitates more: random weights of the same shape do not, so
        // the increase is negative; what matters is that it compares with the version before.
        let random =
            crate::models::Model::random(&lm.model.config(), &candle_core::Device::Cpu).unwrap();
        let r1 = c.audit(&served("v1", random), &metrics).unwrap();
        let inc = metrics
            .corpus_increase
            .with_label_values(&["tinymem"])
            .get();
        assert!((inc - (r1 - r)).abs() < 1e-12 && inc < 0.0, "{inc}");
        // A sample smaller than the corpus.
        let small = CorpusAudit::load(&path, 10, &lm.tokenizer, Definition::Tinymem).unwrap();
        small
            .audit(&served("v0", lm.model.clone()), &metrics)
            .unwrap();
        assert_eq!(metrics.corpus_sample.get(), 10.0);
        // Bad input refuses by name.
        std::fs::write(&path, "{\"ids\": [1, 2]}\n").unwrap();
        let e = CorpusAudit::load(&path, 10, &lm.tokenizer, Definition::Tinymem)
            .err()
            .unwrap();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(CorpusAudit::load(&path, 0, &lm.tokenizer, Definition::Tinymem).is_err());
    }
}
