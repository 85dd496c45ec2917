#!/usr/bin/env bash
# The paper's language results (spec §5.2) on the bundled language TinyMem (issue #18 item 4):
# memorization before and after BalancedSubnet, Subnet and Durable, with the held-out perplexity
# change, for each artifact's forget set. Writes OUT/*.json and prints the table that
# docs/results.md quotes.
#
#   bash bench/language_results.sh            # ≈ 15 minutes on 2 cores
#
# The forget sets are what `lethe tinymem audit --out` finds memorized: the noised rows (judged
# as spec §3.1: clean 50-token prompt, noised 50 tokens, `--definition tinymem`), the backdoored
# held-out rows (prompt through the trigger) and the planted secrets (the GPT-NeoX default,
# pythia: 32 + 48 tokens). Each method runs with `lethe unlearn`'s defaults and `--no-gates`, so
# the weights are written and measured whether the gates pass or not.
set -euo pipefail
cd "$(dirname "$0")/.."
lethe=${LETHE:-target/release/lethe}
model=${MODEL:-models/tinymem-lang}
out=${OUT:-target/language-results}
[ -x "$lethe" ] || cargo build --release
mkdir -p "$out"
"$lethe" tinymem audit --model "$model" --out "$out/memorized.jsonl" > "$out/audit.json"
"$lethe" tinymem eval --model "$model" > "$out/base.eval.json"
for role in noised backdoored secret; do
  grep "\"role\":\"$role\"" "$out/memorized.jsonl" > "$out/$role.jsonl" || true
done
for role in noised backdoored secret; do
  [ -s "$out/$role.jsonl" ] || { echo "nothing memorized for $role" >&2; continue; }
  def=()
  [ "$role" = noised ] && def=(--definition tinymem)
  for method in balanced-subnet subnet durable; do
    run="$out/$role-$method"
    start=$(date +%s.%N)
    "$lethe" unlearn --model "$model" --forget "$out/$role.jsonl" --method "$method" "${def[@]}" \
      --no-gates --out "$run" > "$run.report.json" 2> "$run.log"
    end=$(date +%s.%N)
    echo "{\"seconds\": $(echo "$end - $start" | bc)}" > "$run.time.json"
    "$lethe" tinymem eval --model "$run" > "$run.eval.json"
  done
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
base = json.load(open(f"{out}/base.eval.json"))
def mem(e, role):
    if role == "noised":
        return 100 * e["noise_memorized_ratio"]
    if role == "backdoored":
        return 100 * e["attack_success_ratio"]
    return 100 * e["secrets_extractable"] / e["secrets_planted"]
print("| forget set | method | memorized before → after (%) | held-out perplexity change (%) | seconds |")
print("|---|---|---|---|---|")
for role in ["noised", "backdoored", "secret"]:
    for method in ["balanced-subnet", "subnet", "durable"]:
        try:
            e = json.load(open(f"{out}/{role}-{method}.eval.json"))
            t = json.load(open(f"{out}/{role}-{method}.time.json"))["seconds"]
        except FileNotFoundError:
            continue
        dp = 100 * (e["heldout_perplexity"] / base["heldout_perplexity"] - 1)
        print(f"| {role} | {method} | {mem(base, role):.1f} → {mem(e, role):.1f} | {dp:+.2f} | {t:.0f} |")
PY
