"""Data stages: the data gate (validate_data), the run plan behind it, and tokenize + pack (prepare_data)."""
from __future__ import annotations

import hashlib
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
VALIDATE = Stage("validate_data", RawDataset, ("data.allowed_sources", "data.allowed_langs", "data.thresholds",
                                               "data.curation"), version=2, root="datasets/raw/{kind}")
PREPARE = Stage("prepare_data", PackedDataset, ("data.shard_tokens",), root="datasets/packed/{kind}")


def resolve_corpus(spec: RunSpec, kind: str, store: ArtifactStore, work: Path) -> list[Path]:
    """Local files for a corpus kind (ruyi_core.data.sources)."""
    from ruyi_core.data.sources import demo_sizes, resolve

    return resolve(getattr(spec.data, kind), kind, work, label=f"data.{kind}", store=store, seed=spec.data.seed,
                   demo_sizes=demo_sizes(spec))


def validate_data(spec: RunSpec, store: ArtifactStore, kind: str, docs_dir: Path | None = None) -> RawDataset:
    """The data gate, then curation. Only a corpus that passes reaches datasets/, as its curated files plus the
    gate's summary with what curation removed. The gate always looks at the data; storing it is skipped when the
    same content already passed under the same curation and references."""
    from ruyi_core.data.validate import gate_or_raise, validate_corpus

    cur = spec.data.curation
    with workdir("validate") as work:
        paths = resolve_corpus(spec, kind, store, work)
        gate = validate_corpus(paths, kind, spec.data, docs_dir)
        gate_or_raise(gate)
        refs = reference_sets(spec, store, work / "references") if cur.enabled and cur.decontaminate else {}
        digest = hashlib.sha256(json.dumps(refs, sort_keys=True).encode()).hexdigest()

        def build(run: StageRun) -> dict:
            stored = {str(p): f"{i:03d}-{p.name}" for i, p in enumerate(paths)}
            summary = stored_summary(gate.summary, stored)
            files = stored
            if cur.enabled:
                curation = curated(spec, kind, paths, refs, work / "curate")
                files = {str(f): f"{i:03d}-{Path(p).stem}.jsonl" for i, (f, p) in
                         enumerate(zip(curation.files, stored))}
                summary["curation"] = curation.summary()
            h = hashlib.sha256(f"ruyi-curated:{kind}\n".encode())
            for p, name in files.items():
                shutil.copy(p, run.out / name)
                h.update(Path(p).read_bytes())
            (run.out / "gate_summary.json").write_text(json.dumps(summary, indent=2, default=str))
            n = summary["curation"]["records_kept"] if cur.enabled else gate.n_records
            return {"kind": kind, "n_records": n, "fingerprint": h.hexdigest() if cur.enabled else gate.fingerprint}

        params = {"kind": kind, "fingerprint": gate.fingerprint, "references": digest}
        return run_stage(VALIDATE, spec, store, build, params=params)


def curated(spec: RunSpec, kind: str, paths: list[Path], refs: dict[str, list[str]], work: Path):
    """The corpus through data.curation, one shard per file; refused when too little is left to train on."""
    from ruyi_core.data.curate import curate, decontamination_index

    cur = spec.data.curation
    index = decontamination_index(refs, cur.decontamination_ngrams) if refs else None
    result = curate([[str(p)] for p in paths], kind, cur, index, work)
    need = spec.data.thresholds[kind].min_records if kind in spec.data.thresholds else 1
    if result.n_kept < need:
        worst = max(result.removed.items(), key=lambda kv: kv[1]["count"])
        raise RuyiError(f"data.{kind}: curation kept {result.n_kept} of {result.n_in} records, fewer than "
                        f"data.thresholds.{kind}.min_records={need}; {worst[0]} removed {worst[1]['count']}: "
                        f"loosen data.curation or add data")
    return result


def reference_sets(spec: RunSpec, store: ArtifactStore, work: Path) -> dict[str, list[str]]:
    """The texts no training record may overlap: every benchmark's and held-out set's, less those the curation
    keeps overlap with. Each string field of an item is one reference text (a question, an answer, a passage)."""
    from ruyi_core.data.sources import resolve
    from ruyi_core.eval.heldout import heldout_prompts, heldout_texts
    from ruyi_core.eval.tasks import read_jsonl

    keep, refs = set(spec.data.curation.keep_overlap_with), {}
    for name, bench in sorted(spec.eval.benchmarks.items()):
        if name not in keep:
            label = f"eval.benchmarks.{name}.path"
            paths = resolve([bench.path], "benchmark", work / name, label=label, store=store, seed=spec.data.seed)
            refs[name] = [s for p in paths for rec in read_jsonl(p, label)[: bench.limit] for s in _strings(rec)]
    if spec.data.heldout and "data.heldout" not in keep:
        refs["data.heldout"] = heldout_texts(spec, work, store)
    if spec.data.rl_heldout and spec.rl.enabled and "data.rl_heldout" not in keep:
        refs["data.rl_heldout"] = [s for rec in heldout_prompts(spec, work, store) for s in _strings(rec)]
    return refs


def _strings(rec: dict) -> list[str]:
    out = []
    for v in rec.values():
        out += [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
    return out


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
