"""Verifiable rewards for the demo's arithmetic word problems, in TRL's reward-function shape:
`f(completions, **dataset_columns) -> list[float]`, one value per completion.

A completion is either a string (standard datasets) or a list of chat messages `[{"role", "content"}]`
(conversational datasets, as GRPOTrainer passes them); both are accepted everywhere.
"""
from __future__ import annotations

import re

# SFT answers end with "The answer is N." (data/world.py); that sentence is the contract the rewards check.
_ANSWER = re.compile(r"The answer is\s*([+-]?\d+)", re.IGNORECASE)
_INT = re.compile(r"[+-]?\d+")
# Strict format: the completion ends with the answer sentence, period included.
_STRICT = re.compile(r"The answer is ([+-]?\d+)\.\s*$")


def completion_text(completion) -> str:
    """The generated text of one completion, whichever format it arrived in."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for msg in completion or []:
        if msg.get("role", "assistant") != "assistant":
            continue
        content = msg.get("content", "")
        if isinstance(content, list):  # multimodal-style content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)


def _norm_int(s: str) -> str:
    # "05", "+5" and "5" are the same answer.
    return str(int(s))


def extract_answer(text) -> str | None:
    """The number after the last "The answer is" (a model may restate itself; the last statement counts);
    without that sentence, the last integer in the text; None when there is no integer at all."""
    text = completion_text(text)
    hits = _ANSWER.findall(text)
    if hits:
        return _norm_int(hits[-1])
    ints = _INT.findall(text)
    return _norm_int(ints[-1]) if ints else None


def _gold(answer) -> str | None:
    try:
        return _norm_int(str(answer).strip())
    except ValueError:
        return str(answer).strip()


def exact_answer(completions, answer, **kw) -> list[float]:
    """1.0 when the extracted answer equals the gold `answer` column, else 0.0."""
    if isinstance(answer, (str, int)):  # one gold value for every completion
        answer = [answer] * len(completions)
    return [1.0 if (got := extract_answer(c)) is not None and got == _gold(a) else 0.0
            for c, a in zip(completions, answer, strict=True)]


def answer_format(completions, **kw) -> list[float]:
    """1.0 when the completion ends with "The answer is <int>." (the SFT format); 0.5 when it contains
    "The answer is <int>" elsewhere or without the period (right idea, sloppy ending: partial credit keeps a
    gradient toward the format); 0.0 otherwise. Case-sensitive for the full score, as SFT wrote it."""
    out = []
    for c in completions:
        text = completion_text(c)
        out.append(1.0 if _STRICT.search(text.strip()) else 0.5 if _ANSWER.search(text) else 0.0)
    return out


_EQUATION = re.compile(r"([+-]?\d+)\s*([+\-*])\s*([+-]?\d+)\s*=\s*([+-]?\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def valid_steps(completions, prompts=None, **kw) -> list[float]:
    """Partial credit for the worked solution: the fraction of its equations "a op b = c" that are right and
    grounded (each operand is a number from the prompt or an earlier result). Exact answers alone are too
    sparse for a small tier to learn from; each correct, grounded step is still verifiable."""
    prompts = prompts if prompts is not None else [""] * len(completions)
    out = []
    for c, p in zip(completions, prompts, strict=True):
        # A conversational prompt is a list of turns: the user's turns hold the numbers.
        text = p if isinstance(p, str) else " ".join(str(m.get("content", "")) for m in p)
        known = {int(x) for x in _INT.findall(text)}
        steps = _EQUATION.findall(completion_text(c))
        good = 0
        for a, op, b, res in steps:
            a, b, res = int(a), int(b), int(res)
            good += a in known and b in known and _OPS[op](a, b) == res
            known.add(res)
        out.append(good / len(steps) if steps else 0.0)
    return out


# The names a spec's `rl.rewards` may select; each key is its function's __name__, which TRL logs it under.
REWARDS = {f.__name__: f for f in (exact_answer, valid_steps, answer_format)}
