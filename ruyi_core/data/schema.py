"""Corpus kinds, their record shapes and the names of the defects the data gate reports.

A record is checked here only for *shape* (an object whose fields have the right JSON types); content rules
(empty text, role order, duplicates, ...) are great-expectations checks in `validate.py`. A missing or null
field is not a shape error: it reaches the gate as a null, so that "no nulls" and "answer present" are
expectations with counts and examples like every other content rule.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ruyi_core.errors import RuyiError

KINDS = ("pretrain", "sft", "rl")
FIELDS: dict[str, tuple[str, ...]] = {
    "pretrain": ("text", "source", "lang"),
    "sft": ("messages",),
    "rl": ("prompt", "answer"),
}
# The field whose length the spec's min_chars/max_chars bound (for sft: every message's content).
LENGTH_FIELD = {"pretrain": "text", "sft": "content", "rl": "prompt"}
CHAT_ROLES = ("system", "user", "assistant")

# Defect classes, as they appear in gate messages. The first three come from the reader (the line could not
# become a record); the rest are expectations over the records that were read.
DEFECTS: dict[str, str] = {
    "bad_utf8": "line is not valid UTF-8",
    "bad_json": "line is not valid JSON",
    "wrong_types": "not a JSON object, or a field has the wrong type",
    "bad_file": "file could not be read at all",
    "missing_columns": "required columns are absent",
    "missing_field": "required field is absent or null",
    "min_records": "fewer records than thresholds.min_records",
    "empty_text": "text/content/prompt is empty or whitespace only",
    "too_short": "text shorter than thresholds.min_chars",
    "too_long": "text longer than thresholds.max_chars",
    "duplicates": "duplicate rate above thresholds.max_duplicate_rate",
    "unknown_source": "source not in allowed_sources",
    "unknown_lang": "lang not in allowed_langs",
    "bad_chat_roles": "roles are not [system] user/assistant alternating, ending with assistant",
    "missing_answer": "rl answer absent, null or empty",
}
READER_DEFECTS = ("bad_utf8", "bad_json", "wrong_types", "bad_file")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RuyiError(f"unknown corpus kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def normalize(obj: Any, kind: str) -> tuple[dict | None, str | None]:
    """(record restricted to the kind's fields, None) or (None, why it has the wrong shape).

    Absent and null fields become None (the gate counts them); extra fields are dropped, so they change
    neither the packed data nor the fingerprint.
    """
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {_type_name(obj)}"
    rec: dict[str, Any] = {}
    for f in FIELDS[kind]:
        v = obj.get(f)
        if v is None:
            rec[f] = None
        elif kind == "sft":
            msgs, err = _messages(v)
            if err:
                return None, err
            rec[f] = msgs
        elif not isinstance(v, str):
            return None, f"field {f!r} must be a string, got {_type_name(v)}"
        else:
            rec[f] = v
    return rec, None


def _messages(v: Any) -> tuple[list | None, str | None]:
    if not isinstance(v, list):
        return None, f"field 'messages' must be an array, got {_type_name(v)}"
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            return None, f"messages[{i}] must be an object, got {_type_name(m)}"
        for f in ("role", "content"):
            if not isinstance(m.get(f), str):
                return None, f"messages[{i}].{f} must be a string, got {_type_name(m.get(f))}"
        out.append({"role": m["role"], "content": m["content"]})
    return out, None


def canonical(rec: dict) -> str:
    """The record's canonical JSON: what fingerprints hash."""
    return json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _squash(s: str) -> str:
    return " ".join(s.split())


def dedup_key(rec: dict, kind: str) -> str | None:
    """Two records are duplicates when their keys match: same text (pretrain), same conversation (sft) or
    same prompt (rl; one prompt with two answers is a duplicate too). Whitespace runs do not count."""
    if kind == "pretrain":
        v = rec["text"]
        key = None if v is None else _squash(v)
    elif kind == "sft":
        v = rec["messages"]
        key = None if v is None else canonical([[m["role"], _squash(m["content"])] for m in v])
    else:
        v = rec["prompt"]
        key = None if v is None else _squash(v)
    return None if key is None else hashlib.sha1(key.encode()).hexdigest()


def roles_string(messages: list[dict]) -> str:
    """Role sequence as words (unknown roles as '?'), matched by the gate's role-order regex."""
    return " ".join(m["role"] if m["role"] in CHAT_ROLES else "?" for m in messages)


ROLE_ORDER_REGEX = r"^(?:system )?(?:user assistant )*user assistant$"
