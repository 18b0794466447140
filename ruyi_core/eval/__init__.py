"""Evaluation: held-out loss, rewards, and per-tier benchmarks (lm-evaluation-harness) and speed.

`evaluate` and `measure` load their modules (torch) on first use, so the `ruyi` command line, which registers
`ruyi eval` from this package, still refuses a bad spec before any heavy import."""
from __future__ import annotations

import importlib

_HOME = {"evaluate": "ruyi_core.eval.harness", "measure": "ruyi_core.eval.speed"}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
