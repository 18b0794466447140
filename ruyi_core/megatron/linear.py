"""Linears for megatron's local layer spec on the CPU. megatron's Column/RowParallelLinear run every product
through `LinearWithGradAccumulationAndAsyncCommunication`, a custom autograd function built for overlapping
GPU communication; on the CPU with one tensor-parallel rank there is nothing to overlap, and its backward's
products on [s*b, h] views run ~10% slower than torch's own linear autograd. These subclasses keep megatron's
modules (parameters, initialisation, sharded state dict, DDP hooks) and compute F.linear when the layer is
not split; any other layout falls back to megatron's path unchanged.
"""
from __future__ import annotations

import copy

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


def _plain(layer) -> bool:
    return layer.tp_group.size() == 1 and not layer.sequence_parallel


def _linear(layer, input_):
    """(output, bias) as megatron's linears return them: the bias is added unless skip_bias_add."""
    if layer.skip_bias_add:
        return F.linear(input_, layer.weight), layer.bias
    return F.linear(input_, layer.weight, layer.bias), None


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
        gate, up = self.weight.chunk(2, dim=0)
        return (F.linear(input_, gate), F.linear(input_, up)), None


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
