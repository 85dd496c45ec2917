//! `lethe serve` flags (each also a `LETHE_…` environment variable), validated once into a
//! typed [`Config`] before anything starts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::auth::{Auth, Secret};
use super::engine::EngineConfig;
use super::state::Limits;
use crate::cli::ModelArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub model: ModelArgs,
    pub bind: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    pub served_model_name: Option<String>,
    pub auth: Auth,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub http_workers: usize,
    pub shutdown_timeout: u64,
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
        ] {
            if v == 0 {
                bail!("{flag} must be at least 1");
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
        Ok(Self {
            model: a.model,
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
                ..Limits::default()
            },
            bind,
            http_workers: a.http_workers,
            shutdown_timeout: a.shutdown_timeout,
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
}
