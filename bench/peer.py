#!/usr/bin/env python3
"""lethe against Hugging Face transformers (PyTorch eager, CPU) on the same weights, side by side.

One command, from the repository root (the driver itself needs only the standard library):

    python3 bench/peer.py            # full run: 5 rounds per row
    python3 bench/peer.py --quick    # 1 round, small sizes: checks that everything runs

What it does:
1. `cargo build --release --locked` (honours CARGO_TARGET_DIR) and copies the binary to
   target/bench-peer/lethe, so a concurrent build into a shared target directory cannot swap it
   mid-run.
2. The peer's Python: `$LETHE_BENCH_PYTHON` if set, else `.venv/bin/python`; when neither exists
   it creates `.venv` and installs bench/requirements.txt (pinned torch/transformers).
3. Writes the Pythia-70m-shaped random GPT-NeoX (bench/make_pythia_random.py, seed 0) to
   target/bench-models/pythia70m-random unless it is already there.
4. For each row, `--runs` rounds; each round runs lethe and the peer once each, in fresh
   processes, alternating which goes first (ABBA). Every process does its own untimed warm-up
   and reports the median of its timed repetitions; the row's figure is the median over rounds.
   Threads: lethe gets RAYON_NUM_THREADS and `--threads`, the peer `torch.set_num_threads`
   plus OMP_NUM_THREADS / MKL_NUM_THREADS, all `--threads` (default 2).
5. Prints a markdown table (row, lethe, peer, unit, lethe/peer speed ratio, target >= 1.5x met)
   and writes it to target/bench-peer.md, and every run's JSON to target/bench-peer.json, with
   the machine (lscpu), versions, load averages and the wall time of the whole run.

The decode, score and audit rows load the same model directory on both sides (the bundled
TinyMem model and the random Pythia-shaped one) and feed the same token ids; the driver checks
that both produce the same greedy tokens (first row) / mean NLL / memorized count. The unlearn
and train rows compare the existing self-contained benchmarks (each side initialises its own
TinyMem-shaped weights; timing does not depend on the values).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINYMEM = "models/tinymem-noise"  # lethe::loader::bundled_model_dir() in the source tree
PYTHIA = "target/bench-models/pythia70m-random"
TARGET_RATIO = 1.5


def rows(quick: bool) -> list[dict]:
    """The comparisons: lethe's argv, the peer's argv, the JSON key read, unit, direction."""
    q = quick

    def decode(name, model, batch, new, runs):
        args = ["--batch", str(batch), "--prompt-tokens", "16", "--new-tokens", str(new),
                "--runs", str(runs)]
        return dict(
            name=name, key="tokens_per_second", unit="tokens/s", higher_better=True, check="decode",
            lethe=["bench", "decode", "--model", model, *args, "--json"],
            peer=["bench/infer_torch.py", "decode", "--model", model, *args],
        )

    def score(name, model, batch, seqs, seq_len, runs):
        args = ["--batch", str(batch), "--sequences", str(seqs), "--seq-len", str(seq_len),
                "--runs", str(runs)]
        return dict(
            name=name, key="tokens_per_second", unit="tokens/s", higher_better=True, check="score",
            lethe=["bench", "score", "--model", model, *args, "--json"],
            peer=["bench/infer_torch.py", "score", "--model", model, *args],
        )

    # Full-run sizes keep the whole run near 25 minutes on a loaded 2-vCPU machine; every process
    # still does an untimed warm-up before its timed repetitions.
    audit_args = (["--batch", "8", "--sequences", "16", "--runs", "1"] if q
                  else ["--batch", "64", "--sequences", "64", "--runs", "1"])
    steps = ["--steps", "2", "--warmup", "1"] if q else ["--steps", "10", "--warmup", "2"]
    return [
        decode("decode TinyMem, batch 1", TINYMEM, 1, 8 if q else 100, 1 if q else 3),
        decode(f"decode TinyMem, batch {4 if q else 32}", TINYMEM, 4 if q else 32, 8 if q else 100, 1 if q else 2),
        decode("decode Pythia-70m shape, batch 1", PYTHIA, 1, 4 if q else 32, 1),
        decode(f"decode Pythia-70m shape, batch {4 if q else 32}", PYTHIA, 4 if q else 32, 4 if q else 16, 1),
        score(f"score TinyMem ({32 if q else 150}-token rows, batch {8 if q else 32})", TINYMEM,
              8 if q else 32, 16 if q else 64,
              32 if q else 150, 1 if q else 2),
        score(f"score Pythia-70m shape ({16 if q else 128}-token rows, batch {2 if q else 8})",
              PYTHIA, 2 if q else 8,
              2 if q else 8, 16 if q else 128, 1),
        dict(
            name=f"audit TinyMem ({16 if q else 64} sequences, 50+50 tokens, batch {8 if q else 64}), teacher-forced",
            key="sequences_per_second", unit="sequences/s", higher_better=True, check="audit",
            lethe=["bench", "audit", "--model", TINYMEM, "--single-pass-only", *audit_args, "--json"],
            peer=["bench/infer_torch.py", "audit-tf", "--model", TINYMEM, *audit_args],
        ),
        dict(
            name=f"audit Pythia-70m shape ({16 if q else 64} sequences, 32+48 tokens, batch {8 if q else 64}), teacher-forced",
            key="sequences_per_second", unit="sequences/s", higher_better=True, check="audit",
            lethe=["bench", "audit", "--shape", "pythia70m", "--model", PYTHIA, "--single-pass-only",
                   *audit_args, "--json"],
            peer=["bench/infer_torch.py", "audit-tf", "--definition", "pythia", "--model", PYTHIA,
                  *audit_args],
        ),
        dict(
            name="BalancedSubnet step (TinyMem shape, 32 x 150)", key="seconds_per_step",
            unit="s/step", higher_better=False, check=None,
            lethe=["bench", "unlearn", *steps, "--json"],
            peer=["bench/unlearn_torch.py", *steps],
        ),
        dict(
            name="train step (TinyMem shape, 32 x 150)", key="tokens_per_second",
            unit="tokens/s", higher_better=True, check=None,
            lethe=["bench", "train", "--layers", "4", "--batch", "32", *steps, "--json"],
            peer=["bench/train_torch.py", "--layers", "4", "--batch", "32", *steps],
        ),
    ]


def sh(cmd: list[str], env=None, timeout=None) -> str:
    return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                          timeout=timeout).stdout


def build_lethe() -> str:
    """Builds and copies the binary. A target directory shared between worktrees (one
    CARGO_TARGET_DIR for several checkouts) can leave another tree's `release/lethe` in place
    while cargo reports this tree fresh; then the sources' mtimes are bumped and it rebuilds."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    dst = os.path.join(ROOT, "target", "bench-peer", "lethe")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    for attempt in range(3):
        print("building lethe (cargo build --release --locked) ...", flush=True)
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
        shutil.copy2(os.path.join(target, "release", "lethe"), dst)
        probe = subprocess.run([dst, "bench", "score", "--help"], capture_output=True)
        if probe.returncode == 0:  # `bench score` exists only in trees that have this driver
            return dst
        print("release/lethe is not this tree's build; touching the sources", flush=True)
        for f in ("src/main.rs", "src/lib.rs"):
            os.utime(os.path.join(ROOT, f))
    sys.exit("could not get this tree's lethe binary out of the shared target directory")


