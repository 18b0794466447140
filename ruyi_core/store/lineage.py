"""Lineage: an artifact and, transitively, the artifacts it was built from, each checked against the
content token its consumer recorded (an input with other content breaks the chain loudly, not silently; a
bit-identical rebuild of it does not)."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ruyi_core.store.client import IntegrityError, StoreError

if TYPE_CHECKING:
    from ruyi_core.store.artifact import ArtifactStore, Manifest


def lineage(store: ArtifactStore, uri: str) -> list[Manifest]:
    """The artifact at `uri` first, then its inputs breadth-first, each artifact once."""
    root = store.read_manifest(uri)
    if root is None:
        raise StoreError(f"no artifact at {uri}: it has no manifest.json (never completed, or a wrong URI)")
    out, queue = [root], deque([root])
    seen = {root.uri, store.normalize_uri(uri)}
    while queue:
        m = queue.popleft()
        for ref in m.inputs:
            if ref.uri in seen:
                continue
            seen.add(ref.uri)
            parent = store.read_manifest(ref.uri)
            if parent is None:
                raise StoreError(f"{m.uri} was built from {ref.uri}, which no longer has a manifest: "
                                 "restore it or rebuild the chain")
            if not ref.matches(parent):
                raise IntegrityError(f"{ref.uri} changed after {m.uri} was built from it (content sha256 "
                                     f"{parent.content_sha256()[:12]} != recorded {ref.recorded()[:12]}): "
                                     "rebuild the downstream artifacts")
            out.append(parent)
            queue.append(parent)
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def lineage_json(chain: list[Manifest]) -> dict:
    """The chain for scripts: the root's URI and every artifact with its hashes and the URIs it was built from."""
    return {"uri": chain[0].uri, "artifacts": [
        {"uri": m.uri, "stage": m.stage, "created_at": m.created_at, "files": len(m.files),
         "size_bytes": m.total_size, "content_sha256": m.content_sha256(), "inputs": [r.uri for r in m.inputs],
         "metadata": m.metadata}
        for m in chain]}


def _detail(m: Manifest) -> str | None:
    """What a data artifact holds, in words: a shard's source, its records' hash and what the filters removed; a
    curated corpus's record count."""
    meta = m.metadata
    if m.stage == "curate_shard" and {"source", "n_records", "n_kept", "fingerprint"} <= set(meta):
        name = str(meta["source"]).rstrip("/").rpartition("/")[2]
        return (f"shard {name} (records {str(meta['fingerprint'])[:12]}): {meta['n_records']:,} records, "
                f"{meta['n_records'] - meta['n_kept']:,} removed by curation's filters")
    if m.stage == "merge_data" and "n_records" in meta:
        return f"{meta.get('kind', '')} corpus: {meta['n_records']:,} records after deduplication across shards"
    return None


def lineage_tree(chain: list[Manifest]) -> list[str]:
    """The chain as a tree, one artifact per node: its stage, content hash, files and date on one line, its key on
    the next, its inputs below it. Keys are shown under the root's bucket (the first line names it) so that a
    deep chain still reads in a narrow terminal; an artifact reached twice is shown once, then named."""
    by_uri = {m.uri: m for m in chain}
    bucket = chain[0].uri.split("/", 3)[:3]
    prefix = "/".join(bucket) + "/"
    lines = [f"lineage of {chain[0].uri}", f"(keys under {prefix})"]
    shown: set[str] = set()

    def node(m: Manifest, lead: str, branch: str, rest: str) -> None:
        shown.add(m.uri)
        when = m.created_at[:16].replace("T", " ")
        lines.append(f"{lead}{branch}{m.stage}  {m.content_sha256()[:12]}  {len(m.files)} files, "
                     f"{_size(m.total_size)}  {when}")
        lines.append(f"{lead}{rest}  {m.uri.removeprefix(prefix)}")
        if (detail := _detail(m)) is not None:
            lines.append(f"{lead}{rest}  {detail}")
        parents = [by_uri[r.uri] for r in m.inputs if r.uri in by_uri]
        seen = [p for p in parents if p.uri in shown]
        new = [p for p in parents if p.uri not in shown]
        if seen:
            lines.append(f"{lead}{rest}  also from (above): " +
                         ", ".join(f"{p.stage} {p.content_sha256()[:8]}" for p in seen))
        for i, p in enumerate(new):
            last = i == len(new) - 1
            if p.uri in shown:  # reached through an earlier sibling's subtree
                lines.append(f"{lead}{rest}{'└─ ' if last else '├─ '}{p.stage} {p.content_sha256()[:8]} (above)")
                continue
            node(p, lead + rest, "└─ " if last else "├─ ", "   " if last else "│  ")

    node(chain[0], "", "", "")
    return lines
