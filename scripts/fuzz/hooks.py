"""Schemathesis hooks for fuzzing `lethe serve` on the bundled TinyMem model.

Loaded through SCHEMATHESIS_HOOKS by scripts/fuzz/run. Three jobs:

1. Reach the model. The contract types prompts as any string, and almost every random string
   holds a character outside TinyMem's 14-symbol vocabulary (`0`-`9`, `^`, `$`, space, `_`; see
   src/tinymem/vocab.rs), so it is answered 400 before the engine sees it. Many generated cases
   get their prompts, sequences and token ids redrawn from the vocabulary instead: number
   sequences like the training data (`^1840 1847 1854 ...`), the memorized README prompt, and
   free strings over the 14 symbols.
2. Huge numbers at every numeric field (2^64 - 1, 2^64, 1e300, -1, ...), which must be answered
   400 naming the field, never 500.
3. Keep the run short: generation lengths, choices and list sizes that pass validation are
   clamped, so the fuzz run does not turn into a generation benchmark.

Schemathesis revalidates a case after a hook changes it, so a case made invalid by a huge value
counts as negative (it must be rejected) and one made valid counts as positive.

Every response's status is tallied per operation; the tally is written as JSON to
$LETHE_FUZZ_TALLY at exit for the runner to print.
"""

from __future__ import annotations

import atexit
import copy
import json
import os
import re
import threading
from collections import defaultdict

import schemathesis
from hypothesis import strategies as st

VOCAB = "0123456789^$ _"
MEMORIZED = "^1840 1847 1854 1861 1868 1875 1882 1889 1896 1903"
VOCAB_SIZE = 14
# Values no numeric field may take: each must be answered 400 naming the field.
HUGE = [
    18446744073709551615,  # 2^64 - 1 (fits usize: must still be bounded)
    18446744073709551616,  # 2^64
    9223372036854775808,  # 2^63 (one past i64)
    -9223372036854775809,
    4294967296,  # 2^32 (one past u32)
    1e300,
    -1e300,
    1e20,
    -1,
    1.5,
]
MAX_TOKENS = 8  # generation length kept for cases that pass validation
MAX_N = 3
MAX_LIST = 4


def sequence_text(start: int, step: int, count: int, eos: bool) -> str:
    """A TinyMem-style training row: `^a a+s a+2s ...` (optionally ending in `$`)."""
    return "^" + " ".join(str(start + i * step) for i in range(count)) + ("$" if eos else "")


def vocab_text(min_count: int = 1, max_count: int = 12) -> st.SearchStrategy[str]:
    """Text the tokenizer accepts, mostly shaped like the model's training data."""
    rows = st.builds(
        sequence_text,
        st.integers(0, 3000),
        st.integers(1, 20),
        st.integers(min_count, max_count),
        st.booleans(),
    )
    free = st.text(alphabet=VOCAB, min_size=max(1, min_count), max_size=max_count * 4)
    return st.one_of(rows, rows, free, st.just(MEMORIZED))


token_ids = st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=40)
huge = st.sampled_from(HUGE)
# Definitions whose k + n fits the bundled model's 150-token context, and some that do not.
definitions = st.one_of(
    st.builds(lambda k, n: f"k={k},n={n}", st.integers(1, 12), st.integers(1, 12)),
    st.sampled_from(
        [
            "tinymem",
            "pythia",
            "carlini",
            "k=18446744073709551615,n=1",
            "k=1,n=18446744073709551616",
            "k=100,n=100",
        ]
    ),
)


def _operation(ctx) -> tuple[str, str]:
    op = ctx.operation
    return (op.method.upper(), op.path) if op is not None else ("", "")


def _clamp(body: dict, key: str, most: int) -> None:
    v = body.get(key)
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v and v > most:
        body[key] = most


