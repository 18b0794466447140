"""The sharded data stages: plan_shards lists every corpus's shards, curate_shard gates and filters one shard (a
task of its own on a cluster), merge_data deduplicates across a corpus's shards and writes its dataset: what the
stages after the gate read (ruyi_core.stages.data.corpus_records).

A shard's artifact is keyed by its content, the curation fields and the references it was decontaminated against,
never by its place or name: a run on grown data rebuilds only the shards that are new or changed, then the
merges."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel

from ruyi_core.errors import RuyiError
from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Artifact, Stage, StageRun, run_stage, workdir
from ruyi_core.stages.data import KINDS, LISTING, RawDataset, reference_sets, stored_summary
from ruyi_core.store import ArtifactStore

GATE_FIELDS = ("data.allowed_sources", "data.allowed_langs", "data.thresholds", "data.curation")


class Shard(BaseModel):
    """One file of a corpus: its kind, its place in the corpus and its source (ruyi_core.data.sources). `version`
    changes with the file, so an orchestrator that caches a task by its inputs sees a changed shard as new."""

    kind: str
    index: int
    source: str
    version: str = ""


class CuratedShard(Artifact):
    kind: str
    index: int  # its place in the corpus, and where this run found it (the artifact is keyed by content)
    source: str
    n_records: int  # valid records in the shard
    n_kept: int  # after the shard's filters; deduplication across shards comes in merge_data
    fingerprint: str  # of the shard's valid records
    references: str  # digest of the texts it was decontaminated against


CURATE = Stage("curate_shard", CuratedShard, GATE_FIELDS, root="datasets/shards/{kind}")
MERGE = Stage("merge_data", RawDataset, GATE_FIELDS, root="datasets/raw/{kind}")


def plan_shards(spec: RunSpec, store: ArtifactStore | None) -> list[Shard]:
    """Every training corpus's shards, in corpus order: one per file (ruyi_core.data.sources.shard_sources)."""
    from ruyi_core.data.sources import shard_sources, source_version

    return [Shard(kind=kind, index=i, source=src, version=source_version(src, store))
            for kind in KINDS if getattr(spec.data, kind)
            for i, src in enumerate(shard_sources(getattr(spec.data, kind), label=f"data.{kind}", store=store))]


def _shard_gate(spec: RunSpec, kind: str):
    """The gate's settings for one shard: every check but the corpus's record count, which merge_data checks."""
    th = spec.data.thresholds[kind]
    return spec.data.model_copy(update={"thresholds": {**spec.data.thresholds,
                                                       kind: th.model_copy(update={"min_records": 1})}})


def curate_shard(spec: RunSpec, store: ArtifactStore, shard: Shard, docs_dir: Path | None = None) -> CuratedShard:
    """The data gate on one shard, then curation's filters and its dedup signatures. The gate always looks at the
    data; the filtering is skipped when the same content already passed under the same curation."""
    from ruyi_core.data.curate import decontamination_index, filter_shard
    from ruyi_core.data.sources import demo_sizes, resolve
    from ruyi_core.data.validate import gate_or_raise, validate_corpus

    cur, kind = spec.data.curation, shard.kind
    with workdir("curate") as work:
        [path] = resolve([shard.source], kind, work / "in", label=f"data.{kind}", store=store, seed=spec.data.seed,
                         demo_sizes=demo_sizes(spec))
        gate = gate_or_raise(validate_corpus([path], kind, _shard_gate(spec, kind), docs_dir))
        refs = reference_sets(spec, store, work / "references") if cur.enabled and cur.decontaminate else {}
        digest = hashlib.sha256(json.dumps(refs, sort_keys=True).encode()).hexdigest()

        def build(run: StageRun) -> dict:
            index = decontamination_index(refs, cur.decontamination_ngrams) if refs else None
            result = filter_shard([str(path)], kind, cur, index, run.work / "filter", run.out)
            summary = stored_summary(gate.summary, {str(path): Path(shard.source).name})
            (run.out / "gate_summary.json").write_text(json.dumps({**summary, "curation": result.summary()},
                                                                  indent=2, default=str))
            return {"kind": kind, "index": shard.index, "source": shard.source, "n_records": gate.n_records, "n_kept": result.n_kept,
                    "fingerprint": gate.fingerprint, "references": digest}

        params = {"kind": kind, "fingerprint": gate.fingerprint, "references": digest}
        out = run_stage(CURATE, spec, store, build, params=params).model_copy(
            update={"index": shard.index, "source": shard.source})  # a reused artifact may come from elsewhere
    if docs_dir is not None:  # what curation removed joins the gate's Data Docs (built or reused alike)
        from ruyi_core.data.curation_docs import validate_curation
        from ruyi_core.data.validate import build_docs

        validate_curation(gate.context, f"{kind}_curation", json.loads(out.read_text(store, "gate_summary.json"))
                          ["curation"])
        build_docs(gate.context, docs_dir)
    return out


