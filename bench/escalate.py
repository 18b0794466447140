"""`FAMILY:auto` escalation, restart against continuation, measured side by side in one run: per request, the
block-tokens and wall time of answering by restarting each deeper tier from scratch (each tier decodes the
prompt alone; the routing before continuation) and by continuing from the shallower tier's answer
(route.escalate), at several thresholds across the routing curve (the family's calibrated one when it has
one); every continued answer is checked to equal its restarted one.

    python bench/escalate.py [--family DIR | --registry FAMILY [--version V]] [--requests 40] [--max-tokens 24]
                             [--out bench/results/escalate.json]

With --registry, the store comes from the RUYI_S3_* environment (the local server: source .ruyi/s3/s3.env).
Without either: the micro preset with random weights, as the tests build it (its tiers are unsure, p ~ 0.01,
and rarely agree, so its drafts are mostly rejected: the worst case for continuation).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's randomize_, as the tests build the micro family

from ruyi_core.serve.decode import generate  # noqa: E402
from ruyi_core.serve.route import escalate  # noqa: E402


def micro_family(folder: Path) -> Path:
    from conftest import randomize_

    from ruyi_core.demo import tokenizer_texts
    from ruyi_core.family.convert import build_preset_base, family_from_base
    from ruyi_core.family.io import save_family

    base, tok = build_preset_base("micro", tokenizer_texts(), seed=0)
    save_family(randomize_(family_from_base(base, [0, 2, 3]), seed=5).eval(), tok, folder / "micro")
    return folder / "micro"


def restart(served, ids: list[int], n: int, threshold: float) -> tuple[str, list[int], int]:
    """Each tier from scratch, shallowest first, until one is sure enough: (tier, answer, block-tokens)."""
    cost = 0
    for tier, model in served.tiers.items():
        conf: list[list[float]] = []
        toks = generate(model, [ids], [n], served.eos, confidence=conf)[0]
        cost += served.depth(tier) * (len(ids) + len(toks) - 1)  # positions its blocks read
        if min(conf[0], default=1.0) >= threshold or tier == served.deepest:
            return tier, toks, cost
    raise ValueError("no tiers")


def compare(served, prompts: list[list[int]], n: int, threshold: float) -> dict:
    secs, cost, mix, same = [0.0, 0.0], [0, 0], {}, 0
    for j, ids in enumerate(prompts):
        order = (0, 1) if j % 2 == 0 else (1, 0)  # alternated, so the machine's drift hits both alike
        got = [None, None]
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                got[0] = restart(served, ids, n, threshold)
            else:
                a = escalate(served, ids, n, threshold)
                got[1] = (a.tier, a.tokens, a.cost)
            secs[which] += time.perf_counter() - t0
        cost[0], cost[1] = cost[0] + got[0][2], cost[1] + got[1][2]
        same += got[0][:2] == got[1][:2]
        mix[got[1][0]] = mix.get(got[1][0], 0) + 1
    k = len(prompts)
    return {"threshold": threshold, "answered_by": mix, "identical": same == k,
            "block_tokens_per_request": {"restart": cost[0] / k, "continue": cost[1] / k},
            "ms_per_request": {"restart": round(1e3 * secs[0] / k, 2), "continue": round(1e3 * secs[1] / k, 2)},
            "block_tokens_ratio": round(cost[1] / cost[0], 3), "time_ratio": round(secs[1] / secs[0], 3)}


def thresholds(served, prompts: list[list[int]], n: int) -> list[float]:
    """The calibrated threshold when there is one, and the shallowest tiers' answer confidences at their
    quartiles: from 'the shallowest tier answers nearly all' to 'nearly all escalate to the deepest'."""
    confs = []
    for model in list(served.tiers.values())[:-1]:
        got: list[list[float]] = []
        generate(model, prompts, [n] * len(prompts), served.eos, confidence=got)
        confs += [min(c, default=1.0) for c in got]
    confs.sort()
    points = {round(confs[int(q * (len(confs) - 1))], 6) for q in (0.25, 0.5, 0.75)} | {1.01}
    calibrated = (served.routing or {}).get("operating_point", {}).get("threshold")
    return sorted(points | ({calibrated} if calibrated is not None else set()))


def main() -> None:
    from serve import questions  # bench/serve.py: the demo world's held-out questions

    from ruyi_core.runtime import Runtime
    from ruyi_core.serve.cli import load_served
    from ruyi_core.serve.tiers import from_family

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path)
    ap.add_argument("--registry")
    ap.add_argument("--version", help="with --registry: this version (default: the promoted packages)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", default="bench/results/escalate.json")
    a = ap.parse_args()
    if a.registry:
        served = load_served(None, a.registry, a.version, None, print)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            family = a.family or micro_family(Path(tmp))
            served = from_family(family, Runtime(torch.device("cpu"), torch.float32))
    tok = served.tokenizer
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False))["input_ids"] for _, q, _ in questions(a.requests)]
    prompts = prompts[: a.requests]
    rows = [compare(served, prompts, a.max_tokens, t) for t in thresholds(served, prompts, a.max_tokens)]
    print(f"{served.name}: tiers {', '.join(f'{t} ({served.depth(t)} blocks)' for t in served.tiers)}, "
          f"{len(prompts)} requests, {a.max_tokens} tokens at most, {torch.get_num_threads()} threads")
    print(f"{'threshold':>10} {'answered by':<28} {'block-tokens restart':>21} {'continue':>9} {'ratio':>6} "
          f"{'ms restart':>11} {'continue':>9} {'ratio':>6}  identical")
    for r in rows:
        bt, ms = r["block_tokens_per_request"], r["ms_per_request"]
        mix = ", ".join(f"{t} {c}" for t, c in r["answered_by"].items())
        print(f"{r['threshold']:>10.4g} {mix:<28} {bt['restart']:>21.1f} {bt['continue']:>9.1f} "
              f"{r['block_tokens_ratio']:>6.3f} {ms['restart']:>11.2f} {ms['continue']:>9.2f} "
              f"{r['time_ratio']:>6.3f}  {r['identical']}")
    out = {"family": served.name, "tiers": {t: served.depth(t) for t in served.tiers}, "requests": len(prompts),
           "max_tokens": a.max_tokens, "threads": torch.get_num_threads(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
