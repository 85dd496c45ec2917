//! `lethe serve` flags, validated once into a typed [`Config`].
//!
//! Invariants:
//! - Every flag is also a `LETHE_…` environment variable; a flag given on the command line wins.
//! - [`Config::from_args`] runs before the model is loaded or a port is bound, and refuses a bad
//!   configuration with an error naming the flag (or the controller setting it feeds): a count
//!   or size of 0; a header-read, body-read or disconnect timeout outside 1 s to one day, or a
//!   keep-alive over one day (0 turns keep-alive off); a `--bind` that resolves to no address;
//!   an empty key, or equal API and admin keys; a negative or non-finite budget; a `--data-dir`
//!   that cannot be created or written.
//! - Keys never show: `--help` hides their environment values and [`Secret`] redacts them, so
//!   the [`Config`] logged at start-up holds none.
//! - Admin routes work without an admin key only when every address `--bind` resolves to is
//!   loopback ([`Auth::loopback_only`]).
//! - `--audit-interval-seconds 0` is taken as 1.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use super::auth::{Auth, Secret};
use super::state::Limits;
use crate::audit::jobs::JobsConfig;
use crate::engine::batcher::EngineConfig;
use crate::loader::{ModelArgs, WeightDtype};
use crate::takedown::fleet::FleetConfig;
use crate::takedown::worker::TakedownConfig;
use crate::unlearn::cli::{MethodArg, MethodFlags};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Precision the served weights are held in: f32, bf16, f16, or auto (what the checkpoint
    /// stores). Matrices are held in it and widened as they are read; compute, takedowns and
    /// their gates stay f32, and a new version must also pass its forget check in this dtype.
    #[arg(long, env = "LETHE_DTYPE", value_enum, default_value_t = WeightDtype::F32)]
    pub dtype: WeightDtype,
    /// Address to listen on (host:port).
    #[arg(long, env = "LETHE_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// Directory for lethe's durable state (takedowns, model versions).
    #[arg(long, env = "LETHE_DATA_DIR", default_value = "lethe-data")]
    pub data_dir: PathBuf,
    /// Name clients use in `model` (default: the model directory's name).
    #[arg(long, env = "LETHE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Key required on inference routes as `Authorization: Bearer <key>` (default: open).
    #[arg(long, env = "LETHE_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// Key required on admin routes (audit, takedowns, rollback). Without it, admin routes
    /// answer 403 unless the server is bound to loopback only.
    #[arg(long, env = "LETHE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<Secret>,
    /// Most sequences decoded together in one batch.
    #[arg(long, env = "LETHE_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Engine jobs that may wait before requests are refused with 429.
    #[arg(long, env = "LETHE_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "LETHE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most sequences in one audit request.
    #[arg(long, env = "LETHE_MAX_AUDIT_SEQUENCES", default_value_t = 256)]
    pub max_audit_sequences: usize,
    /// HTTP worker threads (they only parse and route; model compute runs on the engine).
    #[arg(long, env = "LETHE_HTTP_WORKERS", default_value_t = 2)]
    pub http_workers: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, env = "LETHE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Seconds a new connection has to send its request head (line and headers); after that
    /// it is answered 408 and closed.
    #[arg(long, env = "LETHE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 5)]
    pub header_read_timeout_seconds: u64,
    /// Seconds a request has to deliver its whole body once its handler reads it; after that
    /// it is answered 408 and the connection closed.
    #[arg(long, env = "LETHE_BODY_READ_TIMEOUT_SECONDS", default_value_t = 30)]
    pub body_read_timeout_seconds: u64,
    /// Seconds an idle keep-alive connection stays open between requests (0: close after each
    /// response).
    #[arg(long, env = "LETHE_KEEP_ALIVE_SECONDS", default_value_t = 5)]
    pub keep_alive_seconds: u64,
    /// Seconds a connection may take to shut down after its last response before it is
    /// dropped.
    #[arg(long, env = "LETHE_DISCONNECT_TIMEOUT_SECONDS", default_value_t = 1)]
    pub disconnect_timeout_seconds: u64,
    /// Directory whose JSONL files `POST /v1/audits` may audit by name (`{"file": …}`);
    /// without it, audit jobs take uploaded bodies only.
    #[arg(long, env = "LETHE_AUDIT_DIR")]
    pub audit_dir: Option<PathBuf>,
    /// Threads of the audit jobs' own pool (jobs never run on the engine thread).
    #[arg(long, env = "LETHE_AUDIT_THREADS", default_value_t = 1)]
    pub audit_threads: usize,
    /// Largest JSONL dataset uploaded to `POST /v1/audits`, in bytes.
    #[arg(long, env = "LETHE_MAX_AUDIT_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_audit_upload_bytes: u64,
    #[command(flatten)]
    pub takedown: TakedownArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// Fleet mode: several replicas sharing one PostgreSQL store and one version store.
#[derive(Debug, Args, Clone)]
pub struct FleetArgs {
    /// Fleet mode: the shared takedown store, `postgres://user:password@host:port/db`, instead
    /// of the SQLite file in --data-dir. Needs --versions-url.
    #[arg(long, env = "LETHE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Fleet mode: the shared version store, `file:///shared/dir` (a volume every replica
    /// mounts), `s3://bucket/prefix` (any S3-compatible service; settings and credentials from
    /// AWS_… variables) or `gs://bucket/prefix` (GOOGLE_… variables); --data-dir stays this
    /// replica's local cache of it.
    #[arg(long, env = "LETHE_VERSIONS_URL")]
    pub versions_url: Option<String>,
    /// Fleet mode: seconds without reading the shared store after which this replica reports
    /// not-ready (it might miss a takedown accepted by another replica).
    #[arg(long, env = "LETHE_GUARD_STALENESS", default_value_t = 5.0)]
    pub guard_staleness: f64,
}

impl FleetArgs {
    /// The validated fleet configuration; `None` without --database-url.
    pub fn config(&self) -> anyhow::Result<Option<FleetConfig>> {
        let Some(url) = &self.database_url else {
            if self.versions_url.is_some() {
                bail!("--versions-url needs --database-url (fleet mode)");
            }
            return Ok(None);
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!("--database-url must be a postgres:// or postgresql:// URL");
        }
        let Some(versions_url) = self.versions_url.clone() else {
            bail!("--database-url needs --versions-url: replicas share versions through it");
        };
        if !["file:///", "s3://", "gs://"]
            .iter()
            .any(|p| versions_url.starts_with(p))
        {
            bail!("--versions-url must be file:///absolute/dir, s3://bucket/prefix or gs://bucket/prefix, not {versions_url:?}");
        }
        if !(self.guard_staleness.is_finite() && self.guard_staleness >= 1.0) {
            bail!("--guard-staleness must be at least 1 second");
        }
        Ok(Some(FleetConfig {
            database_url: crate::takedown::fleet::Secret(url.clone()),
            versions_url,
            guard_staleness: Duration::from_secs_f64(self.guard_staleness),
        }))
    }
}

/// Takedown worker, gates and auditor flags.
#[derive(Debug, Args, Clone)]
pub struct TakedownArgs {
    /// Retain set for unlearning: JSONL of {"text"} or {"ids"} rows (TinyMem default: the clean
    /// training data regenerated from the model's card).
    #[arg(long, env = "LETHE_RETAIN_DATA")]
    pub retain_data: Option<PathBuf>,
    /// Held-out set for the perplexity gate, same format (TinyMem default: its test tasks).
    #[arg(long, env = "LETHE_EVAL_DATA")]
    pub eval_data: Option<PathBuf>,
    /// Canary set whose perplexity must stay within --canary-budget, same format.
    #[arg(long, env = "LETHE_CANARY_DATA")]
    pub canary_data: Option<PathBuf>,
    /// Regurgitation guard window: a completion reproducing this many consecutive tokens of
    /// an accepted takedown sequence is cut.
    #[arg(long, env = "LETHE_GUARD_WINDOW", default_value_t = 16)]
    pub guard_window: usize,
    /// Most sequences in one takedown request.
    #[arg(long, env = "LETHE_MAX_TAKEDOWN_SEQUENCES", default_value_t = 64)]
    pub max_takedown_sequences: usize,
    /// Cores the unlearning worker may use.
    #[arg(long, env = "LETHE_UNLEARN_THREADS", default_value_t = 1)]
    pub unlearn_threads: usize,
    /// The takedown controller's mask ratio at the start (fraction of each MLP matrix zeroed);
    /// it raises the ratio only while sequences stay extractable.
    #[arg(long, env = "LETHE_UNLEARN_RATIO", default_value_t = 0.1)]
    pub unlearn_ratio: f64,
    /// The unlearning method a takedown runs: `balanced-subnet` (the default) is the takedown
    /// controller; any other method `lethe unlearn` runs (but the fine-tuning baselines) runs
    /// once with its defaults (`--unlearn-method-ratio` sets its ratio), and its model is held
    /// to the same gates.
    #[arg(
        long,
        env = "LETHE_UNLEARN_METHOD",
        value_enum,
        default_value = "balanced-subnet"
    )]
    pub unlearn_method: MethodArg,
    /// The ratio of an --unlearn-method other than balanced-subnet (default: that method's,
    /// as `lethe unlearn`).
    #[arg(long, env = "LETHE_UNLEARN_METHOD_RATIO")]
    pub unlearn_method_ratio: Option<f64>,
    /// The highest mask ratio the controller may reach.
    #[arg(long, env = "LETHE_UNLEARN_MAX_RATIO", default_value_t = 0.5)]
    pub unlearn_max_ratio: f64,
    /// BalancedSubnet: retain weight w in −(1−w)·L_forget + w·L_retain.
    #[arg(long, env = "LETHE_UNLEARN_W", default_value_t = 0.9)]
    pub unlearn_w: f64,
    /// Most unlearning steps in one job.
    #[arg(long, env = "LETHE_UNLEARN_MAX_STEPS", default_value_t = 2000)]
    pub unlearn_max_steps: usize,
    /// Wall-time budget of one job's unlearning, in seconds; a job with no gate-passing model
    /// by then is rejected with its report.
    #[arg(long, env = "LETHE_UNLEARN_BUDGET_SECONDS", default_value_t = 600.0)]
    pub unlearn_budget_seconds: f64,
    /// Gate: largest relative held-out perplexity increase (0.02 = +2 %).
    #[arg(long, env = "LETHE_PERPLEXITY_BUDGET", default_value_t = 0.02)]
    pub perplexity_budget: f64,
    /// Gate (TinyMem): largest drop of mean relative test accuracy (0.005 = 0.5 %).
    #[arg(long, env = "LETHE_ACCURACY_BUDGET", default_value_t = 0.005)]
    pub accuracy_budget: f64,
    /// Gate: largest relative change of the canary set's perplexity.
    #[arg(long, env = "LETHE_CANARY_BUDGET", default_value_t = 0.02)]
    pub canary_budget: f64,
    /// Gate: a takedown also needs its sequences gone under sampling and nearby prompts: not
    /// (n, p)-discoverable (`--gate-risk-samples`, `--gate-risk-p`, temperature 1) and not
    /// extracted from any of 4 prompts with 2 tokens changed.
    #[arg(long, env = "LETHE_GATE_RISK")]
    pub gate_risk: bool,
    /// The risk gate's n: samples an attacker draws.
    #[arg(long, env = "LETHE_GATE_RISK_SAMPLES", default_value_t = 100)]
    pub gate_risk_samples: u64,
    /// The risk gate's p: extraction probability at which a sequence counts as discoverable.
    #[arg(long, env = "LETHE_GATE_RISK_P", default_value_t = 0.1)]
    pub gate_risk_p: f64,
    /// Gate: the candidate is audited again with its matrices rounded to int8 (and int4,
    /// reported only); a sequence extractable there fails the gate.
    #[arg(long, env = "LETHE_GATE_QUANTIZED")]
    pub gate_quantized: bool,
    /// JSONL corpus (the rows `lethe audit` reads) the continuous auditor samples every pass,
    /// audited under the model's default definition; exported as
    /// `lethe_corpus_memorization_ratio{definition}`.
    #[arg(long, env = "LETHE_AUDIT_CORPUS")]
    pub audit_corpus: Option<PathBuf>,
    /// Sequences of `--audit-corpus` audited per pass (a fresh random sample each time).
    #[arg(long, env = "LETHE_AUDIT_SAMPLE", default_value_t = 256)]
    pub audit_sample: usize,
    /// Seconds between continuous audits of applied takedowns (also run after every swap).
    #[arg(long, env = "LETHE_AUDIT_INTERVAL_SECONDS", default_value_t = 300)]
    pub audit_interval_seconds: u64,
}

