"""The familial model against vanilla transformers Qwen3: exactness, truncation, one-pass exits, cache."""
import pytest
import torch
from conftest import TOL, padded_batch, randomize_
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from ruyi_core.errors import RuyiError
from ruyi_core.family.convert import family_from_base
from ruyi_core.family.modeling import RuyiForCausalLM

EXITS = [0, 2, 3]  # micro base has 4 layers; exit 0 = one branch block straight on the embeddings


@pytest.fixture(scope="module")
def family(micro_base):
    return family_from_base(micro_base[0], EXITS)


def truncated_base(base: Qwen3ForCausalLM, p: int) -> Qwen3ForCausalLM:
    """The reference for exit p: the base model cut to depth p + 1 (a plain Qwen3)."""
    cfg = base.config.to_dict() | {"num_hidden_layers": p + 1, "layer_types": base.config.layer_types[: p + 1]}
    ref = Qwen3ForCausalLM(type(base.config)(**{k: v for k, v in cfg.items() if k != "model_type"}))
    keep = {k: v for k, v in base.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) <= p}
    ref.load_state_dict(keep, strict=True)
    return ref.eval()


@pytest.mark.parametrize("lengths", [[5], [7, 3], [16, 9, 1]])
def test_last_exit_equals_qwen3(micro_base, family, lengths):
    base = micro_base[0]
    ids, mask = padded_batch(base.config.vocab_size, lengths)
    with torch.no_grad():
        want = base(ids, attention_mask=mask).logits
        got = family(ids, attention_mask=mask, exit_point=EXITS[-1]).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() <= TOL


def test_each_exit_equals_truncated_base_after_init(micro_base, family):
    base = micro_base[0]
    ids, mask = padded_batch(base.config.vocab_size, [12, 6])
    real = mask.bool()
    for p in EXITS:
        with torch.no_grad():
            want = truncated_base(base, p)(ids, attention_mask=mask).logits
            got = family(ids, attention_mask=mask, exit_point=p).logits
        assert (got[real] - want[real]).abs().max() <= TOL, f"exit {p}"


def test_one_pass_gives_every_exit(family):
    # Make branches differ from the trunk, so a mixed-up block order would show.
    fam = randomize_(RuyiForCausalLM(family.config), seed=7).eval()
    ids, mask = padded_batch(fam.config.vocab_size, [10, 10])
    with torch.no_grad():
        out = fam.forward_exits(ids, attention_mask=mask, labels=ids)
        for p in EXITS:
            single = fam(ids, attention_mask=mask, labels=ids, exit_point=p)
            assert torch.equal(out.logits[p], single.logits)
            ce = torch.nn.functional.cross_entropy(single.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            assert torch.allclose(out.losses[p], ce, atol=1e-6)
    assert len({round(v.item(), 4) for v in out.losses.values()}) == len(EXITS)


@pytest.mark.slow
@pytest.mark.parametrize("p", EXITS)
def test_generate_with_cache_equals_without(family, p):
    fam = randomize_(RuyiForCausalLM(family.config), seed=3).eval()
    ids, mask = padded_batch(fam.config.vocab_size, [6, 4], seed=p)
    kw = dict(attention_mask=mask, max_new_tokens=8, exit_point=p, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = fam.generate(ids, do_sample=False, use_cache=True, **kw)
        uncached = fam.generate(ids, do_sample=False, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        torch.manual_seed(0)
        s1 = fam.generate(ids, do_sample=True, top_k=0, use_cache=True, **kw)
        torch.manual_seed(0)
        s2 = fam.generate(ids, do_sample=True, top_k=0, use_cache=False, **kw)
        assert torch.equal(s1, s2) and s1.shape == (2, 6 + 8)


def test_cache_is_tied_to_one_exit(family):
    ids = torch.randint(3, family.config.vocab_size, (1, 5))
    with torch.no_grad():
        out = family(ids, exit_point=0, use_cache=True)
        family(ids[:, :1], exit_point=0, past_key_values=out.past_key_values, use_cache=True)
        with pytest.raises(RuyiError, match="filled at exit 0"):
            family(ids[:, :1], exit_point=2, past_key_values=out.past_key_values, use_cache=True)
    with pytest.raises(ValueError, match="not one of this family's exits"):
        family(ids, exit_point=1)


def test_auto_classes_load_the_family(family, tmp_path):
    family.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, RuyiForCausalLM) and loaded.config.tiers == family.config.tiers
    for name, t in family.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


@pytest.mark.parametrize("order", ["ruyi_core first", "transformers first"])
def test_import_ruyi_core_is_enough_to_load_a_family(family, tmp_path, order):
    """The documented way: `import ruyi_core`, then transformers' Auto classes load a saved family, whichever
    of the two a program imports first; the package root alone imports neither torch nor transformers."""
    import subprocess
    import sys

    family.save_pretrained(tmp_path / "family")
    imports = ("import ruyi_core, sys\nlight = 'torch' not in sys.modules\nimport transformers\n"
               if order == "ruyi_core first" else "import transformers, ruyi_core\nlight = True\n")
    code = imports + ("from transformers import AutoModelForCausalLM\n"
                      f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'family')!r})\n"
                      "print(light, type(m).__name__, m.config.early_exit_points)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split("\n")[-2] == f"True RuyiForCausalLM {EXITS}", r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("damaged", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_damaged_saved_family_is_a_data_error(micro_base, family, tmp_path, damaged):
    """A truncated file of a stored family is named as damaged data with its fix, not a bug to report."""
    from ruyi_core.errors import CorruptDataError
    from ruyi_core.family.io import load_family

    family.save_pretrained(tmp_path)
    micro_base[1].save_pretrained(tmp_path)
    f = tmp_path / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptDataError, match=rf"^{tmp_path}: a file is truncated or damaged \(.*\): delete it"):
        load_family(tmp_path)
