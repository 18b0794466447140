"""`ruyi plan`: sizes that match the published models and our own modules; refusal of a layout that cannot fit."""
from pathlib import Path

import pytest
import yaml

from ruyi_core.demo import tokenizer_texts
from ruyi_core.plan import Arch, base_arch, plan_run
from ruyi_core.spec.checks import quantity

ROOT = Path(__file__).resolve().parents[1]


def test_published_qwen3_sizes():
    """Qwen3-14B: 14.8B total, 13.2B non-embedding (its model card); Qwen3-0.6B: 0.6B / 0.44B, tied."""
    total, body = base_arch("s3://ruyi/bases/Qwen3-14B-Base").base()
    assert abs(total / 14.8e9 - 1) < 0.01 and abs(body / 13.2e9 - 1) < 0.01
    total, body = base_arch("/models/Qwen3-0.6B").base()
    assert abs(total / 0.6e9 - 1) < 0.01 and abs(body / 0.44e9 - 1) < 0.01


@pytest.mark.parametrize("shared", [False, True])
def test_counts_match_the_modules(shared):
    """The formulas count exactly what our family, its tiers and a plain Qwen3 hold."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ruyi_core.family.convert import build_preset_base, family_from_base

    base, _ = build_preset_base("micro", tokenizer_texts())
    a = Arch.from_config(base.config.to_dict())
    assert a.base()[0] == base.num_parameters()
    fam = family_from_base(base, [0, 2, 3], shared_heads=shared)
    assert a.family([0, 2, 3], shared) == fam.num_parameters()
    assert all(a.tier(p) == fam.tier_parameter_count(p) for p in (0, 2, 3))
    tied = Qwen3ForCausalLM(Qwen3Config(**{**base.config.to_dict(), "tie_word_embeddings": True}))
    assert Arch.from_config(tied.config.to_dict()).base()[0] == tied.num_parameters()


def test_flagship_plan_fits_and_a_single_gpu_layout_is_refused(tmp_path, run_cli):
    code, out = run_cli(["plan", "--spec", ROOT / "specs/ruyi2-14b.yaml"])
    assert code == 0 and "14.77B parameters (13.21B non-embedding)" in out and "NO" not in out
    assert all(stage in out for stage in ("cpt", "sft", "dae_cpt", "grpo", "evaluate"))
    raw = yaml.safe_load((ROOT / "specs/ruyi2-14b.yaml").read_text())
    raw["train"]["parallel"] = {"tp": 1, "pp": 1, "dp": 1, "nodes": 1}  # one GPU
    raw["train"]["trainjob"]["gpus_per_node"] = 1
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(raw))
    code, out = run_cli(["plan", "--spec", tmp_path / "one.yaml", "--gpu", "h200-141gb"])
    last = out.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: plan: stage cpt needs") and "H200" in last
    # the pipeline refuses it before anything is compiled, uploaded or run
    from pipelines.cli import _check_plan
    from ruyi_core.errors import RuyiError

    with pytest.raises(RuyiError, match="stage cpt needs"):
        _check_plan(tmp_path / "one.yaml")


def test_plan_tracks_layout_recompute_and_quantities():
    from ruyi_core.spec import load_spec

    spec = load_spec(ROOT / "specs/ruyi2-14b.yaml")
    _, _, rows = plan_run(spec, "h100-80gb")
    cpt = next(r for r in rows if r.stage == "cpt")
    spec.train.cpt.recompute = False
    _, _, rows = plan_run(spec, "h100-80gb")
    assert next(r for r in rows if r.stage == "cpt").activations > 2 * cpt.activations
    spec.train.parallel.tp = 8
    spec.train.parallel.dp = 2
    _, _, rows = plan_run(spec, "h100-80gb")
    assert next(r for r in rows if r.stage == "cpt").weights == pytest.approx(cpt.weights / 2)
    assert quantity("8Gi") == 8 * 2**30 and quantity("500M") == 5e8 and quantity("250m") == 0.25
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity("lots")
