"""DaE stage 1, Stable Block Expansion: append N decoder blocks after a tier's branch block, before its norm
and head. Zero-residual init (o_proj = 0, down_proj = 0) makes each new block an exact identity at init; q, k,
v, gate and up are Gaussian random (`zero`), or copies of the branch block (`clone`, the ablation the Ruyi2
report found to cause optimisation inertia). Only the new blocks and the tier's head train afterwards."""
from __future__ import annotations

import torch

from ruyi_core.errors import RuyiError
from ruyi_core.family import names
from ruyi_core.family.config import RuyiConfig
from ruyi_core.family.modeling import RuyiForCausalLM

ZERO_RESIDUAL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def expand_tier(family: RuyiForCausalLM, tier: str, blocks: int, init: str = "zero", std: float = 0.02,
                seed: int = 0, share_weights: bool = False) -> RuyiForCausalLM:
    """The family with `blocks` new blocks after `tier`'s branch block. With `share_weights` the expanded family
    takes the family's own tensors instead of copies (one copy of the model in memory, not two): the family
    passed in must not be used afterwards."""
    cfg = family.config
    if tier not in cfg.tiers:
        raise RuyiError(f"dae.tier: unknown tier {tier!r}; this family has {', '.join(cfg.tiers)}")
    p = cfg.tiers[tier]
    if p == cfg.early_exit_points[-1]:
        raise RuyiError(f"dae.tier: {tier!r} is the deepest tier; DaE expands an early exit (e.g. the smallest)")
    if cfg.expansion(p):
        raise RuyiError(f"tier {tier!r} is already expanded by {cfg.expansion(p)} blocks")
    try:  # the config validates itself on construction (a strict dataclass)
        new_cfg = RuyiConfig(**{**cfg.to_dict(), "expansions": {**(cfg.expansions or {}), str(p): blocks}})
    except Exception as e:
        raise RuyiError(f"dae.blocks: {e.__cause__ or e}") from None
    if share_weights:
        with torch.device("meta"):
            out = RuyiForCausalLM(new_cfg)
        missing, unexpected = out.load_state_dict(family.state_dict(), strict=False, assign=True)
        _materialise(out, family)
    else:
        out = RuyiForCausalLM(new_cfg)
        missing, unexpected = out.load_state_dict(family.state_dict(), strict=False)
    added = tuple(names.prefixes(new_cfg, "family", ("added",), p))
    assert not unexpected and all(k.startswith(added) for k in missing), (missing, unexpected)
    branch = out.model.branch_block(cfg.exit_index(p)).state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in out.model.expanded[str(p)]:
            for name, t in block.named_parameters():
                if name.endswith(ZERO_RESIDUAL):
                    t.zero_()
                elif "norm" in name:
                    t.fill_(1.0)
                elif init == "clone":
                    t.copy_(branch[name])
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * std)
    return out.eval()


def _materialise(out: RuyiForCausalLM, family: RuyiForCausalLM) -> None:
    """After a meta-device build and an assigning load: buffers outside the state dict (rotary frequencies) are
    the family's, and the new blocks get real (uninitialised) storage in the family's device and dtype."""
    ref, buffers = next(family.parameters()), dict(family.named_buffers())
    for name, buf in list(out.named_buffers()):
        if buf.is_meta and name in buffers:
            module_name, _, leaf = name.rpartition(".")
            # private: register_buffer would need its persistence, which only a private set holds (test_private_apis)
            out.get_submodule(module_name)._buffers[leaf] = buffers[name]
    for module in out.modules():
        if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.to_empty(device=ref.device, recurse=False)
            for t in module.parameters(recurse=False):
                t.data = t.data.to(ref.dtype)


def tier_own_prefixes(cfg: RuyiConfig, tier: str) -> list[str]:
    """The exported tier's parameters that belong to this tier alone (everything else is the shared trunk):
    its added blocks and head when expanded, else its branch block, norm and head."""
    return names.own_prefixes(cfg, cfg.tiers[tier], "tier")


def tier_trainable_prefixes(cfg: RuyiConfig, tier: str) -> tuple[list[str], list[str]]:
    """What trains after expansion, as family parameter prefixes and as the exported tier's prefixes."""
    return names.own_prefixes(cfg, cfg.tiers[tier], "family"), tier_own_prefixes(cfg, tier)


def merge_tier(family: RuyiForCausalLM, tier: str, tier_state: dict, prefixes: list[str] | None = None):
    """Writes a trained export of a tier back into the family: only the tier's own parameters."""
    cfg = family.config
    p = cfg.tiers[tier]
    own = tuple(prefixes or tier_own_prefixes(cfg, tier))
    picked = {n: v for n, v in tier_state.items() if n.startswith(own)}
    stray = names.unplaced(picked, cfg, "tier", p)
    missing, unexpected = family.load_state_dict(names.convert(picked, cfg, "tier", "family", p), strict=False)
    if stray or unexpected:
        raise RuyiError(f"merge of tier {tier!r}: unexpected keys {(stray + unexpected)[:3]}")
    return family
