"""Linears for megatron's local layer spec on the CPU. megatron's Column/RowParallelLinear run every product
through `LinearWithGradAccumulationAndAsyncCommunication`, a custom autograd function built for overlapping
GPU communication; on the CPU with one tensor-parallel rank there is nothing to overlap, and its backward's
products on [s*b, h] views run ~10% slower than torch's own linear autograd. These subclasses keep megatron's
modules (parameters, initialisation, sharded state dict, DDP hooks) and compute F.linear when the layer is
not split; any other layout falls back to megatron's path unchanged.

Under megatron's DDP the weight gradient goes straight into the parameter's `main_grad` buffer, as megatron's
gradient-accumulation fusion does on GPUs: one addmm into the buffer instead of a fresh gradient tensor that the
DDP hook then adds in (a pass over every weight's gradient per step). The block's two RMSNorms run inside
linear_qkv and linear_fc1, as Transformer Engine's LayerNormLinear runs them on GPUs and under its parameter
names, so a family's megatron names are the same on every device.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from ruyi_core.megatron import node
from ruyi_core.megatron.norm import rms_backward, rms_forward, rms_norm


def _plain(layer) -> bool:
    return layer.tp_group.size() == 1 and not layer.sequence_parallel


class _Linear(torch.autograd.Function):
    """[RMSNorm ->] x @ w.T, or the pair (x @ w[:split].T, x @ w[split:].T) (fc1's gate and up). With a norm
    weight the block's RMSNorm runs first, in the same node, as in TE's LayerNormLinear. Backward adds dL/dw
    into w's DDP buffer `main_grad` where megatron's DDP gave one (`into_main`) and marks w done, so DDP's hook
    adds nothing more (w's .grad gets an unused placeholder, as with megatron's fusion); else dL/dw is w's grad."""

    @staticmethod
    def forward(ctx, x, w, split: int | None, into_main: bool, norm_w, eps: float):
        xhat = r = None
        if norm_w is not None:
            ctx.dtype = x.dtype
            x, xhat, r = rms_forward(x, norm_w, eps)
        ctx.save_for_backward(x, w, xhat, r, norm_w)
        ctx.split, ctx.into_main = split, into_main
        if split is None:
            return F.linear(x, w)
        return F.linear(x, w[:split]), F.linear(x, w[split:])

    @staticmethod
    def backward(ctx, *grads):
        x, w, xhat, r, norm_w = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        gw = None
        if ctx.needs_input_grad[1]:
            gw = w.main_grad if ctx.into_main else torch.zeros_like(w)
        rows = (slice(None),) if ctx.split is None else (slice(None, ctx.split), slice(ctx.split, None))
        grad_x = None
        for b, g in zip(rows, grads):
            if g is None:  # an output the loss does not use
                continue
            g2 = g.reshape(-1, g.shape[-1])
            if gw is not None:
                add_product(gw[b], g2.t(), x2)
            grad_x = g2 @ w[b] if grad_x is None else grad_x.addmm_(g2, w[b])
        if gw is not None and ctx.into_main:
            w.grad_added_to_main_grad = True
            gw = torch.empty_like(w)
        grad_norm_w = None
        if grad_x is not None:
            grad_x = grad_x.view_as(x)
            if norm_w is not None:
                grad_x, grad_norm_w = rms_backward(grad_x, xhat, r, norm_w, ctx.dtype)
        return grad_x, gw, None, None, grad_norm_w, None


def _into_main(weight, x) -> bool:
    main = getattr(weight, "main_grad", None)
    return main is not None and weight.dtype == x.dtype and main.device.type == "cpu"


def add_product(out, a, b, alpha: float = 1.0) -> None:
    """out += alpha * a @ b; a bf16 product lands in an fp32 buffer (megatron's main_grad under bf16) with one
    add, as megatron's fp32 gradient accumulation does on GPUs (the CPU has no mixed-dtype addmm)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(torch.mm(a, b), alpha=alpha)


def _matmul(weight, x, split: int | None = None, norm=None):
    """[RMSNorm(x; norm = (weight, eps)) ->] x @ weight.T (or the pair split at row `split`), as one node."""
    norm_w, eps = norm or (None, 0.0)
    if not torch.is_grad_enabled():
        if norm_w is not None:
            x = rms_forward(x, norm_w, eps)[0]
        return F.linear(x, weight) if split is None else (F.linear(x, weight[:split]), F.linear(x, weight[split:]))
    return node.apply(_Linear, x, weight, split, _into_main(weight, x), norm_w, eps)


def _linear(layer, input_, norm=None):
    """(output, bias) as megatron's linears return them: the bias is added unless skip_bias_add."""
    out = _matmul(layer.weight, input_, None, norm)
    if layer.bias is None or layer.skip_bias_add:
        return out, layer.bias
    return out + layer.bias, None


def _normed(norm, x):
    return x if norm is None else rms_norm(x, *norm)


class TorchColumnLinear(ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        norm = self._norm()
        if weight is not None or not _plain(self):
            return super().forward(_normed(norm, input_), weight, runtime_gather_output)
        return _linear(self, input_, norm)

    def _norm(self):
        return None


class TorchGateUpLinear(TorchColumnLinear):
    """fc1 of a SwiGLU MLP: its gate and up halves as two products (as transformers' gate_proj and up_proj),
    so that SwiGLU's silu and its backward run on contiguous tensors; on one strided [s, b, 2f] product they
    run 2x slower on the CPU and autograd rebuilds fc1's gradient with a cat. Returns the pair, which
    megatron's MLP hands untouched to its activation module (swiglu.py)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or not _plain(self) or self.bias is not None:
            return super().forward(input_, weight, runtime_gather_output)
        return _matmul(self.weight, input_, self.weight.shape[0] // 2, self._norm()), None


class _NormFirst:
    """The block's RMSNorm run by the linear after it, as Transformer Engine's LayerNormColumnParallelLinear
    runs it (input_layernorm in linear_qkv, pre_mlp_layernorm in linear_fc1) and under its name,
    `layer_norm_weight`: one autograd node instead of two, and the TE spec's parameter names on every device
    (megatron's checkpoints of the local spec already map its norms to them)."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, device=self.weight.device,
                                                               dtype=config.params_dtype))
        # Under sequence parallelism each rank normalises its s/TP tokens: megatron sums this gradient over TP.
        self.layer_norm_weight.sequence_parallel = config.sequence_parallel
        self.layer_norm_eps = config.layernorm_epsilon

    def _norm(self):
        return self.layer_norm_weight, self.layer_norm_eps


class TorchNormColumnLinear(_NormFirst, TorchColumnLinear):
    pass


class TorchNormGateUpLinear(_NormFirst, TorchGateUpLinear):
    pass


class TorchRowLinear(RowParallelLinear):
    def forward(self, input_):
        if not _plain(self):
            return super().forward(input_)
        return _linear(self, input_)


def with_torch_linears(spec, gate_up: bool = True):
    """A copy of a local GPT layer spec whose attention and MLP linears are the subclasses above, with the
    block's two norms inside linear_qkv and linear_fc1 (`gate_up`: fc1 returns the (gate, up) pair, which
    only swiglu.SwiGLU takes)."""
    spec = copy.deepcopy(spec)
    sub = spec.submodules
    attn, mlp = sub.self_attention.submodules, sub.mlp.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = IdentityOp
    attn.linear_qkv, attn.linear_proj = TorchNormColumnLinear, TorchRowLinear
    mlp.linear_fc1 = TorchNormGateUpLinear if gate_up else TorchNormColumnLinear
    mlp.linear_fc2 = TorchRowLinear
    return spec
