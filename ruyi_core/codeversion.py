"""What a computation's code is, as a short digest of its Python sources: a result cached on its inputs alone (a
demo shard, a local pipeline task) is served again only to the code that made it."""
from __future__ import annotations

import hashlib
from pathlib import Path


def code_version(*packages: Path, extra: str = "") -> str:
    """A digest of every .py file under `packages` (names and bytes, in a fixed order) and `extra`."""
    h = hashlib.sha256(extra.encode())
    for root in packages:
        for f in sorted(Path(root).rglob("*.py")):
            h.update(f"{root.name}/{f.relative_to(root)}".encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]
