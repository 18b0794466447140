"""Streaming corpus reader: JSONL (optionally gzipped) line by line, Parquet batch by batch.

Unreadable lines never stop a read: each is counted under its defect class (bad_utf8, bad_json, wrong_types,
bad_file) with the first few examples as (file, line, detail), and the data gate decides what to make of them.
For Parquet, "line" is the 1-based row number.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ruyi_core.data.schema import FIELDS, canonical, check_kind, normalize
from ruyi_core.errors import RuyiError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_EXAMPLES = 5
_PARQUET_BATCH = 2048


@dataclass
class BadRecords:
    """Counts per defect class plus the first MAX_EXAMPLES (file, line, detail) of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)

    def add(self, defect: str, file: str, line: int, detail: str) -> None:
        self.counts[defect] = self.counts.get(defect, 0) + 1
        ex = self.examples.setdefault(defect, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append((file, line, detail[:120]))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, dict]:
        return {k: {"count": n, "examples": list(self.examples[k])} for k, n in sorted(self.counts.items())}


@dataclass
class ReadResult:
    kind: str
    files: list[str]
    records: list[dict]  # normalized: exactly the kind's fields, absent/null ones as None
    where: list[tuple[str, int]]  # (file, line) of each record, parallel to `records`
    bad_records: BadRecords
    seen_fields: set[str]  # fields present (as a key or column) somewhere in the input
    fingerprint: str  # sha256 over the kind and the canonical JSON of every valid record, in order

    @property
    def bad(self) -> dict[str, dict]:
        return self.bad_records.as_dict()

    @property
    def n_read(self) -> int:
        """Records plus unreadable lines: the denominator of the bad-record rate."""
        return len(self.records) + self.bad_records.total


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its corpus files (sorted, so the order is reproducible)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and _format(f, strict=False))
            if not found:
                raise RuyiError(f"corpus directory {p} holds no .jsonl or .parquet files")
            out.extend(found)
        elif not p.is_file():
            raise RuyiError(f"corpus file {p} not found: pass existing local JSONL/Parquet files")
        else:
            _format(p)
            out.append(p)
    if not out:
        raise RuyiError("no corpus files given")
    return out


def _format(p: Path, strict: bool = True) -> str | None:
    name = p.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if strict:
        raise RuyiError(f"{p}: unknown corpus format; use {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
    return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _jsonl_objects(path: Path, bad: BadRecords) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line that decodes and parses."""
    file = str(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):  # binary iteration: one line in memory at a time
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad.add("bad_utf8", file, lineno, f"invalid byte 0x{raw[e.start]:02x} at column {e.start + 1}")
                    continue
                if not text.strip():
                    continue  # blank lines separate nothing in JSONL; skipping them is harmless
                try:
                    obj = json.loads(text, parse_constant=_reject_constant)
                except json.JSONDecodeError as e:
                    bad.add("bad_json", file, lineno, f"{e.msg} at column {e.colno}")
                    continue
                except (ValueError, RecursionError) as e:
                    bad.add("bad_json", file, lineno, str(e) or type(e).__name__)
                    continue
                yield lineno, obj
    except (OSError, EOFError) as e:  # e.g. a truncated .gz: the rest of the file is unreadable
        bad.add("bad_file", file, 0, f"{type(e).__name__}: {e}")


def _parquet_objects(path: Path, kind: str, bad: BadRecords, seen: set[str]) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    file, row = str(path), 0
    try:
        pf = pq.ParquetFile(path)
        cols = [c for c in FIELDS[kind] if c in pf.schema_arrow.names]
        seen.update(cols)
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=cols):
            for obj in batch.to_pylist():
                row += 1
                yield row, obj
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        bad.add("bad_file", file, row, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def iter_records(paths: Iterable[str | Path], kind: str, bad: BadRecords,
                 seen_fields: set[str] | None = None) -> Iterator[tuple[dict, str, int]]:
    """Stream (normalized record, file, line) over all files; defects go to `bad`, fields seen to
    `seen_fields`."""
    check_kind(kind)
    seen = seen_fields if seen_fields is not None else set()
    wanted = set(FIELDS[kind])
    for path in expand_paths(paths):
        fmt = _format(path)
        objs = _jsonl_objects(path, bad) if fmt == "jsonl" else _parquet_objects(path, kind, bad, seen)
        for line, obj in objs:
            rec, err = normalize(obj, kind)
            if err:
                bad.add("wrong_types", str(path), line, err)
                continue
            if fmt == "jsonl":
                seen.update(wanted.intersection(obj))
            yield rec, str(path), line


def read_corpus(paths: Iterable[str | Path], kind: str) -> ReadResult:
    """Read every file (streaming), keeping the valid records for the gate and the packer."""
    paths = expand_paths(paths)
    bad, seen = BadRecords(), set()
    records, where = [], []
    h = hashlib.sha256(f"ruyi-corpus:{kind}\n".encode())
    for rec, file, line in iter_records(paths, kind, bad, seen):
        records.append(rec)
        where.append((file, line))
        h.update(canonical(rec).encode())
        h.update(b"\n")
    return ReadResult(kind, [str(p) for p in paths], records, where, bad, seen, h.hexdigest())
