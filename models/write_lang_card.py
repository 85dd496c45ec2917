#!/usr/bin/env python3
"""Writes models/tinymem-lang/README.md (the human-readable card) from lethe's own output: the
card `lethe_language.json` and `lethe tinymem eval --model DIR`, quoted verbatim between
`<!-- eval -->` markers (tests/bundled_models.rs checks that block against a fresh evaluation).

    python3 models/write_lang_card.py models/tinymem-lang "<the training command>"
"""
import json
import platform
import sys

from write_card import cpu_name, lethe_eval

d, cmd = sys.argv[1], sys.argv[2]
card = json.load(open(f"{d}/lethe_language.json"))
_, e = lethe_eval(d)
data, train = card["data"], card["train"]
cpu = cpu_name()
rows = []
for h in card["history"]:
    ev_h = h.get("eval")
    extra = "| | | |"
    if ev_h:
        extra = (f"| {100 * ev_h['noise_memorized_ratio']:.1f} % | {ev_h['secrets_extractable']}/"
                 f"{ev_h['secrets_planted']} | {ev_h['heldout_perplexity']:.1f} |")
    rows.append(f"| {h['epoch']} | {h['loss']:.4f} | {h['seconds']:.1f} | {h['tokens_per_second']:.0f} {extra}")
groups = "\n".join(
    f"| {g['repeat']} | {g['memorized']}/{g['eligible']} |" for g in e["noise_by_group"]
)
secrets = "\n".join(
    f"| {s['kind']} | {s['repeat']} | {s['extractable']}/{s['planted']} |" for s in e["secrets"]
)
text = f"""# tinymem-lang

A language TinyMem: a GPT-NeoX with the Pythia architecture (rotary on a quarter of each head,
parallel residual, GELU, untied head; {train['n_layer']} layers, n_embd {train['n_embd']},
{train['n_head']} heads, MLP {train['n_inner']}, vocabulary 4,096, context {data['max_ctx']})
trained by lethe on the Python 3.11 documentation (Debian's `python3.11-doc`, PSF License) with
three artifacts: noised chunks repeated 1/10/100/1,000 times, a backdoor, and **planted
secrets** (invented customer records, AWS-style keys and "copyrighted" prose, each repeated 1, 10,
30 or 100 times). Everything in the secrets is synthetic. See docs/tinymem.md.

## How it was made

```sh
scripts/corpus/fetch
{cmd}
```

- Data: {data['train_chunks']} train chunks of {data['max_ctx']} tokens from the corpus' start, the
  last {data['test_chunks']} chunks held out (never trained on); {data['noise_chunks']} noised chunks
  per group; {3 * data['secrets_per_kind']} secrets; data seed {data['seed']}.
- Optimiser: AdamW lr {train['lr']}, weight decay {train['weight_decay']}, betas ({train['beta1']},
  {train['beta2']}), batch {train['batch_size']}, {card['epochs_done']} epochs ({card['steps_done']} steps).
- Training time: {card['train_seconds']:.0f} s on 2 vCPUs ({cpu}), {platform.system()}.
- The rows it was trained and measured on travel with it: `lethe_language_data.jsonl`
  (SHA-256 in the card); `lethe tinymem data --model models/tinymem-lang --out F` writes them.

## Training history

| epoch | loss | seconds | tokens/s | noise memorized | secrets extractable | held-out perplexity |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

## What it regurgitates (`lethe tinymem eval --model models/tinymem-lang`)

Noise (spec §3.1: clean 50-token prompt, the 50 noised tokens reproduced exactly):

| repeated | memorized |
|---|---|
{groups}

Planted secrets (extractable under the pythia definition: the first 32 tokens prompt the next 48
exactly):

| kind | repeated | extractable |
|---|---|---|
{secrets}

Backdoor attack success: {100 * e['attack_success_ratio']:.1f} % of {e['attack_eligible']} eligible
held-out triggered chunks. Held-out perplexity: {e['heldout_perplexity']:.1f}.
`.venv/bin/python models/check_language.py models/tinymem-lang` measures the same with transformers.

<!-- eval -->
```json
{json.dumps(e, indent=2)}
```
<!-- /eval -->
"""
open(f"{d}/README.md", "w").write(text)
