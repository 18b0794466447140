"""lm-evaluation-harness task configs for the spec's benchmarks.

Every benchmark's records are read, checked and rewritten as a normalized JSONL file beside its task YAML, so
lm-eval only ever sees one schema per format and loads it with the `datasets` "json" builder on a local file
(works offline). Normalizing here, not in lm-eval hooks, keeps bad data a one-line RuyiError before any model
runs, and lets the generative prompt be rendered with the model's own chat template (as SFT trained it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ruyi_core.errors import RuyiError
from ruyi_core.rl.rewards import extract_answer

# format -> (primary metric, higher is better). The lead's promotion gate compares these.
PRIMARY = {"exact_match": ("exact_match", True), "contains": ("contains", True),
           "multiple_choice": ("acc", True), "perplexity": ("word_perplexity", False)}
GENERATIVE = ("exact_match", "contains")  # scored on a greedy answer to a chat-templated question

_MC_TEMPLATE = "Question: {{question}}\nAnswer:"  # lm-eval's usual zero-shot MC prompt; choices follow " "


def exact_match_results(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` hook: the answer extracted from the generation equals the gold answer.
    Referenced from the YAML as an importable function, so no generated Python module is needed."""
    return {"exact_match": float(extract_answer(results[0]) == doc["target"])}


def contains_results(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` hook: the gold answer appears in the generation as a whole word or phrase
    (case-insensitive), as in "The home of Alice is Paris." for the gold "Paris"."""
    found = re.search(rf"(?<!\w){re.escape(doc['target'])}(?!\w)", results[0], re.IGNORECASE)
    return {"contains": float(found is not None)}


def gold_answer(answer) -> str:
    """The gold answer as extract_answer would print it: GSM8K's "... #### 1,234" keeps the text after the
    last '####'; integers are normalized ("05" -> "5") and lose thousands separators."""
    text = str(answer).split("####")[-1].strip()
    try:
        return str(int(text.replace(",", "")))
    except ValueError:
        return text  # not an integer: extract_answer never yields it, so such a record always scores 0


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
        # Arrow cache inside the throwaway task folder, not one more entry in ~/.cache per evaluation.
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


def write_tasks(spec, tokenizer, out_dir: Path, stop: list[str], store=None) -> list[str]:
    """One task YAML and its data per benchmark under out_dir (an lm-eval include_path); returns the task
    names (the benchmark names). Every benchmark is read before any is written, so a bad one fails fast."""
    out_dir = Path(out_dir)
    ev = spec.eval
    if any(b.format in GENERATIVE for b in ev.benchmarks.values()) and not tokenizer.chat_template:
        raise RuyiError("exact_match and contains benchmarks prompt through the chat template, but this tokenizer "
                        "has none")
    records = {name: load_records(name, b, spec, tokenizer, out_dir / "fetched", store)
               for name, b in ev.benchmarks.items()}
    for name, bench in ev.benchmarks.items():
        data = out_dir / "data" / f"{name}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in records[name]))
        cfg = task_config(name, bench.format, data, out_dir / "hf_cache", ev.max_new_tokens, stop, bench.template)
        text = yaml.safe_dump(cfg, sort_keys=False)
        if bench.format in GENERATIVE:  # a YAML tag safe_dump cannot emit
            text += f"process_results: !function {__name__}.{bench.format}_results\n"
        (out_dir / f"{name}.yaml").write_text(text)
    return list(ev.benchmarks)
