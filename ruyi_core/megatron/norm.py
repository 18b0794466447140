"""RMSNorm for megatron's local layer spec (no Transformer Engine, i.e. the CPU).

megatron's WrappedTorchNorm is torch.nn.RMSNorm, which on the CPU is a chain of elementwise ops whose autograd
saves and revisits each intermediate (~16 passes over the activations per norm, forward and backward; a Qwen3
block has four norms). RMSNorm here does the same maths in one autograd node with the analytic backward (~8
passes); `rms_forward`/`rms_backward` are that maths for the linears that run the block's norms (linear.py).
Under sequence parallelism each TP rank normalises its s/TP tokens, so a norm weight's gradient is
partial on every rank: the `sequence_parallel` mark makes megatron's finalize_model_grads sum it over TP."""
from __future__ import annotations

import copy

import torch

from ruyi_core.megatron import node


def rms_forward(x, weight, eps: float):
    """(y, xhat, r): y = x * r * w in x's dtype with r = 1 / sqrt(mean(x^2) + eps) over the last dim, the
    statistics in fp32 whatever the activations' dtype (a no-op for fp32); xhat and r are what backward needs."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    xhat = xf * r
    return (xhat * weight.float()).to(x.dtype), xhat, r


def rms_backward(grad, xhat, r, weight, dtype):
    """(dL/dx in `dtype`, dL/dweight) from dL/dy."""
    g = grad.float()
    gw = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
    gxhat = g * weight.float()
    # d/dx of x * r, r = mean(x^2)^-1/2: r * (gxhat - xhat * mean(gxhat * xhat))
    dot = (gxhat * xhat).mean(-1, keepdim=True)
    return gxhat.sub_(xhat * dot).mul_(r).to(dtype), gw


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, xhat, r = rms_forward(x, weight, eps)
        ctx.save_for_backward(xhat, r, weight)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        xhat, r, weight = ctx.saved_tensors
        return *rms_backward(grad, xhat, r, weight, ctx.dtype), None


def rms_norm(x, weight, eps: float):
    return node.apply(_RMSNormFn, x, weight, eps)


class RMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm's parameters and results (up to rounding), with one autograd node."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        # in params_dtype, as Transformer Engine's norms: megatron's bf16 optimizer expects no fp32 parameters
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def with_rms_norms(spec):
    """A copy of a local GPT layer spec whose q and k norms are RMSNorm (the block's two norms run inside the
    linears after them: linear.with_torch_linears)."""
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention.submodules
    if attn.q_layernorm is not None:
        attn.q_layernorm = attn.k_layernorm = RMSNorm
    return spec
