"""Spec sections for training: the stages (CPT, SFT, DaE's), the parallel layout and launcher, GRPO."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ruyi_core.spec.base import _Strict
from ruyi_core.spec.sections import Resources


class LossSpec(_Strict):
    """Joint loss L = sum_k lambda_k(t) L_k. The last exit keeps its weight; early exits start at their
    weight (strong deep supervision) and decay to weight * final_scale by `schedule`, after an optional
    linear warm-up from 0."""

    schedule: Literal["constant", "linear", "cosine"] = "cosine"  # how early exits' weights decay
    weights: list[float] | None = None  # per exit, shallowest first; default 1.0 each

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(w < 0 for w in v) or not v or v[-1] <= 0):
            raise ValueError(f"weights {v}: every weight must be >= 0 and the last exit's > 0")
        return v
    final_scale: float = Field(0.3, ge=0, le=1)  # an early exit's weight at the end, as a fraction of its weight
    warmup_steps: int = Field(0, ge=0)  # early exits' weights rise linearly from 0 over these steps


class TrainStageSpec(_Strict):
    """One training stage on megatron-core: its schedule, batch and checkpoints."""

    steps: int = Field(60, ge=1)  # optimizer steps
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward/backward pass on one rank
    global_batch_size: int = Field(16, ge=1)  # sequences per optimizer step: micro_batch_size x DP x accumulation
    seq_length: int = Field(128, ge=8)  # tokens per training window
    # How pretraining text fills windows: one "stream" cut every seq_length tokens (megatron's GPT dataset: no
    # padding; most documents shorter than a window are split across two), or "whole" documents, padded (a text is
    # cut only where it is longer than a window, so none is trained without its beginning). Conversations are
    # always packed whole.
    packing: Literal["stream", "whole"] = "stream"
    lr: float = Field(3e-3, gt=0)  # peak learning rate, after warm-up; then decayed to min_lr by lr_schedule
    min_lr: float = Field(3e-4, ge=0)
    # "cosine": decay over every step after warm-up. "wsd" (warmup-stable-decay): held at lr, then a cosine decay over
    # the last lr_decay_fraction of the steps: more of the run at the peak rate, ending at the same min_lr.
    lr_schedule: Literal["cosine", "wsd"] = "cosine"
    lr_decay_fraction: float = Field(0.2, gt=0, le=1)  # "wsd" only
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    clip_grad: float = Field(1.0, ge=0)  # 0 disables clipping
    save_every: int = Field(20, ge=1)  # steps between checkpoints in the store (a rerun resumes from the latest)
    # Complete checkpoints kept, locally and in the store; older ones are deleted once a newer one is complete
    # (a 14B checkpoint with its Adam state is ~240 GB). The stage's output is built from the last one.
    # 0 keeps the newest while training (to resume) and deletes it once the stage's output is stored.
    keep_checkpoints: int = Field(2, ge=0)
    seed: int = 1234  # the stage's RNGs and the order its training windows are drawn in
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
        if self.lr_schedule == "wsd" and self.wsd_decay_steps > self.steps - self.warmup_steps:
            raise ValueError(f"lr_decay_fraction ({self.lr_decay_fraction}) gives {self.wsd_decay_steps} decay steps, "
                             f"more than the {self.steps - self.warmup_steps} after warm-up: lower it or warmup_steps")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        return self

    @property
    def wsd_decay_steps(self) -> int:
        """The steps of the "wsd" schedule's final decay."""
        return max(1, round(self.steps * self.lr_decay_fraction))


