"""Adaptive routing over a family's tiers (the model `FAMILY:auto`): a request is answered by the shallowest tier
whose answer is confident enough and escalates to the next deeper tier otherwise; the deepest tier always
answers. An answer's confidence is the lowest probability its tier gave any of its tokens (one unsure token is
where small models go wrong). Per request, in the spirit of CALM's per-token exits, so every answer is exactly
one tier's own answer.

Compute is counted in block-tokens: a tier of depth d that reads a prompt of n tokens and writes m costs
d * (n + m); an escalated request pays for every tier it tried. `calibrate` measures, on held-out questions,
every tier's answers once and then the whole quality-versus-compute curve of one shared threshold, and picks
the cheapest point within `tolerance` of the deepest tier's quality."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ruyi_core.serve.decode import generate
from ruyi_core.serve.tiers import ServedFamily


@dataclass
class Attempt:
    tier: str
    tokens: list[int]
    confidence: float
    cost: int  # block-tokens


def attempts_batched(served: ServedFamily, tier: str, prompts: list[list[int]], max_new_tokens: list[int],
                     batch: int = 16) -> list[Attempt]:
    """One tier's answers to many prompts, decoded `batch` at a time (left-padded: the same answers as one by
    one up to float rounding in near-ties), with each answer's confidence and cost."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk, conf = prompts[i:i + batch], []
        toks = generate(served.tiers[tier], chunk, max_new_tokens[i:i + batch], served.eos, confidence=conf)
        out += [Attempt(tier, t, min(c, default=1.0), served.depth(tier) * (len(p) + len(t)))
                for p, t, c in zip(chunk, toks, conf)]
    return out


def answer(served: ServedFamily, prompts: list[list[int]], max_new_tokens: list[int],
           threshold: float) -> list[Attempt]:
    """The answering attempt per prompt: every tier, shallowest first, decodes the prompts still open; an
    answer whose confidence reaches `threshold` (or the deepest tier's) closes its prompt."""
    done: dict[int, Attempt] = {}
    pending = list(range(len(prompts)))
    for tier in served.tiers:
        got = attempts_batched(served, tier, [prompts[i] for i in pending], [max_new_tokens[i] for i in pending],
                               batch=len(pending))
        still = []
        for i, a in zip(pending, got):
            if a.confidence < threshold and tier != served.deepest:
                still.append(i)
            else:
                done[i] = a
        if not (pending := still):
            break
    return [done[i] for i in range(len(prompts))]


def route(per_tier: list[Attempt], threshold: float) -> tuple[int, int]:
    """(index of the answering tier, cost) for one question whose every tier's attempt is known."""
    cost = 0
    for i, a in enumerate(per_tier):
        cost += a.cost
        if a.confidence >= threshold or i == len(per_tier) - 1:
            return i, cost
    raise ValueError("no tiers")


def curve(attempts: list[list[Attempt]], correct: list[list[bool]]) -> list[dict]:
    """Quality and compute (relative to always asking the deepest tier) at every threshold that changes a
    decision, from 0 (the shallowest tier always answers) to above 1 (the deepest always does)."""
    deep = sum(a[-1].cost for a in attempts)
    cuts = sorted({a.confidence for per in attempts for a in per[:-1]} | {0.0, 1.01})
    points = []
    for t in cuts:
        routed = [route(per, t) for per in attempts]
        quality = sum(c[i] for (i, _), c in zip(routed, correct)) / len(attempts)
        share = {}
        for i, _ in routed:
            share[attempts[0][i].tier] = share.get(attempts[0][i].tier, 0) + 1 / len(attempts)
        points.append({"threshold": round(t, 6), "quality": round(quality, 4),
                       "compute": round(sum(c for _, c in routed) / deep, 4),
                       "answered_by": {k: round(v, 3) for k, v in share.items()}})
    return points


def calibrate(served: ServedFamily, questions: list[tuple[list[int], Callable[[str], bool]]],
              max_new_tokens: int = 32, tolerance: float = 0.02) -> dict:
    """Thresholds from held-out (prompt ids, is-this-answer-right) pairs: the curve, every tier's own
    quality, and the operating point (the cheapest within `tolerance` of the deepest tier's quality)."""
    tok = served.tokenizer
    prompts = [p for p, _ in questions]
    per_tier = {t: attempts_batched(served, t, prompts, [max_new_tokens] * len(prompts)) for t in served.tiers}
    attempts = [[per_tier[t][i] for t in served.tiers] for i in range(len(prompts))]
    correct = [[ok(tok.decode(a.tokens, skip_special_tokens=True)) for a in per]
               for (_, ok), per in zip(questions, attempts)]
    points = curve(attempts, correct)
    tiers = {t: round(sum(c[i] for c in correct) / len(correct), 4) for i, t in enumerate(served.tiers)}
    target = tiers[served.deepest] - tolerance
    good = [p for p in points if p["quality"] >= target] or [max(points, key=lambda p: p["quality"])]
    chosen = min(good, key=lambda p: (p["compute"], -p["quality"]))
    return {"rule": "min token probability >= threshold, shallowest tier first", "tolerance": tolerance,
            "questions": len(questions), "tier_quality": tiers, "operating_point": chosen, "curve": points}
