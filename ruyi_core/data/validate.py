"""The data gate: great-expectations suites per corpus kind, run over the records the reader could read, plus
one suite over every line read (the unreadable-line rate). Failures come back as one line per gate.

Each expectation carries `meta.check`, the defect class it guards (see schema.DEFECTS); results are grouped
by it, so a class checked on several columns (missing_field) is reported once with its total count.
"""
from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruyi_core.data.reader import BadRecords, expand_paths, iter_records
from ruyi_core.data.schema import DEFECTS, FIELDS, ROLE_ORDER_REGEX, canonical, check_kind, dedup_key, roles_string
from ruyi_core.errors import RuyiError
from ruyi_core.spec import DataSpec, KindThresholds

DEDUP_FIELD = {"pretrain": "text", "sft": "messages", "rl": "prompt"}
DOCS_SITE = "ruyi_data_docs"  # not `local_site`: that name is reserved for GX's default site
N_EXAMPLES = 3


class DataGateError(RuyiError):
    """The corpus failed the data gate; the message lists each failed check with counts and examples."""


@dataclass
class GateResult:
    kind: str
    passed: bool
    summary: dict  # JSON-able: per expectation name, success, observed counts, a few examples
    failures: list[dict]  # {check, count, unit, examples, detail}
    docs_index: Path | None
    n_records: int  # valid records (what would be packed)
    fingerprint: str  # sha256 over the normalized valid records
    files: list[str] = field(default_factory=list)
    context: Any = field(default=None, repr=False)  # its great-expectations context: more suites join its Data Docs

    def iter_records(self) -> Iterator[dict]:
        """The valid records again, streamed from the files (the gate keeps none of them in memory)."""
        return (rec for rec, _, _ in iter_records(self.files, self.kind, BadRecords()))


def _thresholds(spec: DataSpec, kind: str) -> KindThresholds:
    return spec.thresholds.get(kind) or KindThresholds()


def _chars(s: str | None) -> float:
    """Length for the bound checks; NaN (skipped by GX) for null or blank text, which other checks own."""
    return float(len(s)) if s is not None and s.strip() else math.nan


PRESENT = "<text>"  # what the frame holds for a text that is there and not blank (see _presence)


def _presence(s: str | None) -> str | None:
    """A text field as the gate's checks need it: null, blank (kept, truncated, for the examples) or present.
    The frame never holds whole texts, so a corpus larger than memory validates in bounded memory."""
    if s is None:
        return None
    return PRESENT if s.strip() else s[:40]


@dataclass
class Scan:
    """One streaming pass over a corpus: per valid record only what the expectations look at (a few small
    columns: with great-expectations' own work, under 1 KiB a record at peak), where it came from, the unreadable
    lines and the fingerprint."""

    kind: str
    files: list[str]
    columns: dict[str, list]
    file_idx: array
    lines: array
    bad: BadRecords
    seen: set[str]
    fingerprint: str

    @property
    def n_records(self) -> int:
        return len(self.lines)

    @property
    def n_read(self) -> int:
        return self.n_records + self.bad.total

    def where(self, i: int) -> tuple[str, int]:
        return self.files[self.file_idx[i]], self.lines[i]


def _row(rec: dict, kind: str, intern: dict) -> dict:
    """The frame's columns for one record; short repeated strings (source, lang, roles) shared, not copied."""
    share = lambda v: v if v is None else intern.setdefault(v[:256], v[:256])  # noqa: E731
    if kind == "sft":
        m = rec["messages"]
        lens = [] if m is None else [n for n in (_chars(x["content"]) for x in m) if not math.isnan(n)]
        return {"messages": None if m is None else PRESENT, "roles": None if m is None else share(roles_string(m)),
                "blank_contents": math.nan if m is None else sum(not x["content"].strip() for x in m),
                "shortest": min(lens, default=math.nan), "longest": max(lens, default=math.nan)}
    if kind == "pretrain":
        return {"text": _presence(rec["text"]), "chars": _chars(rec["text"]), "source": share(rec["source"]),
                "lang": share(rec["lang"])}
    return {"prompt": _presence(rec["prompt"]), "chars": _chars(rec["prompt"]), "answer": _presence(rec["answer"])}


