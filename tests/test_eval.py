"""Per-tier evaluation through lm-evaluation-harness: reproducible, a packaged tier scores exactly as the family's
exit it came from, scores agree with hand computations, and bad benchmarks are one-line errors."""
import json
import math

import pytest
import torch
from conftest import randomize_, with_demo
from transformers import AutoModelForCausalLM

from ruyi_core.demo import tokenizer_texts, world
from ruyi_core.errors import RuyiError
from ruyi_core.eval import evaluate, measure
from ruyi_core.eval.tasks import contains_results, gold_answer, normalize
from ruyi_core.family.io import export_tiers, greedy_sample, init_family
from ruyi_core.rl.rewards import extract_answer
from ruyi_core.spec import BenchmarkSpec, EvalSpec, FamilySpec, RunSpec

pytestmark = pytest.mark.slow  # real training, generation or pipeline runs: minutes in all

FAMILY = FamilySpec(base="micro", exit_points=[0, 1, 3])
EDGE = 1  # the "edge" tier's exit point
MC_PROMPT = "Question: {}\nAnswer:"


def make_spec(benchmarks: dict, **eval_kw) -> RunSpec:
    kw = {"max_new_tokens": 8, "batch_size": 4, "speed_prompt_tokens": 16, "speed_new_tokens": 4} | eval_kw
    return RunSpec.model_validate(with_demo({"family": FAMILY.model_dump(), "eval": EvalSpec(benchmarks=benchmarks, **kw).model_dump()}))


SPEC = make_spec({"arithmetic": BenchmarkSpec(format="exact_match", path="demo:arithmetic", limit=4),
                  "facts_mc": BenchmarkSpec(format="multiple_choice", path="demo:facts_mc", limit=12),
                  "heldout_text": BenchmarkSpec(format="perplexity", path="demo:heldout_text", limit=4)})


@pytest.fixture(scope="module")
def family():
    fam, tok = init_family(FAMILY, tokenizer_texts())
    return randomize_(fam, seed=3).eval(), tok


