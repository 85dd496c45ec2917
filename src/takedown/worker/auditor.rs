//! The auditor: re-audits the applied takedowns (and the canaries, and a sample of the audit
//! corpus) on the live version after every swap and every `--audit-interval-seconds`, and sets
//! the model-health gauges. It only reads the store.

use std::time::{Duration, Instant};

use super::lineage::ancestry;
use super::{store_err, Takedowns};
use crate::audit::{self, AuditItem};
use crate::engine::served::Served;
use crate::error::Result;
use crate::supervise;
use crate::takedown::State;
use crate::unlearn::pipeline;

pub(super) fn auditor_loop(td: &Takedowns) {
    let mut seen = 0;
    let mut last_version = String::new();
    let mut last_run: Option<Instant> = None;
    while !td.stopping() {
        let live = td.live.served();
        let due = last_run.is_none_or(|t| t.elapsed() >= td.config.audit_interval);
        if due || live.version != last_version {
            match supervise::catch("auditor", || audit_once(td, &live)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "continuous audit failed"),
                Err(_) => td.metrics.panics.with_label_values(&["auditor"]).inc(),
            }
            last_version = live.version.clone();
            last_run = Some(Instant::now());
        }
        td.wait(
            &mut seen,
            Duration::from_secs(1).min(td.config.audit_interval),
        );
    }
}

/// Re-audits every applied takedown (and the canaries, and a sample of the audit corpus) on the
/// live version; sets the gauges.
fn audit_once(td: &Takedowns, live: &Served) -> Result<()> {
    if let Some(c) = &td.corpus {
        let ratio = c.audit(live, &td.metrics)?;
        tracing::debug!(ratio, version = %live.version, "corpus audited");
    }
    let applied = td
        .store
        .list(None, usize::MAX, Some(State::Applied))
        .map_err(|e| store_err(&e))?;
    let t = crate::takedown::targets(&applied)?;
    let m = &td.metrics;
    if !t.is_empty() {
        let items: Vec<AuditItem> = t.iter().map(|x| x.item.clone()).collect();
        let (_, summary) = audit::audit(&live.model, None, &items, 64)?;
        m.memorization_ratio
            .with_label_values(&["takedowns"])
            .set(summary.rate);
    } else {
        m.memorization_ratio
            .with_label_values(&["takedowns"])
            .set(0.0);
    }
    if !td.data.heldout.is_empty() || td.data.tinymem.is_some() {
        let b = match td.cached_quality(&live.version) {
            Some(b) => b,
            None => {
                let b = pipeline::measure(&live.model, &td.data)?;
                td.cache_quality(&live.version, b.clone());
                b
            }
        };
        m.perplexity
            .with_label_values(&["heldout"])
            .set(b.quality.perplexity);
        if let Some(root_ppl) = root_perplexity(td, &live.version) {
            m.perplexity_drift
                .set(b.quality.perplexity / root_ppl - 1.0);
        }
        if let Some(c) = b.canary_perplexity {
            m.perplexity.with_label_values(&["canary"]).set(c);
        }
    }
    Ok(())
}

/// Held-out perplexity of the root version: recorded as `before.perplexity` in the report of
/// the first version promoted on the live version's lineage. `None` while the root is live
/// and nothing was measured yet (the drift gauge then stays at 0).
fn root_perplexity(td: &Takedowns, live: &str) -> Option<f64> {
    let all = td.store.list_versions().ok()?;
    let chain = ancestry(&all, live)?;
    // The edits, root excluded, nearest the root last.
    let (_, edits) = chain.split_last()?;
    edits
        .iter()
        .rev()
        .find_map(|v| v.metrics["before"]["perplexity"].as_f64())
}
