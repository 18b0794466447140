"""World-of-one megatron checks, run by tests/test_megatron.py in a subprocess (megatron's parallel state is
process-global, so it stays out of the pytest process). Prints one JSON line.

    python tests/mcore_probe.py exactness FAMILY_DIR
    python tests/mcore_probe.py joint-loss FAMILY_DIR
    python tests/mcore_probe.py rng-resume FAMILY_DIR
    python tests/mcore_probe.py cpu-swaps FAMILY_DIR
"""
import json
import sys

import torch

import ruyi_core
ruyi_core.register()
from ruyi_core.family.io import load_family
from ruyi_core.megatron.ckpt import init_distributed
from ruyi_core.megatron.convert import hf_to_megatron, load_into, megatron_to_hf
from ruyi_core.megatron.cpu import cpu_shim, seed_everything
from ruyi_core.megatron.model import build_model, causal_mask


def setup(family_dir):
    from megatron.core import parallel_state as ps

    init_distributed()
    fam, _ = load_family(family_dir)
    ps.initialize_model_parallel(1, 1)
    seed_everything(0)
    model = build_model(fam.config, seq_length=16)
    load_into(model, hf_to_megatron(fam.state_dict(), fam.config))
    return fam, model


def exactness(family_dir):
    fam, model = setup(family_dir)
    back = megatron_to_hf(model.state_dict(), fam.config)
    hf_sd = fam.state_dict()
    roundtrip = set(back) == set(hf_sd) and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for b, s in [(1, 5), (2, 12), (3, 16)]:
        ids = torch.randint(3, fam.config.vocab_size, (b, s), generator=g)
        got = {}
        with torch.no_grad():
            model.eval()
            model(ids, torch.arange(s).unsqueeze(0).expand(b, -1), causal_mask(s), logits_out=got)
            want = fam.forward_exits(ids).logits
        for k, p in enumerate(fam.config.early_exit_points):
            worst = max(worst, (got[k] - want[p]).abs().max().item())
    return {"roundtrip_exact": roundtrip, "max_logit_diff": worst}


def joint_loss(family_dir):
    """The attached exit losses give exactly the gradient of sum_k w_k L_k."""
    fam, model = setup(family_dir)
    n = len(fam.config.early_exit_points)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, fam.config.vocab_size, (2, 12), generator=g)
    labels = torch.roll(ids, -1, 1)
    mask = torch.ones(2, 12)
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)

    def grads(weights):
        model.zero_grad(set_to_none=True)
        out, exit_losses = model(ids, pos, causal_mask(12), labels=labels, loss_mask=mask, exit_weights=weights)
        out.backward()
        flat = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                          for p in model.parameters()])
        touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
        return flat, {k: v.item() for k, v in exit_losses.items()}, touched

    base = [0.5, 0.8, 1.0][:n]
    g_base, losses, _ = grads(base)
    runs = [grads([1.0 if j == k else 0.0 for j in range(n)]) for k in range(n)]
    one_hot, touched0 = [r[0] for r in runs], runs[0][2]
    combo = sum(w * gk for w, gk in zip(base, one_hot))
    bumped = list(base)
    bumped[0] += 0.25
    g_bumped, _, _ = grads(bumped)
    model.stop_after = 0  # what train_only sets for a DaE stage: the forward ends at exit 0's loss
    g_stop, stop_losses, _ = grads([1.0] + [0.0] * (n - 1))
    model.stop_after = None
    with torch.no_grad():
        hf = fam.forward_exits(ids, labels=None).logits
    ref = {k: torch.nn.functional.cross_entropy(hf[p].flatten(0, 1), labels.flatten()).item()
           for k, p in enumerate(fam.config.early_exit_points)}
    return {
        "loss_vs_reference": max(abs(losses[k] - ref[k]) for k in ref),
        "grad_vs_weighted_sum": (g_base - combo).abs().max().item(),
        "bump_vs_exit0_grad": (g_bumped - g_base - 0.25 * one_hot[0]).abs().max().item(),
        "exit0_grad_norm": one_hot[0].norm().item(),
        "stopped_vs_exit0_grad": (g_stop - one_hot[0]).abs().max().item(),
        "stopped_exits": sorted(stop_losses),
        # exit 0's loss reaches its own branch and the trunk below it, never the last exit's head
        "exit0_touches": sorted({n.split(".")[0] + "." + n.split(".")[1] for n in touched0}),
    }


def rng_resume(family_dir):
    """A checkpoint saved with rng=True restores every generator: draws after the load repeat those after
    the save."""
    import random
    import tempfile
    from pathlib import Path

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from ruyi_core.megatron import ckpt

    _, model = setup(family_dir)

    def draws():
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(3).tolist()
        return [random.random(), float(np.random.rand()), *torch.rand(3).tolist(), *tracked]

    draws()  # move every generator off its seed
    path = Path(tempfile.mkdtemp()) / "iter_0000001"
    ckpt.save(path, model, extra={"step": 1}, rng=True)
    after_save = draws()
    draws()
    extra = ckpt.load(path, model, rng=True)
    return {"repeats": draws() == after_save, "extra": extra}


