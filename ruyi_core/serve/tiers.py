"""A family's tiers for serving: each a plain transformers causal LM (what its package is), with one trunk in
memory. From a family folder, every tier is built on the family's own modules (nothing copied); from the
registry, each tier's package is loaded as vanilla transformers loads it, and blocks that are equal in two
packages (the trunk they share) are kept once."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ruyi_core.errors import RuyiError


@dataclass
class ServedFamily:
    name: str
    tiers: dict[str, torch.nn.Module]  # tier name -> causal LM, shallowest first
    tokenizer: object
    version: str | None = None
    eos: set[int] = field(default_factory=set)
    routing: dict | None = None  # calibrated `auto` routing (route.calibrate), when the family has one

    @property
    def deepest(self) -> str:
        return list(self.tiers)[-1]

    def depth(self, tier: str) -> int:
        return len(self.tiers[tier].model.layers)

    def parameters_in_memory(self) -> int:
        seen, n = set(), 0
        for m in self.tiers.values():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n


def _eos(tok, model) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _sort(tiers: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    return dict(sorted(tiers.items(), key=lambda kv: len(kv[1].model.layers)))


def from_family(path: str | Path, runtime, name: str | None = None) -> ServedFamily:
    """Every tier of a saved family, sharing the family's modules."""
    from transformers import AutoModelForCausalLM

    from ruyi_core.family.convert import generation_config, tier_config
    from ruyi_core.family.io import load_family

    fam, tok = load_family(path, runtime)
    if tok is None:
        raise RuyiError(f"{path} has no tokenizer files: serving needs the family's tokenizer")
    tiers = {}
    for tier, p in fam.config.tiers.items():
        cfg = tier_config(fam, p)
        cfg._attn_implementation = fam.config._attn_implementation
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        k = fam.config.exit_index(p)
        m.model.embed_tokens, m.model.norm, m.lm_head = fam.model.embed_tokens, fam.model.norms[k], fam.head(p)
        m.model.layers = torch.nn.ModuleList(fam.model.tier_blocks(p))
        m.model.rotary_emb = fam.model.rotary_emb  # the same rope: computed from the same config fields
        m.generation_config = generation_config(tok, cfg)
        tiers[tier] = m.eval()
    tiers = _sort(tiers)
    return ServedFamily(name or Path(path).resolve().name, tiers, tok,
                        eos=_eos(tok, next(iter(tiers.values()))))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def share_equal_blocks(tiers: dict[str, torch.nn.Module]) -> int:
    """Make tiers use one module wherever two hold equal embeddings or equal blocks at the same depth (the
    trunk their packages both carry); returns how many modules were dropped."""
    kept: list[torch.nn.Module] = []
    dropped = 0
    for m in tiers.values():
        for other in kept:
            if m.model.embed_tokens is not other.model.embed_tokens and _same(m.model.embed_tokens,
                                                                               other.model.embed_tokens):
                m.model.embed_tokens, dropped = other.model.embed_tokens, dropped + 1
            for i, (mine, theirs) in enumerate(zip(m.model.layers, other.model.layers)):
                if mine is theirs:
                    continue
                if not _same(mine, theirs):
                    break  # past the shared trunk: the tiers part here
                m.model.layers[i], dropped = theirs, dropped + 1
        kept.append(m)
    return dropped


def from_registry(store, family: str, runtime, version: str | None = None,
                  log: Callable[[str], None] = lambda m: None) -> ServedFamily:
    """Each tier's package (the promoted one per tier, or `version`'s), verified, loaded by vanilla
    transformers, with the blocks the packages share kept once, and the version's calibrated routing."""
    from ruyi_core.package.registry import fetch, read_index

    index = read_index(store, family)
    if version is None:
        tier_names = sorted(index["promoted"])
        if not tier_names:
            raise RuyiError(f"{family} has no promoted tier yet: pass --version, or promote one")
    else:
        entry = next((v for v in index["versions"] if v["version"] == version), None)
        if entry is None:
            raise RuyiError(f"{family} has no version {version!r}: versions are "
                            f"{', '.join(v['version'] for v in index['versions'])}")
        tier_names = sorted(entry["tiers"])
    dirs = {t: fetch(store, family, t, version, log=log) for t in tier_names}
    served = from_packages(family, dirs, runtime, log)
    versions = sorted({d.parent.name for d in dirs.values()})
    served.version = version or ",".join(versions)
    if len(versions) == 1:  # routing is calibrated per version, on that version's tiers
        got = store.read_object(f"models/{family}/{versions[0]}/routing.json")
        served.routing = json.loads(got[0]) if got else None
    return served


def from_packages(name: str, dirs: dict[str, Path], runtime, log: Callable[[str], None] = lambda m: None):
    """Tier packages in local folders, loaded by vanilla transformers, equal blocks kept once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiers = _sort({t: runtime.load(AutoModelForCausalLM, d) for t, d in dirs.items()})
    dropped = share_equal_blocks(tiers)
    log(f"{name}: {len(tiers)} tiers, {dropped} shared blocks kept once")
    tok = AutoTokenizer.from_pretrained(dirs[list(tiers)[-1]])
    return ServedFamily(name, tiers, tok, eos=_eos(tok, next(iter(tiers.values()))))
