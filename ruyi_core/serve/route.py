"""Adaptive routing over a family's tiers (the model `FAMILY:auto`): a request is answered by the shallowest tier
whose answer is confident enough and escalates to the next deeper tier otherwise; the deepest tier always
answers. An answer's confidence is the lowest probability its tier gave any of its tokens (one unsure token is
where small models go wrong). Per request, in the spirit of CALM's per-token exits, so every answer is exactly
one tier's own answer.

Compute is counted in block-tokens: a tier of depth d that reads a prompt of n tokens and writes m costs
d * (n + m) on its own; an escalated request pays for every tier it tried, but a deeper tier continues from the
shallower one's answer (`escalate`): it does not read the trunk they share again. `calibrate` measures, on
held-out questions, every tier's answers once and then the whole quality-versus-compute curve of one shared
threshold, and picks the cheapest point within `tolerance` of the deepest tier's quality."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ruyi_core.serve.decode import Read, continue_reading, first_read, generate, shared_depth
from ruyi_core.serve.tiers import ServedFamily


@dataclass
class Attempt:
    tier: str
    tokens: list[int]
    confidence: float
    cost: int  # block-tokens
    draft: list[int] = field(default_factory=list)  # for a deeper tier to continue from: up to the first unsure token
    read: Read | None = None  # what was read of the prompt and draft, for a deeper tier elsewhere (`hand_depth`)


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


def escalate(served: ServedFamily, prompt: list[int], max_new_tokens: int, threshold: float,
             draft: list[int] | None = None, read: Read | None = None, hand_depth: int = 0) -> Attempt:
    """The answering attempt for one prompt: the shallowest tier answers first, and an answer whose confidence
    is below `threshold` (but the deepest tier's) is the next deeper tier's draft. That tier continues from
    it (decode.continue_reading) instead of starting over: it reuses the keys and values of the trunk the two
    share, checks the draft (the answer up to its first unsure token) in one pass and decodes on from the first
    token it would not have produced, so its answer is its own. The cost is the block-tokens every tier tried
    ran. A `draft` handed over (tokens only, by a server of shallower tiers) is the first tier's draft; the
    attempt's own `draft` is what a deeper tier elsewhere would continue from. `read`: what a server of
    shallower tiers read of the prompt and that draft (a trunk-state hand-off, handoff.py); `hand_depth`: keep
    what the deepest tier here reads at this depth, as the attempt's `read`, for a server of deeper tiers."""
    tiers = list(served.tiers.values())
    draft = draft or []
    read, cost = read or first_read(tiers[0], prompt + draft[:-1]), 0
    for i, (tier, model) in enumerate(served.tiers.items()):
        nxt = tiers[i + 1] if i + 1 < len(tiers) else None
        keep = shared_depth(model, nxt) if nxt is not None else hand_depth
        got = continue_reading(model, read, draft, max_new_tokens, served.eos, keep=max(keep, read.depth))
        cost += got.block_tokens
        confidence = min(got.confidence, default=1.0)
        # the draft ends at the first token this tier was unsure of: past it, its tokens follow a token it
        # doubted, and a deeper tier checking them mostly wastes its blocks (any draft gives the same answer)
        unsure = next((i for i, c in enumerate(got.confidence) if c < threshold), len(got.tokens) - 1)
        draft = got.tokens[:unsure + 1]
        if nxt is None or confidence >= threshold:
            handed = got.read.crop(len(prompt) + len(draft) - 1) if hand_depth and nxt is None else None
            return Attempt(tier, got.tokens, confidence, cost, draft, handed)
        read = got.read.crop(len(prompt) + len(draft) - 1)
        if keep < read.depth:  # a deeper tier that parts from this one below the reused trunk reads anew
            read = first_read(nxt, prompt + draft[:-1])
    raise ValueError("no tiers")


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
            "questions": len(questions), "tier_quality": tiers, "operating_point": chosen, "curve": points,
            "draft_acceptance": draft_acceptance(per_tier, served.deepest)}


