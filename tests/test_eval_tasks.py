"""The spec's benchmarks as an lm-eval task folder (`ruyi eval tasks`): plain lm-eval loads it by name without
ruyi_core, and a plain `lm_eval` run on an exported tier scores exactly what the evaluation stage scores."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import with_demo
from test_eval import FAMILY, edge, edge_dir, family, make_spec  # noqa: F401 - fixtures: a micro family, its edge tier

from ruyi_core.demo import world
from ruyi_core.errors import RuyiError
from ruyi_core.eval import evaluate, scoring
from ruyi_core.eval.tasks import end_of_turn_ids, write_tasks
from ruyi_core.family.io import greedy_sample
from ruyi_core.rl.rewards import extract_answer
from ruyi_core.spec import BenchmarkSpec

DEMO = {"arithmetic": BenchmarkSpec(format="exact_match", path="demo:arithmetic", limit=4),
        "facts_mc": BenchmarkSpec(format="multiple_choice", path="demo:facts_mc", limit=6),
        "facts_qa": BenchmarkSpec(format="contains", path="demo:facts_qa", limit=4),
        "heldout_text": BenchmarkSpec(format="perplexity", path="demo:heldout_text", limit=4)}


def test_the_folder_loads_in_lm_eval_by_name(family, tmp_path):
    """A user benchmark named like one of lm-eval's own tasks gets its own name; the family's name runs them all;
    the scoring hooks come from the folder's utils.py, which needs nothing but the standard library."""
    from lm_eval.tasks import TaskManager

    fam, tok = family
    mine = tmp_path / "gsm.jsonl"
    mine.write_text(json.dumps({"question": "2 + 2?", "answer": "It is 4.\n#### 4"}) + "\n")
    spec = make_spec(DEMO | {"gsm8k": BenchmarkSpec(format="exact_match", path=str(mine))})
    out = tmp_path / "tasks"
    suite = write_tasks(spec, tok, end_of_turn_ids(tok, fam.config), out)
    names = ["ruyi_arithmetic", "ruyi_facts_mc", "ruyi_facts_qa", "ruyi_heldout_text", "ruyi_gsm8k"]
    assert (suite.group, list(suite.tasks.values())) == ("ruyi", names)
    assert suite.records == {"arithmetic": 4, "facts_mc": 6, "facts_qa": 4, "heldout_text": 4, "gsm8k": 1}
    assert sorted(p.name for p in out.iterdir()) == sorted(["data", "ruyi.yaml", "utils.py",
                                                         *(f"{n}.yaml" for n in names)])

    loaded = TaskManager(include_path=str(out), include_defaults=False).load(["ruyi"])
    assert loaded["group_map"] == {"ruyi": names}
    gsm = loaded["tasks"]["ruyi_gsm8k"]
    assert gsm.config.generation_kwargs == {"until": ["<|im_end|>", "<|endoftext|>"], "do_sample": False,
                                            "max_gen_toks": spec.eval.max_new_tokens}
    (doc,) = gsm.test_docs()
    assert doc == {"prompt": tok.apply_chat_template([{"role": "user", "content": "2 + 2?"}],
                                                     add_generation_prompt=True, tokenize=False), "target": "4"}
    assert gsm.process_results(doc, ["So 2 + 2 = 4"]) == {"exact_match": 1.0}
    assert Path(gsm.config.process_results.__code__.co_filename) == out / "utils.py"
    assert len(loaded["tasks"]["ruyi_facts_mc"].test_docs()) == 6

    utils = (out / "utils.py").read_text()
    assert utils == Path(scoring.__file__).read_text()
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(ast.parse(utils)) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imported <= sys.stdlib_module_names | {"__future__"}, imported
    with pytest.raises(RuyiError, match="tasks is not empty: write the tasks to a new folder"):
        write_tasks(spec, tok, end_of_turn_ids(tok, fam.config), out)


def test_replies_are_scored_as_the_rewards_read_them():
    for text in ("The answer is 12.", "3 + 4 = 7, so 07", "-5 then +6", "no number", "1,234", ""):
        assert scoring.last_integer(text) == extract_answer(text), text


def test_ruyi_eval_tasks(run_cli, edge_dir, tmp_path):
    spec = tmp_path / "spec.yaml"
    bench = {n: b.model_dump(exclude_defaults=True) for n, b in DEMO.items()}
    spec.write_text(yaml.safe_dump(with_demo({"family": FAMILY.model_dump(), "eval": {"benchmarks": bench}})))
    code, out = run_cli(["eval", "tasks", "--spec", spec, "--model", edge_dir, "--out", tmp_path / "tasks"])
    assert code == 0, out
    assert "ruyi_heldout_text" in out and "perplexity" in out
    assert f"--include_path {tmp_path / 'tasks'} --tasks ruyi" in out.replace("\n", "")
    code, out = run_cli(["eval", "tasks", "--spec", spec, "--model", tmp_path, "--out", tmp_path / "other"])
    assert code == 2 and "is not a model directory (no config.json)" in out


@pytest.mark.slow  # a plain lm_eval run indexes lm-eval's own ~14k task YAMLs first: about a minute
def test_plain_lm_eval_scores_as_the_stage(family, edge, edge_dir, tmp_path):
    """`lm_eval --model hf --include_path <folder> --tasks <family>` on an exported tier scores every benchmark as
    the evaluation stage does, to the last digit. The exact_match gold answers are the tier's own greedy replies
    (every second one spoiled), so its score is known and not 0: prompt, stops and scoring all agree."""
    _, tok = family
    # Six questions the random tier answers with some number (most of its replies hold none).
    answered = ((r["question"], extract_answer(greedy_sample(edge, tok, r["question"], max_new_tokens=8)))
                for r in world.eval_sets(0)["arithmetic"])
    questions, replies = zip(*[qa for qa in answered if qa[1] is not None][:6])
    gold = [a if i % 2 == 0 and a is not None else "-12345" for i, a in enumerate(replies)]
    (tmp_path / "em.jsonl").write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
                                               for q, a in zip(questions, gold)))
    # batch 1: greedy_sample generates one question at a time
    spec = make_spec({"em": BenchmarkSpec(format="exact_match", path=str(tmp_path / "em.jsonl")),
                      "facts_mc": DEMO["facts_mc"], "heldout_text": DEMO["heldout_text"]}, batch_size=1)
    stage = evaluate(edge, tok, spec, tmp_path / "work")["benchmarks"]
    assert stage["em"]["value"] == sum(g == a for g, a in zip(gold, replies)) / 6 > 0

    suite = write_tasks(spec, tok, end_of_turn_ids(tok, edge.config), tmp_path / "tasks")
    cmd = [Path(sys.executable).parent / "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={edge_dir},dtype=float32", "--device", "cpu", "--batch_size", "1",
           "--include_path", suite.folder, "--tasks", suite.group, "--output_path", tmp_path / "results"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (results,) = (tmp_path / "results").rglob("results_*.json")
    plain = json.loads(results.read_text())["results"]
    for name, task in suite.tasks.items():
        got = {k.removesuffix(",none"): v for k, v in plain[task].items() if k.endswith(",none") and "stderr" not in k}
        want = {k: v for k, v in stage[name].items() if k not in ("format", "metric", "value", "higher_is_better", "n")}
        assert got == want | {stage[name]["metric"]: stage[name]["value"]}, name
