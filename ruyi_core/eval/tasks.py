"""The spec's benchmarks as an lm-evaluation-harness task folder: the one definition of every benchmark, which the
evaluation stage runs and `ruyi eval tasks` writes for plain `lm_eval` runs on any exported tier.

Every benchmark's records are read, checked and rewritten as a normalized JSONL file beside its task YAML, so
lm-eval only ever sees one schema per format and loads it with the `datasets` "json" builder on a local file
(works offline). Normalizing here, not in lm-eval hooks, keeps bad data a one-line RuyiError before any model
runs, and lets the generative prompt be rendered with the family's own chat template (as SFT trained it).
"""
from __future__ import annotations

import inspect
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ruyi_core.errors import RuyiError
from ruyi_core.eval import scoring
from ruyi_core.eval.scoring import contains_results, exact_match_results, gold_answer

# format -> (primary metric, higher is better). The lead's promotion gate compares these.
PRIMARY = {"exact_match": ("exact_match", True), "contains": ("contains", True),
           "multiple_choice": ("acc", True), "perplexity": ("word_perplexity", False)}
GENERATIVE = ("exact_match", "contains")  # scored on a greedy answer to a chat-templated question
SCORERS = {"exact_match": exact_match_results, "contains": contains_results}  # a generative format's hook

_MC_TEMPLATE = "Question: {{question}}\nAnswer:"  # lm-eval's usual zero-shot MC prompt; choices follow " "


def task_name(benchmark: str) -> str:
    """The benchmark's lm-eval task. Prefixed: a benchmark called like one of lm-eval's own tasks (gsm8k, mmlu)
    does not shadow it, and results say they come from these definitions (zero-shot, chat-templated)."""
    return f"ruyi_{benchmark}"


def end_of_turn_ids(tokenizer, config) -> list[int]:
    """The tokens a tier stops generating at, as its package's generation_config.json lists them."""
    from ruyi_core.family.convert import generation_config

    return generation_config(tokenizer, config).eos_token_id or [tokenizer.eos_token_id]


def _field(rec: dict, key: str, kind: type, where: str):
    if not isinstance(rec.get(key), kind):
        raise RuyiError(f"{where}: needs a {kind.__name__} field {key!r}")
    return rec[key]


def _mc_gold(rec: dict, n_choices: int, where: str) -> int:
    """`gold` or `answer`: a choice index, or a letter A, B, C... (MMLU's two spellings)."""
    raw = rec.get("gold", rec.get("answer"))
    if isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip().isalpha():
        raw = ord(raw.strip().upper()) - ord("A")
    elif isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw < n_choices:
        raise RuyiError(f"{where}: 'gold' (or 'answer') must be a choice index 0..{n_choices - 1} "
                        f"or a letter A..{chr(ord('A') + n_choices - 1)}, got {raw!r}")
    return raw


def normalize(fmt: str, rec: dict, tokenizer, where: str) -> dict:
    """One record in the schema its task YAML reads."""
    if not isinstance(rec, dict):
        raise RuyiError(f"{where}: each line must be a JSON object")
    if fmt in GENERATIVE:
        q = _field(rec, "question", str, where)
        if "answer" not in rec or not str(rec["answer"]).strip():
            raise RuyiError(f"{where}: needs a non-empty 'answer' field")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False)
        target = gold_answer(rec["answer"]) if fmt == "exact_match" else str(rec["answer"]).strip()
        return {"prompt": prompt, "target": target}
    if fmt == "multiple_choice":
        q, choices = _field(rec, "question", str, where), _field(rec, "choices", list, where)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise RuyiError(f"{where}: 'choices' must be a list of at least two strings")
        return {"question": q, "choices": choices, "gold": _mc_gold(rec, len(choices), where)}
    return {"text": _field(rec, "text", str, where)}


def read_jsonl(path: Path, label: str) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RuyiError(f"{label}: {path} is not UTF-8 text: benchmarks are JSONL files") from None
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RuyiError(f"{label}: {path}:{i}: not valid JSON ({e.msg})") from None
    return out


def load_records(name: str, bench, spec, tokenizer, fetch_dir: Path, store=None) -> list[dict]:
    """The benchmark's first `limit` records, normalized (its source: ruyi_core.data.sources)."""
    from ruyi_core.data.sources import resolve

    label = f"eval.benchmarks.{name}.path"
    raw = []
    for path in resolve([bench.path], "benchmark", fetch_dir / name, label=label, store=store, seed=spec.data.seed):
        if not path.name.lower().endswith((".jsonl", ".ndjson")):
            raise RuyiError(f"{label}: {path.name} is not a .jsonl file: benchmarks are JSONL files")
        raw += read_jsonl(path, label)
    raw = raw[: bench.limit]
    if not raw:
        raise RuyiError(f"{label}: {bench.path} has no records")
    return [normalize(bench.format, r, tokenizer, f"eval.benchmarks.{name} record {i + 1}") for i, r in enumerate(raw)]


