//! Process-wide runtime settings: compute threads, devices, logging.
//!
//! Threads: candle sizes its CPU thread pools from `RAYON_NUM_THREADS` and otherwise from its own
//! guess of the physical core count, while rayon's global pool (used by gemm and tokenizers)
//! sizes itself from the scheduler's CPU set. Left alone, the two can disagree and
//! oversubscribe small machines. [`configure_threads`] pins both to one number, by default the
//! CPUs this process may run on, before any pool exists. `docs/benchmarks.md` has the
//! measurement that motivated it.

use candle_core::Device;

use crate::error::{Error, Result};

/// Sets `RAYON_NUM_THREADS` (read by candle and rayon) to `threads`, or to the number of CPUs
/// this process may use when `threads` is `None` and the variable is unset. Returns the count
/// in force. Must run before the first tensor operation; later calls cannot resize pools.
pub fn configure_threads(threads: Option<usize>) -> usize {
    let n = match threads {
        Some(n) if n > 0 => n,
        _ => match std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(n) if n > 0 => n,
            _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
    };
    // SAFETY: called at start-up, before lethe spawns threads; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    n
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
