"""Evaluation: held-out loss, rewards, and per-tier benchmarks (lm-evaluation-harness) and speed."""
from ruyi_core.eval.harness import evaluate
from ruyi_core.eval.speed import measure

__all__ = ["evaluate", "measure"]