def task_config(name: str, fmt: str, data: Path, cache_dir: Path, max_new_tokens: int, stop: list[str],
                template: str = "qa") -> dict:
    base = {
        "task": name,
        "dataset_path": "json",
        # Absolute paths: lm-eval may run from any directory. The Arrow cache lives in the task folder, not in
        # ~/.cache, so removing the folder removes everything it made.
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "num_fewshot": 0,
        "output_type": {"exact_match": "generate_until", "contains": "generate_until",
                        "multiple_choice": "multiple_choice", "perplexity": "loglikelihood_rolling"}[fmt],
        "metadata": {"version": 1.0},
    }
    if fmt in GENERATIVE:
        # `until` also keeps lm-eval from defaulting to "\n\n", which would cut multi-line answers.
        return base | {"doc_to_text": "prompt", "doc_to_target": "target",
                       "generation_kwargs": {"until": stop, "do_sample": False, "max_gen_toks": max_new_tokens},
                       "metric_list": [{"metric": fmt, "aggregation": "mean", "higher_is_better": True}]}
    if fmt == "multiple_choice":
        return base | {"doc_to_text": _MC_TEMPLATE if template == "qa" else "{{question}}",
                       "doc_to_choice": "choices", "doc_to_target": "gold",
                       "target_delimiter": " ",
                       "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                       for m in ("acc", "acc_norm")]}  # acc_norm reuses the same log-probs
    return base | {"doc_to_text": "", "doc_to_target": "text",
                   "metric_list": [{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in (
                       ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                       ("bits_per_byte", "bits_per_byte"))]}


# How each format is asked and scored: the comment heading its YAML, for whoever runs the folder by hand.
_ASKED = {
    "exact_match": ["Asked as `prompt`: the question in the family's chat template. The greedy reply (up to an",
                    "end-of-turn token, at most max_gen_toks tokens) scores 1 when its last integer is `target`."],
    "contains": ["Asked as `prompt`: the question in the family's chat template. The greedy reply (up to an",
                 "end-of-turn token, at most max_gen_toks tokens) scores 1 when it contains `target` as a word."],
    "multiple_choice": ["Scored by log-likelihood: the choice most likely after the question should be `gold`."],
    "perplexity": ["Scored by the rolling log-likelihood of each `text`."],
}


def _task_yaml(cfg: dict, name: str, bench, n: int) -> str:
    head = [f"Benchmark {name} ({bench.format}): the first {n} records of {bench.path}, normalized in data/.",
            *_ASKED[bench.format]]
    text = "".join(f"# {line}\n" for line in head) + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    if bench.format in SCORERS:  # a YAML tag safe_dump cannot emit; utils.py is this folder's copy of scoring.py
        text += f"process_results: !function utils.{SCORERS[bench.format].__name__}\n"
    return text


@dataclass(frozen=True)
class Suite:
    """A written task folder: `--tasks <group>` runs every benchmark; `tasks` maps benchmark names to task names."""

    folder: Path
    group: str
    tasks: dict[str, str]
    records: dict[str, int]


def write_tasks(spec, tokenizer, eos: list[int], out_dir: Path, store=None) -> Suite:
    """The spec's benchmarks as an lm-eval include_path in `out_dir` (absent or empty): per benchmark a task YAML
    and its data, utils.py (the scoring hooks), and a group YAML named after the family listing them all.
    Generative prompts use `tokenizer`'s chat template and stop at the tokens `eos` (end_of_turn_ids). Every
    benchmark is read before any is written, so a bad one fails fast."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RuyiError(f"{out_dir} is not empty: write the tasks to a new folder (or remove this one)")
    ev = spec.eval
    if any(b.format in GENERATIVE for b in ev.benchmarks.values()) and not tokenizer.chat_template:
        raise RuyiError("exact_match and contains benchmarks prompt through the chat template, but this tokenizer "
                        "has none")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as fetched:
        records = {name: load_records(name, b, spec, tokenizer, Path(fetched), store)
                   for name, b in ev.benchmarks.items()}
    stop = [tokenizer.decode([i], skip_special_tokens=False) for i in eos]
    (out_dir / "data").mkdir()
    tasks = {name: task_name(name) for name in ev.benchmarks}
    for name, bench in ev.benchmarks.items():
        data = out_dir / "data" / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[name]), encoding="utf-8")
        cfg = task_config(tasks[name], bench.format, data, out_dir / "hf_cache", ev.max_new_tokens, stop,
                          bench.template)
        (out_dir / f"{tasks[name]}.yaml").write_text(_task_yaml(cfg, name, bench, len(records[name])),
                                                     encoding="utf-8")
    (out_dir / "utils.py").write_text(inspect.getsource(scoring), encoding="utf-8")
    group = spec.family.name  # never a task's name: family names have no "_"
    (out_dir / f"{group}.yaml").write_text(
        f"# Every benchmark of the spec: lm_eval --include_path {out_dir} --tasks {group}\n"
        + yaml.safe_dump({"group": group, "task": list(tasks.values()), "metadata": {"version": 1.0}},
                         sort_keys=False))
    return Suite(out_dir, group, tasks, {name: len(r) for name, r in records.items()})
