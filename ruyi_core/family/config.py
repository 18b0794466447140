"""RuyiConfig: a Qwen3Config plus the family's exits and tier map (published field names kept)."""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config


@strict
class RuyiConfig(Qwen3Config):
    model_type = "ruyi"

    # Exit p means depth p + 1: trunk layers 0..p-1, then the exit's branch block, norm and head.
    early_exit_points: list[int] | None = None
    default_early_exit_point: int | None = None
    shared_heads: bool = False
    tiers: dict[str, int] | None = None
    # Decoder block flavour of the base: "qwen3" (q/k norms) or "qwen2" (q/k/v biases), for published imports.
    base_arch: str = "qwen3"
    # DaE: exit point (as a string, JSON keys) -> number of blocks appended after that exit's branch block.
    expansions: dict[str, int] | None = None
    # The dtype the weights are stored in (the base's: bf16 in, bf16 tiers out), whatever a stage computes in.
    weights_dtype: str = "float32"

    def __post_init__(self, **kwargs):
        self.tie_word_embeddings = False  # one head per exit: nothing is tied to the embeddings
        if self.early_exit_points is None:
            self.early_exit_points = [self.num_hidden_layers - 1]
        if self.default_early_exit_point is None:
            self.default_early_exit_point = self.early_exit_points[-1]
        if self.tiers is None:
            from ruyi_core.spec import default_tier_names

            self.tiers = dict(zip(default_tier_names(len(self.early_exit_points)), self.early_exit_points))
        super().__post_init__(**kwargs)

    def validate_exits(self) -> None:
        pts, n = self.early_exit_points, self.num_hidden_layers
        if any(b <= a for a, b in zip(pts, pts[1:])) or pts[0] < 0 or pts[-1] != n - 1:
            raise ValueError(f"early_exit_points {pts} must increase strictly from >= 0 and end at {n - 1}")
        if self.default_early_exit_point not in pts:
            raise ValueError(f"default_early_exit_point {self.default_early_exit_point} is not an exit")
        if self.base_arch not in ("qwen3", "qwen2"):
            raise ValueError(f"base_arch must be qwen3 or qwen2, got {self.base_arch!r}")
        for p, extra in (self.expansions or {}).items():
            # Added blocks use KV-cache slots p+1..p+extra, free because a cache belongs to one exit.
            if int(p) not in pts[:-1] or extra < 1 or int(p) + extra > n - 1:
                raise ValueError(f"expansion of exit {p} by {extra} blocks: only early exits expand, by 1 to "
                                 f"{n - 1 - int(p)} blocks")

    def expansion(self, exit_point: int) -> int:
        return (self.expansions or {}).get(str(exit_point), 0)

    def tier_depth(self, exit_point: int) -> int:
        return exit_point + 1 + self.expansion(exit_point)

    def exit_index(self, exit_point: int) -> int:
        if exit_point not in self.early_exit_points:
            raise ValueError(f"exit_point {exit_point} is not one of this family's exits {self.early_exit_points}")
        return self.early_exit_points.index(exit_point)

    def tier_exit(self, tier: str) -> int:
        if tier not in self.tiers:
            raise KeyError(f"unknown tier {tier!r}; this family has {', '.join(self.tiers)}")
        return self.tiers[tier]
