"""Data stages: what the gate's datasets are (the sharded stages that make them: shards.py), the run plan behind
them, and what packing makes of them (pack.py)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, StageRun, slice_hash
from ruyi_core.store import ArtifactStore

KINDS = ("pretrain", "sft", "rl")
LISTING = "dataset.json"  # a curated corpus's shards (merge_data writes it)


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


def corpus_records(run: StageRun, name: str) -> Iterator[dict]:
    """Input `name`'s curated records, streamed; the shards they come from join the stage's lineage."""
    return dataset_records(run.store, run.fetch(name), run.work / "shards" / name, run.lineage)


def shard_listing(dataset: Path) -> list[dict]:
    """merge_data's `dataset.json` (in the folder `dataset`): each curated shard's URI, source and fingerprint,
    and the positions of its records that deduplication removes."""
    return json.loads((dataset / LISTING).read_text())["shards"]


def dataset_records(store: ArtifactStore, dataset: Path, work: Path, shards: list[str] | None = None
                    ) -> Iterator[dict]:
    """A curated corpus's records in corpus order, shard by shard: merge_data's `dataset.json` (in the folder
    `dataset`) names the shards and the positions of their records that deduplication removed."""
    from ruyi_core.data.curate import RECORDS, surviving

    for i, shard in enumerate(shard_listing(dataset)):
        folder = work / f"{i:05d}"
        store.get_artifact(shard["uri"], folder, only=[RECORDS])
        if shards is not None:
            shards.append(shard["uri"])
        yield from surviving(folder, set(shard["remove"]))
        (folder / RECORDS).unlink()
