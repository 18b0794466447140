"""Held-out data: the spec's held-out texts and RL prompts (their loss: ruyi_core.family.loss)."""
from __future__ import annotations

from pathlib import Path


def heldout_texts(spec, work: Path) -> list[str]:
    """`data.heldout`: `demo` (the demo world's held-out problems) or pretrain-kind JSONL/Parquet files."""
    from ruyi_core.data import world
    from ruyi_core.data.reader import read_corpus

    texts = []
    for entry in spec.data.heldout:
        if entry == "demo":
            texts += world.heldout_texts(spec.data.seed)
        else:
            texts += [r["text"] for r in read_corpus([Path(entry)], "pretrain").records]
    return texts


def heldout_prompts(spec) -> list[dict]:
    """`data.rl_heldout`: `demo` (held-out arithmetic never seen in training) or rl-kind files."""
    from ruyi_core.data import world
    from ruyi_core.data.reader import read_corpus

    out = []
    for entry in spec.data.rl_heldout:
        if entry == "demo":
            out += world.heldout_prompts(spec.rl.heldout_prompts, spec.data.seed)
        else:
            out += list(read_corpus([Path(entry)], "rl").records)
    return out[: spec.rl.heldout_prompts]
