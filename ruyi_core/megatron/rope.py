"""Rotary embedding in one autograd node for megatron's attention on the CPU.

megatron's unfused `_apply_rotary_pos_emb_bshd` takes cos and sin of the frequencies, rotates half of t with a
chunk, a negation and a cat, and cats the rotary part back onto the (empty) pass-through part: ~12 ops and as
many autograd nodes per query and key in every block. On GPUs Transformer Engine's fused kernel takes that slot
(`apply_rope_fusion`); on the CPU `apply_rotary` does the same maths in three ops each way, for the plain case
(non-interleaved rope over the whole head, no packed sequences, no YaRN scale) and hands every other case to
megatron's own function. The CPU shim (cpu.py) routes megatron's attention here.
"""
from __future__ import annotations

import torch

from ruyi_core.megatron import node


class _Rotary(torch.autograd.Function):
    """t * cos + rotate_half(t) * sin, rotate_half(t) = [-t2, t1] over the halves of the last dim."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        half = t.shape[-1] // 2
        ctx.dtype = t.dtype
        out = t * cos  # in cos's dtype: fp32 for bf16 queries and keys (see apply_rotary)
        out[..., :half].addcmul_(t[..., half:], sin[..., :half], value=-1)
        out[..., half:].addcmul_(t[..., :half], sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        # d/dt1 = g1 * cos1 + g2 * sin2, d/dt2 = g2 * cos2 - g1 * sin1
        out = grad * cos
        out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
        out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
        return out.to(ctx.dtype), None, None


def apply_rotary(fallback):
    """megatron's `apply_rotary_pos_emb` with the plain bshd case in one node; `fallback` (megatron's own
    function) for everything else."""

    # Every layer of a forward gets the same frequencies tensor (for query and key): cos and sin once per forward.
    # Holding `freqs` keeps the identity check sound.
    last: dict = {}

    def apply(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
        plain = (cu_seqlens is None and mscale == 1.0 and not config.rotary_interleaved
                 and not config.multi_latent_attention and config.mrope_section is None
                 and freqs.shape[-1] == t.shape[-1])
        if not plain:
            return fallback(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
        # bf16 queries and keys rotate in fp32 and stay so: the CPU's core attention runs in fp32 (attention.py),
        # and bf16 elementwise products here run ~3x slower than fp32 ones.
        dtype = torch.float32 if t.dtype == torch.bfloat16 and t.device.type == "cpu" else t.dtype
        if last.get("freqs") is not freqs or last["dtype"] != dtype:
            last.update(freqs=freqs, dtype=dtype, cos_sin=(freqs.cos().to(dtype), freqs.sin().to(dtype)))
        return node.apply(_Rotary, t, *last["cos_sin"])

    return apply
