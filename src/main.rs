//! The `lethe` binary: parse the command line, start logging, run.
//!
//! Invariants:
//! - Logs go to stderr (filtered by `RUST_LOG`, `info` by default); stdout is left to the
//!   commands' output.
//! - A failed command prints `error: ` and its cause chain to stderr and exits non-zero.
//! - mimalloc is the global allocator (the library leaves that choice to its host).

use clap::Parser;

/// mimalloc instead of glibc malloc: candle allocates a fresh buffer for every tensor, and with
/// glibc those large buffers are mmapped/trimmed and page-faulted back in on every training
/// step (see the commit that added it for the measurement).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lethe::runtime::init_tracing();
    let cli = lethe::cli::Cli::parse();
    match lethe::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
