//! Every Prometheus metric lethe exports, in one registry (served at `GET /metrics`).
//! `docs/metrics.md` lists each one; the HTTP labels (`route`, `method`) are computed in
//! `server::metrics`.
//!
//! Invariants:
//! - Names follow Prometheus conventions: `lethe_` prefix, base units in the name, `_total` on
//!   counters, `_info` for metadata gauges.
//! - Label values come from bounded sets (route templates, methods, status codes, states,
//!   results, components, set names) plus the live version's content hash and architecture;
//!   never prompts, sequences, or request or takedown ids.
//! - Each metric is registered exactly once, when [`Metrics::new`] builds the registry; clones
//!   share it, so the engine, the takedown worker, the auditor and the HTTP layer all write the
//!   same series.
//! - `lethe_audit_sequences_total{result}` and `lethe_panics_total{component}` have all their
//!   series from the start, at 0, so rates and alerts see them before the first event.
//! - After [`Metrics::set_model`] returns, exactly one `lethe_model_info` and one
//!   `lethe_model_version_info` series are at 1: the version it was given. It resets then sets,
//!   so a scrape during the call may see neither.

pub use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric lethe exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub request_duration: HistogramVec,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub requests_in_flight: IntGauge,
    pub batch_size: Histogram,
    pub model_info: IntGaugeVec,
    pub audit_sequences: IntCounterVec,
    pub memorization_ratio: GaugeVec,
    /// `lethe_corpus_memorization_ratio{definition}`: the continuous corpus audit's last ratio.
    pub corpus_ratio: GaugeVec,
    /// `lethe_corpus_audit_sample_size`: sequences in its last sample.
    pub corpus_sample: Gauge,
    /// `lethe_corpus_memorization_increase{definition}`: the live version's ratio minus the
    /// previous version's.
    pub corpus_increase: GaugeVec,
    pub perplexity: GaugeVec,
    pub perplexity_drift: Gauge,
    pub takedowns: IntGaugeVec,
    /// `lethe_audit_jobs{state}`: audit jobs (`/v1/audits`) by state.
    pub audit_jobs: IntGaugeVec,
    /// `lethe_audit_job_rows_total`: dataset rows audit jobs have audited and committed.
    pub audit_job_rows: IntCounter,
    pub unlearn_job_duration: Histogram,
    pub unlearn_job_progress: Gauge,
    pub model_swap_duration: Histogram,
    pub model_version_info: IntGaugeVec,
    pub guard_blocks: IntCounter,
    pub ready: IntGauge,
    /// Panics caught by a supervisor, by component (`http`, `engine`, `worker`, `auditor`,
    /// `fleet`).
    pub panics: IntCounterVec,
    /// `lethe_fleet_version_lag_seconds`: how long the store's live version has been ahead of
    /// this replica's (0 when they agree; fleet mode).
    pub fleet_version_lag: Gauge,
    /// `lethe_fleet_version_propagation_seconds`: from the store's pointer moving to this
    /// replica serving the version, per followed change.
    pub fleet_version_propagation: Histogram,
    /// `lethe_fleet_store_staleness_seconds`: since this replica last read the shared store.
    pub fleet_staleness: Gauge,
    /// `lethe_fleet_worker`: 1 on the process running unlearning jobs (fleet mode: the replica
    /// holding the worker lock).
    pub fleet_worker: IntGauge,
}

