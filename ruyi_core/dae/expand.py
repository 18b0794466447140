"""DaE stage 1, Stable Block Expansion: append N decoder blocks after a tier's branch block, before its norm
and head. Zero-residual init (o_proj = 0, down_proj = 0) makes each new block an exact identity at init; q, k,
v, gate and up are Gaussian random (`zero`), or copies of the branch block (`clone`, the ablation the Ruyi2
report found to cause optimisation inertia). Only the new blocks and the tier's head train afterwards."""
from __future__ import annotations

import torch

from ruyi_core.errors import RuyiError
from ruyi_core.family.config import RuyiConfig
from ruyi_core.family.modeling import RuyiForCausalLM

ZERO_RESIDUAL = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def expand_tier(family: RuyiForCausalLM, tier: str, blocks: int, init: str = "zero", std: float = 0.02,
                seed: int = 0) -> RuyiForCausalLM:
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
    out = RuyiForCausalLM(new_cfg)
    missing, unexpected = out.load_state_dict(family.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(f"model.expanded.{p}.") for k in missing), (missing, unexpected)
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


def tier_own_prefixes(cfg: RuyiConfig, tier: str) -> list[str]:
    """The exported tier's parameters that belong to this tier alone (everything else is the shared trunk):
    its added blocks and head when expanded, else its branch block and head."""
    p = cfg.tiers[tier]
    if cfg.expansion(p):
        return [f"model.layers.{p + 1 + j}." for j in range(cfg.expansion(p))] + ["lm_head."]
    return [f"model.layers.{p}.", "model.norm.", "lm_head."]


def tier_trainable_prefixes(cfg: RuyiConfig, tier: str) -> tuple[list[str], list[str]]:
    """What trains after expansion, as family parameter prefixes and as the exported tier's prefixes."""
    p = cfg.tiers[tier]
    k = cfg.exit_index(p)
    head = "lm_head.0." if cfg.shared_heads else f"lm_head.{k}."
    return [f"model.expanded.{p}.", head], tier_own_prefixes(cfg, tier)


def family_name(cfg: RuyiConfig, exit_point: int, tier_key: str) -> str:
    """Where a parameter of exit p's standalone export lives in the family."""
    k = cfg.exit_index(exit_point)
    if tier_key.startswith("model.layers."):
        i, rest = tier_key[len("model.layers."):].split(".", 1)
        i = int(i)
        if i < exit_point:
            return f"model.layers.{i}.{rest}"
        if i == exit_point:
            block = "model.layers." + str(exit_point) if k == len(cfg.early_exit_points) - 1 else f"model.eelayers.{k}"
            return f"{block}.{rest}"
        return f"model.expanded.{exit_point}.{i - exit_point - 1}.{rest}"
    if tier_key.startswith("model.norm."):
        return f"model.norms.{k}." + tier_key[len("model.norm."):]
    if tier_key.startswith("lm_head."):
        return ("lm_head.0." if cfg.shared_heads else f"lm_head.{k}.") + tier_key[len("lm_head."):]
    return tier_key  # embeddings


def merge_tier(family: RuyiForCausalLM, tier: str, tier_state: dict, prefixes: list[str] | None = None):
    """Writes a trained export of a tier back into the family: only the tier's own parameters."""
    cfg = family.config
    p = cfg.tiers[tier]
    own = tuple(prefixes or tier_own_prefixes(cfg, tier))
    sd = {family_name(cfg, p, n): v for n, v in tier_state.items() if n.startswith(own)}
    missing, unexpected = family.load_state_dict(sd, strict=False)
    if unexpected:
        raise RuyiError(f"merge of tier {tier!r}: unexpected keys {unexpected[:3]}")
    return family
