"""A family's parameter names in every layout, from one declarative table, converted either way.

Layouts: `family` (our RuyiForCausalLM), `published` (TeleAI's ruyi_qwen2 / ruyi_qwen3 checkpoints), `megatron`
(FamilyGPT, unsharded) and `tier` (the vanilla Qwen3ForCausalLM of one exit). A slot is one module of a family
(the embedding, a decoder block, a norm, a head); GROUPS names its prefix in each layout, and every conversion,
in any direction, is one walk over the slots. Only megatron renames leaves inside a block (MEGATRON_BLOCK).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple

LAYOUTS = ("family", "published", "megatron", "tier")


class Alt(NamedTuple):
    """A prefix that depends on the slot: `yes` where `when` holds ("last": the last exit; "shared": shared heads)."""

    when: str
    yes: str
    no: str


# Module prefix of each group per layout (LAYOUTS order); None: absent there. Fields: i trunk layer, k exit index,
# p exit point, j added (DaE) block, d depth in the standalone tier, h head index (0 when heads are shared).
GROUPS: dict[str, tuple] = {
    "embed": ("model.embed_tokens.", "model.embed_tokens.", "embedding.word_embeddings.", "model.embed_tokens."),
    "layer": ("model.layers.{i}.", "model.layers.{i}.", "decoder.layers.{i}.", "model.layers.{d}."),
    "branch": ("model.eelayers.{k}.", "model.eelayers.{k}.", "branches.{k}.layer.", "model.layers.{d}."),
    "added": ("model.expanded.{p}.{j}.", None, "branches.{k}.extra.{j}.", "model.layers.{d}."),
    "norm": ("model.norms.{k}.", "model.norms.{k}.", Alt("last", "final.norm.", "branches.{k}.head.norm."),
             "model.norm."),
    "head": ("lm_head.{h}.", Alt("shared", "lm_head.", "lm_head.{k}."),
             Alt("last", "final.output_layer.", "branches.{k}.head.output_layer."), "lm_head."),
}
BLOCKS = ("layer", "branch", "added")  # groups that hold a decoder block

# Decoder-block leaves, HF -> megatron. HF leaves sharing a megatron name are fused into it in this order
# (q, k, v interleaved per KV group; fc1 = [gate; up]): the value transforms live in megatron/convert.py.
MEGATRON_BLOCK = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "self_attn.q_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.k_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.v_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.q_proj.bias": "self_attention.linear_qkv.bias",
    "self_attn.k_proj.bias": "self_attention.linear_qkv.bias",
    "self_attn.v_proj.bias": "self_attention.linear_qkv.bias",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "mlp.gate_proj.weight": "mlp.linear_fc1.weight",
    "mlp.up_proj.weight": "mlp.linear_fc1.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
MEGATRON_SINGLE = {"weight": "weight"}  # the embedding, norms and heads
# The linear projections of a decoder block (module names inside it): q, k, v, o, gate, up, down.
BLOCK_PROJECTIONS = tuple(n.removesuffix(".weight") for n in MEGATRON_BLOCK if n.endswith("_proj.weight"))

# transform(src leaves, dst leaves, src tensors) -> dst tensors, for leaves fused or split on the way.
Transform = Callable[[tuple, tuple, list], list]


@dataclass(frozen=True)
class Family:
    """What the names depend on: the exits, DaE expansions and whether heads are shared."""

    exit_points: tuple[int, ...]
    expansions: tuple[tuple[int, int], ...] = ()
    shared_heads: bool = False

    @classmethod
    def of(cls, cfg) -> Family:
        """From a RuyiConfig, or megatron's FamilyShape (one output layer per exit, so never shared)."""
        if isinstance(cfg, Family):
            return cfg
        if hasattr(cfg, "early_exit_points"):
            exp = tuple(sorted((int(p), n) for p, n in (cfg.expansions or {}).items()))
            return cls(tuple(cfg.early_exit_points), exp, bool(cfg.shared_heads))
        return cls(tuple(cfg.exit_points), tuple(sorted(cfg.expansions)))


