"""The spec reference, docs/spec.md, generated from the pydantic models: every section and field with its type,
default, bounds and description. A field's description is its `Field(description=...)` when it has one, else the
comment beside it or right above it in the source; a section's is its class docstring.

    python -m ruyi_core.spec.reference docs/spec.md     # rewrite it (tests/test_docs.py fails when it is stale)
"""
from __future__ import annotations

import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, TypeAdapter

from ruyi_core.spec import STAGE_DEFAULTS, RunSpec, unnamed

COMMAND = "python -m ruyi_core.spec.reference docs/spec.md"
# A whole spec that names only what a spec must name; every other field keeps the default below.
MINIMAL = """\
family:
  name: my-family
  base: s3://ruyi/bases/Qwen3-0.6B-Base   # a preset, a local Qwen3 checkpoint folder, or an s3:// folder
  exit_points: [13, 27]                   # the last one is the base's layers - 1
data:
  pretrain: [corpus/pretrain/]            # JSONL/Parquet files or folders, s3:// prefixes, or demo
  sft: [corpus/sft.jsonl]
  heldout: [corpus/heldout.jsonl]
  rl: [s3://ruyi/corpora/gsm8k-train.jsonl]
  rl_heldout: [s3://ruyi/corpora/gsm8k-test.jsonl]
eval:
  benchmarks:
    gsm8k: {format: exact_match, path: s3://ruyi/benchmarks/gsm8k-test.jsonl}
"""


def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment lines right above its definition plus the comment at the end of its line."""
    src = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    out, above = {}, []
    for n, line in enumerate(src.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments.get(n, ""))
            continue
        m = re.match(r"    (\w+)\s*:", line)
        if m and m.group(1) in cls.model_fields:
            beside = [comments[n]] if n in comments and not stripped.startswith("#") else []
            out[m.group(1)] = " ".join(above + beside)
        above = []
    return out


def type_name(tp, anchors: dict[type, str]) -> str:
    """A field's type as a reader writes it in YAML terms; a section's type links to its table."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a, anchors) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a, anchors) for a in args)}]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{anchors[tp]})" if tp in anchors else tp.__name__
    return getattr(tp, "__name__", str(tp))


def bounds(info) -> str:
    """The field's constraints: >= 1, < 1, pattern ..., at least N items."""
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    out = []
    for m in info.metadata:
        for attr, word in words.items():
            if getattr(m, attr, None) is not None:
                out.append(f"{word} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            out.append(f"pattern `{m.pattern}`")
        if getattr(m, "min_length", None):
            out.append(f"at least {m.min_length}")
    return ", ".join(out)


def default_text(info, must_name: dict[str, str], path: str) -> str:
    if path in must_name:
        return must_name[path]
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{yaml_flow(TypeAdapter(info.annotation).dump_python(value, mode='json'))}`"


def yaml_flow(value) -> str:
    """A value as a spec writes it on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20).strip()
    return text.removesuffix("...").strip()


def _sections(cls: type[BaseModel], path: str, out: list):
    """(path, class) for every section, depth first (a dict of sections is `path.<name>`); a class met again is
    listed at its new path but not walked again."""
    again = any(c is cls for _, c in out)
    out.append((path, cls))
    if again:
        return out
    for name, info in cls.model_fields.items():
        tp, sub = info.annotation, f"{path}.{name}" if path else name
        args = [a for a in typing.get_args(tp) if isinstance(a, type)] if typing.get_origin(tp) is dict else []
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            _sections(tp, sub, out)
        elif args and issubclass(args[-1], BaseModel):
            _sections(args[-1], f"{sub}.<name>", out)
    return out


def prose(text: str) -> str:
    """Text for markdown: <placeholders> outside code spans are escaped (else they read as HTML tags)."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


def _must_name() -> dict[str, str]:
    always = set(unnamed({"rl": {"enabled": False}}))
    return {p: "**required**" if p in always else "**required** when `rl.enabled`" for p in unnamed({})}


def _stage_note(path: str) -> str:
    section, _, stage = path.partition(".")
    if section in STAGE_DEFAULTS and stage in STAGE_DEFAULTS[section]:
        diff = STAGE_DEFAULTS[section][stage]
        said = ", ".join(f"`{k}: {v}`" for k, v in diff.items())
        return f"This stage's own defaults, over the table's: {said}." if said else ""
    return ""


def _table(cls, path, anchors, must_name) -> list[str]:
    comments = field_comments(cls)
    rows = ["| field | type | default | bounds | description |", "| --- | --- | --- | --- | --- |"]
    for name, info in cls.model_fields.items():
        desc = prose(info.description or comments.get(name, "")).replace("|", "\\|")
        full = f"{path}.{name}" if path else name
        rows.append(f"| `{name}` | {type_name(info.annotation, anchors)} | {default_text(info, must_name, full)} "
                    f"| {bounds(info).replace('|', chr(92) + '|')} | {desc} |")
    return rows


def reference() -> str:
    """docs/spec.md as the models stand."""
    sections = _sections(RunSpec, "", [])
    anchors: dict[type, str] = {}
    for path, cls in sections[1:]:
        anchors.setdefault(cls, slug(path))
    must_name = _must_name()
    lines = [f"# Spec reference\n\n<!-- Generated from ruyi_core/spec/ by `{COMMAND}`: do not edit. -->\n",
             "One YAML file describes a whole run. Unknown fields and non-finite numbers are errors; a bad spec stops "
             "every command with one line naming the field. A spec must name the base, the exits, its corpora and "
             "at least one benchmark; every other field has the default below (`specs/tiny.yaml` narrows them for "
             "the demo). A stage section that names some fields keeps the stage's defaults for the rest.\n",
             "A minimal spec:\n", "```yaml", MINIMAL.rstrip(), "```\n",
             "Sections: " + ", ".join(f"[`{p}`](#{slug(p)})" for p, _ in sections[1:]) + ".\n"]
    seen: dict[type, str] = {}
    for path, cls in sections[1:]:
        lines.append(f"## `{path}`\n")
        doc = inspect.getdoc(cls)
        if doc and cls.__doc__ and "__doc__" in cls.__dict__:
            lines.append(prose(" ".join(doc.split())) + "\n")
        if cls in seen:
            lines.append(f"The fields of [`{seen[cls]}`](#{slug(seen[cls])}). {_stage_note(path)}".rstrip() + "\n")
            continue
        seen[cls] = path
        note = _stage_note(path)
        lines += _table(cls, path, anchors, must_name) + [""] + ([note, ""] if note else [])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        Path(argv[0]).write_text(reference(), encoding="utf-8")
    else:
        sys.stdout.write(reference())


if __name__ == "__main__":
    main()
