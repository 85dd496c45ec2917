//! Process-wide runtime settings: compute threads, devices, logging.
//!
//! Invariants:
//! - Thread settings apply once per process: the first call of [`configure_threads`] (the CLI,
//!   with `--threads`) or [`ensure_threads`] (every model build) wins; later calls only report
//!   the count in force.
//! - After that first call `RAYON_NUM_THREADS` is set: to `--threads` when given, else to its
//!   existing positive value, else to the CPUs this process may use; `--threads 0` leaves the
//!   variable and the libraries' defaults alone. Rayon's global pool is built with the same
//!   count unless one already exists.
//! - [`parse_device`] accepts `cpu`, `cuda`, `gpu` and `cuda:N`; anything else, or CUDA in a
//!   build without it, is `InvalidInput` naming `device`.
//! - Logs go to stderr only, so stdout stays machine-readable; [`init_tracing`] may be called
//!   more than once.
//!
//! Why the variable matters is in `docs/benchmarks.md` ("Why the thread setting matters (the
//! `RAYON_NUM_THREADS` mystery)").

use candle_core::Device;

use crate::error::{Error, Result};

/// Sets `RAYON_NUM_THREADS` (read by candle and rayon) to `threads`, or to the number of CPUs
/// this process may use when `threads` is `None` and the variable is unset. `Some(0)` leaves
/// the libraries' own defaults in place (for comparison). Only the first call in a process has
/// an effect (pools cannot be resized); it must come before the first tensor operation.
/// Returns the thread count in force, if one is set.
pub fn configure_threads(threads: Option<usize>) -> Option<usize> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| apply_threads(threads));
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// [`configure_threads`]`(None)`: called whenever a model is built, so library users get the
/// fast setting without doing anything.
pub fn ensure_threads() {
    configure_threads(None);
}

fn apply_threads(threads: Option<usize>) {
    let n = match threads {
        Some(0) => return,
        Some(n) => n,
        None => match std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) if n > 0 => n,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
    };
    // SAFETY: Rust's environment accessors (all that candle and rayon use) are serialised by
    // std's internal lock; lethe calls this at start-up or model load, from Rust code only.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

/// Parses `cpu`, `cuda`, `cuda:N` (or `gpu`) into a device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.as_str() {
        "cuda" | "gpu" => Some(0),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = ordinal else {
        return Err(Error::invalid(
            "device",
            format!("{spec:?}: expected cpu, cuda or cuda:N"),
        ));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::invalid(
            "device",
            format!(
                "{spec:?}: this build of lethe has no CUDA support (build with --features cuda)"
            ),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::invalid("device", format!("{spec:?}: {e}")))
}

/// Installs the `tracing` subscriber (`RUST_LOG` controls verbosity; default `info`), logging
/// to stderr so stdout stays machine-readable.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_or_name_the_problem() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("device") && e.contains("tpu"), "{e}");
        if !candle_core::utils::cuda_is_available() {
            assert!(parse_device("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("CUDA"));
        }
    }
}
