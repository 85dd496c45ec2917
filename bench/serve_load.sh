#!/usr/bin/env bash
# Load benchmark for `lethe serve` (issue #5): requests/s and p50/p99 latency of 16-token greedy
# completions on the bundled TinyMem model at concurrency 1, 8 and 32, with continuous batching
# (--max-batch-size 32) and without it (--max-batch-size 1); then audit sequences/s through
# POST /v1/audit (64 sequences per request, tinymem definition).
#
#   cargo build --release && bench/serve_load.sh [seconds-per-run] [runs]
#
# Needs wrk (Debian: apt-get install wrk). Prints a Markdown table; each cell is the median of
# `runs` runs. The server and wrk share the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
runs=${2:-3}
bin=${LETHE_BIN:-target/release/lethe}
port=${PORT:-18080}
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

cat > "$tmp/completion.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt": "^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903", "max_tokens": 16, "temperature": 0}'
LUA

start_server() {
  "$bin" serve --bind "127.0.0.1:$port" --data-dir "$tmp/data" --max-batch-size "$1" \
    >"$tmp/server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return 0
    sleep 0.1
  done
  echo "server did not become ready" >&2; cat "$tmp/server.log" >&2; exit 1
}
stop_server() { kill -TERM "$server"; wait "$server" || true; }

# wrk's --latency output → "rps p50_ms p99_ms"
run_wrk() {
  local conc=$1 script=$2 path=$3
  wrk -t1 -c"$conc" -d"${secs}s" --latency -s "$script" "http://127.0.0.1:$port$path" |
    python3 -c '
import re, sys
t = sys.stdin.read()
def ms(s):
    v, u = re.match(r"([\d.]+)(us|ms|s)", s).groups()
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"\s50%\s+(\S+)", t).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
if errs: sys.exit(f"non-2xx responses: {errs.group(1)}\n{t}")
print(rps, p50, p99)'
}

median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo "| --max-batch-size | concurrency | requests/s | p50 ms | p99 ms | tokens/s |"
echo "|---|---|---|---|---|---|"
for mb in 32 1; do
  start_server "$mb"
  # Sanity: the request generates 16 tokens.
  curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903", "max_tokens": 16, "temperature": 0}' |
    python3 -c 'import json,sys; u=json.load(sys.stdin)["usage"]; assert u["completion_tokens"]==16, u'
  for c in 1 8 32; do
    rps=(); p50=(); p99=()
    for _ in $(seq 1 "$runs"); do
      read -r a b d < <(run_wrk "$c" "$tmp/completion.lua" /v1/completions)
      rps+=("$a"); p50+=("$b"); p99+=("$d")
    done
    r=$(median "${rps[@]}")
    printf '| %s | %s | %.1f | %.1f | %.1f | %.0f |\n' "$mb" "$c" "$r" "$(median "${p50[@]}")" \
      "$(median "${p99[@]}")" "$(python3 -c "print($r*16)")"
  done
  stop_server
done

# Audit throughput through the API: 64 sequences of the bundled model's eligible noise rows.
start_server 64
# The bundled model's card regenerates its training data; its noised rows (clean prompt, noised
# target) are what the paper audits.
"$bin" tinymem data --model models/tinymem-noise --out "$tmp/data.jsonl" 2>/dev/null
python3 - "$tmp/audit.lua" "$tmp/data.jsonl" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[2]):
    r = json.loads(line)
    if r.get("role") == "noised" and r.get("clean_ids"):
        rows.append({"ids": r["ids"], "clean_ids": r["clean_ids"]})
    if len(rows) == 64:
        break
if len(rows) < 64:
    sys.exit(f"only {len(rows)} noise rows")
body = json.dumps({"sequences": rows, "definition": "tinymem"})
open(sys.argv[1], "w").write(
    'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = ' + json.dumps(body) + "\n")
PY
echo
echo "| audit | concurrency | requests/s | sequences/s | p50 ms |"
echo "|---|---|---|---|---|"
for c in 1 4; do
  rps=(); p50=()
  for _ in $(seq 1 "$runs"); do
    read -r a b _ < <(run_wrk "$c" "$tmp/audit.lua" /v1/audit)
    rps+=("$a"); p50+=("$b")
  done
  r=$(median "${rps[@]}")
  printf '| 64 sequences | %s | %.2f | %.1f | %.0f |\n' "$c" "$r" "$(python3 -c "print($r*64)")" "$(median "${p50[@]}")"
done
stop_server
