"""Specs: shipped ones load, bad ones stop with one line naming the field; the CLI end to end on micro."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from conftest import with_demo
from ruyi_core.errors import RuyiError, SpecError
from ruyi_core.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]



def test_shipped_specs_load():
    tiny = load_spec(ROOT / "specs/tiny.yaml")
    assert tiny.family.exit_points == [1, 4, 11] and tiny.family.tiers == {"end": 1, "edge": 4, "cloud": 11}
    big = load_spec(ROOT / "specs/ruyi2-14b.yaml")
    assert big.family.exit_points == [2, 21, 39]
    assert big.eval.benchmarks["gsm8k"].path.startswith("s3://") and big.package.tolerance == 0.01
    assert parse_spec(with_demo({"family": {"base": "micro", "exit_points": [0, 3]}})).family.tiers == {"end": 0, "cloud": 3}
    # a partial stage section keeps that stage's own defaults for everything it does not set
    partial = parse_spec(with_demo({"train": {"sft": {"steps": 50}}, "dae": {"sft": {"replay": 0.25}}}))
    assert (partial.train.sft.steps, partial.train.sft.lr, partial.train.sft.global_batch_size) == (50, 1e-3, 8)
    assert (partial.dae.sft.replay, partial.dae.sft.steps, partial.train.cpt.lr) == (0.25, 30, 3e-3)


@pytest.mark.parametrize("family,field,words", [
    ({"exit_points": [1, 6, 6, 11]}, "family.exit_points", "strictly increasing"),
    ({"exit_points": [1, 6, 10]}, "family", "last exit must be num_layers - 1 = 11"),
    ({"tiers": {"end": 1, "phone": 3}}, "family", "tiers.phone = 3 is not one of exit_points"),
    ({"base": "/nowhere/Qwen3-0.6B"}, "family", "neither a preset"),
    ({"exit_pionts": [1, 11]}, "family.exit_pionts", "Extra inputs are not permitted"),
])
def test_bad_specs_one_line(tmp_path, run_cli, family, field, words):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(with_demo({"family": family})))
    with pytest.raises(SpecError, match=words):
        load_spec(spec)
    code, out = run_cli(["family", "init", "--spec", spec, "--out", tmp_path / "f"])
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert out.startswith("error:") and field in out and words in out and "Traceback" not in out
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("section,words", [
    ({"dae": {"svd_ratio": 1.2}}, "dae.svd_ratio: Input should be less than 1"),
    ({"dae": {"svd_ratio": 0}}, "dae.svd_ratio: Input should be greater than 0"),
    ({"dae": {"blocks": 0}}, "dae.blocks: Input should be greater than or equal to 1"),
    ({"dae": {"tier": "phone"}}, "unknown tier 'phone'"),
    ({"dae": {"tier": "cloud"}}, "deepest tier"),
    ({"rl": {"group_size": 1}}, "rl.group_size: Input should be greater than or equal to 2"),
    ({"rl": {"tier": "watch"}}, "rl.tier: unknown tier 'watch'"),
    ({"train": {"cpt": {"steps": 5, "warmup_steps": 5}}}, "warmup_steps (5) must be below steps (5)"),
    ({"eval": {"benchmarks": {"GSM-8K": {"format": "exact_match", "path": "gsm8k.jsonl"}}}},
     "benchmark name 'GSM-8K'"),
    ({"eval": {"benchmarks": {"gsm8k": {"format": "bleu", "path": "gsm8k.jsonl"}}}},
     "eval.benchmarks.gsm8k.format: Input should be"),
    ({"eval": {"benchmarks": {"arithmetic": {"format": "exact_match"}}}}, "eval.benchmarks.arithmetic.path: Field"),
    ({"rl": {"rewards": {"exact_answer": 1.0, "brevity": 0.1}}},
     "rl.rewards: unknown reward 'brevity'; known rewards: exact_answer, valid_steps, answer_format"),
    ({"rl": {"rewards": {}}}, "rl.rewards: needs at least one reward"),
    ({"eval": {"benchmarks": {}}}, "the spec does not name eval.benchmarks: give"),
    ({"data": {"sft": []}}, "data.sft: is empty: list at least one source"),
    ({"rl": {"answer_pattern": "The answer is \\d+"}}, "must have exactly one group, the answer (it has 0)"),
    ({"package": {"tolerance": -0.1}}, "package.tolerance: Input should be greater than or equal to 0"),
    # known before any work from the spec and the base's config (tiny: 12 layers, 6 heads, 2 KV heads, 1024 positions)
    ({"train": {"cpt": {"lr": float("nan")}}}, "train.cpt.lr: Input should be a finite number"),
    ({"train": {"cpt": {"steps": 10, "warmup_steps": 5, "lr_schedule": "wsd", "lr_decay_fraction": 0.9}}},
     "lr_decay_fraction (0.9) gives 9 decay steps, more than the 5 after warm-up"),
    ({"train": {"parallel": {"tp": 3}}}, "train.parallel.tp = 3 must divide the base's 6 attention heads and 2"),
    ({"train": {"parallel": {"pp": 5}}}, "train.parallel.pp = 5 must divide the base's 12 layers"),
    ({"train": {"sft": {"seq_length": 4096}}}, "train.sft.seq_length (4096) exceeds the base's 1024 positions"),
    ({"train": {"cpt": {"loss": {"weights": [1.0, 1.0]}}}}, "train.cpt.loss.weights has 2 entries for 3 exits"),
    ({"train": {"cpt": {"loss": {"weights": [1.0, -0.5, 1.0]}}}}, "every weight must be >= 0"),
    ({"train": {"parallel": {"dp": 3}}}, "must be a multiple of micro_batch_size x train.parallel.dp (8 x 3)"),
    ({"family": {"tiers": {}}}, "tiers is empty"),
    ({"family": {"tiers": {"End_Tier": 11}}}, "'End_Tier' is not a safe tier name"),
    ({"pipeline": {"resources": {"train": {"memory": "lots"}}}}, "'lots' is not a Kubernetes quantity"),
    ({"train": {"trainjob": {"memory": "12Gb"}}}, "'12Gb' is not a Kubernetes quantity"),
    ({"train": {"launcher": "trainjob", "parallel": {"tp": 2, "pp": 2}, "trainjob": {"gpus_per_node": 2}}},
     "TP x PP x DP = 4 processes, but train.parallel.nodes x train.trainjob.gpus_per_node = 2"),
])
def test_bad_stage_specs_one_line(section, words):
    with pytest.raises(SpecError, match=re.escape(words)):
        parse_spec(with_demo(section))


def test_wsd_holds_the_peak_rate_then_anneals_as_cosine_ends():
    """The trainer's scheduler (megatron's): warm-up, then "wsd" stays at lr until its last fifth and decays to the
    same min_lr as "cosine", which is down by more than a third at mid-run."""
    import torch

    from ruyi_core.megatron.trainer import lr_scheduler

    lrs = {}
    for schedule in ("cosine", "wsd"):
        spec = parse_spec(with_demo({"train": {"cpt": {"steps": 100, "warmup_steps": 10, "lr": 2e-3, "min_lr": 2e-4,
                                                       "lr_schedule": schedule}}}))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        sched, lrs[schedule] = lr_scheduler(opt, spec.train.cpt), []
        for _ in range(100):
            sched.step(1)
            lrs[schedule].append(opt.param_groups[0]["lr"])
    wsd, cos = lrs["wsd"], lrs["cosine"]
    assert wsd[:10] == cos[:10] and wsd[9] == 2e-3  # the same warm-up
    assert all(lr == 2e-3 for lr in wsd[9:80]) and cos[49] < 1.3e-3
    assert wsd[89] == pytest.approx(1.1e-3) and wsd[99] == cos[99] == pytest.approx(2e-4)


def test_spec_selects_rewards():
    spec = parse_spec(with_demo({"rl": {"rewards": {"answer_format": 0.5, "exact_answer": 2.0}}}))
    assert list(spec.rl.rewards.items()) == [("answer_format", 0.5), ("exact_answer", 2.0)]
    default = parse_spec(with_demo({"rl": {}}))
    assert list(default.rl.rewards.items()) == [("exact_answer", 1.0), ("valid_steps", 1.0), ("answer_format", 1.0)]
    assert default.rl.answer_pattern == r"The answer is ([+-]?\d+)"


def test_a_spec_names_its_data(tmp_path):
    """Nothing defaults to the demo: a spec without a base, exits, data or benchmarks is refused in one line that
    names every missing field and the record formats, before torch, transformers or kfp is imported."""
    bare = tmp_path / "bare.yaml"
    bare.write_text("family: {name: mine}\nrl: {enabled: false}\n")
    code = ("import sys; sys.argv = ['ruyi', 'pipeline', 'run', '--local', '--spec', sys.argv[1]]\n"
            "import pipelines.cli\n"
            "try:\n    pipelines.cli.main()\nexcept SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('torch', 'transformers', 'kfp') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(bare)], capture_output=True, text=True, cwd=ROOT)
    *said, last = r.stdout.strip().splitlines()
    assert last == "2 []" and len(said) == 1, r.stdout + r.stderr
    assert ("does not name family.base, family.exit_points, data.pretrain, data.sft, data.heldout, eval.benchmarks"
            in said[0]) and "sft {messages: [{role, content}]}" in said[0]


@pytest.mark.parametrize("field,value,words", [
    ("eval", {"benchmarks": {"gsm8k": {"format": "exact_match", "path": "demo:gsm8k"}}},
     "eval.benchmarks.gsm8k.path: unknown source 'demo:gsm8k'; a benchmark may name one of demo:arithmetic"),
    ("eval", {"benchmarks": {"arithmetic": {"format": "exact_match", "path": "demo"}}},
     "eval.benchmarks.arithmetic.path: name a demo set (demo:<set>), not bare demo"),
    ("data", {"heldout": ["/nowhere/heldout.jsonl"]}, "data.heldout: /nowhere/heldout.jsonl does not exist"),
])
def test_sources_are_checked_before_work(tmp_path, run_cli, field, value, words):
    from ruyi_core.data.sources import check_sources

    raw = with_demo({field: value})
    with pytest.raises(RuyiError, match=re.escape(words)):
        check_sources(parse_spec(raw))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw))
    code, out = run_cli(["plan", "--spec", spec])
    assert code == 2 and len(out.strip().splitlines()) == 1 and words in out, out


def test_error_text_is_printed_literally(tmp_path, run_cli):
    """A message holding brackets (a pattern, a list) is printed as it is, not read as console markup."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(with_demo({"store": {"bucket": "Bad_Bucket"}})))
    code, out = run_cli(["plan", "--spec", spec])
    assert code == 2 and "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$" in out, out


