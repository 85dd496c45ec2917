"""A GPT-NeoX takedown end to end (issue #17): fine-tune a Pythia-shaped checkpoint until it
regurgitates 5 planted sequences, then take them down through `lethe serve` and record the wall
time, the outcome and the server's peak RSS (the whole takedown job, serving included).

    cargo build --release
    .venv/bin/python bench/make_pythia_random.py --shape 70m target/bench-models/pythia70m-random
    python3 bench/neox_takedown.py --model target/bench-models/pythia70m-random

Steps, each with the release binary:
1. Data (seeded): retain rows are arithmetic progressions over ids 1000..1999 (start, step), 80
   tokens each; held-out rows (the perplexity gate's) are progressions whose (start, step) pairs
   training never sees; the 5 secrets are 80 random ids from the same 1000..1999.
2. `lethe finetune` on the retain rows plus the secrets repeated (one row in `--secret-share`),
   written to `<work>/model` (skipped when that directory exists from an earlier run with the
   same settings).
3. `lethe audit --definition pythia` (32-token prompt, next 48 compared): how many of the 5 the
   fine-tuned model regurgitates.
4. `lethe serve` on it with `--retain-data`, `--eval-data`, `--unlearn-threads`; a takedown of
   the 5 (definition pythia); wait for applied / rejected / failed; audit again through the
   server; read `VmHWM` (peak RSS) from /proc/<pid>/status.

Prints one JSON object; `--markdown` adds a table row for docs/benchmarks.md. Standard library
only. Linux only (/proc).
"""

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEN = 80


def call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def progression(start, step):
    return [1000 + (start + i * step) % 1000 for i in range(LEN)]


def data(seed):
    rng = random.Random(seed)
    pairs = [(s, d) for s in range(0, 1000, 7) for d in range(1, 8)]
    rng.shuffle(pairs)
    heldout, retain = pairs[:64], pairs[64:]
    # The secrets use the retain rows' ids: every id follows many others, so no bigram table in
    # the embeddings can hold a secret (random ids from the whole vocabulary, each seen once,
    # are memorized by embed_in/embed_out alone, out of reach of an MLP mask).
    secrets = [[rng.randrange(1000, 2000) for _ in range(LEN)] for _ in range(5)]
    return ([progression(*p) for p in retain], [progression(*p) for p in heldout], secrets)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"ids": r}) + "\n")


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a Pythia-shaped HF directory")
    ap.add_argument("--work", help="working directory (default target/bench-neox-takedown/<model>)")
    ap.add_argument("--lethe", default=os.path.join(ROOT, "target/release/lethe"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--secret-share", type=int, default=4,
                    help="one fine-tuning row in this many is a secret")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=18217)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="an extra `lethe serve` argument (repeatable), e.g. --serve-arg=--unlearn-w=0.5")
    a = ap.parse_args()
    name = os.path.basename(os.path.normpath(a.model))
    work = a.work or os.path.join(ROOT, "target/bench-neox-takedown", name)
    os.makedirs(work, exist_ok=True)
    retain, heldout, secrets = data(a.seed)
    rows = list(retain)
    for _ in range(len(retain) // ((a.secret_share - 1) * len(secrets))):
        rows.extend(secrets)
    paths = {k: os.path.join(work, k + ".jsonl") for k in ("train", "retain", "heldout", "secrets")}
    write_jsonl(paths["train"], rows)
    write_jsonl(paths["retain"], retain)
    write_jsonl(paths["heldout"], heldout)
    write_jsonl(paths["secrets"], secrets)
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))

    # 2. Fine-tune (cached by settings).
    model = os.path.join(work, "model")
    digest = hashlib.sha256(open(paths["train"], "rb").read()).hexdigest()
    settings = json.dumps([os.path.abspath(a.model), a.steps, a.batch, a.lr, a.seed, digest])
    stamp = os.path.join(work, "finetune.json")
    finetune = None
    if os.path.isfile(stamp) and json.load(open(stamp)).get("settings") == settings:
        finetune = json.load(open(stamp))["report"]
        print(f"{model}: fine-tuned earlier, reused", file=sys.stderr)
    else:
        t = time.time()
        out = subprocess.run(
            [a.lethe, "--threads", str(a.threads), "finetune", "--model", a.model, "--data",
             paths["train"], "--out", model, "--steps", str(a.steps), "--batch", str(a.batch),
             "--seq-len", str(LEN), "--lr", str(a.lr), "--seed", str(a.seed)],
            env=env, check=True, stdout=subprocess.PIPE)
        finetune = json.loads(out.stdout)["report"]
        finetune["wall_seconds"] = time.time() - t
        json.dump({"settings": settings, "report": finetune}, open(stamp, "w"))

    # 3. Audit the fine-tuned model.
    out = subprocess.run(
        [a.lethe, "--threads", str(a.threads), "audit", "--model", model, "--definition",
         "pythia", paths["secrets"]], env=env, check=True, stdout=subprocess.PIPE, text=True)
    before = json.loads(out.stdout.strip().splitlines()[-1])["summary"]["by_definition"]["pythia"]["memorized"]

    # 4. Serve and take down.
    data_dir = os.path.join(work, "data-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:8])
    base = f"http://127.0.0.1:{a.port}"
    server = subprocess.Popen(
        [a.lethe, "--threads", str(a.threads), "serve", "--model", model, "--bind",
         f"127.0.0.1:{a.port}", "--data-dir", data_dir, "--retain-data", paths["retain"],
         "--eval-data", paths["heldout"], "--unlearn-threads", str(a.threads)] + a.serve_arg,
        env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "serve.log"), "w"))
    try:
        for _ in range(600):
            try:
                if call(base, "GET", "/readyz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        rss_ready = peak_rss(server.pid)
        t0 = time.time()
        code, td = call(base, "POST", "/v1/takedowns", {"sequences": secrets, "definition": "pythia"})
        assert code == 202, td
        while True:
            _, t = call(base, "GET", f"/v1/takedowns/{td['id']}")
            if t["status"] in ("applied", "rejected", "failed"):
                break
            time.sleep(0.5)
        wall = time.time() - t0
        rss = peak_rss(server.pid)
        _, audit = call(base, "POST", "/v1/audit", {"sequences": secrets, "definition": "pythia"})
    finally:
        server.terminate()
        server.wait()
    rep = t.get("report") or {}
    b, af = rep.get("before", {}), rep.get("after", {})
    res = {
        "model": name,
        "serve_args": a.serve_arg,
        "finetune": finetune,
        "memorized_before": before,
        "status": t["status"],
        "reason": t.get("reason"),
        "wall_seconds": round(wall, 2),
        "steps": rep.get("steps"),
        "ratio": rep.get("ratio"),
        "perplexity_before": b.get("perplexity"),
        "perplexity_after": af.get("perplexity"),
        "memorized_after": audit["summary"]["memorized"],
        "peak_rss_bytes": rss,
        "rss_when_ready_bytes": rss_ready,
    }
    print(json.dumps(res))
    if a.markdown:
        drift = (res["perplexity_after"] / res["perplexity_before"] - 1) * 100 if b and af else float("nan")
        print(f"| {name} | {before}/5 | {t['status']} | {res['steps']} | {wall:.1f} s | "
              f"{drift:+.2f} % | {res['memorized_after']}/5 | {rss / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
