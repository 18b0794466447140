"""What can be known from a spec and its base's config, checked when the spec is loaded: before any data is read,
a process started or a GPU pool scaled up. Each check returns one message naming the field and the fix."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
# A name that is safe as an S3 key part, a Kubernetes label value and a DNS-1123 label.
NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def quantity(q) -> float:
    """A Kubernetes quantity ("8Gi", "500m", "1.5", "1e9") as a number; ValueError names what is wrong."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)([a-zA-Z]{0,2})", str(q).strip())
    if m is None or m.group(2) not in _UNITS or not math.isfinite(float(m.group(1))):
        raise ValueError(f"{q!r} is not a Kubernetes quantity (a number with an optional unit: m, Mi, Gi, G, ...)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def base_config(base: str) -> dict | None:
    """The base's config (as config.json would hold it): a preset's (its vocabulary the tokenizer's target), a local
    checkpoint's, or a published Qwen3 release's by name; None for a base only the store has (checked when it is
    fetched)."""
    from ruyi_core.family.architectures import known_architecture
    from ruyi_core.family.presets import PRESETS

    if base in PRESETS:
        return PRESETS[base].qwen3_kwargs(PRESETS[base].tokenizer_vocab)
    cfg = Path(base) / "config.json"
    if "://" not in base and cfg.is_file():
        try:
            return json.loads(cfg.read_text())
        except (OSError, ValueError):
            raise ValueError(f"family.base: {cfg} is not readable JSON: point family.base at a checkpoint folder")
    return known_architecture(base)


def layout_problems(spec, cfg: dict | None = None) -> list[str]:
    """The parallel layout, batch sizes and sequence lengths against each other and against the base's config
    `cfg` (default: what base_config knows; the launcher passes the fetched family's)."""
    par, out = spec.train.parallel, []
    stages = {"train.cpt": spec.train.cpt, "train.sft": spec.train.sft}
    if spec.dae.enabled:
        stages |= {"dae.cpt": spec.dae.cpt, "dae.sft": spec.dae.sft}
    for name, st in stages.items():
        if st.global_batch_size % (st.micro_batch_size * par.dp):
            out.append(f"{name}.global_batch_size ({st.global_batch_size}) must be a multiple of micro_batch_size x "
                       f"train.parallel.dp ({st.micro_batch_size} x {par.dp})")
        weights = st.loss.weights
        if weights is not None and len(weights) != len(spec.family.exit_points):
            out.append(f"{name}.loss.weights has {len(weights)} entries for {len(spec.family.exit_points)} exits: "
                       "give one weight per exit, shallowest first")
    if spec.train.launcher == "local" and par.nodes != 1:
        out.append("train.parallel.nodes > 1 needs train.launcher: trainjob")
    if spec.train.launcher == "trainjob":
        per_node = spec.train.trainjob.gpus_per_node or 1
        if par.world_size != par.nodes * per_node:
            out.append(f"train.parallel: TP x PP x DP = {par.world_size} processes, but train.parallel.nodes x "
                       f"train.trainjob.gpus_per_node = {par.nodes * per_node}: adjust train.parallel.dp")
    cfg = cfg if cfg is not None else base_config(spec.family.base)
    if cfg is not None:
        out += _base_problems(spec, cfg, stages)
    return out + _sequence_parallel_problems(par, stages)


def _sequence_parallel_problems(par, stages: dict) -> list[str]:
    out = []
    if par.sequence_parallel and par.tp == 1:
        out.append("train.parallel.sequence_parallel needs tp > 1 (it splits the sequence over the TP ranks)")
    if par.sequence_parallel is not False and par.tp > 1:  # on by default on GPUs
        out += [f"{name}.seq_length ({st.seq_length}) must be a multiple of train.parallel.tp ({par.tp}) for "
                "sequence parallelism" for name, st in stages.items() if st.seq_length % par.tp]
    return out


def _base_problems(spec, cfg: dict, stages: dict) -> list[str]:
    par, out = spec.train.parallel, []
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    kv = cfg.get("num_key_value_heads") or heads
    if heads % par.tp or kv % par.tp:
        out.append(f"train.parallel.tp = {par.tp} must divide the base's {heads} attention heads and {kv} key/value "
                   "heads")
    if cfg.get("vocab_size") and cfg["vocab_size"] % par.tp:
        out.append(f"train.parallel.tp = {par.tp} must divide the vocabulary ({cfg['vocab_size']})")
    if layers % par.pp:
        out.append(f"train.parallel.pp = {par.pp} must divide the base's {layers} layers")
    positions = cfg.get("max_position_embeddings")
    for name, st in stages.items():
        if positions and st.seq_length > positions:
            out.append(f"{name}.seq_length ({st.seq_length}) exceeds the base's {positions} positions")
    return out
