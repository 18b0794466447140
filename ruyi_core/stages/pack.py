"""Tokenize and pack, shard by shard: plan_packs lists each curated corpus's shards, pack_shard packs one (a task
of its own on a cluster) with the family's tokenizer, and prepare_data makes one packed dataset per corpus whose
parts are the shards' artifacts (ruyi_core.data.packed.compose), so nothing is copied.

A shard's pack is keyed by the curated shard's content, the records deduplication removes from it and the
tokenizer's files: a run on grown data packs only the shards that are new or changed, and a warm-started run
with the same tokenizer none."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel

from ruyi_core.spec import RunSpec
from ruyi_core.stages.contract import Stage, StageRun, manifest_of, run_stage, workdir
from ruyi_core.stages.data import LISTING, PackedDataset, RunPlan, shard_listing
from ruyi_core.store import ArtifactStore


class PackPiece(BaseModel):
    """One shard of a curated corpus: merge_data's dataset `raw` and the shard's place in it."""

    kind: str
    raw: str
    index: int


class PackedShard(PackedDataset):
    index: int  # its place in the corpus (the artifact is keyed by content)


PACK = Stage("pack_shard", PackedShard, ("data.shard_tokens",), root="datasets/packed/shards/{kind}")
PREPARE = Stage("prepare_data", PackedDataset, ("data.shard_tokens",), root="datasets/packed/{kind}", version=2)


def _listing(store: ArtifactStore, raw: str, work: Path) -> list[dict]:
    store.get_artifact(raw, work, only=[LISTING])
    return shard_listing(work)


def plan_packs(store: ArtifactStore, plan: RunPlan) -> list[PackPiece]:
    """Every shard of every curated corpus of the run, in corpus order: the fan-out of pack_shard."""
    with workdir("plan-packs") as work:
        return [PackPiece(kind=d.kind, raw=d.uri, index=i) for d in plan.datasets
                for i, _ in enumerate(_listing(store, d.uri, work / d.kind))]


def pack_shard(spec: RunSpec, store: ArtifactStore, piece: PackPiece, family: str) -> PackedShard:
    """One curated shard's surviving records, tokenized with the family's tokenizer and packed."""
    from transformers import AutoTokenizer

    from ruyi_core.data.curate import RECORDS, surviving
    from ruyi_core.family.tokenizer import TOKENIZER_FILES, tokenizer_digest

    with workdir("pack") as work:
        shard = _listing(store, piece.raw, work)[piece.index]
        # The tokenizer's files only: a 14B family's weights are ~28 GB that a shard's task has no use for.
        files = [f.path for f in manifest_of(store, family).files if f.path in TOKENIZER_FILES]
        store.get_artifact(family, work / "tokenizer", only=files)
        tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    remove = sorted(shard["remove"])
    # What the pack reads keys it: the shard's records file (curation re-run against other references, as in a run
    # without RL, rewrites the shard's summary, not always its records), what is removed, and what the tokenizer
    # does (not the family's weights or files): a scheduled retraining warm-started from the promoted family, or a
    # new base with the same tokenizer, reuses every shard's pack.
    records = {f.path: f.sha256 for f in manifest_of(store, shard["uri"]).files}[RECORDS]

    def build(run: StageRun) -> dict:
        from ruyi_core.data.pack import prepare_corpus

        run.lineage += [shard["uri"], piece.raw, family]  # the shard, the corpus's merge, the family: lineage
        folder = run.work / "shard"
        run.store.get_artifact(shard["uri"], folder, only=[RECORDS])
        res = prepare_corpus(surviving(folder, set(remove)), piece.kind, tok, run.out, spec.data.shard_tokens,
                             progress=False)
        return {"kind": res.kind, "index": piece.index, "n_docs": res.n_docs, "n_tokens": res.n_tokens,
                "fingerprint": res.fingerprint}

    digest = hashlib.sha256(json.dumps(remove).encode()).hexdigest()
    return run_stage(PACK, spec, store, build, params={"kind": piece.kind, "records": records, "remove": digest,
                                                       "tokenizer": tokenizer_digest(tok)}
                     ).model_copy(update={"index": piece.index})


def prepare_data(spec: RunSpec, store: ArtifactStore, kind: str, parts: list[PackedShard]) -> PackedDataset:
    """A corpus's packed dataset from its packed shards (in corpus order): a manifest naming them as its parts."""
    from ruyi_core.data.packed import MANIFEST, compose

    parts = sorted(parts, key=lambda p: p.index)
    inputs = {f"part{i:05d}": p.uri for i, p in enumerate(parts)}

    def build(run: StageRun) -> dict:
        metas = []
        for name, uri in inputs.items():
            run.store.get_artifact(uri, run.work / name, only=[MANIFEST])
            metas.append(json.loads((run.work / name / MANIFEST).read_text()))
        meta = compose(metas, [run.store.normalize_uri(u) for u in inputs.values()])
        (run.out / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return {"kind": kind, "n_docs": meta["n_docs"], "n_tokens": meta["n_tokens"],
                "fingerprint": meta["fingerprint"]}

    return run_stage(PREPARE, spec, store, build, inputs=inputs, params={"kind": kind})


def prepare_all(spec: RunSpec, store: ArtifactStore, parts: list[PackedShard]) -> list[PackedDataset]:
    """Every corpus's packed dataset, from all the packed shards a run made (as a pipeline collects them)."""
    kinds = sorted({p.kind for p in parts})
    return [prepare_data(spec, store, k, [p for p in parts if p.kind == k]) for k in kinds]


def pack_all(spec: RunSpec, store: ArtifactStore, plan: RunPlan, family: str) -> list[PackedDataset]:
    """The packing stages in one process, shard after shard (the tests' way to run them)."""
    return prepare_all(spec, store, [pack_shard(spec, store, p, family) for p in plan_packs(store, plan)])
