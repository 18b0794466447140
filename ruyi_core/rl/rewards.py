"""Verifiable rewards for problems with an integer answer, in TRL's reward-function shape:
`f(completions, **dataset_columns) -> list[float]`, one value per completion. The answer's form is the spec's
`rl.answer_pattern`, a regular expression whose one group captures the answer (GSM8K's "#### 42" by default; the
demo's SFT answers end with "The answer is 42.").

A completion is either a string (standard datasets) or a list of chat messages `[{"role", "content"}]`
(conversational datasets, as GRPOTrainer passes them); both are accepted everywhere.
"""
from __future__ import annotations

import re
from collections.abc import Callable

DEFAULT_ANSWER_PATTERN = r"####\s*([+-]?\d+)"
_INT = re.compile(r"[+-]?\d+")


def _compiled(pattern: str) -> tuple[re.Pattern, re.Pattern]:
    """(anywhere, case-insensitive; strict: the completion ends with it, a final . or ! allowed)."""
    return re.compile(pattern, re.IGNORECASE), re.compile(f"(?:{pattern})[.!]?\\s*$")


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


def extract_answer(text, pattern: str | None = None) -> str | None:
    """The number the last match of `pattern` captures (a model may restate itself; the last statement counts);
    without a match (or a pattern), the last integer in the text; None when there is no integer at all."""
    text = completion_text(text)
    hits = _compiled(pattern)[0].findall(text) if pattern else []
    if hits:
        return _norm_int(hits[-1])
    ints = _INT.findall(text)
    return _norm_int(ints[-1]) if ints else None


def _gold(answer) -> str | None:
    try:
        return _norm_int(str(answer).strip())
    except ValueError:
        return str(answer).strip()


def exact_answer(completions, answer, pattern: str | None = None, **kw) -> list[float]:
    """1.0 when the extracted answer equals the gold `answer` column, else 0.0."""
    if isinstance(answer, (str, int)):  # one gold value for every completion
        answer = [answer] * len(completions)
    return [1.0 if (got := extract_answer(c, pattern)) is not None and got == _gold(a) else 0.0
            for c, a in zip(completions, answer, strict=True)]


def answer_format(completions, pattern: str = DEFAULT_ANSWER_PATTERN, **kw) -> list[float]:
    """1.0 when the completion ends with the answer `pattern` (the SFT format); 0.5 when it contains it elsewhere
    or in another case (right idea, sloppy ending: partial credit keeps a gradient toward the format); 0.0
    otherwise. Case-sensitive for the full score, as SFT wrote it."""
    anywhere, strict = _compiled(pattern)
    out = []
    for c in completions:
        text = completion_text(c)
        out.append(1.0 if strict.search(text.strip()) else 0.5 if anywhere.search(text) else 0.0)
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


REWARD_NAMES = ("exact_answer", "valid_steps", "answer_format")  # what a spec's `rl.rewards` may select


def rewards_for(pattern: str) -> dict[str, Callable[..., list[float]]]:
    """The reward functions for answers of the form `pattern`, by name; each function's __name__ is its name,
    which TRL logs it under."""
    base = {f.__name__: f for f in (exact_answer, valid_steps, answer_format)}

    def bind(name: str):
        def reward(completions, **kw):
            return base[name](completions, **{**kw, "pattern": pattern})

        reward.__name__ = name
        return reward

    return {name: bind(name) for name in REWARD_NAMES}
