"""Applying the CPU path's autograd functions (linear.py, norm.py, rope.py, xent.py) without the Python preamble
of `torch.autograd.Function.apply`: default-argument binding (only for functions with `setup_context`, which these
do not define) and functorch's dead-wrapper unwrapping (only meaningful for tensors of an exited functorch
transform). What remains is the C++ `apply` that `Function.apply` ends in. A CPU training step applies ~120 such
nodes, each saving ~10 Python calls; under an active functorch transform this defers to `Function.apply`.
"""
from __future__ import annotations

import torch


def apply(fn: type[torch.autograd.Function], *args):
    # private: the check torch.autograd.Function.apply itself makes; no public one (test_private_apis)
    if torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*args)