@pytest.fixture(scope="module")
def edge_dir(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiers")
    export_tiers(*family, out, tiers=["edge"])
    return out / "edge"


@pytest.fixture(scope="module")
def edge(edge_dir):
    """The edge tier as a deployment loads it: a plain Qwen3 checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(edge_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    return model


@pytest.fixture(scope="module")
def family_scores(family, tmp_path_factory):
    return evaluate(*family, SPEC, tmp_path_factory.mktemp("work"), exit_point=EDGE)


def test_evaluation_is_reproducible(family, family_scores, tmp_path):
    lines = []
    again = evaluate(*family, SPEC, tmp_path, exit_point=EDGE, log=lines.append)
    assert again == family_scores
    assert [x.split(":")[0] for x in lines] == ["arithmetic 1/3", "facts_mc 2/3", "heldout_text 3/3"]
    assert lines[1].startswith("facts_mc 2/3: acc ") and "(n=12) in " in lines[1]
    b = again["benchmarks"]
    assert {n: (r["metric"], r["n"]) for n, r in b.items()} == {
        "arithmetic": ("exact_match", 4), "facts_mc": ("acc", 12), "heldout_text": ("word_perplexity", 4)}
    assert not b["heldout_text"]["higher_is_better"] and {"byte_perplexity", "bits_per_byte"} <= set(b["heldout_text"])
    assert again["average"] == pytest.approx((b["arithmetic"]["value"] + b["facts_mc"]["value"]) / 2)
    assert list(tmp_path.iterdir()) == []  # the task folder is thrown away


def test_tier_scores_equal_the_family_exit(family, edge, family_scores, tmp_path):
    _, tok = family
    tier = evaluate(edge, tok, SPEC, tmp_path)["benchmarks"]
    fam = family_scores["benchmarks"]
    for name in ("arithmetic", "facts_mc"):
        assert tier[name] == fam[name], name
    for key in ("value", "byte_perplexity", "bits_per_byte"):
        assert tier["heldout_text"][key] == pytest.approx(fam["heldout_text"][key], rel=1e-4), key


def test_a_tier_on_gpus_is_scored_by_lm_evals_vllm_backend(family, edge_dir, family_scores, tmp_path, monkeypatch):
    """With CUDA and vLLM installed a package is scored through lm-eval's VLLM over its folder; the family at an
    exit and the CPU use transformers. Not run here (no GPU, no vLLM): a stand-in for VLLM that serves the folder
    through transformers checks the wiring (the folder, dtype and generation budget reach it) and the scores."""
    import importlib.util
    import sys
    import types

    from ruyi_core.eval import harness
    from ruyi_core.family.convert import generation_config
    from ruyi_core.runtime import Runtime

    gpu, cpu = Runtime(torch.device("cuda"), torch.bfloat16), Runtime(torch.device("cpu"), torch.float32)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else find(name, *a))
    assert harness.use_vllm(gpu) and not harness.use_vllm(gpu, exit_point=EDGE) and not harness.use_vllm(cpu)
    seen = {}

    def vllm(pretrained, **kw):
        seen.update(kw, pretrained=pretrained)
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.float32).eval()
        return harness._tier_lm(model, family[1], None, generation_config(family[1], model.config).eos_token_id, 4)

    # lm-eval's vllm module imports vllm itself: the stand-in takes its place
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", types.ModuleType("vllm_causallms"))
    sys.modules["lm_eval.models.vllm_causallms"].VLLM = vllm
    scores = evaluate(None, family[1], SPEC, tmp_path, path=edge_dir, runtime=gpu)["benchmarks"]
    assert seen["pretrained"] == str(edge_dir) and seen["dtype"] == "bfloat16"
    assert seen["max_gen_toks"] == SPEC.eval.max_new_tokens
    assert scores["arithmetic"] == family_scores["benchmarks"]["arithmetic"]
    assert scores["facts_mc"] == family_scores["benchmarks"]["facts_mc"]


def test_package_reuses_the_scores_of_a_plain_export(family, edge_dir, family_scores, tmp_path):
    """A plain export holds the family exit's weights bit for bit, so package_tier does not evaluate the family
    at that exit again: the package's scores are reused and marked so. Other weights (a compressed tier) are."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from ruyi_core.family.io import save_family
    from ruyi_core.stages.ship import _family_comparison, same_weights

    family_dir = save_family(*family, tmp_path / "family")
    assert same_weights(edge_dir, family_dir, EDGE) and not same_weights(edge_dir, family_dir, 3)
    dirs = {"export": edge_dir, "family": family_dir}
    run = SimpleNamespace(fetch=dirs.get, inputs={}, spec=SPEC, work=tmp_path / "work", store=None)
    lines = []
    tier_scores = {"benchmarks": {"arithmetic": {"value": 0.25}, "facts_mc": {"value": 0.5}}}  # never recomputed
    got = _family_comparison(run, "edge", tier_scores, lines.append)
    assert got == {"family": {"arithmetic": 0.25, "facts_mc": 0.5}, "family_same_weights": True}
    assert lines == [f"the family at exit {EDGE} has the same weights as the package: its scores are the package's"]

    changed = tmp_path / "changed"
    changed.mkdir()
    weights = load_file(edge_dir / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1.0
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert not same_weights(changed, family_dir, EDGE)
    dirs["export"] = changed
    got = _family_comparison(run, "edge", tier_scores, lines.append)
    assert got == {"family": {b: r["value"] for b, r in family_scores["benchmarks"].items()},
                   "family_same_weights": False}
    assert lines[2].startswith("family arithmetic 1/3: exact_match ")


@torch.no_grad()
def _logprob(model, ctx_ids: list[int], cont_ids: list[int], **kw) -> float:
    ids = torch.tensor([ctx_ids + cont_ids])
    logp = torch.log_softmax(model(ids, **kw).logits[0, :-1].float(), -1)
    return sum(logp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids))


def test_multiple_choice_and_perplexity_match_a_hand_computation(family, family_scores):
    """lm-eval's conventions, by hand: a choice is scored as the tokens that " choice" adds after the prompt;
    rolling perplexity predicts every token of the text after the EOS prefix token (texts fit one window)."""
    model, tok = family
    sets = world.eval_sets(SPEC.data.seed)
    hits = hits_norm = 0
    for rec in sets["facts_mc"][:12]:
        ctx = tok.encode(MC_PROMPT.format(rec["question"]))
        lls = [_logprob(model, ctx, tok.encode(MC_PROMPT.format(rec["question"]) + " " + c)[len(ctx):],
                        exit_point=EDGE) for c in rec["choices"]]
        hits += max(range(len(lls)), key=lls.__getitem__) == rec["gold"]
        hits_norm += max(range(len(lls)), key=lambda i: lls[i] / len(rec["choices"][i])) == rec["gold"]
    mc = family_scores["benchmarks"]["facts_mc"]
    assert (mc["value"], mc["acc_norm"]) == (hits / 12, hits_norm / 12)

    total, words = 0.0, 0
    for rec in sets["heldout_text"][:4]:
        total += _logprob(model, [tok.eos_token_id], tok.encode(rec["text"]), exit_point=EDGE)
        words += len(rec["text"].split())
    ppl = family_scores["benchmarks"]["heldout_text"]["value"]
    assert ppl == pytest.approx(math.exp(-total / words), rel=1e-4)


def test_generative_scores_match_greedy_generation(family, edge, tmp_path):
    """Gold answers made from the tier's own greedy chat replies (half of them spoiled): exact_match must be
    the fraction left intact, so prompting, stopping and answer extraction all agree with greedy_sample."""
    _, tok = family
    questions = [r["question"] for r in world.eval_sets(0)["arithmetic"][:6]]
    got = [extract_answer(greedy_sample(edge, tok, q, max_new_tokens=8)) for q in questions]
    assert any(g is not None for g in got)  # the random micro model does emit integers, so this is not 0 == 0
    gold = [g if i % 2 == 0 and g is not None else "-12345" for i, g in enumerate(got)]
    data = tmp_path / "em.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"work #### {a}"}) + "\n"
                            for q, a in zip(questions, gold)))
    # `contains`: the gold is a word of the greedy reply (for half of them, a word it does not contain).
    replies = [greedy_sample(edge, tok, q, max_new_tokens=8) for q in questions]
    words = [r.split()[-1] if i % 2 == 0 and r.split() else "zebra" for i, r in enumerate(replies)]
    (tmp_path / "has.jsonl").write_text("".join(json.dumps({"question": q, "answer": w}) + "\n"
                                                for q, w in zip(questions, words)))
    spec = make_spec({"em": BenchmarkSpec(format="exact_match", path=str(data)),
                      "has": BenchmarkSpec(format="contains", path=str(tmp_path / "has.jsonl"))}, batch_size=1)
    scores = evaluate(edge, tok, spec, tmp_path / "work")["benchmarks"]
    assert scores["em"]["n"] == 6 and scores["em"]["value"] == sum(g == a for g, a in zip(got, gold)) / 6
    expect = sum(contains_results({"target": w}, [r])["contains"] for w, r in zip(words, replies)) / 6
    assert scores["has"]["n"] == 6 and scores["has"]["value"] == expect >= 0.5


