"""The run spec: one YAML file describes a whole run. What only the user can know (the base, the exits, the data
and the benchmarks) must be named; every other knob has a default for a real run, which the demo spec narrows.

The sections live in `sections.py` and `train.py`; `checks.py` holds what is checked across them and against the
base's config. Everything is importable from here.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from ruyi_core.errors import SpecError
from ruyi_core.spec.base import _Strict
from ruyi_core.spec.sections import (BenchmarkSpec, DataSpec, EvalSpec, FamilySpec, KindThresholds, PackageSpec,
                                     PipelineSpec, Resources, RuntimeSpec, StoreSpec, base_num_layers,
                                     check_exit_points, default_tier_names)
from ruyi_core.spec.train import (STAGE_DEFAULTS, TRAINING_STAGES, DaeSpec, LossSpec, ParallelSpec, RlSpec,
                                  TrainJobSpec, TrainSpec, TrainStageSpec, training_kind, training_stages)

__all__ = ["BenchmarkSpec", "DaeSpec", "DataSpec", "EvalSpec", "FamilySpec", "KindThresholds", "LossSpec",
           "PackageSpec", "ParallelSpec", "PipelineSpec", "Resources", "RlSpec", "RunSpec", "RuntimeSpec",
           "STAGE_DEFAULTS", "StoreSpec", "TRAINING_STAGES", "TrainJobSpec", "TrainSpec", "TrainStageSpec",
           "base_num_layers", "check_exit_points", "default_tier_names", "load_spec", "parse_spec", "parse_spec_yaml",
           "spec_from_arg", "training_kind", "training_stages"]


class RunSpec(_Strict):
    family: FamilySpec = Field(default_factory=FamilySpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    dae: DaeSpec = Field(default_factory=DaeSpec)
    rl: RlSpec = Field(default_factory=RlSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    package: PackageSpec = Field(default_factory=PackageSpec)

    @model_validator(mode="before")
    @classmethod
    def _named(cls, raw):
        """One line for everything a spec must name, before any field's own checks."""
        if isinstance(raw, dict):
            missing = unnamed(raw)
            if missing:
                raise ValueError(f"the spec does not name {', '.join(missing)}: {NAMING_HELP}")
        return raw

    def train_stage(self, stage: str) -> TrainStageSpec:
        """A training stage's settings; the DaE stages train only the expanded tier's new blocks and head."""
        if stage not in TRAINING_STAGES:
            raise ValueError(f"unknown training stage {stage!r}: one of {', '.join(TRAINING_STAGES)}")
        section, _, name = TRAINING_STAGES[stage].partition(".")
        return getattr(getattr(self, section), name)

    @model_validator(mode="after")
    def _layout(self) -> "RunSpec":
        from ruyi_core.spec.checks import layout_problems

        problems = layout_problems(self)
        if problems:
            raise ValueError(problems[0])
        return self

    @model_validator(mode="after")
    def _tiers(self) -> "RunSpec":
        tiers = self.family.tiers
        for section, sub in (("dae", self.dae), ("rl", self.rl)):
            if sub.enabled and sub.tier not in tiers:
                raise ValueError(f"{section}.tier: unknown tier {sub.tier!r}; the family has {', '.join(tiers)}")
        if self.dae.enabled and tiers[self.dae.tier] == self.family.exit_points[-1]:
            raise ValueError(f"dae.tier: {self.dae.tier!r} is the deepest tier; DaE expands an early exit")
        return self

    @model_validator(mode="after")
    def _references(self) -> "RunSpec":
        known = [*self.eval.benchmarks, "data.heldout", "data.rl_heldout"]
        for name in self.data.curation.keep_overlap_with:
            if name not in known:
                raise ValueError(f"data.curation.keep_overlap_with: {name!r} is neither a benchmark nor a held-out "
                                 f"set; use one of {', '.join(known)}")
        return self

    def fingerprint(self) -> str:
        """Hash of the whole spec, recorded in every artifact manifest."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


NAMING_HELP = ("give family.base and family.exit_points, data sources (each a list of JSONL/Parquet files or folders, "
               "s3:// prefixes, or demo; records: pretrain {text, source, lang}, heldout {text}, "
               "sft {messages: [{role, content}]}, rl/rl_heldout {prompt, answer}) and eval.benchmarks; see docs/data.md "
               "and specs/tiny.yaml")


def unnamed(raw: dict) -> list[str]:
    """The fields a spec must name and does not: the base and exits, the corpora its enabled stages read, and at
    least one benchmark."""

    def get(section: str, key: str):
        sec = raw.get(section)
        return sec.get(key) if isinstance(sec, dict) else getattr(sec, key, None)

    rl_on = get("rl", "enabled") is not False
    wanted = [("family", "base"), ("family", "exit_points"), ("data", "pretrain"), ("data", "sft"),
              ("data", "heldout"), *([("data", "rl"), ("data", "rl_heldout")] if rl_on else []),
              ("eval", "benchmarks")]
    return [f"{s}.{k}" for s, k in wanted if get(s, k) in (None, {})]


def _one_line(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    where = "".join(f"{x}: " for x in [".".join(str(x) for x in e["loc"])] if x)  # none: the message names it
    msg = e["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}{msg}{more}"


def load_spec(path: str | Path) -> RunSpec:
    """Load and validate a spec; any problem becomes one SpecError line naming the field."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} not found: pass --spec with an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a text file (not UTF-8): pass --spec with a YAML run spec") from None
    except OSError as e:
        raise SpecError(f"cannot read spec file {path} ({e.strerror}): check its permissions") from None
    if "\x00" in text:
        raise SpecError(f"{path} is a binary file, not a YAML run spec: pass --spec with a YAML file")
    return parse_spec_yaml(text, source=str(path))


def spec_from_arg(arg: str) -> RunSpec:
    """A worker's --spec: the spec itself as JSON (what a launching stage passes), or a YAML file's path."""
    return parse_spec_yaml(arg) if arg.lstrip().startswith("{") else load_spec(arg)


def parse_spec_yaml(text: str, source: str = "spec") -> RunSpec:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(raw, source)


def parse_spec(raw: dict, source: str = "spec") -> RunSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a mapping with sections such as 'family'")
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_one_line(e, source)) from None
