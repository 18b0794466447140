"""Curation: a validated corpus, less what datatrove's filters and deduplication remove, counted with examples.

The steps run as datatrove pipelines over the corpus's shards (rank r: shard r), in the field's multi-step way:
filters first (language, quality, decontamination), then exact duplicates (signatures, find, filter) and near
duplicates (MinHash signatures, buckets, clusters, filter) across every shard."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ruyi_core.data.curate_steps import (Decontaminate, DecontaminationIndex, LanguageID, RecordReader,
                                         ShardReader, ShardWriter, Words)
from ruyi_core.spec.sections import CurationSpec

FILTERS = ("language", "quality", "decontamination", "exact_duplicates", "near_duplicates")
EXAMPLES = 3  # removed records shown per filter


@dataclass
class Curation:
    """The curated shards (one JSONL file per input shard, in order), and what each filter removed."""

    files: list[Path]
    n_in: int
    n_kept: int
    removed: dict[str, dict] = field(default_factory=dict)  # filter -> {count, examples: [[id, why, text]]}

    def summary(self) -> dict:
        return {"records_in": self.n_in, "records_kept": self.n_kept, "removed": self.removed}


def _content(doc) -> bytes:
    """What makes two records exact duplicates: their training text, whitespace runs aside."""
    return " ".join(doc.text.split()).encode()


def _run(pipeline: list, tasks: int, logs: Path) -> None:
    """One datatrove stage; its log lines and stats tables go to `logs`, not the stage's own output."""
    from datatrove.executor import LocalPipelineExecutor

    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stderr.log", "w") as err, contextlib.redirect_stderr(err):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(logs), skip_completed=False).run()


class _Stages:
    """Runs one datatrove stage after another over the same shards, each reading the previous one's output."""

    def __init__(self, work: Path, n_shards: int):
        self.work, self.n, self.i = work, n_shards, 0

    def excluded(self, name: str):
        from datatrove.pipeline.writers import JsonlWriter

        return JsonlWriter(str(self.work / "removed" / name), output_filename="${rank}.jsonl", compression=None)

    def run(self, pipeline: list, tasks: int | None = None) -> None:
        self.i += 1
        _run(pipeline, tasks or self.n, self.work / "logs" / f"{self.i:02d}")

    def step(self, *steps) -> Path:
        """Shard by shard: the current documents through `steps`, written for the next stage."""
        src, out = self.current, self.work / f"stage{self.i + 1:02d}"
        self.run([ShardReader(src), *steps, ShardWriter(out)])
        self.current = out
        return out


def curate(shards: list[list[str]], kind: str, spec: CurationSpec, index: DecontaminationIndex | None,
           work: Path) -> Curation:
    """Curate a validated corpus of `kind` whose files are grouped into `shards`; results under `work`."""
    from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                          MinhashDedupSignature)
    from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                      ExactFindDedups)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter
    from datatrove.utils.hashing import HashConfig

    st, words = _Stages(work, len(shards)), Words()
    filters = []
    if spec.languages:
        filters.append(LanguageID(spec.languages, spec.language_score, st.excluded("language")))
    if spec.quality and kind == "pretrain":
        filters.append(GopherQualityFilter(min_doc_words=spec.min_words, min_stop_words=spec.min_stop_words,
                                           language=words, exclusion_writer=st.excluded("quality")))
    if index is not None and index.by_length:
        filters.append(Decontaminate(index, st.excluded("decontamination")))
    st.current = work / "stage01"
    st.run([RecordReader(shards, kind), *filters, ShardWriter(st.current)])
    if spec.exact_dedup:
        cfg, sigs, dups = ExactDedupConfig(content_getter=_content), str(work / "exact"), str(work / "exact_dups")
        st.run([ShardReader(st.current), ExactDedupSignature(sigs, cfg)])
        st.run([ExactFindDedups(sigs, dups, cfg)], tasks=1)
        st.step(ExactDedupFilter(dups, cfg, exclusion_writer=st.excluded("exact_duplicates")))
    if spec.near_dedup:
        # sha1: datatrove's default xxhash is handed str here, which xxhash 4 refuses
        mh = MinhashConfig(n_grams=spec.minhash_ngrams, hash_config=HashConfig(hash_fc="sha1", precision=64))
        sigs, buckets, remove = (str(work / "minhash" / d) for d in ("sigs", "buckets", "remove"))
        st.run([ShardReader(st.current), MinhashDedupSignature(sigs, config=mh, language=words)])
        st.run([MinhashDedupBuckets(sigs, buckets, config=mh)], tasks=mh.num_buckets)
        st.run([MinhashDedupCluster(buckets, remove, config=mh)], tasks=1)
        st.step(MinhashDedupFilter(remove, exclusion_writer=st.excluded("near_duplicates")))
    out = work / "curated"
    st.run([ShardReader(st.current), ShardWriter(out, records=True)])
    files = [out / f"{r:05d}.jsonl" for r in range(len(shards))]
    kept = sum(_lines(f) for f in files)
    removed = {name: _removed(work / "removed" / name) for name in FILTERS}
    n_in = kept + sum(r["count"] for r in removed.values())
    return Curation(files, n_in, kept, {k: v for k, v in removed.items() if v["count"]})


def decontamination_index(refs: dict[str, list[str]], n: int) -> DecontaminationIndex:
    """The index of every reference text, named by the set it comes from."""
    index = DecontaminationIndex(n)
    for name, texts in refs.items():
        for text in texts:
            index.add(name, text)
    return index


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
