"""Data stages: the data gate (validate_data), the run plan behind it, and tokenize + pack (prepare_data)."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, run_stage, slice_hash, workdir
from ruyi_core.store import ArtifactStore

KINDS = ("pretrain", "sft", "rl")


class RawDataset(Artifact):
    kind: str
    n_records: int
    fingerprint: str


class PackedDataset(Artifact):
    kind: str
    n_docs: int
    n_tokens: int
    fingerprint: str | None = None


class RunPlan(BaseModel):
    """What the data gate decides: the run's id (what determines its report), the model version (what determines
    the weights) and the validated datasets."""

    run_id: str
    version: str
    datasets: list[RawDataset]

    def dataset(self, kind: str) -> RawDataset:
        return next(d for d in self.datasets if d.kind == kind)


# The raw corpus is keyed by its content (the fingerprint parameter), not by where the spec found it.
VALIDATE = Stage("validate_data", RawDataset, ("data.allowed_sources", "data.allowed_langs", "data.thresholds"),
                 root="datasets/raw/{kind}")
PREPARE = Stage("prepare_data", PackedDataset, ("data.shard_tokens",), root="datasets/packed/{kind}")


def resolve_corpus(spec: RunSpec, kind: str, store: ArtifactStore, work: Path) -> list[Path]:
    """Local files for a corpus kind (ruyi_core.data.sources)."""
    from ruyi_core.data.sources import demo_sizes, resolve

    return resolve(getattr(spec.data, kind), kind, work, label=f"data.{kind}", store=store, seed=spec.data.seed,
                   demo_sizes=demo_sizes(spec))


def validate_data(spec: RunSpec, store: ArtifactStore, kind: str, docs_dir: Path | None = None) -> RawDataset:
    """The data gate. Only a corpus that passes reaches datasets/, as raw files plus the gate's summary. The gate
    always looks at the data; storing it is skipped when the same content already passed."""
    from ruyi_core.data.validate import gate_or_raise, validate_corpus

    with workdir("validate") as work:
        paths = resolve_corpus(spec, kind, store, work)
        gate = validate_corpus(paths, kind, spec.data, docs_dir)
        gate_or_raise(gate)

        def build(run: StageRun) -> dict:
            stored = {str(p): f"{i:03d}-{p.name}" for i, p in enumerate(paths)}
            for p, name in stored.items():
                shutil.copy(p, run.out / name)
            summary = stored_summary(gate.summary, stored)
            (run.out / "gate_summary.json").write_text(json.dumps(summary, indent=2, default=str))
            return {"kind": kind, "n_records": gate.n_records, "fingerprint": gate.fingerprint}

        return run_stage(VALIDATE, spec, store, build, params={"kind": kind, "fingerprint": gate.fingerprint})


def stored_summary(summary: dict, stored: dict[str, str]) -> dict:
    """The gate's summary as the artifact keeps it: files named as stored (not where this run found them) and no
    local Data Docs path, so the artifact is a function of the data alone (concurrent or repeated runs store the
    same bytes)."""
    def name(path: str) -> str:
        return stored.get(path, Path(path).name)

    bad = {k: {**v, "examples": [[name(f), *rest] for f, *rest in v["examples"]]}
           for k, v in summary["bad_records"].items()}
    return {**{k: v for k, v in summary.items() if k != "docs_index"}, "files": [name(f) for f in summary["files"]],
            "bad_records": bad}


def plan_run(spec: RunSpec, datasets: list[RawDataset]) -> RunPlan:
    """The run id and model version, from what determines them: the validated data's fingerprints and the spec
    fields the stages declare (the weights' stages for the version; every stage for the run)."""
    from ruyi_core.stages.table import REPORT_FIELDS, WEIGHT_FIELDS, WEIGHT_VERSIONS

    data = [*sorted(d.fingerprint for d in datasets), *WEIGHT_VERSIONS]
    weights = slice_hash(spec, WEIGHT_FIELDS, *data)[:12]
    run = slice_hash(spec, sorted({*WEIGHT_FIELDS, *REPORT_FIELDS}), *data)[:12]
    return RunPlan(run_id=f"{spec.family.name}-{run}", version=spec.package.version or weights,
                   datasets=sorted(datasets, key=lambda d: d.kind))


def corpus_records(run: StageRun, name: str, kind: str) -> Iterator[dict]:
    """A validated corpus's records, streamed from its files."""
    from ruyi_core.data.reader import BadRecords, iter_records

    return (rec for rec, _, _ in iter_records([run.fetch(name)], kind, BadRecords()))


def prepare_data(spec: RunSpec, store: ArtifactStore, kind: str, raw: str, family: str) -> PackedDataset:
    """Tokenize and pack a validated corpus with the family's tokenizer (megatron indexed datasets)."""

    def build(run: StageRun) -> dict:
        from transformers import AutoTokenizer

        from ruyi_core.data.pack import prepare_corpus

        records = corpus_records(run, "raw", kind)
        tok = AutoTokenizer.from_pretrained(run.fetch("family"))
        res = prepare_corpus(records, kind, tok, run.out, spec.data.shard_tokens)
        return {"kind": res.kind, "n_docs": res.n_docs, "n_tokens": res.n_tokens, "fingerprint": res.fingerprint}

    return run_stage(PREPARE, spec, store, build, inputs={"raw": raw, "family": family}, params={"kind": kind})
