"""`ruyi plan`: what each stage of a run needs, per GPU, before any GPU is asked for.

Sizes come from the base's architecture (a preset, a local config.json, or a published Qwen3 release by
name); memory follows the runtime each stage uses on that hardware: bf16 weights, fp32 gradient buffers and
megatron's distributed optimizer (fp32 master copy + Adam moments, sharded over data parallel) on GPUs; fp32
everywhere on the CPU. Activations are Korthikanti et al.'s per-layer count (flash attention, so no s^2 term;
sequence parallel under TP), times the microbatches a 1F1B pipeline keeps in flight; a training stage's peak is
that or loading its starting checkpoint (the loaded copy beside weights and gradient buffers), whichever is larger,
and on the CPU the trainer process's own ~1 GiB (torch, megatron, transformers) counts. Step times are FLOPs
(6 per parameter per token, plus causal attention) at a stated model-FLOPs utilisation."""
from __future__ import annotations

from dataclasses import dataclass, field

from ruyi_core.errors import RuyiError
from ruyi_core.spec.checks import quantity
from ruyi_core.spec.train import TRAINING_STAGES, training_stages

MFU = 0.40  # step-time estimates assume this share of the GPU's dense bf16 peak
GRPO_PROMPT_TOKENS = 512  # the plan's bound on a GRPO prompt (chat-templated question)
USABLE = 0.90  # of a device's memory: CUDA context, NCCL buffers and fragmentation take the rest
PROCESS_BYTES = 2**30  # a training process's own resident memory on the host (torch, megatron, transformers)


@dataclass(frozen=True)
class Device:
    name: str
    memory: float  # bytes
    peak_flops: float  # dense, in the plan's compute dtype
    weight_bytes: int  # bytes per weight in this runtime


DEVICES = {
    "h100-80gb": Device("H100 80GB", 80e9, 989e12, 2),
    "h200-141gb": Device("H200 141GB", 141e9, 989e12, 2),
}


def cpu_device() -> Device:
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device(f"CPU ({memory / 2**30:.0f} GiB)", float(memory), 0.0, 4)


@dataclass(frozen=True)
class Arch:
    """The fields of a Qwen2/Qwen3 config that decide parameter counts and memory."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    qk_norm: bool = True  # Qwen3; Qwen2 has q/k/v biases instead
    positions: int = 32768

    @classmethod
    def from_config(cls, d: dict) -> "Arch":
        return cls(vocab=d["vocab_size"], hidden=d["hidden_size"], intermediate=d["intermediate_size"],
                   layers=d["num_hidden_layers"], heads=d["num_attention_heads"],
                   kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                   head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
                   tied=bool(d.get("tie_word_embeddings", False)), qk_norm=d.get("model_type") != "qwen2",
                   positions=d.get("max_position_embeddings", 32768))

    @property
    def block(self) -> int:
        """One decoder block: attention (q, k, v, o), SwiGLU MLP, two norms (+ q/k norms or q/k/v biases)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden
        extra = 2 * self.head_dim if self.qk_norm else q + 2 * kv
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden + extra

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    def base(self) -> tuple[int, int]:
        """(total, non-embedding) parameters of the base, as model cards count them."""
        body = self.layers * self.block + self.hidden
        return body + self.embedding * (1 if self.tied else 2), body

    def tier(self, exit_point: int, added: int = 0) -> int:
        """A standalone tier: embeddings, exit_point + 1 (+ DaE) blocks, its norm and its own head."""
        return self.embedding + (exit_point + 1 + added) * self.block + self.hidden + self.embedding

    def family(self, exit_points: list[int], shared_heads: bool) -> int:
        """Trunk, a branch block per early exit, a norm per exit, a head per exit (one when shared)."""
        heads = 1 if shared_heads else len(exit_points)
        return (self.embedding + (self.layers + len(exit_points) - 1) * self.block
                + len(exit_points) * self.hidden + heads * self.embedding)


