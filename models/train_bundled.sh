#!/usr/bin/env bash
# Reproduces the bundled TinyMem models and their cards (run from the repository root).
# Training is deterministic: the same commands give the same weights on the same machine type.
set -euo pipefail
cargo build --release
lethe=target/release/lethe
noise_cmd="cargo run --release -- tinymem train --preset cpu --layers 4 --batch-size 64 --epochs 20 --seed 0 --out models/tinymem-noise"
backdoor_cmd="cargo run --release -- tinymem train --preset cpu --artifact backdoor --layers 4 --batch-size 64 --epochs ${BACKDOOR_EPOCHS:-15} --seed 0 --out models/tinymem-backdoor"
$lethe tinymem train --preset cpu --layers 4 --batch-size 64 --epochs 20 --seed 0 --out models/tinymem-noise
$lethe tinymem train --preset cpu --artifact backdoor --layers 4 --batch-size 64 --epochs "${BACKDOOR_EPOCHS:-15}" --seed 0 --out models/tinymem-backdoor
rm -f models/tinymem-noise/optimizer.safetensors models/tinymem-backdoor/optimizer.safetensors
python3 models/write_card.py models/tinymem-noise "$noise_cmd"
python3 models/write_card.py models/tinymem-backdoor "$backdoor_cmd"
# The language TinyMem: its corpus (Debian's python3.11-doc), then a GPT-NeoX on it.
scripts/corpus/fetch
lang_cmd="cargo run --release -- tinymem train --language --train-chunks 12000 --layers 2 --batch-size 32 --epochs 8 --eval-every 4 --checkpoint-every 4 --out models/tinymem-lang"
$lethe tinymem train --language --train-chunks 12000 --layers 2 --batch-size 32 --epochs 8 --eval-every 4 --checkpoint-every 4 --out models/tinymem-lang
python3 models/write_lang_card.py models/tinymem-lang "$lang_cmd"