impl TakedownArgs {
    /// The validated takedown configuration for `data_dir`.
    pub fn config(&self, data_dir: &std::path::Path) -> anyhow::Result<TakedownConfig> {
        if self.guard_window == 0 {
            bail!("--guard-window must be at least 1");
        }
        if self.max_takedown_sequences == 0 || self.unlearn_threads == 0 {
            bail!("--max-takedown-sequences and --unlearn-threads must be at least 1");
        }
        for (flag, v) in [
            ("--perplexity-budget", self.perplexity_budget),
            ("--accuracy-budget", self.accuracy_budget),
            ("--canary-budget", self.canary_budget),
            ("--unlearn-budget-seconds", self.unlearn_budget_seconds),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} must be a finite number >= 0");
            }
        }
        let mut c = TakedownConfig::new(data_dir.to_path_buf());
        c.guard_window = self.guard_window;
        c.max_sequences = self.max_takedown_sequences;
        c.worker_threads = self.unlearn_threads;
        c.pipeline.controller = c
            .pipeline
            .controller
            .clone()
            .with_start_ratio(self.unlearn_ratio);
        let ctl = &mut c.pipeline.controller;
        ctl.max_ratio = self.unlearn_max_ratio;
        ctl.w = self.unlearn_w;
        ctl.max_steps = self.unlearn_max_steps;
        ctl.budget_seconds = self.unlearn_budget_seconds;
        ctl.validate()?;
        if self.unlearn_method.name().starts_with("ft-") {
            bail!(
                "--unlearn-method {} is a fine-tuning baseline (it retrains on a TinyMem card's \
                 data), not a takedown method",
                self.unlearn_method.name()
            );
        }
        if let Some(r) = self.unlearn_method_ratio {
            if matches!(self.unlearn_method, MethodArg::BalancedSubnet) {
                bail!(
                    "--unlearn-method-ratio sets another method's ratio; the controller's is \
                     --unlearn-ratio"
                );
            }
            if !(0.0..1.0).contains(&r) {
                bail!("--unlearn-method-ratio must be in [0, 1)");
            }
        }
        c.pipeline.method = MethodFlags {
            ratio: self.unlearn_method_ratio,
            ..MethodFlags::of(self.unlearn_method)
        }
        .spec(50);
        let gates = &mut c.pipeline.gates;
        gates.perplexity_budget = self.perplexity_budget;
        gates.accuracy_budget = self.accuracy_budget;
        gates.canary_budget = self.canary_budget;
        gates.quantized = self.gate_quantized;
        if self.gate_risk {
            let risk = crate::audit::RiskOptions {
                samples: self.gate_risk_samples,
                p: self.gate_risk_p,
                ..Default::default()
            };
            if self.gate_risk_samples == 0 || !(self.gate_risk_p > 0.0 && self.gate_risk_p <= 1.0) {
                bail!("--gate-risk-samples must be at least 1 and --gate-risk-p in (0, 1]");
            }
            risk.validate()?;
            gates.risk = Some(risk);
        }
        c.audit_interval = std::time::Duration::from_secs(self.audit_interval_seconds.max(1));
        if self.audit_sample == 0 {
            bail!("--audit-sample must be at least 1");
        }
        c.corpus = self
            .audit_corpus
            .as_ref()
            .map(|path| crate::takedown::corpus::CorpusConfig {
                path: path.clone(),
                sample: self.audit_sample,
            });
        Ok(c)
    }
}

