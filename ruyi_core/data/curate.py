"""Curation: a validated corpus, less what datatrove's filters and deduplication remove, counted with examples.

It runs in datatrove's multi-step way, split where a cluster fans out: `filter_shard` runs on each shard alone
(language, quality and decontamination filters, then the shard's exact-dedup and MinHash signatures), and
`deduplicate` runs once over every shard's signatures (datatrove's exact finder, MinHash buckets and clusters),
returning which records of each shard go. `curate` composes the two in one process."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ruyi_core.data.curate_steps import (Decontaminate, DecontaminationIndex, LanguageID, RecordReader,
                                         ShardReader, ShardWriter, Words)
from ruyi_core.spec.sections import CurationSpec

FILTERS = ("language", "quality", "decontamination")
EXAMPLES = 3  # removed records shown per step
RECORDS, IDS, SIGNATURES = "records.jsonl", "ids.txt", "signatures"  # a filtered shard's files


@dataclass
class Curation:
    """Records in and kept, and for each step that removed any: {count, examples: [[record id, why, text]]}."""

    n_in: int
    n_kept: int
    removed: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"records_in": self.n_in, "records_kept": self.n_kept, "removed": self.removed}

    def removed_counts(self) -> dict[str, int]:
        return {k: v["count"] for k, v in self.removed.items()}


@dataclass
class Dedup:
    """What deduplication removes: positions in each shard's filtered records, and the counts with examples."""

    remove: list[list[int]]
    removed: dict[str, dict]
    per_shard: list[dict[str, int]]  # each shard's count per step


def _content(doc) -> bytes:
    """What makes two records exact duplicates: their training text, whitespace runs aside."""
    return " ".join(doc.text.split()).encode()


def _exact_config():
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig

    return ExactDedupConfig(content_getter=_content)


def _minhash_config(spec: CurationSpec):
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    # sha1: datatrove's default xxhash is handed str by the MinHash steps, which xxhash 4 refuses
    return MinhashConfig(n_grams=spec.minhash_ngrams, hash_config=HashConfig(hash_fc="sha1", precision=64))


def _run(pipeline: list, tasks: int = 1) -> None:
    """One datatrove stage: each rank's documents piped through the steps, as datatrove's executors do, in this
    process (its local executor starts a multiprocessing manager, which a long TMPDIR breaks). Its log lines and
    progress bars stay out of the stage's output."""
    from datatrove.utils.logging import logger

    logger.disable("datatrove")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the dedup steps' progress bars
            for rank in range(tasks):
                data = None
                for step in pipeline:
                    data = step(data, rank, tasks)
                deque(data or (), maxlen=0)
    finally:
        logger.enable("datatrove")


def filter_shard(files: list[str], kind: str, spec: CurationSpec, index: DecontaminationIndex | None, work: Path,
                 out: Path) -> Curation:
    """One shard through the filters; `out` gets the surviving records, their ids and their dedup signatures."""
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupSignature
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.pipeline.writers import JsonlWriter

    def excluded(name: str):
        return JsonlWriter(str(work / "removed" / name), output_filename="${rank}.jsonl", compression=None)

    steps = []
    if spec.enabled and spec.languages:
        steps.append(LanguageID(spec.languages, spec.language_score, excluded("language")))
    if spec.enabled and spec.quality and kind == "pretrain":
        steps.append(GopherQualityFilter(min_doc_words=spec.min_words, min_stop_words=spec.min_stop_words,
                                         language=Words(), exclusion_writer=excluded("quality")))
    if spec.enabled and index is not None and index.by_length:
        steps.append(Decontaminate(index, excluded("decontamination")))
    docs = work / "docs"
    _run([RecordReader([files], kind), *steps, ShardWriter(docs)])
    out.mkdir(parents=True, exist_ok=True)
    _run([ShardReader(docs), ShardWriter(out, records=True)])
    (out / "00000.jsonl").rename(out / RECORDS)
    with open(docs / "00000.jsonl", encoding="utf-8") as f, open(out / IDS, "w") as ids:
        ids.writelines(json.loads(line)["id"] + "\n" for line in f)
    if spec.enabled and spec.exact_dedup:
        _run([ShardReader(docs), ExactDedupSignature(str(out / SIGNATURES / "exact"), _exact_config())])
    if spec.enabled and spec.near_dedup:
        _run([ShardReader(docs), MinhashDedupSignature(str(out / SIGNATURES / "minhash"),
                                                       config=_minhash_config(spec), language=Words())])
    kept = _lines(out / IDS)
    removed = {name: _removed(work / "removed" / name) for name in FILTERS}
    removed = {k: v for k, v in removed.items() if v["count"]}
    return Curation(kept + sum(v["count"] for v in removed.values()), kept, removed)


