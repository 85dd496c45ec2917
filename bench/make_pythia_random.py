"""Writes a Pythia-shaped GPT-NeoX with random weights in Hugging Face format, for the peer
benchmarks (`bench/peer.py`, `bench/scale.py`). Nothing is downloaded.

    .venv/bin/python bench/make_pythia_random.py target/bench-models/pythia70m-random
    .venv/bin/python bench/make_pythia_random.py --shape 1b target/bench-models/pythia1b-random

`--shape` picks EleutherAI's config of that size, typed in here (default 70m):

| shape | layers | hidden | heads | MLP  |
|-------|--------|--------|-------|------|
| 70m   | 6      | 512    | 8     | 2048 |
| 160m  | 12     | 768    | 12    | 3072 |
| 410m  | 24     | 1024   | 16    | 4096 |
| 1b    | 16     | 2048   | 8     | 8192 |

Every shape has vocab 50304, rotary_pct 0.25, base 10000, parallel residual, max positions
2048, exact GELU, an untied head and bos = eos = 0. The weights are transformers' own initialisation
(`initializer_range` 0.02) under `torch.manual_seed(seed)`. The directory gets `config.json`
(with the legacy keys `rotary_pct` / `rotary_emb_base` and `torch_dtype` added, as
tests/fixtures/make_fixtures.py does), `model.safetensors`, and a `tokenizer.json` (lethe's
loader requires one; the benchmarks feed token ids, so it is a WordLevel tokenizer over the
vocabulary's placeholder names `t0` … `t50303`). An existing directory written with the same
seed is left alone.
"""

import argparse
import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

VOCAB = 50304
# (layers, hidden, heads, MLP) of EleutherAI/pythia-{shape}.
SHAPES = {
    "70m": (6, 512, 8, 2048),
    "160m": (12, 768, 12, 3072),
    "410m": (24, 1024, 16, 4096),
    "1b": (16, 2048, 8, 8192),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="70m")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the dtype the checkpoint stores (the same draw, rounded)",
    )
    a = ap.parse_args()
    layers, hidden, heads, inner = SHAPES[a.shape]
    stamp = os.path.join(a.out_dir, "lethe_bench_seed.json")
    want = {"seed": a.seed} if a.shape == "70m" else {"seed": a.seed, "shape": a.shape}
    if a.dtype != "float32":
        want["dtype"] = a.dtype
    if os.path.isfile(stamp) and json.load(open(stamp)) == want:
        print(f"{a.out_dir}: up to date")
        return
    os.makedirs(a.out_dir, exist_ok=True)
    torch.manual_seed(a.seed)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inner,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=2048,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    dtype = getattr(torch, a.dtype)
    model = GPTNeoXForCausalLM(cfg).float().eval().to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(a.out_dir, safe_serialization=True)
    cfg_path = os.path.join(a.out_dir, "config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    for k, v in {"rotary_pct": 0.25, "rotary_emb_base": 10000}.items():
        cfg_json.setdefault(k, v)
    cfg_json["torch_dtype"] = a.dtype
    cfg_json["dtype"] = a.dtype
    with open(cfg_path, "w") as f:
        json.dump(dict(sorted(cfg_json.items())), f, indent=2)
        f.write("\n")
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(a.out_dir, "tokenizer.json"))
    n = sum(p.numel() for p in model.parameters())
    with open(stamp, "w") as f:
        json.dump(want, f)
    print(f"{a.out_dir}: {n / 1e6:.1f} M parameters, shape {a.shape}, seed {a.seed}, {a.dtype}")


if __name__ == "__main__":
    main()
