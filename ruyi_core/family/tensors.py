"""A checkpoint's tensors on disk, one at a time: read lazily by name from its safetensors files, and written as
they come into size-bounded shards with the index transformers reads. Conversions built on these hold one
module's tensors beside the model they fill or empty, never a second copy of the model. And a model's blocks
named by a chain of digests, in memory or as stored."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ruyi_core.errors import RuyiError


class TensorFiles(Mapping):
    """The tensors of the *.safetensors files in a folder, by name; each is read from disk when asked for (in
    `dtype` when given, else as stored)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None):
        self.folder, self.dtype, self.where = Path(folder), dtype, {}
        for f in sorted(self.folder.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                self.where.update(dict.fromkeys(st.keys(), f))
        if not self.where:
            raise RuyiError(f"{self.folder} holds no *.safetensors weights")

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], "pt") as st:
            t = st.get_tensor(name)
        return t if self.dtype is None else t.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


class ShardWriter:
    """Collects tensors (cast to `dtype`) and writes a shard whenever `max_bytes` are pending; `close()` names
    the shards as transformers does (model.safetensors, or model-0000i-of-0000n.safetensors with an index)."""

    def __init__(self, out: str | Path, dtype: torch.dtype, max_bytes: int = 2**30):
        self.out, self.dtype, self.max_bytes = Path(out), dtype, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.shards: list[list[str]] = []
        self.total = self.pending_bytes = 0
        self.out.mkdir(parents=True, exist_ok=True)

    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.pending[name] = t.detach().to(self.dtype).contiguous()
            self.pending_bytes += self.pending[name].nbytes
        if self.pending_bytes >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            save_file(self.pending, self.out / f".shard-{len(self.shards)}.safetensors", metadata={"format": "pt"})
            self.shards.append(list(self.pending))
            self.total += self.pending_bytes
            self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for i, name in enumerate(names):
            (self.out / f".shard-{i}.safetensors").rename(self.out / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for i, keys in enumerate(self.shards) for k in keys}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# Block digests: serving hands a trunk's keys and values only to bit-identical blocks (serve/handoff.py).
TRUNK_FILE = "trunk.json"  # in a package: its blocks' digest chain as stored


def _digest(parent: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(parent.encode())
    for name, t in sorted(tensors.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _chain(blocks) -> list[str]:
    """Entry i: the digest of block i's tensors after entry i - 1 (blocks read one at a time, as iterated)."""
    out: list[str] = []
    for tensors in blocks:
        out.append(_digest(out[-1] if out else "", tensors))
    return out


def digests(model) -> list[str]:
    """A tier's leading blocks as a chain: entry i names the embedding and blocks 0..i-1 (entry 0: the
    embedding alone), so two tiers with equal entries at i hold bit-identical first i blocks."""
    return _chain([model.model.embed_tokens.state_dict(), *(layer.state_dict() for layer in model.model.layers)])


def stored_digests(folder: Path) -> list[str]:
    """The chain of a tier checkpoint's blocks as stored (what `digests` gives for the model loaded in its
    stored dtype), read one block at a time: what a package records at packaging (TRUNK_FILE)."""
    files = TensorFiles(folder)
    depth = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]

    def block(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: files[k] for k in files if k.startswith(prefix)}

    return _chain([block("model.embed_tokens."), *(block(f"model.layers.{i}.") for i in range(depth))])
