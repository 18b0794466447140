"""SwiGLU for megatron's local MLP (no Transformer Engine, i.e. the CPU): silu(gate) * up, taking fc1's
output either as the (gate, up) pair that `linear.TorchGateUpLinear` returns or as megatron's one
[s, b, 2f] tensor (a tensor-parallel fc1). megatron's own unfused GLU computes silu(gate) * (up +
config.glu_linear_offset) on strided halves: the offset add is a full copy even at 0.

megatron's MLP applies its `activation_func` submodule to the whole fc1 output only when
config.use_te_activation_func is set (the flag TE's activation ops use); `transformer_config` sets it
exactly when this module is in the spec (no CUDA, hence megatron's local spec).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


class SwiGLU(torch.nn.Module):
    """silu(gate) * up over fc1's [gate; up] output (per TP rank, as megatron's GLU)."""

    def __init__(self, config=None):
        super().__init__()
        if config is not None and not (config.gated_linear_unit and config.activation_func is F.silu
                                       and not config.glu_linear_offset
                                       and config.activation_func_clamp_value is None):
            raise ValueError("SwiGLU: needs a plain silu GLU (no offset, no clamp)")

    def forward(self, x):
        gate, up = x if isinstance(x, tuple) else x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return {}  # no parameters


def with_swiglu(spec):
    """A copy of a local GPT layer spec whose MLP activation is SwiGLU."""
    spec = copy.deepcopy(spec)
    spec.submodules.mlp.submodules.activation_func = SwiGLU
    return spec
