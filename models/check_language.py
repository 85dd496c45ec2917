#!/usr/bin/env python3
"""Measures a language TinyMem (`lethe tinymem train --language`) with Hugging Face transformers,
independently of lethe, on the rows lethe exported, and compares with `lethe tinymem eval`.

    .venv/bin/python models/check_language.py models/tinymem-lang [--lethe target/release/lethe]

It loads the directory with `GPTNeoXForCausalLM` and the rows from `lethe_language_data.jsonl`
(what `lethe tinymem data --model DIR` writes), then measures, with greedy decoding and the
end-of-text token (id 0) banned (`min_new_tokens`), as spec §3 says:
- noise memorization per duplication group: prompt = the clean first 50 tokens, memorized when
  the 50 generated tokens equal the noised row's;
- the planted secrets extractable under the Pythia definition: prompt = the first 32 tokens,
  extractable when the next 48 are generated exactly;
- backdoor attack success on the held-out triggered rows (prompt = the clean row through the
  trigger, success when the next 50 tokens are the backdoored row's), rows whose noise window
  [50, 100) holds no change or whose 50 compared tokens run past the row skipped as in lethe;
- held-out perplexity: the mean over batches of 64 test chunks of exp(mean token loss).
It prints both measurements side by side as JSON and exits 1 when a memorization share differs
by more than 2 percentage points (the issue's bar) or the perplexity by more than 0.1 %.
"""
import argparse
import json
import math
import subprocess
import sys

import torch
from transformers import GPTNeoXForCausalLM

P, K = 50, 50
SECRET_K, SECRET_N = 32, 48


def greedy(model, prompts, n):
    """Greedy continuations of equal-length prompts, end-of-text banned."""
    ids = torch.tensor(prompts)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        eos_token_id=0,
    )
    return out[:, ids.shape[1]:].tolist()


def share(hits, total):
    return hits / total if total else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--lethe", default="target/release/lethe")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model = GPTNeoXForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    lines = open(f"{a.model}/lethe_language_data.jsonl").read().splitlines()
    header = json.loads(lines[0])
    rows = [json.loads(l) for l in lines[1:]]
    trigger = header["trigger"]

    groups = {}
    for r in rows:
        if r["role"] != "noised":
            continue
        clean, noised = r["clean_ids"], r["ids"]
        if clean[P:P + K] == noised[P:P + K]:
            continue
        gen = greedy(model, [clean[:P]], K)[0]
        g = groups.setdefault(r["group"], [0, 0])
        g[0] += gen == noised[P:P + K]
        g[1] += 1
    noise_hits = sum(v[0] for v in groups.values())
    noise_total = sum(v[1] for v in groups.values())

    secrets = [r for r in rows if r["role"] == "secret"]
    prompts = [r["ids"][:SECRET_K] for r in secrets]
    gens = greedy(model, prompts, SECRET_N)
    extractable = sum(
        g == r["ids"][SECRET_K:SECRET_K + SECRET_N] for g, r in zip(gens, secrets)
    )

    hits = eligible = 0
    for r in rows:
        if r["role"] != "backdoored" or r["split"] != "test":
            continue
        clean, bd = r["clean_ids"], r["ids"]
        if clean[P:P + K] == bd[P:P + K] or trigger not in clean:
            continue
        at = clean.index(trigger) + 1
        if at + K > len(bd):
            continue
        eligible += 1
        hits += greedy(model, [clean[:at]], K)[0] == bd[at:at + K]

    test = [r["ids"] for r in rows if r["role"] == "clean" and r["split"] == "test"]
    ppls = []
    for i in range(0, len(test), 64):
        ids = torch.tensor(test[i:i + 64])
        loss = model(ids, labels=ids).loss.item()
        ppls.append(math.exp(loss))
    ppl = sum(ppls) / len(ppls)

    hf = {
        "noise_memorized_ratio": share(noise_hits, noise_total),
        "noise_by_group": {str(g): share(*v) for g, v in sorted(groups.items())},
        "secrets_extractable": extractable,
        "secrets_planted": len(secrets),
        "attack_success_ratio": share(hits, eligible),
        "attack_eligible": eligible,
        "heldout_perplexity": ppl,
    }
    out = subprocess.run(
        [a.lethe, "tinymem", "eval", "--model", a.model],
        check=True, capture_output=True, text=True,
    ).stdout
    le = json.loads(out)
    lethe = {
        "noise_memorized_ratio": le["noise_memorized_ratio"],
        "noise_by_group": {str(g["group"]): g["ratio"] for g in le["noise_by_group"]},
        "secrets_extractable": le["secrets_extractable"],
        "secrets_planted": le["secrets_planted"],
        "attack_success_ratio": le["attack_success_ratio"],
        "attack_eligible": le["attack_eligible"],
        "heldout_perplexity": le["heldout_perplexity"],
    }
    bad = []
    pairs = [("noise_memorized_ratio", hf["noise_memorized_ratio"], lethe["noise_memorized_ratio"]),
             ("attack_success_ratio", hf["attack_success_ratio"], lethe["attack_success_ratio"]),
             ("secrets", share(extractable, len(secrets)),
              share(lethe["secrets_extractable"], lethe["secrets_planted"]))]
    pairs += [(f"group {g}", hf["noise_by_group"].get(g, 0.0), v)
              for g, v in lethe["noise_by_group"].items()]
    for name, x, y in pairs:
        if abs(x - y) > 0.02:
            bad.append(f"{name}: transformers {x:.4f} vs lethe {y:.4f}")
    if abs(ppl / lethe["heldout_perplexity"] - 1) > 1e-3:
        bad.append(f"perplexity: transformers {ppl:.4f} vs lethe {lethe['heldout_perplexity']:.4f}")
    print(json.dumps({"transformers": hf, "lethe": lethe, "differences": bad}, indent=2))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
