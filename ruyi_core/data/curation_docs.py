"""What curation removed, in great-expectations Data Docs beside the gate's own checks: per step, how many records
it removed and examples of them, for a shard (curate_shard's Data Docs) and for a whole corpus with each of its
shards (merge_data's). A step is an expectation that always passes (curation removes, it does not fail a run):
its column holds, per record, what the step removed or nothing, so Data Docs show the share removed and samples.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

_MORE = "(removed; not kept as an example)"


def _frame(curation: dict, steps: list[str]):
    """One row per record read, one column per step: the record's example text where that step removed it."""
    import pandas as pd

    n_in, cols, row = curation["records_in"], {}, curation["records_kept"]
    for step in steps:
        v = curation["removed"].get(step, {"count": 0, "examples": []})
        values = [" | ".join(map(str, e)) for e in v["examples"]][: v["count"]]
        col = [None] * n_in
        col[row: row + v["count"]] = values + [_MORE] * (v["count"] - len(values))
        cols[f"removed_by_{step}"], row = col, row + v["count"]
    return pd.DataFrame(cols)


def _expectations(curation: dict, steps: list[str]) -> list:
    import great_expectations as gx

    n_in = max(curation["records_in"], 1)
    out = []
    for step in steps:
        n = curation["removed"].get(step, {"count": 0})["count"]
        out.append(gx.expectations.ExpectColumnValuesToBeNull(
            column=f"removed_by_{step}", mostly=0.0, meta={"check": f"curation.{step}"},
            description=f"curation: {step} removed {n:,} of {curation['records_in']:,} records ({n / n_in:.1%})"))
    return out


def validate_curation(ctx, name: str, curation: dict) -> None:
    """Runs the curation suite `name` in the great-expectations context `ctx` (one validation in its Data Docs)."""
    from ruyi_core.data.curate import FILTERS
    from ruyi_core.data.validate import run_suite

    steps = list(dict.fromkeys([*FILTERS, *curation["removed"]]))  # every filter, even one that removed nothing
    run_suite(ctx, name, _frame(curation, steps), _expectations(curation, steps))


def corpus_docs(summaries: dict[str, dict], docs_dir: Path) -> Path | None:
    """merge_data's Data Docs: each corpus's curation in total, then per shard (counts; a shard's own Data Docs
    have its examples). `summaries`: merge_data's gate_summary.json per corpus kind."""
    from ruyi_core.data.validate import build_docs, gx_context

    ctx = gx_context(docs_dir)
    for kind, s in summaries.items():
        validate_curation(ctx, f"{kind}_curation", s["curation"])
        for i, sh in enumerate(s["shards"]):
            removed = {k: {"count": n, "examples": []} for k, n in sh["removed"].items()}
            shard = {"records_in": sh["records"], "records_kept": sh["kept"], "removed": removed}
            validate_curation(ctx, f"{kind}_curation_shard{i:05d}_{_slug(Path(sh['source']).name)}", shard)
    return build_docs(ctx, docs_dir)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


def one_page(docs_dir: Path) -> str:
    """Every validation page of a Data Docs site in one HTML document (a KFP UI output is a single file)."""
    pages = sorted((docs_dir / "validations").rglob("*.html")) if (docs_dir / "validations").is_dir() else []
    if not pages:
        return "<html><body><p>no Data Docs</p></body></html>"
    first = pages[0].read_text(encoding="utf-8")
    head = first[: first.find("<body")] if "<body" in first else "<html><head></head>"
    bodies = []
    for p in pages:
        text = p.read_text(encoding="utf-8")
        m = re.search(r"<body[^>]*>(.*)</body>", text, re.S)
        bodies.append(f"<h2>{html.escape(p.parent.parent.parent.name)}</h2>" + (m.group(1) if m else ""))
    return head + "<body>" + "<hr>".join(bodies) + "</body></html>"
