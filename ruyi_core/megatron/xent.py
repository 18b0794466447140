"""An exit's output layer and cross-entropy as one autograd node (the CPU's one-rank output layer).

Unfused, an exit's loss runs over [tokens, vocab] tensors seven times or more: the product writes the logits,
log-softmax reads them and writes its output (kept for the backward), and the backward writes a zeroed gradient,
scatters into it and runs log-softmax's backward over two such tensors before the two products. Here the
forward turns log-softmax's output, in place, into the loss's gradient with respect to the logits
(w * (softmax - onehot), w the token's weight in the mean) and keeps only that; the backward is the two
products, scaled by the incoming gradient (-18% for the tiny preset's head, forward and backward). The weight
gradient goes into megatron's `main_grad` as linear.py's does. The same maths as Liger's and Apple's fused linear
cross-entropy, without their chunking (the CPU has no memory to save at the demo's sizes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ruyi_core.megatron import node
from ruyi_core.megatron.linear import _into_main, add_product


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(x_i @ W.T, y_i) for x [n, h], W [V, h], labels y [n], token weights w [n]."""

    @staticmethod
    def forward(ctx, x, weight, labels, token_weights):
        # The softmax in fp32 whatever the activations' dtype, as megatron's cross-entropy on GPUs.
        dtype = torch.promote_types(x.dtype, torch.float32)
        logp = torch.log_softmax(F.linear(x, weight).to(dtype), -1)
        token_weights = token_weights.to(dtype)
        loss = -(logp.gather(1, labels[:, None]).squeeze(1) * token_weights).sum()
        # w * softmax = exp(log p + log w), 0 where w = 0; then - w at each label.
        grad = logp.add_(token_weights.log()[:, None]).exp_()
        grad.scatter_add_(1, labels[:, None], -token_weights[:, None])
        ctx.save_for_backward(x, weight, grad.to(x.dtype))  # the backward's products run in x's dtype
        ctx.into_main = _into_main(weight, x)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, grad = ctx.saved_tensors
        scale = float(grad_loss)
        grad_x = torch.mm(grad, weight).mul_(scale) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:  # a frozen head (DaE trains one exit's)
            return grad_x, None, None, None
        if ctx.into_main:
            add_product(weight.main_grad, grad.t(), x, alpha=scale)
            weight.grad_added_to_main_grad = True
            return grad_x, torch.empty_like(weight), None, None
        return grad_x, torch.mm(grad.t(), x).mul_(scale), None, None


def linear_cross_entropy(x, weight, labels, loss_mask):
    """The masked token-mean cross-entropy of x @ weight.T: x [s, b, h]; labels and loss_mask [s, b]."""
    mask = loss_mask.to(torch.promote_types(x.dtype, torch.float32))
    token_weights = (mask / mask.sum().clamp(min=1)).flatten()
    return node.apply(_LinearCrossEntropy, x.flatten(0, 1), weight, labels.flatten(), token_weights)
