"""Held-out data: the spec's held-out texts and RL prompts (their loss: ruyi_core.family.loss)."""
from __future__ import annotations

from pathlib import Path


def heldout_texts(spec, work: Path, store=None) -> list[str]:
    """`data.heldout`: pretrain-kind sources (ruyi_core.data.sources), never trained on."""
    return [r["text"] for r in _read(spec, "heldout", "pretrain", work, store)]


def heldout_prompts(spec, work: Path, store=None) -> list[dict]:
    """`data.rl_heldout`: rl-kind sources, the first `rl.heldout_prompts` of them."""
    return _read(spec, "rl_heldout", "rl", work, store)[: spec.rl.heldout_prompts]


def _read(spec, field: str, kind: str, work: Path, store) -> list[dict]:
    from ruyi_core.data.reader import read_corpus
    from ruyi_core.data.sources import demo_sizes, resolve

    paths = resolve(getattr(spec.data, field), field, work / field, label=f"data.{field}", store=store,
                    seed=spec.data.seed, demo_sizes=demo_sizes(spec))
    return list(read_corpus(paths, kind).records)