def _completions(body: dict, draw) -> None:
    if draw(st.integers(0, 3)) > 0:
        body["prompt"] = draw(
            st.one_of(
                vocab_text(),
                st.lists(vocab_text(), min_size=1, max_size=MAX_LIST),
                token_ids,
                st.lists(token_ids, min_size=1, max_size=MAX_LIST),
            )
        )
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) > MAX_LIST:
        if all(isinstance(p, (str, list)) for p in body["prompt"]):
            body["prompt"] = body["prompt"][:MAX_LIST]
    _clamp(body, "max_tokens", MAX_TOKENS)
    _clamp(body, "n", MAX_N)
    if "model" in body and draw(st.booleans()):
        body["model"] = draw(st.sampled_from(["tinymem-noise", None]))
    if draw(st.integers(0, 2)) == 0:
        field = draw(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "logprobs", "prompt"]))
        if field == "prompt":
            ids = draw(token_ids)
            ids[draw(st.integers(0, len(ids) - 1))] = draw(huge)
            body["prompt"] = ids
        else:
            body[field] = draw(huge)


def _tokenize(body: dict, draw) -> None:
    if draw(st.integers(0, 2)) > 0:
        body["prompt"] = draw(vocab_text(0, 20))


def _detokenize(body: dict, draw) -> None:
    if draw(st.integers(0, 2)) > 0:
        body["tokens"] = draw(token_ids)
    if draw(st.integers(0, 2)) == 0 and isinstance(body.get("tokens"), list) and body["tokens"]:
        body["tokens"][draw(st.integers(0, len(body["tokens"]) - 1))] = draw(huge)


def _sequences(body: dict, draw, key: str) -> None:
    """Audit and takedown sequences that fit their definition (k + n tokens) most of the time."""
    if draw(st.integers(0, 3)) > 0:
        body["definition"] = draw(definitions)
        seq = st.one_of(
            vocab_text(6, 30),
            st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=6, max_size=60),
        )
        if key == "audit":
            seq = st.one_of(
                seq,
                st.builds(lambda p, t: {"prompt_ids": p, "target_ids": t}, token_ids, token_ids),
                st.builds(lambda t: {"text": t}, vocab_text(6, 30)),
            )
        body["sequences"] = draw(st.lists(seq, min_size=1, max_size=MAX_LIST))
    elif isinstance(body.get("sequences"), list):
        body["sequences"] = body["sequences"][:MAX_LIST]
    if draw(st.integers(0, 3)) == 0:
        ids = draw(token_ids)
        ids[draw(st.integers(0, len(ids) - 1))] = draw(huge)
        body["sequences"] = [ids]


@schemathesis.hook
def flatmap_case(ctx, case):
    method, path = _operation(ctx)
    # Hypothesis may draw again for the same case (shrinking): start from the generated values.
    base_body = copy.deepcopy(case.body)
    base_query = dict(case.query or {})

    @st.composite
    def redraw(draw):
        body = copy.deepcopy(base_body)
        if isinstance(body, dict) and method == "POST":
            if path == "/v1/completions":
                _completions(body, draw)
            elif path == "/v1/tokenize":
                _tokenize(body, draw)
            elif path == "/v1/detokenize":
                _detokenize(body, draw)
            elif path == "/v1/audit":
                _sequences(body, draw, "audit")
            elif path == "/v1/takedowns":
                _sequences(body, draw, "takedowns")
            case.body = body
        elif method == "GET" and path == "/v1/takedowns" and draw(st.integers(0, 3)) == 0:
            query = dict(base_query)
            query["limit"] = str(draw(huge))
            case.query = query
        return case

    return redraw()


# Status codes per operation, for the runner's summary.
_TALLY: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
_LOCK = threading.Lock()


@schemathesis.hook
def after_call(ctx, case, response):
    key = f"{case.operation.method.upper()} {case.operation.path}"
    code = str(response.status_code)
    if response.status_code == 400:
        # Which field the 400s named, to see what the generated requests trip over.
        try:
            param = response.json()["error"]["param"]
            # Unknown parameters are named as sent: fold the random ones together.
            if param is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\[\]-]{0,40}", param):
                param = "(another name)"
            code = f"400 {param}"
        except Exception:
            code = "400 (no JSON error)"
    with _LOCK:
        _TALLY[key][code] += 1


@atexit.register
def _write_tally() -> None:
    path = os.environ.get("LETHE_FUZZ_TALLY")
    if path:
        with _LOCK, open(path, "w") as f:
            json.dump(_TALLY, f, indent=1, sort_keys=True)
