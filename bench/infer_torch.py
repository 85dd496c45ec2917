"""PyTorch/transformers peer of `lethe bench decode|score|audit --model DIR`: the same weights,
the same token ids, the same measurement.

Run (from the repository root, with the project's venv; `bench/peer.py` runs it for you):

    .venv/bin/python bench/infer_torch.py decode --model models/tinymem-noise --batch 32 --threads 2
    .venv/bin/python bench/infer_torch.py score  --model models/tinymem-noise --threads 2
    .venv/bin/python bench/infer_torch.py audit  --model models/tinymem-noise --threads 2

The model is `AutoModelForCausalLM.from_pretrained(DIR, dtype=float32)` in eval mode on the CPU
with transformers' default attention implementation (printed as `attn_implementation`), eager
PyTorch (no `torch.compile`). Each command does one untimed warm-up run, then `--runs` timed runs,
and prints one JSON object with the keys lethe prints.

- decode: row b, position i of the prompt is (7b + 3i) mod (vocab - 1), as in lethe. One
  `generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` call per run; min_new_tokens
  makes transformers set the EOS logit to -inf at every step, as lethe bans EOS. The timed call
  includes the prefill, as lethe's does. Every row is checked to have N new tokens.
- score: the ids of lethe's `bench_unlearn::token_rows` (xorshift64, seed 3) rebuilt here; per
  batch one forward, log_softmax over the vocabulary, gather of the next token's log-probability,
  per-row mean NLL; the per-token log-probabilities are copied out as lethe's are.
- audit: TinyMem definition: 50-token prompt, the next 50 tokens are the truth; greedy generation
  of 50 tokens with EOS banned in batches of `--batch`; memorized when all 50 equal the truth.
  Ids from `token_rows` with seed 2 and 100 tokens per row, as `lethe bench audit`.
- audit-tf: the same verdict teacher-forced, as lethe's single pass decides it: per batch one
  forward over prompt + truth minus its last token, logits kept for the n target positions only
  (`logits_to_keep`), EOS at -inf, argmax, memorized when every position's argmax is the truth.
  `--definition tinymem` (50 + 50) or `pythia` (32 + 48); ids from `token_rows` (seed 2, k + n
  tokens per row, the model's vocabulary), as `lethe bench audit --shape`.
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

MASK64 = (1 << 64) - 1


def token_rows(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    """Mirror of lethe's `bench_unlearn::token_rows` (xorshift64)."""
    s = ((seed * 0x9E3779B97F4A7C15) & MASK64) | 1
    rows = []
    for _ in range(n):
        row = []
        for _ in range(length):
            s ^= (s << 13) & MASK64
            s ^= s >> 7
            s ^= (s << 17) & MASK64
            row.append(s % vocab)
        rows.append(row)
    return rows


def greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of every row by exactly `new_tokens` tokens (EOS banned)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
    )
    gen = out[:, ids.shape[1]:]
    assert gen.shape == (ids.shape[0], new_tokens), gen.shape
    eos = model.config.eos_token_id
    if eos is not None:
        assert not (gen == eos).any(), "EOS generated"
    return gen


def timed(fn, runs: int) -> tuple[list[float], object]:
    fn()  # warm-up
    times, last = [], None
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - t)
    return times, last


def common(a, model) -> dict:
    return {
        "implementation": f"transformers {transformers.__version__}, torch {torch.__version__} eager",
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
    }


def decode(a, model) -> dict:
    vocab = model.config.vocab_size
    ids = torch.tensor(
        [[(b * 7 + i * 3) % (vocab - 1) for i in range(a.prompt_tokens)] for b in range(a.batch)]
    )
    times, gen = timed(lambda: greedy(model, ids, a.new_tokens), a.runs)
    secs = statistics.median(times)
    return {
        "benchmark": "decode",
        "shape": a.model,
        "batch": a.batch,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "runs": len(times),
        "median_seconds": secs,
        "tokens_per_second": a.batch * a.new_tokens / secs,
        "first_row_tokens": gen[0].tolist(),
    }


