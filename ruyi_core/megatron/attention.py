"""Core attention through torch's scaled_dot_product_attention, for megatron's local spec (no Transformer
Engine, i.e. the CPU). megatron's own DotProductAttention materialises [b*heads, s, s] scores with baddbmm
and a separate masked softmax; SDPA runs a fused causal kernel (flash attention on the CPU) and needs no
explicit mask. Same constructor and forward interface, so it drops into the spec's `core_attention` slot.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in for megatron.core.transformer.dot_product_attention.DotProductAttention (vanilla softmax,
    no window, no packed sequences): q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np * hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: ProcessGroupCollection | None = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention: context parallelism needs Transformer Engine")
        if config.softmax_type != "vanilla" or is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("SDPAttention: only vanilla softmax over full causal/padding masks")
        self.layer_number, self.attn_mask_type = max(1, layer_number), attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection, self.tp_group = pg_collection, pg_collection.tp
        tp = pg_collection.tp.size()
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp)
        self.hidden_size_per_attention_head = divide(projection, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        # megatron divides the scale by layer_number under apply_query_key_layer_scaling and multiplies it
        # back in the softmax: the net scale is the unscaled one.
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "SDPAttention: no packed sequences/bias"
        # [s, b, n, d] -> [b, n, s, d] (views; the kernel takes strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        # bf16 on the CPU: torch's flash-attention kernel runs ~3x slower in bf16 than in fp32 (its backward
        # most); queries and keys arrive in fp32 from the rotary embedding (rope.py), values are cast.
        dtype = value.dtype
        if dtype == torch.bfloat16 and q.device.type == "cpu":
            q, k, v = q.float(), k.float(), v.float()
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        mask = None
        if attention_mask is not None:  # megatron's masks are True where masked; SDPA's True = attend
            mask, causal = ~attention_mask, False
        dropout = self.dropout_p if self.training else 0.0
        kw = dict(attn_mask=mask, dropout_p=dropout, is_causal=causal and q.shape[2] > 1,
                  scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        if dropout > 0.0:  # the same RNG region megatron's DotProductAttention draws its dropout from
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, **kw)
        else:
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        out = out.to(dtype)
        # [b, n, sq, d] -> [sq, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], self.hidden_size_per_partition)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return {}  # no parameters (vanilla softmax has no learnable offset)


def with_sdpa(spec):
    """A copy of a local GPT layer spec whose self-attention core is SDPAttention."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def uses_sdpa(spec) -> bool:
    """Whether a layer spec's self-attention core is SDPAttention (causal without an explicit mask)."""
    attn = getattr(getattr(spec, "submodules", None), "self_attention", None)
    return getattr(getattr(attn, "submodules", None), "core_attention", None) is SDPAttention
