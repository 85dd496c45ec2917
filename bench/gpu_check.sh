#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (written for one H200, 16 cores, 15 minutes of device time
# in all, the build included). Run from the repository root:
#
#   bash bench/gpu_check.sh            # everything goes under $OUT (default ./gpu-out)
#   bash bench/gpu_check.sh build      # env + build only (a first device call, <= 10 min)
#   bash bench/gpu_check.sh check      # then everything else on the warm machine (target/ kept)
#
# Steps, each timed, each failing fast (the first failure stops the script and prints the tail
# of its log):
#   env     nvidia-smi, nvcc, cargo; picks CUDA_COMPUTE_CAP from the GPU (default 90)
#   build   cargo test --release --locked --features cuda --lib --test cli --no-run: the lib's
#           test binary and the release binary (target/release/lethe) from one feature set
#   tests   the CPU-vs-CUDA agreement tests (src/cuda_tests.rs) and the device parser's test
#   bench   lethe bench decode / unlearn / audit on cuda:0 (decode also on the CPU, to compare)
#   serve   lethe serve --device cuda:0 on the bundled model: one completion, one audit, one
#           takedown (BalancedSubnet on the GPU through the server's worker, polled to its end)
#   unlearn (GPU_CHECK_FULL=1 only) lethe tinymem audit + lethe unlearn --device cuda:0
#
# Settings (environment): OUT, CUDA_COMPUTE_CAP, LETHE_BIN (a prebuilt lethe: skips the build
# and the tests), GPU_CHECK_FULL=1, JOBS (cargo -j, default nproc), PORT (default 18080).
# The machine needs an NVIDIA driver, a CUDA toolkit (nvcc on PATH, /usr/local/cuda, or the
# wheel venv of scripts/cuda-toolchain.sh already installed), Rust (cargo) and curl; it cannot
# download anything, so a missing one stops the check in the `env` step.
set -euo pipefail
PHASE="${1:-all}"
case "$PHASE" in
    all | build | check) ;;
    *)
        echo "usage: $0 [all|build|check]" >&2
        exit 64
        ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PORT="${PORT:-18080}"
JOBS="${JOBS:-$(nproc)}"
T0=$(date +%s)
TIMINGS="$OUT/timings.txt"
: >"$TIMINGS"

note() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/summary.txt"; }

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.log, records its
# time, and stops the whole check on failure.
step() {
    local name=$1 limit=$2
    shift 2
    local s rc=0
    s=$(date +%s)
    note "$name: start"
    # Through bash -c so that COMMAND may be one of the exported functions below.
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local took=$(($(date +%s) - s))
    echo "$name $took s rc=$rc" >>"$TIMINGS"
    if [ "$rc" -ne 0 ]; then
        note "$name: FAILED (rc=$rc, ${took}s); last lines of $OUT/$name.log:"
        tail -n 60 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
        exit "$rc"
    fi
    note "$name: ok (${took}s)"
}

# --- env ---------------------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -a)"
    echo "cores: $(nproc)"
    git rev-parse HEAD 2>/dev/null || true
    nvidia-smi || echo "nvidia-smi: not found"
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
} >"$OUT/env.txt" 2>&1

if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')" || cap=""
    export CUDA_COMPUTE_CAP="${cap:-90}"
fi
note "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

if [ -z "${LETHE_BIN:-}" ]; then
    if ! command -v nvcc >/dev/null; then
        if [ -x /usr/local/cuda/bin/nvcc ]; then
            export PATH="/usr/local/cuda/bin:$PATH"
        elif [ -x "${LETHE_CUDA_VENV:-.venv-cuda}/bin/python" ]; then
            # An already installed wheel toolchain (no download happens when it is complete).
            # shellcheck source=scripts/cuda-toolchain.sh
            source scripts/cuda-toolchain.sh
        fi
    fi
    command -v nvcc >/dev/null || {
        note "env: no nvcc (no CUDA toolkit); cannot build. Set LETHE_BIN to a prebuilt binary."
        exit 2
    }
    command -v cargo >/dev/null || {
        note "env: no cargo; cannot build. Set LETHE_BIN to a prebuilt binary."
        exit 2
    }
    nvcc --version | tail -n 2 >>"$OUT/env.txt"
    cargo --version >>"$OUT/env.txt"
fi
command -v curl >/dev/null || {
    note "env: no curl"
    exit 2
}
# The CUDA libraries the binary links against (cudart, cublas, cublasLt, curand, nvrtc).
cuda_home="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")}"
for d in "$cuda_home/lib64" "$cuda_home/lib"; do
    if [ -d "$d" ]; then
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
note "env: ok (see $OUT/env.txt)"

# --- build + tests -----------------------------------------------------------------------------
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${LETHE_BIN:-}" ]; then
    if [ "$PHASE" != check ]; then
        # One cargo command line for everything: `cargo build` and `cargo test` unify features
        # differently (dev-dependencies), which gives candle-kernels' build script a new hash and
        # runs nvcc all over again. Selecting an integration test (tests/cli.rs) makes cargo build
        # the real binary too (target/release/lethe), with the test features.
        step build 540 cargo test --release --locked --features cuda -j "$JOBS" \
            --lib --test cli --no-run
        [ -x "$CARGO_TARGET_DIR/release/lethe" ] || {
            note "build: no $CARGO_TARGET_DIR/release/lethe"
            exit 1
        }
    fi
    if [ "$PHASE" = build ]; then
        note "build phase done in $(($(date +%s) - T0))s"
        exit 0
    fi
    LETHE_BIN="$CARGO_TARGET_DIR/release/lethe"
    step tests 240 cargo test --release --locked --features cuda -j "$JOBS" --lib \
        -- --nocapture --test-threads 1 cuda_tests runtime::tests
    grep -E '^test |test result' "$OUT/tests.log" | tee -a "$OUT/summary.txt"
    if grep -q 'no CUDA device' "$OUT/tests.log"; then
        note "tests: the CUDA tests were skipped (no device could be opened)"
        exit 3
    fi
