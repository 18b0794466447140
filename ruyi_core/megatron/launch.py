"""Launching the trainer: the parallel layout, checked against the fetched family before any process starts (the
launching itself is ruyi_core.launch; the training stage is ruyi_core.stages.train)."""
from __future__ import annotations

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec


def validate_layout(spec: RunSpec, family_cfg: dict, stage: str) -> None:
    """Stops a bad TP/PP/DP layout with one line before any process starts: the spec's own checks, now against
    the fetched family's config (a base only the store had was not checked when the spec was loaded)."""
    from ruyi_core.spec.checks import layout_problems

    problems = layout_problems(spec, family_cfg)
    if problems:
        raise RuyiError(problems[0])
    if family_cfg.get("shared_heads"):
        raise RuyiError("family.shared_heads: the megatron trainer gives every exit its own head; "
                        "train a family with shared_heads: false")
