"""The trainer's store I/O: its inputs fetched from the store, and its checkpoints kept on local disk and, with a
store prefix, uploaded as complete artifacts. Rank 0 of each node fetches, rank 0 uploads; the other ranks wait at
barriers, so every method is called by every rank."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from ruyi_core.megatron import ckpt


def _rank0() -> bool:
    return dist.get_rank() == 0


def stored_checkpoints(store, prefix: str) -> list[str]:
    """The complete checkpoints under `prefix` in the store, oldest first (their names count steps)."""
    return sorted(store.list_artifacts(prefix))


class StoreIO:
    """The run's store, opened on first use, and its input artifacts fetched into `out`/inputs."""

    def __init__(self, spec, out: Path):
        self.spec, self.out = spec, out
        self.local0 = int(os.environ.get("LOCAL_RANK", 0)) == 0
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from ruyi_core.store import ArtifactStore

            self._store = ArtifactStore.from_spec(self.spec.store, env=os.environ, create_bucket=False)
        return self._store

    def fetch(self, src: str, name: str, only: list[str] | None = None, packed: bool = False) -> Path:
        """An input artifact's folder (`only` these files of it: the family's config, not its weights); a
        `packed` dataset with the parts its manifest names."""
        if not src.startswith("s3://"):
            return Path(src)
        dest = self.out / "inputs" / name
        if self.local0 and not (dest / ".fetched").is_file():
            if packed:
                from ruyi_core.data.packed import fetch_packed

                fetch_packed(self.store, src, dest)
            else:
                self.store.get_artifact(src, dest, only=only)
            (dest / ".fetched").write_text(src)
        dist.barrier()
        return dest


class CheckpointStore:
    """A stage's checkpoints: `iter_NNNNNNN` folders under `root`, each complete once ckpt.DONE is written, and
    with `prefix` each complete one also an artifact under `prefix` in the store, made by `stage` from `inputs`."""

    def __init__(self, io: StoreIO, root: Path, prefix: str | None, stage: str, inputs: list[str | None]):
        self.io, self.root, self.prefix, self.stage = io, root, prefix, stage
        self.inputs = [i for i in inputs if i and i.startswith("s3://")]

    def save(self, step: int, model, optimizer, state: dict, keep: int,
             attach: Callable[[Path], None] | None = None) -> Path:
        """Checkpoints `step` (model, optimizer, every rank's RNG, `state`); rank 0 then runs `attach` on the
        folder (files that travel with it), uploads it, and the newest `keep` complete ones are kept."""
        path = self.root / f"iter_{step:07d}"
        ckpt.save(path, model, optimizer, state, rng=True)
        if attach is not None and _rank0():
            attach(path)
        if self.prefix:
            self._push(path, step)
        self._prune(keep)
        return path

    def load_latest(self, model, optimizer) -> tuple[Path, dict] | None:
        """Loads the latest complete checkpoint, local or (when newer) in the store; (its folder, its state)."""
        if self.prefix:
            self._pull_latest()
        last = ckpt.latest_complete(self.root)
        if last is None:
            return None
        return last, ckpt.load(last, model, optimizer, rng=True)

    def _pull_latest(self) -> None:
        """The store's latest complete checkpoint, when it is newer than what is on local disk."""
        if self.io.local0:
            remote = stored_checkpoints(self.io.store, self.prefix)
            local = ckpt.latest_complete(self.root)
            if remote and (local is None or remote[-1].rsplit("/", 1)[-1] > local.name):
                self.io.store.get_artifact(remote[-1], self.root / remote[-1].rsplit("/", 1)[-1])
        dist.barrier()

    def _push(self, path: Path, step: int) -> None:
        if _rank0():
            self.io.store.put_artifact(f"{self.prefix}/{path.name}", path, stage=f"{self.stage}_checkpoint",
                                       spec_hash=self.io.spec.fingerprint(), inputs=self.inputs,
                                       metadata={"step": step})
        dist.barrier()

    def _prune(self, keep: int) -> None:
        """Keeps the newest `keep` complete checkpoints here and in the store."""
        dist.barrier()
        if self.io.local0:  # each node's scratch holds its own copy
            done = sorted(p for p in self.root.glob("iter_*") if (p / ckpt.DONE).is_file())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        if _rank0() and self.prefix:
            for uri in stored_checkpoints(self.io.store, self.prefix)[:-keep]:
                self.io.store.delete_artifact(uri)
        dist.barrier()
