"""Tier exports load in vanilla transformers (fresh process, no ruyi_core) and equal the family; published
Ruyi checkpoints import and match a reference written from the published structure."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TOL, padded_batch, randomize_
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from ruyi_core.family.convert import export_tier, family_from_base, import_published
from ruyi_core.family.modeling import RuyiForCausalLM

EXITS = [1, 2, 3]


def expected_tier_params(c, p: int) -> int:
    """Embeddings + (p+1) Qwen3 blocks + final norm + head, from the config alone."""
    h, hd = c.hidden_size, c.head_dim
    attn = h * hd * (c.num_attention_heads * 2 + c.num_key_value_heads * 2) + 2 * hd
    block = attn + 3 * h * c.intermediate_size + 2 * h
    return 2 * c.vocab_size * h + (p + 1) * block + h


def test_exported_tiers_load_in_vanilla_transformers(micro_base, tmp_path):
    base, tok = micro_base
    fam = randomize_(family_from_base(base, EXITS, tiers={"end": 1, "edge": 2, "cloud": 3}), seed=5).eval()
    ids, mask = padded_batch(fam.config.vocab_size, [9, 5])
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    want = {}
    for tier, p in fam.config.tiers.items():
        export_tier(fam, tier, tmp_path / tier, tok)
        with torch.no_grad():
            want[tier] = fam(ids, attention_mask=mask, exit_point=p).logits
        with safe_open(str(tmp_path / tier / "model.safetensors"), "pt") as f:
            n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        assert n == expected_tier_params(fam.config, p) == fam.tier_parameter_count(p), tier
        assert not (tmp_path / tier / "generation_config.json").read_text().count("max_new_tokens")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        b = torch.load({str(tmp_path / 'batch.pt')!r})
        out = {{}}
        for tier in ["end", "edge", "cloud"]:
            m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + tier).eval()
            AutoTokenizer.from_pretrained({str(tmp_path)!r} + "/" + tier)
            assert type(m).__name__ == "Qwen3ForCausalLM", type(m)
            with torch.no_grad():
                out[tier] = m(b["ids"], attention_mask=b["mask"]).logits
        assert not any(k.startswith("ruyi_core") for k in sys.modules)
        torch.save(out, {str(tmp_path / 'out.pt')!r})
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path)
    got = torch.load(tmp_path / "out.pt")
    real = mask.bool()
    for tier in want:
        assert (got[tier][real] - want[tier][real]).abs().max() <= TOL, tier


def _published_checkpoint(tmp_path, arch: str, exits: list[int], shared_heads: bool):
    """Write a checkpoint in the published layout straight from its key structure (no ruyi_core code)."""
    L, seed = exits[-1] + 1, 11
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "qwen3":
        cfg_cls, model_cls = Qwen3Config, Qwen3ForCausalLM
        common["head_dim"] = 8
    else:
        cfg_cls, model_cls = Qwen2Config, Qwen2ForCausalLM
    trunk = randomize_(model_cls(cfg_cls(**common)), seed=seed)
    donor = randomize_(model_cls(cfg_cls(**common)), seed=seed + 1)  # distinct branch weights
    sd = {k: v for k, v in trunk.state_dict().items() if k not in ("model.norm.weight", "lm_head.weight")}
    g = torch.Generator().manual_seed(seed)
    for k, p in enumerate(exits[:-1]):
        pre = f"model.layers.{p}."
        sd |= {f"model.eelayers.{k}.{n[len(pre):]}": v for n, v in donor.state_dict().items() if n.startswith(pre)}
    for k in range(len(exits)):
        sd[f"model.norms.{k}.weight"] = 1 + 0.1 * torch.randn(32, generator=g)
    heads = [torch.randn(97, 32, generator=g) * 0.1 for _ in range(1 if shared_heads else len(exits))]
    if shared_heads:
        sd["lm_head.weight"] = heads[0]
    else:
        sd |= {f"lm_head.{k}.weight": w for k, w in enumerate(heads)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    raw = json.loads(cfg_cls(**common).to_json_string()) | {
        "model_type": f"ruyi_{arch}", "early_exit_points": exits, "shared_heads": shared_heads,
        "default_early_exit_point": exits[-1], "architectures": [f"Ruyi{arch.capitalize()}ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return sd, cfg_cls, model_cls, common


def reference_exit(sd, cfg_cls, model_cls, common, exits, p, shared_heads):
    """Exit p in the published structure: trunk 0..p-1, eelayers[k] (or the last trunk layer), norms[k], head k."""
    k = exits.index(p)
    ref = model_cls(cfg_cls(**(common | {"num_hidden_layers": p + 1}))).eval()
    want = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"],
            "model.norm.weight": sd[f"model.norms.{k}.weight"],
            "lm_head.weight": sd["lm_head.weight" if shared_heads else f"lm_head.{k}.weight"]}
    block = f"model.eelayers.{k}." if k < len(exits) - 1 else f"model.layers.{p}."
    for n, v in sd.items():
        if n.startswith("model.layers.") and int(n.split(".")[2]) < p:
            want[n] = v
        elif n.startswith(block):
            want[f"model.layers.{p}." + n[len(block):]] = v
    ref.load_state_dict(want, strict=True)
    return ref


@pytest.mark.parametrize("arch,shared", [("qwen3", False), ("qwen2", False), ("qwen3", True)])
def test_import_published_matches_reference(tmp_path, arch, shared):
    exits = [1, 3, 5]
    sd, cfg_cls, model_cls, common = _published_checkpoint(tmp_path, arch, exits, shared)
    fam = import_published(tmp_path)
    assert isinstance(fam, RuyiForCausalLM) and fam.config.base_arch == arch
    ids, mask = padded_batch(97, [8, 5])
    real = mask.bool()
    for p in exits:
        ref = reference_exit(sd, cfg_cls, model_cls, common, exits, p, shared)
        with torch.no_grad():
            want = ref(ids, attention_mask=mask).logits
            got = fam(ids, attention_mask=mask, exit_point=p).logits
        assert (got[real] - want[real]).abs().max() <= TOL, f"exit {p}"
    # and the imported family's tiers export to the plain architecture
    export_tier(fam, "end", tmp_path / "end")
    tier = model_cls.from_pretrained(tmp_path / "end").eval()
    with torch.no_grad():
        assert (tier(ids, attention_mask=mask).logits[real] - fam(ids, attention_mask=mask, exit_point=1)
                .logits[real]).abs().max() <= TOL