def test_benchmark_from_the_store(family, family_scores, store, tmp_path):
    path = world.write_jsonl(tmp_path / "mc.jsonl", world.eval_sets(SPEC.data.seed)["facts_mc"])
    store.put_file(path, "datasets/eval/mc.jsonl")
    spec = make_spec({"facts_mc": BenchmarkSpec(format="multiple_choice", path=store.uri("datasets/eval/mc.jsonl"),
                                                limit=12)})
    got = evaluate(*family, spec, tmp_path / "work", store=store, exit_point=EDGE)["benchmarks"]["facts_mc"]
    assert got == family_scores["benchmarks"]["facts_mc"]


def test_demo_sets_are_chosen_by_path_not_name(family, family_scores, tmp_path):
    """`path: demo:<set>` picks the demo set whatever the benchmark is called, and a benchmark named like a demo
    set but pointing at a file reads that file."""
    mine = world.write_jsonl(tmp_path / "mine.jsonl", world.eval_sets(SPEC.data.seed)["facts_mc"][12:14])
    spec = make_spec({"mc": BenchmarkSpec(format="multiple_choice", path="demo:facts_mc", limit=12),
                      "facts_mc": BenchmarkSpec(format="multiple_choice", path=str(mine))})
    got = evaluate(*family, spec, tmp_path / "work", exit_point=EDGE)["benchmarks"]
    assert got["mc"] == family_scores["benchmarks"]["facts_mc"] and got["facts_mc"]["n"] == 2


