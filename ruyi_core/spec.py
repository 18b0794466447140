"""The run spec: one YAML file describes a whole run. Every knob has a default that serves the demo.

Later stages add their own sections beside `family`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ruyi_core.errors import SpecError
from ruyi_core.family.presets import PRESETS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def default_tier_names(n_exits: int) -> list[str]:
    """Deployment targets from shallowest to deepest: end device, edge server(s), cloud."""
    if n_exits == 1:
        return ["cloud"]
    if n_exits == 2:
        return ["end", "cloud"]
    if n_exits == 3:
        return ["end", "edge", "cloud"]
    return ["end"] + [f"edge{i}" for i in range(1, n_exits - 1)] + ["cloud"]


def base_num_layers(base: str) -> int | None:
    """Layer count of a base (preset or local checkpoint dir); None when it lives in a store."""
    if base in PRESETS:
        return PRESETS[base].num_hidden_layers
    if "://" in base:
        return None  # checked when the base is fetched
    cfg = Path(base) / "config.json"
    if not cfg.is_file():
        raise ValueError(
            f"base {base!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json"
        )
    return int(json.loads(cfg.read_text())["num_hidden_layers"])


class FamilySpec(_Strict):
    name: str = Field("ruyi-tiny", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    base: str = "tiny"
    exit_points: list[int] = [1, 6, 11]
    tiers: dict[str, int] = Field(default_factory=dict)
    shared_heads: bool = False
    seed: int = 0

    @field_validator("exit_points")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one exit point")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be strictly increasing, got {v}")
        if v[0] < 0:
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> FamilySpec:
        n = base_num_layers(self.base)
        if n is not None:
            check_exit_points(self.exit_points, n)
        if not self.tiers:
            self.tiers = dict(zip(default_tier_names(len(self.exit_points)), self.exit_points))
        for tier, p in self.tiers.items():
            if p not in self.exit_points:
                raise ValueError(f"tiers.{tier} = {p} is not one of exit_points {self.exit_points}")
        return self


def check_exit_points(exit_points: list[int], num_layers: int) -> None:
    if exit_points[-1] != num_layers - 1:
        raise ValueError(
            f"exit_points: the last exit must be num_layers - 1 = {num_layers - 1} "
            f"(the base has {num_layers} layers), got {exit_points[-1]}"
        )


class RunSpec(_Strict):
    family: FamilySpec = Field(default_factory=FamilySpec)


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    where = ".".join(str(x) for x in e["loc"]) or "spec"
    msg = e["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def load_spec(path: str | Path) -> RunSpec:
    """Load and validate a spec; any problem becomes one SpecError line naming the field."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} not found: pass --spec with an existing YAML file")
    try:
        raw: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(raw, source=str(path))


def parse_spec(raw: dict, source: str = "spec") -> RunSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a mapping with sections such as 'family'")
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_one_line(e, source)) from None
