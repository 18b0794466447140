"""Run megatron-core on the CPU (gloo) with the same code path as on GPUs.

megatron-core assumes CUDA in a handful of places. `cpu_shim()` patches exactly those, only when CUDA is
absent, and undoes them on exit. `tests/test_megatron_cpu.py` is the canary: it fails loudly when an upgrade
makes a patch wrong or unneeded.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` (and `.cuda()`) inside megatron's schedules and optimizer to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # the optimizers' dtype checks
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name.count(".") == 1 else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRngTracker:
    """megatron's CUDA RNG tracker keeps per-region CUDA generator states; on the CPU, one region forks the
    CPU generator. Dropout is 0 in our configs, so regions only need to be re-entrant and deterministic."""

    def __init__(self):
        self.states: dict[str, torch.Tensor] = {}

    def reset(self):
        self.states = {}

    def get_states(self):
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states):
        self.states = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.states[name] = g.get_state()

    def is_initialized(self) -> bool:
        return bool(self.states)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        saved = torch.get_rng_state()
        if name in self.states:
            torch.set_rng_state(self.states[name])
        try:
            yield
        finally:
            if name in self.states:
                self.states[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's fp32 clip asserts `torch.cuda.FloatTensor` grads; the same scaling, on any device, in one
    foreach call."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0:
        grads = [getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad for p in parameters]
        # private: torch's fused multi-tensor op (clip_grad_norm_ uses it); no public one (test_private_apis)
        torch._foreach_mul_([g.detach() for g in grads if g is not None], coeff)


def l2_norm_cpu(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's fallback for apex's multi_tensor_l2norm (no apex) takes one norm per tensor in Python and
    turns them into a tensor through floats; the same norm in one foreach call."""
    # megatron calls it only with a non-empty list
    # private: torch's fused multi-tensor norm (clip_grad_norm_ uses it); no public one (test_private_apis)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensor_lists[0])))
    return total.reshape(1).float(), None


def grad_norm_cpu(fallback):
    """megatron's `get_grad_norm_fp32` with the L2 norm of plain tensors taken as `l2_norm_cpu` takes it, without
    megatron's per-gradient Python walk (a DTensor check and a no_grad unwrap each: ~1,500 Python calls per step
    for a tiny family); `fallback` (megatron's, under `CudaToCpu`) for any other norm or tensor type."""
    def norm(grads_for_norm, norm_type=2, grad_stats_parallel_group=None, **kwargs):
        grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
        if kwargs or float(norm_type) != 2.0 or any(type(g) is not torch.Tensor for g in grads):
            with CudaToCpu():
                return fallback(grads_for_norm, norm_type, grad_stats_parallel_group, **kwargs)
        total = (l2_norm_cpu(None, None, [grads], False)[0] if grads else torch.zeros(1)) ** 2
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
        return total.item() ** 0.5

    return norm


def moe_only(reset):
    """megatron's `reset_model_temporary_tensors` walks every module after each step for MoE routers' per-step
    tensors (expert bias, global aux loss); without either configured the walk finds nothing (~1,800 Python
    calls per step for a tiny family), so it runs only where one is."""
    def run(config, model):
        if config.moe_router_enable_expert_bias or "global_aux_loss" in config.moe_router_load_balancing_type:
            reset(config, model)

    return run


def checkpoint_cpu(function, distribute_saved_activations: bool, *args):
    """megatron's activation recompute saves and restores CUDA RNG states; on the CPU, torch's reentrant
    checkpoint does the same with the CPU generator."""
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True, preserve_rng_state=True)


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for every patch of the CPU shim; each is undone on exit."""
    from megatron.core import tensor_parallel
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptim
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import attention
    from megatron.core.utils import local_multi_tensor_l2_norm

    from ruyi_core.megatron.rope import apply_rotary

    # the module, which megatron.core.distributed shadows with its function of the same name
    mfinalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    opt = moptim.ChainedOptimizer
    patches = [
        (torch.cuda, "current_device", lambda: "cpu"),
        (torch.cuda, "synchronize", lambda *a, **k: None),
        # private: megatron reads its RNG tracker from these globals and has no CPU one (test_private_apis)
        (mrandom, "_CUDA_RNG_STATE_TRACKER", CpuRngTracker()),
        (mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True),
        (moptim, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_cpu),
        (tensor_parallel, "checkpoint", checkpoint_cpu),  # what megatron's attention and FamilyGPT call
        (schedules, "backward_step", _native(schedules.backward_step)),
        (attention, "apply_rotary_pos_emb", apply_rotary(attention.apply_rotary_pos_emb)),
        # The optimizer step reads and sets every parameter's .grad a few times (~1,700 torch calls per step for
        # the tiny family, each through the mode); of it, only the grad-norm helpers name a CUDA device.
        (opt, "step", _native(opt.step)),
        (opt, "zero_grad", _native(opt.zero_grad)),
        (moptim, "get_grad_norm_fp32", grad_norm_cpu(moptim.get_grad_norm_fp32)),
        (moptim, "count_zeros_fp32", _in_mode(moptim.count_zeros_fp32)),
        (mfinalize, "reset_model_temporary_tensors", moe_only(mfinalize.reset_model_temporary_tensors)),
    ]
    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:  # apex absent
        patches.append((clip_grads, "l2_norm_impl", l2_norm_cpu))
    return patches


@contextlib.contextmanager
def cpu_shim() -> Iterator[None]:
    """Patches for megatron-core on a machine without CUDA; a no-op where CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    patches = _patches()
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, new in patches:
        setattr(owner, name, new)
    try:
        with CudaToCpu():
            yield
    finally:
        for owner, name, old in reversed(saved):
            setattr(owner, name, old)


@contextlib.contextmanager
def native_torch() -> Iterator[None]:
    """Leaves `CudaToCpu` for a region that never names a CUDA device (the model's forward): every torch call
    through a Python mode costs ~2 us, and a training step's forward makes ~4,500 of them (4% of a tiny
    model's CPU step). Where the mode is not active (GPUs) this does nothing."""
    # private: torch has no public way to step out of one active TorchFunctionMode (test_private_apis)
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    if isinstance(_get_current_function_mode(), CudaToCpu):
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _native(fn):
    """`fn` run under `native_torch()`: for megatron code that names no CUDA device (the backward step, whose
    Python autograd functions and DDP hooks would otherwise pay the mode's toll on every torch call; the
    optimizer step)."""
    def run(*args, **kwargs):
        with native_torch():
            return fn(*args, **kwargs)

    return run


def _in_mode(fn):
    """`fn` run under `CudaToCpu` again, for the parts of a `_native` region that name a CUDA device."""
    def run(*args, **kwargs):
        with CudaToCpu():
            return fn(*args, **kwargs)

    return run


def fuse_cpu_adam(optimizer) -> None:
    """Without Transformer Engine or Apex, megatron builds torch's AdamW with its CPU default, a Python loop of
    ~12 ops per tensor; torch's fused CPU kernel (the transformers Trainer's default optimizer) does the same
    update in one call per step. Only where the inner optimizer is torch's Adam(W) on CPU tensors."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return
    if all(p.device.type == "cpu" for g in inner.param_groups for p in g["params"]):
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)


def seed_everything(seed: int) -> None:
    """megatron seeds CUDA generators per TP rank; on the CPU the CPU generator must be seeded too."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import random as mrandom

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        mrandom.get_cuda_rng_tracker().add("model-parallel-rng", seed + 2718)