@pytest.mark.parametrize("bench, match", [
    (BenchmarkSpec(format="perplexity", path="/nonexistent/heldout.jsonl"), "not found"),
    (BenchmarkSpec(format="multiple_choice", path="s3://ruyi/x.jsonl"), "no store was given"),
])
def test_bad_benchmark_is_one_line_error(family, tmp_path, bench, match):
    with pytest.raises(RuyiError, match=match) as e:
        evaluate(*family, make_spec({"gsm_unknown": bench}), tmp_path, exit_point=EDGE)
    assert "\n" not in str(e.value) and "eval.benchmarks.gsm_unknown" in str(e.value)


def test_bad_records_are_one_line_errors(family, tmp_path):
    _, tok = family
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(RuyiError, match=r"record 1: 'gold' \(or 'answer'\) must be a choice index 0..1"):
        evaluate(*family, make_spec({"mc": BenchmarkSpec(format="multiple_choice", path=str(bad))}), tmp_path)
    bad.write_text("{not json\n")
    with pytest.raises(RuyiError, match=r"mc.jsonl:1: not valid JSON"):
        evaluate(*family, make_spec({"mc": BenchmarkSpec(format="multiple_choice", path=str(bad))}), tmp_path)


def test_answer_forms(family):
    _, tok = family
    assert contains_results({"target": "Paris"}, ["The home of Alice is paris."]) == {"contains": 1.0}
    assert contains_results({"target": "Paris"}, ["The home of Alice is Parisville."]) == {"contains": 0.0}
    assert [gold_answer(a) for a in ("She pays 3 * 4 = 12.\n#### 1,234", 42, " 07 ", "n/a")] == [
        "1234", "42", "7", "n/a"]
    mc = {"question": "q", "choices": list("wxyz"), "answer": "c"}
    assert normalize("multiple_choice", mc, tok, "r")["gold"] == 2
    prompt = normalize("exact_match", {"question": "2 + 2?", "answer": "#### 4"}, tok, "r")["prompt"]
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "2 + 2?"}], add_generation_prompt=True,
                                             tokenize=False)


def test_speed_and_size(family, edge, edge_dir):
    fam, tok = family
    spec = make_spec(SPEC.eval.benchmarks)
    tier = measure(edge, tok, spec, path=edge_dir)
    at_exit = measure(fam, tok, spec, exit_point=EDGE)
    assert tier["parameters"] == at_exit["parameters"] == fam.tier_parameter_count(EDGE)
    assert tier["bytes_on_disk"] == sum(f.stat().st_size for f in edge_dir.iterdir())
    assert "bytes_on_disk" not in at_exit
    for r in (tier, at_exit):
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_memory_mib"] > 0
        assert (r["prompt_tokens"], r["new_tokens"], r["device"]) == (16, 4, "cpu")
