"""RMSNorm for megatron's local layer spec (no Transformer Engine, i.e. the CPU).

megatron's WrappedTorchNorm is torch.nn.RMSNorm, which on the CPU is a chain of elementwise ops whose autograd
saves and revisits each intermediate (~16 passes over the activations per norm, forward and backward; a Qwen3
block has four norms). RMSNorm here does the same maths in one autograd node with the analytic backward (~8
passes). Under sequence parallelism each TP rank normalises its s/TP tokens, so a norm weight's gradient is
partial on every rank: the `sequence_parallel` mark makes megatron's finalize_model_grads sum it over TP."""
from __future__ import annotations

import copy

import torch


class _RMSNormFn(torch.autograd.Function):
    """y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) over the last dim, in x's dtype (fp32 here)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()  # statistics in fp32 whatever the activations' dtype (a no-op for fp32)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = xf * r
        ctx.save_for_backward(xhat, r, weight)
        ctx.dtype = x.dtype
        return (xhat * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xhat, r, weight = ctx.saved_tensors
        g = grad.float()
        gw = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        gxhat = g * weight.float()
        # d/dx of x * r, r = mean(x^2)^-1/2: r * (gxhat - xhat * mean(gxhat * xhat))
        dot = (gxhat * xhat).mean(-1, keepdim=True)
        return gxhat.sub_(xhat * dot).mul_(r).to(ctx.dtype), gw, None


class RMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm's parameters and results (up to rounding), with one autograd node."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        return _RMSNormFn.apply(x, self.weight, self.eps)



def with_rms_norms(spec):
    """A copy of a local GPT layer spec whose four norms (block, MLP, q and k) are RMSNorm."""
    spec = copy.deepcopy(spec)
    sub, attn = spec.submodules, spec.submodules.self_attention.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
    if attn.q_layernorm is not None:
        attn.q_layernorm = attn.k_layernorm = RMSNorm
    return spec
