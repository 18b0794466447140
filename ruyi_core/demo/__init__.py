"""The demo's data: the world (`world.py`), a seeded synthetic corpus of facts, arithmetic and instructions that
teaches the chat skills, mixed in pretraining with real English text (`literature.py`, Shakespeare); their held-out
evaluation sets and the answer sentence the rewards check. A spec reaches it only by naming `demo` as a data source
or `demo:<set>` as a benchmark; inside the library only the source resolver (ruyi_core.data.sources) imports it."""
from __future__ import annotations

import random
from importlib import metadata
from pathlib import Path

from ruyi_core.codeversion import code_version
from ruyi_core.demo import literature, world

EVAL_SETS = (*world.EVAL_SETS, "literature")
# The demo's SFT answers end with this sentence; `rl.answer_pattern: demo` selects it for the rewards.
ANSWER_PATTERN = r"The answer is ([+-]?\d+)\."
# Records generated per corpus kind when a spec's data.demo_records leaves a kind out.
# Passages of literature: `literature` when given, else a quarter as many as the world's pretraining records
# (about a third of the tokens: the world's chat skills keep most of the budget).
DEFAULT_SIZES = {"pretrain": 4000, "sft": 1500, "rl": 300, "rl_heldout": 128}
HELDOUT_PASSAGES = 60  # passages of the held-out plays: the literature benchmark and part of the held-out text


def version() -> str:
    """What the generated corpora depend on besides the spec: this package's code and the text package it reads.
    A shard of `demo` carries it, so a changed world is curated and trained again, not taken from a cache."""
    try:
        text = metadata.version("shakespeare")
    except metadata.PackageNotFoundError:  # literature.py names the missing package when it is read
        text = ""
    return code_version(Path(__file__).parent, extra=text)


def write_source(entry: str, kind: str, out_dir: Path, seed: int, sizes: dict[str, int]) -> Path:
    """The JSONL file that the source `entry` (`demo` or `demo:<set>`) stands for, for corpus kind `kind`
    (pretrain, sft, rl, heldout, rl_heldout) or `benchmark`."""
    if entry.startswith("demo:"):
        name = entry.removeprefix("demo:")
        if name not in EVAL_SETS:
            raise ValueError(f"unknown demo set {entry!r}; known: {', '.join('demo:' + n for n in EVAL_SETS)}")
        records = ([{"text": t} for t in literature.heldout_passages(HELDOUT_PASSAGES)] if name == "literature"
                   else world.eval_sets(seed)[name])
        return world.write_jsonl(out_dir / "eval" / f"{name}.jsonl", records)
    n = {**DEFAULT_SIZES, **sizes}
    records = {
        "pretrain": lambda: _pretrain(n["pretrain"], n.get("literature", n["pretrain"] // 4), seed),
        "sft": lambda: world.sft_records(n["sft"], seed),
        "rl": lambda: world.rl_records(n["rl"], seed),
        "heldout": lambda: [{"text": t, "source": "heldout", "lang": "en"}
                            for t in world.heldout_texts(seed) + literature.heldout_passages(HELDOUT_PASSAGES)],
        "rl_heldout": lambda: world.heldout_prompts(n["rl_heldout"], seed),
    }
    if kind not in records:
        raise ValueError(f"the demo world has no {kind!r} corpus; use demo:<set> for a benchmark")
    return world.write_jsonl(out_dir / f"{kind}.jsonl", records[kind]())


def _pretrain(world_records: int, passages: int, seed: int) -> list[dict]:
    """The world's records and passages of the training works, shuffled together (a seeded order)."""
    out = world.pretrain_records(world_records, seed)
    out += [{"text": t, "source": "literature", "lang": "en"} for t in literature.training_passages(passages, seed)]
    random.Random(seed + 11).shuffle(out)
    return out


def tokenizer_texts(seed: int = 0):
    """Texts a preset's tokenizer is trained on when the demo's data is the run's corpus (training text only)."""
    for r in world.pretrain_records(3000, seed):
        yield r["text"]
    yield from literature.training_passages(2000, seed)
    for r in world.sft_records(1000, seed):
        for m in r["messages"]:
            yield m["content"]
