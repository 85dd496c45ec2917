#!/usr/bin/env python3
"""The GPT-NeoX scale table (issue #17): lethe against transformers (PyTorch eager, CPU) on random
Pythia-shaped checkpoints, one BalancedSubnet step and one training step per shape, side by side.

    python3 bench/scale.py                          # 70m, 160m, 410m, 1b; 3 rounds per row
    python3 bench/scale.py --shapes 70m --runs 1    # one shape, one round: checks that it runs

What it does (the build, the venv and the process handling are bench/peer.py's):
1. Builds lethe (release) and finds the peer's Python, as bench/peer.py does.
2. Writes each shape's checkpoint with bench/make_pythia_random.py (seed 0) under
   target/bench-models/pythia{shape}-random unless it is already there.
3. For each shape and each of `unlearn` and `train`: `--runs` rounds; each round runs
   `lethe bench {unlearn,train} --model DIR --batch B --seq-len T --steps S --warmup 1 --json`
   and `bench/pythia_torch.py {unlearn,train} --model DIR ...` once each in fresh processes,
   alternating which goes first. Each process reports the median of its timed steps and its own
   peak RSS; the row's figures are the medians over rounds. A peer that fails (e.g. killed for
   memory) is recorded as such, and the row still gets lethe's figures.
4. Prints a Markdown table and writes it to target/bench-scale.md, every run's JSON to
   target/bench-scale.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer import ROOT, build_lethe, fmt, machine, peer_python, run_one, sh  # noqa: E402

SHAPES = ["70m", "160m", "410m", "1b"]


def gib(b) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--what", default="unlearn,train")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", default="", help="shapes whose peer is not run (comma list)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per process")
    a = ap.parse_args()
    start = time.perf_counter()
    lethe = build_lethe()
    py = peer_python()
    info = machine(py, lethe)
    threads = str(a.threads)
    lethe_env = {**os.environ, "RAYON_NUM_THREADS": threads}
    lethe_env.pop("LETHE_THREADS", None)
    peer_env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    sizes = ["--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
             "--warmup", "1"]
    no_peer = set(filter(None, a.no_peer.split(",")))
    print(f"machine: {info}\nrounds per row: {a.runs}, threads: {threads}", flush=True)
    rows = []
    for shape in a.shapes.split(","):
        model = f"target/bench-models/pythia{shape}-random"
        print(sh([py, "bench/make_pythia_random.py", "--shape", shape, model]).strip(), flush=True)
        for what in a.what.split(","):
            lethe_argv = [lethe, "--threads", threads, "bench", what, "--model", model, *sizes,
                          "--json"]
            peer_argv = [py, "bench/pythia_torch.py", what, "--model", model, *sizes,
                         "--threads", threads]
            lr, pr, peer_error = [], [], None
            for i in range(a.runs):
                order = [("lethe", lethe_argv, lethe_env, lr)]
                if shape not in no_peer and peer_error is None:
                    order.append(("peer", peer_argv, peer_env, pr))
                if i % 2 == 1:
                    order.reverse()
                for who, argv, env, acc in order:
                    try:
                        res = run_one(argv, env, a.timeout)
                    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                        if who == "lethe":
                            raise
                        peer_error = f"{type(e).__name__}: {getattr(e, 'returncode', '')}"
                        print(f"  peer failed: {peer_error}", flush=True)
                        continue
                    acc.append(res)
                    print(f"  {shape} {what} round {i + 1} {who:<5} "
                          f"{res['seconds_per_step']:.3f} s/step, "
                          f"peak RSS {gib(res['peak_rss_bytes'])} GiB", flush=True)
            med = lambda runs, k: statistics.median(r[k] for r in runs) if runs else None
            row = {
                "shape": shape, "what": what,
                "lethe_seconds": med(lr, "seconds_per_step"),
                "lethe_tokens_per_second": med(lr, "tokens_per_second"),
                "lethe_peak_rss": med(lr, "peak_rss_bytes"),
                "lethe_path": lr[-1].get("step_path"),
                "mlp_parameters": lr[-1].get("mlp_parameters"),
                "peer_seconds": med(pr, "seconds_per_step"),
                "peer_peak_rss": med(pr, "peak_rss_bytes"),
                "peer_error": peer_error if shape not in no_peer else "not run (--no-peer)",
                "lethe_cmd": " ".join(["lethe", *lethe_argv[1:]]),
                "peer_cmd": " ".join(["python", *peer_argv[1:]]),
                "lethe_runs": lr, "peer_runs": pr,
            }
            rows.append(row)
    wall = time.perf_counter() - start
    lines = [
        f"| shape | step | lethe s/step | lethe tokens/s | lethe peak RSS GiB | "
        f"transformers s/step | transformers peak RSS GiB | lethe speed / peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["peer_seconds"] is not None:
            ratio = f"{r['peer_seconds'] / r['lethe_seconds']:.2f}x"
            peer = fmt(r["peer_seconds"])
        else:
            ratio, peer = "—", r["peer_error"] or "—"
        lines.append(f"| {r['shape']} | {r['what']} | {fmt(r['lethe_seconds'])} | "
                     f"{fmt(r['lethe_tokens_per_second'])} | {gib(r['lethe_peak_rss'])} | {peer} | "
                     f"{gib(r['peer_peak_rss'])} | {ratio} |")
    footer = (f"\nbatch {a.batch} x {a.seq_len} tokens, {a.steps} timed steps after 1 warm-up per "
              f"process, median of {a.runs} round(s), {threads} threads each side; machine: "
              f"{info['cpu']}, {info['cpus']} CPUs; {info['rustc']}; torch {info['torch']}, "
              f"transformers {info['transformers']}; wall time {wall:.0f} s.")
    table = "\n".join(lines) + "\n" + footer + "\n"
    print("\n" + table)
    with open(os.path.join(ROOT, "target", "bench-scale.md"), "w") as f:
        f.write(table)
    with open(os.path.join(ROOT, "target", "bench-scale.json"), "w") as f:
        json.dump({"machine": info, "args": vars(a), "wall_seconds": wall, "rows": rows}, f,
                  indent=1)
    print("wrote target/bench-scale.md and target/bench-scale.json")


if __name__ == "__main__":
    main()