fi
ldd "$LETHE_BIN" >"$OUT/ldd.txt" 2>&1 || true
if grep -q 'not found' "$OUT/ldd.txt"; then
    note "env: missing shared libraries:"
    grep 'not found' "$OUT/ldd.txt" | tee -a "$OUT/summary.txt"
    exit 2
fi

# --- benchmarks --------------------------------------------------------------------------------
lethe() { "$LETHE_BIN" "$@"; }
export LETHE_BIN
export -f lethe
step bench-decode-tinymem-cuda 120 lethe bench decode --device cuda:0 --shape tinymem --runs 3
step bench-decode-tinymem-cuda-b16 120 lethe bench decode --device cuda:0 --shape tinymem --batch 16 --runs 3
step bench-decode-pythia70m-cuda 120 lethe bench decode --device cuda:0 --shape pythia70m --batch 8 --runs 3
step bench-decode-tinymem-cpu 120 lethe bench decode --device cpu --shape tinymem --runs 3
step bench-unlearn-cuda 180 lethe bench unlearn --device cuda:0 --steps 10 --warmup 2
step bench-unlearn-cpu 180 lethe bench unlearn --device cpu --steps 5 --warmup 1
step bench-audit-cuda 120 lethe bench audit --device cuda:0 --runs 2
cat "$OUT"/bench-*.log | grep '^{' >"$OUT/bench.jsonl" || true
cat "$OUT/bench.jsonl" | tee -a "$OUT/summary.txt"

# --- serve: completion, audit, takedown --------------------------------------------------------
DATA="$OUT/serve-data"
rm -rf "$DATA"
note "serve: start on 127.0.0.1:$PORT --device cuda:0"
LETHE_UNLEARN_MAX_STEPS="${LETHE_UNLEARN_MAX_STEPS:-100}" \
    "$LETHE_BIN" serve --bind "127.0.0.1:$PORT" --data-dir "$DATA" --device cuda:0 \
    >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
URL="http://127.0.0.1:$PORT"

wait_ready() {
    for _ in $(seq 1 120); do
        curl -fsS -o /dev/null "$URL/readyz" && return 0
        kill -0 "$SERVER" 2>/dev/null || return 1
        sleep 1
    done
    return 1
}
post() { curl -fsS "$URL$1" -H 'Content-Type: application/json' "${@:3}" -d "$2"; }
export URL SERVER OUT
export -f wait_ready post
step serve-ready 130 wait_ready

step serve-completion 60 post /v1/completions \
    '{"prompt": "^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903", "max_tokens": 20, "temperature": 0}'
cp "$OUT/serve-completion.log" "$OUT/completion.json"
step serve-audit 120 post /v1/audit \
    '{"definition": "k=10,n=5", "sequences": ["^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903 1910 1917 1924 1931 1938"]}'
cp "$OUT/serve-audit.log" "$OUT/audit.json"
step serve-takedown-post 60 post /v1/takedowns \
    '{"sequences": ["^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903 1910 1917 1924 1931 1939 1945 1952 1959 1966 1973"], "definition": "k=10,n=5", "reason": "gpu check"}' \
    -H 'Idempotency-Key: gpu-check-1'
TD="$(sed -n 's/.*"id": *"\(td_[^"]*\)".*/\1/p' "$OUT/serve-takedown-post.log" | head -n1)"
[ -n "$TD" ] || {
    note "takedown: no id in the answer"
    exit 1
}
poll_takedown() {
    local state=""
    for _ in $(seq 1 300); do
        curl -fsS "$URL/v1/takedowns/$TD" >"$OUT/takedown.json" || return 1
        state="$(sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p' "$OUT/takedown.json" | head -n1)"
        case "$state" in
            applied | rejected) return 0 ;;
            failed | cancelled) return 1 ;;
        esac
        sleep 1
    done
    return 1
}
export TD
export -f poll_takedown
step serve-takedown 320 poll_takedown
note "takedown: $(sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p' "$OUT/takedown.json" | head -n1) (report in $OUT/takedown.json)"
curl -fsS "$URL/metrics" >"$OUT/metrics.txt" || true
kill "$SERVER" 2>/dev/null || true
wait "$SERVER" 2>/dev/null || true
trap - EXIT
if grep -qiE 'panicked|CUDA_ERROR|MatMulNonContiguous' "$OUT/serve.log"; then
    note "serve: the log has errors:"
    grep -iE 'panicked|CUDA_ERROR|MatMulNonContiguous' "$OUT/serve.log" | head -n 20 | tee -a "$OUT/summary.txt"
    exit 1
fi

# --- unlearn through the CLI (optional) --------------------------------------------------------
if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
    step tinymem-audit-cuda 180 lethe tinymem audit --device cuda:0 --out "$OUT/forget.jsonl"
    step unlearn-cuda 300 lethe unlearn --device cuda:0 --forget "$OUT/forget.jsonl" \
        --retain tinymem --method balanced-subnet --mode balanced --ratio 0.3 --w 0.9 \
        --min-steps 100 --max-steps 200 --no-gates --out "$OUT/unlearned"
    cp "$OUT/unlearned/report.json" "$OUT/unlearn-report.json" 2>/dev/null || true
fi

note "all steps passed in $(($(date +%s) - T0))s; timings in $TIMINGS"
