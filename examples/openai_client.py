"""The official OpenAI Python client against `lethe serve`.

    python3 -m venv .venv && .venv/bin/pip install openai
    cargo run --release -- serve &            # the bundled TinyMem model on 127.0.0.1:8080
    .venv/bin/python examples/openai_client.py --base-url http://127.0.0.1:8080/v1

Runs a greedy completion, a streamed one (checking it equals the plain text), a seeded sample
twice (checking it repeats), and a perplexity score via echo + max_tokens=0. Exits non-zero on
any mismatch. Not run by CI (it needs the `openai` package).
"""

import argparse
import math
import os
import sys

from openai import OpenAI

PROMPT = "^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("LETHE_API_KEY", "unused"))
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)

    model = client.models.list().data[0].id
    print("model:", model)

    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
    text = plain.choices[0].text
    print("greedy:", repr(text), "| version:", plain.system_fingerprint, "| usage:", plain.usage)

    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=20, temperature=0, stream=True
        )
        if chunk.choices
    )
    print("streamed:", repr(streamed))
    if streamed != text:
        print("MISMATCH: the stream differs from the plain completion", file=sys.stderr)
        return 1

    a, b = (
        client.completions.create(model=model, prompt="^5 7 9", max_tokens=16, seed=7, n=2)
        for _ in range(2)
    )
    samples = [c.text for c in a.choices]
    print("seeded samples:", samples)
    if samples != [c.text for c in b.choices]:
        print("MISMATCH: seeded sampling did not repeat", file=sys.stderr)
        return 1

    scored = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0
    )
    lps = scored.choices[0].logprobs.token_logprobs[1:]
    print("perplexity:", math.exp(-sum(lps) / len(lps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
