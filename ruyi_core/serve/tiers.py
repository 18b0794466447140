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
from ruyi_core.family import names
from ruyi_core.family.tensors import TRUNK_FILE


@dataclass
class ServedFamily:
    name: str
    tiers: dict[str, torch.nn.Module]  # tier name -> causal LM, shallowest first
    tokenizer: object
    version: str | None = None
    eos: set[int] = field(default_factory=set)
    routing: dict | None = None  # calibrated `auto` routing (route.calibrate), when the family has one
    chains: dict[str, list[str]] = field(default_factory=dict)  # tier -> its package's digest chain (TRUNK_FILE)

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


def _sort(tiers: dict[str, torch.nn.Module], exits: dict[str, int]) -> dict[str, torch.nn.Module]:
    """Shallowest first: by exit point where every tier's is known (DaE's blocks can make a small tier as deep
    as the next one, or deeper), else by layer count."""
    if all(t in exits for t in tiers):
        return dict(sorted(tiers.items(), key=lambda kv: exits[kv[0]]))
    return dict(sorted(tiers.items(), key=lambda kv: len(kv[1].model.layers)))


def _only(have, tiers: list[str] | None, family: str) -> list[str]:
    """The tiers asked for, of those the family has (all of them when none are named)."""
    if tiers is None:
        return list(have)
    unknown = [t for t in tiers if t not in have]
    if unknown or not tiers:
        raise RuyiError(f"--tiers {','.join(tiers)}: {family} has tiers {', '.join(have)}")
    return list(tiers)


def from_family(path: str | Path, runtime, name: str | None = None, only: list[str] | None = None) -> ServedFamily:
    """Every tier of a saved family (or the `only` ones), sharing the family's modules."""
    from transformers import AutoModelForCausalLM

    from ruyi_core.family.convert import generation_config, tier_config
    from ruyi_core.family.io import load_family

    fam, tok = load_family(path, runtime)
    if tok is None:
        raise RuyiError(f"{path} has no tokenizer files: serving needs the family's tokenizer")
    tiers = {}
    for tier in _only(fam.config.tiers, only, name or Path(path).resolve().name):
        cfg = tier_config(fam, p := fam.config.tiers[tier])
        cfg._attn_implementation = fam.config._attn_implementation
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        for prefix, module in names.tier_modules(fam, p).items():  # the family's own modules, nothing copied
            _replace(m, prefix, module)
        m.model.rotary_emb = fam.model.rotary_emb  # the same rope: computed from the same config fields
        m.generation_config = generation_config(tok, cfg)
        tiers[tier] = m.eval()
    tiers = _sort(tiers, fam.config.tiers)
    return ServedFamily(name or Path(path).resolve().name, tiers, tok,
                        eos=_eos(tok, next(iter(tiers.values()))))


def _equal(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    mine = module.state_dict()
    return mine.keys() == sd.keys() and all(mine[k].shape == sd[k].shape and torch.equal(mine[k], sd[k]) for k in sd)


def load_sharing(path: Path, runtime, loaded: list[torch.nn.Module]) -> tuple[torch.nn.Module, int]:
    """A tier package as vanilla transformers loads it (its config, weights, generation config, in `runtime`),
    read one block at a time: a block equal to the one at the same place in an already `loaded` tier (the
    trunk both carry; the embeddings) is that tier's module, never a second copy in memory. Returns the model
    and how many modules it shares."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ruyi_core.family.tensors import TensorFiles

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=runtime.dtype)
    files = TensorFiles(path)
    shared, others = 0, [names.plain_modules(m) for m in loaded]
    for prefix, module in names.plain_modules(model).items():
        sd = {k[len(prefix):]: files[k].to(runtime.device, runtime.dtype) for k in files if k.startswith(prefix)}
        if not sd:  # a tied head: tied below
            continue
        twin = next((u[prefix] for u in others if prefix in u and _equal(u[prefix], sd)), None)
        if twin is not None:
            _replace(model, prefix, twin)
            shared += 1
        else:
            module.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    # computed buffers (the rotary frequencies) are not in the checkpoint: built for real from the config
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(runtime.device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuyiError(f"{path}: the checkpoint has no {', '.join(left[:3])}: re-export the tier")
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), shared


def _replace(model, prefix: str, module: torch.nn.Module) -> None:
    parent_name, _, child = prefix.rstrip(".").rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, torch.nn.ModuleList):
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def from_registry(store, family: str, runtime, version: str | None = None,
                  log: Callable[[str], None] = lambda m: None, only: list[str] | None = None) -> ServedFamily:
    """Each tier's package (the promoted one per tier, or `version`'s; only the `only` ones fetched), verified,
    loaded by vanilla transformers, with the blocks the packages share kept once, and the version's
    calibrated routing."""
    from ruyi_core.package.keys import routing_key
    from ruyi_core.package.registry import fetch, read_index, version_entry

    index = read_index(store, family)
    if version is None:
        tier_names = sorted(index["promoted"])
        if not tier_names:
            raise RuyiError(f"{family} has no promoted tier yet: pass --version, or promote one")
    else:
        tier_names = sorted(version_entry(index, version)["tiers"])
    tier_names = _only(tier_names, only, family)
    dirs = {t: fetch(store, family, t, version, log=log) for t in tier_names}
    served = from_packages(family, dirs, runtime, log)
    versions = sorted({version} if version else {index["promoted"][t] for t in tier_names})
    served.version = version or ",".join(versions)
    if len(versions) == 1:  # routing is calibrated per version, on that version's tiers
        got = store.read_object(routing_key(family, versions[0]))
        served.routing = json.loads(got[0]) if got else None
    return served


def from_packages(name: str, dirs: dict[str, Path], runtime, log: Callable[[str], None] = lambda m: None):
    """Tier packages in local folders, each as vanilla transformers loads it, the deepest first; the blocks a
    shallower tier shares with a deeper one (the trunk, the embeddings) are read and kept once."""
    from transformers import AutoTokenizer

    depth = {t: json.loads((Path(d) / "config.json").read_text())["num_hidden_layers"] for t, d in dirs.items()}
    loaded, shared = {}, 0
    for t in sorted(dirs, key=lambda t: -depth[t]):
        loaded[t], n = load_sharing(dirs[t], runtime, list(loaded.values()))
        shared += n
    files = {t: Path(d) / TRUNK_FILE for t, d in dirs.items()}
    recorded = {t: json.loads(f.read_text()) for t, f in files.items() if f.is_file()}
    tiers = _sort(loaded, {t: r["exit"] for t, r in recorded.items() if isinstance(r.get("exit"), int)})
    log(f"{name}: {len(tiers)} tiers, {shared} shared blocks kept once")
    tok = AutoTokenizer.from_pretrained(dirs[list(tiers)[-1]])
    chains = {t: r["digests"] for t, r in recorded.items()}
    return ServedFamily(name, tiers, tok, eos=_eos(tok, next(iter(tiers.values()))), chains=chains)