class ParallelSpec(_Strict):
    """megatron's 3D-parallel layout; tp x pp x dp processes, checked against heads, layers and batch sizes."""

    tp: int = Field(1, ge=1)  # tensor parallel
    pp: int = Field(1, ge=1)  # pipeline parallel: an exit's branch loss is computed on the stage holding its layer
    dp: int = Field(1, ge=1)  # data parallel
    nodes: int = Field(1, ge=1)  # TrainJob nodes (the trainjob launcher)
    # megatron's distributed optimizer: fp32 master weights and Adam moments sharded over DP (ZeRO-1), grads
    # reduce-scattered. Sequence parallelism: the blocks' norms and residuals hold s/TP tokens per rank.
    # None = on where the run has GPUs (sequence parallelism only with tp > 1), as `ruyi plan` assumes.
    distributed_optimizer: bool | None = None
    sequence_parallel: bool | None = None  # see distributed_optimizer

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def resolved(self, cuda: bool) -> tuple[bool, bool]:
        """(distributed optimizer, sequence parallel) for a run on GPUs (`cuda`) or not."""
        dist_opt = cuda if self.distributed_optimizer is None else self.distributed_optimizer
        seq_par = (cuda and self.tp > 1) if self.sequence_parallel is None else self.sequence_parallel
        return dist_opt, seq_par


class TrainJobSpec(_Strict):
    """Kubeflow Trainer v2 TrainJob settings for the `trainjob` launcher."""

    image: str = "ghcr.io/ruyi-flow/ruyi-trainer:0.1.0"
    namespace: str = "ruyi"
    runtime: str = "ruyi-megatron"  # a ClusterTrainingRuntime/TrainingRuntime (manifests/)
    gpus_per_node: int = Field(8, ge=0)
    cpu: str = "16"  # per node
    memory: str = "256Gi"  # per node
    poll_s: float = Field(10.0, gt=0)  # seconds between status checks while the stage waits on its TrainJob
    timeout_s: int = Field(7 * 24 * 3600, ge=60)

    _quantities = field_validator("cpu", "memory")(Resources._quantity.__func__)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        from ruyi_core.spec.checks import NAME

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


# The training stages in the order they run, each named after its settings' place in the spec: cpt and sft from
# `train`, dae_cpt and dae_sft from `dae`.
TRAINING_STAGES = {(st if sec == "train" else f"{sec}_{st}"): f"{sec}.{st}"
                   for sec, stages in STAGE_DEFAULTS.items() for st in stages}


def training_stages(section: str) -> tuple[str, ...]:
    """The training stages whose settings live in this spec section ("train" or "dae"), in order."""
    return tuple(name for name, field in TRAINING_STAGES.items() if field.startswith(f"{section}."))


def training_kind(stage: str) -> str:
    """The corpus kind a training stage learns from: pretraining text for the cpt stages, chats for the others."""
    return "pretrain" if TRAINING_STAGES[stage].endswith(".cpt") else "sft"


def _stage_field(section: str, stage: str):
    return Field(default_factory=lambda: TrainStageSpec(**STAGE_DEFAULTS[section][stage]))


def _merge_stage_defaults(section: str, data):
    if isinstance(data, dict):
        for stage, defaults in STAGE_DEFAULTS[section].items():
            if isinstance(data.get(stage), dict):
                data = {**data, stage: {**defaults, **data[stage]}}
    return data


class TrainSpec(_Strict):
    """Joint training of every exit: continued pretraining (cpt), then SFT; how and where the trainer runs."""

    cpt: TrainStageSpec = _stage_field("train", "cpt")
    sft: TrainStageSpec = _stage_field("train", "sft")
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    # bf16: bf16 weights and activations over fp32 master weights, gradients and Adam moments (megatron's mixed
    # precision; on the CPU the softmaxes, rotary embedding and core attention run in fp32). auto: the runtime's
    # dtype (spec.runtime: bf16 on GPUs, fp32 on the CPU).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # The layers' implementation: auto is Transformer Engine on GPUs (an error naming the fix when it cannot be
    # used) and megatron's local layers on the CPU; local trains on GPUs without Transformer Engine, slower.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    launcher: Literal["local", "trainjob"] = "local"  # local: torchrun here; trainjob: a Kubeflow Trainer TrainJob
    trainjob: TrainJobSpec = Field(default_factory=TrainJobSpec)

    @model_validator(mode="before")
    @classmethod
    def _stages(cls, data):
        return _merge_stage_defaults("train", data)

    def bf16(self, runtime_bf16: bool) -> bool:
        """Whether the megatron trainer runs in bf16 mixed precision, where the runtime's dtype is bf16 or not."""
        return runtime_bf16 if self.precision == "auto" else self.precision == "bf16"


