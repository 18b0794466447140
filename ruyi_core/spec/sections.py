"""Spec sections: the family, the store, data, the pipeline on a cluster, evaluation, packaging, the runtime."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ruyi_core.family.presets import PRESETS
from ruyi_core.spec.base import _Strict


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
    """The familial model: a base and its exits. Exit point p is depth p + 1 (trunk layers 0..p-1, a branch block,
    a norm and a head); each tier is one exit, packaged as a standalone model."""

    # The registry's family name (models/<name>/...) and the served models' prefix (<name>:<tier>).
    name: str = Field("ruyi", pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
    base: str  # a preset, a local Qwen3 checkpoint folder, or an s3:// folder in the store
    exit_points: list[int]  # strictly increasing layer indices; the last is the base's num_hidden_layers - 1
    tiers: dict[str, int] | None = None  # tier name -> exit point; default: end / edge / cloud over the exits
    shared_heads: bool = False  # one LM head for every exit (the published layout's option); default one per exit
    seed: int = 0  # seeds a preset's random weights and DaE's new blocks
    # A family in the registry: CPT continues its promoted version's jointly trained family (trunk, exits and
    # tokenizer) instead of starting from `base`, which must have its shape (scheduled retraining on grown data)
    warm_start: str | None = None

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
        from ruyi_core.spec.checks import NAME

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

    endpoint: str = "127.0.0.1:8333"  # host:port of the S3 API (`make demo`'s local server by default)
    bucket: str = Field("ruyi", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    secure: bool = False  # https
    region: str | None = None
    part_size_mb: int = Field(16, ge=5, le=5120)  # S3 multipart parts are at least 5 MiB
    parallel_parts: int = Field(4, ge=1, le=64)  # parts (and files) transferred at once
    retries: int = Field(5, ge=0, le=20)  # retries of a failed transfer
    # Seconds without a byte from the store before a call gives up (then it is retried): an endpoint that accepts
    # connections but never answers fails in about this long, not minutes. A transfer of any number of files against
    # a store that stops answering fails within (retries + 2) x this plus the backoff (15.5 s by default): ~2.5 min.
    read_timeout_s: float = Field(20.0, gt=0, le=600)


class KindThresholds(_Strict):
    """Data-gate thresholds for one corpus kind."""

    min_records: int = Field(10, ge=1)  # valid records at least
    min_chars: int = Field(1, ge=0)  # per text (sft: per message, rl: per prompt)
    max_chars: int = Field(20000, ge=1)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)  # same text, conversation or prompt, whitespace aside
    max_bad_record_rate: float = Field(0.0, ge=0, le=1)  # unreadable lines (bad JSON/UTF-8, schema)


class CurationSpec(_Strict):
    """Curation of every training corpus after the data gate, with datatrove: language ID, Gopher's quality rules
    (pretraining text only), exact and MinHash near-duplicate removal across the corpus's files, and n-gram
    decontamination against every benchmark and held-out set of the spec (docs/data.md)."""

    enabled: bool = True
    # ISO 639-1 codes to keep; a record that language ID places elsewhere with at least language_score goes.
    languages: list[str] | None = None  # None keeps every language
    language_score: float = Field(0.65, ge=0, le=1)
    # Gopher's rules on pretraining records (datatrove's defaults): words per record, mean word length,
    # symbol and non-alphabetic word ratios, stop words.
    quality: bool = True
    min_words: int = Field(50, ge=0)
    min_stop_words: int = Field(2, ge=0)
    exact_dedup: bool = True
    near_dedup: bool = True  # MinHash: 14 bands of 8 hashes over word n-grams (datatrove's defaults)
    minhash_ngrams: int = Field(5, ge=1)
    decontaminate: bool = True
    decontamination_ngrams: int = Field(13, ge=4)  # GPT-3's choice; shorter items are matched whole
    # Benchmarks (eval.benchmarks names) or held-out sets (data.heldout, data.rl_heldout) not to decontaminate
    # against: only those that measure recall of the training corpus itself, where the overlap is the point.
    keep_overlap_with: list[str] = []


class DataSpec(_Strict):
    """Corpora by kind; a spec must name them (there is no default corpus). Each entry is a local JSONL/Parquet file
    or folder, an s3:// object or prefix, or `demo` (the generated demo world, deterministic in `seed`). Record
    formats: pretrain {text, source, lang}; heldout {text}; sft {messages: [{role, content}, ...]}; rl and rl_heldout
    {prompt, answer} (docs/data.md)."""

    pretrain: list[str] | None = None
    sft: list[str] | None = None
    rl: list[str] | None = None  # needed when rl.enabled
    # Held out from every training stage: pretrain-kind texts for held-out loss, rl-kind prompts for reward.
    heldout: list[str] | None = None
    rl_heldout: list[str] | None = None  # needed when rl.enabled
    seed: int = 0  # seeds the demo world where a source is `demo`
    # Allow-lists of pretraining records' `source` and `lang`: None accepts any (a spec narrows them, as the demo's).
    allowed_sources: list[str] | None = None
    allowed_langs: list[str] | None = None  # see allowed_sources
    thresholds: dict[str, KindThresholds] = Field(default_factory=lambda: {
        "pretrain": KindThresholds(), "sft": KindThresholds(), "rl": KindThresholds(max_duplicate_rate=0.2)})
    demo_records: dict[str, int] = {"pretrain": 4000, "sft": 1500, "rl": 300}  # sizes where a source is `demo`
    seq_length: int = Field(256, ge=8)  # tokens per SVD calibration sequence
    shard_tokens: int = Field(50_000_000, ge=1000)  # tokens per .bin/.idx shard
    curation: CurationSpec = CurationSpec()

    @field_validator("pretrain", "sft", "rl", "heldout", "rl_heldout")
    @classmethod
    def _not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("is empty: list at least one source (a file, folder, s3:// prefix or demo)")
        return v


class Resources(_Strict):
    """A pipeline step's Kubernetes requests, by component name (`default` for the rest)."""

    cpu: str = "2"  # a Kubernetes quantity
    memory: str = "8Gi"
    gpus: int = Field(0, ge=0)  # on a cluster: GPUs for this step (training steps on a GPU node pool)

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        from ruyi_core.spec.checks import quantity

        if quantity(v) <= 0:
            raise ValueError(f"{v!r} must be a positive Kubernetes quantity")
        return v