def merge_data(spec: RunSpec, store: ArtifactStore, kind: str, shards: list[CuratedShard]) -> RawDataset:
    """A corpus's dataset from its curated shards (in corpus order): deduplication across them, the record count
    checked, and `dataset.json` naming each shard with the positions of its records that go."""
    from ruyi_core.data.curate import IDS, SIGNATURES, Curation, combine, deduplicate

    inputs = {f"shard{i:05d}": s.uri for i, s in enumerate(shards)}

    def build(run: StageRun) -> dict:
        folders, parts = [], []
        for name in inputs:
            files = [f.path for f in run.manifest(name).files if f.path.startswith(f"{SIGNATURES}/")]
            folder = run.work / "shards" / name
            run.store.get_artifact(run.inputs[name], folder, only=[IDS, "gate_summary.json", *files])
            summary = json.loads((folder / "gate_summary.json").read_text())["curation"]
            parts.append(Curation(summary["records_in"], summary["records_kept"], summary["removed"]))
            folders.append(folder)
        dedup = deduplicate(folders, spec.data.curation, run.work / "dedup")
        total = combine(parts, dedup)
        need = spec.data.thresholds[kind].min_records
        if total.n_kept < need:
            worst = max(total.removed.items(), key=lambda kv: kv[1]["count"], default=("nothing", {"count": 0}))
            raise RuyiError(f"data.{kind}: curation kept {total.n_kept} of {total.n_in} records, fewer than "
                            f"data.thresholds.{kind}.min_records={need}; {worst[0]} removed {worst[1]['count']}: "
                            f"loosen data.curation or add data")
        listing = [{"uri": s.uri, "source": s.source, "fingerprint": s.fingerprint, "remove": r}
                   for s, r in zip(shards, dedup.remove)]
        (run.out / LISTING).write_text(json.dumps({"kind": kind, "shards": listing}, indent=1))
        per_shard = [{"source": s.source, "records": s.n_records, "removed": {**p.removed_counts(), **d},
                      "kept": s.n_kept - len(r)} for s, p, d, r in zip(shards, parts, dedup.per_shard, dedup.remove)]
        (run.out / "gate_summary.json").write_text(json.dumps({"curation": total.summary(), "shards": per_shard},
                                                              indent=2))
        content = [[s.fingerprint, s.references, r] for s, r in zip(shards, dedup.remove)]
        fingerprint = hashlib.sha256(json.dumps([kind, content]).encode()).hexdigest()
        return {"kind": kind, "n_records": total.n_kept, "fingerprint": fingerprint}

    return run_stage(MERGE, spec, store, build, inputs=inputs, params={"kind": kind})


def merge_all(spec: RunSpec, store: ArtifactStore, shards: list[CuratedShard]) -> list[RawDataset]:
    """Every corpus's merge, from all the curated shards a run made (as a pipeline collects them)."""
    kinds = [k for k in KINDS if any(s.kind == k for s in shards)]
    return [merge_data(spec, store, k, sorted((s for s in shards if s.kind == k), key=lambda s: s.index))
            for k in kinds]


def gate_and_curate(spec: RunSpec, store: ArtifactStore, kinds: tuple[str, ...] = KINDS) -> list[RawDataset]:
    """The sharded data stages in one process, shard after shard (the CLI's and tests' way to run them)."""
    return merge_all(spec, store, [curate_shard(spec, store, s) for s in plan_shards(spec, store) if s.kind in kinds])