@pytest.mark.slow
def test_bad_spec_in_a_real_process(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(with_demo({"family": {"exit_points": [3, 2]}})))
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    r = subprocess.run([sys.executable, "-m", "ruyi_core.cli", "family", "init", "--spec", str(spec), "--out",
                        str(tmp_path / "f")], capture_output=True, text=True, env={**env, "TERM": "xterm-256color"})
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert "family.exit_points: must be strictly increasing" in r.stdout
    assert "\x1b" not in r.stdout + r.stderr  # a pipe gets no colour codes, whatever the terminal type says
    # A bad option value (typer's vendored click raises it) is a usage error, not an internal one.
    r = subprocess.run([sys.executable, "-m", "ruyi_core.cli", "data", "validate", "--kind", "web", "x.jsonl"],
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Invalid value for '--kind'" in out and "internal error" not in out


def test_a_bug_is_an_internal_error_not_a_user_error(tmp_path, run_cli, monkeypatch):
    """Only a RuyiError is the user's to fix; anything else is one line pointing at the traceback's file."""
    import ruyi_core.family.io

    def broken(*a, **k):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(ruyi_core.family.io, "init_family", broken)
    spec = tmp_path / "ok.yaml"
    spec.write_text(yaml.safe_dump(with_demo({"family": {"base": "micro", "exit_points": [1, 3]}})))
    code, out = run_cli(["family", "init", "--spec", spec, "--out", tmp_path / "f"])
    (line,) = out.strip().splitlines()
    assert code == 1 and line.startswith("internal error: ValueError: boom (traceback: ") and "Traceback" not in out
    log = Path(re.search(r"traceback: (\S+);", line).group(1))
    assert "raise ValueError" in log.read_text()


def test_cli_init_export_generate(tmp_path, run_cli):
    spec = tmp_path / "micro.yaml"
    spec.write_text(yaml.safe_dump(with_demo({"family": {"name": "micro", "base": "micro", "exit_points": [1, 3]}})))
    assert run_cli(["family", "init", "--spec", spec, "--out", tmp_path / "fam"])[0] == 0
    code, out = run_cli(["family", "export", "--family", tmp_path / "fam", "--out", tmp_path / "tiers"])
    assert code == 0 and "end" in out and "cloud" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiers/end").config.num_hidden_layers == 2
    code, out = run_cli(["generate", "--model", tmp_path / "fam", "--tier", "end", "--max-new-tokens", "4",
                         "Where does Alice live?"])
    assert code == 0 and out.strip()
    code, out = run_cli(["generate", "--model", tmp_path / "fam", "--tier", "edge", "hi"])
    assert code == 2 and "unknown tier 'edge'" in out


def test_refusing_a_spec_imports_no_torch(tmp_path):
    """`ruyi pipeline compile/run/upload` refuse a bad spec before the heavy imports (torch, transformers, kfp)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_demo()) + "train: {cpt: {lr: .nan}}\n")
    code = ("import sys; sys.argv = ['ruyi', 'pipeline', 'compile', '--spec', sys.argv[1], '--out', 'x.yaml']\n"
            "import pipelines.cli\n"
            "try:\n    pipelines.cli.main()\nexcept SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('torch', 'transformers', 'kfp') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip().splitlines()[-1] == "2 []", r.stdout + r.stderr
    assert "train.cpt.lr: Input should be a finite number" in r.stdout


@pytest.mark.parametrize("content,words", [(b"\x7fELF\x02\x01\x01\x00\xd0\x00", "not a text file"),
                                           (b"family:\n  name: x\x00\n", "is a binary file"),
                                           (b"family: [1, 2\n", "not valid YAML")])
def test_a_spec_that_is_not_yaml_is_one_line(tmp_path, run_cli, content, words):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    code, out = run_cli(["plan", "--spec", spec])
    assert code == 2 and len(out.strip().splitlines()) == 1 and words in out and "Traceback" not in out
