"""The family's name map: family -> each layout -> family is the identity (keys and tensors) on a real micro
family with DaE blocks, with and without shared heads; every key of a layout comes from exactly one slot; a
tier's names are exactly a vanilla Qwen3's, and its modules are views of the family's."""
import pytest
import torch
from conftest import randomize_
from transformers import Qwen3ForCausalLM

from ruyi_core.dae.expand import expand_tier
from ruyi_core.family import names
from ruyi_core.family.convert import family_from_base, tier_config
from ruyi_core.megatron.convert import hf_to_megatron, megatron_to_hf

EXITS = [0, 1, 3]  # micro: 4 layers; exit 0 branches straight off the embeddings


@pytest.fixture(scope="module", params=[False, True], ids=["own_heads", "shared_heads"])
def family(micro_base, request):
    fam = family_from_base(micro_base[0], EXITS, tiers={"end": 0, "edge": 1, "cloud": 3}, shared_heads=request.param)
    return randomize_(expand_tier(fam, "edge", 2), seed=3).eval()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_slot_each(keys, cfg, layout, exit_point=None):
    """Each key lies under exactly one distinct prefix of the layout (a shared head's name repeats per exit)."""
    pres = {s.names[layout] for s in names.slots(cfg, exit_point) if s.names[layout] is not None}
    return all(sum(k.startswith(p) for p in pres) == 1 for k in keys)


def test_megatron_round_trip_and_unique_names(family):
    sd, cfg = family.state_dict(), family.config
    meg = hf_to_megatron(sd, cfg)
    extra = {"final.output_layer._extra_state": None, "decoder.layers.0.self_attention.linear_qkv._extra_state": None}
    assert same(megatron_to_hf(meg | extra, cfg), sd)  # megatron's own entries are not parameters
    assert one_slot_each(sd, cfg, "family") and one_slot_each(meg, cfg, "megatron")
    meg_names = [s.names["megatron"] for s in names.slots(cfg)]
    assert len(meg_names) == len(set(meg_names))  # one output layer per exit even when heads are shared
    per_block = 2 + 2 + 2 + 2  # norms, qkv + proj, q/k norms, fc1 + fc2
    assert len(meg) == 3 + per_block * (4 + 2 + 2) + 2 * (len(EXITS) - 1)
    assert meg["branches.1.extra.1.mlp.linear_fc1.weight"].shape[0] == 2 * cfg.intermediate_size


def test_tier_round_trip_matches_vanilla_qwen3(family):
    sd, cfg = family.state_dict(), family.config
    covered = set()
    for p in EXITS:
        tier = names.convert(sd, cfg, "family", "tier", p)
        want = Qwen3ForCausalLM(tier_config(family, p)).state_dict()
        assert tier.keys() == want.keys() and all(tier[k].shape == want[k].shape for k in tier), p
        back = names.convert(tier, cfg, "tier", "family", p)
        assert same(back, {k: sd[k] for k in back}) and len(back) == len(tier)
        assert one_slot_each(tier, cfg, "tier", p)
        covered |= back.keys()
    assert covered == sd.keys()  # every family parameter belongs to some tier


def test_published_round_trip(family, micro_base):
    sd, cfg = family.state_dict(), family.config
    pub = names.convert(sd, cfg, "family", "published")
    back = names.convert(pub, cfg, "published", "family")
    assert back.keys() == {k for k in sd if not k.startswith("model.expanded.")}  # no DaE in that layout
    assert same(back, {k: sd[k] for k in back}) and one_slot_each(pub, cfg, "published")
    assert ("lm_head.weight" in pub) == cfg.shared_heads and not names.unplaced(pub, cfg, "published")


def test_dae_selections(family):
    cfg = family.config
    assert names.own_prefixes(cfg, 1, "tier") == ["model.layers.2.", "model.layers.3.", "lm_head."]
    assert names.own_prefixes(cfg, 1, "megatron") == [
        "branches.1.extra.0.", "branches.1.extra.1.", "branches.1.head.output_layer."]
    head = "lm_head.0." if cfg.shared_heads else "lm_head.1."
    assert names.own_prefixes(cfg, 1, "family") == ["model.expanded.1.0.", "model.expanded.1.1.", head]
    assert names.own_prefixes(cfg, 0, "tier") == ["model.layers.0.", "model.norm.", "lm_head."]
    assert names.own_prefixes(cfg, 3, "family")[0] == "model.layers.3."  # the last exit's block is the trunk's
    linears = names.dae_linear_names(cfg, 1)
    assert linears[0] == "model.layers.2.self_attn.q_proj" and linears[-1] == "lm_head" and len(linears) == 15
    modules = dict(Qwen3ForCausalLM(tier_config(family, 1)).named_modules())
    assert all(isinstance(modules[n], torch.nn.Linear) for n in linears)


def test_tier_modules_are_the_family_modules_a_tier_exports(family):
    sd = family.state_dict()
    for p in EXITS:
        views = names.tier_modules(family, p)
        tier = Qwen3ForCausalLM(tier_config(family, p))
        plain = names.plain_modules(tier)
        assert list(views) == list(plain)  # the same modules, in the same order, under the same names
        # a view holds the very family tensors that export converts to those names
        exported = names.convert(sd, family.config, "family", "tier", p)
        viewed = {pre + n: t for pre, mod in views.items() for n, t in mod.state_dict().items()}
        assert same(viewed, exported), p
        assert {pre + n for pre, mod in plain.items() for n, _ in mod.named_parameters()} == {
            n for n, _ in tier.named_parameters()}
        assert family.tier_parameter_count(p) == sum(t.numel() for t in tier.parameters())
