"""PyTorch peer of `lethe bench unlearn --model DIR` and `lethe bench train --model DIR` on a
GPT-NeoX checkpoint (the random Pythia shapes of bench/make_pythia_random.py).

    .venv/bin/python bench/pythia_torch.py unlearn --model target/bench-models/pythia70m-random \
        --batch 8 --seq-len 128 --steps 3 --warmup 1 --threads 2
    .venv/bin/python bench/pythia_torch.py train --model ... --batch 8 --seq-len 128

The model is transformers' `GPTNeoXForCausalLM`, f32, eager, on the CPU, no dropout. The token
ids are uniform in the vocabulary from a fixed seed (timing does not depend on them).

`unlearn`: one BalancedSubnet step, as lethe's. The model is frozen; every MLP weight matrix
(`dense_h_to_4h`, `dense_4h_to_h`) gets a score tensor (Kaiming-uniform, bound 1/sqrt(fan_in));
per matrix the floor(ratio * numel) smallest |score| entries are masked through the
straight-through estimator `hard + |s| - |s|.detach()` (selected with `torch.topk`), the masked
weights substituted with `torch.func.functional_call`. Loss: -(1 - w) * mean forget-row loss +
w * mean retain-row loss (each row's mean next-token cross-entropy), the first half of the rows
forget; SGD (lr 0.1, momentum 0.9, weight decay 5e-4) on the scores.

`train`: one causal-LM step on every parameter: forward, mean next-token cross-entropy
(`labels = input_ids`), backward, AdamW (lr 1e-3, weight decay 0.1, betas 0.9/0.98, eps 1e-8),
as `lethe bench train`.

Prints one JSON object with `seconds_per_step` (median over the timed steps),
`tokens_per_second` (batch x seq_len over that median) and `peak_rss_bytes` (the process's
maximum resident set, from getrusage).
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM


def per_row_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    b, t, v = logits.shape
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1),
                          reduction="none")
    return tok.view(b, t - 1).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["unlearn", "train"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--w", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq_len))
    params = dict(model.named_parameters())

    if a.what == "unlearn":
        for p in model.parameters():
            p.requires_grad_(False)
        names = [n for n in params if n.endswith(("dense_h_to_4h.weight", "dense_4h_to_h.weight"))]
        scores = {}
        for n in names:
            w = params[n]
            bound = 1.0 / math.sqrt(w.shape[1])
            scores[n] = torch.empty_like(w).uniform_(-bound, bound).requires_grad_(True)
        opt = torch.optim.SGD(scores.values(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        forget = torch.arange(a.batch) < a.batch // 2

        def masked(n):
            m = scores[n].abs()
            j = int(a.ratio * m.numel())
            hard = torch.ones_like(m)
            idx = torch.topk(m.flatten(), j, largest=False, sorted=False).indices
            hard.view(-1)[idx] = 0.0
            return params[n] * (hard + m - m.detach())

        def step():
            opt.zero_grad()
            override = {n: masked(n) for n in names}
            logits = torch.func.functional_call(model, override, (ids,)).logits
            rows = per_row_loss(logits, ids)
            loss = -(1 - a.w) * rows[forget].mean() + a.w * rows[~forget].mean()
            loss.backward()
            opt.step()
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1,
                                betas=(0.9, 0.98), eps=1e-8)

        def step():
            opt.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()

    times = []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    secs = statistics.median(times)
    print(json.dumps({
        "benchmark": a.what,
        "implementation": "pytorch",
        "torch_version": torch.__version__,
        "model": a.model,
        "layers": model.config.num_hidden_layers,
        "batch": a.batch,
        "seq_len": a.seq_len,
        "steps": len(times),
        "seconds_per_step": secs,
        "tokens_per_second": a.batch * a.seq_len / secs,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "statistic": "median over timed steps",
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
