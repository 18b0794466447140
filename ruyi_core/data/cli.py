"""`ruyi data ...`: validate corpora against the data gate, curate them and pack them for training.

Gate failures are raised as DataGateError (a RuyiError): the top-level `ruyi` entry point prints its one line
and exits 2.
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

data_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       help="Validate corpora (the data gate), curate them and pack them into megatron indexed datasets.")
console = Console()


class Kind(str, Enum):
    pretrain = "pretrain"
    sft = "sft"
    rl = "rl"


def _data_spec(spec: Path | None):
    from ruyi_core.spec import DataSpec, load_spec

    return load_spec(spec).data if spec is not None else DataSpec()


def _observed(check: str, rows: list[dict]) -> str:
    """What the check measured, in the check's own terms."""
    obs = rows[0].get("observed_value")
    if check == "duplicates" and isinstance(obs, (int, float)):
        return f"rate {1 - obs:.3f}"
    if check == "min_records":
        return f"{obs} records"
    if check == "missing_columns":
        return "all present" if rows[0]["success"] else "missing"
    return str(sum(int(r.get("unexpected_count") or 0) for r in rows))


def _checks_table(result) -> Table:
    """One row per check (its expectations merged): pass/fail, what it observed, first examples."""
    merged: dict[str, list[dict]] = {}
    for r in result.summary["checks"]:
        merged.setdefault(r["check"], []).append(r)
    t = Table(title=f"data gate: {result.kind} ({result.n_records} records, "
                    f"{'[green]passed[/]' if result.passed else '[red]failed[/]'})")
    for c in ("check", "result", "observed", "examples"):
        t.add_column(c)
    for check, rows in merged.items():
        ok = all(r["success"] for r in rows)
        if check == "readable" and not ok:
            continue  # listed below, one row per unreadable-line class
        examples = [e for r in rows for e in r.get("examples") or []]
        t.add_row(check, "[green]ok[/]" if ok else "[red]FAIL[/]", _observed(check, rows), "; ".join(examples[:2]))
    for f in result.failures:
        if f["check"] not in merged:
            t.add_row(f["check"], "[red]FAIL[/]", f"{f['count']} {f['unit']}", "; ".join(f["examples"][:2]))
    return t


def validate_files(files: list[Path], kind: Kind, spec: Path | None, docs: Path | None, summary: Path | None):
    from ruyi_core.data.validate import gate_or_raise, validate_corpus

    result = validate_corpus(files, kind.value, _data_spec(spec), docs)
    console.print(_checks_table(result))
    if result.docs_index:
        console.print(f"data docs  [bold]{result.docs_index}[/]")
    if summary is not None:  # written before the gate decides, so a failed run leaves its evidence
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.summary, indent=2) + "\n")
        console.print(f"summary    [bold]{summary}[/]")
    return gate_or_raise(result)


@data_app.command("validate")
def validate(files: list[Path] = typer.Argument(..., help="JSONL / Parquet files (or directories of them)"),
             kind: Kind = typer.Option(..., help="corpus kind"),
             spec: Path = typer.Option(None, help="run spec YAML (its `data` section); default thresholds if omitted"),
             docs: Path = typer.Option(None, help="build great-expectations Data Docs HTML here"),
             summary: Path = typer.Option(None, help="write the JSON gate summary here")):
    """Run the data gate; exits non-zero, naming every failed check, when the corpus does not pass."""
    validate_files(files, kind, spec, docs, summary)
    console.print("[green]data gate passed[/]")


@data_app.command("prepare")
def prepare(files: list[Path] = typer.Argument(..., help="JSONL / Parquet files (or directories of them)"),
            kind: Kind = typer.Option(..., help="corpus kind"),
            tokenizer: Path = typer.Option(..., help="tokenizer directory (tokenizer.json + config)"),
            out: Path = typer.Option(..., help="output directory for the indexed dataset"),
            spec: Path = typer.Option(None, help="run spec YAML; default thresholds if omitted"),
            shard_tokens: int = typer.Option(None, help="tokens per shard (default: the spec's data.shard_tokens)"),
            docs: Path = typer.Option(None, help="build Data Docs HTML here"),
            summary: Path = typer.Option(None, help="write the JSON gate summary here")):
    """Validate, then tokenize and pack into megatron-core indexed datasets."""
    from transformers import AutoTokenizer

    from ruyi_core.data.pack import prepare_corpus
    from ruyi_core.errors import RuyiError

    if not (tokenizer / "tokenizer.json").is_file() and not (tokenizer / "tokenizer_config.json").is_file():
        raise RuyiError(f"{tokenizer} holds no tokenizer (tokenizer.json): pass a tokenizer or model directory")
    result = validate_files(files, kind, spec, docs, summary)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    n = shard_tokens if shard_tokens is not None else _data_spec(spec).shard_tokens
    res = prepare_corpus(result.iter_records(), kind.value, tok, out, n, total=result.n_records)
    t = Table(title=f"packed {kind.value}")
    for c in ("docs", "tokens", "shards", "dtype", "fingerprint"):
        t.add_column(c)
    t.add_row(str(res.n_docs), str(res.n_tokens), str(len(res.shards)), res.dtype, res.fingerprint[:16])
    console.print(t)
    console.print(f"dataset    [bold]{res.manifest}[/]")
