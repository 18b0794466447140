"""The demo world (`world.py`): a seeded synthetic corpus of facts, arithmetic and instructions, its held-out
evaluation sets and the answer sentence its rewards check. A spec reaches it only by naming `demo` as a data source
or `demo:<set>` as a benchmark; inside the library only the source resolver (ruyi_core.data.sources) imports it."""
from __future__ import annotations

from pathlib import Path

from ruyi_core.demo import world

EVAL_SETS = world.EVAL_SETS
# The demo's SFT answers end with this sentence; `rl.answer_pattern: demo` selects it for the rewards.
ANSWER_PATTERN = r"The answer is ([+-]?\d+)\."
# Records generated per corpus kind when a spec's data.demo_records leaves a kind out.
DEFAULT_SIZES = {"pretrain": 4000, "sft": 1500, "rl": 300, "rl_heldout": 128}


def write_source(entry: str, kind: str, out_dir: Path, seed: int, sizes: dict[str, int]) -> Path:
    """The JSONL file that the source `entry` (`demo` or `demo:<set>`) stands for, for corpus kind `kind`
    (pretrain, sft, rl, heldout, rl_heldout) or `benchmark`."""
    if entry.startswith("demo:"):
        name = entry.removeprefix("demo:")
        if name not in EVAL_SETS:
            raise ValueError(f"unknown demo set {entry!r}; known: {', '.join('demo:' + n for n in EVAL_SETS)}")
        return world.write_jsonl(out_dir / "eval" / f"{name}.jsonl", world.eval_sets(seed)[name])
    n = {**DEFAULT_SIZES, **sizes}
    records = {
        "pretrain": lambda: world.pretrain_records(n["pretrain"], seed),
        "sft": lambda: world.sft_records(n["sft"], seed),
        "rl": lambda: world.rl_records(n["rl"], seed),
        "heldout": lambda: [{"text": t, "source": "heldout", "lang": "en"} for t in world.heldout_texts(seed)],
        "rl_heldout": lambda: world.heldout_prompts(n["rl_heldout"], seed),
    }
    if kind not in records:
        raise ValueError(f"the demo world has no {kind!r} corpus; use demo:<set> for a benchmark")
    return world.write_jsonl(out_dir / f"{kind}.jsonl", records[kind]())


def tokenizer_texts(seed: int = 0):
    """Texts a preset's tokenizer is trained on when the demo world is the run's corpus."""
    for r in world.pretrain_records(3000, seed):
        yield r["text"]
    for r in world.sft_records(1000, seed):
        for m in r["messages"]:
            yield m["content"]