def base_arch(base: str, store_config=None) -> Arch:
    """The base's architecture: what the spec checks know (a preset, a local checkpoint, a published Qwen3 name),
    else the config.json `store_config` reads from the store."""
    from ruyi_core.spec.checks import base_config

    try:
        cfg = base_config(base)
    except ValueError as e:
        raise RuyiError(str(e)) from None
    if cfg is None and store_config is not None and "://" in base:
        cfg = store_config(base)
    if cfg is None:
        raise RuyiError(f"cannot size base {base!r}: it is not a preset, a local checkpoint or a published Qwen3 "
                        "name, and its config.json could not be read from the store")
    return Arch.from_config(cfg)


@dataclass
class StagePlan:
    stage: str
    parameters: int
    trained: int
    weights: float = 0.0  # bytes per GPU
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    # Loading the stage's starting checkpoint holds the loaded copy beside the weights and gradient buffers
    # (before the optimizer state exists); the peak is the larger of that and training.
    loading: float = 0.0
    gpus: int = 1
    step_s: float | None = None
    note: str = ""
    fits: bool = field(default=True)

    @property
    def total(self) -> float:
        training = self.weights + self.grads + self.optimizer + self.activations
        return max(training, self.weights + self.grads + self.loading)


def _layer_activation_bytes(a: Arch, tokens: int, act_bytes: int, tp: int, seq_par: bool = True) -> float:
    """What one block keeps for its backward, per microbatch of `tokens` (= seq x micro batch): the block input,
    both norm outputs and the residual, q/k/v and their norms' inputs, the attention output, and SwiGLU's gate,
    up and product; all split over TP with sequence parallelism, only the TP-sharded ones without."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    replicated, sharded = 4 * a.hidden, 3 * q + 3 * kv + 3 * a.intermediate
    return tokens * act_bytes * ((replicated + sharded) / tp if seq_par else replicated + sharded / tp)


def _stage_layout(a: Arch, exits: list[int], shared: bool, pp: int, added: int = 0, dae_exit: int | None = None):
    """Per pipeline stage: (parameters, blocks it runs, exits it holds); trunk layers split evenly, a branch
    sits on the stage of its trunk layer, the embedding on the first, the last exit's head on the last."""
    per = -(-a.layers // pp)
    stages = []
    for s in range(pp):
        layers = range(s * per, min((s + 1) * per, a.layers))
        held = [p for p in exits if p in layers]
        blocks = len(layers) + sum(1 for p in held if p != exits[-1]) + (added if dae_exit in held else 0)
        params = blocks * a.block + len(held) * a.hidden + (a.embedding if s == 0 else 0)
        params += a.embedding * (len(held) if not shared else int(s == pp - 1))
        stages.append((params, blocks, len(held)))
    return stages


def train_plan(name: str, a: Arch, exits: list[int], shared: bool, st, par, dev: Device,
               added: int = 0, dae_exit: int | None = None, bf16: bool | None = None) -> StagePlan:
    """A megatron training stage (CPT, SFT, or a DaE stage when `added` blocks follow exit `dae_exit`), in bf16
    mixed precision or fp32 (`bf16`; default: bf16 on GPUs)."""
    gpu = dev.peak_flops > 0
    bf16 = gpu if bf16 is None else bf16
    dist_opt, seq_par = par.resolved(gpu)
    wb = ab = 2 if bf16 else 4
    tp, pp, dp = par.tp, par.pp, par.dp
    tokens = st.seq_length * st.micro_batch_size
    n_micro = max(st.global_batch_size // (st.micro_batch_size * dp), 1)
    total = a.family(exits, shared) + added * a.block
    # a DaE stage trains its added blocks, or unexpanded (the control) the tier's own block, and the head
    trained = total if dae_exit is None else (added or 1) * a.block + a.hidden + a.embedding
    worst = None
    for s, (params, blocks, heads) in enumerate(_stage_layout(a, exits, shared, pp, added, dae_exit)):
        share = trained / total
        w = params * wb / tp
        g = params * share * 4 / tp  # fp32 gradient buffers (grad_reduce_in_fp32)
        # Adam moments (+ an fp32 master copy of bf16 weights), sharded over DP by the distributed optimizer
        o = params * share * (12 if bf16 else 8) / (dp if dist_opt else 1) / tp
        in_flight = min(pp - s, n_micro)
        layer = _layer_activation_bytes(a, tokens, ab, tp, seq_par)
        full = st.recompute in (True, "full")  # selective recompute saves the attention scores flash never keeps
        block_input = 2 * tokens * a.hidden * ab / (tp if seq_par else 1)
        kept = blocks * (block_input if full else layer) + (layer if full else 0)
        logits = heads * tokens * a.vocab * (10 if bf16 else 8) / tp
        # On the CPU the device is the host: the trainer process itself (torch, megatron, transformers) counts.
        plan = StagePlan(name, total, trained, w, g, o, kept * in_flight + logits + (0 if gpu else PROCESS_BYTES),
                         loading=w + (0 if gpu else PROCESS_BYTES), gpus=tp * pp * dp)
        if worst is None or plan.total > worst.total:
            worst = plan
    if gpu:
        compute_blocks = a.layers + len(exits) - 1 + added
        per_token = 6 * (compute_blocks * a.block + len(exits) * a.embedding)
        per_token += 6 * compute_blocks * st.seq_length * a.heads * a.head_dim  # causal attention, fwd + bwd
        per_token *= 4 / 3 if st.recompute in (True, "full") else 1  # a second forward
        worst.step_s = per_token * st.global_batch_size * st.seq_length / (worst.gpus * dev.peak_flops * MFU)
    worst.note = f"TP {tp}{' (SP)' if seq_par else ''} x PP {pp} x DP {dp}" + (f", {'full' if st.recompute is True else st.recompute} recompute"
                                                     if st.recompute else "")
    return worst


def infer_plan(name: str, params: int, a: Arch, depth: int, seqs: int, length: int, dev: Device,
               note: str = "") -> StagePlan:
    """A stage that loads one model and runs it: weights plus the KV cache of `seqs` sequences of `length`."""
    kv = seqs * length * depth * 2 * a.kv_heads * a.head_dim * dev.weight_bytes
    logits = seqs * length * a.vocab * 2 + length * a.vocab * 4  # bf16 logits; one row's fp32 log-softmax
    return StagePlan(name, params, 0, params * dev.weight_bytes, activations=kv + logits, note=note)


def grpo_plan(a: Arch, exit_point: int, added: int, rl, dev: Device) -> StagePlan:
    """GRPO on one tier (TRL): only the tier's own blocks, norm and head train (the DaE blocks when expanded,
    else its exit block), a frozen reference copy when the KL term is on, and one step's whole group of
    completions (prompts_per_step x group_size) in the KV cache and through the trained blocks."""
    n, depth, own = a.tier(exit_point, added), exit_point + 1 + added, added or 1
    trained = own * a.block + a.hidden + a.embedding
    seqs, length = rl.prompts_per_step * rl.group_size, GRPO_PROMPT_TOKENS + rl.max_new_tokens
    w = n * dev.weight_bytes * (2 if rl.beta > 0 else 1)
    kv = seqs * length * depth * 2 * a.kv_heads * a.head_dim * dev.weight_bytes
    micro = rl.micro_batch_size or seqs
    act = (own * _layer_activation_bytes(a, micro * length, dev.weight_bytes, 1)
           + micro * rl.max_new_tokens * a.vocab * 8)
    opt = trained * (12 if dev.peak_flops else 8)
    note = (f"{rl.prompts_per_step} prompts x {rl.group_size} samples in passes of {micro}, "
            f"prompts <= {GRPO_PROMPT_TOKENS} tokens")
    return StagePlan("grpo", n, trained, w, trained * 4, opt, kv + act,
                     note=note + (", reference copy" if rl.beta else ""))

def default_device(spec) -> str:
    """What the spec's training runs on: GPUs when its train step asks for them or it uses the TrainJob
    launcher, else this machine's CPU."""
    wants_gpu = spec.pipeline.resources_for("train").gpus > 0 or spec.train.launcher == "trainjob"
    return "h100-80gb" if wants_gpu else "cpu"


def plan_run(spec, device: str | None = None, store_config=None) -> tuple[Device, Arch, list[StagePlan]]:
    """Every stage's plan for `spec` on `device` (a DEVICES key or "cpu"; default from the spec)."""
    device = device or default_device(spec)
    if device != "cpu" and device not in DEVICES:
        raise RuyiError(f"unknown --gpu {device!r}: use one of {', '.join(DEVICES)} or cpu")
    dev = cpu_device() if device == "cpu" else DEVICES[device]
    a = base_arch(spec.family.base, store_config)
    fam, par, dae, rl = spec.family, spec.train.parallel, spec.dae, spec.rl
    exits, tiers = fam.exit_points, fam.tiers
    wb = dev.weight_bytes
    rows = [StagePlan("init_family", a.family(exits, fam.shared_heads), 0,
                      a.family(exits, fam.shared_heads) * wb, note="host")]
    bf16 = spec.train.bf16(dev.peak_flops > 0)  # the runtime's dtype: bf16 on GPUs, fp32 on the CPU
    for stage in training_stages("train"):
        rows.append(train_plan(stage, a, exits, fam.shared_heads, spec.train_stage(stage), par, dev, bf16=bf16))
    added = 0
    if dae.enabled:
        added, p = dae.blocks if dae.expand else 0, tiers[dae.tier]
        for stage in training_stages("dae"):
            rows.append(train_plan(stage, a, exits, fam.shared_heads, spec.train_stage(stage), par, dev, added, p,
                                   bf16))
        n = a.tier(p, added)
        if dae.expand:
            rows.append(StagePlan("svd_compress", n, 0, 2 * n * wb,
                                  note=f"host; tier {dae.tier} and its compressed copy"))
    if rl.enabled:
        p = tiers[rl.tier]
        rows.append(grpo_plan(a, p, added if dae.enabled and dae.tier == rl.tier else 0, rl, dev))
    deepest = max(tiers.values())
    rows.append(StagePlan("export_tier", a.tier(deepest), 0, a.tier(deepest) * wb, note="host; the deepest tier"))
    length = spec.train.sft.seq_length + spec.eval.max_new_tokens
    rows.append(infer_plan("evaluate", a.tier(deepest), a, deepest + 1, spec.eval.batch_size, length, dev,
                           note=f"the deepest tier, batch {spec.eval.batch_size}"))
    for r in rows:
        limit = dev.memory if device == "cpu" or not r.note.startswith("host") else \
            quantity(spec.pipeline.resources_for(r.stage).memory)
        r.fits = r.total <= limit * USABLE
    return dev, a, rows


def refusal(spec, dev: Device, rows: list[StagePlan]) -> str | None:
    """One line naming the first stage that cannot fit, and what to change; None when all fit."""
    for r in rows:
        if not r.fits:
            where = "its pod's memory (pipeline.resources)" if r.note.startswith("host") else dev.name
            fix = ("raise train.parallel.tp / pp, turn on recompute, or lower micro_batch_size"
                   if r.gpus > 1 or r.stage in TRAINING_STAGES else
                   "give the step more memory or a larger GPU (--gpu)")
            return f"plan: stage {r.stage} needs {r.total / 2**30:.1f} GiB per device, more than {where}: {fix}"
    return None


def check_fits(spec) -> None:
    """Refuse (RuyiError) a spec some stage of which cannot fit on what it trains on. A base known only to the
    store is sized when it is fetched instead."""
    try:
        dev, _, rows = plan_run(spec)
    except RuyiError as e:
        if str(e).startswith("cannot size base"):
            return
        raise
    line = refusal(spec, dev, rows)
    if line:
        raise RuyiError(f"{line} (ruyi plan --spec ... shows every stage)")
