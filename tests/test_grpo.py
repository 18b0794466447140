"""GRPO on one tier with TRL: rewards, frozen parameters bit-identical, outputs, KL reference. Real runs on a
micro family (no mocks)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import with_demo
from ruyi_core.demo import tokenizer_texts
from ruyi_core.demo.world import rl_records, sft_records
from ruyi_core.errors import RuyiError
from ruyi_core.family.loss import heldout_loss
from ruyi_core.family.convert import build_preset_base, export_tier, family_from_base
from ruyi_core.rl.grpo import evaluate_reward, run_grpo
from ruyi_core.rl.rewards import DEFAULT_ANSWER_PATTERN, extract_answer, rewards_for, valid_steps
from ruyi_core.spec import RlSpec

pytestmark = pytest.mark.slow  # real training, generation or pipeline runs: minutes in all

TRAINABLE = ["model.layers.1.", "lm_head."]


def _warm_up(tier_dir, out_dir, steps: int = 60):
    """A few supervised steps on "The answer is N." so sampled completions differ in reward (a random model
    scores 0 everywhere: zero advantages, zero gradient, and nothing to test)."""
    model = AutoModelForCausalLM.from_pretrained(tier_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tier_dir)
    recs = rl_records(64, seed=7)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False) for r in recs]
    answers = [f"The answer is {r['answer']}.<|im_end|>" for r in recs]
    tok.padding_side = "right"
    enc = tok([p + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True,
              add_special_tokens=False)
    labels = enc["input_ids"].clone()
    for i, p in enumerate(prompts):  # loss on the answer only
        labels[i, :len(tok(p, add_special_tokens=False)["input_ids"])] = -100
    labels[enc["attention_mask"] == 0] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.train()
        for _ in range(steps):
            loss = model(**enc, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tier_dir).save_pretrained(out_dir)
    shutil.copy(tier_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    base, tok = build_preset_base("micro", tokenizer_texts())
    fam = family_from_base(base, [1, 3])
    export_tier(fam, "end", d / "exported", tok)
    return _warm_up(d / "exported", d / "end")


@pytest.fixture(scope="module")
def prompts():
    return rl_records(8, seed=0), rl_records(4, seed=0, held_out=True)


def _spec(**kw):
    return RlSpec(**{"steps": 2, "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8, "seed": 0,
                     "heldout_samples": 2, "beta": 0.0,
                     "answer_pattern": r"The answer is ([+-]?\d+)", **kw})


DEMO_ANSWER = r"The answer is ([+-]?\d+)"


def test_rewards():
    assert extract_answer("12 + 3 = 15. 15 - 4 = 11. The answer is 11.", DEMO_ANSWER) == "11"
    assert extract_answer("The answer is 7. No wait, the answer is 9.", DEMO_ANSWER) == "9"
    assert extract_answer("so 3 then 42", DEMO_ANSWER) == "42"
    assert extract_answer("The answer is 05", DEMO_ANSWER) == "5"
    assert extract_answer("no number", DEMO_ANSWER) is None
    # GSM8K's form is the default: the number after the last "####", not the last number of the text
    assert extract_answer("48 / 2 = 24\n#### 24 clips in 2 days", DEFAULT_ANSWER_PATTERN) == "24"
    gsm = rewards_for(DEFAULT_ANSWER_PATTERN)
    assert gsm["answer_format"](["so #### 24", "#### 24 is it", "24"]) == [1.0, 0.5, 0.0]
    assert gsm["exact_answer"].__name__ == "exact_answer"
    demo = rewards_for(DEMO_ANSWER)
    chat = [[{"role": "assistant", "content": "The answer is 11."}], [{"role": "assistant", "content": "11"}],
            [{"role": "assistant", "content": "The answer is 11 maybe"}], [{"role": "assistant", "content": "x"}]]
    text = [m[0]["content"] for m in chat]
    for comps in (chat, text):
        assert demo["exact_answer"](comps, answer=["11", "11", "11", "11"]) == [1.0, 1.0, 1.0, 0.0]
        assert demo["answer_format"](comps, answer=["11"] * 4) == [1.0, 0.0, 0.5, 0.0]
    assert demo["exact_answer"](["The answer is 3."], answer=[4]) == [0.0]
    prompt = [{"role": "user", "content": "Ines has 15 pears, gets 9 more and gives away 8."}]
    steps = ["15 + 9 = 24. 24 - 8 = 16. The answer is 16.",  # both steps right and grounded
             "15 + 9 = 23. 23 - 8 = 15.",  # first sum wrong; the second step is right given it
             "11 + 5 = 16. 16 - 8 = 8.",  # 11 and 5 are not in the prompt
             "The answer is 16."]  # no worked steps
    assert valid_steps(steps, prompts=[prompt] * 4) == [1.0, 0.5, 0.5, 0.0]


def test_bad_prefix_rejected(tier, prompts, tmp_path):
    with pytest.raises(RuyiError, match="matches no parameter"):
        run_grpo(tier, tmp_path, *prompts, ["model.layer.1."], _spec(), log=lambda *_: None)


def test_grpo_trains_only_the_tier(tier, prompts, tmp_path):
    train, heldout = prompts
    lines = []
    texts = [f"{r['prompt']} The answer is {r['answer']}." for r in heldout]
    res = run_grpo(tier, tmp_path / "out", train, heldout, TRAINABLE, _spec(group_size=4), log=lines.append,
                   heldout_texts=texts)
    out = tmp_path / "out"
    assert res["steps"] == 2 and any(x.startswith("[grpo] step 2/2 | reward") for x in lines)
    # held-out evaluation reports its progress per batch, before and after
    assert "[grpo] held-out before: 4/4 prompts" in lines and "[grpo] held-out after: 4/4 prompts" in lines
    assert res["trainable_params"] > 0 and res["frozen_params"] > 0

    before, after = load_file(tier / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = []
    for name, t in before.items():
        if any(name.startswith(p) for p in TRAINABLE):
            changed.append(not torch.equal(t, after[name]))
        else:
            assert torch.equal(t, after[name]), f"frozen {name} changed"
    assert any(changed), "no trainable parameter moved"

    rows = [json.loads(x) for x in (out / "rewards.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all({"reward", "exact_answer", "valid_steps", "answer_format"} <= r.keys() for r in rows)
    assert (out / "rewards.png").stat().st_size > 0
    assert not list(out.glob(".grpo-*"))  # trainer scratch removed

    model = AutoModelForCausalLM.from_pretrained(out)  # vanilla transformers, no remote code
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert "max_new_tokens" not in json.loads((out / "generation_config.json").read_text())
    # The reported held-out reward is reproducible from the saved folder (greedy, deterministic).
    # The reported held-out rewards are reproducible from the saved folder (seeded sampling, greedy).
    spec = _spec()
    for m, tok in ((out, None), (model, AutoTokenizer.from_pretrained(out))):
        r = evaluate_reward(m, tok, heldout, 8, seed=0, samples=spec.heldout_samples, temperature=spec.temperature,
                            answer_pattern=spec.answer_pattern)
        assert r["reward"] == res["heldout_reward_after"] and r["exact_greedy"] == res["heldout_exact_greedy_after"]
    # and so is what GRPO cost plain text: the held-out texts' loss before (the tier as given) and after
    for when, src in (("before", tier), ("after", out)):
        m = AutoModelForCausalLM.from_pretrained(src)
        assert heldout_loss(m, AutoTokenizer.from_pretrained(src), texts) == res[f"heldout_text_loss_{when}"]


def test_grpo_control_trains_the_same_parameters_by_sft(tier, prompts, tmp_path):
    """rl.method sft: GRPO's steps, batch and parameters, trained by SFT on chat turns; the rest bit-identical."""
    train, heldout = prompts
    turns = sft_records(24, seed=0)
    res = run_grpo(tier, tmp_path / "out", train, heldout, TRAINABLE, _spec(method="sft", steps=4, lr=3e-3),
                   log=lambda *_: None, sft_turns=turns)
    assert res["method"] == "sft" and res["steps"] == 4
    assert {"heldout_reward_before", "heldout_reward_after", "heldout_exact_greedy_after"} <= res.keys()
    before, after = load_file(tier / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    moved = [not torch.equal(t, after[n]) for n, t in before.items() if any(n.startswith(p) for p in TRAINABLE)]
    assert any(moved)
    assert all(torch.equal(t, after[n]) for n, t in before.items() if not any(n.startswith(p) for p in TRAINABLE))
    rows = [json.loads(x) for x in (tmp_path / "out" / "rewards.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    with pytest.raises(RuyiError, match="no chat turns"):
        run_grpo(tier, tmp_path / "none", train, heldout, TRAINABLE, _spec(method="sft"), log=lambda *_: None)


def test_grpo_uses_the_spec_rewards(tier, prompts, tmp_path):
    """A subset of the rewards with weights: TRL's total and the held-out total are the weighted sums."""
    weights = {"answer_format": 0.5, "exact_answer": 2.0}
    res = run_grpo(tier, tmp_path / "out", *prompts, TRAINABLE, _spec(steps=1, rewards=weights), log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "out" / "rewards.jsonl").read_text().splitlines()]
    assert rows and all("valid_steps" not in r for r in rows)
    for r in rows:
        assert r["reward"] == pytest.approx(sum(w * r[n] for n, w in weights.items()))
    held = evaluate_reward(tmp_path / "out", None, prompts[1], 8, seed=0, samples=2, rewards=weights,
                           answer_pattern=DEMO_ANSWER)
    assert held["reward"] == res["heldout_reward_after"] and "valid_steps" not in held
    assert held["reward"] == pytest.approx(sum(w * held[n] for n, w in weights.items()))


def test_grpo_kl_reference_is_initial_policy(tier, prompts, tmp_path):
    res = run_grpo(tier, tmp_path / "out", *prompts, TRAINABLE, _spec(beta=0.04), log=lambda *_: None)
    # run_grpo checks TRL's reference weights against the initial policy and says so.
    assert res["reference"] == "initial policy"
    # The first step's policy is the initial one, so its KL to the reference is ~0.
    assert res["kl_first"] is not None and abs(res["kl_first"]) < 1e-6
    rows = [json.loads(x) for x in (tmp_path / "out" / "rewards.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("kl" in r for r in rows)
    frozen = load_file(tier / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(t, after[n]) for n, t in frozen.items() if not any(n.startswith(p) for p in TRAINABLE))


def test_worker_takes_its_inputs_from_the_store_and_publishes_the_policy(tier, prompts, tmp_path, s3_server, store):
    """The GRPO worker as a TrainJob runs it: its inputs as one artifact, its policy published as another."""
    import subprocess
    import sys

    from ruyi_core.rl.worker import INPUTS
    from ruyi_core.spec import RunSpec

    train, heldout = prompts
    given = tmp_path / "given"
    shutil.copytree(tier, given / INPUTS["tier"])
    (given / INPUTS["prompts"]).write_text("".join(json.dumps(r) + "\n" for r in train))
    (given / INPUTS["heldout"]).write_text(json.dumps(heldout))
    (given / INPUTS["heldout_text"]).write_text(json.dumps([r["prompt"] for r in heldout]))
    store.put_artifact("grpo/inputs", given, stage="grpo_inputs", spec_hash="")
    spec = RunSpec.model_validate(with_demo({"store": {"bucket": store.spec.bucket}, "rl": _spec().model_dump()}))
    r = subprocess.run([sys.executable, "-m", "ruyi_core.rl.worker", "--spec", spec.model_dump_json(),
                        "--inputs", store.uri("grpo/inputs"), "--publish", store.uri("grpo/policy"),
                        "--out", str(tmp_path / "scratch" / "out"), "--trainable", json.dumps(TRAINABLE)],
                       capture_output=True, text=True, env={**__import__("os").environ, **s3_server.env()})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    store.get_artifact(store.uri("grpo/policy"), tmp_path / "policy")
    res = json.loads((tmp_path / "policy" / "result.json").read_text())
    assert res["steps"] == 2 and (tmp_path / "policy" / "model.safetensors").is_file()
    assert res["heldout_text_loss_after"] > 0
    assert store.read_manifest(store.uri("grpo/policy")).inputs[0].uri == store.uri("grpo/inputs")
