"""The joint multi-exit objective's weights over training: L(t) = sum_k lambda_k(t) * L_k."""
from __future__ import annotations

import math

from ruyi_core.errors import RuyiError
from ruyi_core.spec import LossSpec


def exit_weights(spec: LossSpec, n_exits: int, step: int, total_steps: int) -> list[float]:
    """lambda_k at `step` (0-based). The last exit keeps its weight; early exits warm up linearly from 0 over
    `warmup_steps`, then decay from their weight to weight * final_scale following `schedule`."""
    base = list(spec.weights) if spec.weights is not None else [1.0] * n_exits
    if len(base) != n_exits:
        raise RuyiError(f"train loss weights has {len(base)} entries for {n_exits} exits: give one per exit")
    frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if spec.schedule == "constant":
        decay = 1.0
    elif spec.schedule == "linear":
        decay = 1.0 - (1.0 - spec.final_scale) * frac
    else:
        decay = spec.final_scale + (1.0 - spec.final_scale) * 0.5 * (1.0 + math.cos(math.pi * frac))
    ramp = min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
    return [w * ramp * decay for w in base[:-1]] + [base[-1]]
