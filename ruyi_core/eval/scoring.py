"""How the generative benchmarks are scored: lm-eval `process_results` hooks and the answer forms they compare.

Standard library only: `ruyi eval tasks` copies this file verbatim as utils.py beside the task YAMLs, which name
these hooks as `!function utils.<name>` (lm-eval loads utils.py from the YAML's own folder), so a task folder runs
in plain lm-eval without ruyi_core installed.
"""
from __future__ import annotations

import re

_INT = re.compile(r"[+-]?\d+")


def last_integer(text: str) -> str | None:
    """The reply's answer: its last integer, normalized ("05" and "+5" are "5"); None when it has none. The same
    answer as ruyi_core.rl.rewards.extract_answer without an answer pattern."""
    ints = _INT.findall(text)
    return str(int(ints[-1])) if ints else None


def gold_answer(answer) -> str:
    """The gold answer as last_integer would print it: GSM8K's "... #### 1,234" keeps the text after the last
    '####'; integers are normalized ("05" -> "5") and lose thousands separators."""
    text = str(answer).split("####")[-1].strip()
    try:
        return str(int(text.replace(",", "")))
    except ValueError:
        return text  # not an integer: last_integer never yields it, so such a record always scores 0


def exact_match_results(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` hook: the reply's last integer equals the gold answer (`target`)."""
    return {"exact_match": float(last_integer(results[0]) == doc["target"])}


def contains_results(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` hook: the gold answer appears in the reply as a whole word or phrase
    (case-insensitive), as in "The home of Alice is Paris." for the gold "Paris"."""
    found = re.search(rf"(?<!\w){re.escape(doc['target'])}(?!\w)", results[0], re.IGNORECASE)
    return {"contains": float(found is not None)}
