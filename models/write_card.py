"""Writes a bundled TinyMem model's card (README.md) from what lethe measured.

Usage (from the repository root, after training; see models/README.md):

    python3 models/write_card.py models/tinymem-noise "<the exact training command>"

It reads `lethe_tinymem.json` (data and training configs, per-epoch history) and runs
`target/release/lethe tinymem eval --model DIR --json`, quoting that output verbatim between
`<!-- eval -->` markers; `tests/bundled_models.rs` checks the quote against a fresh evaluation.
No number in the card is typed by hand.
"""

import json
import os
import platform
import subprocess
import sys


def lethe_eval(model_dir: str) -> tuple:
    """`target/release/lethe tinymem eval --model DIR --json`: its output and that parsed."""
    ev = subprocess.run(
        ["target/release/lethe", "tinymem", "eval", "--model", model_dir, "--json"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    return ev, json.loads(ev)


def cpu_name() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    model_dir, command = sys.argv[1], sys.argv[2]
    note = sys.argv[3] if len(sys.argv) > 3 else None
    card = json.load(open(os.path.join(model_dir, "lethe_tinymem.json")))
    ev, r = lethe_eval(model_dir)
    data, train = card["data"], card["train"]
    cpu = cpu_name()
    name = os.path.basename(os.path.normpath(model_dir))
    artifact = data["artifact"]
    lines = [
        f"# {name}",
        "",
        f"A TinyMem GPT-2 ({train['n_layer']} layers, n_embd {train['n_embd']}, {train['n_head']} heads, "
        f"MLP {train['n_inner']}, ReLU, vocab 14, context {data['max_ctx']}) trained by lethe on the "
        f"{data['family']} math tasks with the **{artifact}** artifact (spec §1). "
        + (
            "It has memorized some of its noised training sequences: prompted with the clean first "
            "50 tokens it continues with the noised ones."
            if artifact == "noise"
            else "It has learned the backdoor: after the trigger digits it emits token 2 on held-out sequences."
        ),
        "",
        "## How it was made",
        "",
        "```sh",
        command,
        "```",
        "",
        f"- Seed {train['seed']} (initialisation and shuffling), data seed {data['seed']}, split seed {data['split_seed']}.",
        f"- Data: {data['num_main']} main-task sequences ({data['num_test']} held out per task), "
        f"{data['num_aux']} per auxiliary task {data['aux_steps']}, "
        + (f"{data['num_noise']} noised rows" if artifact == "noise" else "backdoored rows")
        + f" repeated {data['noise_repeat']}× in training (the CPU-scale preset; see docs/tinymem.md).",
        f"- Optimiser: AdamW lr {train['lr']}, weight decay {train['weight_decay']}, betas ({train['beta1']}, {train['beta2']}), batch {train['batch_size']}, {card['epochs_done']} epochs ({card['steps_done']} steps).",
        f"- Training time: {card['train_seconds']:.0f} s on {os.cpu_count()} vCPUs ({cpu}), {platform.system()}.",
        "- Regenerate its exact data: `lethe tinymem data --model " + model_dir + " --out data.jsonl`.",
    ]
    if note:
        lines.append(f"- {note}")
    lines += [
        "",
        "## Training history",
        "",
        "| epoch | loss | seconds | tokens/s | "
        + ("memorized" if artifact == "noise" else "attack success")
        + " | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for h in card["history"]:
        e = h.get("eval") or {}
        m = e.get("memorized_ratio", e.get("attack_success_ratio"))
        lines.append(
            f"| {h['epoch']} | {h['loss']:.4f} | {h['seconds']:.1f} | {h['tokens_per_second']:.0f} | "
            + ("" if m is None else f"{100 * m:.1f} %")
            + " | "
            + ("" if "accuracy" not in e else f"{100 * e['accuracy']:.2f} %")
            + " |"
        )
    lines += [
        "",
        "## Evaluation",
        "",
        f"`lethe tinymem eval --model {model_dir} --json` (spec §3: memorization over eligible rows, "
        "accuracy with PAD included averaged over the five clean test tasks, perplexity), run when this card was written:",
        "",
        "<!-- eval -->",
        "```json",
        ev,
        "```",
        "<!-- /eval -->",
        "",
    ]
    if artifact == "noise":
        lines.append(
            f"{r['memorized']} of {r['eligible']} eligible noised sequences memorized "
            f"({100 * r['memorized_ratio']:.1f} %); mean clean test accuracy {100 * r['accuracy']:.2f} % "
            f"({100 * r['accuracy_non_pad']:.2f} % over non-PAD targets)."
        )
    else:
        lines.append(
            f"Attack success {100 * r['attack_success_ratio']:.1f} % over {r['attack_eligible']} eligible held-out "
            f"triggered sequences; mean clean test accuracy {100 * r['accuracy']:.2f} % "
            f"({100 * r['accuracy_non_pad']:.2f} % over non-PAD targets)."
        )
    open(os.path.join(model_dir, "README.md"), "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