def peer_python() -> str:
    py = os.environ.get("LETHE_BENCH_PYTHON")
    if py:
        return py
    venv = os.path.join(ROOT, ".venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        print("creating .venv and installing bench/requirements.txt ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-r", os.path.join(ROOT, "bench",
                                                                       "requirements.txt")],
                       check=True)
    return py


def machine(py: str, lethe: str) -> dict:
    lscpu = sh(["lscpu"])
    field = lambda k: next((l.split(":", 1)[1].strip() for l in lscpu.splitlines()
                            if l.startswith(k + ":")), None)
    versions = json.loads(sh([py, "-c", "import json, torch, transformers, sys; print(json.dumps("
                              "{'torch': torch.__version__, 'transformers': transformers.__version__,"
                              " 'python': sys.version.split()[0]}))"]))
    return {
        "cpu": field("Model name"),
        "cpus": os.cpu_count(),
        "flags_avx512f": "avx512f" in (field("Flags") or ""),
        "kernel": platform.release(),
        "rustc": sh(["rustc", "--version"]).strip(),
        "lethe": sh([lethe, "--version"]).strip(),
        **versions,
    }


def run_one(argv: list[str], env: dict, timeout: int) -> dict:
    load = os.getloadavg()[0]
    t = time.perf_counter()
    out = sh(argv, env=env, timeout=timeout)
    res = json.loads(out.strip().splitlines()[-1])
    res["_process_seconds"] = time.perf_counter() - t
    res["_loadavg_1m_before"] = load
    return res


