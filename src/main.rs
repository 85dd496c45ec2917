//! The `lethe` binary: parse the command line, start logging, run.

use clap::Parser;

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