@dataclass(frozen=True)
class Slot:
    group: str
    names: dict  # layout -> module prefix, or None where the layout has no such module
    tiers: tuple[int, ...]  # exit points whose standalone tier holds it
    depth: int | None = None  # block index in a standalone tier (d)


def _slot(fam: Family, group: str, tiers, **f) -> Slot:
    last, shared = f.get("k") == len(fam.exit_points) - 1, fam.shared_heads
    names = {}
    for layout, pat in zip(LAYOUTS, GROUPS[group]):
        if isinstance(pat, Alt):
            pat = pat.yes if {"last": last, "shared": shared}[pat.when] else pat.no
        names[layout] = None if pat is None else pat.format(**f)
    return Slot(group, names, tuple(tiers), f.get("d"))


@lru_cache(maxsize=32)
def _slots(fam: Family) -> tuple[Slot, ...]:
    pts, added = fam.exit_points, dict(fam.expansions)
    last = len(pts) - 1
    out = [_slot(fam, "embed", pts)]
    # Trunk layer i serves every deeper exit; the last exit's own block is the trunk's last layer.
    out += [_slot(fam, "layer", [p for p in pts if p > i or p == pts[-1]], i=i, d=i) for i in range(pts[-1] + 1)]
    for k, p in enumerate(pts):
        if k < last:
            out.append(_slot(fam, "branch", [p], k=k, p=p, d=p))
        out += [_slot(fam, "added", [p], k=k, p=p, j=j, d=p + 1 + j) for j in range(added.get(p, 0))]
        out.append(_slot(fam, "norm", [p], k=k, p=p))
        out.append(_slot(fam, "head", [p], k=k, p=p, h=0 if fam.shared_heads else k))
    return tuple(out)


def slots(cfg, exit_point: int | None = None) -> tuple[Slot, ...]:
    """Every slot of the family in order (embedding, trunk, then per exit its blocks, norm and head), or only
    those of exit p's standalone tier, in the tier's order."""
    fam = Family.of(cfg)
    if exit_point is not None and exit_point not in fam.exit_points:
        raise ValueError(f"exit_point {exit_point} is not one of this family's exits {list(fam.exit_points)}")
    return tuple(s for s in _slots(fam) if exit_point is None or exit_point in s.tiers)


def _pairs(cfg, src: str, dst: str, exit_point: int | None) -> dict[str, tuple[str, str]]:
    """{dst prefix: (src prefix, group)}. Where several slots share one dst module (a shared head read back
    from megatron's per-exit output layers), the last exit's wins."""
    if dst == "tier" and exit_point is None:
        raise ValueError("the tier layout as a destination needs the tier's exit_point")
    out = {}
    for s in slots(cfg, exit_point):
        if s.names[src] is not None and s.names[dst] is not None:
            out[s.names[dst]] = (s.names[src], s.group)
    return out


def _leaf_links(group: str, src: str, dst: str, leaves: list[str]) -> list[tuple[tuple, tuple]]:
    """(dst leaves, src leaves) inside one module: the same leaves, except to and from megatron."""
    if (src == "megatron") == (dst == "megatron"):
        return [((n,), (n,)) for n in leaves]
    fused: dict[str, tuple] = {}
    for hf, meg in (MEGATRON_BLOCK if group in BLOCKS else MEGATRON_SINGLE).items():
        fused[meg] = (*fused.get(meg, ()), hf)
    have = set(leaves)
    if dst == "megatron":
        return [((m,), hs) for m, hs in fused.items() if hs[0] in have]
    return [(hs, (m,)) for m, hs in fused.items() if m in have]  # megatron's own leaves (_extra_state) stay


