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
