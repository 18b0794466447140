"""Build, save and load families; export tiers with a summary row each."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ruyi_core.errors import CorruptDataError, RuyiError
from ruyi_core.family.config import RuyiConfig
from ruyi_core.family.convert import (build_preset_base, export_tier, family_from_base, generation_config, load_base,
                                      tier_config)
from ruyi_core.family.modeling import RuyiForCausalLM
from ruyi_core.family.presets import PRESETS
from ruyi_core.spec import FamilySpec, check_exit_points

SAMPLE_PROMPT = "What is 2 + 3?"  # a neutral question for the sample answer a summary shows


def init_family(spec: FamilySpec, texts=None) -> tuple[RuyiForCausalLM, PreTrainedTokenizerBase]:
    """A family from the spec's base. A preset's tokenizer is trained on `texts` (the run's pretraining
    corpus)."""
    if spec.base in PRESETS:
        if texts is None:
            raise RuyiError(f"family.base {spec.base!r} is a preset: its tokenizer is trained on the run's pretraining "
                            "texts, and none were given")
        base, tok = build_preset_base(spec.base, texts, spec.seed)
    else:
        base, tok = load_base(spec.base)
        if tok is None:
            raise RuyiError(f"base {spec.base} has no tokenizer files: a family needs the base's tokenizer")
    try:
        check_exit_points(spec.exit_points, base.config.num_hidden_layers)
    except ValueError as e:
        raise RuyiError(f"family.{e}") from None
    family = family_from_base(base, spec.exit_points, spec.tiers, spec.shared_heads, take=True)
    return family, tok


def save_family(family: RuyiForCausalLM, tok: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Saved in the family's weights dtype (the base's), whatever dtype it was computed in."""
    out = Path(out_dir)
    dtype = getattr(torch, family.config.weights_dtype)
    state = None
    if next(family.parameters()).dtype != dtype:
        state = {k: v.to(dtype) for k, v in family.state_dict().items()}
    family.save_pretrained(out, state_dict=state)
    return save_family_files(family.config, tok, out)


def save_family_files(cfg, tok: PreTrainedTokenizerBase | None, out: Path) -> Path:
    """A family's files beside its weights: config (recording the weights' dtype), tokenizer, generation config."""
    computed, cfg.dtype = cfg.dtype, getattr(torch, cfg.weights_dtype)  # save_pretrained records the computing dtype
    cfg.save_pretrained(out)
    cfg.dtype = computed
    if tok is not None:
        tok.save_pretrained(out)
    generation_config(tok, cfg).save_pretrained(out)
    return out


def load_family(path: str | Path, runtime=None, stored_dtype: bool = False) -> tuple[RuyiForCausalLM,
                                                                                 PreTrainedTokenizerBase]:
    """A saved family, in `runtime`'s device and dtype (ruyi_core.runtime; default CPU fp32), or on the CPU in the
    dtype it was saved in (`stored_dtype`: for work that only moves tensors, such as export)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RuyiError(f"{path} is not a family directory (no config.json): create one with `ruyi family init`")
    with stored_files(path):
        if stored_dtype:
            model = RuyiForCausalLM.from_pretrained(path, dtype="auto").eval()
        else:
            model = (runtime.load(RuyiForCausalLM, path) if runtime is not None else
                     RuyiForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
        return model, load_tokenizer(path)


@contextmanager
def stored_files(path: Path) -> Iterator[None]:
    """Reading a saved family or tier: a truncated or damaged file (config, tokenizer, weights) is a data error
    naming the folder, not transformers' or safetensors' bare exception (which often names no file)."""
    try:
        yield
    except RuyiError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CorruptDataError(f"{path}: a file is truncated or damaged ({type(e).__name__}: {first}): delete it "
                               "(or its artifact) and re-run the stage that made it") from None


def load_tier(family_dir: str | Path, exit_point: int, runtime):
    """The standalone tier at `exit_point` of a saved family (what export_tier writes), in `runtime`, read from
    the family's files a tensor at a time: the family itself is never in memory."""
    from transformers import AutoModelForCausalLM

    from ruyi_core.family import names
    from ruyi_core.family.tensors import TensorFiles

    with stored_files(Path(family_dir)):
        cfg = RuyiConfig.from_pretrained(family_dir)
        tier_cfg = tier_config(cfg, exit_point)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tier_cfg, dtype=runtime.dtype)
        sd = names.convert(TensorFiles(family_dir, runtime.dtype), cfg, "family", "tier", exit_point)
        model.load_state_dict(sd, strict=True, assign=True)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=tier_cfg)  # computed, not stored
        model.generation_config = generation_config(load_tokenizer(Path(family_dir)), tier_cfg)
    return model.to(runtime.device).eval()


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved beside a checkpoint, or None when it has no tokenizer files."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


@torch.no_grad()
def greedy_sample(model, tok, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 16, **gen_kw) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, **gen_kw)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def export_tiers(family: RuyiForCausalLM, tok, out_dir: str | Path, tiers: list[str] | None = None) -> list[dict]:
    """Export each tier to out_dir/<tier>; one summary row per tier, shallowest first."""
    cfg = family.config
    names = sorted(tiers or cfg.tiers, key=lambda t: cfg.tier_exit(t))
    rows = []
    for tier in names:
        p = cfg.tier_exit(tier)
        path = export_tier(family, tier, Path(out_dir) / tier, tok)
        rows.append({"tier": tier, "exit_point": p, "depth": cfg.tier_depth(p), "parameters": family.tier_parameter_count(p),
                     "weight_bytes": dir_bytes(path, "*.safetensors"), "path": str(path),
                     "sample": greedy_sample(family, tok, exit_point=p) if tok is not None else ""})
    return rows