class DaeSpec(_Strict):
    """DaE for one tier: Stable Block Expansion (zero-residual random blocks), then SVD compression."""

    enabled: bool = True
    tier: str = "end"  # an early exit's tier (not the deepest)
    # false: the control with the same compute: DaE's steps train the tier's own block, norm and head, unexpanded
    # (and nothing is compressed); bench/ablations.py compares the two
    expand: bool = True
    blocks: int = Field(3, ge=1)  # decoder blocks appended after the tier's branch block
    init: Literal["zero", "clone"] = "zero"  # clone: copies of the branch block (the report's ablation)
    std: float = Field(0.02, gt=0)  # Gaussian init of the new blocks' q, k, v, gate and up projections
    cpt: TrainStageSpec = _stage_field("dae", "cpt")
    sft: TrainStageSpec = _stage_field("dae", "sft")
    svd_ratio: float = Field(0.4, gt=0, lt=1)  # fraction of the added parameters to remove
    sweep: list[float] = [0.2, 0.4, 0.6]  # ratios the report's sweep compresses at (held-out loss vs size)
    calib_samples: int = Field(64, ge=1)  # held-out sequences whose activations whiten the SVD

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
    """GRPO on one tier with verifiable rewards. `rewards` maps a reward of ruyi_core.rl.rewards to its weight; GRPO
    maximises their weighted sum (default: exact answer, correct worked steps, answer format). `answer_pattern` is
    the form of a final answer in the SFT data: a regular expression whose one group captures the integer."""

    enabled: bool = True
    # grpo, or sft: GRPO's control, the same steps on the same parameters by SFT on data.sft's turns (as many
    # turns per step as GRPO has completions), so that what GRPO gains over it is the method's
    method: Literal["grpo", "sft"] = "grpo"
    tier: str = "end"  # the tier GRPO trains (only its own parameters; the trunk stays frozen)
    group_size: int = Field(8, ge=2)  # G completions per prompt
    steps: int = Field(30, ge=1)  # optimizer steps
    prompts_per_step: int = Field(4, ge=1)
    # Completions per forward/backward pass; the step's prompts_per_step x group_size are accumulated into one
    # optimizer step. Default: all of them in one pass (bounds activation memory on GPUs when set).
    micro_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(1e-4, gt=0)
    beta: float = Field(0.04, ge=0)  # KL to the reference policy (the tier before GRPO)
    clip_eps: float = Field(0.2, gt=0)  # the policy ratio's clip
    max_new_tokens: int = Field(64, ge=1)  # the demo's 3-step worked answer is ~52 tokens; generation stops at EOS
    temperature: float = Field(1.0, gt=0)  # sampling temperature of the completions
    heldout_prompts: int = Field(128, ge=1)  # of data.rl_heldout, for the reward before and after
    heldout_samples: int = Field(8, ge=1)  # completions per held-out prompt for the mean reward
    seed: int = 0
    # valid_steps: exact answers alone are too sparse for a small tier (a few percent of samples) to learn from.
    rewards: dict[str, float] = {"exact_answer": 1.0, "valid_steps": 1.0, "answer_format": 1.0}
    answer_pattern: str = r"####\s*([+-]?\d+)"  # GSM8K's final line

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
        from ruyi_core.rl.rewards import REWARD_NAMES

        if not v:
            raise ValueError(f"needs at least one reward, from {', '.join(REWARD_NAMES)}")
        for name in v:
            if name not in REWARD_NAMES:
                raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(REWARD_NAMES)}")
        return v

    @field_validator("answer_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        import re

        try:
            groups = re.compile(v).groups
        except re.error as e:
            raise ValueError(f"{v!r} is not a regular expression ({e})") from None
        if groups != 1:
            raise ValueError(f"{v!r} must have exactly one group, the answer (it has {groups})")
        return v
