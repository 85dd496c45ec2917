"""What this machine's CPU can do at most, for reading the peer table (docs/benchmarks.md).

Measures, with PyTorch (oneDNN/MKL sgemm) on `--threads` threads:
- f32 matrix-multiply throughput, GFLOP/s, on large square shapes (the practical peak) and on
  the shapes of the rows that multiply big matrices (Pythia-70m's LM head and MLP over 1,024
  positions, TinyMem's MLP over 4,800, and the MLP and head shapes of the 160m, 410m and 1b
  rows of the GPT-NeoX scale table);
- streaming read bandwidth, GB/s, over 1 GiB (DRAM) and over Pythia-70m's 103 MB LM head as
  one matrix-vector product (the batch-1 decode access pattern; the head fits in L3 here).

Each figure is the best of several runs: it is a ceiling, not a typical value. Usage:

    .venv/bin/python bench/roofline.py [--threads 2] [--json]
"""

import argparse
import json
import os
import time


def best(f, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="also time each shape in bfloat16 (AMX/AVX512-BF16 where the CPU has them)",
    )
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    out = {"threads": a.threads, "torch": torch.__version__, "sgemm": [], "bandwidth": []}
    shapes = [
        ("square 2048", 2048, 2048, 2048),
        ("square 4096", 4096, 4096, 4096),
        ("Pythia LM head, 1024 positions", 1024, 512, 50304),
        ("Pythia MLP in, 1024 positions", 1024, 512, 2048),
        ("Pythia MLP out, 1024 positions", 1024, 2048, 512),
        ("TinyMem MLP in, 4800 positions", 4800, 128, 512),
        # The scale table's MLP and head shapes (8 x 128 positions; issue #17).
        ("Pythia-160m MLP in, 1024 positions", 1024, 768, 3072),
        ("Pythia-160m LM head, 1024 positions", 1024, 768, 50304),
        ("Pythia-410m MLP in, 1024 positions", 1024, 1024, 4096),
        ("Pythia-410m MLP out, 1024 positions", 1024, 4096, 1024),
        ("Pythia-410m LM head, 1024 positions", 1024, 1024, 50304),
        ("Pythia-1b MLP in, 1024 positions", 1024, 2048, 8192),
        ("Pythia-1b MLP out, 1024 positions", 1024, 8192, 2048),
        ("Pythia-1b LM head, 1024 positions", 1024, 2048, 50304),
    ]
    for name, m, k, n in shapes:
        x, w = torch.randn(m, k), torch.randn(k, n)
        torch.mm(x, w)
        t = best(lambda: torch.mm(x, w), 5)
        row = {"shape": name, "m": m, "k": k, "n": n, "gflops": 2 * m * k * n / t / 1e9}
        if a.bf16:
            xb, wb = x.bfloat16(), w.bfloat16()
            torch.mm(xb, wb)
            row["bf16_gflops"] = 2 * m * k * n / best(lambda: torch.mm(xb, wb), 5) / 1e9
        out["sgemm"].append(row)
    big = torch.randn(256 * 1024 * 1024)  # 1 GiB of f32
    big.sum()
    t = best(lambda: big.sum(), 7)
    out["bandwidth"].append({"what": "sum over 1 GiB", "gb_per_s": big.numel() * 4 / t / 1e9})
    head, v = torch.randn(50304, 512), torch.randn(512)
    torch.mv(head, v)
    t = best(lambda: torch.mv(head, v), 20)
    out["bandwidth"].append({"what": "matrix-vector over the 50304 x 512 head", "gb_per_s": head.numel() * 4 / t / 1e9})
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"torch {out['torch']}, {a.threads} threads (best of several runs)")
    for r in out["sgemm"]:
        bf = f", bf16 {r['bf16_gflops']:7.1f}" if "bf16_gflops" in r else ""
        print(f"  sgemm {r['shape']:<34} {r['m']}x{r['k']}x{r['n']}: {r['gflops']:7.1f} GFLOP/s{bf}")
    for r in out["bandwidth"]:
        print(f"  read  {r['what']:<42}: {r['gb_per_s']:7.1f} GB/s")


if __name__ == "__main__":
    main()