/// The longest accepted HTTP timeout (one day): longer ones serve no purpose and could
/// overflow a deadline.
const MAX_TIMEOUT_SECONDS: u64 = 86_400;

/// Connection timeouts of the HTTP server (the body read timeout is in [`Limits`], since the
/// handler that reads the body enforces it).
#[derive(Debug, Clone)]
pub struct HttpTimeouts {
    /// Time to receive a new connection's request head (actix `client_request_timeout`).
    pub header_read: Duration,
    /// Idle time allowed between requests on a keep-alive connection (zero: no keep-alive).
    pub keep_alive: Duration,
    /// Time a connection may take to shut down (actix `client_disconnect_timeout`).
    pub disconnect: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(5),
            keep_alive: Duration::from_secs(5),
            disconnect: Duration::from_secs(1),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub model: ModelArgs,
    pub dtype: WeightDtype,
    pub bind: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    pub served_model_name: Option<String>,
    pub auth: Auth,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub http_workers: usize,
    pub shutdown_timeout: u64,
    pub timeouts: HttpTimeouts,
    pub takedown: TakedownConfig,
    pub takedown_args: TakedownArgs,
    pub audits: JobsConfig,
}

impl Config {
    pub fn from_args(a: ServeArgs) -> anyhow::Result<Self> {
        let bind: Vec<SocketAddr> = a
            .bind
            .to_socket_addrs()
            .with_context(|| format!("--bind {:?}: not a host:port address", a.bind))?
            .collect();
        if bind.is_empty() {
            bail!("--bind {:?} resolves to no address", a.bind);
        }
        for (flag, v) in [
            ("--max-batch-size", a.max_batch_size),
            ("--queue-capacity", a.queue_capacity),
            ("--max-body-bytes", a.max_body_bytes),
            ("--max-audit-sequences", a.max_audit_sequences),
            ("--http-workers", a.http_workers),
            ("--audit-threads", a.audit_threads),
            (
                "--max-audit-upload-bytes",
                a.max_audit_upload_bytes as usize,
            ),
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        for (flag, v, min) in [
            // 0 would turn these off in actix: a stalled client could then hold a connection.
            (
                "--header-read-timeout-seconds",
                a.header_read_timeout_seconds,
                1,
            ),
            (
                "--body-read-timeout-seconds",
                a.body_read_timeout_seconds,
                1,
            ),
            (
                "--disconnect-timeout-seconds",
                a.disconnect_timeout_seconds,
                1,
            ),
            ("--keep-alive-seconds", a.keep_alive_seconds, 0),
        ] {
            if !(min..=MAX_TIMEOUT_SECONDS).contains(&v) {
                bail!("{flag} must be between {min} and {MAX_TIMEOUT_SECONDS} seconds, not {v}");
            }
        }
        if let (Some(k), Some(adm)) = (&a.api_key, &a.admin_key) {
            if k == adm {
                bail!("--api-key and --admin-key must differ");
            }
        }
        std::fs::create_dir_all(&a.data_dir)
            .with_context(|| format!("--data-dir {}: cannot create it", a.data_dir.display()))?;
        let probe = a.data_dir.join(".write-test");
        std::fs::write(&probe, b"ok")
            .with_context(|| format!("--data-dir {}: not writable", a.data_dir.display()))?;
        let _ = std::fs::remove_file(probe);
        let loopback_only = bind.iter().all(|s| s.ip().is_loopback());
        let mut takedown = a.takedown.config(&a.data_dir)?;
        takedown.fleet = a.fleet.config()?;
        if let Some(d) = &a.audit_dir {
            if !d.is_dir() {
                bail!("--audit-dir {}: not a directory", d.display());
            }
        }
        let audits = JobsConfig {
            data_dir: a.data_dir.clone(),
            threads: a.audit_threads,
            allowed_dir: a.audit_dir,
            max_upload_bytes: a.max_audit_upload_bytes,
        };
        Ok(Self {
            model: a.model,
            dtype: a.dtype,
            data_dir: a.data_dir,
            served_model_name: a.served_model_name,
            auth: Auth {
                api_key: a.api_key,
                admin_key: a.admin_key,
                loopback_only,
            },
            engine: EngineConfig {
                max_batch: a.max_batch_size,
                queue_capacity: a.queue_capacity,
                ..EngineConfig::default()
            },
            limits: Limits {
                max_body_bytes: a.max_body_bytes,
                max_audit_sequences: a.max_audit_sequences,
                body_read_timeout: Duration::from_secs(a.body_read_timeout_seconds),
                ..Limits::default()
            },
            bind,
            http_workers: a.http_workers,
            shutdown_timeout: a.shutdown_timeout,
            timeouts: HttpTimeouts {
                header_read: Duration::from_secs(a.header_read_timeout_seconds),
                keep_alive: Duration::from_secs(a.keep_alive_seconds),
                disconnect: Duration::from_secs(a.disconnect_timeout_seconds),
            },
            takedown,
            takedown_args: a.takedown,
            audits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let mut argv = vec!["lethe"];
        argv.extend_from_slice(args);
        Config::from_args(Wrap::try_parse_from(argv)?.serve)
    }

    #[test]
    fn validates_flags_with_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let dd = d.path().to_str().unwrap();
        let c = parse(&["--data-dir", dd]).unwrap();
        assert!(c.auth.loopback_only);
        let c = parse(&["--data-dir", dd, "--bind", "0.0.0.0:0"]).unwrap();
        assert!(!c.auth.loopback_only);
        let e = parse(&["--data-dir", dd, "--bind", "nonsense"]).unwrap_err();
        assert!(e.to_string().contains("--bind"), "{e}");
        let e = parse(&["--data-dir", dd, "--max-batch-size", "0"]).unwrap_err();
        assert!(e.to_string().contains("--max-batch-size"), "{e}");
        let e = parse(&["--data-dir", dd, "--api-key", "a", "--admin-key", "a"]).unwrap_err();
        assert!(e.to_string().contains("must differ"), "{e}");
        assert!(parse(&["--data-dir", dd, "--api-key", ""]).is_err());
    }

    #[test]
    fn the_unlearning_method_flag_picks_the_controller_or_a_one_shot_method() {
        use crate::unlearn::method::MethodSpec;
        let d = tempfile::tempdir().unwrap();
        let dd = d.path().to_str().unwrap();
        let method = |args: &[&str]| {
            let mut all = vec!["--data-dir", dd];
            all.extend_from_slice(args);
            parse(&all).map(|c| c.takedown.pipeline.method)
        };
        assert_eq!(method(&[]).unwrap(), None, "the controller");
        match method(&["--unlearn-method", "sou", "--unlearn-method-ratio", "0.05"]).unwrap() {
            Some(MethodSpec::Sou(c)) => assert_eq!(c.ratio, 0.05),
            other => panic!("{other:?}"),
        }
        match method(&["--unlearn-method", "activations"]).unwrap() {
            Some(MethodSpec::Neuron { config, .. }) => assert_eq!(config.ratio, 0.01),
            other => panic!("{other:?}"),
        }
        for (args, says) in [
            (
                &["--unlearn-method", "ft-clean"][..],
                "fine-tuning baseline",
            ),
            (&["--unlearn-method-ratio", "0.1"][..], "--unlearn-ratio"),
            (
                &[
                    "--unlearn-method",
                    "greedy",
                    "--unlearn-method-ratio",
                    "1.5",
                ][..],
                "--unlearn-method-ratio",
            ),
        ] {
            let e = method(args).unwrap_err();
            assert!(e.to_string().contains(says), "{args:?}: {e}");
        }
        assert!(method(&["--unlearn-method", "nope"]).is_err());
    }

    #[test]
    fn http_timeouts_have_defaults_flags_and_refuse_zero() {
        let d = tempfile::tempdir().unwrap();
        let dd = d.path().to_str().unwrap();
        let c = parse(&["--data-dir", dd]).unwrap();
        assert_eq!(c.timeouts.header_read, Duration::from_secs(5));
        assert_eq!(c.timeouts.keep_alive, Duration::from_secs(5));
        assert_eq!(c.timeouts.disconnect, Duration::from_secs(1));
        assert_eq!(c.limits.body_read_timeout, Duration::from_secs(30));
        let c = parse(&[
            "--data-dir",
            dd,
            "--header-read-timeout-seconds",
            "2",
            "--body-read-timeout-seconds",
            "3",
            "--keep-alive-seconds",
            "0",
            "--disconnect-timeout-seconds",
            "4",
        ])
        .unwrap();
        assert_eq!(c.timeouts.header_read, Duration::from_secs(2));
        assert_eq!(c.limits.body_read_timeout, Duration::from_secs(3));
        assert_eq!(c.timeouts.keep_alive, Duration::ZERO);
        assert_eq!(c.timeouts.disconnect, Duration::from_secs(4));
        for flag in [
            "--header-read-timeout-seconds",
            "--body-read-timeout-seconds",
            "--disconnect-timeout-seconds",
        ] {
            let e = parse(&["--data-dir", dd, flag, "0"]).unwrap_err();
            assert!(e.to_string().contains(flag), "{e}");
        }
        let e = parse(&["--data-dir", dd, "--keep-alive-seconds", "99999999999"]).unwrap_err();
        assert!(e.to_string().contains("--keep-alive-seconds"), "{e}");
    }

    #[test]
    fn debug_output_never_shows_keys() {
        let d = tempfile::tempdir().unwrap();
        let c = parse(&[
            "--data-dir",
            d.path().to_str().unwrap(),
            "--api-key",
            "sk-inference-123456",
            "--admin-key",
            "sk-admin-654321",
        ])
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-inference-123456"), "{dbg}");
        assert!(!dbg.contains("sk-admin-654321"), "{dbg}");
    }

    #[test]
    fn fleet_flags_go_together_and_the_database_password_never_shows() {
        let d = tempfile::tempdir().unwrap();
        let dd = d.path().to_str().unwrap();
        let db = "postgres://lethe:s3cret-pw@db:5432/lethe";
        assert!(parse(&["--data-dir", dd]).unwrap().takedown.fleet.is_none());
        for (args, flag) in [
            (vec!["--database-url", db], "--versions-url"),
            (vec!["--versions-url", "file:///v"], "--database-url"),
            (
                vec![
                    "--database-url",
                    "mysql://x/y",
                    "--versions-url",
                    "file:///v",
                ],
                "--database-url",
            ),
            (
                vec!["--database-url", db, "--versions-url", "ftp://h/v"],
                "--versions-url",
            ),
            (
                vec![
                    "--database-url",
                    db,
                    "--versions-url",
                    "file:///v",
                    "--guard-staleness",
                    "0.5",
                ],
                "--guard-staleness",
            ),
        ] {
            let mut argv = vec!["--data-dir", dd];
            argv.extend(args);
            let e = parse(&argv).unwrap_err().to_string();
            assert!(e.contains(flag), "{argv:?}: {e}");
        }
        for versions in ["file:///shared/v", "s3://bucket/v", "gs://bucket/v"] {
            let c = parse(&[
                "--data-dir",
                dd,
                "--database-url",
                db,
                "--versions-url",
                versions,
            ])
            .unwrap();
            let f = c.takedown.fleet.clone().unwrap();
            assert_eq!(
                (f.versions_url.as_str(), f.guard_staleness),
                (versions, Duration::from_secs(5))
            );
            let logged = format!("{c:?}");
            assert!(
                !logged.contains("s3cret-pw") && logged.contains("db:5432/lethe"),
                "{logged}"
            );
        }
    }
}
