#!/usr/bin/env bash
# Builds lethe with `--features cuda` on a machine without a GPU, with the wheel toolchain of
# scripts/cuda-toolchain.sh, and times each stage.
#
#   bash scripts/check-cuda-build.sh           # cargo check --all-targets + clippy -D warnings
#   bash scripts/check-cuda-build.sh --release # also cargo build --release (the binary)
#
# Settings: CARGO_TARGET_DIR (default target/cuda: the feature set differs from the default
# build, so a separate target dir keeps both warm), JOBS (cargo -j, default 2),
# CUDA_COMPUTE_CAP (default 90), LETHE_CUDA_VENV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/cuda-toolchain.sh
source scripts/cuda-toolchain.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
JOBS="${JOBS:-2}"

timed() {
    local s
    s=$(date +%s)
    echo "+ $*" >&2
    "$@"
    echo "  ($(($(date +%s) - s)) s)" >&2
}

timed cargo check --locked --features cuda --all-targets -j "$JOBS"
timed cargo clippy --locked --features cuda --all-targets -j "$JOBS" -- -D warnings
if [ "${1:-}" = "--release" ]; then
    timed cargo build --release --locked --features cuda -j "$JOBS"
    bin="$CARGO_TARGET_DIR/release/lethe"
    ls -l "$bin"
    # What the binary needs at run time: the driver (libcuda.so.1, from the GPU host) and the
    # CUDA libraries of the toolkit it was built with.
    readelf -d "$bin" | grep NEEDED
    # It starts here only with the link stub standing in for the driver (under the driver's
    # soname, in a throwaway folder): --version and --help need no GPU; --device cuda fails.
    fake="$(mktemp -d)"
    ln -s "$CUDA_HOME/lib/stubs/libcuda.so" "$fake/libcuda.so.1"
    LD_LIBRARY_PATH="$CUDA_HOME/lib:$fake" "$bin" --version
    LD_LIBRARY_PATH="$CUDA_HOME/lib:$fake" "$bin" bench decode --device cuda:0 --runs 1 &&
        echo "unexpected: cuda:0 opened through the stub" >&2 ||
        echo "  (cuda:0 refused through the stub, as expected)" >&2
    rm -rf "$fake"
fi