def deduplicate(shards: list[Path], spec: CurationSpec, work: Path) -> Dedup:
    """Exact, then near duplicates across the filtered shards (folders filter_shard wrote, in corpus order). Of an
    exact group the first copy stays (datatrove's finder); of a MinHash cluster the first member that is not an
    exact duplicate stays, in (shard, position) order, so the choice does not depend on datatrove's union-find."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster
    from datatrove.pipeline.dedup.exact_dedup import ExactFindDedups

    remove: list[set[int]] = [set() for _ in shards]
    removed, per_shard = {}, [{} for _ in shards]
    if spec.enabled and spec.exact_dedup:
        for i, s in enumerate(shards):  # each shard's signatures, renamed to its position (datatrove's file id)
            _copy(s / SIGNATURES / "exact" / "0000" / "00000.c4_sig", work / "exact" / "0000" / f"{i:05d}.c4_sig")
        _run([ExactFindDedups(str(work / "exact"), str(work / "exact_dups"), _exact_config())])
        for i in range(len(shards)):
            dup = work / "exact_dups" / "00000" / f"{i:05d}.c4_dup"
            if dup.exists():
                remove[i] |= {doc for (doc,) in _unpack(dup, "<I")}
        removed["exact_duplicates"] = _positions(shards, remove, "exact duplicate")
        for counts, r in zip(per_shard, remove):
            counts["exact_duplicates"] = len(r)
    if spec.enabled and spec.near_dedup:
        mh = _minhash_config(spec)
        for i, s in enumerate(shards):
            for b in range(mh.num_buckets):
                name = f"bucket_{b:03d}"
                _copy(s / SIGNATURES / "minhash" / name / "00000.minhash.sig",
                      work / "minhash" / "sigs" / name / f"{i:05d}.minhash.sig")
        sigs, buckets, clusters = (str(work / "minhash" / d) for d in ("sigs", "buckets", "clusters"))
        _run([MinhashDedupBuckets(sigs, buckets, config=mh)], tasks=mh.num_buckets)
        _run([MinhashDedupCluster(buckets, clusters, config=mh, save_cluster_id=True)])
        near = [set() for _ in shards]
        for members in _clusters(Path(clusters), len(shards)).values():
            keep = min((m for m in members if m[1] not in remove[m[0]]), default=None)
            for i, doc in members:
                if (i, doc) != keep and doc not in remove[i]:
                    near[i].add(doc)
        removed["near_duplicates"] = _positions(shards, near, "near duplicate")
        for counts, r in zip(per_shard, near):
            counts["near_duplicates"] = len(r)
        remove = [a | b for a, b in zip(remove, near)]
    return Dedup([sorted(r) for r in remove], {k: v for k, v in removed.items() if v["count"]},
                 [{k: n for k, n in c.items() if n} for c in per_shard])


def curate(shards: list[list[str]], kind: str, spec: CurationSpec, index: DecontaminationIndex | None,
           work: Path) -> tuple[list[list[dict]], Curation]:
    """The whole curation in one process: each shard's surviving records, and what each step removed."""
    folders, parts = [], []
    for i, files in enumerate(shards):
        folders.append(work / f"shard{i:05d}")
        parts.append(filter_shard(files, kind, spec, index, work / f"work{i:05d}", folders[-1]))
    dedup = deduplicate(folders, spec, work / "dedup")
    kept = [list(surviving(f, set(r))) for f, r in zip(folders, dedup.remove)]
    return kept, combine(parts, dedup)


def combine(parts: list[Curation], dedup: Dedup) -> Curation:
    """The corpus's curation: every shard's filters, then deduplication across them."""
    removed: dict[str, dict] = {}
    for step in (*FILTERS, *dedup.removed):
        found = [p.removed[step] for p in parts if step in p.removed] or ([dedup.removed[step]]
                                                                          if step in dedup.removed else [])
        if found:
            removed[step] = {"count": sum(f["count"] for f in found),
                             "examples": [e for f in found for e in f["examples"]][:EXAMPLES]}
    n_in = sum(p.n_in for p in parts)
    return Curation(n_in, n_in - sum(v["count"] for v in removed.values()), removed)


def surviving(folder: Path, remove: set[int]):
    """A filtered shard's records in order, less those deduplication removes (by position)."""
    with open(folder / RECORDS, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n not in remove:
                yield json.loads(line)


def decontamination_index(refs: dict[str, list[str]], n: int) -> DecontaminationIndex:
    """The index of every reference text, named by the set it comes from."""
    index = DecontaminationIndex(n)
    for name, texts in refs.items():
        for text in texts:
            index.add(name, text)
    return index


def _copy(src: Path, dst: Path) -> None:
    """A shard's signature file under the name its position gives; an empty one when the shard has none, as
    datatrove's MinHash buckets number their inputs by their place in the listing."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
        shutil.copy(src, dst)
    else:
        dst.touch()


def _unpack(path: Path, fmt: str) -> list[tuple[int, ...]]:
    """A datatrove binary file of fixed-size little-endian records."""
    return list(struct.iter_unpack(fmt, path.read_bytes()))


def _clusters(folder: Path, n_shards: int) -> dict[int, list[tuple[int, int]]]:
    """MinHash clusters: cluster id -> members (shard, position)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for i in range(n_shards):
        path = folder / f"{i:06d}.clusters"
        if path.exists():
            for doc, cluster in _unpack(path, "<2I"):
                out.setdefault(cluster, []).append((i, doc))
    return out


def _positions(shards: list[Path], remove: list[set[int]], why: str) -> dict:
    """Counts and examples of removals given as positions, named by the records' ids."""
    examples = []
    for folder, r in zip(shards, remove):
        if r and len(examples) < EXAMPLES:
            ids = (folder / IDS).read_text().splitlines()
            examples += [[ids[n], why, ""] for n in sorted(r)[: EXAMPLES - len(examples)]]
    return {"count": sum(len(r) for r in remove), "examples": examples}


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _removed(folder: Path) -> dict:
    """How many records a filter removed, with the first few (id, why, text)."""
    count, examples = 0, []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                count += 1
                if len(examples) < EXAMPLES:
                    d = json.loads(line)
                    meta = d.get("metadata", {})
                    why = " ".join(filter(None, (meta.get("filter_reason"), meta.get("ngram"))))
                    examples.append([d.get("id"), why, d.get("text", "")[:120]])
    return {"count": count, "examples": examples}
