"""PyTorch reference for `lethe bench unlearn`: one BalancedSubnet step on a TinyMem-shaped GPT-2.

Run (from the repository root, with the project's venv; see tests/fixtures/README.md):

    .venv/bin/python bench/unlearn_torch.py --layers 4 --batch 32 --steps 20

The model is transformers' `GPT2LMHeadModel` (4 layers, n_embd 128, 4 heads, MLP 512, ReLU,
vocab 14, context 150, tied embeddings, no dropout), frozen. One score tensor per MLP weight
matrix (Kaiming-uniform, bound 1/sqrt(fan_in)); per matrix the floor(ratio * numel) smallest
|score| entries are masked with a straight-through estimator `hard + |s| - |s|.detach()`;
the masked weights are substituted with `torch.func.functional_call`. The smallest entries are found with `torch.topk` (a selection,
like lethe's) rather than the reference code's full `sort`, which selects the same entries
(up to the order among exact ties) and on 2 vCPUs cost ~39 ms of a ~175 ms step against
~7.5 ms for `topk`; `--mask-select sort` restores the reference code's formulation.
Loss: -(1 - w) * mean forget-row loss + w * mean retain-row loss (per-row mean token
cross-entropy over 149 positions), half the rows forget, half retain;
SGD(lr 0.1, momentum 0.9, weight_decay 5e-4) on the scores. Prints one JSON object with the
keys `lethe bench unlearn` prints; `seconds_per_step` is the median over timed steps.
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--w", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mask-select", choices=["topk", "sort"], default="topk")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=14, n_positions=150, n_embd=128, n_layer=a.layers, n_head=4, n_inner=512,
        activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=0.8 / math.sqrt(128), tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_parameters() if n.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight"))]
    params = dict(model.named_parameters())
    scores = {}
    for n in names:
        w = params[n]
        bound = 1.0 / math.sqrt(w.shape[1])
        scores[n] = torch.empty_like(w).uniform_(-bound, bound).requires_grad_(True)
    opt = torch.optim.SGD(scores.values(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ids = torch.randint(0, 14, (a.batch, 150))
    forget = torch.arange(a.batch) < a.batch // 2

    def masked(n):
        s = scores[n]
        m = s.abs()
        j = int(a.ratio * m.numel())
        hard = torch.ones_like(m)
        if a.mask_select == "sort":
            idx = m.flatten().sort().indices[:j]
        else:
            idx = torch.topk(m.flatten(), j, largest=False, sorted=False).indices
        hard.view(-1)[idx] = 0.0
        return params[n] * (hard + m - m.detach())

    times = []
    for step in range(a.warmup + a.steps):
        t = time.perf_counter()
        opt.zero_grad()
        override = {n: masked(n) for n in names}
        logits = torch.func.functional_call(model, override, (ids,)).logits
        per_tok = F.cross_entropy(
            logits[:, :-1].reshape(-1, 14), ids[:, 1:].reshape(-1), reduction="none"
        ).view(a.batch, 149)
        per_row = per_tok.mean(1)
        loss = -(1 - a.w) * per_row[forget].mean() + a.w * per_row[~forget].mean()
        loss.backward()
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
    print(json.dumps({
        "benchmark": "unlearn",
        "implementation": "pytorch",
        "torch_version": torch.__version__,
        "method": "balanced-subnet",
        "layers": a.layers,
        "batch": a.batch,
        "seq_len": 150,
        "ratio": a.ratio,
        "steps": len(times),
        "seconds_per_step": statistics.median(times),
        "statistic": "median over timed steps",
        "threads": torch.get_num_threads(),
        "mask_select": a.mask_select,
    }))


if __name__ == "__main__":
    main()