def scan_corpus(paths: Iterable[str | Path], kind: str) -> Scan:
    paths = [str(p) for p in expand_paths(paths)]
    index = {p: i for i, p in enumerate(paths)}
    bad, seen, intern, columns = BadRecords(), set(), {}, {}
    file_idx, lines = array("I"), array("Q")
    h = hashlib.sha256(f"ruyi-corpus:{kind}\n".encode())
    for rec, file, line in iter_records(paths, kind, bad, seen):
        for k, v in _row(rec, kind, intern).items():
            columns.setdefault(k, []).append(v)
        key = dedup_key(rec, kind)
        columns.setdefault("dup_key", []).append(None if key is None else int(key[:15], 16))
        file_idx.append(index[file])
        lines.append(line)
        h.update(canonical(rec).encode())
        h.update(b"\n")
    return Scan(kind, paths, columns, file_idx, lines, bad, seen, h.hexdigest())


def build_frame(scan: Scan):
    """One row per valid record: the kind's fields that occur in the input (as _presence has them) plus
    derived columns."""
    import pandas as pd

    kind = scan.kind
    seen = scan.seen if scan.n_records else set(FIELDS[kind])  # no records: min_records says it all
    derived = {"messages": ["roles", "blank_contents", "shortest", "longest"], "text": ["chars"],
               "prompt": ["chars"]}
    cols = {}
    for f in FIELDS[kind]:
        if f in seen:  # a field absent from every record is reported once by missing_columns
            cols |= {c: scan.columns.get(c, []) for c in [f, *derived.get(f, [])]}
    if DEDUP_FIELD[kind] in seen:
        cols["dup_key"] = pd.array(scan.columns.get("dup_key", []), dtype="Int64")
    return pd.DataFrame(cols, index=pd.RangeIndex(scan.n_records))


def _expectations(kind: str, spec: DataSpec, columns: Iterable[str], n_rows: int) -> list:
    import great_expectations as gx

    E, th = gx.expectations, _thresholds(spec, kind)
    m = lambda check: {"check": check}  # noqa: E731
    length_cols = ("shortest", "longest") if kind == "sft" else ("chars", "chars")
    exps = [
        E.ExpectTableColumnsToMatchSet(column_set=list(FIELDS[kind]), exact_match=False,
                                       meta=m("missing_columns")),
        E.ExpectTableRowCountToBeBetween(min_value=th.min_records, meta=m("min_records")),
        E.ExpectColumnProportionOfUniqueValuesToBeBetween(column="dup_key", min_value=1 - th.max_duplicate_rate,
                                                          meta=m("duplicates")),
        E.ExpectColumnValuesToBeBetween(column=length_cols[0], min_value=th.min_chars, meta=m("too_short")),
        E.ExpectColumnValuesToBeBetween(column=length_cols[1], max_value=th.max_chars, meta=m("too_long")),
    ]
    for f in FIELDS[kind]:
        check = "missing_answer" if (kind, f) == ("rl", "answer") else "missing_field"
        exps.append(E.ExpectColumnValuesToNotBeNull(column=f, meta=m(check)))
    if kind == "pretrain":
        exps.append(E.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S", meta=m("empty_text")))
        for col, allowed in (("source", spec.allowed_sources), ("lang", spec.allowed_langs)):
            if allowed is not None:
                exps.append(E.ExpectColumnValuesToBeInSet(column=col, value_set=list(allowed),
                                                          meta=m(f"unknown_{col}")))
    elif kind == "sft":
        exps += [
            E.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLE_ORDER_REGEX, meta=m("bad_chat_roles")),
            E.ExpectColumnValuesToBeBetween(column="blank_contents", min_value=0, max_value=0, meta=m("empty_text")),
        ]
    else:
        exps += [
            E.ExpectColumnValuesToMatchRegex(column="prompt", regex=r"\S", meta=m("empty_text")),
            E.ExpectColumnValuesToMatchRegex(column="answer", regex=r"\S", meta=m("missing_answer")),
        ]
    # An expectation on an absent column would raise inside GX; missing_columns already reports it.
    cols = set(columns) - ({"dup_key"} if n_rows == 0 else set())  # GX fails uniqueness on an empty column
    return [e for e in exps if getattr(e, "column", None) in cols or getattr(e, "column", None) is None]