def cpu_swaps(family_dir):
    """The CPU spec's SDPAttention and SwiGLU against megatron's DotProductAttention and GLU (GQA, explicit
    and implicit causal mask): outputs and input gradients."""
    import torch.nn.functional as F
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from ruyi_core.megatron.attention import SDPAttention
    from ruyi_core.megatron.swiglu import SwiGLU

    _, model = setup(family_dir)
    cfg, s, b = model.config, 12, 3
    g = torch.Generator().manual_seed(2)
    qkv = [torch.randn(s, b, n, cfg.kv_channels, generator=g, requires_grad=True)
           for n in (cfg.num_attention_heads, cfg.num_query_groups, cfg.num_query_groups)]

    def attn(module, mask):
        out = module(*qkv, mask)
        return [out, *torch.autograd.grad(out.square().sum(), qkv)]

    want = attn(DotProductAttention(cfg, 1, AttnMaskType.causal, "self"), causal_mask(s))
    sdpa = SDPAttention(cfg, 1, AttnMaskType.causal, "self")
    worst = max(((x - y).abs().max() / y.abs().max()).item() for mask in (causal_mask(s), None)
                for x, y in zip(attn(sdpa, mask), want))  # relative to each tensor's scale
    x = torch.randn(s, b, 2 * cfg.ffn_hidden_size, generator=g, requires_grad=True)

    def glu(fn):
        out = fn(x)
        return [out, *torch.autograd.grad(out.square().sum(), x)]

    gate_up = lambda t: F.silu(t.chunk(2, -1)[0]) * (t.chunk(2, -1)[1] + cfg.glu_linear_offset)  # noqa: E731
    exact = all(torch.equal(a, c) for a, c in zip(glu(SwiGLU(cfg)), glu(gate_up)))
    return {"attention_max_rel_diff": worst, "swiglu_exact": exact,
            "gqa": cfg.num_attention_heads > cfg.num_query_groups, **fused_ops(cfg, g)}


def fused_ops(cfg, g):
    """The CPU's one-node rotary embedding and output-layer cross-entropy against megatron's unfused rope and
    F.cross_entropy, in float64 (outputs and gradients: the maths, not the rounding)."""
    import torch.nn.functional as F
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from ruyi_core.megatron.rope import apply_rotary
    from ruyi_core.megatron.xent import linear_cross_entropy

    t = torch.randn(12, 3, cfg.num_attention_heads, cfg.kv_channels, generator=g, dtype=torch.float64,
                    requires_grad=True)
    freqs = torch.randn(12, 1, 1, cfg.kv_channels, generator=g, dtype=torch.float64)

    def rope(fn):
        out = fn(t, freqs, cfg)
        return [out, *torch.autograd.grad(out.square().sum(), t)]

    rope_diff = max((a - c).abs().max().item() for a, c in zip(rope(apply_rotary(apply_rotary_pos_emb)),
                                                                rope(apply_rotary_pos_emb)))
    x = torch.randn(12, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels, mask = torch.randint(0, 40, (12, 3), generator=g), (torch.rand(12, 3, generator=g) > 0.3).double()

    def xent(fused: bool):
        if fused:
            loss = linear_cross_entropy(x, w, labels, mask)
        else:
            per = F.cross_entropy((x @ w.T).flatten(0, 1), labels.flatten(), reduction="none")
            loss = (per * mask.flatten()).sum() / mask.sum()
        return [loss, *torch.autograd.grad(0.7 * loss, (x, w))]

    xent_diff = max((a - c).abs().max().item() for a, c in zip(xent(True), xent(False)))
    return {"rope_max_diff": rope_diff, "xent_max_diff": xent_diff}


def recompute(family_dir):
    """One training step with and without full / selective recompute: the same losses and gradients, and the
    bytes autograd keeps for the backward (the activation memory) fall with full recompute."""
    fam, plain = setup(family_dir)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, fam.config.vocab_size, (2, 16), generator=g)
    labels, mask, pos = torch.roll(ids, -1, 1), torch.ones(2, 16), torch.arange(16).unsqueeze(0).expand(2, -1)

    def step(model):
        saved = []

        def keep(t):
            saved.append(t.numel() * t.element_size())
            return t

        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out, losses = model(ids, pos, causal_mask(16), labels=labels, loss_mask=mask,
                                exit_weights=[1.0] * len(fam.config.early_exit_points))
        out.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return sum(saved), [v.item() for v in losses.values()], grads

    base_bytes, base_losses, base_grads = step(plain)
    result = {"bytes_plain": base_bytes}
    for mode in ("full", "selective"):
        seed_everything(0)
        model = build_model(fam.config, seq_length=16, recompute=mode)
        load_into(model, hf_to_megatron(fam.state_dict(), fam.config))
        nbytes, losses, grads = step(model)
        result[f"bytes_{mode}"] = nbytes
        result[f"{mode}_same_losses"] = losses == base_losses
        result[f"{mode}_grad_diff"] = (grads - base_grads).abs().max().item()
    return result


if __name__ == "__main__":
    with cpu_shim():
        result = {"exactness": exactness, "joint-loss": joint_loss, "recompute": recompute,
                  "rng-resume": rng_resume, "cpu-swaps": cpu_swaps}[sys.argv[1]](sys.argv[2])
    print(json.dumps(result))
