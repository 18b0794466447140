"""HF family <-> megatron FamilyGPT, in the unsharded (TP=1, PP=1) layout. Sharded layouts come from
megatron's dist_checkpointing, which reshards any TP/PP layout into any other.

Per block: QKV is interleaved per KV group ([q heads of group g; k_g; v_g]), fc1 = [gate; up].
"""
from __future__ import annotations

import torch

_NORMS = {"input_layernorm.weight": "input_layernorm.weight",
          "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
          "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
          "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
          "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
          "mlp.linear_fc2.weight": "mlp.down_proj.weight"}


def _interleave(q, k, v, groups: int) -> torch.Tensor:
    qs, ks, vs = q.chunk(groups), k.chunk(groups), v.chunk(groups)
    return torch.cat([t for g in range(groups) for t in (qs[g], ks[g], vs[g])])


def _split(qkv, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hd = cfg.num_key_value_heads, cfg.head_dim
    per_q = cfg.num_attention_heads // g * hd
    parts = qkv.reshape(g, per_q + 2 * hd, *qkv.shape[1:])
    q, k, v = parts.split([per_q, hd, hd], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]), v.reshape(-1, *qkv.shape[1:]))


def block_to_megatron(sd: dict, src: str, dst: str, cfg) -> dict:
    """One HF decoder block (keys under `src`) as megatron TransformerLayer keys under `dst`."""
    out = {f"{dst}{m}": sd[f"{src}{h}"] for m, h in _NORMS.items() if f"{src}{h}" in sd}
    a = f"{src}self_attn."
    out[f"{dst}self_attention.linear_qkv.weight"] = _interleave(
        sd[f"{a}q_proj.weight"], sd[f"{a}k_proj.weight"], sd[f"{a}v_proj.weight"], cfg.num_key_value_heads)
    if f"{a}q_proj.bias" in sd:
        out[f"{dst}self_attention.linear_qkv.bias"] = _interleave(
            sd[f"{a}q_proj.bias"], sd[f"{a}k_proj.bias"], sd[f"{a}v_proj.bias"], cfg.num_key_value_heads)
    out[f"{dst}mlp.linear_fc1.weight"] = torch.cat([sd[f"{src}mlp.gate_proj.weight"], sd[f"{src}mlp.up_proj.weight"]])
    return out


def block_to_hf(sd: dict, src: str, dst: str, cfg) -> dict:
    out = {f"{dst}{h}": sd[f"{src}{m}"] for m, h in _NORMS.items() if f"{src}{m}" in sd}
    q, k, v = _split(sd[f"{src}self_attention.linear_qkv.weight"], cfg)
    out.update({f"{dst}self_attn.q_proj.weight": q, f"{dst}self_attn.k_proj.weight": k,
                f"{dst}self_attn.v_proj.weight": v})
    if f"{src}self_attention.linear_qkv.bias" in sd:
        q, k, v = _split(sd[f"{src}self_attention.linear_qkv.bias"], cfg)
        out.update({f"{dst}self_attn.q_proj.bias": q, f"{dst}self_attn.k_proj.bias": k,
                    f"{dst}self_attn.v_proj.bias": v})
    gate, up = sd[f"{src}mlp.linear_fc1.weight"].chunk(2)
    out.update({f"{dst}mlp.gate_proj.weight": gate, f"{dst}mlp.up_proj.weight": up})
    return out


def _head_key(cfg, k: int) -> str:
    return "lm_head.0.weight" if cfg.shared_heads else f"lm_head.{k}.weight"


def hf_to_megatron(sd: dict, cfg) -> dict:
    """HF family state dict -> FamilyGPT state dict (TP=1, PP=1)."""
    last = len(cfg.early_exit_points) - 1
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "final.norm.weight": sd[f"model.norms.{last}.weight"],
           "final.output_layer.weight": sd[_head_key(cfg, last)]}
    for i in range(cfg.num_hidden_layers):
        out.update(block_to_megatron(sd, f"model.layers.{i}.", f"decoder.layers.{i}.", cfg))
    for k in range(last):
        out.update(block_to_megatron(sd, f"model.eelayers.{k}.", f"branches.{k}.layer.", cfg))
        for j in range(cfg.expansion(cfg.early_exit_points[k])):
            out.update(block_to_megatron(sd, f"model.expanded.{cfg.early_exit_points[k]}.{j}.",
                                         f"branches.{k}.extra.{j}.", cfg))
        out[f"branches.{k}.head.norm.weight"] = sd[f"model.norms.{k}.weight"]
        out[f"branches.{k}.head.output_layer.weight"] = sd[_head_key(cfg, k)]
    return out


def megatron_to_hf(sd: dict, cfg) -> dict:
    """FamilyGPT state dict (TP=1, PP=1) -> HF family state dict. Shared heads are not trained apart on
    megatron (each exit has its own output layer), so the export keeps the last exit's head."""
    last = len(cfg.early_exit_points) - 1
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           f"model.norms.{last}.weight": sd["final.norm.weight"],
           _head_key(cfg, last): sd["final.output_layer.weight"]}
    for i in range(cfg.num_hidden_layers):
        out.update(block_to_hf(sd, f"decoder.layers.{i}.", f"model.layers.{i}.", cfg))
    for k in range(last):
        out.update(block_to_hf(sd, f"branches.{k}.layer.", f"model.eelayers.{k}.", cfg))
        for j in range(cfg.expansion(cfg.early_exit_points[k])):
            out.update(block_to_hf(sd, f"branches.{k}.extra.{j}.", f"model.expanded.{cfg.early_exit_points[k]}.{j}.",
                                   cfg))
        out[f"model.norms.{k}.weight"] = sd[f"branches.{k}.head.norm.weight"]
        if not cfg.shared_heads:
            out[f"lm_head.{k}.weight"] = sd[f"branches.{k}.head.output_layer.weight"]
    return out


def load_into(model: torch.nn.Module, megatron_sd: dict) -> None:
    """Strict apart from megatron's `_extra_state` entries (which the local spec leaves empty)."""
    missing, unexpected = model.load_state_dict(megatron_sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"megatron state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
