"""Linears for megatron's local layer spec on the CPU. megatron's Column/RowParallelLinear run every product
through `LinearWithGradAccumulationAndAsyncCommunication`, a custom autograd function built for overlapping
GPU communication; on the CPU with one tensor-parallel rank there is nothing to overlap, and its backward's
products on [s*b, h] views run ~10% slower than torch's own linear autograd. These subclasses keep megatron's
modules (parameters, initialisation, sharded state dict, DDP hooks) and compute F.linear when the layer is
not split; any other layout falls back to megatron's path unchanged.

Under megatron's DDP the weight gradient goes straight into the parameter's `main_grad` buffer, as megatron's
gradient-accumulation fusion does on GPUs: one addmm into the buffer instead of a fresh gradient tensor that the
DDP hook then adds in (a pass over every weight's gradient per step).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def _plain(layer) -> bool:
    return layer.tp_group.size() == 1 and not layer.sequence_parallel


class _IntoMainGrad(torch.autograd.Function):
    """x @ w[rows].T for each row block of w (one block: the whole weight; fc1: gate and up); backward adds
    dL/dw into w's DDP buffer `main_grad` and marks w done, so megatron's DDP hook adds nothing more. w's own
    .grad gets an unused placeholder, as with megatron's fusion."""

    @staticmethod
    def forward(ctx, x, w, blocks: tuple[slice, ...]):
        ctx.save_for_backward(x, w)
        ctx.blocks = blocks
        return tuple(F.linear(x, w[b]) for b in blocks)

    @staticmethod
    def backward(ctx, *grads):
        x, w = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = None
        for b, g in zip(ctx.blocks, grads):
            if g is None:  # an output the loss does not use
                continue
            g2 = g.reshape(-1, g.shape[-1])
            w.main_grad[b].addmm_(g2.t(), x2)
            if grad_x is None:
                grad_x = g2 @ w[b]
            else:
                grad_x.addmm_(g2, w[b])
        w.grad_added_to_main_grad = True
        return None if grad_x is None else grad_x.view_as(x), torch.empty_like(w), None


def _fused(weight, x) -> bool:
    main = getattr(weight, "main_grad", None)
    return (main is not None and torch.is_grad_enabled() and weight.requires_grad
            and main.dtype == weight.dtype == x.dtype and main.device.type == "cpu")


def _matmul(weight, x, blocks: tuple[slice, ...] = (slice(None),)) -> tuple:
    """x @ weight[b].T per row block b, the weight gradient into main_grad when megatron's DDP gave it one."""
    if not _fused(weight, x):
        return tuple(F.linear(x, weight[b]) for b in blocks)
    return _IntoMainGrad.apply(x, weight, blocks)


def _linear(layer, input_):
    """(output, bias) as megatron's linears return them: the bias is added unless skip_bias_add."""
    (out,) = _matmul(layer.weight, input_)
    if layer.bias is None or layer.skip_bias_add:
        return out, layer.bias
    return out + layer.bias, None


class TorchColumnLinear(ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or not _plain(self):
            return super().forward(input_, weight, runtime_gather_output)
        return _linear(self, input_)


class TorchGateUpLinear(ColumnParallelLinear):
    """fc1 of a SwiGLU MLP: its gate and up halves as two products (as transformers' gate_proj and up_proj),
    so that SwiGLU's silu and its backward run on contiguous tensors; on one strided [s, b, 2f] product they
    run 2x slower on the CPU and autograd rebuilds fc1's gradient with a cat. Returns the pair, which
    megatron's MLP hands untouched to its activation module (swiglu.py)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or not _plain(self) or self.bias is not None:
            return super().forward(input_, weight, runtime_gather_output)
        f = self.weight.shape[0] // 2
        return _matmul(self.weight, input_, (slice(0, f), slice(f, None))), None


class TorchRowLinear(RowParallelLinear):
    def forward(self, input_):
        if not _plain(self):
            return super().forward(input_)
        return _linear(self, input_)


def with_torch_linears(spec):
    """A copy of a local GPT layer spec whose attention and MLP linears are the subclasses above (the MLP's
    activation must be SwiGLU, which takes fc1's pair)."""
    spec = copy.deepcopy(spec)
    attn, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attn.linear_qkv, attn.linear_proj = TorchColumnLinear, TorchRowLinear
    mlp.linear_fc1, mlp.linear_fc2 = TorchGateUpLinear, TorchRowLinear
    return spec
