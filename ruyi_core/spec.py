"""The run spec: one YAML file describes a whole run. Every knob has a default that serves the demo.

Later stages add their own sections beside `family`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ruyi_core.errors import SpecError
from ruyi_core.family.presets import PRESETS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN learning rate is never what was meant


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
    name: str = Field("ruyi-tiny", pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
    base: str = "tiny"
    exit_points: list[int] = [1, 6, 11]
    tiers: dict[str, int] | None = None  # default: end / edge / cloud over the exits
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
        if self.tiers is None:
            self.tiers = dict(zip(default_tier_names(len(self.exit_points)), self.exit_points))
        if not self.tiers:
            raise ValueError("tiers is empty: map at least one tier name to an exit point (or leave tiers out)")
        from ruyi_core.spec_checks import NAME

        for tier, p in self.tiers.items():
            if not NAME.match(tier):
                raise ValueError(f"tiers: {tier!r} is not a safe tier name (lowercase letters, digits and -, at most "
                                 "63, as S3 keys and Kubernetes names need)")
            if p not in self.exit_points:
                raise ValueError(f"tiers.{tier} = {p} is not one of exit_points {self.exit_points}")
        return self


def check_exit_points(exit_points: list[int], num_layers: int) -> None:
    if exit_points[-1] != num_layers - 1:
        raise ValueError(
            f"exit_points: the last exit must be num_layers - 1 = {num_layers - 1} "
            f"(the base has {num_layers} layers), got {exit_points[-1]}"
        )


class StoreSpec(_Strict):
    """Where artifacts live. RUYI_S3_ENDPOINT overrides `endpoint`; credentials come only from the
    environment (RUYI_S3_ACCESS_KEY, RUYI_S3_SECRET_KEY), never from the spec."""

    endpoint: str = "127.0.0.1:8333"
    bucket: str = Field("ruyi", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    secure: bool = False
    region: str | None = None
    part_size_mb: int = Field(16, ge=5, le=5120)  # S3 multipart parts are at least 5 MiB
    parallel_parts: int = Field(4, ge=1, le=64)
    retries: int = Field(5, ge=0, le=20)
    # Seconds without a byte from the store before a call gives up (then it is retried): an endpoint that accepts
    # connections but never answers fails in about this long, not minutes.
    read_timeout_s: float = Field(20.0, gt=0, le=600)


class KindThresholds(_Strict):
    """Data-gate thresholds for one corpus kind."""

    min_records: int = Field(10, ge=1)
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(20000, ge=1)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_bad_record_rate: float = Field(0.0, ge=0, le=1)  # unreadable lines (bad JSON/UTF-8, schema)


class DataSpec(_Strict):
    """Corpora by kind. Each entry is a list of local paths or s3:// URIs (JSONL or Parquet); the word
    `demo` means the generated demo world (deterministic in `seed`)."""

    pretrain: list[str] = ["demo"]
    sft: list[str] = ["demo"]
    rl: list[str] = ["demo"]
    # Held out from every training stage: pretrain-kind texts for held-out loss, rl-kind prompts for reward.
    heldout: list[str] = ["demo"]
    rl_heldout: list[str] = ["demo"]
    seed: int = 0
    # Allow-lists of pretraining records' `source` and `lang`: None accepts any (a spec narrows them, as the demo's).
    allowed_sources: list[str] | None = None
    allowed_langs: list[str] | None = None
    thresholds: dict[str, KindThresholds] = Field(default_factory=lambda: {
        "pretrain": KindThresholds(), "sft": KindThresholds(), "rl": KindThresholds(max_duplicate_rate=0.2)})
    demo_records: dict[str, int] = {"pretrain": 4000, "sft": 1500, "rl": 300}  # sizes of the generated corpus
    seq_length: int = Field(256, ge=8)
    shard_tokens: int = Field(50_000_000, ge=1000)  # tokens per .bin/.idx shard


class Resources(_Strict):
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = Field(0, ge=0)  # on a cluster: GPUs for this step (training steps on a GPU node pool)

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        from ruyi_core.spec_checks import quantity

        if quantity(v) <= 0:
            raise ValueError(f"{v!r} must be a positive Kubernetes quantity")
        return v


class PipelineSpec(_Strict):
    """How the KFP pipeline runs on a cluster (ignored by the local runner)."""

    image: str = "ghcr.io/ruyi-flow/ruyi-base:0.1.0"
    s3_secret: str = "ruyi-s3"  # Kubernetes Secret with keys access_key and secret_key
    resources: dict[str, Resources] = Field(default_factory=lambda: {
        "default": Resources(), "validate_data": Resources(cpu="2", memory="4Gi"),
        "report": Resources(cpu="1", memory="2Gi")})
    timeout_s: int = Field(6 * 3600, ge=60)
    retries: int = Field(1, ge=0, le=10)
    accelerator: str = "nvidia.com/gpu"
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)  # for steps that request GPUs
    gpu_tolerations: list[dict[str, str]] = Field(default_factory=list)  # {key, operator, value, effect}

    def resources_for(self, stage: str) -> Resources:
        return self.resources.get(stage, self.resources.get("default", Resources()))


class LossSpec(_Strict):
    """Joint loss L = sum_k lambda_k(t) L_k. The last exit keeps its weight; early exits start at their
    weight (strong deep supervision) and decay to weight * final_scale by `schedule`, after an optional
    linear warm-up from 0."""

    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    weights: list[float] | None = None  # per exit, shallowest first; default 1.0 each

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or not v or v[-1] <= 0):
            raise ValueError(f"weights {v}: every weight must be >= 0 and the last exit's > 0")
        return v
    final_scale: float = Field(0.3, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)


class TrainStageSpec(_Strict):
    steps: int = Field(60, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    global_batch_size: int = Field(16, ge=1)
    seq_length: int = Field(128, ge=8)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    clip_grad: float = Field(1.0, ge=0)  # 0 disables clipping
    save_every: int = Field(20, ge=1)
    seed: int = 1234
    # Activation recompute: true / "full" keeps only each block's input for the backward; "selective" recomputes
    # core attention (megatron's); false keeps everything (fastest, most memory).
    recompute: bool | Literal["full", "selective"] = False
    # SFT stages: this fraction of every batch is pretraining text, so plain-text modelling is not forgotten.
    replay: float = Field(0.0, ge=0, lt=1)
    loss: LossSpec = Field(default_factory=LossSpec)

    @model_validator(mode="after")
    def _schedule(self) -> "TrainStageSpec":
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        return self


class ParallelSpec(_Strict):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


class TrainJobSpec(_Strict):
    """Kubeflow Trainer v2 TrainJob settings for the `trainjob` launcher."""

    image: str = "ghcr.io/ruyi-flow/ruyi-trainer:0.1.0"
    namespace: str = "ruyi"
    runtime: str = "ruyi-megatron"  # a ClusterTrainingRuntime/TrainingRuntime (manifests/)
    gpus_per_node: int = Field(8, ge=0)
    cpu: str = "16"
    memory: str = "256Gi"
    poll_s: float = Field(10.0, gt=0)
    timeout_s: int = Field(7 * 24 * 3600, ge=60)

    _quantities = field_validator("cpu", "memory")(Resources._quantity.__func__)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        from ruyi_core.spec_checks import NAME

        if not NAME.match(v):
            raise ValueError(f"{v!r} is not a Kubernetes namespace name (lowercase letters, digits and -)")
        return v


# Each stage's own defaults. A partial stage section in a spec (say, only `steps`) keeps the rest of them.
STAGE_DEFAULTS = {
    "train": {"cpt": {},
              # SFT takes many small steps: copying numbers from the prompt emerges with updates, not tokens.
              "sft": {"steps": 80, "global_batch_size": 8, "lr": 1e-3, "min_lr": 1e-4, "replay": 0.25}},
    "dae": {"cpt": {"steps": 20, "global_batch_size": 8, "lr": 2e-3, "min_lr": 2e-4},
            "sft": {"steps": 30, "global_batch_size": 8, "lr": 1e-3, "min_lr": 1e-4, "replay": 0.25}},
}


def _stage_field(section: str, stage: str):
    return Field(default_factory=lambda: TrainStageSpec(**STAGE_DEFAULTS[section][stage]))


def _merge_stage_defaults(section: str, data):
    if isinstance(data, dict):
        for stage, defaults in STAGE_DEFAULTS[section].items():
            if isinstance(data.get(stage), dict):
                data = {**data, stage: {**defaults, **data[stage]}}
    return data


class TrainSpec(_Strict):
    cpt: TrainStageSpec = _stage_field("train", "cpt")
    sft: TrainStageSpec = _stage_field("train", "sft")
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    launcher: Literal["local", "trainjob"] = "local"
    trainjob: TrainJobSpec = Field(default_factory=TrainJobSpec)

    @model_validator(mode="before")
    @classmethod
    def _stages(cls, data):
        return _merge_stage_defaults("train", data)


class DaeSpec(_Strict):
    """DaE for one tier: Stable Block Expansion (zero-residual random blocks), then SVD compression."""

    enabled: bool = True
    tier: str = "end"
    blocks: int = Field(3, ge=1)
    init: Literal["zero", "clone"] = "zero"  # clone: copies of the branch block (the report's ablation)
    std: float = Field(0.02, gt=0)
    cpt: TrainStageSpec = _stage_field("dae", "cpt")
    sft: TrainStageSpec = _stage_field("dae", "sft")
    svd_ratio: float = Field(0.4, gt=0, lt=1)  # fraction of the added parameters to remove
    sweep: list[float] = [0.2, 0.4, 0.6]
    calib_samples: int = Field(64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _stages(cls, data):
        return _merge_stage_defaults("dae", data)

    @field_validator("sweep")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0 < r < 1 for r in v):
            raise ValueError(f"every sweep ratio must be in (0, 1), got {v}")
        return v


class RlSpec(_Strict):
    """GRPO on one tier with verifiable rewards. `rewards` maps a reward in ruyi_core.rl.rewards.REWARDS to its
    weight; GRPO maximises their weighted sum (default: exact answer, correct worked steps, answer format)."""

    enabled: bool = True
    tier: str = "end"
    group_size: int = Field(8, ge=2)  # G completions per prompt
    steps: int = Field(30, ge=1)
    prompts_per_step: int = Field(4, ge=1)
    # Completions per forward/backward pass; the step's prompts_per_step x group_size are accumulated into one
    # optimizer step. Default: all of them in one pass (bounds activation memory on GPUs when set).
    micro_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    beta: float = Field(0.04, ge=0)  # KL to the reference policy (the tier before GRPO)
    clip_eps: float = Field(0.2, gt=0)
    max_new_tokens: int = Field(64, ge=1)  # a 3-step worked answer is ~30 tokens; generation stops at EOS
    temperature: float = Field(1.0, gt=0)
    heldout_prompts: int = Field(128, ge=1)
    heldout_samples: int = Field(8, ge=1)  # completions per held-out prompt for the mean reward
    seed: int = 0
    # valid_steps: exact answers alone are too sparse for a small tier (a few percent of samples) to learn from.
    rewards: dict[str, float] = {"exact_answer": 1.0, "valid_steps": 1.0, "answer_format": 1.0}

    @model_validator(mode="after")
    def _micro(self) -> "RlSpec":
        total = self.prompts_per_step * self.group_size
        if self.micro_batch_size is not None and total % self.micro_batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must divide prompts_per_step x group_size "
                             f"({total})")
        return self

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: dict[str, float]) -> dict[str, float]:
        from ruyi_core.rl.rewards import REWARDS

        if not v:
            raise ValueError(f"needs at least one reward, from {', '.join(REWARDS)}")
        for name in v:
            if name not in REWARDS:
                raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARDS)}")
        return v


class BenchmarkSpec(_Strict):
    """One evaluation set in one of three forms (lm-evaluation-harness does the scoring):
    `exact_match`: JSONL {question, answer} (GSM8K's "... #### 42" answers work), scored on greedy generation;
    `contains`: JSONL {question, answer}, the greedy answer must contain `answer` as a whole word or phrase;
    `multiple_choice`: JSONL {question, choices, answer|gold} (MMLU's form), scored by log-likelihood, asked as
    "Question: ...\nAnswer:" (`template: qa`) or with the question as the very text the choice completes
    (`template: cloze`, e.g. "Alice lives in" -> " Paris");
    `perplexity`: JSONL {text}, rolling log-likelihood. `path` is a local file, an s3:// URI in the store, or
    `demo:<set>`, one of the demo world's held-out sets (ruyi_core.data.world.EVAL_SETS)."""

    format: Literal["exact_match", "contains", "multiple_choice", "perplexity"]
    path: str
    limit: int | None = Field(None, ge=1)  # first N records only
    template: Literal["qa", "cloze"] = "qa"  # multiple_choice only

    @field_validator("path")
    @classmethod
    def _demo_set(cls, v: str) -> str:
        from ruyi_core.data.world import EVAL_SETS

        # Bare `demo` is refused too: which set a benchmark gets must not depend on its name.
        if (v == "demo" or v.startswith("demo:")) and v.removeprefix("demo:") not in EVAL_SETS:
            raise ValueError(f"unknown demo set {v!r}; known: {', '.join('demo:' + n for n in EVAL_SETS)}")
        return v

    @property
    def demo_set(self) -> str | None:
        """The demo world's set this benchmark reads, or None for a file."""
        return self.path.removeprefix("demo:") if self.path.startswith("demo:") else None


class EvalSpec(_Strict):
    """Per-tier evaluation: every benchmark on every packaged tier (and on the family's exits, to compare), plus
    parameters, bytes on disk, prefill / decode tokens/s and peak memory."""

    benchmarks: dict[str, BenchmarkSpec] = Field(default_factory=lambda: {
        "arithmetic": BenchmarkSpec(format="exact_match", path="demo:arithmetic"),
        # The demo world states facts as "Alice lives in Paris.": a cloze asks for them in that form.
        "facts_mc": BenchmarkSpec(format="multiple_choice", path="demo:facts_mc", template="cloze"),
        "heldout_text": BenchmarkSpec(format="perplexity", path="demo:heldout_text")})
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    speed_prompt_tokens: int = Field(64, ge=1)
    speed_new_tokens: int = Field(32, ge=1)
    seed: int = 0

    @field_validator("benchmarks")
    @classmethod
    def _names(cls, v: dict[str, BenchmarkSpec]) -> dict[str, BenchmarkSpec]:
        import re

        if not v:
            raise ValueError("needs at least one benchmark")
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"benchmark name {name!r}: use lowercase letters, digits and _")
        return v


class PackageSpec(_Strict):
    """Per-tier packages under models/<family>/<version>/<tier>/ and the promotion gate. A new version of a tier
    is promoted only when no benchmark is worse than the promoted version's by more than the tolerance
    (absolute for scores in [0, 1], relative for perplexity)."""

    version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # default: from the run id
    tolerance: float = Field(0.02, ge=0)
    perplexity_tolerance: float = Field(0.05, ge=0)
    targets: dict[str, str] = Field(default_factory=lambda: {
        "end": "end device (phone / PC, on-device NPU or CPU)", "edge": "edge server (one mid-range GPU)",
        "cloud": "cloud (data-centre GPUs)"})


class RuntimeSpec(_Strict):
    """Device and dtype of every stage that loads a model (ruyi_core.runtime). auto: CUDA + bf16 where a GPU is
    visible, CPU + fp32 otherwise."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


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

    def train_stage(self, stage: str) -> TrainStageSpec:
        """A training stage's settings; the DaE stages train only the expanded tier's new blocks and head."""
        stages = {"cpt": self.train.cpt, "sft": self.train.sft, "dae_cpt": self.dae.cpt, "dae_sft": self.dae.sft}
        if stage not in stages:
            raise ValueError(f"unknown training stage {stage!r}: one of {', '.join(stages)}")
        return stages[stage]

    @model_validator(mode="after")
    def _layout(self) -> "RunSpec":
        from ruyi_core.spec_checks import layout_problems

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

    def fingerprint(self) -> str:
        """Hash of the whole spec, recorded in every artifact manifest."""
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


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
