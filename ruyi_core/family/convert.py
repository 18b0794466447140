"""Conversions: base Qwen3 -> family, published Ruyi layout -> family, family tier -> standalone Qwen3."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen3Config
from transformers import Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from ruyi_core.errors import RuyiError
from ruyi_core.family import names
from ruyi_core.family.config import RuyiConfig
from ruyi_core.family.modeling import RuyiForCausalLM
from ruyi_core.family.presets import PRESETS
from ruyi_core.family.tokenizer import IM_END, build_tokenizer

# Architecture fields shared by Qwen2/Qwen3 configs and ours.
_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
                "bos_token_id", "eos_token_id", "pad_token_id")


def _round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def build_preset_base(preset: str, texts, seed: int = 0) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase]:
    """A random-init Qwen3 base and a tokenizer trained locally on `texts` (the run's pretraining texts);
    deterministic in `seed` and the texts."""
    p = PRESETS[preset]
    tok = build_tokenizer(p.tokenizer_vocab, texts)
    # Padded vocab (as megatron does) so tensor parallel splits of the embedding stay even.
    cfg = Qwen3Config(**p.qwen3_kwargs(_round_up(len(tok))), tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    return model.eval(), tok


def load_base(path: str | Path) -> tuple[Qwen3ForCausalLM, PreTrainedTokenizerBase | None]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RuyiError(f"base {path} has no config.json: point family.base at a Qwen3 checkpoint directory")
    model = Qwen3ForCausalLM.from_pretrained(path, dtype="auto")  # the checkpoint's own dtype
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tok


def family_config(base_cfg, exit_points: list[int], tiers: dict[str, int] | None = None,
                  shared_heads: bool = False, base_arch: str = "qwen3") -> RuyiConfig:
    d = base_cfg if isinstance(base_cfg, dict) else base_cfg.to_dict()
    kw = {k: d[k] for k in _ARCH_FIELDS if k in d}
    hd = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    rope = d.get("rope_parameters") or rope_parameters(d)
    return RuyiConfig(**kw, head_dim=hd, rope_parameters=rope, attention_bias=d.get("attention_bias", False),
                      early_exit_points=list(exit_points), tiers=tiers, shared_heads=shared_heads,
                      base_arch=base_arch)


def rope_parameters(d: dict) -> dict:
    """transformers 5's `rope_parameters` from a 4.x config (`rope_theta` + `rope_scaling` with `type` or
    `rope_type`): scaling changes the logits, so it must survive import."""
    rope = dict(d.get("rope_scaling") or {})
    rope["rope_type"] = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    return rope | {"rope_theta": d.get("rope_theta", 10000.0)}


def family_from_base(base: Qwen3ForCausalLM | str | Path, exit_points: list[int],
                     tiers: dict[str, int] | None = None, shared_heads: bool = False,
                     take: bool = False) -> RuyiForCausalLM:
    """Branch block of exit p = copy of trunk layer p; norms and heads = copies of the base's (tied embeddings
    become a head per exit). Right after init, exit p computes exactly the base truncated to depth p + 1.
    `take`: the trunk takes the base's own tensors (no second copy; the base must not be used afterwards)."""
    if not isinstance(base, torch.nn.Module):
        base, _ = load_base(base)
        take = True
    cfg = family_config(base.config, exit_points, tiers, shared_heads)
    dtype = next(base.parameters()).dtype
    cfg.weights_dtype = str(dtype).removeprefix("torch.")
    cfg.validate_exits()
    with torch.device("meta"):  # no random init, no second copy: the trunk takes the base's tensors
        family = RuyiForCausalLM(cfg)
    out, taken = names.convert(base.state_dict(), cfg, "tier", "family"), set()  # the base as a full-depth tier
    for k, v in out.items():  # a branch block or head made from a trunk tensor gets its own copy
        out[k] = v.clone() if v.data_ptr() in taken or not take else v
        taken.add(v.data_ptr())
    family.load_state_dict(out, strict=True, assign=True)
    family.model.rotary_emb = Qwen3RotaryEmbedding(config=cfg)  # its buffers are computed, not loaded
    return family.eval()


