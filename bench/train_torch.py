"""PyTorch reference for `lethe bench train`: the same TinyMem-shaped GPT-2 training step.

Run (from the repository root, with the project's venv):

    RAYON_NUM_THREADS= /work/main/.venv/bin/python bench/train_torch.py --layers 4 --batch 32 --steps 20

It builds transformers' `GPT2LMHeadModel` (4 layers, n_embd 128, 4 heads, MLP 512, ReLU,
vocab 14, context 150, tied embeddings, no dropout), draws random token ids in 0..14 from a fixed
seed, and times forward + causal-LM loss (`labels = input_ids`: mean cross-entropy over all 149
shifted positions) + backward + AdamW (lr 1e-3, weight decay 0.1, betas 0.9/0.98, eps 1e-8),
f32 on CPU, eager mode. It prints one JSON object with the keys `lethe bench train --json` prints;
`tokens_per_second` is batch x seq_len over the median step time. `--threads` sets
`torch.set_num_threads` (default: torch's own choice, printed as `threads`).
"""

import argparse
import json
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=150)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; output is JSON")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = GPT2Config(
        vocab_size=14,
        n_positions=150,
        n_embd=128,
        n_layer=a.layers,
        n_head=4,
        n_inner=512,
        activation_function="relu",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.8 / 128**0.5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=10,
        eos_token_id=11,
        pad_token_id=13,
    )
    model = GPT2LMHeadModel(cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, 14, (a.batch, a.seq_len), generator=gen)

    def step() -> tuple[float, float, float, float]:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, loss.item()

    first_loss = None
    for _ in range(a.warmup):
        *_, loss = step()
        first_loss = loss if first_loss is None else first_loss
    times, fw, bw, op = [], [], [], []
    for _ in range(max(a.steps, 1)):
        t = time.perf_counter()
        f, b, o, loss = step()
        times.append(time.perf_counter() - t)
        fw.append(f)
        bw.append(b)
        op.append(o)
        first_loss = loss if first_loss is None else first_loss
    secs = statistics.median(times)
    print(
        json.dumps(
            {
                "benchmark": "train",
                "implementation": f"pytorch {torch.__version__} eager, transformers GPT2LMHeadModel",
                "layers": a.layers,
                "batch": a.batch,
                "seq_len": a.seq_len,
                "steps": len(times),
                "warmup": a.warmup,
                "seconds_per_step": secs,
                "tokens_per_second": a.batch * a.seq_len / secs,
                "statistic": "median over timed steps",
                "forward_seconds": statistics.median(fw),
                "backward_seconds": statistics.median(bw),
                "optimizer_seconds": statistics.median(op),
                "first_loss": first_loss,
                "last_loss": loss,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
