"""RMSNorm for megatron's local layer spec under sequence parallelism. megatron's WrappedTorchNorm refuses
sequence parallelism; Transformer Engine (GPUs) has its own. With it, each TP rank normalises its s/TP tokens,
so a norm weight's gradient is partial on every rank: the `sequence_parallel` mark makes megatron's
finalize_model_grads sum it over TP."""
from __future__ import annotations

import copy

import torch


class SequenceParallelRMSNorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def with_sequence_parallel_norms(spec):
    """A copy of a local GPT layer spec whose four norms (block, MLP, q and k) accept sequence parallelism."""
    spec = copy.deepcopy(spec)
    sub, attn = spec.submodules, spec.submodules.self_attention.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = SequenceParallelRMSNorm
    if attn.q_layernorm is not None:
        attn.q_layernorm = attn.k_layernorm = SequenceParallelRMSNorm
    return spec