def convert(sd: Mapping, cfg, src: str, dst: str, exit_point: int | None = None,
            transform: Transform | None = None, into=None):
    """`sd` (names in layout `src`) renamed to layout `dst`; with `exit_point`, only that exit's tier. Reading
    the `tier` layout without an exit point reads a full-depth base (every family slot from its standalone
    position: what a new family is initialised from). `transform` makes fused/split leaves (megatron).
    `sd` is read one module at a time, and `into` (anything with `update`, default a new dict) receives each
    module's converted tensors as they are made: a lazy source and a sink keep one module in memory."""
    out = {} if into is None else into
    for d_pre, (s_pre, group) in _pairs(cfg, src, dst, exit_point).items():
        leaves = [n[len(s_pre):] for n in sd if n.startswith(s_pre)]
        for d_leaves, s_leaves in _leaf_links(group, src, dst, leaves):
            vals = [sd[s_pre + n] for n in s_leaves]
            if len(d_leaves) != 1 or len(s_leaves) != 1:
                if transform is None:
                    raise ValueError(f"{src} -> {dst} fuses or splits {s_leaves}: pass a transform")
                vals = transform(s_leaves, d_leaves, vals)
            out.update({d_pre + n: v for n, v in zip(d_leaves, vals)})
    return out


def unplaced(keys, cfg, layout: str, exit_point: int | None = None) -> list[str]:
    """Keys that belong to no slot of `layout` (of exit p's tier, if given): what a conversion would drop."""
    pres = tuple(s.names[layout] for s in slots(cfg, exit_point) if s.names[layout] is not None)
    return [k for k in keys if not k.startswith(pres)]


def published_aliases(cfg) -> dict[str, str]:
    """{standalone name: published name} of the last exit's norm and head 0: some published exports store the
    final norm (and a single head) under plain Qwen names; accepted on read."""
    ss = slots(cfg)
    norm, head = [s for s in ss if s.group == "norm"][-1], [s for s in ss if s.group == "head"][0]
    return {s.names["tier"] + "weight": s.names["published"] + "weight" for s in (norm, head)
            if s.names["tier"] != s.names["published"]}


def tier_modules(family, exit_point: int) -> dict:
    """{prefix in exit p's standalone tier: the family's module there}, in the tier's order (embedding, blocks,
    norm, head): the tier as views of a RuyiForCausalLM, nothing copied."""
    return {s.names["tier"]: family.get_submodule(s.names["family"].rstrip("."))
            for s in slots(family.config, exit_point)}


def plain_modules(model) -> dict:
    """{prefix: module} of a plain decoder (a standalone tier, a base) by its checkpoint names: embedding, every
    layer, norm, head. Its slots are those of a family with one exit at its last layer."""
    one_exit = Family((model.config.num_hidden_layers - 1,))
    return {pre: model.get_submodule(pre.rstrip(".")) for pre in prefixes(one_exit, "tier", tuple(GROUPS))}


def prefixes(cfg, layout: str, groups: tuple[str, ...], exit_point: int | None = None) -> list[str]:
    """Prefixes in `layout` of the slots of these groups (of exit p's tier, if given), in order."""
    return [s.names[layout] for s in slots(cfg, exit_point) if s.group in groups and s.names[layout] is not None]


def own_prefixes(cfg, exit_point: int, layout: str) -> list[str]:
    """Exit p's own parameters, the rest being the shared trunk: what DaE trains (the rest stays frozen) and
    what GRPO moves and merges back. When expanded, its added blocks and head; else its exit block (for the last
    exit, the trunk's last layer), norm and head."""
    fam = Family.of(cfg)
    if dict(fam.expansions).get(exit_point):
        return prefixes(fam, layout, ("added", "head"), exit_point)
    return [s.names[layout] for s in slots(fam, exit_point) if s.depth == exit_point or s.group in ("norm", "head")]


def dae_linear_names(cfg, exit_point: int) -> list[str]:
    """Module names, in exit p's standalone tier, of the linear layers DaE trains: every projection of each
    added block, then the head (e.g. model.layers.2.self_attn.q_proj, ..., lm_head)."""
    fam = Family.of(cfg)
    blocks = prefixes(fam, "tier", ("added",), exit_point)
    heads = prefixes(fam, "tier", ("head",), exit_point)
    return [b + proj for b in blocks for proj in BLOCK_PROJECTIONS] + [h.rstrip(".") for h in heads]
