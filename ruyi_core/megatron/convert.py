"""HF family <-> megatron FamilyGPT, in the unsharded (TP=1, PP=1) layout. Sharded layouts come from
megatron's dist_checkpointing, which reshards any TP/PP layout into any other.

Names come from the family's name map (family/names.py); only the values of fused leaves change here:
QKV is interleaved per KV group ([q heads of group g; k_g; v_g]), fc1 = [gate; up].
"""
from __future__ import annotations

import torch

from ruyi_core.family import names


def _interleave(q, k, v, groups: int) -> torch.Tensor:
    qs, ks, vs = q.chunk(groups), k.chunk(groups), v.chunk(groups)
    return torch.cat([t for g in range(groups) for t in (qs[g], ks[g], vs[g])])


def _split(qkv, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd = cfg.num_key_value_heads, cfg.head_dim
    per_q = cfg.num_attention_heads // g * hd
    parts = qkv.reshape(g, per_q + 2 * hd, *qkv.shape[1:])
    q, k, v = parts.split([per_q, hd, hd], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]), v.reshape(-1, *qkv.shape[1:]))


def _values(cfg) -> names.Transform:
    """Fuses HF leaves into one megatron leaf, or splits it back, by the megatron leaf's name."""
    def transform(src: tuple, dst: tuple, tensors: list) -> list:
        if len(dst) == 1:  # HF -> megatron
            if "linear_qkv" in dst[0]:
                return [_interleave(*tensors, cfg.num_key_value_heads)]
            return [torch.cat(tensors)]
        if "linear_qkv" in src[0]:
            return list(_split(tensors[0], cfg))
        return list(tensors[0].chunk(len(dst)))
    return transform


def hf_to_megatron(sd: dict, cfg) -> dict:
    """HF family state dict -> FamilyGPT state dict (TP=1, PP=1)."""
    return names.convert(sd, cfg, "family", "megatron", transform=_values(cfg))


def megatron_to_hf(sd: dict, cfg, into=None) -> dict:
    """FamilyGPT state dict (TP=1, PP=1) -> HF family state dict (or into `into`, module by module). Shared
    heads are not trained apart on megatron (each exit has its own output layer): the last exit's is kept."""
    return names.convert(sd, cfg, "megatron", "family", transform=_values(cfg), into=into)


class _CopyInto:
    """A sink for names.convert: each converted tensor is copied into the model's tensor of that name."""

    def __init__(self, model: torch.nn.Module):
        self.dst = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
        self.seen, self.unexpected = set(), []

    def update(self, tensors: dict) -> None:
        with torch.no_grad():
            for k, v in tensors.items():
                if k in self.dst:
                    self.dst[k].copy_(v)
                    self.seen.add(k)
                else:
                    self.unexpected.append(k)


def load_family_into(model: torch.nn.Module, family_dir, cfg) -> None:
    """A saved HF family's weights into a FamilyGPT (TP=1, PP=1), read from disk one module at a time."""
    from ruyi_core.family.tensors import TensorFiles

    sink = _CopyInto(model)
    names.convert(TensorFiles(family_dir), cfg, "family", "megatron", transform=_values(cfg), into=sink)
    missing = [k for k in sink.dst if k not in sink.seen and not k.endswith("_extra_state")]
    if missing or sink.unexpected:
        raise ValueError(f"megatron state dict mismatch: missing {missing[:4]}, unexpected {sink.unexpected[:4]}")


def write_family_weights(model: torch.nn.Module, cfg, out, dtype: torch.dtype) -> None:
    """A FamilyGPT's (TP=1, PP=1) weights as a family's safetensors shards in `dtype`, one module at a time."""
    from ruyi_core.family.tensors import ShardWriter

    writer = ShardWriter(out, dtype)
    megatron_to_hf(model.state_dict(), cfg, into=writer)
    writer.close()


def load_into(model: torch.nn.Module, megatron_sd: dict) -> None:
    """Strict apart from megatron's `_extra_state` entries (which the local spec leaves empty)."""
    missing, unexpected = model.load_state_dict(megatron_sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"megatron state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
