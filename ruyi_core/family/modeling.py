"""The familial model: one shared trunk, and per exit a branch block, an RMSNorm and an LM head.

Exit p means depth p + 1: trunk layers 0..p-1, then exit p's branch block (for the last exit, the trunk's
own last layer), its norm and its head. The exit is an argument of every call, never process state, and a
KV cache belongs to the exit that filled it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3PreTrainedModel,
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
)
from transformers.utils import ModelOutput

from ruyi_core.errors import RuyiError
from ruyi_core.family import names
from ruyi_core.family.config import RuyiConfig

DECODER_LAYERS = {"qwen3": Qwen3DecoderLayer, "qwen2": Qwen2DecoderLayer}
_CACHE_EXIT = "_ruyi_exit_point"  # set on a cache object: the exit whose keys/values it holds


@dataclass
class FamilyOutput(ModelOutput):
    """Every requested exit from one trunk pass: logits and (with labels) loss per exit point."""

    logits: dict[int, torch.Tensor] | None = None
    losses: dict[int, torch.Tensor] | None = None


class RuyiPreTrainedModel(Qwen3PreTrainedModel):
    config_class = RuyiConfig
    config: RuyiConfig
    _no_split_modules = ["Qwen3DecoderLayer", "Qwen2DecoderLayer"]
    _can_record_outputs = {}


class RuyiModel(RuyiPreTrainedModel):
    def __init__(self, config: RuyiConfig):
        super().__init__(config)
        config.validate_exits()
        layer_cls = DECODER_LAYERS[config.base_arch]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        # Branch block of exit k sits beside trunk layer p_k and uses its KV-cache slot (layer_idx = p_k).
        self.eelayers = nn.ModuleList(layer_cls(config, p) for p in config.early_exit_points[:-1])
        self.norms = nn.ModuleList(
            Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps) for _ in config.early_exit_points
        )
        # DaE: blocks appended after an exit's branch block, before its norm (keyed by exit point).
        self.expanded = nn.ModuleDict({
            p: nn.ModuleList(layer_cls(config, int(p) + 1 + j) for j in range(n))
            for p, n in (config.expansions or {}).items()})
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.post_init()

    def branch_block(self, k: int) -> nn.Module:
        return self.eelayers[k] if k < len(self.eelayers) else self.layers[-1]

    def _masks(self, embeds, attention_mask, past_key_values, position_ids) -> dict:
        kw = dict(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask,
                  past_key_values=past_key_values, position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**kw)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        return masks

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, exits: list[int] | None = None, **kwargs):
        """Returns ({exit point: normed hidden states}, cache). Default: the config's default exit."""
        cfg = self.config
        exits = sorted(exits or [cfg.default_early_exit_point])
        ks = [cfg.exit_index(p) for p in exits]
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=cfg)
        if past_key_values is not None:
            if len(exits) > 1:
                raise RuyiError("a KV cache serves one exit: pass a single exit_point when using a cache")
            filled = getattr(past_key_values, _CACHE_EXIT, None)
            if filled is None and past_key_values.get_seq_length() > 0:
                raise RuyiError("this KV cache was filled outside the family model; start a new cache")
            if filled is not None and filled != exits[0]:
                raise RuyiError(f"this KV cache was filled at exit {filled}, not exit {exits[0]}: "
                                "a cache belongs to one exit; start a new cache to switch exits")
            setattr(past_key_values, _CACHE_EXIT, exits[0])
        if position_ids is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(embeds.shape[1], device=embeds.device) + start).unsqueeze(0)
        masks = attention_mask if isinstance(attention_mask, dict) else self._masks(
            embeds, attention_mask, past_key_values, position_ids)
        layer_kw = dict(position_embeddings=self.rotary_emb(embeds, position_ids), position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache, **kwargs)

        def run(layer, h, i):
            return layer(h, attention_mask=masks[cfg.layer_types[i]], **layer_kw)

        out, h = {}, embeds
        for k, p in zip(ks, exits):
            # Advance the trunk to depth p (it is already at the previous exit's depth), then branch off.
            start = 0 if not out else exits[len(out) - 1]
            for i in range(start, p):
                h = run(self.layers[i], h, i)
            b = run(self.branch_block(k), h, p)
            for j, block in enumerate(self.expanded[str(p)] if str(p) in self.expanded else []):
                b = run(block, b, p + 1 + j)
            out[p] = self.norms[k](b)
        return out, past_key_values


class RuyiForCausalLM(RuyiPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: RuyiConfig):
        super().__init__(config)
        self.model = RuyiModel(config)
        n_heads = 1 if config.shared_heads else len(config.early_exit_points)
        self.lm_head = nn.ModuleList(nn.Linear(config.hidden_size, config.vocab_size, bias=False)
                                     for _ in range(n_heads))
        self.post_init()

    def head(self, exit_point: int) -> nn.Linear:
        return self.lm_head[0 if self.config.shared_heads else self.config.exit_index(exit_point)]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                exit_point: int | None = None, **kwargs) -> CausalLMOutputWithPast:
        """One exit, HF-style. `exit_point` defaults to the config's default exit."""
        p = self.config.default_early_exit_point if exit_point is None else exit_point
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                   use_cache, exits=[p], **kwargs)
        h = hidden[p]
        if logits_to_keep:
            h = h[:, -logits_to_keep:, :]
        logits = self.head(p)(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def forward_exits(self, input_ids, attention_mask=None, labels=None,
                      exits: list[int] | None = None) -> FamilyOutput:
        """Every exit (or the given ones) in one trunk pass: what joint training and evaluation use."""
        exits = exits or list(self.config.early_exit_points)
        hidden, _ = self.model(input_ids, attention_mask, use_cache=False, exits=exits)
        logits = {p: self.head(p)(h) for p, h in hidden.items()}
        losses = None
        if labels is not None:
            losses = {p: self.loss_function(logits=lg, labels=labels, vocab_size=self.config.vocab_size)
                      for p, lg in logits.items()}
        return FamilyOutput(logits=logits, losses=losses)

    def tier_parameter_count(self, exit_point: int) -> int:
        """Parameters a standalone export of this exit holds: embeddings, its blocks, norm, head."""
        return sum(t.numel() for mod in names.tier_modules(self, exit_point).values() for t in mod.parameters())


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(RuyiConfig.model_type, RuyiConfig, exist_ok=True)
    AutoModelForCausalLM.register(RuyiConfig, RuyiForCausalLM, exist_ok=True)


_register()  # any code that can build a family can also load one through the Auto classes