def gx_context(docs_dir: Path | None):
    """An in-memory great-expectations context, with a Data Docs site in `docs_dir` when given."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")  # in memory: nothing persists, nothing is shared between calls
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        ctx.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        })
    return ctx


def run_suite(ctx, name: str, df, expectations: list):
    import great_expectations as gx

    source = ctx.data_sources.add_or_update_pandas("ruyi")
    batch_def = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
    return vd.run(batch_parameters={"dataframe": df},
                  result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5})


def _loc(where: tuple) -> str:
    return f"{Path(where[0]).name}:{where[1]}" if where[1] else Path(where[0]).name  # line 0: the whole file


def _fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 40 else s[:36] + '..."'


def _record_examples(r: dict, column: str | None, scan: Scan) -> list[tuple[str, int, str]]:
    idx, vals = r.get("partial_unexpected_index_list") or [], r.get("partial_unexpected_list") or []
    return [(*scan.where(int(i)), f"{column}={_fmt_value(v)}") for i, v in zip(idx, vals)]


def _duplicate_examples(df, scan: Scan) -> tuple[int, list[tuple[str, int, str]]]:
    keys = df["dup_key"]
    dup = keys.duplicated(keep="first") & keys.notna()
    shown = [int(i) for i in dup[dup].index[:5]]
    firsts = keys[keys.isin(keys.iloc[shown]) & ~keys.duplicated(keep="first")]
    first = {k: int(i) for i, k in firsts.items()}  # the first occurrence of each shown key
    ex = [(*scan.where(i), f"= {_loc(scan.where(first[keys.iat[i]]))}") for i in shown]
    return int(dup.sum()), ex


def _ex_str(e: tuple[str, int, str]) -> str:
    return f"{_loc(e)} {e[2]}"


def _summarize(kind: str, df, scan: Scan, th: KindThresholds, results: list) -> tuple[list, list]:
    """(summary rows, failures) from the GX validation results."""
    rows, by_check = [], {}
    for suite_result in results:
        for x in suite_result.results:
            cfg, res = x.expectation_config, dict(x.result or {})
            check = (cfg.meta or {}).get("check", cfg.type)
            row = {"check": check, "expectation": cfg.type, "column": cfg.kwargs.get("column"),
                   "success": bool(x.success)}
            for k in ("element_count", "unexpected_count", "unexpected_percent", "missing_count", "observed_value"):
                if k in res:
                    row[k] = res[k]
            if x.exception_info and x.exception_info.get("raised_exception"):
                row["error"] = x.exception_info.get("exception_message")
            ex = []
            if check == "readable":
                ex = [(*e[:2], f"{d}: {e[2]}") for d, v in scan.bad.as_dict().items() for e in v["examples"]]
            elif check not in ("duplicates", "min_records", "missing_columns"):
                ex = _record_examples(res, row["column"], scan)
            row["examples"] = [_ex_str(e) for e in ex]
            rows.append(row)
            if not x.success:
                by_check.setdefault(check, []).append((row, res, ex))

    failures = []
    for check, items in by_check.items():
        if check == "readable":
            # The total unreadable rate is over the limit: every class that occurred is a failure.
            for d, v in scan.bad.as_dict().items():
                failures.append({"check": d, "count": v["count"], "unit": "files" if d == "bad_file" else "lines",
                                 "examples": [_ex_str(e) for e in v["examples"]], "detail": None})
            continue
        f = {"check": check, "count": 0, "unit": "records", "examples": [], "detail": None}
        ex = []
        for row, res, row_ex in items:
            f["count"] += int(res.get("unexpected_count") or 0)
            ex += row_ex
            if row.get("error"):
                f["detail"] = f"error: {row['error']}"
        if check == "duplicates":
            f["count"], ex = _duplicate_examples(df, scan)
            f["detail"] = f"rate {1 - float(items[0][1].get('observed_value') or 0):.3f} > {th.max_duplicate_rate}"
        elif check == "min_records":
            f["count"] = len(df)
            f["detail"] = f"{len(df)} records < min_records {th.min_records}"
        elif check == "missing_columns":
            missing = [c for c in FIELDS[kind] if c not in df.columns]
            f["count"], f["unit"], f["examples"] = len(missing), "columns", missing
            f["detail"] = f"no record has {', '.join(missing)}"
        if check != "missing_columns":  # several expectations may feed one check: show examples in file order
            f["examples"] = [_ex_str(e) for e in sorted(ex, key=lambda e: (e[0], e[1]))]
        failures.append(f)
    order = list(DEFECTS)
    failures.sort(key=lambda f: order.index(f["check"]) if f["check"] in order else len(order))
    return rows, failures


def validate_corpus(paths: Iterable[str | Path], kind: str, spec: DataSpec | None = None,
                    docs_dir: str | Path | None = None) -> GateResult:
    """Scan the corpus (one streaming pass, bounded memory), run the kind's suite and the readable-lines suite,
    and build Data Docs into `docs_dir` when given."""
    import great_expectations as gx
    import pandas as pd

    check_kind(kind)
    spec = spec or DataSpec()
    th = _thresholds(spec, kind)
    scan = scan_corpus(paths, kind)
    df = build_frame(scan)
    docs = Path(docs_dir) if docs_dir is not None else None
    ctx = gx_context(docs)
    results = [run_suite(ctx, kind, df, _expectations(kind, spec, df.columns, len(df)))]

    # Every line read, valid or not: GX's `mostly` is exactly "unreadable rate <= max_bad_record_rate".
    defects = ["ok"] * scan.n_records + [d for d, n in scan.bad.counts.items() for _ in range(n)]
    readable = gx.expectations.ExpectColumnValuesToBeInSet(
        column="defect", value_set=["ok"], mostly=1 - th.max_bad_record_rate, meta={"check": "readable"})
    results.append(run_suite(ctx, f"{kind}_readable", pd.DataFrame({"defect": defects}), [readable]))
    rows, failures = _summarize(kind, df, scan, th, results)

    docs_index = build_docs(ctx, docs) if docs is not None else None
    passed = not failures
    summary = {
        "kind": kind, "passed": passed, "files": scan.files, "n_read": scan.n_read,
        "n_records": scan.n_records, "fingerprint": scan.fingerprint,
        "thresholds": th.model_dump(), "bad_records": scan.bad.as_dict(), "checks": rows, "failures": failures,
        "docs_index": str(docs_index) if docs_index else None,
    }
    return GateResult(kind, passed, _jsonable(summary), failures, docs_index, scan.n_records, scan.fingerprint,
                      scan.files, ctx)


def build_docs(ctx, docs: Path) -> Path | None:
    """(Re)builds the context's Data Docs site in `docs` from every validation it ran; returns its index page."""
    ctx.build_data_docs(site_names=[DOCS_SITE])
    index = docs / "index.html"
    if not index.is_file():  # GX decides the layout; ask it where the index went
        from urllib.parse import unquote, urlparse

        urls = ctx.get_docs_sites_urls(site_name=DOCS_SITE)
        index = Path(unquote(urlparse(urls[0]["site_url"]).path)) if urls else None
    return index