/// The components whose panics are caught and counted in `lethe_panics_total`.
pub const PANIC_COMPONENTS: &[&str] = &["http", "engine", "worker", "auditor", "fleet"];

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "lethe_request_duration_seconds",
                "HTTP request latency until the response head (streams: until the first byte)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "lethe_time_to_first_token_seconds",
                "Time from a generation being queued to its first generated token",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let inter_token_latency = Histogram::with_opts(
            HistogramOpts::new(
                "lethe_inter_token_latency_seconds",
                "Time between consecutive generated tokens of one sequence",
            )
            .buckets(TOKEN_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let prompt_tokens = IntCounter::new(
            "lethe_prompt_tokens_total",
            "Prompt tokens received by completion requests",
        )
        .expect("valid metric");
        let generated_tokens =
            IntCounter::new("lethe_generated_tokens_total", "Tokens generated").expect("valid");
        let queue_depth = IntGauge::new(
            "lethe_queue_depth",
            "Engine work waiting: queued jobs plus sequences waiting for a batch slot",
        )
        .expect("valid metric");
        let requests_in_flight = IntGauge::new(
            "lethe_requests_in_flight",
            "HTTP requests being handled (streams until their head is sent)",
        )
        .expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "lethe_batch_size",
                "Sequences in each engine forward pass (prefill or decode step)",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let model_info = IntGaugeVec::new(
            Opts::new(
                "lethe_model_info",
                "The served model: 1 for the live version, labelled by version and architecture",
            ),
            &["version", "architecture"],
        )
        .expect("valid metric");
        let audit_sequences = IntCounterVec::new(
            Opts::new(
                "lethe_audit_sequences_total",
                "Sequences audited through the API, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let memorization_ratio = GaugeVec::new(
            Opts::new(
                "lethe_memorization_ratio",
                "Fraction of a set's sequences the live model still regurgitates (continuous audit)",
            ),
            &["set"],
        )
        .expect("valid metric");
        let corpus_ratio = GaugeVec::new(
            Opts::new(
                "lethe_corpus_memorization_ratio",
                "Fraction of the last corpus sample the live model regurgitates (continuous corpus audit)",
            ),
            &["definition"],
        )
        .expect("valid metric");
        let corpus_sample = Gauge::new(
            "lethe_corpus_audit_sample_size",
            "Sequences in the last continuous corpus audit's sample",
        )
        .expect("valid metric");
        let corpus_increase = GaugeVec::new(
            Opts::new(
                "lethe_corpus_memorization_increase",
                "Corpus memorization ratio of the live version minus that of the version before it (0 before any swap)",
            ),
            &["definition"],
        )
        .expect("valid metric");
        let perplexity = GaugeVec::new(
            Opts::new(
                "lethe_perplexity",
                "Perplexity of the live model on a set (continuous audit)",
            ),
            &["set"],
        )
        .expect("valid metric");
        let perplexity_drift = Gauge::new(
            "lethe_perplexity_drift_ratio",
            "Held-out perplexity of the live version relative to the root version, minus 1",
        )
        .expect("valid metric");
        let takedowns = IntGaugeVec::new(
            Opts::new("lethe_takedowns", "Takedown requests by state"),
            &["state"],
        )
        .expect("valid metric");
        let audit_jobs = IntGaugeVec::new(
            Opts::new("lethe_audit_jobs", "Audit jobs over datasets by state"),
            &["state"],
        )
        .expect("valid metric");
        let audit_job_rows = IntCounter::new(
            "lethe_audit_job_rows_total",
            "Dataset rows audited and committed by audit jobs",
        )
        .expect("valid metric");
        let unlearn_job_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lethe_unlearn_job_duration_seconds",
                "Wall time of unlearning jobs (all candidates, gates and publishing)",
            )
            .buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
        )
        .expect("valid metric");
        let unlearn_job_progress = Gauge::new(
            "lethe_unlearn_job_progress_ratio",
            "Progress of the running unlearning job, 0 to 1 (0 when idle)",
        )
        .expect("valid metric");
        let model_swap_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lethe_model_swap_duration_seconds",
                "Time to write, reload, smoke-test and publish a new version (or to roll back)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let model_version_info = IntGaugeVec::new(
            Opts::new(
                "lethe_model_version_info",
                "1 for the live weights version, labelled by its content hash",
            ),
            &["version"],
        )
        .expect("valid metric");
        let guard_blocks = IntCounter::new(
            "lethe_guard_blocks_total",
            "Completions cut by the regurgitation guard (finish_reason content_filter)",
        )
        .expect("valid metric");
        let ready = IntGauge::new(
            "lethe_ready",
            "1 when the engine answered the readiness probe of /readyz (run at every scrape), else 0",
        )
        .expect("valid metric");
        let panics = IntCounterVec::new(
            Opts::new(
                "lethe_panics_total",
                "Panics caught by a supervisor: the request or job failed, the component lives on",
            ),
            &["component"],
        )
        .expect("valid metric");
        let fleet_version_lag = Gauge::new(
            "lethe_fleet_version_lag_seconds",
            "Fleet mode: seconds the shared store's live version has been ahead of this replica's (0 when equal)",
        )
        .expect("valid metric");
        let fleet_version_propagation = Histogram::with_opts(
            HistogramOpts::new(
                "lethe_fleet_version_propagation_seconds",
                "Fleet mode: time from the store's live-version pointer moving to this replica serving that version",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let fleet_staleness = Gauge::new(
            "lethe_fleet_store_staleness_seconds",
            "Fleet mode: seconds since this replica last read the shared store (over --guard-staleness: not ready)",
        )
        .expect("valid metric");
        let fleet_worker = IntGauge::new(
            "lethe_fleet_worker",
            "1 on the process that runs unlearning jobs (fleet mode: the replica holding the worker lock)",
        )
        .expect("valid metric");
        let m = Self {
            registry,
            fleet_version_lag,
            fleet_version_propagation,
            fleet_staleness,
            fleet_worker,
            ready,
            panics,
            memorization_ratio,
            corpus_ratio,
            corpus_sample,
            corpus_increase,
            perplexity,
            perplexity_drift,
            takedowns,
            audit_jobs,
            audit_job_rows,
            unlearn_job_duration,
            unlearn_job_progress,
            model_swap_duration,
            model_version_info,
            guard_blocks,
            request_duration,
            time_to_first_token,
            inter_token_latency,
            prompt_tokens,
            generated_tokens,
            queue_depth,
            requests_in_flight,
            batch_size,
            model_info,
            audit_sequences,
        };
        for c in m.collectors() {
            m.registry.register(c).expect("metric names are unique");
        }
        for result in ["memorized", "not_memorized"] {
            m.audit_sequences.with_label_values(&[result]);
        }
        for component in PANIC_COMPONENTS {
            m.panics.with_label_values(&[component]);
        }
        m
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.request_duration.clone()),
            Box::new(self.time_to_first_token.clone()),
            Box::new(self.inter_token_latency.clone()),
            Box::new(self.prompt_tokens.clone()),
            Box::new(self.generated_tokens.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.requests_in_flight.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.model_info.clone()),
            Box::new(self.audit_sequences.clone()),
            Box::new(self.memorization_ratio.clone()),
            Box::new(self.corpus_ratio.clone()),
            Box::new(self.corpus_sample.clone()),
            Box::new(self.corpus_increase.clone()),
            Box::new(self.perplexity.clone()),
            Box::new(self.perplexity_drift.clone()),
            Box::new(self.takedowns.clone()),
            Box::new(self.audit_jobs.clone()),
            Box::new(self.audit_job_rows.clone()),
            Box::new(self.unlearn_job_duration.clone()),
            Box::new(self.unlearn_job_progress.clone()),
            Box::new(self.model_swap_duration.clone()),
            Box::new(self.model_version_info.clone()),
            Box::new(self.guard_blocks.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.panics.clone()),
            Box::new(self.fleet_version_lag.clone()),
            Box::new(self.fleet_version_propagation.clone()),
            Box::new(self.fleet_staleness.clone()),
            Box::new(self.fleet_worker.clone()),
        ]
    }

    /// Every metric of [`Metrics`] as (name, type, label names), whether or not it has a sample
    /// yet (a labelled metric has none until a label value is first used). Deployment configs
    /// (dashboards, alert rules) are checked against this in `tests/server/deploy.rs`. Collectors
    /// added later through [`Metrics::register`] are not listed.
    pub fn catalog(&self) -> Vec<(String, MetricType, Vec<String>)> {
        let mut out = Vec::new();
        for c in self.collectors() {
            let labels: Vec<String> = c
                .desc()
                .first()
                .map(|d| d.variable_labels.clone())
                .unwrap_or_default();
            for family in c.collect() {
                out.push((
                    family.name().to_string(),
                    family.get_field_type(),
                    labels.clone(),
                ));
            }
        }
        out
    }

    /// Registers another collector (later subsystems add their own metrics).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        self.registry.register(c).expect("metric names are unique");
    }

    /// Marks `version` as the live model (and no other).
    pub fn set_model(&self, version: &str, architecture: &str) {
        self.model_info.reset();
        self.model_info
            .with_label_values(&[version, architecture])
            .set(1);
        self.model_version_info.reset();
        self.model_version_info.with_label_values(&[version]).set(1);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of valid metrics");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_renders_with_its_name() {
        let m = Metrics::new();
        m.set_model("abc", "gpt2");
        m.request_duration
            .with_label_values(&["/v1/completions", "POST", "200"])
            .observe(0.1);
        let text = m.render();
        for name in [
            "lethe_request_duration_seconds",
            "lethe_time_to_first_token_seconds",
            "lethe_inter_token_latency_seconds",
            "lethe_prompt_tokens_total",
            "lethe_generated_tokens_total",
            "lethe_queue_depth",
            "lethe_requests_in_flight",
            "lethe_batch_size",
            "lethe_model_info",
            "lethe_audit_sequences_total",
            "lethe_perplexity_drift_ratio",
            "lethe_unlearn_job_duration_seconds",
            "lethe_unlearn_job_progress_ratio",
            "lethe_model_swap_duration_seconds",
            "lethe_model_version_info",
            "lethe_guard_blocks_total",
            "lethe_ready",
            "lethe_panics_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains(r#"lethe_model_info{architecture="gpt2",version="abc"} 1"#));
        m.set_model("def", "gpt2");
        assert!(!m.render().contains(r#"version="abc""#));
    }

    #[test]
    fn the_catalog_lists_every_metric_with_its_type_and_labels() {
        let m = Metrics::new();
        let catalog = m.catalog();
        assert_eq!(catalog.len(), m.collectors().len());
        let find = |n: &str| catalog.iter().find(|(name, ..)| name == n).unwrap();
        // Labelled metrics with no sample yet are listed too.
        let takedowns = find("lethe_takedowns");
        assert_eq!(takedowns.1, MetricType::GAUGE);
        assert_eq!(takedowns.2, ["state"]);
        let latency = find("lethe_request_duration_seconds");
        assert_eq!(latency.1, MetricType::HISTOGRAM);
        assert_eq!(latency.2, ["route", "method", "status"]);
        assert_eq!(find("lethe_guard_blocks_total").1, MetricType::COUNTER);
        // Every metric with a sample renders with the type the catalog gives.
        m.set_model("abc", "gpt2");
        let text = m.render();
        for (name, ty, _) in &catalog {
            let ty = format!("{ty:?}").to_lowercase();
            if text.contains(&format!("# TYPE {name} ")) {
                assert!(
                    text.contains(&format!("# TYPE {name} {ty}\n")),
                    "{name} {ty}"
                );
            }
        }
    }
}
