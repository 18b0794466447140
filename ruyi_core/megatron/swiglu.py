"""SwiGLU for megatron's local MLP (no Transformer Engine, i.e. the CPU). megatron's unfused GLU computes
silu(gate) * (up + config.glu_linear_offset) on strided halves of fc1's output: the offset add is a full
copy even at 0, and autograd then rebuilds fc1's gradient with a cat. This module computes the same numbers
and writes both halves of that gradient in place.

megatron's MLP applies its `activation_func` submodule to the whole fc1 output only when
config.use_te_activation_func is set (the flag TE's activation ops use); `transformer_config` sets it
exactly when this module is in the spec (no CUDA, hence megatron's local spec).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        gate, up = x.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        gate, up, act = ctx.saved_tensors
        out = torch.empty(*grad.shape[:-1], 2 * grad.shape[-1], dtype=grad.dtype, device=grad.device)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        torch.mul(grad, act, out=d_up)
        return out


class SwiGLU(torch.nn.Module):
    """silu(gate) * up over fc1's [gate; up] output (per TP rank, as megatron's GLU)."""

    def __init__(self, config=None):
        super().__init__()
        if config is not None and not (config.gated_linear_unit and config.activation_func is F.silu
                                       and not config.glu_linear_offset
                                       and config.activation_func_clamp_value is None):
            raise ValueError("SwiGLU: needs a plain silu GLU (no offset, no clamp)")

    def forward(self, x):
        return _SwiGLU.apply(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return {}  # no parameters


def with_swiglu(spec):
    """A copy of a local GPT layer spec whose MLP activation is SwiGLU."""
    spec = copy.deepcopy(spec)
    spec.submodules.mlp.submodules.activation_func = SwiGLU
    return spec