def check(kind, lethe_runs, peer_runs) -> str:
    if kind is None:
        return "n/a (own init)"
    l, p = lethe_runs[-1], peer_runs[-1]
    if kind == "decode":
        a, b = l["first_row_tokens"], p["first_row_tokens"]
        same = sum(x == y for x, y in zip(a, b))
        return "same tokens" if a == b else f"{same}/{len(a)} tokens agree"
    if kind == "score":
        d = abs(l["mean_nll"] - p["mean_nll"]) / abs(p["mean_nll"])
        return f"NLL rel. diff {d:.1e}"
    if kind == "audit":
        return f"memorized {l['memorized']} / {p['memorized']}"
    return ""


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, small sizes")
    ap.add_argument("--runs", type=int, default=None, help="rounds per row (default 5; quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only rows whose name contains this")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per process")
    a = ap.parse_args()
    runs = a.runs or (1 if a.quick else 5)
    if not a.quick and runs < 5:
        sys.exit("a full run needs --runs >= 5")
    start = time.perf_counter()
    lethe = build_lethe()
    py = peer_python()
    info = machine(py, lethe)
    sh([py, "bench/make_pythia_random.py", PYTHIA])
    threads = str(a.threads)
    lethe_env = {**os.environ, "RAYON_NUM_THREADS": threads}
    lethe_env.pop("LETHE_THREADS", None)
    peer_env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    print(f"machine: {info}\nrounds per row: {runs}, threads: {threads}", flush=True)

    results = []
    for row in rows(a.quick):
        if a.only and a.only not in row["name"]:
            continue
        lethe_argv = [lethe, "--threads", threads, *row["lethe"]]
        peer_argv = [py, *row["peer"], "--threads", threads]
        lr, pr = [], []
        for i in range(runs):
            order = [("lethe", lethe_argv, lethe_env, lr), ("peer", peer_argv, peer_env, pr)]
            if i % 2 == 1:
                order.reverse()
            for who, argv, env, acc in order:
                res = run_one(argv, env, a.timeout)
                acc.append(res)
                print(f"  {row['name']:<52} round {i + 1} {who:<5} {res[row['key']]:.4g} "
                      f"{row['unit']} (load {res['_loadavg_1m_before']:.1f})", flush=True)
        lm = statistics.median(r[row["key"]] for r in lr)
        pm = statistics.median(r[row["key"]] for r in pr)
        ratio = lm / pm if row["higher_better"] else pm / lm
        results.append({
            "row": row["name"], "unit": row["unit"], "key": row["key"],
            "lethe_median": lm, "peer_median": pm, "ratio": ratio,
            "meets_target": ratio >= TARGET_RATIO, "check": check(row["check"], lr, pr),
            "lethe_cmd": " ".join(["lethe", *lethe_argv[1:]]),
            "peer_cmd": " ".join(["python", *peer_argv[1:]]),
            "lethe_runs": lr, "peer_runs": pr,
        })

    wall = time.perf_counter() - start
    loads = [r["_loadavg_1m_before"] for x in results for r in x["lethe_runs"] + x["peer_runs"]]
    lines = [
        "| row | lethe (median) | transformers (median) | unit | lethe speed / peer | "
        f">= {TARGET_RATIO}x | same weights check |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['row']} | {fmt(r['lethe_median'])} | {fmt(r['peer_median'])} | "
                     f"{r['unit']} | {r['ratio']:.2f}x | {'yes' if r['meets_target'] else 'no'} | "
                     f"{r['check']} |")
    footer = (f"\n{runs} round(s) per row, {threads} threads each side; machine: {info['cpu']}, "
              f"{info['cpus']} CPUs; {info['rustc']}; torch {info['torch']}, transformers "
              f"{info['transformers']}, Python {info['python']}; 1-minute load average before the "
              f"processes {min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f}); "
              f"wall time of the whole run {wall:.0f} s.")
    table = "\n".join(lines) + "\n" + footer + "\n"
    print("\n" + table)
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    with open(os.path.join(ROOT, "target", "bench-peer.md"), "w") as f:
        f.write(table)
    with open(os.path.join(ROOT, "target", "bench-peer.json"), "w") as f:
        json.dump({"machine": info, "rounds": runs, "threads": a.threads, "quick": a.quick,
                   "wall_seconds": wall, "rows": results}, f, indent=1)
    print("wrote target/bench-peer.md and target/bench-peer.json")


if __name__ == "__main__":
    main()
