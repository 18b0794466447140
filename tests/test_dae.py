"""DaE Stable Block Expansion: identity at init, the HF and megatron sides agree on expanded branches, and
DaE training on megatron moves nothing but the tier's new blocks and head."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TOL, padded_batch, randomize_, with_demo
from transformers import Qwen3ForCausalLM

from ruyi_core.demo import tokenizer_texts
from ruyi_core.dae.expand import expand_tier, merge_tier, tier_trainable_prefixes
from ruyi_core.errors import RuyiError
from ruyi_core.family.convert import build_preset_base, export_tier, family_from_base
from ruyi_core.family.io import load_family, save_family

pytestmark = pytest.mark.slow  # real training, generation or pipeline runs: minutes in all


@pytest.fixture(scope="module")
def family():
    base, tok = build_preset_base("micro", tokenizer_texts())
    return randomize_(family_from_base(base, [1, 3], tiers={"end": 1, "cloud": 3}), seed=2).eval(), tok


@pytest.mark.parametrize("init", ["zero", "clone"])
def test_expansion_is_identity_and_leaves_other_tiers_bit_identical(family, init):
    fam, _ = family
    ex = expand_tier(fam, "end", 2, init=init)
    ids, mask = padded_batch(fam.config.vocab_size, [9, 5])
    with torch.no_grad():
        before, after = fam.forward_exits(ids, mask).logits, ex.forward_exits(ids, mask).logits
    real = mask.bool()
    assert (after[1][real] - before[1][real]).abs().max() <= TOL
    assert torch.equal(after[3], before[3])
    old = fam.state_dict()
    assert all(torch.equal(v, old[k]) for k, v in ex.state_dict().items() if k in old)
    assert ex.tier_parameter_count(1) > fam.tier_parameter_count(1)
    new = dict(ex.model.expanded["1"][0].named_parameters())
    assert new["self_attn.o_proj.weight"].abs().max() == 0 == new["mlp.down_proj.weight"].abs().max()
    branch = dict(ex.model.branch_block(0).named_parameters())
    cloned = torch.equal(new["self_attn.q_proj.weight"], branch["self_attn.q_proj.weight"])
    assert cloned == (init == "clone")


def test_expanded_tier_exports_and_merges_back(family, tmp_path):
    fam, tok = family
    ex = expand_tier(fam, "end", 2)
    randomize_(ex.model.expanded, seed=9)  # trained-looking new blocks
    export_tier(ex, "end", tmp_path / "end", tok)
    tier = Qwen3ForCausalLM.from_pretrained(tmp_path / "end").eval()
    assert tier.config.num_hidden_layers == 4
    ids, mask = padded_batch(fam.config.vocab_size, [7, 7])
    with torch.no_grad():
        assert (tier(ids, attention_mask=mask).logits - ex(ids, attention_mask=mask, exit_point=1).logits
                ).abs().max() <= TOL
    fam_prefixes, tier_prefixes = tier_trainable_prefixes(ex.config, "end")
    assert tier_prefixes == ["model.layers.2.", "model.layers.3.", "lm_head."]
    target = expand_tier(fam, "end", 2)
    merge_tier(target, "end", tier.state_dict())
    for k, v in target.state_dict().items():
        assert torch.equal(v, ex.state_dict()[k]), k


def test_bad_expansions_are_one_line_errors(family):
    fam, _ = family
    with pytest.raises(RuyiError, match="unknown tier 'phone'"):
        expand_tier(fam, "phone", 2)
    with pytest.raises(RuyiError, match="deepest tier"):
        expand_tier(fam, "cloud", 2)
    with pytest.raises(RuyiError, match="dae.blocks"):
        expand_tier(fam, "end", 5)


@pytest.mark.parametrize("expand", [True, False])
def test_dae_training_on_megatron_moves_only_the_new_blocks_and_head(family, tmp_path, expand):
    """Expanded, DaE trains the new blocks and the head; unexpanded (the control, dae.expand false), the same
    steps train the tier's own block, norm and head."""
    fam, tok = family
    save_family(expand_tier(fam, "end", 2) if expand else fam, tok, tmp_path / "family")
    from transformers import AutoTokenizer

    from ruyi_core.demo import world
    from ruyi_core.data.pack import prepare_corpus

    prepare_corpus(world.pretrain_records(200), "pretrain", AutoTokenizer.from_pretrained(tmp_path / "family"),
                   tmp_path / "packed", 10**6)
    spec = {"family": {"name": "micro", "base": "micro", "exit_points": [1, 3]},
            "dae": {"tier": "end", "blocks": 2, "expand": expand, "cpt": {"steps": 3, "micro_batch_size": 4, "global_batch_size": 4,
                                                        "seq_length": 32, "save_every": 3, "lr": 1e-2, "warmup_steps": 0}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(with_demo(spec)))

    def run(*args):
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    run("-m", "ruyi_core.megatron.ckpt", "from-hf", "--family", str(tmp_path / "family"), "--out", str(tmp_path / "init"))
    run("-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", "29731", "-m",
        "ruyi_core.megatron.trainer", "--stage", "dae_cpt", "--spec", str(tmp_path / "spec.yaml"),
        "--family", str(tmp_path / "family"), "--init", str(tmp_path / "init"), "--data", str(tmp_path / "packed"),
        "--out", str(tmp_path / "run"))
    run("-m", "ruyi_core.megatron.ckpt", "to-hf", "--ckpt", str(tmp_path / "run/checkpoints/iter_0000003"),
        "--family", str(tmp_path / "family"), "--out", str(tmp_path / "trained"))
    before, _ = load_family(tmp_path / "family")
    after, _ = load_family(tmp_path / "trained")
    trainable, _ = tier_trainable_prefixes(before.config, "end")
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed and all(k.startswith(tuple(trainable)) for k in changed), sorted(changed)[:5]
    assert "lm_head.0.weight" in changed
    assert any(k.startswith("model.expanded.1." if expand else "model.eelayers.0.") for k in changed)
    assert expand or set(trainable) == {"model.eelayers.0.", "model.norms.0.", "lm_head.0."}
    # the stage computes and logs its tier's exit only (its forward stops there)
    log = [json.loads(line) for line in (tmp_path / "run" / "dae_cpt_losses.jsonl").read_text().splitlines()]
    assert [r["exit_points"] for r in log] == [[1]] * 3 and all(len(r["exits"]) == 1 for r in log)