class PipelineSpec(_Strict):
    """How the KFP pipeline runs on a cluster (ignored by the local runner)."""

    image: str = "ghcr.io/ruyi-flow/ruyi-base:0.1.0"  # every component's image (images/)
    s3_secret: str = "ruyi-s3"  # Kubernetes Secret with keys access_key and secret_key
    resources: dict[str, Resources] = Field(default_factory=lambda: {
        "default": Resources(), "curate_shard": Resources(cpu="2", memory="4Gi"),
        "report": Resources(cpu="1", memory="2Gi")})
    timeout_s: int = Field(6 * 3600, ge=60)  # per step
    retries: int = Field(1, ge=0, le=10)  # per step
    accelerator: str = "nvidia.com/gpu"  # the resource name GPU steps request
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)  # for steps that request GPUs
    gpu_tolerations: list[dict[str, str]] = Field(default_factory=list)  # {key, operator, value, effect}

    def resources_for(self, stage: str) -> Resources:
        return self.resources.get(stage, self.resources.get("default", Resources()))


class BenchmarkSpec(_Strict):
    """One evaluation set in one of three forms (lm-evaluation-harness does the scoring):
    `exact_match`: JSONL {question, answer} (GSM8K's "... #### 42" answers work), scored on greedy generation;
    `contains`: JSONL {question, answer}, the greedy answer must contain `answer` as a whole word or phrase;
    `multiple_choice`: JSONL {question, choices, answer|gold} (MMLU's form), scored by log-likelihood, asked as
    "Question: ...\nAnswer:" (`template: qa`) or with the question as the very text the choice completes
    (`template: cloze`, e.g. "Alice lives in" -> " Paris");
    `perplexity`: JSONL {text}, rolling log-likelihood. `path` is a local file, an s3:// URI in the store, or
    `demo:<set>`, one of the demo world's held-out sets."""

    format: Literal["exact_match", "contains", "multiple_choice", "perplexity"]
    path: str  # a JSONL file, an s3:// object in the store, or demo:<set>
    limit: int | None = Field(None, ge=1)  # first N records only
    template: Literal["qa", "cloze"] = "qa"  # multiple_choice only


class EvalSpec(_Strict):
    """Per-tier evaluation: every benchmark on every packaged tier (and on the family's exits, to compare), plus
    parameters, bytes on disk, prefill / decode tokens/s and peak memory."""

    benchmarks: dict[str, BenchmarkSpec] = {}  # a spec must name at least one
    max_new_tokens: int = Field(32, ge=1)  # per generative answer
    batch_size: int = Field(8, ge=1)  # lm-eval's batch size with transformers
    speed_prompt_tokens: int = Field(64, ge=1)  # prompt length of the prefill / decode speed measurement
    speed_new_tokens: int = Field(32, ge=1)
    seed: int = 0

    @field_validator("benchmarks")
    @classmethod
    def _names(cls, v: dict[str, BenchmarkSpec]) -> dict[str, BenchmarkSpec]:
        import re

        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"benchmark name {name!r}: use lowercase letters, digits and _")
        return v


class PackageSpec(_Strict):
    """Per-tier packages under models/<family>/<version>/<tier>/ and the promotion gate. A new version of a tier
    is promoted only when no benchmark is worse than the promoted version's by more than the tolerance
    (absolute for scores in [0, 1], relative for perplexity)."""

    version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # default: from the run id
    tolerance: float = Field(0.02, ge=0)  # absolute, for scores in [0, 1]
    perplexity_tolerance: float = Field(0.05, ge=0)  # relative
    targets: dict[str, str] = Field(default_factory=lambda: {
        "end": "end device (phone / PC, on-device NPU or CPU)", "edge": "edge server (one mid-range GPU)",
        "cloud": "cloud (data-centre GPUs)"})
    # `FAMILY:auto` routing, calibrated on the generative benchmarks' first `routing_questions` records each: the
    # cheapest threshold whose quality is within `routing_tolerance` of the deepest tier's (0 questions: off).
    routing_questions: int = Field(30, ge=0)
    routing_tolerance: float = Field(0.02, ge=0)


class RuntimeSpec(_Strict):
    """Device and dtype of every stage that loads a model (ruyi_core.runtime). auto: CUDA + bf16 where a GPU is
    visible, CPU + fp32 otherwise."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # CPU threads per process (torch.set_num_threads); None keeps torch's default, one per core. A float sum's
    # order follows the thread count: fix it for figures that repeat on machines with other core counts.
    cpu_threads: int | None = Field(None, ge=1)
    # torch.use_deterministic_algorithms (warnings, not errors, for ops without a deterministic kernel): results
    # that repeat run to run on one machine, at some speed on GPUs.
    deterministic: bool = False
