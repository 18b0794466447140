"""Training batches from packed megatron indexed datasets: the documents of every shard form one token stream
(each ends with EOS), cut into windows of seq_length + 1. Window order is a seeded permutation per epoch, so a
batch is a pure function of (seed, sample index): resuming needs only the number of samples consumed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ruyi_core.errors import RuyiError


class TokenStream:
    def __init__(self, packed_dir: str | Path, seq_length: int, seed: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        packed_dir = Path(packed_dir)
        meta = json.loads((packed_dir / "dataset.json").read_text())
        self.kind, self.seq = meta["kind"], seq_length
        self.parts = []  # (IndexedDataset, mask IndexedDataset | None) per shard
        lengths = []
        for s in meta["shards"]:
            tok = IndexedDataset(str(packed_dir / s["prefix"]), mmap=True)
            mask = IndexedDataset(str(packed_dir / s["mask_prefix"]), mmap=True) if s.get("mask_prefix") else None
            self.parts.append((tok, mask))
            lengths.append(np.asarray(tok.sequence_lengths, dtype=np.int64))
        self.doc_shard = np.concatenate([np.full(len(n), i) for i, n in enumerate(lengths)])
        self.doc_local = np.concatenate([np.arange(len(n)) for n in lengths])
        self.doc_start = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
        self.n_windows = int((self.doc_start[-1] - 1) // seq_length)
        if self.n_windows < 1:
            raise RuyiError(f"{packed_dir}: {self.doc_start[-1]} tokens are fewer than one window of {seq_length}: "
                            "pack more text or lower seq_length")
        self.seed = seed
        self._perm = (-1, None)  # (epoch, its window order): O(n_windows) to draw, so drawn once per epoch

    def _span(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        toks, masks = [], []
        d = int(np.searchsorted(self.doc_start, start, side="right") - 1)
        while length > 0:
            off = start - int(self.doc_start[d])
            n = min(length, int(self.doc_start[d + 1]) - start)
            tok, mask = self.parts[self.doc_shard[d]]
            toks.append(tok.get(int(self.doc_local[d]), offset=off, length=n))
            masks.append(mask.get(int(self.doc_local[d]), offset=off, length=n) if mask is not None
                         else np.ones(n, dtype=np.uint8))
            start, length, d = start + n, length - n, d + 1
        return np.concatenate(toks).astype(np.int64), np.concatenate(masks)

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(self.seed + epoch).permutation(self.n_windows))
        return self._perm[1]

    def window(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, labels, loss_mask) of global sample index `sample` (epochs wrap with a new permutation)."""
        epoch, i = divmod(sample, self.n_windows)
        start = int(self._order(epoch)[i]) * self.seq
        toks, mask = self._span(start, self.seq + 1)
        if self.parts[0][1] is not None:  # SFT: no loss on a conversation whose start is in the previous window
            d = int(np.searchsorted(self.doc_start, start, side="right") - 1)
            if self.doc_start[d] != start:  # (an answer trained without its question learns to ignore questions)
                mask = mask.copy()
                mask[: int(self.doc_start[d + 1]) - start] = 0
        # The label at position t is token t+1; it counts when that token is a trained one (SFT: assistant).
        return torch.from_numpy(toks[:-1]), torch.from_numpy(toks[1:]), torch.from_numpy(mask[1:].astype(np.float32))

    def batch(self, first_sample: int, size: int) -> dict[str, torch.Tensor]:
        rows = [self.window(first_sample + j) for j in range(size)]
        return {"tokens": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows]),
                "loss_mask": torch.stack([r[2] for r in rows])}


class ReplayStream:
    """`primary` with a fraction `replay` of its windows drawn from `extra` (pretraining text mixed into SFT),
    spread evenly: sample i comes from `extra` when floor((i + 1) r) > floor(i r). Still a pure function of the
    sample index, so resuming stays exact."""

    def __init__(self, primary: TokenStream, extra: TokenStream, replay: float):
        self.primary, self.extra, self.r = primary, extra, replay

    def window(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        before = int(sample * self.r)  # extra windows among samples 0..sample-1
        if int((sample + 1) * self.r) > before:
            return self.extra.window(before)
        return self.primary.window(sample - before)

    batch = TokenStream.batch