def score(a, model) -> dict:
    seqs = torch.tensor(token_rows(a.sequences, a.seq_len, 3, model.config.vocab_size))

    def run():
        nll = []
        for chunk in seqs.split(a.batch):
            logits = model(input_ids=chunk).logits
            lp = logits[:, :-1].float().log_softmax(-1).gather(-1, chunk[:, 1:, None])[..., 0]
            token_logprobs = lp.numpy().copy()
            nll.extend((-token_logprobs.mean(1)).tolist())
        return sum(nll) / len(nll)

    times, mean_nll = timed(run, a.runs)
    secs = statistics.median(times)
    return {
        "benchmark": "score",
        "shape": a.model,
        "batch": a.batch,
        "sequences": a.sequences,
        "seq_len": a.seq_len,
        "runs": len(times),
        "median_seconds": secs,
        "tokens_per_second": a.sequences * a.seq_len / secs,
        "mean_nll": mean_nll,
    }


def audit(a, model) -> dict:
    rows = torch.tensor(token_rows(a.sequences, 100, 2, model.config.vocab_size))
    prompts, truth = rows[:, :50], rows[:, 50:]

    def run():
        memorized = 0
        for p, t in zip(prompts.split(a.batch), truth.split(a.batch)):
            gen = greedy(model, p, t.shape[1])
            memorized += int((gen == t).all(1).sum())
        return memorized

    times, memorized = timed(run, a.runs)
    secs = statistics.median(times)
    return {
        "benchmark": "audit",
        "model": a.model,
        "definition": "tinymem",
        "batch": a.batch,
        "sequences": a.sequences,
        "runs": len(times),
        "median_seconds": secs,
        "sequences_per_second": a.sequences / secs,
        "memorized": memorized,
    }


def audit_tf(a, model) -> dict:
    k, n = (50, 50) if a.definition == "tinymem" else (32, 48)
    if a.rows:
        # Rows as `lethe audit` reads them: ids, with clean_ids as the prompt's source when given.
        lines = [json.loads(l) for l in open(a.rows) if l.strip()]
        lines = [r for r in lines if "ids" in r]
        rows = torch.tensor([(r.get("clean_ids") or r["ids"])[:k] + r["ids"][k : k + n] for r in lines])
        a.sequences = len(lines)
    else:
        rows = torch.tensor(token_rows(a.sequences, k + n, 2, model.config.vocab_size))
    eos = model.config.eos_token_id

    def run():
        memorized = 0
        for chunk in rows.split(a.batch):
            logits = model(input_ids=chunk[:, : k + n - 1], logits_to_keep=n).logits
            if eos is not None:
                logits[..., eos] = float("-inf")
            memorized += int((logits.argmax(-1) == chunk[:, k:]).all(1).sum())
        return memorized

    times, memorized = timed(run, a.runs)
    secs = statistics.median(times)
    return {
        "benchmark": "audit-tf",
        "model": a.model,
        "definition": a.definition,
        "batch": a.batch,
        "sequences": a.sequences,
        "runs": len(times),
        "median_seconds": secs,
        "sequences_per_second": a.sequences / secs,
        "memorized": memorized,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, defaults in [
        ("decode", {"batch": 1, "runs": 5}),
        ("score", {"batch": 32, "runs": 5}),
        ("audit", {"batch": 64, "runs": 3}),
        ("audit-tf", {"batch": 64, "runs": 3}),
    ]:
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="HF-format model directory")
        p.add_argument("--batch", type=int, default=defaults["batch"])
        p.add_argument("--runs", type=int, default=defaults["runs"])
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")
        if name == "decode":
            p.add_argument("--prompt-tokens", type=int, default=16)
            p.add_argument("--new-tokens", type=int, default=100)
        if name == "score":
            p.add_argument("--sequences", type=int, default=256)
            p.add_argument("--seq-len", type=int, default=150)
        if name in ("audit", "audit-tf"):
            p.add_argument("--sequences", type=int, default=128)
        if name == "audit-tf":
            p.add_argument("--definition", choices=["tinymem", "pythia"], default="tinymem")
            p.add_argument("--rows", default=None, help="JSONL rows (ids, optional clean_ids) instead of random ones")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = {"decode": decode, "score": score, "audit": audit, "audit-tf": audit_tf}[a.cmd](a, model)
    print(json.dumps({**out, **common(a, model)}))


if __name__ == "__main__":
    main()