def _jsonable(v):
    """Strict JSON: numpy scalars to Python, NaN to null (GX reports NaN observations for empty columns)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def format_failures(result: GateResult) -> str:
    """One line: `data gate failed for KIND (F files, N records): check: count unit (examples); ...`."""
    n_files, n_read = len(result.files), result.summary.get("n_read", result.n_records)
    parts = []
    for f in result.failures:
        ex = ", ".join(f["examples"][:N_EXAMPLES]) + (", ..." if f["count"] > N_EXAMPLES else "")
        if f["check"] == "duplicates":
            s = f"duplicates: {f['detail']} ({f['count']} records: {ex})"
        elif f["check"] == "min_records":
            s = f"min_records: {f['detail']}"
        else:
            unit = f["unit"][:-1] if f["count"] == 1 else f["unit"]
            s = f"{f['check']}: {f['count']} {unit}" + (f" ({ex})" if ex else "")
            if f["detail"] and f["check"] != "missing_columns":
                s += f" [{f['detail']}]"
        parts.append(s)
    return (f"data gate failed for {result.kind} ({n_files} file{'s' * (n_files != 1)}, "
            f"{n_read} record{'s' * (n_read != 1)}): "
            + "; ".join(parts))


def gate_or_raise(result: GateResult) -> GateResult:
    if not result.passed:
        raise DataGateError(format_failures(result))
    return result


__all__ = ["DataGateError", "GateResult", "build_frame", "format_failures", "gate_or_raise", "scan_corpus",
           "validate_corpus"]