def _read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(f))
        return sd
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise RuyiError(f"{src} holds no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def import_published(src: str | Path) -> RuyiForCausalLM:
    """A checkpoint in the published AI-Flow-Ruyi (`ruyi_qwen2`) / Ruyi2 (`ruyi_qwen3`) layout becomes ours.
    The keys already match ours, except a shared head stored as a plain `lm_head.weight`."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise RuyiError(f"{src} has no config.json: pass the directory of a published Ruyi checkpoint")
    raw = json.loads((src / "config.json").read_text())
    arch = {"ruyi_qwen3": "qwen3", "ruyi_qwen2": "qwen2"}.get(raw.get("model_type"))
    if arch is None or "early_exit_points" not in raw:
        raise RuyiError(f"{src}/config.json is not a published Ruyi config (model_type ruyi_qwen2/ruyi_qwen3 "
                        f"with early_exit_points); got model_type {raw.get('model_type')!r}")
    if arch == "qwen2":
        raw.setdefault("attention_bias", False)  # qwen2 blocks carry q/k/v biases by construction
    # Tied heads (the embedding as every exit's head) become a head per exit, each a copy of the embedding.
    tied = bool(raw.get("tie_word_embeddings", False))
    cfg = family_config(raw, raw["early_exit_points"], shared_heads=bool(raw.get("shared_heads")) and not tied,
                        base_arch=arch)
    if raw.get("default_early_exit_point") is not None:
        cfg.default_early_exit_point = raw["default_early_exit_point"]
    sd = _read_state_dict(src)
    if tied:
        sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}  # a stored copy, if any, is the same
        for k in range(len(cfg.early_exit_points)):
            sd[f"lm_head.{k}.weight"] = sd["model.embed_tokens.weight"].clone()
    for alias, name in names.published_aliases(cfg).items():
        if alias in sd and name not in sd:
            sd[name] = sd.pop(alias)
    unexpected = names.unplaced(sd, cfg, "published")
    cfg.weights_dtype = str(sd["model.embed_tokens.weight"].dtype).removeprefix("torch.")  # kept on export
    family = RuyiForCausalLM(cfg)
    missing, wrong = family.load_state_dict(names.convert(sd, cfg, "published", "family"), strict=False)
    if missing or unexpected or wrong:
        raise RuyiError(f"{src}: weights do not match the published layout "
                        f"(missing {missing[:3]}, unexpected {(unexpected + wrong)[:3]})")
    return family.eval()


def tier_state_dict(family: RuyiForCausalLM, exit_point: int) -> dict[str, torch.Tensor]:
    """Only this exit's weights, renamed to a plain decoder of depth p + 1 (+ its DaE blocks), in the family's
    storage dtype (bf16 base, bf16 tiers). The family's own tensors where the dtype already matches: exporting
    never holds a second copy of the tier."""
    sd = names.convert(family.state_dict(), family.config, "family", "tier", exit_point)
    dtype = getattr(torch, family.config.weights_dtype)
    return {n: t.detach().to(dtype).contiguous() for n, t in sd.items()}


def tier_config(family: RuyiForCausalLM | RuyiConfig, exit_point: int):
    """The plain Qwen3 (Qwen2) config of the tier at `exit_point` of a family (or of its config)."""
    c = getattr(family, "config", family)
    kw = {f: getattr(c, f) for f in _ARCH_FIELDS}
    depth = c.tier_depth(exit_point)
    kw.update(num_hidden_layers=depth, rope_parameters=c.rope_parameters, tie_word_embeddings=False,
              layer_types=c.layer_types[:depth], max_window_layers=min(c.max_window_layers, depth))
    kw["dtype"] = c.weights_dtype
    if c.base_arch == "qwen2":
        return Qwen2Config(**kw, architectures=["Qwen2ForCausalLM"])
    return Qwen3Config(**kw, head_dim=c.head_dim, attention_bias=c.attention_bias,
                       architectures=["Qwen3ForCausalLM"])


def generation_config(tok: PreTrainedTokenizerBase | None, cfg) -> GenerationConfig:
    # No max_new_tokens: a saved one overrides evaluation harnesses' own limits.
    eos = [cfg.eos_token_id] if cfg.eos_token_id is not None else []
    if tok is not None and IM_END in tok.get_vocab():
        eos = [tok.convert_tokens_to_ids(IM_END), *eos]
    return GenerationConfig(eos_token_id=eos or None, pad_token_id=cfg.pad_token_id, do_sample=False)


def export_tier(family: RuyiForCausalLM, tier: str, out_dir: str | Path,
                tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """A standalone Qwen3 checkpoint of one tier, loadable by vanilla transformers (no remote code)."""
    p = family.config.tier_exit(tier) if isinstance(tier, str) else int(tier)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tier_config(family, p)
    cfg.save_pretrained(out)
    save_torch_state_dict(tier_state_dict(family, p), out, max_shard_size="5GB")
    generation_config(tokenizer, cfg).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
