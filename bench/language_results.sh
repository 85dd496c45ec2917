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
# pythia: 32 + 48 tokens). Each method runs with `lethe unlearn`'s defaults: BalancedSubnet is
# the takedown controller, held to the default gates (+2 % held-out perplexity); Subnet and
# Durable have no controller and run with `--no-gates`, so their weights are written and measured
# whatever their drift. Durable needs equal-length rows: the secrets are cut to the 80 tokens the
# pythia definition audits.
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
  for spec in balanced-subnet subnet:0.01 subnet:0.03 subnet:0.1 subnet:0.3 durable:0.01 durable:0.03 durable:0.1; do
    method=${spec%%:*}
    ratio=()
    [ "$spec" != "$method" ] && ratio=(--ratio "${spec#*:}")
    run="$out/$role-${spec/:/-}"
    forget="$out/$role.jsonl"
    gates=(--no-gates)
    [ "$method" = balanced-subnet ] && gates=()
    if [ "$method" = durable ] && [ "$role" = secret ]; then
      python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l); print(json.dumps({"ids": r["ids"][:80]}))' "$forget" > "$out/secret80.jsonl"
      forget="$out/secret80.jsonl"
    fi
    start=$(date +%s%N)
    "$lethe" unlearn --model "$model" --forget "$forget" --method "$method" "${ratio[@]}" "${def[@]}" \
      "${gates[@]}" --out "$run" > "$run.report.json" 2> "$run.log" || failed=1
    end=$(date +%s%N)
    echo "{\"seconds\": $(( (end - start) / 1000000 ))e-3}" > "$run.time.json"
    if [ "${failed:-0}" = 1 ]; then echo "$run: $(tail -1 "$run.log")" >&2; failed=0; continue; fi
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
runs = ["balanced-subnet"] + [f"{m}-{r}" for m in ["subnet", "durable"] for r in ["0.01", "0.03", "0.1", "0.3"]]
for role in ["noised", "backdoored", "secret"]:
    for run in runs:
        name = run.replace("-0", " --ratio 0")
        try:
            t = json.load(open(f"{out}/{role}-{run}.time.json"))["seconds"]
        except FileNotFoundError:
            continue
        try:
            e = json.load(open(f"{out}/{role}-{run}.eval.json"))
        except FileNotFoundError:
            # Rejected by the gates: no weights written; its report says why.
            r = json.load(open(f"{out}/{role}-{run}/report.json"))
            print(f"| {role} | {name} | rejected: {'; '.join(r['gates_failed'])} | | {t:.0f} |")
            continue
        dp = 100 * (e["heldout_perplexity"] / base["heldout_perplexity"] - 1)
        print(f"| {role} | {name} | {mem(base, role):.1f} → {mem(e, role):.1f} | {dp:+.2f} | {t:.0f} |")
PY