def draft_acceptance(per_tier: dict[str, list[Attempt]], deepest: str) -> dict[str, float]:
    """Per shallower tier: the share of the deepest tier's answer tokens that its own greedy answer drafts, the
    common prefix a continued escalation or a self-speculation keeps. The more the tiers differ, the lower it is."""
    target = per_tier[deepest]
    total = sum(len(a.tokens) for a in target) or 1

    def kept(draft: list[int], want: list[int]) -> int:
        return next((i for i, (a, b) in enumerate(zip(draft, want)) if a != b), min(len(draft), len(want)))

    return {t: round(sum(kept(a.tokens, b.tokens) for a, b in zip(attempts, target)) / total, 4)
            for t, attempts in per_tier.items() if t != deepest}


# Ruyi2's smallest tier as a draft of its deepest: exit after block 2 of 40, its branch block and 3 DaE blocks
RUYI2_DRAFT = {"blocks": 6, "own": 4, "shared": 2, "target": 40}


def speculation_ceiling(k: int, draft_blocks: int, target_blocks: int, shared: int) -> float:
    """The speedup if every draft were accepted and a pass cost its blocks alone: k + 1 tokens a round for k draft
    steps (the shared trunk and the draft's own blocks it runs) and one check by the target's own blocks, against
    k + 1 steps of the whole target. A check over k + 1 positions counts as one step, as on a machine bound by
    weight reads."""
    return (k + 1) * target_blocks / (k * draft_blocks + target_blocks - shared)


def choose_draft(served: ServedFamily, prompts: list[list[int]], max_new_tokens: int = 32,
                 min_speedup: float = 1.05) -> dict | None:
    """The self-speculation policy that decodes the deepest tier fastest on this machine: each shallower tier
    drafting 8 tokens, whole or without its own blocks but one (DaE's added blocks), the cheapest also stopping a
    round at a token it doubts; timed against the deepest tier alone, interleaved prompt by prompt. None when no
    policy is `min_speedup` faster. The output is the deepest tier's own whatever is chosen."""
    import time

    from ruyi_core.serve.decode import speculative

    target = served.tiers[served.deepest]
    policies: list[tuple[str, int, int, float] | None] = [None]
    for tier in list(served.tiers)[:-1]:
        own = served.depth(tier) - max(shared_depth(served.tiers[tier], target), 0)
        policies += [(tier, 8, skip, 0.0) for skip in sorted({0, own - 1})] + [(tier, 8, own - 1, 0.3)]
    secs = dict.fromkeys(policies, 0.0)
    for j, p in enumerate(prompts):
        for policy in policies[j % len(policies):] + policies[: j % len(policies)]:
            start = time.perf_counter()
            if policy is None:
                generate(target, [p], [max_new_tokens], served.eos)
            else:
                tier, k, skip, p_min = policy
                speculative(served.tiers[tier], target, p, max_new_tokens, served.eos, k=k, skip=skip,
                            min_confidence=p_min)
            secs[policy] += time.perf_counter() - start
    best = min(policies[1:], key=secs.get, default=None)
    if best is None or secs[None] / secs[best] < min_speedup:
        return None
    tier, k, skip, _ = best
    shared = shared_depth(served.tiers[tier], target)
    ruyi2 = speculation_ceiling(k, RUYI2_DRAFT["blocks"] - min(skip, RUYI2_DRAFT["own"] - 1), RUYI2_DRAFT["target"],
                                RUYI2_DRAFT["shared"])
    return {"tier": tier, "tokens": k, "skip": skip, "min_p": best[3],
            "speedup": round(secs[None] / secs[best], 3), "prompts": len(prompts),
            "ceiling": round(speculation_ceiling(k, served.depth(tier) - skip, served.depth(served.deepest),
                                                 shared), 2),
            "ceiling_at_ruyi2_proportions": round(ruyi2, 2)}
