"""Evaluation: held-out loss, rewards, and per-tier benchmarks."""
